#!/usr/bin/env bash
# CI compile check of the CUDA sources: every csrc/**/*.cu is compiled to an object file for every
# architecture the build targets (no GPU needed), with the build's nvcc flags: nvcc's warnings as
# errors and the host compiler's -Wall -Wextra. Fails on any error, and on any warning the flags
# leave as a warning (host-compiler warnings are not covered by nvcc's -Werror, hence the scan of
# the output).
#
# The flags are scripts/gpu_flags.py's (the ones setup.py builds with) plus the defines torch's
# CUDAExtension passes to nvcc (no implicit half/bfloat16 conversions), so a file that passes here
# also compiles in `pip install -e .` on a CUDA machine.
# The .cu files are torch-free; the torch-facing binding (.cpp) is compiled by setup.py only.
# ptxas also reports every kernel that spills registers to local memory or uses local memory at
# all (-warn-spills, -warn-lmem-usage; an error under --Werror): the kernels are designed to keep
# their state in registers, so a spill fails the check.
#
# Usage: scripts/nvcc_check.sh [files...]   (default: every .cu under csrc). NVCC overrides nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null; then
  echo "nvcc_check: $NVCC not found; install the CUDA toolkit or set NVCC" >&2
  exit 1
fi
if [ "$#" -gt 0 ]; then
  files=("$@")
else
  mapfile -t files < <(find csrc -name '*.cu' | sort)
fi
if [ "${#files[@]}" -eq 0 ]; then
  echo "nvcc_check: no .cu files under csrc" >&2
  exit 0
fi
mapfile -t flags < <(python3 scripts/gpu_flags.py --check)
if [ "${#flags[@]}" -eq 0 ]; then
  echo "nvcc_check: scripts/gpu_flags.py printed no flags" >&2
  exit 1
fi
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
status=0
for source in "${files[@]}"; do
  object="$workdir/$(echo "$source" | tr '/' '_').o"
  log="$workdir/log"
  echo "nvcc_check: $source"
  if ! "$NVCC" -c "${flags[@]}" -Xptxas=-warn-spills,-warn-lmem-usage -Icsrc "$source" \
      -o "$object" >"$log" 2>&1; then
    cat "$log"
    echo "nvcc_check: FAILED to compile $source" >&2
    status=1
  elif grep -qi 'warning' "$log"; then
    cat "$log"
    echo "nvcc_check: warnings in $source" >&2
    status=1
  fi
done
if [ "$status" -eq 0 ]; then echo "nvcc_check: ${#files[@]} file(s) compiled cleanly"; fi
exit "$status"
