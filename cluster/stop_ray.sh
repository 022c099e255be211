#!/usr/bin/env bash
# Stop the Ray node that cluster/start_ray.sh started here: SIGTERM to its session, SIGKILL after a grace
# period. Other Ray instances on the machine are left alone.
#
#   cluster/stop_ray.sh            # the node of GENREC_RAY_PID_FILE (default /tmp/ray/genrec-ray.pid)
#   cluster/stop_ray.sh --all      # `ray stop`: every Ray process of this user here (dedicated nodes only)
set -euo pipefail
if [[ "${1:-}" == "--all" ]]; then
  exec "${RAY_BIN:-ray}" stop
fi
TEMP_DIR=${GENREC_RAY_TEMP_DIR:-/tmp/ray}
PID_FILE=${GENREC_RAY_PID_FILE:-$TEMP_DIR/genrec-ray.pid}
if [[ ! -f "$PID_FILE" ]]; then
  echo "stop_ray.sh: no $PID_FILE (nothing started by start_ray.sh here)" >&2
  exit 1
fi
# start_ray.sh ran `ray start` under setsid: the node is that session. Ray's worker processes put themselves in
# process groups of their own, so the session, not the process group, is what holds every process of the node.
SID=$(cat "$PID_FILE")
alive() { pgrep -s "$SID" >/dev/null 2>&1; }
pkill -TERM -s "$SID" 2>/dev/null || true
for _ in $(seq 1 "${GENREC_RAY_STOP_GRACE_S:-5}"); do
  alive || break
  sleep 1
done
if alive; then
  pkill -KILL -s "$SID" 2>/dev/null || true
  sleep 1
fi
rm -f "$PID_FILE"
echo "ray node (session $SID) stopped"
