#!/usr/bin/env bash
# Fresh virtual environment with everything genrec-dist needs (about 4 minutes on 2 cores).
# torch goes in first so pip keeps that build (the CPU wheel here) instead of pulling a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q -e '.[dev]'
echo "genrec-dist installed in $VENV"
