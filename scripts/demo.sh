#!/usr/bin/env bash
# The whole pipeline on the embedded synthetic catalog, one machine, CPU:
#   prepare -> tokenize (Ray, local) -> train (DeepSpeed, one process) -> evaluate (test split, vs most-popular).
# Extra arguments are dotted config overrides given to every job (e.g. workdir=/tmp/demo train.model=car).
# Browse the runs afterwards: .venv/bin/mlflow ui --backend-store-uri sqlite:///outputs/synthetic/mlflow.db
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-configs/synthetic.yaml}
RUN=demo-$(date +%Y%m%d-%H%M%S)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
"$PY" jobs/prepare.py  --config "$CONFIG" prepare.overwrite=true "$@"
"$PY" jobs/tokenize.py --config "$CONFIG" tokenize.overwrite=true "$@"
"$PY" jobs/train.py    --config "$CONFIG" train.run_name="$RUN" "$@"
"$PY" jobs/evaluate.py --config "$CONFIG" --run "$RUN" "$@"
