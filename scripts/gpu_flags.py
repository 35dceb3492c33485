"""The one place that names the GPU architectures and compiler flags the extension is built with.

setup.py (the real build), scripts/nvcc_check.sh and scripts/binding_check.sh (CI's compile
checks) and the cost census (bench/census) all read these, so a kernel is checked and measured
exactly as it is built.

As a command: `python scripts/gpu_flags.py [--arch 90 ...] [--check]` prints the nvcc flags, and
`python scripts/gpu_flags.py --cxx` the host compiler's, one per line, for shell scripts.
"""

from __future__ import annotations

import argparse
import os

# Ampere (A100) and Hopper (H100/H200): the cards this project targets. HTAKL_GPU_ARCHS=90 builds
# for one of them only (a quick check on one card: half the device code to compile).
GPU_ARCHS = tuple(os.environ.get("HTAKL_GPU_ARCHS", "80,90").split(","))

# What torch's CUDAExtension passes to nvcc besides our flags (no implicit half/bfloat16
# conversions), so a compile check with these flags sees what the real build sees.
TORCH_NVCC_DEFINES = (
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
)

# -lineinfo maps SASS back to source lines (the census attributes instructions to passes with
# it); it changes no generated instruction. No --expt-relaxed-constexpr (torch's CUDAExtension
# adds it to the real build on its own): device code calls no constexpr host function, so a
# plain `nvcc -c csrc/cuda/X.cu` compiles every file, and nvcc_check.sh (these flags) keeps it so.
NVCC_FLAGS = (
    "-O3", "-std=c++17", "-lineinfo",
    "--Werror=all-warnings", "-Xcompiler=-Wall,-Wextra",
)


# The host compiler's flags for the extension's C++ files (CPU kernels, CUDA bindings). C++20:
# torch 2.13's headers need it. No -Werror: torch's own headers warn under -Wextra.
# -fno-trapping-math lets the compiler evaluate both sides of the branch-free selects in the CPU
# kernels' loops (0 log 0 = 0, head or tail), so those loops vectorize; results are unchanged
# (floating-point exceptions stay masked).
CXX_FLAGS = ("-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-Wall")


def gencode_flags(archs=GPU_ARCHS) -> list[str]:
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]


def nvcc_flags(archs=GPU_ARCHS, *, with_torch_defines: bool = False) -> list[str]:
    """Flags for compiling our .cu files; with_torch_defines adds what CUDAExtension adds."""
    extra = list(TORCH_NVCC_DEFINES) if with_torch_defines else []
    return list(NVCC_FLAGS) + gencode_flags(archs) + extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="architecture (default: all built)")
    parser.add_argument("--check", action="store_true",
                        help="add the defines torch's CUDAExtension passes (for compile checks)")
    parser.add_argument("--cxx", action="store_true",
                        help="print the host compiler's flags instead of nvcc's")
    args = parser.parse_args()
    if args.cxx:
        print(*CXX_FLAGS, sep="\n")
        return
    print(*nvcc_flags(tuple(args.arch) if args.arch else GPU_ARCHS,
                      with_torch_defines=args.check), sep="\n")


if __name__ == "__main__":
    main()
