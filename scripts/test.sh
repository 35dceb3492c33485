#!/usr/bin/env bash
# The test command: set up everything from scratch if needed (venv, torch 2.13 CPU, Triton,
# build), compile-check every CUDA kernel with nvcc for every architecture the build targets and
# syntax-check the torch-facing CUDA bindings against torch's headers, then run the suite.
# Extra arguments go to pytest.
#
# Without nvcc the two compile checks are skipped, saying so in one line, unless
# HTAKL_REQUIRE_NVCC=1 (CI sets it, .ci/run): then a missing nvcc fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
if command -v "${NVCC:-nvcc}" >/dev/null; then
  scripts/nvcc_check.sh
  scripts/binding_check.sh
elif [ "${HTAKL_REQUIRE_NVCC:-0}" = 1 ]; then
  echo "test.sh: ${NVCC:-nvcc} not found; HTAKL_REQUIRE_NVCC=1 makes the CUDA compile checks" \
    "mandatory (install the CUDA toolkit or set NVCC)" >&2
  exit 1
else
  echo "test.sh: CUDA compile checks skipped (no ${NVCC:-nvcc}; HTAKL_REQUIRE_NVCC=1 makes them mandatory)"
fi
exec .venv/bin/python -m pytest -q -ra tests "$@"
