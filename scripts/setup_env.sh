#!/usr/bin/env bash
# Create .venv (if missing) with the CPU build of torch 2.13, Triton and the test tools, then build
# and install htakl_kernels in editable mode. Idempotent: rerun it after changing C++ sources.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HTAKL_VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -r requirements-dev.txt
# The extension compiles against the installed torch, hence no build isolation.
MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" install --no-build-isolation --no-deps -e .
