"""Triton HTA-KL: the fused forward + gradient op `htakl::hta_kl_fused_triton`.

Contract: `htakl_kernels/_ops/hta_kl.py` (docstring); math: docs/SPEC.md ("SPEC 1.3" = section 1,
step 3). One program per row and one launch per call, except where there are fewer long rows
than multiprocessors: the split kernel then spreads each row over several programs in six
launches (`_hta_kl_split_kernel`, `default_segments`). The per-element formulas mirror
`csrc/hta_kl_math.h` function for function (same names), so the CPU, CUDA and Triton kernels share
one decomposition: softmax normalisers, a sort-free head boundary, one statistics pass gathering
every per-row sum, then one gradient pass.

Arithmetic. Logits are scaled once by log2(e) / tau, so every softmax is an exp2 and every
normaliser a base-2 log-sum-exp: log2 p = a log2(e) / tau - lse2, formed by one fused multiply-add
wherever it is needed, so each pass computes bit-identical probabilities and the head membership
found by the selection is exactly the one the later passes see. Natural logs are log2 values
times ln 2; no log is taken per class except one of the step mean for prob_mean
(`_log2_step_mean`).

Two layouts of the same passes, chosen per call by the row length:
  * on chip (C <= `on_chip_limit`, default ON_CHIP_LIMIT): the teacher's log2 p and the student's
    (mean) log2 q stay in registers: the teacher and a 2-D or logit_mean student are read once;
    a prob_mean student is read in pass 1 (normalisers and log q), in the statistics pass (per-step
    sums) and in the gradient pass. The head boundary is a bisection over the probability keys
    held on chip.
  * chunked (longer rows): every pass streams the row in chunks of `chunk` classes and keeps only
    per-row scalars and per-time-step vectors between passes. The head boundary: one histogram
    pass over the teacher narrows the boundary to one octave of probabilities (repeated on the
    boundary bucket while it holds more than a chunk of classes), one pass copies that bucket's
    keys into a per-row workspace of one chunk, and the bisection runs on them there.

Head selection (SPEC 1.3). The keys are the bit patterns of p (non-negative floats order like
their bits); masses are p in fixed point (2^-30 units for float32 math in int32, 2^-62 for float64
in int64), so every mass sum is exact and independent of its order, and a bucket's mass is exactly
the sum of its sub-buckets': every round of the selection agrees with every other.

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
from .common import on_device_of

# Rows up to this many classes are held on chip (a power of two). A parameter of `launch_hta_kl`
# so tests can force the chunked path with small rows. Sized by ptxas' register report for sm_90
# (hta_kl_aot.py, compiled without a GPU).
ON_CHIP_LIMIT = 4096
# Class counts (ties, cumulative sums) are int32.
MAX_CLASSES = 2**31 - 1
# Classes per chunk of the chunked path, which is also the capacity of its per-row workspace of
# boundary candidates; and per sub-block of its histogram passes, which broadcast each sub-block
# against 2**RADIX_BITS thresholds (the first pass: octaves of p; later ones: RADIX_BITS bits of
# the key each).
CHUNK = 4096
RADIX_BLOCK = 512
RADIX_BITS = 4
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

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
def _prob_ratio(log2_q_t, log2_q):
    """q_tk / q_k in [0, T], as exp2(log2 q_tk - log2 q_k), zero where q_tk is. Zero means a
    log of -inf, not a q_tk that underflowed: the ratio of two tiny probabilities is not small."""
    return tl.where(log2_q_t > NEG_INF, tl.exp2(log2_q_t - log2_q), 0.0)


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
# Loads and normalisers (base 2: `scale` is log2(e) / tau).


@triton.jit
def _logits(ptr, offs, mask, ACC: tl.constexpr):
    """Logits in the accumulation type; -inf outside the row (probability exactly 0 there)."""
    return tl.load(ptr + offs, mask=mask, other=float("-inf")).to(ACC)


@triton.jit
def _log2_softmax(x, scale, lse2):
    """log2 of a softmax: x log2(e) / tau - lse2 in one rounding. Every pass forms it this way,
    so the probabilities, and the head membership they decide, are the same in every pass."""
    return tl.fma(x, scale, -lse2)


@triton.jit
def _logit_sum(student_row, slice_stride, steps, offs, mask, ACC: tl.constexpr):
    """sum_t z_t (the plain logits for T = 1); the caller scales by 1/T."""
    total = _logits(student_row, offs, mask, ACC)
    for t in range(1, steps):
        total += _logits(student_row + t * slice_stride, offs, mask, ACC)
    return total


@triton.jit
def _lse2_combine(running_max, running_sum, s, PER_LANE: tl.constexpr = False):
    """Online base-2 logsumexp over a row: merge the chunk s into (max, sum of exp2(. - max)).
    PER_LANE: the sum is kept per lane of s (the caller sums it once, after its last chunk).

    An all -inf prefix keeps (-inf, 0) instead of producing NaN, so the result is
    max + log2(sum): -inf for an all -inf row (whose softmax is NaN, like the reference's).
    """
    new_max = tl.maximum(running_max, tl.max(s, 0))
    shift = tl.where(new_max == NEG_INF, 0.0, new_max)
    terms = tl.exp2(s - shift)
    if not PER_LANE:
        terms = tl.sum(terms, 0)
    return new_max, running_sum * tl.exp2(running_max - shift) + terms


@triton.jit
def _pick(values, ids, i):
    """values[i] of a small vector."""
    return tl.sum(tl.where(ids == i, values, 0), 0)


@triton.jit
def _step_log2_prob(student_row, slice_stride, t, offs, mask, scale, lse2_steps, step_ids,
                    ACC: tl.constexpr):
    """log2 q_t of one time step (SPEC 1.2)."""
    x = _logits(student_row + t * slice_stride, offs, mask, ACC)
    return _log2_softmax(x, scale, _pick(lse2_steps, step_ids, t))


@triton.jit
def _log2_step_mean(total, top, student_row, slice_stride, steps, offs, mask, scale, lse2_steps,
                    step_ids, log2_steps, TINY: tl.constexpr, ACC: tl.constexpr):
    """SPEC 1.2 (prob_mean): log2 q = log2(sum_t q_t) - log2 T from the sum of the steps' q_t
    (`total`) and the largest log2 q_t (`top`). Where every step's q_t underflows (a class the
    student all but rules out; the loss may still need its log q), the chunk's steps are summed
    again relative to `top`, as logsumexp does: rare, and exact either way."""
    log2_total = tl.log2(total)
    small = mask & (total < TINY) & (top > NEG_INF)
    if tl.max(small.to(tl.int32), 0) > 0:
        rescaled = tl.zeros(offs.shape, ACC)
        for t in range(steps):
            u = _step_log2_prob(student_row, slice_stride, t, offs, mask, scale, lse2_steps,
                                step_ids, ACC)
            rescaled += tl.exp2(u - top)
        log2_total = tl.where(small, top + tl.log2(rescaled), log2_total)
    return log2_total - log2_steps


@triton.jit
def _prob_mean_log2q(student_row, slice_stride, steps, offs, mask, scale, lse2_steps, step_ids,
                     log2_steps, TINY: tl.constexpr, ACC: tl.constexpr):
    """log2 q of a chunk for prob_mean, from pass 1's per-step normalisers."""
    total = tl.zeros(offs.shape, ACC)
    top = tl.full(offs.shape, NEG_INF, ACC)
    for t in range(steps):
        u = _step_log2_prob(student_row, slice_stride, t, offs, mask, scale, lse2_steps, step_ids,
                            ACC)
        total += tl.exp2(u)
        top = tl.maximum(top, u)
    return _log2_step_mean(total, top, student_row, slice_stride, steps, offs, mask, scale,
                           lse2_steps, step_ids, log2_steps, TINY, ACC)


@triton.jit
def _merge_lse2(max_a, sum_a, max_b, sum_b):
    """Two partial base-2 logsumexps (max, sum of exp2(. - max)) as one; elementwise."""
    new_max = tl.maximum(max_a, max_b)
    shift = tl.where(new_max == NEG_INF, 0.0, new_max)
    return new_max, sum_a * tl.exp2(max_a - shift) + sum_b * tl.exp2(max_b - shift)


@triton.jit
def _normalisers(teacher_row, student_row, slice_stride, steps, begin, end, scale, scale_q,
                 step_ids, BLOCK: tl.constexpr, PROB_MEAN: tl.constexpr, STEPS_PAD: tl.constexpr,
                 ACC: tl.constexpr):
    """Pass 1 over classes [begin, end) in chunks: the partial base-2 logsumexps (max, sum) of the
    teacher, of the student's (mean) logits, and for prob_mean of each step. The teacher's and the
    student's sums are kept per lane (a reduction over the block per chunk costs more)."""
    lanes = tl.arange(0, BLOCK)
    zero = tl.zeros([], ACC)
    p_max, p_sum = zero + NEG_INF, tl.zeros([BLOCK], ACC)
    q_max, q_sum = zero + NEG_INF, tl.zeros([BLOCK], ACC)
    steps_max = tl.zeros([STEPS_PAD], ACC) + NEG_INF
    steps_sum = tl.zeros([STEPS_PAD], ACC)
    for start in range(begin, end, BLOCK):
        offs = start + lanes
        mask = offs < end
        p_max, p_sum = _lse2_combine(p_max, p_sum, _logits(teacher_row, offs, mask, ACC) * scale,
                                     True)
        if PROB_MEAN:
            for t in range(steps):
                x = _logits(student_row + t * slice_stride, offs, mask, ACC)
                t_max, t_sum = _lse2_combine(_pick(steps_max, step_ids, t),
                                             _pick(steps_sum, step_ids, t), x * scale)
                steps_max = tl.where(step_ids == t, t_max, steps_max)
                steps_sum = tl.where(step_ids == t, t_sum, steps_sum)
        else:
            q_max, q_sum = _lse2_combine(
                q_max, q_sum,
                _logit_sum(student_row, slice_stride, steps, offs, mask, ACC) * scale_q, True)
    return p_max, tl.sum(p_sum, 0), q_max, tl.sum(q_sum, 0), steps_max, steps_sum


# ---------------------------------------------------------------------------------------------
# Head selection (SPEC 1.3) over integer keys and fixed-point masses. w is the largest key whose
# mass at or above reaches delta; [lo, hi) brackets it and mass_above is the mass at or above hi.


@triton.jit
def _keys_and_masses(p, mask, KEY: tl.constexpr, MASS: tl.constexpr, KEY_END: tl.constexpr,
                     FIXED_ONE: tl.constexpr):
    """Each class's key (the bits of p; -1 outside the row or for a NaN p, which has no place in
    the order: its row's results are NaN whatever the membership) and its mass in fixed point."""
    bits = p.to(KEY, bitcast=True)
    valid = mask & (bits < KEY_END)
    key = tl.where(valid, bits, -1)
    mass = tl.where(valid, (tl.where(valid, p, 0.0) * FIXED_ONE + 0.5).to(MASS), 0)
    return key, mass


@triton.jit
def _chunk_keys(teacher_row, offs, end, scale, lse2_p, ACC: tl.constexpr, KEY: tl.constexpr,
                MASS: tl.constexpr, KEY_END: tl.constexpr, FIXED_ONE: tl.constexpr):
    """Keys and masses of the classes `offs` (those < end), read from the teacher."""
    mask = offs < end
    p = tl.exp2(_log2_softmax(_logits(teacher_row, offs, mask, ACC), scale, lse2_p))
    return _keys_and_masses(p, mask, KEY, MASS, KEY_END, FIXED_ONE)


@triton.jit
def _bisect(keys, masses, lo, hi, mass_above, delta_fixed, ACC: tl.constexpr,
            MANTISSA_BITS: tl.constexpr, KEY_END: tl.constexpr):
    """w, given `keys` holding every key of [lo, hi) (others are -1) and that lo's mass reaches
    delta: the bits of w - lo are set from the top, keeping a bit while the mass still reaches
    delta. Returns w, the mass strictly above it and the count of keys equal to it."""
    # As many steps as hi - lo - 1 has bits, read off its exponent as a float (rounding up to
    # the next power of two only adds a step that is never taken).
    span = hi - lo - 1
    exponent = (span.to(ACC).to(lo.dtype, bitcast=True) >> MANTISSA_BITS) - (
        (KEY_END >> MANTISSA_BITS) - 1)
    key_bits = tl.where(span > 0, exponent + 1, 0)
    w = lo
    bit = tl.where(span > 0, tl.full([], 1, lo.dtype) << tl.maximum(key_bits - 1, 0), 0)
    for _ in range(key_bits):
        candidate = w + bit
        mass = mass_above + tl.sum(tl.where(keys >= candidate, masses, 0), 0)
        w = tl.where((candidate < hi) & (mass >= delta_fixed), candidate, w)
        bit = bit >> 1
    above = mass_above + tl.sum(tl.where(keys > w, masses, 0), 0)
    return w, above, tl.sum((keys == w).to(tl.int32), 0)


@triton.jit
def _octave_thresholds(p_max, lse2_p, buckets, RADIX_BUCKETS: tl.constexpr, KEY: tl.constexpr,
                       KEY_END: tl.constexpr, MANTISSA_BITS: tl.constexpr):
    """The first histogram's thresholds (ascending, the first 0): the octaves of p below the
    row's largest probability (from its largest scaled logit `p_max`); the lowest bucket takes
    everything further down."""
    top = tl.exp2(p_max - lse2_p).to(KEY, bitcast=True)
    top_exponent = tl.minimum(tl.maximum(top >> MANTISSA_BITS, 0), KEY_END >> MANTISSA_BITS)
    octaves = tl.maximum(top_exponent - (RADIX_BUCKETS - 1) + buckets, 0).to(KEY)
    return tl.where(buckets == 0, 0, octaves << MANTISSA_BITS).to(KEY)


@triton.jit
def _histogram(teacher_row, begin, end, scale, lse2_p, hi, thresholds,
               RADIX_BLOCK: tl.constexpr, COUNTED: tl.constexpr, ACC: tl.constexpr,
               KEY: tl.constexpr, MASS: tl.constexpr, KEY_END: tl.constexpr,
               FIXED_ONE: tl.constexpr):
    """One pass over the teacher's classes [begin, end): for each of the ascending `thresholds`,
    the mass and, if COUNTED, the count of the keys in [threshold, hi) (else the counts are 0).

    Thresholds by classes, the classes along the threads (few threads share a class's key), and
    each lane's sums kept over the pass and reduced once at its end. A row's first histogram
    needs no counts (the copy of its boundary bucket counts that bucket): a third less work per
    class and threshold."""
    radix_lanes = tl.arange(0, RADIX_BLOCK)
    masses = tl.zeros([thresholds.shape[0], RADIX_BLOCK], MASS)
    counts = tl.zeros([thresholds.shape[0], RADIX_BLOCK], MASS)
    for start in range(begin, end, RADIX_BLOCK):
        key, mass = _chunk_keys(teacher_row, start + radix_lanes, end, scale, lse2_p, ACC, KEY,
                                MASS, KEY_END, FIXED_ONE)
        hit = (key[None, :] >= thresholds[:, None]) & (key < hi)[None, :]
        masses += tl.where(hit, mass[None, :], 0)
        if COUNTED:
            counts += hit.to(MASS)
    return tl.sum(masses, 1), tl.sum(counts, 1)


@triton.jit
def _choose_bucket(masses, thresholds, buckets, hi, mass_above, delta_fixed,
                   RADIX_BUCKETS: tl.constexpr, KEY: tl.constexpr, MASS: tl.constexpr):
    """The histogram's bucket that holds w: the last threshold whose mass at or above reaches
    delta (the masses decrease along the thresholds). Returns its index, its [lo, hi) and the
    mass at or above its hi."""
    chosen = tl.sum((mass_above + masses >= delta_fixed).to(tl.int32), 0) - 1
    lo = _pick(thresholds, buckets, chosen).to(KEY)
    hi = tl.where(chosen + 1 < RADIX_BUCKETS, _pick(thresholds, buckets, chosen + 1), hi).to(KEY)
    mass_above += _pick(masses, buckets, chosen + 1).to(MASS)
    return chosen, lo, hi, mass_above


@triton.jit
def _bucket_count(counts, buckets, chosen):
    """The count of one bucket, from the counts at or above each threshold."""
    return _pick(counts, buckets, chosen) - _pick(counts, buckets, chosen + 1)


@triton.jit
def _narrow(teacher_row, classes, scale, lse2_p, lo, hi, mass_above, count, delta_fixed,
            CAPACITY: tl.constexpr, RADIX_BLOCK: tl.constexpr, RADIX_BUCKETS: tl.constexpr,
            ACC: tl.constexpr, KEY: tl.constexpr, MASS: tl.constexpr, KEY_END: tl.constexpr,
            FIXED_ONE: tl.constexpr):
    """The bucket [lo, hi) holding w (mass_above at or above hi, `count` classes), split evenly
    by further passes over the teacher while it holds more than CAPACITY classes and more than
    one key. Returns the new lo, hi, mass at or above hi and count."""
    buckets = tl.arange(0, RADIX_BUCKETS)
    while (count > CAPACITY) & (hi - lo > 1):
        width = (hi - lo + RADIX_BUCKETS - 1) // RADIX_BUCKETS
        thresholds = tl.minimum(lo + buckets * width, hi).to(KEY)
        masses, counts = _histogram(teacher_row, 0, classes, scale, lse2_p, hi, thresholds,
                                    RADIX_BLOCK, True, ACC, KEY, MASS, KEY_END, FIXED_ONE)
        chosen, lo, hi, mass_above = _choose_bucket(masses, thresholds, buckets, hi, mass_above,
                                                    delta_fixed, RADIX_BUCKETS, KEY, MASS)
        count = _bucket_count(counts, buckets, chosen).to(count.dtype)
    return lo, hi, mass_above, count


@triton.jit
def _compact(teacher_row, begin, end, scale, lse2_p, lo, hi, keys_row, index_row, written,
             BLOCK: tl.constexpr, CAPACITY: tl.constexpr, ACC: tl.constexpr,
             KEY: tl.constexpr, MASS: tl.constexpr, KEY_END: tl.constexpr,
             FIXED_ONE: tl.constexpr):
    """Append the keys in [lo, hi) of classes [begin, end) and their class indices to the
    workspace row (of CAPACITY) from position `written`, in class order; returns `written` plus
    the count of those classes, those that did not fit included.
    In chunks of BLOCK classes, so the per-chunk count and its branch cost each class a fraction;
    the scan runs only in chunks that hold some (few in a peaked row)."""
    lanes = tl.arange(0, BLOCK)
    for start in range(begin, end, BLOCK):
        offs = start + lanes
        key, _ = _chunk_keys(teacher_row, offs, end, scale, lse2_p, ACC, KEY, MASS, KEY_END,
                             FIXED_ONE)
        inside = ((key >= lo) & (key < hi)).to(tl.int32)
        found = tl.sum(inside, 0)
        if found > 0:
            position = written + tl.cumsum(inside, 0) - inside
            stored = (inside != 0) & (position < CAPACITY)
            tl.store(keys_row + position, key, mask=stored)
            tl.store(index_row + position, offs.to(KEY), mask=stored)
        written += found
    return written


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
def _tie_limit(keys, indices, boundary_bits, tied_head):
    """One past the class index of the `tied_head`-th class tied at w, from keys in class order
    with their class indices: the tied classes before it are the head's (SPEC 1.3's stable
    order)."""
    tied = keys == boundary_bits
    rank = tl.cumsum(tied.to(tl.int32), 0)
    return tl.max(tl.where(tied & (rank <= tied_head), indices + 1, 0), 0).to(tl.int32)


@triton.jit
def _head_of_keys(keys, indices, lo, hi, mass_above, delta_fixed, delta, ACC: tl.constexpr,
                  MASS: tl.constexpr, MANTISSA_BITS: tl.constexpr, KEY_END: tl.constexpr,
                  FIXED_ONE: tl.constexpr):
    """w and the tie limit, from `keys` holding every key of [lo, hi) in class order (others
    -1) with their class indices."""
    p = tl.where(keys >= 0, keys, 0).to(ACC, bitcast=True)
    masses = tl.where(keys >= 0, (p * FIXED_ONE + 0.5).to(MASS), 0)
    boundary_bits, above, tied_count = _bisect(keys, masses, lo, hi, mass_above, delta_fixed, ACC,
                                               MANTISSA_BITS, KEY_END)
    tied_head = _tied_head_count(above.to(ACC) / FIXED_ONE, boundary_bits.to(ACC, bitcast=True),
                                 tied_count, delta)
    return boundary_bits, _tie_limit(keys, indices, boundary_bits, tied_head)


@triton.jit
def _head_of_row(teacher_row, classes, scale, lse2_p, lo, hi, mass_above, count, keys_row,
                 index_row, delta_fixed, delta, copied, CAPACITY: tl.constexpr,
                 RADIX_BLOCK: tl.constexpr, RADIX_BUCKETS: tl.constexpr, ACC: tl.constexpr,
                 KEY: tl.constexpr, MASS: tl.constexpr, KEY_END: tl.constexpr,
                 MANTISSA_BITS: tl.constexpr, FIXED_ONE: tl.constexpr):
    """w and the tie limit of a chunked row whose mass reaches delta, from the bucket [lo, hi)
    of its first histogram that holds w (mass_above at or above hi, `count` classes), whose keys
    are in the workspace row if `copied`. A bucket of more than CAPACITY classes is narrowed
    (`_narrow`) and copied again; the keys are bisected in the workspace. A bucket of the one
    key w in more classes than the workspace holds: the tie limit by a count over the row, when
    only some of its classes are in the head."""
    copied = copied & (count <= CAPACITY)  # a bucket that did not fit was copied in part
    if count > CAPACITY:
        lo, hi, mass_above, count = _narrow(teacher_row, classes, scale, lse2_p, lo, hi,
                                            mass_above, count, delta_fixed, CAPACITY,
                                            RADIX_BLOCK, RADIX_BUCKETS, ACC, KEY, MASS, KEY_END,
                                            FIXED_ONE)
    boundary_bits = lo
    tie_limit = tl.zeros([], tl.int32)
    if count <= CAPACITY:
        if not copied:
            _compact(teacher_row, 0, classes, scale, lse2_p, lo, hi, keys_row, index_row,
                     tl.zeros([], tl.int32), CAPACITY, CAPACITY, ACC, KEY, MASS, KEY_END,
                     FIXED_ONE)
        tl.debug_barrier()  # the workspace's stores are read back by other threads
        lanes = tl.arange(0, CAPACITY)
        keys = tl.load(keys_row + lanes, mask=lanes < count, other=-1)
        indices = tl.load(index_row + lanes, mask=lanes < count, other=0)
        boundary_bits, tie_limit = _head_of_keys(keys, indices, lo, hi, mass_above, delta_fixed,
                                                 delta, ACC, MASS, MANTISSA_BITS, KEY_END,
                                                 FIXED_ONE)
    else:
        tied_count = count.to(tl.int32)
        tied_head = _tied_head_count(mass_above.to(ACC) / FIXED_ONE,
                                     boundary_bits.to(ACC, bitcast=True), tied_count, delta)
        tie_limit = tl.where(tied_head > 0, classes, 0)
        if (tied_head > 0) & (tied_head < tied_count):
            tie_limit = _tie_limit_in_row(teacher_row, classes, scale, lse2_p, boundary_bits,
                                          tied_head, RADIX_BLOCK, ACC, KEY, MASS, KEY_END,
                                          FIXED_ONE)
    return boundary_bits, tie_limit


@triton.jit
def _tie_limit_in_row(teacher_row, classes, scale, lse2_p, boundary_bits, tied_head,
                      RADIX_BLOCK: tl.constexpr, ACC: tl.constexpr, KEY: tl.constexpr,
                      MASS: tl.constexpr, KEY_END: tl.constexpr, FIXED_ONE: tl.constexpr):
    """`_tie_limit` by a pass over the row (a boundary tied in more classes than the workspace
    holds)."""
    radix_lanes = tl.arange(0, RADIX_BLOCK)
    seen = tl.zeros([], tl.int32)
    tie_limit = tl.zeros([], tl.int32)
    for start in range(0, classes, RADIX_BLOCK):
        offs = start + radix_lanes
        key, _ = _chunk_keys(teacher_row, offs, classes, scale, lse2_p, ACC, KEY, MASS, KEY_END,
                             FIXED_ONE)
        tied = key == boundary_bits
        rank = seen + tl.cumsum(tied.to(tl.int32), 0)
        tie_limit = tl.maximum(
            tie_limit, tl.max(tl.where(tied & (rank <= tied_head), offs + 1, 0), 0))
        seen += tl.sum(tied.to(tl.int32), 0)
    return tie_limit


@triton.jit
def _head_mask(bits, offs, mask, boundary_bits, tie_limit, all_head):
    """SPEC 1.3 without a sort: {p > w} plus the classes tied at w before the tie limit; every
    class if the row's mass is below delta."""
    head = (bits > boundary_bits) | ((bits == boundary_bits) & (offs < tie_limit))
    return tl.where(all_head, mask, head & mask)


# ---------------------------------------------------------------------------------------------
# Passes 3 and 4 over classes [begin, end), shared by the layouts.


@triton.jit
def _chunk_distributions(row_mask, log2_p_tile, log2_q_tile, teacher_row, student_row,
                         slice_stride, steps, end, offs, scale, scale_q, lse2_p, lse2_q,
                         lse2_steps, step_ids, log2_steps, boundary_bits, tie_limit, all_head,
                         ON_CHIP: tl.constexpr, PROB_MEAN: tl.constexpr,
                         TINY: tl.constexpr, ACC: tl.constexpr, KEY: tl.constexpr):
    """One chunk of the row as passes 3 and 4 see it (SPEC 1.1-1.3): its mask, log2 q, log p,
    log q, p, q and head mask.

    On chip the row is one chunk and its log2-probabilities are the tiles, nothing is reloaded;
    chunked, the chunk is reloaded and normalised with pass 1's normalisers (then `row_mask`,
    `log2_p_tile` and `log2_q_tile` are None: that layout has no tiles).
    """
    if ON_CHIP:
        mask = row_mask
        log2_p = log2_p_tile
        log2_q = log2_q_tile
    else:
        mask = offs < end
        log2_p = _log2_softmax(_logits(teacher_row, offs, mask, ACC), scale, lse2_p)
        if PROB_MEAN:
            log2_q = _prob_mean_log2q(student_row, slice_stride, steps, offs, mask, scale,
                                      lse2_steps, step_ids, log2_steps, TINY, ACC)
        else:
            log2_q = _log2_softmax(_logit_sum(student_row, slice_stride, steps, offs, mask, ACC),
                                   scale_q, lse2_q)
    p = tl.exp2(log2_p)
    q = tl.exp2(log2_q)
    head = _head_mask(p.to(KEY, bitcast=True), offs, mask, boundary_bits, tie_limit, all_head)
    return mask, log2_q, log2_p * LN2, log2_q * LN2, p, q, head


@triton.jit
def _row_sums(row_mask, log2_p_tile, log2_q_tile, teacher_row, student_row, slice_stride, steps,
              begin, end, scale, scale_q, lse2_p, lse2_q, lse2_steps, step_ids, log2_steps,
              boundary_bits, tie_limit, all_head, BLOCK: tl.constexpr,
              ON_CHIP: tl.constexpr, PROB_MEAN: tl.constexpr, STEPS_PAD: tl.constexpr,
              GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, TINY: tl.constexpr,
              ACC: tl.constexpr, KEY: tl.constexpr):
    """Pass 3 (SPEC 1.4-1.6 and 2) over classes [begin, end): d_head, d_tail, F, R; the signed
    head / tail sums of p and q (SPEC 2's sum_j p_j dl_j and sum_j q_j dl_j); for prob_mean, per
    time step, sum_j p_j r_tj, sum_j q_tj (log q_j - log p_j + 1) and the signed head / tail
    sums of q_tj (csrc/hta_kl_math.h, time_step_g_sum)."""
    lanes = tl.arange(0, BLOCK)
    # Chunked, a student of one softmax keeps the row's sums per lane over the chunks and reduces
    # them once, after the loop (a reduction over the block per chunk and sum costs more than the
    # sum itself); prob_mean, whose chunks hold T more values per class, has not the registers;
    # on chip there is one chunk.
    PER_LANE: tl.constexpr = not (PROB_MEAN or ON_CHIP)
    zero = tl.zeros([BLOCK if PER_LANE else 1], ACC)
    d_head, d_tail, fkl, rkl = zero, zero, zero, zero
    q_head, q_tail, p_head, p_tail = zero, zero, zero, zero
    steps_p_ratio = tl.zeros([STEPS_PAD], ACC)
    steps_log_ratio = tl.zeros([STEPS_PAD], ACC)
    steps_head = tl.zeros([STEPS_PAD], ACC)
    steps_tail = tl.zeros([STEPS_PAD], ACC)
    for start in range(begin, end, BLOCK):
        offs = start + lanes
        mask, log2_q, log_p, log_q, p, q, head = _chunk_distributions(
            row_mask, log2_p_tile, log2_q_tile, teacher_row, student_row, slice_stride, steps,
            end, offs, scale, scale_q, lse2_p, lse2_q, lse2_steps, step_ids, log2_steps,
            boundary_bits, tie_limit, all_head, ON_CHIP, PROB_MEAN, TINY, ACC, KEY)
        tail = mask & ~head
        distance = tl.abs(p - q)
        d_head = _accumulate(d_head, tl.where(head, distance, 0.0), PER_LANE)
        d_tail = _accumulate(d_tail, tl.where(tail, distance, 0.0), PER_LANE)
        # Outside the row p = q = 0, and the terms 0 (NaN only in a row whose normaliser is:
        # its loss is NaN anyway).
        fkl = _accumulate(fkl, _fkl_term(p, log_p, log_q), PER_LANE)
        rkl = _accumulate(rkl, _rkl_term(q, log_q, log_p), PER_LANE)
        sign = _sign_of_difference(q, p)
        if GRAD_T:
            p_head = _accumulate(p_head, tl.where(head, p * sign, 0.0), PER_LANE)
            p_tail = _accumulate(p_tail, tl.where(tail, p * sign, 0.0), PER_LANE)
        if GRAD_S:
            if PROB_MEAN:
                for t in range(steps):
                    log2_q_t = _step_log2_prob(student_row, slice_stride, t, offs, mask, scale,
                                               lse2_steps, step_ids, ACC)
                    q_t = tl.exp2(log2_q_t)
                    at_t = step_ids == t
                    steps_p_ratio += tl.where(
                        at_t,
                        tl.sum(tl.where(mask, p * _prob_ratio(log2_q_t, log2_q), 0.0), 0),
                        0.0)
                    steps_log_ratio += tl.where(
                        at_t, tl.sum(tl.where(mask, _q_t_log_ratio(q_t, log_q, log_p), 0.0), 0),
                        0.0)
                    steps_head += tl.where(at_t, tl.sum(tl.where(head, q_t * sign, 0.0), 0), 0.0)
                    steps_tail += tl.where(at_t, tl.sum(tl.where(tail, q_t * sign, 0.0), 0), 0.0)
            else:
                q_head = _accumulate(q_head, tl.where(head, q * sign, 0.0), PER_LANE)
                q_tail = _accumulate(q_tail, tl.where(tail, q * sign, 0.0), PER_LANE)
    return (tl.sum(d_head, 0), tl.sum(d_tail, 0), tl.sum(fkl, 0), tl.sum(rkl, 0),
            tl.sum(q_head, 0), tl.sum(q_tail, 0), tl.sum(p_head, 0), tl.sum(p_tail, 0),
            steps_p_ratio, steps_log_ratio, steps_head, steps_tail)


@triton.jit
def _accumulate(total, values, PER_LANE: tl.constexpr):
    """total + values per lane, or + their sum into a total of one lane."""
    if PER_LANE:
        return total + values
    else:
        return total + tl.sum(values, 0, keep_dims=True)


@triton.jit
def _row_weights(d_head, d_tail, DETACH: tl.constexpr):
    """SPEC 1.5 and 2 (csrc make_row_stats): lam_h, lam_t and the coefficients dl_head, dl_tail
    of dl_i."""
    distance_sum = d_head + d_tail
    vanished = distance_sum == 0
    safe_sum = tl.where(vanished, 1.0, distance_sum)
    lam_h = tl.where(vanished, 0.5, d_head / safe_sum)
    lam_t = tl.where(vanished, 0.5, d_tail / safe_sum)
    if DETACH:
        dl_head = tl.zeros_like(d_head)
        dl_tail = tl.zeros_like(d_head)
    else:
        # d_tail / Sg^2 as lam_t / Sg (csrc/hta_kl_math.h, make_row_stats): Sg^2 underflows for
        # rows where student and teacher agree closely.
        dl_head = tl.where(vanished, 0.0, lam_t / safe_sum)
        dl_tail = tl.where(vanished, 0.0, -lam_h / safe_sum)
    return lam_h, lam_t, dl_head, dl_tail


@triton.jit
def _write_gradients(row_mask, log2_p_tile, log2_q_tile, teacher_row, student_row, d_teacher_row,
                     d_student_row, slice_stride, steps, begin, end, scale, scale_q, lse2_p,
                     lse2_q, lse2_steps, step_ids, log2_steps, boundary_bits, tie_limit,
                     all_head, lam_h, lam_t, fkl, rkl, dl_head, dl_tail, grad_scale,
                     inv_steps, q_head, q_tail, p_head, p_tail, steps_p_ratio, steps_log_ratio,
                     steps_head, steps_tail, BLOCK: tl.constexpr, ON_CHIP: tl.constexpr,
                     PROB_MEAN: tl.constexpr, TWO_D: tl.constexpr, GRAD_S: tl.constexpr,
                     GRAD_T: tl.constexpr, TINY: tl.constexpr, ACC: tl.constexpr,
                     KEY: tl.constexpr):
    """Pass 4, SPEC 2, over classes [begin, end): the gradients of the row's loss."""
    lanes = tl.arange(0, BLOCK)
    fkl_minus_rkl = fkl - rkl
    for start in range(begin, end, BLOCK):
        offs = start + lanes
        mask, log2_q, log_p, log_q, p, q, head = _chunk_distributions(
            row_mask, log2_p_tile, log2_q_tile, teacher_row, student_row, slice_stride, steps,
            end, offs, scale, scale_q, lse2_p, lse2_q, lse2_steps, step_ids, log2_steps,
            boundary_bits, tie_limit, all_head, ON_CHIP, PROB_MEAN, TINY, ACC, KEY)
        # SPEC 2: dl_i = s_i (d_tail [i in H] - d_head [i not in H]) / Sg^2.
        dl = _sign_of_difference(q, p) * tl.where(head, dl_head, dl_tail)
        if GRAD_T:
            grad = _grad_teacher(lam_h, lam_t, fkl, rkl, grad_scale, p, log_p, q, log_q, dl,
                                 dl_head * p_head + dl_tail * p_tail)
            tl.store(d_teacher_row + offs, grad.to(d_teacher_row.dtype.element_ty), mask=mask)
        if GRAD_S:
            if PROB_MEAN:
                for t in range(steps):
                    log2_q_t = _step_log2_prob(student_row, slice_stride, t, offs, mask, scale,
                                               lse2_steps, step_ids, ACC)
                    q_t = tl.exp2(log2_q_t)
                    # q_tk g_k and G_t = sum_j q_tj g_j (csrc q_t_times_g, time_step_g_sum).
                    q_t_g = (-lam_h * p * _prob_ratio(log2_q_t, log2_q)
                             + lam_t * _q_t_log_ratio(q_t, log_q, log_p)
                             + fkl_minus_rkl * q_t * dl)
                    g_sum = (-lam_h * _pick(steps_p_ratio, step_ids, t)
                             + lam_t * _pick(steps_log_ratio, step_ids, t)
                             + fkl_minus_rkl * (dl_head * _pick(steps_head, step_ids, t)
                                                + dl_tail * _pick(steps_tail, step_ids, t)))
                    grad = grad_scale * inv_steps * (q_t_g - q_t * g_sum)
                    tl.store(d_student_row + t * slice_stride + offs,
                             grad.to(d_student_row.dtype.element_ty), mask=mask)
            else:
                # logit_mean: the gradient of mean_t z_t, 1/T on every step (T = 1 for 2-D).
                grad = _grad_student_softmax(lam_h, lam_t, fkl, rkl, grad_scale, p, log_p, q,
                                             log_q, dl, dl_head * q_head + dl_tail * q_tail)
                if not TWO_D:
                    grad = inv_steps * grad
                grad = grad.to(d_student_row.dtype.element_ty)
                for t in range(steps):
                    tl.store(d_student_row + t * slice_stride + offs, grad, mask=mask)


@triton.jit
def _call_constants(temperature, head_mass, head_mass_fixed, row_scale_in, steps,
                    ACC: tl.constexpr, MASS: tl.constexpr):
    """The call's scalars in the accumulation type: scale = log2(e) / tau, the student's scale
    (over T for logit_mean's sum of logits), delta (also in fixed point), the row's weight
    (csrc HtaKlOptions::row_scale: the loss row and, through grad_scale = row_scale / tau, every
    gradient carry it), 1 / T and log2 T."""
    tau64 = tl.zeros([], tl.float64) + temperature
    scale = (tl.full([], LOG2E, tl.float64) / tau64).to(ACC)
    delta = (tl.zeros([], tl.float64) + head_mass).to(ACC)
    delta_fixed = (tl.zeros([], tl.int64) + head_mass_fixed).to(MASS)
    row_scale = (tl.zeros([], tl.float64) + row_scale_in).to(ACC)
    grad_scale = row_scale / tau64.to(ACC)
    steps_acc = tl.zeros([], ACC) + steps
    inv_steps = 1.0 / steps_acc
    return (scale, scale * inv_steps, delta, delta_fixed, row_scale, grad_scale, inv_steps,
            tl.log2(steps_acc))


@triton.jit
def _row_pointers(row, student_ptr, teacher_ptr, d_student_ptr, d_teacher_ptr, classes,
                  slice_stride, ALIGN: tl.constexpr):
    """The row's length, the student's step stride and the row's four pointers, shared by both
    kernels. C and the stride are rewritten as multiples of ALIGN (the launcher's gcd(C, 16),
    which divides both): the same values, now known to the compiler as multiples, so a row that
    starts 16-byte aligned is loaded and stored in vectors, as Triton does on its own only when
    C is a multiple of 16. 64-bit offsets: the row index is widened before it multiplies C, the
    stride before a time step multiplies it (T * R * C may reach 2**31)."""
    classes = classes // ALIGN * ALIGN
    slice_stride = (tl.zeros([], tl.int64) + slice_stride) // ALIGN * ALIGN
    start = row.to(tl.int64) * classes
    return (classes, slice_stride, teacher_ptr + start, student_ptr + start,
            d_teacher_ptr + start, d_student_ptr + start)


# ---------------------------------------------------------------------------------------------
# The kernel: one program per row.


@triton.jit
def _hta_kl_kernel(
    student_ptr, teacher_ptr, loss_ptr, d_student_ptr, d_teacher_ptr, workspace_ptr,
    # float64 arguments (a plain Python float would be passed as float32): exact for float64 math.
    temperature: tl.float64, head_mass: tl.float64, row_scale_in: tl.float64,
    head_mass_fixed, steps, classes, slice_stride,
    PROB_MEAN: tl.constexpr, TWO_D: tl.constexpr, STEPS_PAD: tl.constexpr, ON_CHIP: tl.constexpr,
    BLOCK: tl.constexpr, RADIX_BLOCK: tl.constexpr, RADIX_BUCKETS: tl.constexpr,
    DETACH: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, ALIGN: tl.constexpr,
    ACC: tl.constexpr, KEY: tl.constexpr, MASS: tl.constexpr, TOP_BIT: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, FIXED_ONE: tl.constexpr, TINY: tl.constexpr,
):
    if TWO_D:
        steps = 1  # the student is one slice: the loops over time steps vanish at compile time
    row = tl.program_id(0).to(tl.int64)
    classes, slice_stride, teacher_row, student_row, d_teacher_row, d_student_row = \
        _row_pointers(row, student_ptr, teacher_ptr, d_student_ptr, d_teacher_ptr, classes,
                      slice_stride, ALIGN)
    scale, scale_q, delta, delta_fixed, row_scale, grad_scale, inv_steps, log2_steps = \
        _call_constants(temperature, head_mass, head_mass_fixed, row_scale_in, steps, ACC, MASS)
    lanes = tl.arange(0, BLOCK)
    step_ids = tl.arange(0, STEPS_PAD)
    zero = tl.zeros([], ACC)
    KEY_END: tl.constexpr = 1 << (TOP_BIT + 1)  # the key of 2.0: above every probability

    # ---- Pass 1, SPEC 1.1-1.2: softmax normalisers (online base-2 logsumexp over chunks). ----
    if ON_CHIP:
        row_mask = lanes < classes
        teacher_tile = _logits(teacher_row, lanes, row_mask, ACC)
        p_max, p_sum = _lse2_combine(zero + NEG_INF, zero, teacher_tile * scale)
        q_max, q_sum = zero + NEG_INF, zero
        steps_max = tl.zeros([STEPS_PAD], ACC) + NEG_INF
        steps_sum = tl.zeros([STEPS_PAD], ACC)
        if PROB_MEAN:
            # Each step's slice is read once here and its probabilities summed into q.
            total = tl.zeros([BLOCK], ACC)
            top = tl.full([BLOCK], NEG_INF, ACC)
            for t in range(steps):
                x = _logits(student_row + t * slice_stride, lanes, row_mask, ACC)
                t_max, t_sum = _lse2_combine(zero + NEG_INF, zero, x * scale)
                steps_max = tl.where(step_ids == t, t_max, steps_max)
                steps_sum = tl.where(step_ids == t, t_sum, steps_sum)
                u = _log2_softmax(x, scale, t_max + tl.log2(t_sum))
                total += tl.exp2(u)
                top = tl.maximum(top, u)
        else:
            student_tile = _logit_sum(student_row, slice_stride, steps, lanes, row_mask, ACC)
            q_max, q_sum = _lse2_combine(q_max, q_sum, student_tile * scale_q)
    else:
        p_max, p_sum, q_max, q_sum, steps_max, steps_sum = _normalisers(
            teacher_row, student_row, slice_stride, steps, 0, classes, scale, scale_q, step_ids,
            BLOCK, PROB_MEAN, STEPS_PAD, ACC)
    lse2_p = p_max + tl.log2(p_sum)
    lse2_q = q_max + tl.log2(q_sum)
    lse2_steps = steps_max + tl.log2(steps_sum)
    if ON_CHIP:
        # The row's log2-probabilities stay on chip for passes 2-4.
        log2_p_tile = _log2_softmax(teacher_tile, scale, lse2_p)
        if PROB_MEAN:
            log2_q_tile = _log2_step_mean(total, top, student_row, slice_stride, steps, lanes,
                                          row_mask, scale, lse2_steps, step_ids, log2_steps, TINY,
                                          ACC)
        else:
            log2_q_tile = _log2_softmax(student_tile, scale_q, lse2_q)
    else:
        # No tiles: passes 3 and 4 reload each chunk (_chunk_distributions).
        row_mask = None
        log2_p_tile = None
        log2_q_tile = None

    # ---- Pass 2, SPEC 1.3: the head boundary w by selection on the probability keys. ---------
    if ON_CHIP:
        keys, masses = _keys_and_masses(tl.exp2(log2_p_tile), row_mask, KEY, MASS, KEY_END,
                                        FIXED_ONE)
        total_mass = tl.sum(masses, 0)
        boundary_bits, tie_limit = _head_of_keys(
            keys, lanes, tl.zeros([], KEY), tl.full([], KEY_END, KEY), tl.zeros([], MASS),
            delta_fixed, delta, ACC, MASS, MANTISSA_BITS, KEY_END, FIXED_ONE)
    else:
        # A histogram pass in octaves, more passes while the boundary bucket holds more than a
        # chunk of classes, then its keys copied to the row's workspace and bisected there.
        buckets = tl.arange(0, RADIX_BUCKETS)
        thresholds = _octave_thresholds(p_max, lse2_p, buckets, RADIX_BUCKETS, KEY, KEY_END,
                                        MANTISSA_BITS)
        masses, uncounted = _histogram(teacher_row, 0, classes, scale, lse2_p, KEY_END,
                                       thresholds, RADIX_BLOCK, False, ACC, KEY, MASS, KEY_END,
                                       FIXED_ONE)
        total_mass = _pick(masses, buckets, 0)
        boundary_bits = tl.zeros([], KEY)
        tie_limit = tl.zeros([], tl.int32)
        if total_mass >= delta_fixed:
            chosen, lo, hi, mass_above = _choose_bucket(masses, thresholds, buckets, KEY_END,
                                                        tl.zeros([], MASS), delta_fixed,
                                                        RADIX_BUCKETS, KEY, MASS)
            keys_row = workspace_ptr + row * (2 * BLOCK)
            count = _compact(teacher_row, 0, classes, scale, lse2_p, lo, hi, keys_row,
                             keys_row + BLOCK, tl.zeros([], tl.int32), BLOCK, BLOCK, ACC, KEY,
                             MASS, KEY_END, FIXED_ONE)
            boundary_bits, tie_limit = _head_of_row(
                teacher_row, classes, scale, lse2_p, lo, hi, mass_above, count, keys_row,
                keys_row + BLOCK, delta_fixed, delta, tl.full([], 1, tl.int1), BLOCK,
                RADIX_BLOCK, RADIX_BUCKETS, ACC, KEY, MASS, KEY_END, MANTISSA_BITS, FIXED_ONE)
    all_head = total_mass < delta_fixed

    # ---- Pass 3, SPEC 1.4-1.6 and 2: every per-row sum. ----------------------------------------
    (d_head, d_tail, fkl, rkl, q_head, q_tail, p_head, p_tail, steps_p_ratio, steps_log_ratio,
     steps_head, steps_tail) = _row_sums(
        row_mask, log2_p_tile, log2_q_tile, teacher_row, student_row, slice_stride, steps, 0,
        classes, scale, scale_q, lse2_p, lse2_q, lse2_steps, step_ids, log2_steps, boundary_bits,
        tie_limit, all_head, BLOCK, ON_CHIP, PROB_MEAN, STEPS_PAD, GRAD_S, GRAD_T, TINY, ACC, KEY)
    # SPEC 1.5-1.6: weights and loss.
    lam_h, lam_t, dl_head, dl_tail = _row_weights(d_head, d_tail, DETACH)
    tl.store(loss_ptr + row, row_scale * (lam_h * fkl + lam_t * rkl))

    # ---- Pass 4, SPEC 2: the gradients of the row's loss. -------------------------------------
    if GRAD_S or GRAD_T:
        _write_gradients(
            row_mask, log2_p_tile, log2_q_tile, teacher_row, student_row,
            d_teacher_row, d_student_row, slice_stride, steps, 0,
            classes, scale, scale_q, lse2_p, lse2_q, lse2_steps, step_ids, log2_steps,
            boundary_bits, tie_limit, all_head, lam_h, lam_t, fkl, rkl,
            dl_head, dl_tail, grad_scale, inv_steps, q_head, q_tail, p_head, p_tail,
            steps_p_ratio, steps_log_ratio, steps_head, steps_tail, BLOCK, ON_CHIP, PROB_MEAN,
            TWO_D, GRAD_S, GRAD_T, TINY, ACC, KEY)


# ---------------------------------------------------------------------------------------------
# The split kernel: few long rows, each split in segments over several programs.
#
# Launched once per phase (grid rows x segments, or rows for phase 4); the phases pass per-row
# partial results through small workspaces, every combination runs over the segments in a fixed
# order (so every program of a row combines to the same bits, and calls repeat them):
#   1. each segment's partial normalisers;
#   2. each segment's octave histogram (exact integer masses and counts);
#   3. the row's bucket holding w from the summed histograms; each segment copies its keys in it,
#      and their class indices, to the row's candidates at its offset (the counts of the
#      segments before it), when the bucket fits the candidates' capacity;
#   4. one program per row: w by bisection over the candidates (else the single-program
#      narrowing and copy over the whole row) and the tie limit (`_head_of_row`);
#   5. each segment's pass-3 sums;
#   6. the row's sums combined; the loss (by the first segment) and each segment's gradients.

# Pass-3 sums per segment: d_head, d_tail, F, R, q_head, q_tail, p_head, p_tail, then 4 vectors
# of STEPS_PAD.
SUMS = tl.constexpr(8)


@triton.jit
def _load_normalisers(normalisers_row, segments, step_ids, STEPS_PAD: tl.constexpr,
                      ACC: tl.constexpr):
    """The row's normalisers from its segments' partial ones (phase 1), merged in order."""
    zero = tl.zeros([], ACC)
    p_max, p_sum, q_max, q_sum = zero + NEG_INF, zero, zero + NEG_INF, zero
    steps_max = tl.zeros([STEPS_PAD], ACC) + NEG_INF
    steps_sum = tl.zeros([STEPS_PAD], ACC)
    for s in range(segments):
        part = normalisers_row + s * (4 + 2 * STEPS_PAD)
        p_max, p_sum = _merge_lse2(p_max, p_sum, tl.load(part), tl.load(part + 1))
        q_max, q_sum = _merge_lse2(q_max, q_sum, tl.load(part + 2), tl.load(part + 3))
        steps_max, steps_sum = _merge_lse2(steps_max, steps_sum, tl.load(part + 4 + step_ids),
                                           tl.load(part + 4 + STEPS_PAD + step_ids))
    return (p_max, p_max + tl.log2(p_sum), q_max + tl.log2(q_sum),
            steps_max + tl.log2(steps_sum))


@triton.jit
def _load_histograms(histograms_row, segments, segment, buckets, RADIX_BUCKETS: tl.constexpr,
                     MASS: tl.constexpr):
    """The row's first histogram (phase 2), summed over its segments, and the counts of the
    segments before `segment`."""
    masses = tl.zeros([RADIX_BUCKETS], MASS)
    counts = tl.zeros([RADIX_BUCKETS], MASS)
    counts_before = tl.zeros([RADIX_BUCKETS], MASS)
    for s in range(segments):
        part = histograms_row + s * (2 * RADIX_BUCKETS)
        masses += tl.load(part + buckets)
        segment_counts = tl.load(part + RADIX_BUCKETS + buckets)
        counts += segment_counts
        counts_before += tl.where(s < segment, segment_counts, 0)
    return masses, counts, counts_before


@triton.jit
def _load_sums(sums_row, segments, step_ids, STEPS_PAD: tl.constexpr, ACC: tl.constexpr):
    """The row's pass-3 sums from its segments' (phase 5), added in order."""
    zero = tl.zeros([], ACC)
    d_head, d_tail, fkl, rkl = zero, zero, zero, zero
    q_head, q_tail, p_head, p_tail = zero, zero, zero, zero
    steps_p_ratio = tl.zeros([STEPS_PAD], ACC)
    steps_log_ratio = tl.zeros([STEPS_PAD], ACC)
    steps_head = tl.zeros([STEPS_PAD], ACC)
    steps_tail = tl.zeros([STEPS_PAD], ACC)
    for s in range(segments):
        part = sums_row + s * (SUMS + 4 * STEPS_PAD)
        d_head += tl.load(part)
        d_tail += tl.load(part + 1)
        fkl += tl.load(part + 2)
        rkl += tl.load(part + 3)
        q_head += tl.load(part + 4)
        q_tail += tl.load(part + 5)
        p_head += tl.load(part + 6)
        p_tail += tl.load(part + 7)
        steps_p_ratio += tl.load(part + SUMS + step_ids)
        steps_log_ratio += tl.load(part + SUMS + STEPS_PAD + step_ids)
        steps_head += tl.load(part + SUMS + 2 * STEPS_PAD + step_ids)
        steps_tail += tl.load(part + SUMS + 3 * STEPS_PAD + step_ids)
    return (d_head, d_tail, fkl, rkl, q_head, q_tail, p_head, p_tail, steps_p_ratio,
            steps_log_ratio, steps_head, steps_tail)


@triton.jit
def _hta_kl_split_kernel(
    student_ptr, teacher_ptr, loss_ptr, d_student_ptr, d_teacher_ptr,
    normalisers_ptr, histograms_ptr, candidates_ptr, selection_ptr, sums_ptr,
    temperature: tl.float64, head_mass: tl.float64, row_scale_in: tl.float64,
    head_mass_fixed, steps, classes, slice_stride, segments, segment_length,
    PHASE: tl.constexpr, PROB_MEAN: tl.constexpr, TWO_D: tl.constexpr, STEPS_PAD: tl.constexpr,
    BLOCK: tl.constexpr, RADIX_BLOCK: tl.constexpr, RADIX_BUCKETS: tl.constexpr,
    DETACH: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, ALIGN: tl.constexpr,
    ACC: tl.constexpr, KEY: tl.constexpr, MASS: tl.constexpr, TOP_BIT: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, FIXED_ONE: tl.constexpr, TINY: tl.constexpr,
):
    if TWO_D:
        steps = 1
    if PHASE == 4:
        row = tl.program_id(0).to(tl.int64)
        segment = 0
    else:
        row = tl.program_id(0).to(tl.int64) // segments
        segment = (tl.program_id(0) % segments).to(tl.int32)
    classes, slice_stride, teacher_row, student_row, d_teacher_row, d_student_row = \
        _row_pointers(row, student_ptr, teacher_ptr, d_student_ptr, d_teacher_ptr, classes,
                      slice_stride, ALIGN)
    begin = segment * segment_length
    end = tl.minimum(begin + segment_length, classes)
    scale, scale_q, delta, delta_fixed, row_scale, grad_scale, inv_steps, log2_steps = \
        _call_constants(temperature, head_mass, head_mass_fixed, row_scale_in, steps, ACC, MASS)
    step_ids = tl.arange(0, STEPS_PAD)
    buckets = tl.arange(0, RADIX_BUCKETS)
    KEY_END: tl.constexpr = 1 << (TOP_BIT + 1)
    normalisers_row = normalisers_ptr + row * segments * (4 + 2 * STEPS_PAD)
    histograms_row = histograms_ptr + row * segments * (2 * RADIX_BUCKETS)
    keys_row = candidates_ptr + row * (2 * BLOCK)
    index_row = keys_row + BLOCK
    # w, the tie limit and whether the whole row is head.
    selection_row = selection_ptr + row * 3
    sums_row = sums_ptr + row * segments * (SUMS + 4 * STEPS_PAD)

    if PHASE == 1:
        p_max, p_sum, q_max, q_sum, steps_max, steps_sum = _normalisers(
            teacher_row, student_row, slice_stride, steps, begin, end, scale, scale_q, step_ids,
            BLOCK, PROB_MEAN, STEPS_PAD, ACC)
        part = normalisers_row + segment * (4 + 2 * STEPS_PAD)
        tl.store(part, p_max)
        tl.store(part + 1, p_sum)
        tl.store(part + 2, q_max)
        tl.store(part + 3, q_sum)
        tl.store(part + 4 + step_ids, steps_max)
        tl.store(part + 4 + STEPS_PAD + step_ids, steps_sum)
    else:
        p_max, lse2_p, lse2_q, lse2_steps = _load_normalisers(normalisers_row, segments,
                                                              step_ids, STEPS_PAD, ACC)
        if PHASE == 2:
            thresholds = _octave_thresholds(p_max, lse2_p, buckets, RADIX_BUCKETS, KEY, KEY_END,
                                            MANTISSA_BITS)
            # counted: each segment's count of the boundary bucket places its copy (phase 3)
            masses, counts = _histogram(teacher_row, begin, end, scale, lse2_p, KEY_END,
                                        thresholds, RADIX_BLOCK, True, ACC, KEY, MASS, KEY_END,
                                        FIXED_ONE)
            part = histograms_row + segment * (2 * RADIX_BUCKETS)
            tl.store(part + buckets, masses)
            tl.store(part + RADIX_BUCKETS + buckets, counts)
        elif PHASE == 3 or PHASE == 4:
            thresholds = _octave_thresholds(p_max, lse2_p, buckets, RADIX_BUCKETS, KEY, KEY_END,
                                            MANTISSA_BITS)
            masses, counts, counts_before = _load_histograms(histograms_row, segments, segment,
                                                             buckets, RADIX_BUCKETS, MASS)
            reaches = _pick(masses, buckets, 0) >= delta_fixed
            chosen, lo, hi, mass_above = _choose_bucket(
                masses, thresholds, buckets, KEY_END, tl.zeros([], MASS), delta_fixed,
                RADIX_BUCKETS, KEY, MASS)
            count = _bucket_count(counts, buckets, chosen)
            copied = reaches & (count <= BLOCK)
            if PHASE == 3:
                if copied:
                    _compact(teacher_row, begin, end, scale, lse2_p, lo, hi, keys_row, index_row,
                             _bucket_count(counts_before, buckets, chosen).to(tl.int32),
                             BLOCK, BLOCK, ACC, KEY, MASS, KEY_END, FIXED_ONE)
            else:
                boundary_bits = tl.zeros([], KEY)
                tie_limit = tl.zeros([], tl.int32)
                if reaches:
                    boundary_bits, tie_limit = _head_of_row(
                        teacher_row, classes, scale, lse2_p, lo, hi, mass_above, count,
                        keys_row, index_row, delta_fixed, delta, copied, BLOCK, RADIX_BLOCK,
                        RADIX_BUCKETS, ACC, KEY, MASS, KEY_END, MANTISSA_BITS, FIXED_ONE)
                tl.store(selection_row, boundary_bits)
                tl.store(selection_row + 1, tie_limit.to(KEY))
                tl.store(selection_row + 2, (~reaches).to(KEY))
        else:
            boundary_bits = tl.load(selection_row)
            tie_limit = tl.load(selection_row + 1).to(tl.int32)
            all_head = tl.load(selection_row + 2) != 0
            if PHASE == 5:
                (d_head, d_tail, fkl, rkl, q_head, q_tail, p_head, p_tail, steps_p_ratio,
                 steps_log_ratio, steps_head, steps_tail) = _row_sums(
                    None, None, None, teacher_row, student_row, slice_stride, steps, begin, end,
                    scale, scale_q, lse2_p, lse2_q, lse2_steps, step_ids, log2_steps,
                    boundary_bits, tie_limit, all_head, BLOCK, False, PROB_MEAN,
                    STEPS_PAD, GRAD_S, GRAD_T, TINY, ACC, KEY)
                part = sums_row + segment * (SUMS + 4 * STEPS_PAD)
                tl.store(part, d_head)
                tl.store(part + 1, d_tail)
                tl.store(part + 2, fkl)
                tl.store(part + 3, rkl)
                tl.store(part + 4, q_head)
                tl.store(part + 5, q_tail)
                tl.store(part + 6, p_head)
                tl.store(part + 7, p_tail)
                tl.store(part + SUMS + step_ids, steps_p_ratio)
                tl.store(part + SUMS + STEPS_PAD + step_ids, steps_log_ratio)
                tl.store(part + SUMS + 2 * STEPS_PAD + step_ids, steps_head)
                tl.store(part + SUMS + 3 * STEPS_PAD + step_ids, steps_tail)
            else:
                (d_head, d_tail, fkl, rkl, q_head, q_tail, p_head, p_tail, steps_p_ratio,
                 steps_log_ratio, steps_head, steps_tail) = _load_sums(sums_row, segments,
                                                                       step_ids, STEPS_PAD, ACC)
                lam_h, lam_t, dl_head, dl_tail = _row_weights(d_head, d_tail, DETACH)
                if segment == 0:
                    tl.store(loss_ptr + row, row_scale * (lam_h * fkl + lam_t * rkl))
                if GRAD_S or GRAD_T:
                    _write_gradients(
                        None, None, None, teacher_row, student_row,
                        d_teacher_row, d_student_row,
                        slice_stride, steps, begin, end, scale, scale_q, lse2_p, lse2_q,
                        lse2_steps, step_ids, log2_steps, boundary_bits, tie_limit, all_head,
                        lam_h, lam_t, fkl, rkl, dl_head, dl_tail, grad_scale,
                        inv_steps, q_head, q_tail, p_head, p_tail, steps_p_ratio,
                        steps_log_ratio, steps_head, steps_tail, BLOCK, False, PROB_MEAN, TWO_D,
                        GRAD_S, GRAD_T, TINY, ACC, KEY)


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
    registers: halved."""
    return (ON_CHIP_LIMIT // 2, CHUNK // 2) if wide else (ON_CHIP_LIMIT, CHUNK)


def _num_warps(block: int, wide: bool) -> int:
    # 4 classes of each row vector per thread (2 in float64 math), up to 16 warps: 8 at the
    # on-chip limit and in a chunk. ptxas' report (hta_kl_aot.py): a row of 1024 on 4 warps
    # takes 128 registers and spills, on 8 warps 80 without spill.
    return max(4, min(16, block // (64 if wide else 128)))


def kernel_constants(wide: bool) -> dict:
    """The constexprs that follow from the accumulation type (float64 when `wide`)."""
    return dict(
        ACC=tl.float64 if wide else tl.float32,
        KEY=tl.int64 if wide else tl.int32,
        # Fixed-point masses: a row's mass (about 1) fits with room for the rounding of C terms.
        MASS=tl.int64 if wide else tl.int32,
        FIXED_ONE=float(2**62 if wide else 2**30),
        # Probabilities are < 2.0 (0x4000... / 0x4000_0000): keys have TOP_BIT + 1 bits.
        TOP_BIT=61 if wide else 29,
        MANTISSA_BITS=52 if wide else 23,
        # Below this a sum of the steps' q_t may have lost terms to underflow.
        TINY=2.0**-900 if wide else 2.0**-100,
    )


def row_alignment(classes: int) -> int:
    """The kernels' ALIGN: the largest power of two up to 16 that divides C (and so every row's
    start and the student's step stride, in elements)."""
    return math.gcd(classes, 16)


def head_mass_fixed(delta: float, wide: bool) -> int:
    """delta in the kernel's fixed point, at least one unit."""
    return max(1, round(delta * (2**62 if wide else 2**30)))


def default_segments(rows: int, classes: int, chunk: int, device: torch.device) -> int:
    """Segments per chunked row on `device` (`split_segments`); 1 off a GPU."""
    if device.type != "cuda":
        return 1
    return split_segments(rows, classes, chunk,
                          torch.cuda.get_device_properties(device).multi_processor_count)


def split_segments(rows: int, classes: int, chunk: int, processors: int) -> int:
    """Segments per chunked row: when there are fewer rows than multiprocessors, each row is split
    over several programs (segments of whole chunks), about two programs per multiprocessor. With
    more rows every multiprocessor is busy anyway, and one program's passes over its row may hit
    L2 where a split row's phases, each a launch of its own, re-read it from memory."""
    if rows >= processors:
        return 1
    return max(1, min(-(-2 * processors // rows), -(-classes // chunk)))


def segment_length(classes: int, segments: int, chunk: int) -> int:
    """Classes per segment: the row split in `segments`, rounded up to whole chunks (so fewer
    segments may cover the row: -(-classes // segment_length) of them)."""
    return -(-(-(-classes // segments)) // chunk) * chunk


def launch_hta_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, delta: float,
                  logit_mean: bool, detach_weights: bool, grad_student: bool, grad_teacher: bool,
                  row_scale: float = 1.0, *, on_chip_limit: int | None = None,
                  chunk: int | None = None, radix_block: int | None = None,
                  segments: int | None = None):
    """Run the kernel; same arguments and results as the op, plus the layout knobs.

    `on_chip_limit`: the longest row (in classes) held on chip; longer rows take the chunked path
    in chunks of `chunk` classes (both powers of two; defaults: `default_layout`), each of those
    rows split over up to `segments` programs (default: `default_segments`).
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
    if segments is not None and segments < 1:
        raise ValueError(f"hta_kl_fused_triton: segments must be >= 1, got {segments}")
    if on_chip:
        segments = 1
    elif segments is None:
        segments = default_segments(rows, classes, chunk, teacher.device)
    length = segment_length(classes, segments, chunk)
    segments = -(-classes // length)
    steps_pad = triton.next_power_of_2(steps)
    key_dtype = torch.int64 if wide else torch.int32
    device = teacher.device
    options = dict(
        PROB_MEAN=steps > 1 and not logit_mean, TWO_D=steps == 1, STEPS_PAD=steps_pad,
        BLOCK=block, RADIX_BLOCK=radix_block, RADIX_BUCKETS=1 << RADIX_BITS,
        DETACH=detach_weights, GRAD_S=grad_student, GRAD_T=grad_teacher,
        ALIGN=row_alignment(classes), num_warps=_num_warps(block, wide), **kernel_constants(wide))
    scalars = (float(temperature), float(delta), float(row_scale), head_mass_fixed(delta, wide),
               steps, classes, rows * classes)
    if segments == 1:
        # The chunked path's boundary candidates: a chunk of keys and their class indices
        # per row.
        workspace = torch.empty((0 if on_chip else rows * 2 * chunk), dtype=key_dtype,
                                device=device)
        torch.library.wrap_triton(_hta_kl_kernel)[(rows,)](
            student, teacher, loss_rows, d_student, d_teacher, workspace, *scalars,
            ON_CHIP=on_chip, **options)
        return loss_rows, d_student, d_teacher
    # The split kernel's workspaces (see its phases): per segment, partial normalisers, first
    # histogram and pass-3 sums; per row, a chunk of candidate keys and their class indices, and
    # the selection.
    normalisers = torch.empty(rows * segments * (4 + 2 * steps_pad), dtype=acc_dtype,
                              device=device)
    histograms = torch.empty(rows * segments * 2 * (1 << RADIX_BITS), dtype=key_dtype,
                             device=device)
    candidates = torch.empty(rows * 2 * chunk, dtype=key_dtype, device=device)
    selection = torch.empty(rows * 3, dtype=key_dtype, device=device)
    sums = torch.empty(rows * segments * (SUMS.value + 4 * steps_pad), dtype=acc_dtype,
                       device=device)
    kernel = torch.library.wrap_triton(_hta_kl_split_kernel)
    for phase in range(1, 7):
        kernel[(rows if phase == 4 else rows * segments,)](
            student, teacher, loss_rows, d_student, d_teacher, normalisers, histograms,
            candidates, selection, sums, *scalars, segments, length, PHASE=phase,
            **options)
    return loss_rows, d_student, d_teacher


@torch.library.triton_op("htakl::hta_kl_fused_triton", mutates_args=(), schema=HTA_KL_SCHEMA)
def hta_kl_fused_triton(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                        delta: float, logit_mean: bool, detach_weights: bool, grad_student: bool,
                        grad_teacher: bool,
                        row_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with on_device_of(teacher):
        return launch_hta_kl(student, teacher, temperature, delta, logit_mean, detach_weights,
                             grad_student, grad_teacher, row_scale)


register_hta_kl_op(hta_kl_fused_triton)
