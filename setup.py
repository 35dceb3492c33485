"""Build htakl_kernels with one extension, htakl_kernels._C.

The C++ CPU kernels are always built. The CUDA kernels (csrc/cuda) are added when torch is a CUDA
build and nvcc is found, unless HTAKL_NO_CUDA=1. Install with
`pip install --no-build-isolation -e .` (the build needs the torch that is already installed).
"""

import glob
import os
import runpy

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# The GPU architectures and compiler flags: one definition, shared with the compile checks.
GPU_FLAGS = runpy.run_path(os.path.join(HERE, "scripts", "gpu_flags.py"))


def _sources(pattern):
    return sorted(os.path.relpath(path, HERE) for path in glob.glob(os.path.join(HERE, pattern)))


def _want_cuda():
    if os.environ.get("HTAKL_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    cxx_flags = list(GPU_FLAGS["CXX_FLAGS"])
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(HERE, "csrc")]
    if not _want_cuda():
        return CppExtension(
            "htakl_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    # CUDAExtension adds torch's own nvcc defines itself.
    nvcc_flags = GPU_FLAGS["nvcc_flags"]()
    return CUDAExtension(
        "htakl_kernels._C", sources + _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
        include_dirs=include_dirs, define_macros=[("HTAKL_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"],
    )


setup(
    name="htakl-kernels",
    version="0.1.0",
    description="Fused HTA-KL distillation loss and LIF neuron kernels for spiking neural networks",
    packages=[
        "htakl_kernels",
        "htakl_kernels.demo",
        "htakl_kernels.reference",
        "htakl_kernels.triton_kernels",
    ],
    # The Triton sources live in the top-level triton_kernels/ folder but install inside
    # htakl_kernels: a top-level `triton_kernels` package belongs to other distributions.
    package_dir={"htakl_kernels.triton_kernels": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "numpy"],
        # What `python -m htakl_kernels.demo` imports besides torch.
        "demo": ["numpy", "scikit-learn", "matplotlib", "tqdm"],
    },
)
