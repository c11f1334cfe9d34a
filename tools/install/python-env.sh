#!/usr/bin/env bash
# Create the project's virtual environment (VENV, default .venv) and install shadowblk into it
# in editable mode with its test extras. Re-running is cheap: pip skips what is satisfied.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
if [[ ! -x $venv/bin/python ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel "cython>=3.0"
"$venv/bin/python" -m pip install -q --no-build-isolation -e ".[test]"
