"""What only the CUDA LIF kernels have: "auto" picks them for CUDA tensors. The contract they
share with the other backends is tests/test_lif_contract.py (the .cu files are compile-checked
without a GPU by the nvcc check)."""

from __future__ import annotations

import pytest
import torch

from htakl_kernels._backends import resolve_backend

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]


def test_auto_picks_the_cuda_kernel():
    assert resolve_backend("auto", torch.device("cuda")) == "cuda"
