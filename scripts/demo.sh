#!/usr/bin/env bash
# The whole pipeline on the embedded synthetic catalog, one machine, CPU: prepare -> tokenize -> train -> evaluate.
# Extra arguments are config overrides passed to every job (e.g. workdir=/tmp/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-configs/synthetic.yaml}
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
"$PY" jobs/prepare.py --config "$CONFIG" prepare.overwrite=true "$@"
"$PY" jobs/tokenize.py --config "$CONFIG" "$@"
"$PY" jobs/train.py --config "$CONFIG" "$@"
