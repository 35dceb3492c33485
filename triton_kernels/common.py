"""What the Triton kernels share besides the AOT harness (aot.py)."""

from __future__ import annotations

import contextlib

import torch
import triton.language as tl

from .._library import accumulation_dtype


def tl_accumulation_dtype(dtype: torch.dtype):
    """Triton's type of `_library.accumulation_dtype(dtype)`: the kernels' ACC constexpr."""
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


def on_device_of(tensor: torch.Tensor):
    """The tensor's GPU as the current device for the launches inside: a Triton launch runs on
    the current device whatever device its arguments are on (the C++ ops hold a CUDAGuard for the
    same reason). A no-op for CPU tensors (the interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
