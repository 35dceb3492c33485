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
| 2 | all_reduce SUM, int64: 4 digits (float32 p) or 8 (float64) | `256 x 8` (last `128 x 8`) |
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

**Backends.** The local work of each phase (the slice's maxima and sums of exponentials, one
histogram per digit, the head membership, the row sums, the gradients) goes through the phase
ops of the resolved `backend` (`phases_for`; contract in `htakl_kernels/_ops/hta_kl_phases.py`):
the CPU kernel (csrc/cpu/hta_kl_cpu_phases.cpp, the fused kernel's per-class math) and Triton
(triton_kernels/hta_kl_phases.py, the fused Triton kernel's per-class functions) have them; the
reference and CUDA backends (the CUDA kernel has no phase entry points) run the same phases as
PyTorch tensor ops on the inputs' device, vectorized over rows and classes.
The softmax normalization and the prob_mean mixing between phases are PyTorch ops on every
backend. Gloo takes CPU tensors (CUDA tensors are moved to the CPU for the collectives); NCCL
takes CUDA tensors through the same code, but has not been run yet (it needs a GPU per rank).
Every rank should resolve the same backend: the phase ops agree with the PyTorch ones to
rounding, not bit for bit.

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

from ._backends import phase_ops, resolve_backend
from ._ops.hta_kl_phases import MASS_BITS, TorchPhases, key_bits
from ._library import accumulation_dtype
from .reference.hta_kl import head_mask
from ._validation import (ROW_REDUCTIONS, TIME_REDUCTIONS, HtaKlShape, check_choice,
                          check_first_order_backward, check_hta_kl_args)

_DIGIT_BITS = 8  # the selection's digits; masses in fixed point: hta_kl_phases.MASS_BITS
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_CROSS_ENTROPY_REDUCTIONS = ("mean", "sum", "none")  # F.cross_entropy's
_CROSS_ENTROPY_FIELDS = ("rows", "rows shape", "dtype", "reduction", "ignore_index", "labels")
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
        self.device = (torch.device("cuda", torch.cuda.current_device()) if uses_nccl
                       else torch.device("cpu"))

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
        dist.all_gather_into_tensor(gathered, moved.reshape(-1), group=self.group)
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
        own = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(messages, own, group=group.group)
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


def phases_for(backend: str):
    """The phase ops of a resolved backend: its kernels' where it has them (the CPU kernel and
    Triton), else the PyTorch-op phases (the reference backend and CUDA)."""
    return phase_ops(backend) or TorchPhases


def _softmaxes(x: torch.Tensor, group: CollectiveGroup, inv_tau: float, phases):
    """SPEC 1.1-1.2 over the whole rows for the streams x [K, R, c] (the teacher, the student's
    softmaxes; accumulation dtype), two collectives for all of them: the log softmax and softmax
    of the local slices [K, R, c] and each row's log-sum-exp [K, R]."""
    row_max = group.all_reduce(phases.slice_max(x), dist.ReduceOp.MAX)
    shifted, exponentials, sums = phases.slice_exp_sums(x, row_max, inv_tau)
    log_sum = torch.log(group.all_reduce(sums, dist.ReduceOp.SUM)).to(x.dtype).unsqueeze(-1)
    return shifted - log_sum, exponentials * torch.exp(-log_sum), log_sum.squeeze(-1)


def _head(p: torch.Tensor, invalid_rows: torch.Tensor, delta: float, group: CollectiveGroup,
          phases) -> torch.Tensor:
    """SPEC 1.3 membership [R, c] of the local classes, by a radix select over the whole rows.

    Keys are the bit patterns of p (non-negative floats order like their bits); masses are p in
    fixed point, so the histograms add up exactly over the ranks. Each digit's histogram covers
    the classes whose higher digits are the ones chosen so far; the last one's counts at the
    chosen digit are the slice's classes tied at the boundary. `invalid_rows` (NaN rows) get an
    empty head, as in the kernels."""
    rows = p.shape[0]
    # mass < delta  <=>  fixed-point mass < ceil(delta * 2**62), exactly
    threshold = math.ceil(float(delta) * float(2 ** MASS_BITS))
    prefix = torch.zeros(rows, dtype=torch.int64, device=p.device)
    mass_above = torch.zeros_like(prefix)
    remaining = key_bits(p.dtype)
    whole_row_in_head = None
    while remaining > 0:
        width = min(_DIGIT_BITS, remaining)
        remaining -= width
        counts, masses = phases.slice_histogram(p, prefix, remaining, width)
        # The boundary digit of every row: the highest whose mass at or above it reaches delta.
        histogram = group.all_reduce(masses, dist.ReduceOp.SUM)
        at_or_above = histogram.flip(1).cumsum(1).flip(1) + mass_above.unsqueeze(1)
        reached = (at_or_above >= threshold).sum(dim=1)
        if whole_row_in_head is None:
            # Past the first digit it is always reached: the chosen bucket's exact mass is split
            # among its sub-buckets.
            whole_row_in_head = reached == 0
        chosen = (reached - 1).clamp(min=0).unsqueeze(1)
        mass_above = (at_or_above.gather(1, chosen) - histogram.gather(1, chosen)).squeeze(1)
        prefix = (prefix << width) | chosen.squeeze(1)
    local_ties = counts.gather(1, chosen).squeeze(1)
    tie_counts = group.all_gather(local_ties)  # [ranks, R]
    integer = torch.int32 if p.dtype == torch.float32 else torch.int64
    boundary_value = prefix.to(integer).view(p.dtype).to(torch.float64)
    boundary_mass = torch.floor(boundary_value * float(2 ** MASS_BITS)).to(torch.int64).clamp(min=1)
    # SPEC 1.3's r = #{k >= 1 : mass_above + k w < delta} = ceil((delta - mass_above) / w) - 1,
    # in exact integers (no product k w that could overflow)
    room = threshold - mass_above
    tied_in_head = (-torch.div(-room, boundary_mass, rounding_mode="floor") - 1).clamp(min=0)
    tied_in_head = torch.minimum(tied_in_head, tie_counts.sum(dim=0))
    # the head's tied classes are the first of the whole row's: those of the ranks before this
    # one come first
    local_in_head = (tied_in_head - tie_counts[:group.rank].sum(dim=0)).clamp(min=0)
    boundary = torch.where(whole_row_in_head, -1, prefix)
    boundary = torch.where(invalid_rows, torch.iinfo(torch.int64).max, boundary)
    return phases.slice_head(p, boundary.contiguous(), local_in_head.contiguous())


def vocab_parallel_rows(student: torch.Tensor, teacher: torch.Tensor, group: CollectiveGroup, *,
                        backend: str, temperature: float, delta: float, logit_mean: bool,
                        detach_weights: bool, row_scale: float, grad_student: bool,
                        grad_teacher: bool):
    """The fused op's contract (htakl_kernels/_ops/hta_kl.py) over the group: student [T, R, c],
    teacher [R, c] (local slices) -> (row_scale * loss_row [R] of the whole rows, the same on
    every rank, and the gradients of the local slices or None), the phases those of the resolved
    `backend` (phases_for). Every rank of the group must make the same call (same R, T and
    options)."""
    # The statistics keep the accumulation dtype, whichever ops autocast would cast to 16 bits.
    with torch.autocast(student.device.type, enabled=False):
        return _rows(student, teacher, group, phases_for(backend), temperature=temperature,
                     delta=delta, logit_mean=logit_mean, detach_weights=detach_weights,
                     row_scale=row_scale, grad_student=grad_student, grad_teacher=grad_teacher)


def _rows(student, teacher, group, phases, *, temperature, delta, logit_mean, detach_weights,
          row_scale, grad_student, grad_teacher):
    steps = student.shape[0]
    acc = accumulation_dtype(teacher.dtype)
    inv_tau = 1.0 / temperature
    prob_mean = steps > 1 and not logit_mean
    student_acc = student.to(acc)
    if steps > 1 and logit_mean:
        student_acc = student_acc.mean(dim=0, keepdim=True)
    streams = torch.cat([teacher.to(acc).unsqueeze(0), student_acc])
    log_probs, probs, log_sums = _softmaxes(streams, group, inv_tau, phases)
    log_p, p, log_q_steps, q_steps = log_probs[0], probs[0], log_probs[1:], probs[1:]
    if prob_mean:
        # SPEC 1.2: log q = logsumexp_t(log q_t) - log T; a class at -inf at every step has q = 0.
        q = q_steps.mean(dim=0)
        never = torch.isneginf(log_q_steps).all(dim=0)
        log_q = torch.where(never, -math.inf,
                            torch.logsumexp(torch.where(never, 0.0, log_q_steps), dim=0)
                            - math.log(steps))
    else:
        q, log_q = q_steps[0], log_q_steps[0]
    head = _head(p, log_sums[0].isnan(), delta, group, phases)
    tensors = (p, log_p, q, log_q, q_steps, log_q_steps, head)
    totals = group.all_reduce(phases.slice_sums(*tensors), dist.ReduceOp.SUM)
    loss_rows, d_student, d_teacher = phases.slice_grads(
        *tensors, totals, inv_tau, row_scale, detach_weights, steps, grad_student, grad_teacher)
    d_student = d_student.expand(steps, -1, -1).to(student.dtype) if grad_student else None
    d_teacher = d_teacher.to(teacher.dtype) if grad_teacher else None
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
        grad_student = (None if d_student is None
                        else d_student * grad_rows.to(d_student.dtype).view(1, -1, 1))
        grad_teacher = (None if d_teacher is None
                        else d_teacher * grad_rows.to(d_teacher.dtype).view(-1, 1))
        return grad_student, grad_teacher, None, None, None, None, None


def _check_slice(student, teacher, temperature, delta, time_reduction, detach_weights, reduction,
                 backend) -> tuple[HtaKlShape, str]:
    """check_hta_kl_args for a slice that may hold no class (C = 0 on this rank), and the
    resolved backend."""
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
    return shape, resolve_backend(backend, teacher.device)


def vocab_parallel_hta_kl_div(student, teacher, *, group, weight: float, temperature: float,
                              delta: float, time_reduction: str, detach_weights: bool,
                              reduction: str, backend: str) -> torch.Tensor:
    """`weight * hta_kl_div(...)` over a process group of two or more ranks, each passing its own
    slice of the classes (see the module docstring)."""
    comm = CollectiveGroup(group)

    def check():
        shape, chosen = _check_slice(student, teacher, temperature, delta, time_reduction,
                                     detach_weights, reduction, backend)
        fields = [shape.rows, shape_code(shape.rows_shape), shape.steps, int(shape.time_input),
                  DTYPE_CODES[teacher.dtype], float_bits(temperature), float_bits(delta),
                  TIME_REDUCTIONS.index(time_reduction), int(detach_weights),
                  ROW_REDUCTIONS.index(reduction), float_bits(weight)]
        return (shape, chosen), fields, shape.classes

    (shape, chosen), _classes = agree(comm, check)
    logit_mean = shape.time_input and time_reduction == "logit_mean"
    if shape.rows == 0:  # every rank agrees: no row, no collective
        acc = accumulation_dtype(teacher.dtype)
        loss_rows = teacher.new_zeros(0, dtype=acc) + 0 * student.sum()
    else:
        row_scale = shape.row_scale(reduction, weight)
        grad_on = torch.is_grad_enabled()
        loss_rows = _VocabParallelHtaKl.apply(
            student.reshape(shape.steps, shape.rows, shape.classes),
            teacher.reshape(shape.rows, shape.classes), comm,
            dict(backend=chosen, temperature=float(temperature), delta=float(delta),
                 logit_mean=logit_mean, detach_weights=detach_weights),
            row_scale, grad_on and student.requires_grad, grad_on and teacher.requires_grad)
    loss = loss_rows.reshape(shape.rows_shape) if reduction == "none" else loss_rows.sum()
    return loss.to(student.dtype)


def vocab_parallel_head_mask(teacher: torch.Tensor, *, temperature: float, delta: float,
                             group, backend: str = "auto") -> torch.Tensor:
    """SPEC 1.3's head membership of this rank's classes (a bool tensor shaped like `teacher`,
    this rank's slice of the classes), the same classes a single device finds on the whole rows.
    Costs the log-sum-exp's two all_reduces and the selection's collectives (module docstring);
    with group=None or a group of one rank, the single device's membership. `backend` picks the
    phase ops (phases_for)."""
    if not is_parallel(group):
        # The same checks as on a group (temperature, delta, backend), then the reference's sort.
        _check_slice(teacher, teacher, temperature, delta, "prob_mean", False, "sum", backend)
        logits = teacher.to(accumulation_dtype(teacher.dtype))
        probabilities = torch.softmax(logits / temperature, -1)
        return head_mask(probabilities, delta)
    comm = CollectiveGroup(group)

    def check():
        shape, chosen = _check_slice(teacher, teacher, temperature, delta, "prob_mean", False,
                                     "sum", backend)
        fields = [shape.rows, shape_code(shape.rows_shape), 1, 0, DTYPE_CODES[teacher.dtype],
                  float_bits(temperature), float_bits(delta), 0, 0, 0, 0]
        return (shape, chosen), fields, shape.classes

    (shape, chosen), _classes = agree(comm, check)
    phases = phases_for(chosen)
    rows = teacher.reshape(1, shape.rows, shape.classes).to(accumulation_dtype(teacher.dtype))
    _log_p, p, log_sum_p = _softmaxes(rows.contiguous(), comm, 1.0 / temperature, phases)
    return _head(p[0], log_sum_p[0].isnan(), delta, comm, phases).reshape(teacher.shape)


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
    row_max = group.all_reduce(TorchPhases.slice_max(x), dist.ReduceOp.MAX)
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
        # Every check runs inside the agreement: an error raised on one rank alone would leave
        # the others waiting in the all_reduces that follow.
        if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
            raise TypeError("logits must be a tensor with a class dimension")
        if logits.dtype not in DTYPE_CODES:
            raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got "
                            f"{logits.dtype}")
        if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:-1]:
            raise ValueError(f"labels must be a tensor of the logits' row shape "
                             f"{tuple(logits.shape[:-1])}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex:
            raise TypeError(f"labels must hold integer class indices, got {labels.dtype}")
        if not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        check_choice("reduction", reduction, _CROSS_ENTROPY_REDUCTIONS)
        flat = labels.reshape(-1).to(torch.int64)
        fields = [flat.numel(), shape_code(labels.shape), DTYPE_CODES[logits.dtype],
                  _CROSS_ENTROPY_REDUCTIONS.index(reduction), ignore_index,
                  integer_fingerprint(flat)]
        return flat, fields, logits.shape[-1]

    flat, classes = agree(comm, check, names=_CROSS_ENTROPY_FIELDS,
                          caller="vocab_parallel_cross_entropy")
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
