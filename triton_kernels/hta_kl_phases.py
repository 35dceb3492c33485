"""Triton entry points for the vocab-parallel HTA-KL's phases (htakl_kernels/distributed.py).

Contract: `htakl_kernels/_ops/hta_kl_phases.py`. Every phase op is one launch of one program
per row, the classes in blocks: the slice maxima, the shifted exponentials and their float64
sums, the selection's digit histograms (counts and fixed-point masses, int64: exact whatever the
order), the head membership (its ties counted in ascending class order across blocks), the row
sums (float64 lanes, summed in a fixed order) and the gradients. The per-class formulas are the
fused Triton kernel's (`hta_kl.py`, mirroring csrc/hta_kl_math.h), in natural logs here.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._ops.hta_kl_phases import MASS_BITS, key_bits
from .common import on_device_of
from .hta_kl import (_fkl_term, _grad_student_softmax, _grad_teacher, _q_t_log_ratio, _rkl_term,
                     _sign_of_difference)

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


@triton.jit
def _ratio(log_q_t, log_q):
    """q_t / q from the logs, 0 only where log q_t is -inf (the fused kernel's _prob_ratio, in
    natural logs)."""
    return tl.where(log_q_t > float("-inf"), tl.exp(log_q_t - log_q), 0.0)


@triton.jit
def _load_block(p_ptr, log_p_ptr, q_ptr, log_q_ptr, head_ptr, row, classes, offs, mask):
    """A block of one row's classes of phases 3-4's inputs: p, log p, q, log q and the head."""
    at = row * classes + offs
    p = tl.load(p_ptr + at, mask=mask, other=0.0)
    log_p = tl.load(log_p_ptr + at, mask=mask, other=0.0)
    q = tl.load(q_ptr + at, mask=mask, other=0.0)
    log_q = tl.load(log_q_ptr + at, mask=mask, other=0.0)
    head = tl.load(head_ptr + at, mask=mask, other=0) != 0
    return p, log_p, q, log_q, head


@triton.jit
def _load_step_block(q_steps_ptr, log_q_steps_ptr, step_row, classes, offs, mask):
    """The same block of one student softmax's q_t and log q_t (row `step_row` of [S x R, c])."""
    at = step_row * classes + offs
    q_t = tl.load(q_steps_ptr + at, mask=mask, other=0.0)
    log_q_t = tl.load(log_q_steps_ptr + at, mask=mask, other=float("-inf"))
    return q_t, log_q_t


@triton.jit
def _slice_sums_kernel(p_ptr, log_p_ptr, q_ptr, log_q_ptr, q_steps_ptr, log_q_steps_ptr, head_ptr,
                       out_ptr, rows, classes, softmaxes, sums_per_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d_head = tl.zeros([BLOCK], tl.float64)
    d_tail = tl.zeros([BLOCK], tl.float64)
    fkl = tl.zeros([BLOCK], tl.float64)
    rkl = tl.zeros([BLOCK], tl.float64)
    q_head = tl.zeros([BLOCK], tl.float64)
    q_tail = tl.zeros([BLOCK], tl.float64)
    p_head = tl.zeros([BLOCK], tl.float64)
    p_tail = tl.zeros([BLOCK], tl.float64)
    for start in range(0, classes, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < classes
        p, log_p, q, log_q, head = _load_block(p_ptr, log_p_ptr, q_ptr, log_q_ptr, head_ptr, row,
                                               classes, offs, mask)
        sign = _sign_of_difference(q, p)
        distance = tl.abs(p - q).to(tl.float64)
        d_head += tl.where(head, distance, 0.0)
        d_tail += tl.where(head, 0.0, distance)
        fkl += _fkl_term(p, log_p, log_q).to(tl.float64)
        rkl += _rkl_term(q, log_q, log_p).to(tl.float64)
        q_head += tl.where(head, q * sign, 0.0).to(tl.float64)
        q_tail += tl.where(head, 0.0, q * sign).to(tl.float64)
        p_head += tl.where(head, p * sign, 0.0).to(tl.float64)
        p_tail += tl.where(head, 0.0, p * sign).to(tl.float64)
    out = out_ptr + row * sums_per_row
    dtype = out_ptr.dtype.element_ty
    tl.store(out + 0, tl.sum(d_head, axis=0).to(dtype))
    tl.store(out + 1, tl.sum(d_tail, axis=0).to(dtype))
    tl.store(out + 2, tl.sum(fkl, axis=0).to(dtype))
    tl.store(out + 3, tl.sum(rkl, axis=0).to(dtype))
    tl.store(out + 4, tl.sum(q_head, axis=0).to(dtype))
    tl.store(out + 5, tl.sum(q_tail, axis=0).to(dtype))
    tl.store(out + 6, tl.sum(p_head, axis=0).to(dtype))
    tl.store(out + 7, tl.sum(p_tail, axis=0).to(dtype))
    if softmaxes > 1:  # prob_mean: four sums per step
        for t in range(0, softmaxes):
            step = t * rows
            p_ratio = tl.zeros([BLOCK], tl.float64)
            log_ratio = tl.zeros([BLOCK], tl.float64)
            q_t_head = tl.zeros([BLOCK], tl.float64)
            q_t_tail = tl.zeros([BLOCK], tl.float64)
            for start in range(0, classes, BLOCK):
                offs = start + tl.arange(0, BLOCK).to(tl.int64)
                mask = offs < classes
                p, log_p, q, log_q, head = _load_block(p_ptr, log_p_ptr, q_ptr, log_q_ptr,
                                                       head_ptr, row, classes, offs, mask)
                q_t, log_q_t = _load_step_block(q_steps_ptr, log_q_steps_ptr, step + row, classes,
                                                offs, mask)
                signed = q_t * _sign_of_difference(q, p)
                p_ratio += (p * _ratio(log_q_t, log_q)).to(tl.float64)
                log_ratio += _q_t_log_ratio(q_t, log_q, log_p).to(tl.float64)
                q_t_head += tl.where(head, signed, 0.0).to(tl.float64)
                q_t_tail += tl.where(head, 0.0, signed).to(tl.float64)
            tl.store(out + 8 + t, tl.sum(p_ratio, axis=0).to(dtype))
            tl.store(out + 8 + softmaxes + t, tl.sum(log_ratio, axis=0).to(dtype))
            tl.store(out + 8 + 2 * softmaxes + t, tl.sum(q_t_head, axis=0).to(dtype))
            tl.store(out + 8 + 3 * softmaxes + t, tl.sum(q_t_tail, axis=0).to(dtype))


@triton.jit
def _slice_grads_kernel(p_ptr, log_p_ptr, q_ptr, log_q_ptr, q_steps_ptr, log_q_steps_ptr,
                        head_ptr, totals_ptr, scalars_ptr, loss_ptr, d_student_ptr, d_teacher_ptr,
                        rows, classes, softmaxes, sums_per_row, detach_weights,
                        GRAD_STUDENT: tl.constexpr, GRAD_TEACHER: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sums = totals_ptr + row * sums_per_row
    inv_tau = tl.load(scalars_ptr)
    row_scale = tl.load(scalars_ptr + 1)
    inv_steps = tl.load(scalars_ptr + 2)
    d_head = tl.load(sums)
    d_tail = tl.load(sums + 1)
    fkl = tl.load(sums + 2)
    rkl = tl.load(sums + 3)
    # SPEC 1.5-1.6 and 2 (hta_kl_math.h's make_row_stats): lam = 1/2 each where both distances
    # vanish; dl's coefficients formed as lam / Sg, zero when detached or vanished.
    total = d_head + d_tail
    vanished = total == 0
    safe_total = tl.where(vanished, 1.0, total)
    lam_h = tl.where(vanished, 0.5, d_head / safe_total)
    lam_t = tl.where(vanished, 0.5, d_tail / safe_total)
    tl.store(loss_ptr + row, row_scale * (lam_h * fkl + lam_t * rkl))
    still = (detach_weights == 0) & (total != 0)
    dl_head = tl.where(still, lam_t / safe_total, 0.0)
    dl_tail = tl.where(still, -lam_h / safe_total, 0.0)
    grad_scale = row_scale * inv_tau
    sum_q_dl = dl_head * tl.load(sums + 4) + dl_tail * tl.load(sums + 5)
    sum_p_dl = dl_head * tl.load(sums + 6) + dl_tail * tl.load(sums + 7)
    for start in range(0, classes, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < classes
        p, log_p, q, log_q, head = _load_block(p_ptr, log_p_ptr, q_ptr, log_q_ptr, head_ptr, row,
                                               classes, offs, mask)
        dl = _sign_of_difference(q, p) * tl.where(head, dl_head, dl_tail)
        if GRAD_TEACHER:
            tl.store(d_teacher_ptr + row * classes + offs,
                     _grad_teacher(lam_h, lam_t, fkl, rkl, grad_scale, p, log_p, q, log_q, dl,
                                   sum_p_dl), mask=mask)
        if GRAD_STUDENT:
            if softmaxes == 1:
                tl.store(d_student_ptr + row * classes + offs,
                         inv_steps * _grad_student_softmax(lam_h, lam_t, fkl, rkl, grad_scale, p,
                                                           log_p, q, log_q, dl, sum_q_dl),
                         mask=mask)
    if GRAD_STUDENT:
        if softmaxes > 1:  # prob_mean (hta_kl_math.h's time_step_g_sum, q_t_times_g)
            for t in range(0, softmaxes):
                step = t * rows
                g_sum = (-lam_h * tl.load(sums + 8 + t) + lam_t * tl.load(sums + 8 + softmaxes + t)
                         + (fkl - rkl) * (dl_head * tl.load(sums + 8 + 2 * softmaxes + t)
                                          + dl_tail * tl.load(sums + 8 + 3 * softmaxes + t)))
                for start in range(0, classes, BLOCK):
                    offs = start + tl.arange(0, BLOCK).to(tl.int64)
                    mask = offs < classes
                    p, log_p, q, log_q, head = _load_block(p_ptr, log_p_ptr, q_ptr, log_q_ptr,
                                                           head_ptr, row, classes, offs, mask)
                    q_t, log_q_t = _load_step_block(q_steps_ptr, log_q_steps_ptr, step + row,
                                                    classes, offs, mask)
                    dl = _sign_of_difference(q, p) * tl.where(head, dl_head, dl_tail)
                    q_t_g = (-lam_h * p * _ratio(log_q_t, log_q)
                             + lam_t * _q_t_log_ratio(q_t, log_q, log_p) + (fkl - rkl) * q_t * dl)
                    tl.store(d_student_ptr + (step + row) * classes + offs,
                             grad_scale * inv_steps * (q_t_g - q_t * g_sum), mask=mask)


def _on_device_of_first_tensor(phase):
    """A phase op run with its first tensor's GPU as the current device (`on_device_of`)."""

    @functools.wraps(phase)
    def guarded(tensor, *args, **kwargs):
        with on_device_of(tensor):
            return phase(tensor, *args, **kwargs)

    return staticmethod(guarded)


class TritonPhases:
    """The phase ops of the Triton backend (the module docstring's contract), each one launch of
    a kernel above."""

    @_on_device_of_first_tensor
    def slice_max(x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[:-1])
        if out.numel():
            _slice_max_kernel[(out.numel(),)](x, out, x.shape[-1], BLOCK=BLOCK)
        return out

    @_on_device_of_first_tensor
    def slice_exp_sums(x, row_max, inv_tau: float):
        shifted, exponentials = torch.empty_like(x), torch.empty_like(x)
        sums = x.new_empty(x.shape[:-1], dtype=torch.float64)
        if sums.numel():
            scale = torch.tensor([inv_tau], dtype=x.dtype, device=x.device)
            _slice_exp_sums_kernel[(sums.numel(),)](x, row_max.contiguous(), scale, shifted,
                                                    exponentials, sums, x.shape[-1], BLOCK=BLOCK)
        return shifted, exponentials, sums

    @_on_device_of_first_tensor
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

    @_on_device_of_first_tensor
    def slice_head(p, boundary, tied_in_head):
        head = torch.empty(p.shape, dtype=torch.int8, device=p.device)
        if p.shape[0]:
            _slice_head_kernel[(p.shape[0],)](p, boundary.contiguous(), tied_in_head.contiguous(),
                                              head, p.shape[1], KEY_INT=_key_int(p.dtype),
                                              BLOCK=BLOCK)
        return head.view(torch.bool)

    @_on_device_of_first_tensor
    def slice_sums(p, log_p, q, log_q, q_steps, log_q_steps, head):
        softmaxes = q_steps.shape[0]
        sums = p.new_empty(p.shape[0], 8 + (4 * softmaxes if softmaxes > 1 else 0))
        if p.shape[0]:
            _slice_sums_kernel[(p.shape[0],)](
                p, log_p, q, log_q, q_steps, log_q_steps, head.view(torch.int8), sums, p.shape[0],
                p.shape[1], softmaxes, sums.shape[1], BLOCK=BLOCK)
        return sums

    @_on_device_of_first_tensor
    def slice_grads(p, log_p, q, log_q, q_steps, log_q_steps, head, totals, inv_tau: float,
                    row_scale: float, detach_weights: bool, steps: int, grad_student: bool,
                    grad_teacher: bool):
        rows, classes = p.shape
        loss_rows = p.new_empty(rows)
        d_student = torch.empty_like(q_steps) if grad_student else p.new_empty(0)
        d_teacher = torch.empty_like(p) if grad_teacher else p.new_empty(0)
        if rows:
            # in the accumulation dtype (a float argument would reach the kernel as float32)
            scalars = torch.tensor([inv_tau, row_scale, 1.0 / steps], dtype=p.dtype,
                                   device=p.device)
            _slice_grads_kernel[(rows,)](
                p, log_p, q, log_q, q_steps, log_q_steps, head.view(torch.int8),
                totals.contiguous(), scalars, loss_rows, d_student, d_teacher, rows, classes,
                q_steps.shape[0], totals.shape[1], int(detach_weights), GRAD_STUDENT=grad_student,
                GRAD_TEACHER=grad_teacher, BLOCK=BLOCK)
        return loss_rows, d_student, d_teacher
