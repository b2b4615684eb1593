#!/usr/bin/env bash
# Creates .venv and installs Trinity with its test extras, CPU torch first.
# Idempotent: a second run only checks. llama-cpp-python compiles from source the first time
# (~8 minutes on 2 cores); pip caches the built wheel for later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRINITY_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
# The CPU torch wheel first, or pip pulls a multi-GB CUDA build for the project's torch>=2.6.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q torch==2.13.0
echo "==> installing trinity (llama-cpp-python compiles on first install, ~8 min)"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} "$VENV/bin/pip" install -q -e ".[dev]"
"$VENV/bin/pip" check
