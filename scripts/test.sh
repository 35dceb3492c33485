#!/usr/bin/env bash
# The test command: set up everything from scratch if needed (venv, torch 2.13 CPU, Triton,
# build), compile-check every CUDA kernel with nvcc for sm_80 and sm_90 and syntax-check the
# torch-facing CUDA bindings against torch's headers, then run the suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
scripts/nvcc_check.sh
scripts/binding_check.sh
exec .venv/bin/python -m pytest -q -ra tests "$@"
