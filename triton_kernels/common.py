"""What the Triton kernels share besides the AOT harness (aot.py)."""

from __future__ import annotations

import torch
import triton.language as tl

from .._library import accumulation_dtype


def tl_accumulation_dtype(dtype: torch.dtype):
    """Triton's type of `_library.accumulation_dtype(dtype)`: the kernels' ACC constexpr."""
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32
