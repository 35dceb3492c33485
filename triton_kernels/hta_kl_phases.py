"""Triton entry points for the vocab-parallel HTA-KL's phases (htakl_kernels/distributed.py).

Contract: `htakl_kernels/_ops/hta_kl_phases.py`. The per-class phases that scan the slice for
one row at a time run here, one program per row, the classes in blocks: the slice maxima, the
shifted exponentials and their float64 sums, the selection's digit histograms (counts and
fixed-point masses, int64: exact whatever the order) and the head membership (its ties counted
in ascending class order across blocks). The row sums and gradients are the PyTorch-op phases
(`TorchPhases`), whose batched products already run as one kernel each on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ops.hta_kl_phases import MASS_BITS, TorchPhases, key_bits

BLOCK = 128  # classes per block of the row scans
HISTOGRAM_BLOCK = 32  # classes per block of the histograms, broadcast against every bucket


def _key_int(dtype: torch.dtype):
    """Triton's integer type of a p's bit pattern."""
    return tl.int32 if dtype == torch.float32 else tl.int64


@triton.jit
def _keys(p, valid, KEY_INT: tl.constexpr):
    """The selection keys of a block of p: bit patterns, 0 where not valid (NaN, past the end)."""
    return tl.where(valid, p.to(KEY_INT, bitcast=True).to(tl.int64), 0)


@triton.jit
def _slice_max_kernel(x_ptr, out_ptr, classes, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    best = tl.full([BLOCK], float("-inf"), x_ptr.dtype.element_ty)
    for start in range(0, classes, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(x_ptr + row * classes + offs, mask=offs < classes, other=float("-inf"))
        best = tl.maximum(best, tl.where(x != x, float("-inf"), x))  # NaN left out
    tl.store(out_ptr + row, tl.max(best, axis=0))


@triton.jit
def _slice_exp_sums_kernel(x_ptr, max_ptr, scale_ptr, shifted_ptr, exp_ptr, sums_ptr, classes,
                           BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_max = tl.load(max_ptr + row)
    scale = tl.load(scale_ptr)  # 1 / tau in the accumulation dtype
    total = tl.zeros([BLOCK], tl.float64)
    for start in range(0, classes, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < classes
        shifted = (tl.load(x_ptr + row * classes + offs, mask=mask, other=0.0) - row_max) * scale
        exponentials = tl.exp(shifted)
        tl.store(shifted_ptr + row * classes + offs, shifted, mask=mask)
        tl.store(exp_ptr + row * classes + offs, exponentials, mask=mask)
        total += tl.where(mask, exponentials.to(tl.float64), 0.0)
    tl.store(sums_ptr + row, tl.sum(total, axis=0))


@triton.jit
def _slice_histogram_kernel(p_ptr, prefix_ptr, counts_ptr, masses_ptr, classes, shift,
                            BUCKET_BITS: tl.constexpr, MASS_SCALE: tl.constexpr,
                            KEY_INT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    prefix = tl.load(prefix_ptr + row)
    buckets = tl.arange(0, 1 << BUCKET_BITS).to(tl.int64)
    counts = tl.zeros([1 << BUCKET_BITS], tl.int64)
    masses = tl.zeros([1 << BUCKET_BITS], tl.int64)
    for start in range(0, classes, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        p = tl.load(p_ptr + row * classes + offs, mask=offs < classes, other=0.0)
        valid = (offs < classes) & (p == p)
        keys = _keys(p, valid, KEY_INT)
        match = valid & ((keys >> (shift + BUCKET_BITS)) == prefix)
        digits = (keys >> shift) & ((1 << BUCKET_BITS) - 1)
        mass = tl.floor(tl.where(match, p, 0.0).to(tl.float64) * MASS_SCALE).to(tl.int64)
        hit = (digits[:, None] == buckets[None, :]) & match[:, None]
        counts += tl.sum(hit.to(tl.int64), axis=0)
        masses += tl.sum(tl.where(hit, mass[:, None], 0), axis=0)
    out = row * (1 << BUCKET_BITS) + buckets
    tl.store(counts_ptr + out, counts)
    tl.store(masses_ptr + out, masses)


@triton.jit
def _slice_head_kernel(p_ptr, boundary_ptr, tied_ptr, head_ptr, classes, KEY_INT: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    boundary = tl.load(boundary_ptr + row)
    tied_in_head = tl.load(tied_ptr + row)
    seen = tl.zeros([], tl.int64)  # ties in the blocks before
    for start in range(0, classes, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < classes
        p = tl.load(p_ptr + row * classes + offs, mask=mask, other=0.0)
        keys = _keys(p, mask & (p == p), KEY_INT)
        tied = mask & (p == p) & (keys == boundary)
        position = seen + tl.cumsum(tied.to(tl.int64), axis=0) - 1
        member = (keys > boundary) | (tied & (position < tied_in_head))
        tl.store(head_ptr + row * classes + offs, member.to(tl.int8), mask=mask)
        seen += tl.sum(tied.to(tl.int64), axis=0)


class TritonPhases(TorchPhases):
    """The phase ops of the Triton backend: the row scans as the kernels above, the row sums and
    gradients inherited from TorchPhases."""

    @staticmethod
    def slice_max(x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[:-1])
        if out.numel():
            _slice_max_kernel[(out.numel(),)](x, out, x.shape[-1], BLOCK=BLOCK)
        return out

    @staticmethod
    def slice_exp_sums(x, row_max, inv_tau: float):
        shifted, exponentials = torch.empty_like(x), torch.empty_like(x)
        sums = x.new_empty(x.shape[:-1], dtype=torch.float64)
        if sums.numel():
            scale = torch.tensor([inv_tau], dtype=x.dtype, device=x.device)
            _slice_exp_sums_kernel[(sums.numel(),)](x, row_max.contiguous(), scale, shifted,
                                                    exponentials, sums, x.shape[-1], BLOCK=BLOCK)
        return shifted, exponentials, sums

    @staticmethod
    def slice_histogram(p, prefix, shift: int, width: int):
        if not 1 <= width <= 8 or shift < 0 or shift + width > key_bits(p.dtype):
            raise ValueError(f"the digit (shift {shift}, width {width}) must lie within the "
                             f"{key_bits(p.dtype)} key bits, at most 8 bits wide")
        counts = prefix.new_zeros(p.shape[0], 1 << width)
        masses = torch.zeros_like(counts)
        if p.shape[0]:
            _slice_histogram_kernel[(p.shape[0],)](
                p, prefix.contiguous(), counts, masses, p.shape[1], shift, BUCKET_BITS=width,
                MASS_SCALE=float(2 ** MASS_BITS), KEY_INT=_key_int(p.dtype), BLOCK=HISTOGRAM_BLOCK)
        return counts, masses

    @staticmethod
    def slice_head(p, boundary, tied_in_head):
        head = torch.empty(p.shape, dtype=torch.int8, device=p.device)
        if p.shape[0]:
            _slice_head_kernel[(p.shape[0],)](p, boundary.contiguous(), tied_in_head.contiguous(),
                                              head, p.shape[1], KEY_INT=_key_int(p.dtype),
                                              BLOCK=BLOCK)
        return head.view(torch.bool)
