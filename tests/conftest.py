"""Suite-wide settings: Triton's interpreter on machines without a GPU, and the test markers.

Markers (registered in pyproject.toml): `cuda`, `triton` and `cuda_emulated` (the CUDA kernels'
source on the CPU, tests/cuda/host) name what a test runs on, `demo` the
demo's own tests, `slow` what `pytest -m "not slow"` leaves out of the quick loop (Triton
interpreter grids, rows of tens of thousands of classes and more, end-to-end runs).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET when its kernels are decorated (@triton.jit), so it must be set
# before any test module imports htakl_kernels.triton_kernels. Without a GPU the Triton kernels then
# run on CPU tensors through the interpreter (the other backends never look at the variable); with
# a GPU it is left alone, so the Triton tests exercise the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Marked by name: the demo's tests, and the end-to-end runs (whole files, or single tests as
# "file::test").
DEMO_FILE_PREFIX = "test_demo_"
SLOW = {"test_demo_run.py", "test_demo_torchrun.py", "test_census.py::test_quick_census_end_to_end"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = Path(str(item.fspath)).name
        if name.startswith(DEMO_FILE_PREFIX):
            item.add_marker(pytest.mark.demo)
        if name in SLOW or f"{name}::{item.originalname}" in SLOW:
            item.add_marker(pytest.mark.slow)
