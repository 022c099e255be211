#!/usr/bin/env bash
# Every GPU check in one command (scripts/gpu_check.py says what it measures); one JSON out, under 8 minutes on one
# H100. On the device machine (torch only, no project install):
#   python scripts/gpu_check.py --export configs/beauty.yaml --data slice.npz     # here first: Beauty + our codes
#   bash scripts/gpu_check.sh --data slice.npz --out "$OUT/gpu_check.json"        # there
# CI runs `bash scripts/gpu_check.sh --dry` on the CPU so the script cannot rot before a GPU is lent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
[[ -x .venv/bin/python ]] && PY=${PYTHON:-.venv/bin/python}
exec "$PY" scripts/gpu_check.py "$@"
