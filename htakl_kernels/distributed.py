"""Vocab-parallel HTA-KL: the class dimension split across the ranks of a process group.

With tensor parallelism (Megatron-LM's vocab-parallel classifier head), every rank holds a
contiguous slice of every row's classes, ranks in group order (rank 0 the first classes); slices
may differ in size and a rank may hold none. `hta_kl_div(..., group=g)` then returns on every rank
the loss of the whole rows, and each rank's backward writes the gradient of its own slices. No
rank ever sees a whole row: the ranks exchange per-row statistics only.

**The phases of one call** (docs/SPEC.md sections 1-2 on the slices; `R` rows, `T` student steps,
`S` student softmaxes: `T` for a `prob_mean` time input with `T > 1`, else 1):

0. Agreement: every rank contributes one fixed vector (its row count, steps, dtype, options, class
   count, and whether its own arguments passed the checks). A rank whose arguments fail, or
   options that differ between ranks, raise on *every* rank (the failing rank's own error, the
   others an error naming it); nothing waits on a rank that gave up.
1. Log-sum-exp (SPEC 1.1-1.2): the row maxima of the teacher and of each student softmax, then
   the sums of the shifted exponentials (in float64).
2. Head selection (SPEC 1.3) without a sort: a radix select over the bits of `p` (8-bit digits,
   most significant first), whose bucket masses are exact fixed-point integers (`p * 2**62`
   truncated), so that their sum over the ranks is exact and independent of how the classes are
   split. The boundary's ties are resolved by global class index: each rank learns how many tied
   classes the ranks before it hold.
3. Row sums (SPEC 1.4-1.6 and the class sums of SPEC 2): the head and tail distances, `F`, `R`,
   the signed sums behind `sum_j q_j dl_j` and `sum_j p_j dl_j`, and for `prob_mean` four sums
   per step.
4. Gradients (SPEC 2) of the local slices, from the row scalars: no communication; computed in
   the forward, as the fused kernels do, and scaled by the incoming gradient in the backward.

**Collectives per call** and the bytes each rank contributes per row (`b` = 8 for float64 inputs,
4 otherwise; the selection's digits run over the 31 bits of a float32 `p`, or the 63 of a float64
one):

| phase | collective | per row |
|---|---|---|
| 0 | all_gather, int64 (per call, not per row) | 13 x 8 bytes in all |
| 1 | all_reduce MAX | `(1 + S) b` |
| 1 | all_reduce SUM, float64 | `(1 + S) 8` |
| 2 | all_reduce SUM, int64, once per digit: 4 (float32 p) or 8 (float64 p) | `256 x 8` (last digit `128 x 8`) |
| 2 | all_gather, int64 (tie count) | 8 |
| 3 | all_reduce SUM | `(8 + 4 T') b`, `T'` = T for `prob_mean` with T > 1, else 0 |

That is 9 collectives for float32/16-bit inputs and 13 for float64, whatever `C`. A rank passes
7,176 bytes per float32 row to the selection (15,368 per float64 row) and 56 bytes to the rest
for a 2-D float32 student (`Traffic` counts them). An all_reduce of `n` bytes sends about
`2 n (P - 1) / P` per rank in a ring; an all_gather sends `n (P - 1)`.
A group of one rank, or `group=None`, is the plain single-device call.

**Through the classifier heads.** `fused_linear_hta_kl_div(..., group=g)` (and the fused
SpikingKD loss) make one agreement per call (phase 0, its own fields), phases 1-4 once per
chunk of rows on each rank's slice of the heads' output rows (`vocab_parallel_rows`, and
`cross_entropy_rows`' two all_reduces), and one all_reduce of the input gradients after the
chunk loop (`htakl_kernels/fused_linear.py`).

**Backends.** On a group of two or more ranks every phase runs as PyTorch tensor ops on the
inputs' device (CPU or CUDA), vectorized over rows and classes: the fused kernels compute a whole
row in one pass and have no entry point for the split phases. `backend` is still checked (it must
be available for the inputs' device) but selects no kernel there. Gloo (CPU tensors; CUDA tensors
are moved to the CPU for the collectives) and NCCL (CUDA tensors) both work.

**Agreement with one device.** The head is the same set of classes as the single-device kernels'
on the concatenated rows (ties by global class index) wherever SPEC 1, *Rounding at the head
boundary* leaves no doubt; the loss and gradients agree to rounding (the log-sum-exp's sums are
added in another order).
"""

from __future__ import annotations

import math
import struct

import torch
import torch.distributed as dist

from ._backends import resolve_backend
from ._library import accumulation_dtype
from .reference.hta_kl import head_mask
from ._validation import (ROW_REDUCTIONS, TIME_REDUCTIONS, HtaKlShape, check_choice,
                          check_first_order_backward, check_hta_kl_args)

# Fixed-point scale of the selection's masses: p <= 1 (up to rounding), so a row's total stays
# far below 2**63 even after float32 rounding of every p.
_MASS_BITS = 62
_DIGIT_BITS = 8
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_CROSS_ENTROPY_REDUCTIONS = ("mean", "sum", "none")  # F.cross_entropy's
_AGREEMENT_FIELDS = ("rows", "rows shape", "steps", "time input", "dtype", "temperature", "delta",
                     "time_reduction", "detach_weights", "reduction", "weight")


def is_parallel(group) -> bool:
    """Whether `group` asks for the vocab-parallel path: a process group of two or more ranks.
    None, or a group of one rank, is the single-device call."""
    if group is None:
        return False
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "group was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first (or pass group=None)")
    return dist.get_world_size(group) > 1


class Traffic:
    """Counts the collectives this module issues in this process and the bytes this rank
    contributes to them (the tensor it passes in), while one is active:

        with Traffic() as traffic:
            loss = hta_kl_div(..., group=group)
        traffic.collectives, traffic.bytes, traffic.sent_bytes(group_size)
    """

    _active: list["Traffic"] = []

    def __init__(self) -> None:
        self.collectives = 0
        self.bytes = 0
        self.gathered_bytes = 0  # the part passed to all_gathers

    def sent_bytes(self, ranks: int) -> float:
        """What this rank sends under the ring algorithms: 2 n (P - 1) / P for an all_reduce of n
        bytes, n (P - 1) for an all_gather of n bytes per rank."""
        reduced = self.bytes - self.gathered_bytes
        return 2 * reduced * (ranks - 1) / ranks + self.gathered_bytes * (ranks - 1)

    def __enter__(self) -> "Traffic":
        Traffic._active.append(self)
        return self

    def __exit__(self, *_exception) -> None:
        Traffic._active.remove(self)

    @classmethod
    def record(cls, tensor: torch.Tensor, gathered: bool) -> None:
        size = tensor.numel() * tensor.element_size()
        for traffic in cls._active:
            traffic.collectives += 1
            traffic.bytes += size
            traffic.gathered_bytes += size if gathered else 0


class CollectiveGroup:
    """A process group and the device its collectives take tensors on."""

    def __init__(self, group) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        uses_nccl = "nccl" in str(dist.get_backend(group)).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if uses_nccl else torch.device("cpu")

    def all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        moved = tensor.to(self.device).contiguous()
        Traffic.record(moved, gathered=False)
        dist.all_reduce(moved, op=op, group=self.group)
        return moved.to(tensor.device)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[size, *tensor.shape], rank order."""
        moved = tensor.to(self.device).contiguous()
        Traffic.record(moved, gathered=True)
        gathered = moved.new_empty(self.size * moved.numel())
        dist.all_gather_single(gathered, moved.reshape(-1), group=self.group)
        return gathered.reshape(self.size, *moved.shape).to(tensor.device)


def float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def shape_code(shape) -> int:
    """A fingerprint of the rows' shape (reduction="none" returns it)."""
    code = len(shape)
    for size in shape:
        code = (code * 1000003 + int(size)) % (1 << 61)
    return code


def integer_fingerprint(values: torch.Tensor) -> int:
    """A cheap fingerprint of an integer (or bool) tensor's values, for the agreement: ranks that
    must pass the same labels or row mask compare these."""
    flat = values.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64, device=flat.device)
    return int(((flat % 1000003) * weights).sum()) if flat.numel() else 0


def agree(group: CollectiveGroup, check, names: tuple[str, ...] = _AGREEMENT_FIELDS,
          caller: str = "hta_kl_div") -> tuple[object, torch.Tensor]:
    """Run `check()` (argument checks, returning (result, fields, classes), one int64 field per
    entry of `names`) on this rank and make every rank agree: a failure on any rank raises on all
    of them, as does a field that differs from rank 0's. Returns `check`'s result and the class
    count of every rank, in rank order. `caller` names the public function in the messages."""
    error = None
    try:
        result, fields, classes = check()
        vector = [0, classes, *fields]
    except (TypeError, ValueError, RuntimeError) as caught:
        error, result = caught, None
        vector = [1, 0] + [0] * len(names)
    table = group.all_gather(torch.tensor(vector, dtype=torch.int64)).cpu()
    failed = [rank for rank in range(group.size) if table[rank, 0] != 0]
    if failed:
        # Every rank knows that some rank failed, so every rank joins this exchange of messages.
        messages = [None] * group.size
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}",
                               group=group.group)
        if error is not None:
            raise error
        first = failed[0]
        raise ValueError(f"rank {first} of the group rejected its arguments to the vocab-parallel "
                         f"{caller}: {messages[first]}")
    for column, name in enumerate(names, start=2):
        differing = [rank for rank in range(group.size) if table[rank, column] != table[0, column]]
        if differing:
            raise ValueError(
                f"the vocab-parallel {caller} needs the same {name} on every rank of the group: "
                f"rank {differing[0]} differs from rank 0 (every rank passes the same rows and "
                f"options, and its own slice of the classes)")
    classes = table[:, 1]
    if int(classes.sum()) < 1:
        raise ValueError(f"the vocab-parallel {caller} needs at least one class over the group: "
                         f"every rank passed C=0")
    return result, classes


def _local_max(x: torch.Tensor) -> torch.Tensor:
    """Each row's maximum over this rank's slice, -inf for an empty slice. NaN stays out of the
    MAX (reductions need not propagate it); it reaches every rank through the sums of
    exponentials that follow instead."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], -math.inf)
    return torch.where(x.isnan(), -math.inf, x).amax(dim=-1)


def _softmaxes(streams: list[torch.Tensor], group: CollectiveGroup, inv_tau: float):
    """SPEC 1.1-1.2 over the whole rows for each of `streams` ([K, R, c] each: the teacher, the
    student's softmaxes), two collectives for all of them: per stream, the log softmax and
    softmax of the local slices and each row's log-sum-exp [K, R]."""
    counts = [x.shape[0] for x in streams]
    row_max = group.all_reduce(torch.cat([_local_max(x) for x in streams]), dist.ReduceOp.MAX)
    shifted = [(x - m.unsqueeze(-1)) * inv_tau for x, m in zip(streams, row_max.split(counts))]
    exponentials = [torch.exp(x) for x in shifted]
    sums = group.all_reduce(torch.cat([e.sum(dim=-1, dtype=torch.float64) for e in exponentials]),
                            dist.ReduceOp.SUM)
    results = []
    for x, e, total in zip(shifted, exponentials, sums.split(counts)):
        log_sum = torch.log(total).to(x.dtype)
        results.append((x - log_sum.unsqueeze(-1), e * torch.exp(-log_sum).unsqueeze(-1), log_sum))
    return results


def _head(p: torch.Tensor, invalid_rows: torch.Tensor, delta: float, group: CollectiveGroup) -> torch.Tensor:
    """SPEC 1.3 membership [R, c] of the local classes, by a radix select over the whole rows.

    Keys are the bit patterns of p (non-negative floats order like their bits); masses are p in
    fixed point, so the histograms add up exactly over the ranks. The first digit runs over every
    class; the later ones only over the classes left in the chosen buckets (gathered into a flat
    list, in row-major order, so ascending class index within a row). `invalid_rows` (NaN rows)
    get an empty head, as in the kernels."""
    key_bits = 31 if p.dtype == torch.float32 else 63
    integer = torch.int32 if p.dtype == torch.float32 else torch.int64
    rows, local_classes = p.shape
    valid = ~p.isnan()
    keys = torch.where(valid, p.view(integer), 0).to(torch.int64)
    scale = float(2 ** _MASS_BITS)
    # mass < delta  <=>  fixed-point mass < ceil(delta * 2**62), exactly
    threshold = math.ceil(float(delta) * scale)
    prefix = keys.new_zeros(rows)
    mass_above = keys.new_zeros(rows)

    def choose(histogram, width):
        """The boundary digit of every row from the group's histogram [R, 2**width]: the highest
        digit whose mass at or above it reaches delta."""
        nonlocal prefix, mass_above
        histogram = group.all_reduce(histogram, dist.ReduceOp.SUM)
        at_or_above = histogram.flip(1).cumsum(1).flip(1) + mass_above.unsqueeze(1)
        reached = (at_or_above >= threshold).sum(dim=1)
        # Past the first digit it is always reached: the chosen bucket's exact mass is split
        # among its sub-buckets.
        chosen = (reached - 1).clamp(min=0).unsqueeze(1)
        mass_above = (at_or_above.gather(1, chosen) - histogram.gather(1, chosen)).squeeze(1)
        prefix = (prefix << width) | chosen.squeeze(1)
        return reached

    width = min(_DIGIT_BITS, key_bits)
    remaining = key_bits - width
    first_digits = keys >> remaining
    masses = torch.floor(torch.where(valid, p, 0).to(torch.float64) * scale).to(torch.int64)
    whole_row_in_head = choose(keys.new_zeros(rows, 1 << width).scatter_add_(1, first_digits, masses),
                               width) == 0
    candidate_row, candidate_class = (first_digits == prefix.unsqueeze(1)).nonzero(as_tuple=True)
    candidate_keys = keys[candidate_row, candidate_class]
    candidate_masses = masses[candidate_row, candidate_class]
    while remaining > 0:
        width = min(_DIGIT_BITS, remaining)
        shift = remaining - width
        still = (candidate_keys >> remaining) == prefix[candidate_row]
        slots = candidate_row * (1 << width) + ((candidate_keys >> shift) & ((1 << width) - 1))
        histogram = keys.new_zeros(rows << width).scatter_add_(
            0, slots, torch.where(still, candidate_masses, 0))
        choose(histogram.view(rows, 1 << width), width)
        remaining = shift
    tied = (candidate_keys == prefix[candidate_row]) & valid[candidate_row, candidate_class]
    local_ties = keys.new_zeros(rows).index_add_(0, candidate_row, tied.to(torch.int64))
    tie_counts = group.all_gather(local_ties)  # [ranks, R]
    tied_before = tie_counts[:group.rank].sum(dim=0)
    boundary_value = prefix.to(integer).view(p.dtype).to(torch.float64)
    boundary_mass = torch.floor(boundary_value * scale).to(torch.int64).clamp(min=1)
    # SPEC 1.3's r = #{k >= 1 : mass_above + k w < delta} = ceil((delta - mass_above) / w) - 1,
    # in exact integers (no product k w that could overflow)
    room = threshold - mass_above
    tied_in_head = (-torch.div(-room, boundary_mass, rounding_mode="floor") - 1).clamp(min=0)
    tied_in_head = torch.minimum(tied_in_head, tie_counts.sum(dim=0))
    # position of each tied candidate among its row's ties on this rank (candidates are in
    # row-major order), then among the whole row's
    running = tied.to(torch.int64).cumsum(0)
    row_start = torch.cumsum(local_ties, 0) - local_ties
    position = running - 1 - row_start[candidate_row] + tied_before[candidate_row]
    head = keys > prefix.unsqueeze(1)
    head[candidate_row, candidate_class] |= tied & (position < tied_in_head[candidate_row])
    head |= whole_row_in_head.unsqueeze(1)
    return head & ~invalid_rows.unsqueeze(1)


def _where_positive(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` where x > 0, else 0 (SPEC 1.6: a term whose leading factor is zero is zero)."""
    return torch.where(x > 0, value, torch.zeros_like(value))


def vocab_parallel_rows(student: torch.Tensor, teacher: torch.Tensor, group: CollectiveGroup, *,
                        temperature: float, delta: float, logit_mean: bool, detach_weights: bool,
                        row_scale: float, grad_student: bool, grad_teacher: bool):
    """The fused op's contract (htakl_kernels/_ops/hta_kl.py) over the group: student [T, R, c],
    teacher [R, c] (local slices) -> (row_scale * loss_row [R] of the whole rows, the same on
    every rank, and the gradients of the local slices or None). Every rank of the group must make
    the same call (same R, T and options)."""
    # The statistics keep the accumulation dtype: autocast would run their batched product in
    # 16 bits.
    with torch.autocast(student.device.type, enabled=False):
        return _rows(student, teacher, group, temperature=temperature, delta=delta,
                     logit_mean=logit_mean, detach_weights=detach_weights, row_scale=row_scale,
                     grad_student=grad_student, grad_teacher=grad_teacher)


def _rows(student, teacher, group, *, temperature, delta, logit_mean, detach_weights, row_scale,
          grad_student, grad_teacher):
    steps = student.shape[0]
    acc = accumulation_dtype(teacher.dtype)
    inv_tau = 1.0 / temperature
    prob_mean = steps > 1 and not logit_mean
    student_acc = student.to(acc)
    if steps > 1 and logit_mean:
        student_acc = student_acc.mean(dim=0, keepdim=True)
    (log_p, p, log_sum_p), (log_q_steps, q_steps, _) = _softmaxes(
        [teacher.to(acc).unsqueeze(0), student_acc], group, inv_tau)
    log_p, p = log_p[0], p[0]
    if prob_mean:
        # SPEC 1.2: log q = logsumexp_t(log q_t) - log T; a class at -inf at every step has q = 0.
        q = q_steps.mean(dim=0)
        never = torch.isneginf(log_q_steps).all(dim=0)
        log_q = torch.where(never, -math.inf,
                            torch.logsumexp(torch.where(never, 0.0, log_q_steps), dim=0)
                            - math.log(steps))
        # q_tk / q_k in [0, T], as a ratio of exponentials, never a division by a tiny q_k
        ratio = _where_positive(q_steps, torch.exp(log_q_steps - log_q))
    else:
        q, log_q = q_steps[0], log_q_steps[0]

    head = _head(p, log_sum_p[0].isnan(), delta, group)
    distance = (p - q).abs()
    sign = torch.sign(q - p)
    # Head and tail sums of the split quantities in one batched product with [head, tail] masks
    # (x * 1 and x * 0 are exact, so each sum holds exactly its side's terms).
    split = [distance, q * sign, p * sign]
    if prob_mean:
        split += list(q_steps * sign)
    head_f = head.to(acc)
    sides = torch.bmm(torch.stack(split, dim=1), torch.stack([head_f, 1 - head_f], dim=2))
    sums = [sides[:, 0, 0], sides[:, 0, 1],
            _where_positive(p, p * (log_p - log_q)).sum(-1), _where_positive(q, q * (log_q - log_p)).sum(-1),
            sides[:, 1, 0], sides[:, 1, 1], sides[:, 2, 0], sides[:, 2, 1]]
    if prob_mean:
        sums += [(p * ratio).sum(-1), _where_positive(q_steps, q_steps * (log_q - log_p + 1)).sum(-1),
                 sides[:, 3:, 0].T, sides[:, 3:, 1].T]
    totals = group.all_reduce(torch.cat([s.reshape(-1, p.shape[0]) for s in sums]).T.contiguous(),
                              dist.ReduceOp.SUM).T
    d_head, d_tail, fkl, rkl, q_head, q_tail, p_head, p_tail = totals[:8]

    # SPEC 1.5-1.6
    total = d_head + d_tail
    vanished = total == 0
    safe_total = torch.where(vanished, 1.0, total)
    lam_h = torch.where(vanished, 0.5, d_head / safe_total)
    lam_t = torch.where(vanished, 0.5, d_tail / safe_total)
    loss_rows = row_scale * (lam_h * fkl + lam_t * rkl)
    if not (grad_student or grad_teacher):
        return loss_rows, None, None

    # SPEC 2, with d_tail / Sg^2 formed as lam_t / Sg (Sg^2 may underflow)
    if detach_weights:
        dl_head = dl_tail = torch.zeros_like(total)
    else:
        dl_head = torch.where(vanished, 0.0, lam_t / safe_total)
        dl_tail = torch.where(vanished, 0.0, -lam_h / safe_total)
    column = lambda row_values: row_values.unsqueeze(-1)  # noqa: E731  [R] -> [R, 1]
    dl = sign * torch.where(head, column(dl_head), column(dl_tail))
    scale = row_scale * inv_tau
    gap = column(fkl - rkl)
    lam_h_, lam_t_, fkl_, rkl_ = column(lam_h), column(lam_t), column(fkl), column(rkl)
    d_teacher = None
    if grad_teacher:
        sum_p_dl = column(dl_head * p_head + dl_tail * p_tail)
        d_teacher = scale * (lam_h_ * _where_positive(p, p * (log_p - log_q - fkl_))
                             + lam_t_ * (p - q) - gap * p * (dl - sum_p_dl))
        d_teacher = d_teacher.to(teacher.dtype)
    d_student = None
    if grad_student:
        if prob_mean:
            step_sums = totals[8:].reshape(4, steps, -1)
            g_sum = (-lam_h * step_sums[0] + lam_t * step_sums[1]
                     + (fkl - rkl) * (dl_head * step_sums[2] + dl_tail * step_sums[3]))
            q_t_g = (-lam_h_ * p * ratio
                     + lam_t_ * _where_positive(q_steps, q_steps * (log_q - log_p + 1))
                     + gap * q_steps * dl)
            d_student = (scale / steps) * (q_t_g - q_steps * g_sum.unsqueeze(-1))
        else:
            sum_q_dl = column(dl_head * q_head + dl_tail * q_tail)
            d_student = (scale / steps) * (lam_h_ * (q - p)
                                           + lam_t_ * _where_positive(q, q * (log_q - log_p - rkl_))
                                           + gap * q * (dl - sum_q_dl))
            d_student = d_student.unsqueeze(0).expand(steps, -1, -1)
        d_student = d_student.to(student.dtype)
    return loss_rows, d_student, d_teacher


class _VocabParallelHtaKl(torch.autograd.Function):
    """Loss rows of the whole rows; the backward scales the local gradients computed in the
    forward (no communication in the backward)."""

    @staticmethod
    def forward(ctx, student, teacher, group, options, row_scale, grad_student, grad_teacher):
        loss_rows, d_student, d_teacher = vocab_parallel_rows(
            student, teacher, group, row_scale=row_scale, grad_student=grad_student,
            grad_teacher=grad_teacher, **options)
        ctx.save_for_backward(d_student, d_teacher)
        return loss_rows

    @staticmethod
    def backward(ctx, grad_rows):
        check_first_order_backward("hta_kl_div")
        d_student, d_teacher = ctx.saved_tensors
        grad_student = None if d_student is None else d_student * grad_rows.to(d_student.dtype).view(1, -1, 1)
        grad_teacher = None if d_teacher is None else d_teacher * grad_rows.to(d_teacher.dtype).view(-1, 1)
        return grad_student, grad_teacher, None, None, None, None, None


def _check_slice(student, teacher, temperature, delta, time_reduction, detach_weights, reduction,
                 backend) -> HtaKlShape:
    """check_hta_kl_args for a slice that may hold no class (C = 0 on this rank)."""
    no_classes = [isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == 0
                  for x in (student, teacher)]
    if all(no_classes):
        # The checks on one-class stand-ins of the same leading shapes: only C differs.
        shape = check_hta_kl_args(student.new_empty((*student.shape[:-1], 1)),
                                  teacher.new_empty((*teacher.shape[:-1], 1)), temperature, delta,
                                  time_reduction, detach_weights, reduction)
        shape = shape._replace(classes=0)
    else:
        shape = check_hta_kl_args(student, teacher, temperature, delta, time_reduction,
                                  detach_weights, reduction)
    resolve_backend(backend, teacher.device)
    return shape


def vocab_parallel_hta_kl_div(student, teacher, *, group, weight: float, temperature: float,
                              delta: float, time_reduction: str, detach_weights: bool,
                              reduction: str, backend: str) -> torch.Tensor:
    """`weight * hta_kl_div(...)` over a process group of two or more ranks, each passing its own
    slice of the classes (see the module docstring)."""
    comm = CollectiveGroup(group)

    def check():
        shape = _check_slice(student, teacher, temperature, delta, time_reduction, detach_weights,
                             reduction, backend)
        fields = [shape.rows, shape_code(shape.rows_shape), shape.steps, int(shape.time_input),
                  DTYPE_CODES[teacher.dtype], float_bits(temperature), float_bits(delta),
                  TIME_REDUCTIONS.index(time_reduction), int(detach_weights),
                  ROW_REDUCTIONS.index(reduction), float_bits(weight)]
        return shape, fields, shape.classes

    shape, _classes = agree(comm, check)
    logit_mean = shape.time_input and time_reduction == "logit_mean"
    if shape.rows == 0:  # every rank agrees: no row, no collective
        loss_rows = teacher.new_zeros(0, dtype=accumulation_dtype(teacher.dtype)) + 0 * student.sum()
    else:
        row_scale = shape.row_scale(reduction, weight)
        grad_enabled = torch.is_grad_enabled()
        loss_rows = _VocabParallelHtaKl.apply(
            student.reshape(shape.steps, shape.rows, shape.classes),
            teacher.reshape(shape.rows, shape.classes), comm,
            dict(temperature=float(temperature), delta=float(delta), logit_mean=logit_mean,
                 detach_weights=detach_weights),
            row_scale, grad_enabled and student.requires_grad, grad_enabled and teacher.requires_grad)
    loss = loss_rows.reshape(shape.rows_shape) if reduction == "none" else loss_rows.sum()
    return loss.to(student.dtype)


def vocab_parallel_head_mask(teacher: torch.Tensor, *, temperature: float, delta: float,
                             group) -> torch.Tensor:
    """SPEC 1.3's head membership of this rank's classes (a bool tensor shaped like `teacher`,
    this rank's slice of the classes), the same classes a single device finds on the whole rows.
    Costs the log-sum-exp's two all_reduces and the selection's collectives (module docstring);
    with group=None or a group of one rank, the single device's membership."""
    if not is_parallel(group):
        probabilities = torch.softmax(teacher.to(accumulation_dtype(teacher.dtype)) / temperature, -1)
        return head_mask(probabilities, delta)
    comm = CollectiveGroup(group)

    def check():
        shape = _check_slice(teacher, teacher, temperature, delta, "prob_mean", False, "sum", "auto")
        fields = [shape.rows, shape_code(shape.rows_shape), 1, 0, DTYPE_CODES[teacher.dtype],
                  float_bits(temperature), float_bits(delta), 0, 0, 0, 0]
        return shape, fields, shape.classes

    shape, _classes = agree(comm, check)
    rows = teacher.reshape(1, shape.rows, shape.classes).to(accumulation_dtype(teacher.dtype))
    [(_log_p, p, log_sum_p)] = _softmaxes([rows], comm, 1.0 / temperature)
    return _head(p[0], log_sum_p[0].isnan(), delta, comm).reshape(teacher.shape)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, group: CollectiveGroup,
                       first_class: int, ignore_index: int, row_scale: float):
    """`row_scale x` the cross-entropy of each row of `logits` [R, c] (this rank's slice of the
    classes, starting at global class `first_class`; `labels` [R] global), `log sum_j exp(x_j) -
    x_label` with the label's logit found on the rank that holds it, and its gradient with
    respect to the local slice (0 on rows whose label is `ignore_index`), both in the
    accumulation dtype. Two all_reduces: the row maxima, then the sums of exponentials and the
    picked logits together."""
    acc = accumulation_dtype(logits.dtype)
    x = logits.to(acc)
    row_max = group.all_reduce(_local_max(x), dist.ReduceOp.MAX)
    local_label = labels - first_class
    here = (local_label >= 0) & (local_label < x.shape[-1])
    picked = torch.where(
        here, x.gather(1, local_label.clamp(0, max(x.shape[-1] - 1, 0)).unsqueeze(1)).squeeze(1)
        if x.shape[-1] > 0 else torch.zeros_like(row_max), 0.0)
    exponentials = torch.exp(x - row_max.unsqueeze(1))
    sums = group.all_reduce(torch.stack([exponentials.sum(-1, dtype=torch.float64),
                                         picked.to(torch.float64)], dim=1), dist.ReduceOp.SUM)
    log_sum = torch.log(sums[:, 0]).to(acc)
    counted = labels != ignore_index
    loss_rows = torch.where(counted, row_scale * (log_sum + row_max - sums[:, 1].to(acc)), 0.0)
    # d loss_row / d x = softmax - one_hot(label), zero for an ignored row
    gradient = exponentials * torch.exp(-log_sum).unsqueeze(1)
    if x.shape[-1] > 0:
        gradient.scatter_add_(1, local_label.clamp(0, x.shape[-1] - 1).unsqueeze(1),
                              -here.to(acc).unsqueeze(1))
    return loss_rows, torch.where(counted.unsqueeze(1), row_scale * gradient, 0.0)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy rows of logits split over the classes (cross_entropy_rows); the backward
    scales the gradient computed in the forward."""

    @staticmethod
    def forward(ctx, logits, labels, group, first_class, ignore_index, row_scale):
        loss_rows, gradient = cross_entropy_rows(logits, labels, group, first_class, ignore_index,
                                                 row_scale)
        ctx.save_for_backward(gradient.to(logits.dtype))
        return loss_rows

    @staticmethod
    def backward(ctx, grad_rows):
        check_first_order_backward("vocab_parallel_cross_entropy")
        (gradient,) = ctx.saved_tensors
        return gradient * grad_rows.to(gradient.dtype).unsqueeze(1), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, group,
                                 reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """`F.cross_entropy(whole_logits, labels, reduction=..., ignore_index=...)` where each rank of
    `group` holds a contiguous slice of the classes of `logits` [..., c] (rank order) and the same
    `labels` (global class indices, shape `logits.shape[:-1]`). Every rank gets the loss; each
    backward writes the gradient of its own slice. Three collectives: a small agreement
    all_gather, then two all_reduces of 8 and 16 bytes per row (float64 and 16-bit inputs: 8 and
    16 too, the maxima in the accumulation dtype, 4 bytes for float32)."""
    comm = CollectiveGroup(group)

    def check():
        if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
            raise TypeError("logits must be a tensor with a class dimension")
        if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:-1]:
            raise ValueError(f"labels must be a tensor of the logits' row shape "
                             f"{tuple(logits.shape[:-1])}")
        check_choice("reduction", reduction, _CROSS_ENTROPY_REDUCTIONS)
        flat = labels.reshape(-1).to(torch.int64)
        fields = [flat.numel(), shape_code(labels.shape), 1, 0, DTYPE_CODES[logits.dtype], 0, 0,
                  0, 0, _CROSS_ENTROPY_REDUCTIONS.index(reduction), integer_fingerprint(flat)]
        return flat, fields, logits.shape[-1]

    flat, classes = agree(comm, check)
    total = int(classes.sum())
    counted = flat != ignore_index
    if bool(((flat[counted] < 0) | (flat[counted] >= total)).any()):
        raise ValueError(f"labels must lie in [0, {total}) (the classes over the group) or equal "
                         f"ignore_index={ignore_index}")
    rows = flat.numel()
    denominator = int(counted.sum()) if reduction == "mean" else 1
    row_scale = 1.0 / denominator if denominator else 1.0
    loss_rows = _VocabParallelCrossEntropy.apply(
        logits.reshape(rows, logits.shape[-1]), flat, comm, int(classes[:comm.rank].sum()),
        ignore_index, row_scale)
    loss = loss_rows.reshape(labels.shape) if reduction == "none" else loss_rows.sum()
    if denominator == 0:  # a mean over no counted row is 0 / 0, NaN, as in F.cross_entropy
        loss = loss / 0.0
    return loss.to(logits.dtype)
