#!/usr/bin/env bash
# A team's MLflow tracking server: SQLite (or PostgreSQL) backend store, artifacts on local disk or s3://,
# served through the server (--serve-artifacts) so clients need no direct access to the artifact store.
#
#   cluster/mlflow_server.sh                      # 127.0.0.1:5000, store under ./mlflow-server
#   MLFLOW_HOST=0.0.0.0 MLFLOW_PORT=5000 MLFLOW_ARTIFACTS=s3://bucket/mlflow cluster/mlflow_server.sh
#   MLFLOW_BACKEND=postgresql://user@db/mlflow cluster/mlflow_server.sh
#
# Jobs then take `tracking.uri=http://<host>:<port>` (or MLFLOW_TRACKING_URI). Binds to loopback unless told.
set -euo pipefail
ROOT=${MLFLOW_ROOT:-mlflow-server}
mkdir -p "$ROOT"
BACKEND=${MLFLOW_BACKEND:-sqlite:///$(cd "$ROOT" && pwd)/mlflow.db}
ARTIFACTS=${MLFLOW_ARTIFACTS:-$(cd "$ROOT" && pwd)/artifacts}
exec mlflow server \
  --backend-store-uri "$BACKEND" \
  --artifacts-destination "$ARTIFACTS" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-1}"
