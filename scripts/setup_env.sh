#!/usr/bin/env bash
# Create .venv (if missing) with the CPU build of torch 2.13, Triton and the test tools, then build
# and install htakl_kernels in editable mode. Cheap to rerun: the requirements are reinstalled only
# when requirements-dev.txt changed, and the extension is rebuilt only when one of its inputs
# (csrc/**, setup.py, pyproject.toml, scripts/gpu_flags.py, requirements-dev.txt, the installed
# torch, HTAKL_NO_CUDA, HTAKL_GPU_ARCHS) changed since the last successful build, or its library
# is missing. The fingerprints of the last successful steps live in the venv, so a new venv starts
# from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HTAKL_VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build. (find_spec
# instead of an import: importing torch takes seconds.)
if ! "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
  "${PIP[@]}" install "torch==2.13.0"
fi

requirements_stamp="$VENV/.htakl-requirements.sha256"
requirements_hash=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [ "$(cat "$requirements_stamp" 2>/dev/null)" != "$requirements_hash" ]; then
  "${PIP[@]}" install -r requirements-dev.txt
  echo "$requirements_hash" >"$requirements_stamp"
fi

# Everything the build reads, as one hash: each input file's hash and path, the torch it compiles
# against, the switch that leaves CUDA out and the architectures it is built for.
build_hash() {
  {
    find csrc -type f -print0 | sort -z |
      xargs -0 sha256sum -- setup.py pyproject.toml scripts/gpu_flags.py requirements-dev.txt
    find "$VENV"/lib/python*/site-packages -maxdepth 1 -name 'torch-*.dist-info'
    echo "HTAKL_NO_CUDA=${HTAKL_NO_CUDA:-} HTAKL_GPU_ARCHS=${HTAKL_GPU_ARCHS:-}"
  } | sha256sum | cut -d' ' -f1
}
build_stamp="$VENV/.htakl-build.sha256"
current_build=$(build_hash)
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$current_build" ] ||
    ! compgen -G 'htakl_kernels/_C*.so' >/dev/null; then
  rm -f "$build_stamp"
  # The extension compiles against the installed torch, hence no build isolation.
  MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" install --no-build-isolation --no-deps -e .
  echo "$current_build" >"$build_stamp"
fi
