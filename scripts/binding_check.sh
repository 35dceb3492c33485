#!/usr/bin/env bash
# CI syntax check of the torch-facing CUDA bindings (csrc/cuda/*.cpp). setup.py compiles them
# only on a machine with a CUDA build of torch; here, with the CPU wheel, they are parsed and
# type-checked against torch's headers and the CUDA toolkit's (g++ -fsyntax-only with the build's
# host flags from scripts/gpu_flags.py, our code with -Wall -Wextra -Werror), so an error in a
# binding fails CI instead of the next GPU build.
#
# The CPU wheel ships torch's c10/cuda headers but not the one CMake generates for them,
# c10/cuda/impl/cuda_cmake_macros.h, which only sets export macros; an empty one stands in.
#
# Usage: scripts/binding_check.sh [files...]  (default: csrc/cuda/*.cpp). Needs .venv and nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-.venv/bin/python}
if [ "$#" -gt 0 ]; then
  files=("$@")
else
  mapfile -t files < <(find csrc/cuda -name '*.cpp' | sort)
fi
if [ "${#files[@]}" -eq 0 ]; then
  echo "binding_check: no bindings under csrc/cuda"
  exit 0
fi
# The toolkit's include directory, as nvcc itself passes it to the host compiler.
cuda_include=$("$NVCC" --dryrun -c -x cu /dev/null 2>&1 |
  sed -n 's/.*-I"\{0,1\}\([^" ]*targets[^" ]*\/include\)"\{0,1\}.*/\1/p' | head -n 1)
if [ ! -f "$cuda_include/cuda_runtime.h" ]; then
  echo "binding_check: cannot find the CUDA toolkit's include directory via $NVCC" >&2
  exit 1
fi
mapfile -t torch_includes < <("$PYTHON" -c '
import sysconfig
from torch.utils.cpp_extension import include_paths
print(*include_paths(), sysconfig.get_paths()["include"], sep="\n")')
abi=$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
mkdir -p "$workdir/c10/cuda/impl"
echo '#pragma once' >"$workdir/c10/cuda/impl/cuda_cmake_macros.h"
system_includes=(-isystem "$workdir" -isystem "$cuda_include")
for dir in "${torch_includes[@]}"; do system_includes+=(-isystem "$dir"); done
mapfile -t cxx_flags < <(python3 scripts/gpu_flags.py --cxx)
if [ "${#cxx_flags[@]}" -eq 0 ]; then
  echo "binding_check: scripts/gpu_flags.py printed no flags" >&2
  exit 1
fi
status=0
for source in "${files[@]}"; do
  echo "binding_check: $source"
  if ! "${CXX:-c++}" -fsyntax-only "${cxx_flags[@]}" -Wextra -Werror -Icsrc "${system_includes[@]}" \
      -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI="$abi" \
      "$source"; then
    echo "binding_check: FAILED: $source" >&2
    status=1
  fi
done
if [ "$status" -eq 0 ]; then echo "binding_check: ${#files[@]} binding(s) check cleanly"; fi
exit "$status"
