#!/usr/bin/env bash
# Start one Ray node on this machine without the cluster launcher (on-prem, or a laptop), in the background.
#
#   cluster/start_ray.sh head                     # head: GCS on :6379, dashboard/jobs on :8265
#   cluster/start_ray.sh worker 10.0.0.1:6379     # a worker joining that head (GPUs detected)
#   cluster/start_ray.sh head --num-cpus=2        # extra arguments go to `ray start`
#
# Then: ray job submit --address http://<head>:8265 --working-dir . -- python jobs/tokenize.py --config ...
# Stop this node with cluster/stop_ray.sh (only the processes this script started).
#
# Ray >= 2.5x token auth: a head prints the exports a submitting shell needs (RAY_AUTH_MODE=token, the token's path,
# RAY_ADDRESS); every node and the submitting machine need the same token (RAY_AUTH_TOKEN or ~/.ray/auth_token).
#
# Environment: GENREC_RAY_PORT (6379), GENREC_RAY_DASHBOARD_PORT (8265), GENREC_RAY_DASHBOARD_HOST (0.0.0.0 on a
# head; 127.0.0.1 keeps the job API on loopback), GENREC_RAY_TEMP_DIR (/tmp/ray; keep it short: Ray puts unix
# sockets there), GENREC_RAY_PID_FILE (<temp dir>/genrec-ray.pid), GENREC_RAY_START_TIMEOUT (120 s).
set -euo pipefail
ROLE=${1:?usage: start_ray.sh head|worker HEAD_ADDRESS [ray start args...]}
shift
RAY=${RAY_BIN:-ray}
TEMP_DIR=${GENREC_RAY_TEMP_DIR:-/tmp/ray}
PID_FILE=${GENREC_RAY_PID_FILE:-$TEMP_DIR/genrec-ray.pid}
LOG=${PID_FILE%.pid}.log
mkdir -p "$TEMP_DIR"

case "$ROLE" in
  head)
    ARGS=(--head --port="${GENREC_RAY_PORT:-6379}" --dashboard-host="${GENREC_RAY_DASHBOARD_HOST:-0.0.0.0}"
          --dashboard-port="${GENREC_RAY_DASHBOARD_PORT:-8265}") ;;
  worker)
    HEAD=${1:?usage: start_ray.sh worker HEAD_ADDRESS}
    shift
    ARGS=(--address="$HEAD") ;;
  *) echo "start_ray.sh: role must be head or worker, got '$ROLE'" >&2; exit 2 ;;
esac

if [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
  echo "start_ray.sh: a node started by this script is already running (pid $(cat "$PID_FILE"), $PID_FILE)" >&2
  exit 1
fi

# --block keeps `ray start` in the foreground of a session of its own (setsid): every process of the node, the
# workers included (they take process groups of their own), is in that session, which stop_ray.sh ends without
# touching other Ray instances on the machine (`ray stop` would).
setsid "$RAY" start "${ARGS[@]}" --block --temp-dir="$TEMP_DIR" --disable-usage-stats "$@" >"$LOG" 2>&1 &
echo $! >"$PID_FILE"

deadline=$((SECONDS + ${GENREC_RAY_START_TIMEOUT:-120}))
until grep -q "Ray runtime started" "$LOG" 2>/dev/null; do
  if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null || ((SECONDS > deadline)); then
    echo "start_ray.sh: ray start failed or timed out; log $LOG:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
  sleep 0.5
done
echo "ray $ROLE started (pid $(cat "$PID_FILE"), log $LOG)"

# What a shell that submits jobs needs. A Ray 2.5x head turns token auth on by itself when a token exists (any earlier
# local `ray.init` writes ~/.ray/auth_token), while `ray job submit` turns it on only when RAY_AUTH_MODE=token is in its
# environment: without the exports it fails with "AuthenticationError: Missing authentication token".
if [[ "$ROLE" == head ]]; then
  # (Ray colours its log: strip the escape codes before reading the address)
  IP=$(sed -e 's/\x1b\[[0-9;]*m//g' "$LOG" | sed -n 's/.*Local node IP: \([0-9.]*\).*/\1/p' | head -n 1)
  TOKEN=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
  echo "To submit jobs from a shell:"
  if [[ "${RAY_AUTH_MODE:-}" == token ]] || grep -q "Token authentication is enabled" "$LOG"; then
    echo "  export RAY_AUTH_MODE=token"
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
      echo "  export RAY_AUTH_TOKEN=<the token this node was started with>"
    else
      echo "  export RAY_AUTH_TOKEN_PATH=$TOKEN   # on another machine: a copy of this file"
    fi
  fi
  # the job API listens on the dashboard host: its own address when one was given, else every address (the node's)
  HOST=${GENREC_RAY_DASHBOARD_HOST:-0.0.0.0}
  [[ "$HOST" == 0.0.0.0 ]] && HOST=${IP:-127.0.0.1}
  echo "  export RAY_ADDRESS=http://${HOST}:${GENREC_RAY_DASHBOARD_PORT:-8265}"
  echo "  ray job submit --working-dir . -- python jobs/tokenize.py --config configs/scientific.yaml workdir=/shared/..."
fi
