"""Triton HTA-KL: the fused forward + gradient op `htakl::hta_kl_fused_triton`.

Contract: `htakl_kernels/hta_kl.py` (docstring); math: docs/SPEC.md ("SPEC 1.3" = section 1,
step 3). One program per row, one launch per call. The per-element formulas mirror
`csrc/hta_kl_math.h` function for function (same names), so the CPU, CUDA and Triton kernels share
one decomposition: softmax normalisers, a sort-free head boundary, one statistics pass gathering
every per-row sum, then one gradient pass.

Two layouts of the same passes, chosen per call by the row length:
  * on chip (C <= `on_chip_limit`, default ON_CHIP_LIMIT): the scaled teacher logits and the
    student's (mean) logits, or its log q for prob_mean, stay in registers: the teacher and a 2-D or
    logit_mean student are read once; a prob_mean student is read in pass 1 (normalisers and log q),
    in the statistics pass (per-step sums) and in the gradient pass. The head boundary is a
    1-bit-per-step bisection over the probability bits held on chip.
  * chunked (longer rows): every pass streams the row in chunks of `chunk` classes and keeps only
    per-row scalars and per-time-step vectors between passes, so the extra memory is O(rows); the
    head boundary is a radix select, RADIX_BITS bits of the probability per pass over the teacher
    (8 passes for float32 math, 16 for float64).

The gradients are computed in the forward launch (the op's contract): the backward only scales
them by the incoming per-row gradient, so there is no second read of the inputs in the backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._library import HTA_KL_SCHEMA, accumulation_dtype
from .._ops.hta_kl import register_hta_kl_op

# Rows up to this many classes are held on chip (a power of two). A parameter of `launch_hta_kl`
# so tests can force the chunked path with small rows. Sized by ptxas' register report for sm_90
# (compiled without a GPU): the on-chip layout keeps about eight per-class vectors live (the
# compiler reuses p, q, log p, log q, the head mask across passes), so 8 classes per thread fit in
# 128 registers without spilling (4096 classes, 16 warps), while 8192 classes spill even at 32
# warps (64 registers, 528 bytes of spill per thread).
ON_CHIP_LIMIT = 4096
# Class counts (ties, cumulative sums) are int32.
MAX_CLASSES = 2**31 - 1
# Classes per chunk of the chunked path (16 warps: 112 registers, no spill), and per sub-block of
# its radix-select passes (the radix pass broadcasts each sub-block against 2**RADIX_BITS
# candidate digits).
CHUNK = 4096
RADIX_BLOCK = 512
RADIX_BITS = 4

NEG_INF = tl.constexpr(float("-inf"))


# ---------------------------------------------------------------------------------------------
# Per-element math, mirroring csrc/hta_kl_math.h.


@triton.jit
def _fkl_term(p, log_p, log_q):
    """SPEC 1.6: p (log p - log q) with 0 log 0 = 0."""
    return tl.where(p > 0, p * (log_p - log_q), 0.0)


@triton.jit
def _rkl_term(q, log_q, log_p):
    """SPEC 1.6: q (log q - log p) with 0 log 0 = 0."""
    return tl.where(q > 0, q * (log_q - log_p), 0.0)


@triton.jit
def _sign_of_difference(q, p):
    """SPEC 2: s = sign(q - p), sign(0) = 0."""
    return (q > p).to(q.dtype) - (q < p).to(q.dtype)


@triton.jit
def _grad_student_softmax(lam_h, lam_t, fkl, rkl, grad_scale, p, log_p, q, log_q, dl, sum_q_dl):
    """SPEC 2, student, one softmax (2-D input, or logit_mean before the 1/T)."""
    rkl_part = tl.where(q > 0, q * (log_q - log_p - rkl), 0.0)
    return grad_scale * (lam_h * (q - p) + lam_t * rkl_part + (fkl - rkl) * q * (dl - sum_q_dl))


@triton.jit
def _prob_ratio(q_t, log_q_t, log_q):
    """q_tk / q_k in [0, T], as exp(log q_tk - log q_k), zero where q_tk is."""
    return tl.where(q_t > 0, tl.exp(log_q_t - log_q), 0.0)


@triton.jit
def _q_t_log_ratio(q_t, log_q, log_p):
    """q_tk (log q_k - log p_k + 1) with 0 log 0 = 0."""
    return tl.where(q_t > 0, q_t * (log_q - log_p + 1.0), 0.0)


@triton.jit
def _grad_teacher(lam_h, lam_t, fkl, rkl, grad_scale, p, log_p, q, log_q, dl, sum_p_dl):
    """SPEC 2, teacher."""
    fkl_part = tl.where(p > 0, p * (log_p - log_q - fkl), 0.0)
    return grad_scale * (lam_h * fkl_part + lam_t * (p - q) - (fkl - rkl) * p * (dl - sum_p_dl))


# ---------------------------------------------------------------------------------------------
# Loads and normalisers.


@triton.jit
def _scaled_logits(ptr, offs, mask, tau, ACC: tl.constexpr):
    """x / tau in the accumulation type; -inf outside the row (probability exactly 0 there)."""
    x = tl.load(ptr + offs, mask=mask, other=0.0).to(ACC) / tau
    return tl.where(mask, x, NEG_INF)


@triton.jit
def _mean_scaled_logits(student_row, slice_stride, steps, offs, mask, tau, ACC: tl.constexpr):
    """SPEC 1.2 (logit_mean, and the plain softmax for T = 1): mean_t(z_t) / tau."""
    total = tl.load(student_row + offs, mask=mask, other=0.0).to(ACC)
    for t in range(1, steps):
        total += tl.load(student_row + t * slice_stride + offs, mask=mask, other=0.0).to(ACC)
    return tl.where(mask, total / steps / tau, NEG_INF)


@triton.jit
def _lse_combine(running_max, running_sum, x):
    """Online logsumexp over a row: merge the chunk x into (max, sum of exp(. - max)).

    An all -inf prefix keeps (−inf, 0) instead of producing NaN, so the result is
    max + log(sum): -inf for an all -inf row (whose softmax is NaN, like the reference's).
    """
    new_max = tl.maximum(running_max, tl.max(x, 0))
    shift = tl.where(new_max == NEG_INF, 0.0, new_max)
    new_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), 0)
    return new_max, new_sum


@triton.jit
def _lse_accumulate(running_max, running_sum, x):
    """Elementwise online logsumexp (over time steps, per class)."""
    new_max = tl.maximum(running_max, x)
    shift = tl.where(new_max == NEG_INF, 0.0, new_max)
    new_sum = running_sum * tl.exp(running_max - shift) + tl.exp(x - shift)
    return new_max, new_sum


@triton.jit
def _pick(values, step_ids, t):
    """values[t] of a small per-time-step vector."""
    return tl.sum(tl.where(step_ids == t, values, 0.0), 0)


@triton.jit
def _prob_mean_log_q(student_row, slice_stride, steps, offs, mask, tau, lse_steps, step_ids,
                     log_steps, ACC: tl.constexpr):
    """SPEC 1.2 (prob_mean): log q = logsumexp_t(log_softmax(z_t / tau)) - log T."""
    run_max = tl.full(offs.shape, NEG_INF, ACC)
    run_sum = tl.zeros(offs.shape, ACC)
    for t in range(steps):
        x = _scaled_logits(student_row + t * slice_stride, offs, mask, tau, ACC)
        run_max, run_sum = _lse_accumulate(run_max, run_sum, x - _pick(lse_steps, step_ids, t))
    return run_max + tl.log(run_sum) - log_steps


@triton.jit
def _head_mask(bits, mask, boundary_bits, tied_head, tied_seen, all_head):
    """SPEC 1.3 without a sort: {p > w} plus the first `tied_head` classes tied at w (ascending
    class index, `tied_seen` of them in earlier chunks); every class if the row's mass < delta.
    Returns the chunk's mask and the updated count of tied classes seen."""
    tied = (bits == boundary_bits) & mask
    tied_int = tied.to(tl.int32)
    rank = tl.cumsum(tied_int, 0) - tied_int + tied_seen
    head = ((bits > boundary_bits) | (tied & (rank < tied_head))) & mask
    head = tl.where(all_head, mask, head)
    return head, tied_seen + tl.sum(tied_int, 0)


@triton.jit
def _tied_head_count(mass_above, boundary, tied_count, delta):
    """r = #{k in 1..n : mass_above + k w < delta} (csrc/hta_kl_math.h, tied_head_count): the
    cumulative sums grow with k, so take the closed form and correct it by one either way."""
    estimate = tl.ceil((delta - mass_above) / boundary) - 1.0
    estimate = tl.minimum(tl.maximum(estimate, 0.0), tied_count.to(boundary.dtype))
    estimate = tl.where(estimate == estimate, estimate, 0.0)  # NaN rows: anything in range
    r = estimate.to(tl.int32)
    r = tl.where((r < tied_count) & (mass_above + (r + 1).to(boundary.dtype) * boundary < delta),
                 r + 1, r)
    r = tl.where((r > 0) & ~(mass_above + r.to(boundary.dtype) * boundary < delta), r - 1, r)
    return r


@triton.jit
def _chunk_distributions(row_mask, log_p_tile, log_q_tile, teacher_row, student_row, slice_stride,
                         steps, classes, offs, tau, lse_p, lse_q, lse_steps, step_ids, log_steps,
                         boundary_bits, tied_head, tied_seen, all_head, ON_CHIP: tl.constexpr,
                         PROB_MEAN: tl.constexpr, ACC: tl.constexpr, BITS: tl.constexpr):
    """One chunk of the row as passes 3 and 4 see it (SPEC 1.1-1.3): its mask, log p, log q, p, q
    and head mask, and the updated count of tied classes seen (`_head_mask`).

    On chip the row is one chunk and its log-probabilities are the tiles, nothing is reloaded;
    chunked, the chunk is reloaded and normalised with pass 1's normalisers (then `row_mask`,
    `log_p_tile` and `log_q_tile` are None: that layout has no tiles).
    """
    if ON_CHIP:
        mask = row_mask
        log_p = log_p_tile
        log_q = log_q_tile
    else:
        mask = offs < classes
        log_p = _scaled_logits(teacher_row, offs, mask, tau, ACC) - lse_p
        if PROB_MEAN:
            log_q = _prob_mean_log_q(student_row, slice_stride, steps, offs, mask, tau, lse_steps,
                                     step_ids, log_steps, ACC)
        else:
            log_q = _mean_scaled_logits(student_row, slice_stride, steps, offs, mask, tau,
                                        ACC) - lse_q
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    head, tied_seen = _head_mask(p.to(BITS, bitcast=True), mask, boundary_bits, tied_head,
                                 tied_seen, all_head)
    return mask, log_p, log_q, p, q, head, tied_seen


# ---------------------------------------------------------------------------------------------
# The kernel.


@triton.jit
def _hta_kl_kernel(
    student_ptr, teacher_ptr, loss_ptr, d_student_ptr, d_teacher_ptr,
    # float64 arguments (a plain Python float would be passed as float32): exact for float64 math.
    temperature: tl.float64, head_mass: tl.float64, row_scale_in: tl.float64,
    steps, classes, slice_stride,
    PROB_MEAN: tl.constexpr, STEPS_PAD: tl.constexpr, ON_CHIP: tl.constexpr,
    BLOCK: tl.constexpr, RADIX_BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr,
    DETACH: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    ACC: tl.constexpr, BITS: tl.constexpr, TOP_BIT: tl.constexpr,
):
    # 64-bit offsets: the row index is widened before it multiplies the row length.
    row = tl.program_id(0).to(tl.int64)
    teacher_row = teacher_ptr + row * classes
    student_row = student_ptr + row * classes
    tau = (tl.zeros([], tl.float64) + temperature).to(ACC)
    delta = (tl.zeros([], tl.float64) + head_mass).to(ACC)
    inv_tau = 1.0 / tau
    # The row's weight in the reduction that follows (csrc HtaKlOptions::row_scale): the loss row
    # and every gradient carry it, the gradients through grad_scale = row_scale / tau.
    row_scale = (tl.zeros([], tl.float64) + row_scale_in).to(ACC)
    grad_scale = row_scale * inv_tau
    steps_acc = tl.zeros([], ACC) + steps
    inv_steps = 1.0 / steps_acc
    log_steps = tl.log(steps_acc)
    # Widened here, so that t * slice_stride cannot overflow for T * R * C >= 2**31.
    slice_stride = tl.zeros([], tl.int64) + slice_stride
    lanes = tl.arange(0, BLOCK)
    step_ids = tl.arange(0, STEPS_PAD)
    zero = tl.zeros([], ACC)

    # ---- Pass 1, SPEC 1.1-1.2: softmax normalisers (online logsumexp over chunks). ----------
    p_max, p_sum = zero + NEG_INF, zero
    q_max, q_sum = zero + NEG_INF, zero
    steps_max = tl.zeros([STEPS_PAD], ACC) + NEG_INF
    steps_sum = tl.zeros([STEPS_PAD], ACC)
    if ON_CHIP:
        row_mask = lanes < classes
        teacher_tile = _scaled_logits(teacher_row, lanes, row_mask, tau, ACC)
        p_max, p_sum = _lse_combine(p_max, p_sum, teacher_tile)
        if PROB_MEAN:
            # Each step's slice is read once here and its log-probabilities folded into log q.
            run_max = tl.zeros([BLOCK], ACC) + NEG_INF
            run_sum = tl.zeros([BLOCK], ACC)
            for t in range(steps):
                x = _scaled_logits(student_row + t * slice_stride, lanes, row_mask, tau, ACC)
                t_max, t_sum = _lse_combine(zero + NEG_INF, zero, x)
                steps_max = tl.where(step_ids == t, t_max, steps_max)
                steps_sum = tl.where(step_ids == t, t_sum, steps_sum)
                run_max, run_sum = _lse_accumulate(run_max, run_sum, x - (t_max + tl.log(t_sum)))
            log_q_tile = run_max + tl.log(run_sum) - log_steps
        else:
            student_tile = _mean_scaled_logits(student_row, slice_stride, steps, lanes, row_mask,
                                               tau, ACC)
            q_max, q_sum = _lse_combine(q_max, q_sum, student_tile)
    else:
        for start in range(0, classes, BLOCK):
            offs = start + lanes
            mask = offs < classes
            p_max, p_sum = _lse_combine(
                p_max, p_sum, _scaled_logits(teacher_row, offs, mask, tau, ACC))
            if PROB_MEAN:
                for t in range(steps):
                    x = _scaled_logits(student_row + t * slice_stride, offs, mask, tau, ACC)
                    t_max, t_sum = _lse_combine(_pick(steps_max, step_ids, t),
                                                _pick(steps_sum, step_ids, t), x)
                    steps_max = tl.where(step_ids == t, t_max, steps_max)
                    steps_sum = tl.where(step_ids == t, t_sum, steps_sum)
            else:
                q_max, q_sum = _lse_combine(
                    q_max, q_sum,
                    _mean_scaled_logits(student_row, slice_stride, steps, offs, mask, tau, ACC))
    lse_p = p_max + tl.log(p_sum)
    lse_q = q_max + tl.log(q_sum)
    lse_steps = steps_max + tl.log(steps_sum)
    if ON_CHIP:
        # The row's log-probabilities stay on chip for passes 2-4.
        log_p_tile = teacher_tile - lse_p
        if not PROB_MEAN:
            log_q_tile = student_tile - lse_q
    else:
        # No tiles: passes 3 and 4 reload each chunk (_chunk_distributions).
        row_mask = None
        log_p_tile = None
        log_q_tile = None

    # ---- Pass 2, SPEC 1.3: the head boundary w by selection on the probability bits. ---------
    # Non-negative floats order like their bit patterns. w is the largest value whose mass at or
    # above it reaches delta; build its bits from the top, keeping a bit when the mass at or
    # above the candidate still reaches delta.
    boundary_bits = tl.zeros([], BITS)
    if ON_CHIP:
        p_tile = tl.exp(log_p_tile)
        bits_tile = p_tile.to(BITS, bitcast=True)
        bit = tl.full([], 1 << TOP_BIT, BITS)  # p <= 1: no higher bit is ever set
        for _ in range(TOP_BIT + 1):
            candidate = boundary_bits | bit
            mass = tl.sum(tl.where(bits_tile >= candidate, p_tile, 0.0), 0)
            boundary_bits = tl.where(mass >= delta, candidate, boundary_bits)
            bit = bit >> 1
    else:
        # Radix select: RADIX_BITS bits per pass over the row, all 2**RADIX_BITS candidate digits
        # tested at once. Digits are compared on (bits >> shift), which cannot overflow.
        NUM_BITS: tl.constexpr = BITS.primitive_bitwidth
        digits = tl.arange(0, 1 << RADIX_BITS).to(BITS)
        radix_lanes = tl.arange(0, RADIX_BLOCK)
        shift = tl.full([], NUM_BITS, BITS)
        for _ in range(NUM_BITS // RADIX_BITS):
            shift -= RADIX_BITS
            candidates = (boundary_bits >> shift) + digits
            masses = tl.zeros([1 << RADIX_BITS], ACC)
            for start in range(0, classes, RADIX_BLOCK):
                offs = start + radix_lanes
                mask = offs < classes
                p = tl.exp(_scaled_logits(teacher_row, offs, mask, tau, ACC) - lse_p)
                high = p.to(BITS, bitcast=True) >> shift
                masses += tl.sum(tl.where(high[:, None] >= candidates[None, :], p[:, None], 0.0),
                                 0)
            # The masses shrink as the digit grows: the count of digits > 0 that still reach
            # delta is the largest such digit.
            chosen = tl.sum(((masses >= delta) & (digits > 0)).to(BITS), 0)
            boundary_bits = boundary_bits + (chosen << shift)
    boundary = boundary_bits.to(ACC, bitcast=True)

    # Mass strictly above w, the count tied at w, and the total (all head when it is < delta).
    mass_above = zero
    tied_count = tl.zeros([], tl.int32)
    total_mass = zero
    for start in range(0, classes, BLOCK):
        if ON_CHIP:
            mask = row_mask
            p = p_tile
            bits = bits_tile
        else:
            offs = start + lanes
            mask = offs < classes
            p = tl.exp(_scaled_logits(teacher_row, offs, mask, tau, ACC) - lse_p)
            bits = p.to(BITS, bitcast=True)
        mass_above += tl.sum(tl.where(mask & (bits > boundary_bits), p, 0.0), 0)
        tied_count += tl.sum((mask & (bits == boundary_bits)).to(tl.int32), 0)
        total_mass += tl.sum(tl.where(mask, p, 0.0), 0)
    all_head = total_mass < delta
    tied_head = _tied_head_count(mass_above, boundary, tied_count, delta)

    # ---- Pass 3, SPEC 1.4-1.6 and 2: every per-row sum. ----------------------------------------
    d_head = zero
    d_tail = zero
    fkl = zero
    rkl = zero
    # Signed head / tail sums of q and p (SPEC 2's sum_j q_j dl_j and sum_j p_j dl_j).
    q_head, q_tail, p_head, p_tail = zero, zero, zero, zero
    # prob_mean, per time step: sum_j p_j r_tj, sum_j q_tj (log q_j - log p_j + 1), and the signed
    # head / tail sums of q_tj (csrc/hta_kl_math.h, time_step_g_sum).
    steps_p_ratio = tl.zeros([STEPS_PAD], ACC)
    steps_log_ratio = tl.zeros([STEPS_PAD], ACC)
    steps_head = tl.zeros([STEPS_PAD], ACC)
    steps_tail = tl.zeros([STEPS_PAD], ACC)
    tied_seen = tl.zeros([], tl.int32)
    for start in range(0, classes, BLOCK):
        offs = start + lanes
        mask, log_p, log_q, p, q, head, tied_seen = _chunk_distributions(
            row_mask, log_p_tile, log_q_tile, teacher_row, student_row, slice_stride, steps,
            classes, offs, tau, lse_p, lse_q, lse_steps, step_ids, log_steps, boundary_bits,
            tied_head, tied_seen, all_head, ON_CHIP, PROB_MEAN, ACC, BITS)
        tail = mask & ~head
        distance = tl.abs(p - q)
        d_head += tl.sum(tl.where(head, distance, 0.0), 0)
        d_tail += tl.sum(tl.where(tail, distance, 0.0), 0)
        fkl += tl.sum(tl.where(mask, _fkl_term(p, log_p, log_q), 0.0), 0)
        rkl += tl.sum(tl.where(mask, _rkl_term(q, log_q, log_p), 0.0), 0)
        sign = _sign_of_difference(q, p)
        if GRAD_T:
            p_head += tl.sum(tl.where(head, p * sign, 0.0), 0)
            p_tail += tl.sum(tl.where(tail, p * sign, 0.0), 0)
        if GRAD_S:
            if PROB_MEAN:
                for t in range(steps):
                    log_q_t = (_scaled_logits(student_row + t * slice_stride, offs, mask, tau, ACC)
                               - _pick(lse_steps, step_ids, t))
                    q_t = tl.exp(log_q_t)
                    at_t = step_ids == t
                    steps_p_ratio += tl.where(
                        at_t, tl.sum(tl.where(mask, p * _prob_ratio(q_t, log_q_t, log_q), 0.0), 0),
                        0.0)
                    steps_log_ratio += tl.where(
                        at_t, tl.sum(tl.where(mask, _q_t_log_ratio(q_t, log_q, log_p), 0.0), 0),
                        0.0)
                    steps_head += tl.where(at_t, tl.sum(tl.where(head, q_t * sign, 0.0), 0), 0.0)
                    steps_tail += tl.where(at_t, tl.sum(tl.where(tail, q_t * sign, 0.0), 0), 0.0)
            else:
                q_head += tl.sum(tl.where(head, q * sign, 0.0), 0)
                q_tail += tl.sum(tl.where(tail, q * sign, 0.0), 0)

    # SPEC 1.5-1.6: weights and loss; SPEC 2: the coefficients of dl_i (csrc make_row_stats).
    distance_sum = d_head + d_tail
    vanished = distance_sum == 0
    safe_sum = tl.where(vanished, 1.0, distance_sum)
    lam_h = tl.where(vanished, 0.5, d_head / safe_sum)
    lam_t = tl.where(vanished, 0.5, d_tail / safe_sum)
    tl.store(loss_ptr + row, row_scale * (lam_h * fkl + lam_t * rkl))
    if DETACH:
        dl_head = zero
        dl_tail = zero
    else:
        # d_tail / Sg^2 as lam_t / Sg (csrc/hta_kl_math.h, make_row_stats): Sg^2 underflows for
        # rows where student and teacher agree closely.
        dl_head = tl.where(vanished, 0.0, lam_t / safe_sum)
        dl_tail = tl.where(vanished, 0.0, -lam_h / safe_sum)

    # ---- Pass 4, SPEC 2: the gradients of the row's loss. -------------------------------------
    if GRAD_S or GRAD_T:
        fkl_minus_rkl = fkl - rkl
        tied_seen = tl.zeros([], tl.int32)
        for start in range(0, classes, BLOCK):
            offs = start + lanes
            mask, log_p, log_q, p, q, head, tied_seen = _chunk_distributions(
                row_mask, log_p_tile, log_q_tile, teacher_row, student_row, slice_stride, steps,
                classes, offs, tau, lse_p, lse_q, lse_steps, step_ids, log_steps, boundary_bits,
                tied_head, tied_seen, all_head, ON_CHIP, PROB_MEAN, ACC, BITS)
            # SPEC 2: dl_i = s_i (d_tail [i in H] - d_head [i not in H]) / Sg^2.
            dl = _sign_of_difference(q, p) * tl.where(head, dl_head, dl_tail)
            if GRAD_T:
                grad = _grad_teacher(lam_h, lam_t, fkl, rkl, grad_scale, p, log_p, q, log_q, dl,
                                     dl_head * p_head + dl_tail * p_tail)
                tl.store(d_teacher_ptr + row * classes + offs,
                         grad.to(d_teacher_ptr.dtype.element_ty), mask=mask)
            if GRAD_S:
                if PROB_MEAN:
                    for t in range(steps):
                        log_q_t = (_scaled_logits(student_row + t * slice_stride, offs, mask, tau,
                                                  ACC) - _pick(lse_steps, step_ids, t))
                        q_t = tl.exp(log_q_t)
                        # q_tk g_k and G_t = sum_j q_tj g_j (csrc q_t_times_g, time_step_g_sum).
                        q_t_g = (-lam_h * p * _prob_ratio(q_t, log_q_t, log_q)
                                 + lam_t * _q_t_log_ratio(q_t, log_q, log_p)
                                 + fkl_minus_rkl * q_t * dl)
                        g_sum = (-lam_h * _pick(steps_p_ratio, step_ids, t)
                                 + lam_t * _pick(steps_log_ratio, step_ids, t)
                                 + fkl_minus_rkl * (dl_head * _pick(steps_head, step_ids, t)
                                                    + dl_tail * _pick(steps_tail, step_ids, t)))
                        grad = grad_scale * inv_steps * (q_t_g - q_t * g_sum)
                        tl.store(d_student_ptr + t * slice_stride + row * classes + offs,
                                 grad.to(d_student_ptr.dtype.element_ty), mask=mask)
                else:
                    # logit_mean: the gradient of mean_t z_t, 1/T on every step (T = 1 for 2-D).
                    grad = inv_steps * _grad_student_softmax(
                        lam_h, lam_t, fkl, rkl, grad_scale, p, log_p, q, log_q, dl,
                        dl_head * q_head + dl_tail * q_tail)
                    grad = grad.to(d_student_ptr.dtype.element_ty)
                    for t in range(steps):
                        tl.store(d_student_ptr + t * slice_stride + row * classes + offs, grad,
                                 mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch and registration.


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if teacher.dim() != 2 or student.dim() != 3 or student.shape[1:] != teacher.shape:
        raise ValueError(
            f"hta_kl_fused_triton expects student [T, R, C] and teacher [R, C], got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    if student.dtype != teacher.dtype:
        raise TypeError(f"student and teacher must have the same dtype, got {student.dtype} and "
                        f"{teacher.dtype}")
    if student.device != teacher.device:
        raise ValueError(f"student and teacher must be on the same device, got {student.device} "
                         f"and {teacher.device}")
    if not (student.is_contiguous() and teacher.is_contiguous()):
        raise ValueError("hta_kl_fused_triton expects contiguous student and teacher")
    if teacher.shape[1] > MAX_CLASSES:
        raise ValueError(f"hta_kl_fused_triton: teacher has C = {teacher.shape[1]} classes; the "
                         f"kernel counts a row's classes in int32 and takes at most {MAX_CLASSES}")


def default_layout(wide: bool) -> tuple[int, int]:
    """(on_chip_limit, chunk) for float32 math, or float64 (`wide`), whose values take two
    registers: halved (ptxas then reports 120 bytes of spill per thread instead of 536 for an
    on-chip prob_mean row)."""
    return (ON_CHIP_LIMIT // 2, CHUNK // 2) if wide else (ON_CHIP_LIMIT, CHUNK)


def _num_warps(block: int, wide: bool) -> int:
    # 8 classes of each row vector per thread (4 in float64 math; see ON_CHIP_LIMIT), between 4
    # and 16 warps.
    return max(4, min(16, block // (128 if wide else 256)))


def launch_hta_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, delta: float,
                  logit_mean: bool, detach_weights: bool, grad_student: bool, grad_teacher: bool,
                  row_scale: float = 1.0, *, on_chip_limit: int | None = None,
                  chunk: int | None = None, radix_block: int | None = None):
    """Run the kernel; same arguments and results as the op, plus the layout knobs.

    `on_chip_limit`: the longest row (in classes) held on chip; longer rows take the chunked path
    in chunks of `chunk` classes (both powers of two; defaults: `default_layout`).
    """
    _check_inputs(student, teacher)
    if not (math.isfinite(row_scale) and row_scale > 0):
        raise ValueError(f"hta_kl_fused_triton: row_scale must be a finite number > 0, got {row_scale}")
    acc_dtype = accumulation_dtype(teacher.dtype)
    wide = acc_dtype == torch.float64
    default_on_chip_limit, default_chunk = default_layout(wide)
    on_chip_limit = default_on_chip_limit if on_chip_limit is None else on_chip_limit
    chunk = min(default_chunk, on_chip_limit) if chunk is None else chunk
    radix_block = min(RADIX_BLOCK, chunk) if radix_block is None else radix_block
    steps, rows, classes = student.shape
    loss_rows = torch.empty(rows, dtype=acc_dtype, device=teacher.device)
    d_student = torch.empty_like(student) if grad_student else student.new_empty(0)
    d_teacher = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    if rows == 0:
        return loss_rows, d_student, d_teacher
    on_chip = classes <= on_chip_limit
    block = triton.next_power_of_2(classes) if on_chip else chunk
    torch.library.wrap_triton(_hta_kl_kernel)[(rows,)](
        student, teacher, loss_rows, d_student, d_teacher, float(temperature), float(delta),
        float(row_scale), steps, classes, rows * classes,
        PROB_MEAN=steps > 1 and not logit_mean,
        STEPS_PAD=triton.next_power_of_2(steps),
        ON_CHIP=on_chip, BLOCK=block, RADIX_BLOCK=radix_block, RADIX_BITS=RADIX_BITS,
        DETACH=detach_weights, GRAD_S=grad_student, GRAD_T=grad_teacher,
        ACC=tl.float64 if wide else tl.float32,
        BITS=tl.int64 if wide else tl.int32,
        # Probabilities are <= 1.0 (0x3FF0... / 0x3F80...): the bit below the exponent's top.
        TOP_BIT=61 if wide else 29,
        num_warps=_num_warps(block, wide),
    )
    return loss_rows, d_student, d_teacher


@torch.library.triton_op("htakl::hta_kl_fused_triton", mutates_args=(), schema=HTA_KL_SCHEMA)
def hta_kl_fused_triton(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                        delta: float, logit_mean: bool, detach_weights: bool, grad_student: bool,
                        grad_teacher: bool,
                        row_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_hta_kl(student, teacher, temperature, delta, logit_mean, detach_weights,
                         grad_student, grad_teacher, row_scale)


register_hta_kl_op(hta_kl_fused_triton)
