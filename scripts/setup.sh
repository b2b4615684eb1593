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
# llama-cpp-python compiles llama.cpp on first install (~8 min on 2 cores) and pip caches that wheel.
# Build it for the x86-64-v3 set the Dockerfiles name (their LLAMA_CMAKE_ARGS, read from there), never
# -march=native: a native build on a CPU that lists AMX uses AMX tiles, and where the sandbox does not
# grant AMX state (this project's CI boxes, 2026-11-28) the first llama.cpp matmul dies of SIGILL
# (`tilezero`). A cached wheel built natively (AMX or AVX-512 in its system info) is removed and rebuilt.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
LLAMA_VERSION=$(sed -n 's/^ARG LLAMA_CPP_PYTHON_VERSION=//p' Dockerfile)
LLAMA_ARGS=$(sed -n 's/^ARG LLAMA_CMAKE_ARGS="\(.*\)"$/\1/p' Dockerfile)
portable_llama() {  # exit 0: a portable build is installed; 1: a native one; 2: none importable
  "$VENV/bin/python" -c "import sys
try:
    import llama_cpp
except Exception as e:
    print(f'llama_cpp does not import: {e}', file=sys.stderr); sys.exit(2)
info = llama_cpp.llama_print_system_info().decode()
sys.exit(any(f'{k} = 1' in info for k in ('AMX_INT8', 'AVX512')))"
}
if ! portable_llama 2>/dev/null; then
  echo "==> installing llama-cpp-python $LLAMA_VERSION ($LLAMA_ARGS)"
  CMAKE_ARGS="$LLAMA_ARGS" "$VENV/bin/pip" install -q "llama-cpp-python==$LLAMA_VERSION"  # with numpy & co
  found=0; portable_llama || found=$?
  [ "$found" != 2 ] || exit 1
  if [ "$found" = 1 ]; then
    echo "==> the cached llama-cpp-python wheel was built for this CPU: rebuilding (~8 min)"
    "$VENV/bin/pip" cache remove 'llama_cpp_python*' >/dev/null 2>&1 || true
    CMAKE_ARGS="$LLAMA_ARGS" "$VENV/bin/pip" install -q --no-deps --force-reinstall "llama-cpp-python==$LLAMA_VERSION"
    portable_llama || { echo "llama-cpp-python still reports AMX/AVX-512 after a portable build" >&2; exit 1; }
  fi
fi
echo "==> installing trinity"
"$VENV/bin/pip" install -q -e ".[dev]"
"$VENV/bin/pip" check
