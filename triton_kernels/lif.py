"""Triton multi-step LIF: `htakl::lif_forward_triton` and `htakl::lif_backward_triton`.

Contract: `htakl_kernels/_ops/lif.py` (docstring); math: docs/SPEC.md section 3. Each lane owns
16 bytes of neurons (block_of), each program a block of neurons looping over time. The per-element helpers mirror
`csrc/lif_math.h` function for function (same names, same roundings), so spikes agree bit for bit
with the CPU and CUDA kernels and the reference:
  * the state is ACC (float32, or float64 for float64 inputs); the scalar options arrive as
    float64 and are rounded to ACC once, as the C++ kernels do;
  * divisions by tau are IEEE divisions (Triton's plain float32 `/` is approximate);
  * the hard reset is the product form, whose products are exact, so FMA contraction is harmless.
The backward holds no buffer of x's size: it runs csrc/lif_math.h's schedule
(lif_backward_segments), H of up to SEGMENT steps in registers, V checkpointed at each segment's
start when T is longer than one segment and H recomputed from x, each H by the forward's own
helpers, so the gradients are those of a single sweep that kept every H.

A tensor is never passed to two pointer parameters of one launch, and unused pointers are None:
under torch.compile the kernel call is functionalized, which copies each mutated argument
separately, so two parameters aliasing one tensor would each write back their own copy.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._library import LIF_BACKWARD_SCHEMA, LIF_FORWARD_SCHEMA, accumulation_dtype
from .._ops.lif import register_lif_ops
from .common import on_device_of, tl_accumulation_dtype

# Each lane owns a run of neurons filling 16 bytes of storage (4 in float32, 8 in the 16-bit types,
# 2 in float64) and every program NUM_WARPS warps of lanes: when `neurons` is a multiple of 16
# (Triton specializes on it) and the tensors are 16-byte aligned, every step's row of a program
# starts aligned and each lane reads and writes its run with one 16-byte access.
NUM_WARPS = 4
VECTOR_BYTES = 16


def block_of(dtype: torch.dtype) -> int:
    """Neurons per program for tensors of `dtype`."""
    return VECTOR_BYTES // dtype.itemsize * 32 * NUM_WARPS

# The backward's surrogate, as the kernels' SURROGATE constexpr: csrc/lif_math.h's LifSurrogate
# values, and the op's `surrogate` names (htakl_kernels/_lif_args.py's SURROGATES) mapped to them.
SURROGATE_SIGMOID = tl.constexpr(0)
SURROGATE_ATAN = tl.constexpr(1)
SURROGATE_IDS = {"sigmoid": SURROGATE_SIGMOID.value, "atan": SURROGATE_ATAN.value}




# ---------------------------------------------------------------------------------------------
# Per-element math, mirroring csrc/lif_math.h.


@triton.jit
def _option(value, ACC: tl.constexpr):
    """A float64 scalar option rounded once to ACC. (Compiled, `value` is a float64 scalar; under
    the interpreter a Python float, which `.to` would not take and arithmetic would round to
    float32 first.)"""
    return tl.full((), value, ACC)


@triton.jit
def _div_rn(a, b):
    """a / b rounded to nearest, as the other backends divide. float32 `/` compiles to an
    approximate division, hence div_rn there (not fdiv's ieee_rounding, which Triton 3.6 accepts
    and ignores); float64 `/` is already exact, and div_rn would emit the float32 intrinsic."""
    if a.dtype == tl.float64:
        return a / b
    else:  # not a fall-through: Triton compiles code after a returning `if` for float64 too
        return tl.math.div_rn(a, b)


@triton.jit
def _lif_charge(v_prev, x, tau, v_reset, DECAY_INPUT: tl.constexpr):
    """SPEC 3: H[t] from V[t-1] and X[t]."""
    if DECAY_INPUT:
        return v_prev + _div_rn(x - (v_prev - v_reset), tau)
    return v_prev - _div_rn(v_prev - v_reset, tau) + x


@triton.jit
def _lif_fire(h, v_threshold):
    """SPEC 3: S[t] = (H[t] - v_threshold >= 0) as 0 or 1."""
    return (h - v_threshold >= 0).to(h.dtype)


@triton.jit
def _lif_reset(h, spike, v_threshold, v_reset, SOFT_RESET: tl.constexpr):
    """SPEC 3: V[t] after the soft or hard reset."""
    if SOFT_RESET:
        return h - v_threshold * spike
    return h * (1 - spike) + v_reset * spike


@triton.jit
def _lif_surrogate_grad(u, alpha, half_pi, SURROGATE: tl.constexpr):
    """SPEC 3: sg at u = H - v_threshold (half_pi comes in ACC: a literal would be float32)."""
    if SURROGATE == SURROGATE_ATAN:
        scaled = half_pi * alpha * u
        sg = _div_rn(alpha * 0.5, 1 + scaled * scaled)  # alpha / 2 is exact
    else:
        tl.static_assert(SURROGATE == SURROGATE_SIGMOID, "unknown SURROGATE")
        # alpha e / (1 + e)^2 with e = exp(-alpha |u|), as lif_math.h writes alpha sig (1 - sig):
        # in float32 1 - sig rounds to 0 once alpha u passes ~17, where this form keeps
        # alpha e^(-alpha u).
        e = tl.exp(-alpha * tl.abs(u))
        one_plus_e = 1 + e
        sg = _div_rn(alpha * e, one_plus_e * one_plus_e)
    return sg


@triton.jit
def _lif_step_grad(g_spike, g_v, h, tau, v_threshold, v_reset, alpha, half_pi,
                   SOFT_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
                   DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr):
    """SPEC 3's table: (gradient on X[t], gradient reaching V[t-1] through H[t])."""
    spike = _lif_fire(h, v_threshold)
    sg = _lif_surrogate_grad(h - v_threshold, alpha, half_pi, SURROGATE)
    if SOFT_RESET:
        if DETACH_RESET:
            g_h = g_spike * sg + g_v
        else:
            g_h = (g_spike - v_threshold * g_v) * sg + g_v
    else:
        if DETACH_RESET:
            g_h = g_spike * sg + g_v * (1 - spike)
        else:
            g_h = (g_spike + g_v * (v_reset - h)) * sg + g_v * (1 - spike)
    g_x = g_h
    if DECAY_INPUT:
        g_x = _div_rn(g_h, tau)
    one = tl.full((), 1, tau.dtype)
    return g_x, g_h * (one - _div_rn(one, tau))


@triton.jit
def _row(ptr, t, neurons):
    """Step t's row of a program's block (`ptr` already at the block's first neuron): a 64-bit
    scalar offset, so the lanes add only their 32-bit position in the block."""
    return ptr + tl.cast(t, tl.int64) * neurons


@triton.jit
def _lif_step(x_row, lanes, mask, v, tau, v_threshold, v_reset, ACC: tl.constexpr,
              SOFT_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr):
    """SPEC 3's forward step: loads X[t] from its row and returns H[t], S[t] and V[t] from
    V[t-1] = v (the forward and the backward's recompute sweep differ only in what they store)."""
    x = tl.load(x_row + lanes, mask=mask, other=0).to(ACC)
    h = _lif_charge(v, x, tau, v_reset, DECAY_INPUT)
    spike = _lif_fire(h, v_threshold)
    return h, spike, _lif_reset(h, spike, v_threshold, v_reset, SOFT_RESET)


# ---------------------------------------------------------------------------------------------
# Kernels.


# steps is not specialized on (== 1, divisibility by 16), neurons is: its divisibility by 16 makes
# every row of a block 16-byte aligned (block_of), so one compiled kernel per option set serves
# every T, and two (aligned or not) every neuron count.
@triton.jit(do_not_specialize=["steps"])
def _lif_forward_kernel(
    x_ptr, v_init_ptr, spikes_ptr, v_last_ptr, v_seq_ptr,
    tau_in: tl.float64, v_threshold_in: tl.float64, v_reset_in: tl.float64,
    steps, neurons,
    ACC: tl.constexpr, SOFT_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
    STORE_V_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    lanes = tl.arange(0, BLOCK)
    mask = lanes < tl.minimum(neurons - start, BLOCK).to(tl.int32)
    tau = _option(tau_in, ACC)
    v_threshold = _option(v_threshold_in, ACC)
    v_reset = _option(v_reset_in, ACC)
    v = tl.load(v_init_ptr + start + lanes, mask=mask, other=0).to(ACC)
    for t in range(steps):
        h, spike, v = _lif_step(_row(x_ptr + start, t, neurons), lanes, mask, v, tau,
                                v_threshold, v_reset, ACC, SOFT_RESET, DECAY_INPUT)
        tl.store(_row(spikes_ptr + start, t, neurons) + lanes,
                 spike.to(spikes_ptr.dtype.element_ty), mask=mask)
        if STORE_V_SEQ:
            tl.store(_row(v_seq_ptr + start, t, neurons) + lanes,
                     v.to(v_seq_ptr.dtype.element_ty), mask=mask)
    tl.store(v_last_ptr + start + lanes, v.to(v_last_ptr.dtype.element_ty), mask=mask)


# The backward's segment: H of SEGMENT steps held in registers, as csrc/lif_math.h's
# lif_backward_segments holds it (the same schedule: sweep 1 checkpoints V at each segment's start
# but the first and the last, sweep 2 recomputes each segment's H and walks it down). The launcher
# takes the smallest of these that covers T. The compiler issues a segment's loads together (the
# bytes in flight that hide memory latency) and keeps them all live: at 16 bytes per lane, 4 steps
# take 118 registers in float32 and about 220 in the 16-bit types (sm_90), 8 steps 251 and a spill
# in the 16-bit types. bench/census rates 4 steps as fast as or faster than 8 at every T: more
# blocks per SM outweigh reading x again for all but the last segment.
SEGMENTS = (4,)


def backward_segment(steps: int) -> int:
    """The SEGMENT lif_backward_triton runs for T = steps."""
    return next((s for s in SEGMENTS if steps <= s), SEGMENTS[-1])


def checkpoint_rows(steps: int, segment: int) -> int:
    """Rows of the checkpoint buffer (V of each segment but the first and the last)."""
    return max(triton.cdiv(steps, segment) - 2, 0)


@triton.jit(do_not_specialize=["steps"])
def _lif_backward_kernel(
    grad_spikes_ptr, grad_v_last_ptr, grad_v_seq_ptr, x_ptr, v_init_ptr,
    grad_x_ptr, grad_v_init_ptr, checkpoint_ptr,
    tau_in: tl.float64, v_threshold_in: tl.float64, v_reset_in: tl.float64,
    alpha_in: tl.float64, half_pi_in: tl.float64,
    steps, neurons,
    ACC: tl.constexpr, SOFT_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
    DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr, HAS_GRAD_SPIKES: tl.constexpr,
    HAS_GRAD_V_LAST: tl.constexpr, HAS_GRAD_V_SEQ: tl.constexpr, SEGMENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    lanes = tl.arange(0, BLOCK)
    mask = lanes < tl.minimum(neurons - start, BLOCK).to(tl.int32)
    x_block = x_ptr + start
    tau = _option(tau_in, ACC)
    v_threshold = _option(v_threshold_in, ACC)
    v_reset = _option(v_reset_in, ACC)
    alpha = _option(alpha_in, ACC)
    half_pi = _option(half_pi_in, ACC)
    segments = (steps + SEGMENT - 1) // SEGMENT
    # Sweep 1: SPEC 3's forward over the segments before the last, V checkpointed at the start of
    # each but the first.
    v = tl.load(v_init_ptr + start + lanes, mask=mask, other=0).to(ACC)
    for c in range(segments - 1):
        if c > 0:
            tl.store(_row(checkpoint_ptr + start, c - 1, neurons) + lanes, v, mask=mask)
        for k in tl.static_range(SEGMENT):
            _, _, v = _lif_step(_row(x_block, c * SEGMENT + k, neurons), lanes, mask, v, tau,
                                v_threshold, v_reset, ACC, SOFT_RESET, DECAY_INPUT)
    # Sweep 2: from the last segment to the first, H of the segment (the last continues from
    # sweep 1's V, the others restart from their checkpoint, the first from v_init), then SPEC 3's
    # table from its last step down to its first; g_v_next is the gradient reaching V[t]. The
    # segment's upstream gradients are loaded with its x, in the storage dtype, so that all of a
    # segment's loads are in flight together rather than one step's per round trip (census,
    # bfloat16: 39-41 % of copy before, 44-47 % after).
    g_v_next = tl.zeros((BLOCK,), dtype=ACC)
    if HAS_GRAD_V_LAST:
        g_v_next = tl.load(grad_v_last_ptr + start + lanes, mask=mask, other=0).to(ACC)
    for i in range(segments):
        c = segments - 1 - i
        if c + 1 < segments:
            if c == 0:
                v = tl.load(v_init_ptr + start + lanes, mask=mask, other=0).to(ACC)
            else:
                v = tl.load(_row(checkpoint_ptr + start, c - 1, neurons) + lanes, mask=mask,
                            other=0)
        hs = ()
        g_seqs = ()
        g_spikes = ()
        for k in tl.static_range(SEGMENT):  # steps past T compute on zeros and are not used
            t = c * SEGMENT + k
            # (t < steps as a block-wide mask: the interpreter takes no scalar in a mask)
            step_mask = mask & (tl.zeros((BLOCK,), tl.int32) + t < steps)
            if HAS_GRAD_V_SEQ:
                g_seqs = g_seqs + (tl.load(_row(grad_v_seq_ptr + start, t, neurons) + lanes,
                                           mask=step_mask, other=0),)
            if HAS_GRAD_SPIKES:
                g_spikes = g_spikes + (tl.load(_row(grad_spikes_ptr + start, t, neurons) + lanes,
                                               mask=step_mask, other=0),)
            h, _, v = _lif_step(_row(x_block, t, neurons), lanes, step_mask, v, tau, v_threshold,
                                v_reset, ACC, SOFT_RESET, DECAY_INPUT)
            hs = hs + (h,)
        for j in tl.static_range(SEGMENT):
            t = c * SEGMENT + SEGMENT - 1 - j
            in_steps = tl.zeros((BLOCK,), tl.int32) + t < steps
            step_mask = mask & in_steps
            g_v = g_v_next
            if HAS_GRAD_V_SEQ:
                g_v += g_seqs[SEGMENT - 1 - j].to(ACC)
            g_spike = tl.zeros((BLOCK,), dtype=ACC)
            if HAS_GRAD_SPIKES:
                g_spike = g_spikes[SEGMENT - 1 - j].to(ACC)
            g_x, g_v_prev = _lif_step_grad(g_spike, g_v, hs[SEGMENT - 1 - j], tau, v_threshold,
                                           v_reset, alpha, half_pi, SOFT_RESET, DECAY_INPUT,
                                           DETACH_RESET, SURROGATE)
            tl.store(_row(grad_x_ptr + start, t, neurons) + lanes,
                     g_x.to(grad_x_ptr.dtype.element_ty), mask=step_mask)
            g_v_next = tl.where(in_steps, g_v_prev, g_v_next)
    tl.store(grad_v_init_ptr + start + lanes, g_v_next.to(grad_v_init_ptr.dtype.element_ty),
             mask=mask)


# ---------------------------------------------------------------------------------------------
# Ops.


def _check_layout(x: torch.Tensor, v_init: torch.Tensor) -> None:
    if x.dim() < 1 or v_init.shape != x.shape[1:]:
        raise ValueError(f"lif: x must be [T, ...] and v_init x.shape[1:], got {tuple(x.shape)} "
                         f"and {tuple(v_init.shape)}")
    if v_init.dtype != x.dtype or v_init.device != x.device:
        raise ValueError("lif: v_init must have x's dtype and device")


def _check_options(tau: float, surrogate: str, alpha: float) -> None:
    if not (math.isfinite(tau) and tau > 1):
        raise ValueError(f"lif: tau must be a finite number > 1, got {tau}")
    if surrogate not in SURROGATE_IDS:
        raise ValueError(f"lif: surrogate must be one of {', '.join(map(repr, SURROGATE_IDS))}, "
                         f"got {surrogate!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lif: alpha must be a finite number > 0, got {alpha}")


@torch.library.triton_op("htakl::lif_forward_triton", mutates_args=(), schema=LIF_FORWARD_SCHEMA)
def lif_forward_triton(x: torch.Tensor, v_init: torch.Tensor, tau: float, v_threshold: float,
                       v_reset: float, soft_reset: bool, decay_input: bool, detach_reset: bool,
                       surrogate: str, alpha: float,
                       return_v_seq: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_layout(x, v_init)
    _check_options(tau, surrogate, alpha)
    x, v_init = x.contiguous(), v_init.contiguous()
    spikes = torch.empty_like(x)
    v_last = torch.empty_like(v_init)
    v_seq = torch.empty_like(x) if return_v_seq else x.new_empty(0)
    neurons = v_init.numel()
    if neurons > 0:
        block = block_of(x.dtype)
        with on_device_of(x):
            torch.library.wrap_triton(_lif_forward_kernel)[(triton.cdiv(neurons, block),)](
                x, v_init, spikes, v_last, v_seq if return_v_seq else None,
                tau, v_threshold, 0.0 if soft_reset else v_reset, x.shape[0], neurons,
                ACC=tl_accumulation_dtype(x.dtype), SOFT_RESET=soft_reset, DECAY_INPUT=decay_input,
                STORE_V_SEQ=return_v_seq, BLOCK=block, num_warps=NUM_WARPS,
            )
    return spikes, v_last, v_seq


@torch.library.triton_op("htakl::lif_backward_triton", mutates_args=(), schema=LIF_BACKWARD_SCHEMA)
def lif_backward_triton(grad_spikes: torch.Tensor, grad_v_last: torch.Tensor,
                        grad_v_seq: torch.Tensor, x: torch.Tensor, v_init: torch.Tensor, tau: float,
                        v_threshold: float, v_reset: float, soft_reset: bool, decay_input: bool,
                        detach_reset: bool, surrogate: str,
                        alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_layout(x, v_init)
    _check_options(tau, surrogate, alpha)
    for name, grad, like in (("grad_spikes", grad_spikes, x), ("grad_v_last", grad_v_last, v_init),
                             ("grad_v_seq", grad_v_seq, x)):
        if grad.numel() != 0 and (grad.shape != like.shape or grad.dtype != like.dtype):
            raise ValueError(f"lif_backward: {name} must be empty or match {tuple(like.shape)}, "
                             f"{like.dtype}; got {tuple(grad.shape)}, {grad.dtype}")
    x, v_init = x.contiguous(), v_init.contiguous()
    grad_x = torch.empty_like(x)
    grad_v_init = torch.empty_like(v_init)
    steps, neurons = x.shape[0], v_init.numel()
    segment = backward_segment(steps)
    # V at the start of each recomputed segment: a few rows of the state type (maybe none)
    checkpoints = torch.empty((checkpoint_rows(steps, segment), neurons),
                              dtype=accumulation_dtype(x.dtype), device=x.device)
    grad_spikes, grad_v_last, grad_v_seq = (
        g.contiguous() if g.numel() != 0 else None for g in (grad_spikes, grad_v_last, grad_v_seq)
    )
    if neurons > 0:
        block = block_of(x.dtype)
        with on_device_of(x):
            torch.library.wrap_triton(_lif_backward_kernel)[(triton.cdiv(neurons, block),)](
                grad_spikes, grad_v_last, grad_v_seq, x, v_init, grad_x, grad_v_init, checkpoints,
                tau, v_threshold, 0.0 if soft_reset else v_reset, alpha, math.pi / 2,
                steps, neurons,
                ACC=tl_accumulation_dtype(x.dtype), SOFT_RESET=soft_reset, DECAY_INPUT=decay_input,
                DETACH_RESET=detach_reset, SURROGATE=SURROGATE_IDS[surrogate],
                HAS_GRAD_SPIKES=grad_spikes is not None, HAS_GRAD_V_LAST=grad_v_last is not None,
                HAS_GRAD_V_SEQ=grad_v_seq is not None, SEGMENT=segment, BLOCK=block,
                num_warps=NUM_WARPS,
            )
    return grad_x, grad_v_init


register_lif_ops(lif_forward_triton, lif_backward_triton)
