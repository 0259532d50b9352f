#!/usr/bin/env bash
# Build the project's virtual environment (.venv) from requirements.txt and install vadlab into it.
# Idempotent: does nothing when .venv already matches requirements.txt and pyproject.toml.
# Needs only package registries (PyPI); set VENV to use another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.vadlab-stamp" ] && [ "$(cat "$VENV/.vadlab-stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (python: $($PYTHON --version 2>&1))"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
"$VENV/bin/python" -m pip check
echo "$want" > "$VENV/.vadlab-stamp"
