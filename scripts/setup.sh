#!/usr/bin/env bash
# Fresh virtual environment with everything genrec-dist needs (about 4 minutes on 2 cores).
# torch goes in first so pip keeps that build (the CPU wheel here) instead of pulling a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# constraints.txt pins the versions CI tested together: without it pip's resolver can spend many minutes
# backtracking through boto3/botocore releases (s3fs's aiobotocore pins botocore narrowly, moto wants boto3).
# CONSTRAINTS= (empty) installs the newest compatible versions instead.
CONSTRAINTS=${CONSTRAINTS-constraints.txt}
"$VENV/bin/python" -m pip install -q -e '.[dev]' ${CONSTRAINTS:+-c "$CONSTRAINTS"}
echo "genrec-dist installed in $VENV"
