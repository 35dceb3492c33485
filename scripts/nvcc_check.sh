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
# Compile time: each file is compiled once per architecture, and each compile's CPU time (user +
# system, of nvcc and every tool it runs) is printed; one over NVCC_CHECK_MAX_SECONDS (default 40;
# 0: no limit) fails the check. CPU time rather than wall time: a shared, loaded machine stretches
# the wall time of the same compile up to twofold, its CPU time much less. The slow kernels are
# the fully unrolled LIF long-segment backwards (hence one .cu per storage type): the slowest
# file, lif_cuda_float32.cu, took 25-30 s for sm_90 (15 s for sm_80) on a 2-core x86 machine, so
# the default leaves room for a slower machine and fails a file that gathers two such kernels.
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
max_seconds=${NVCC_CHECK_MAX_SECONDS:-40}
# One compile per -gencode flag, so that each time is one architecture's.
common=()
gencodes=()
for flag in "${flags[@]}"; do
  case "$flag" in
    -gencode=*) gencodes+=("$flag") ;;
    *) common+=("$flag") ;;
  esac
done
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
TIMEFORMAT='%R %U %S'
status=0
for source in "${files[@]}"; do
  for gencode in "${gencodes[@]}"; do
    arch=${gencode##*code=}
    object="$workdir/$(echo "$source" | tr '/' '_').$arch.o"
    log="$workdir/log"
    if ! { time "$NVCC" -c "${common[@]}" "$gencode" -Xptxas=-warn-spills,-warn-lmem-usage \
        -Icsrc "$source" -o "$object" >"$log" 2>&1; } 2>"$workdir/time"; then
      cat "$log"
      echo "nvcc_check: FAILED to compile $source for $arch" >&2
      status=1
      continue
    fi
    read -r wall user system <"$workdir/time"
    cpu=$(awk -v u="$user" -v s="$system" 'BEGIN { printf "%.1f", u + s }')
    echo "nvcc_check: $source $arch: ${cpu} s CPU (${wall} s wall)"
    if grep -qi 'warning' "$log"; then
      cat "$log"
      echo "nvcc_check: warnings in $source ($arch)" >&2
      status=1
    fi
    if awk -v cpu="$cpu" -v max="$max_seconds" 'BEGIN { exit !(max > 0 && cpu > max) }'; then
      echo "nvcc_check: $source took ${cpu} s of CPU for $arch, over" \
        "NVCC_CHECK_MAX_SECONDS=$max_seconds: split it (a translation unit per storage type" \
        "or kernel)" >&2
      status=1
    fi
  done
done
if [ "$status" -eq 0 ]; then
  echo "nvcc_check: ${#files[@]} file(s) compiled cleanly for ${#gencodes[@]} architecture(s)"
fi
exit "$status"
