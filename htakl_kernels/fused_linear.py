"""HTA-KL (and SpikingKDLoss's objective) through the classifier heads, without the logits.

`fused_linear_hta_kl_div(student_input, student_weight, teacher_input, teacher_weight)` equals
`hta_kl_div(F.linear(student_input, student_weight), F.linear(teacher_input, teacher_weight))`,
but never holds either `[T, N, C]` or `[N, C]` logits whole: for large class counts those, not the
loss, are what exhaust memory. The rows are taken a chunk at a time: project the chunk (PyTorch's
matmuls), run the fused loss kernel on it (which writes the logits' gradient in its forward,
`_ops/hta_kl.py`), turn that gradient into the chunk's input gradient and add it into the weight
and bias gradients, then free the chunk. The forward thus returns the loss with every gradient
already computed; the backward only scales them by the upstream gradient.

Peak extra memory is O(chunk_rows x C) whatever N is (plus the gradients themselves, the size
of the inputs and weights). The price: the gradients are computed in the forward even when no
backward follows (under `torch.no_grad()`, or for inputs that do not require grad, no gradient
work is done), and the backward is first-order only, on every backend.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, reference
from ._backends import BACKENDS, kernel_ops, resolve_backend
from ._library import accumulation_dtype
from ._validation import (
    ROW_REDUCTIONS, TIME_REDUCTIONS, check_alpha, check_choice, check_first_order_backward,
    check_float_tensor, check_hta_kl_options, check_rows_for_reduction,
)
from .hta_kl import _autocast_to_common_dtype

# chunk_rows=None: the rows whose student and teacher logits together take about this many bytes
# (CPU: below glibc's largest mmap threshold, 32 MiB, so that the freed chunk is reused by the
# next one instead of being faulted in afresh from the kernel; CUDA: large enough that the
# chunk's matmuls fill the device).
_CHUNK_BYTES = {"cpu": 24 << 20, "cuda": 256 << 20}
_DEFAULT_CHUNK_BYTES = 24 << 20


class _Plan(NamedTuple):
    """Everything the chunk loop needs besides the tensors; fixed by the public call."""

    temperature: float
    delta: float
    time_reduction: str
    detach_weights: bool
    reduction: str
    backend: str  # resolved
    chunk_rows: int
    rows: int  # N
    time_input: bool  # student_input is [T, N, H_s]
    logits_dtype: torch.dtype  # F.linear's result type (under autocast: its dtype)
    counted: int  # rows that count (True in row_mask; N without a mask)
    alpha: float | None  # None: HTA-KL alone; else (1 - alpha) CE + alpha HTA-KL
    wants: tuple[bool, ...]  # gradient wanted for each of the six inputs
    # vocab-parallel heads: the group (None on one device) and this rank's first global class
    group: distributed.CollectiveGroup | None = None
    first_class: int = 0


def default_chunk_rows(steps: int, classes: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk when `chunk_rows=None`: as many as fit their student logits `[T, rows, C]`
    and teacher logits `[rows, C]` in 24 MiB on CPU (256 MiB on CUDA), at least 1."""
    budget = _CHUNK_BYTES.get(device.type, _DEFAULT_CHUNK_BYTES)
    bytes_per_row = (steps + 1) * classes * torch.empty((), dtype=dtype).element_size()
    return max(1, budget // bytes_per_row)


def _check_linear_side(side: str, inputs, weight, bias, time_allowed: bool) -> None:
    """One head's tensors: `<side>_input [(T,) N, H]`, `<side>_weight [C, H]`, `<side>_bias [C]`."""
    check_float_tensor(f"{side}_input", inputs)
    check_float_tensor(f"{side}_weight", weight)
    if bias is not None:
        check_float_tensor(f"{side}_bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"{side}_weight must be [C, H] (an nn.Linear weight), got "
                         f"{tuple(weight.shape)}")
    dims = (2, 3) if time_allowed else (2,)
    if inputs.dim() not in dims:
        expected = "[N, H_s] or [T, N, H_s]" if time_allowed else "[N, H_t]"
        extra = "" if time_allowed else " (a time dimension belongs on the student side only)"
        raise ValueError(f"{side}_input must be {expected}{extra}, got {tuple(inputs.shape)}")
    if inputs.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{side}_input's hidden size (last dimension, {inputs.shape[-1]}) must equal "
            f"{side}_weight's second dimension ([C, H] = {tuple(weight.shape)})"
        )
    if not torch.is_autocast_enabled(inputs.device.type):
        for name, tensor in ((f"{side}_weight", weight), (f"{side}_bias", bias)):
            if tensor is not None and tensor.dtype != inputs.dtype:
                raise TypeError(f"{name} must have {side}_input's dtype {inputs.dtype} outside "
                                f"autocast, got {tensor.dtype}")


def _check_arguments(student_input, student_weight, student_bias, teacher_input, teacher_weight,
                     teacher_bias, row_mask, labels, chunk_rows, parallel: bool) -> None:
    """`parallel`: the weights are this rank's slice of a vocab-parallel head, which may hold no
    class."""
    _check_linear_side("student", student_input, student_weight, student_bias, time_allowed=True)
    _check_linear_side("teacher", teacher_input, teacher_weight, teacher_bias, time_allowed=False)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student_weight and teacher_weight must have the same number of classes C (first "
            f"dimension), got student C={student_weight.shape[0]} and teacher "
            f"C={teacher_weight.shape[0]}"
        )
    if student_weight.shape[0] < 1 and not parallel:
        raise ValueError("student_weight and teacher_weight must have at least one class (C >= 1)")
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None and tuple(bias.shape) != (student_weight.shape[0],):
            raise ValueError(f"{name} must be [C] = [{student_weight.shape[0]}], got "
                             f"{tuple(bias.shape)}")
    rows = teacher_input.shape[0]
    if student_input.shape[-2] != rows:
        raise ValueError(
            f"student_input and teacher_input must have the same number of rows N, got student "
            f"N={student_input.shape[-2]} ({tuple(student_input.shape)}) and teacher N={rows}"
        )
    if student_input.dim() == 3 and student_input.shape[0] < 1:
        raise ValueError("student_input's time dimension T must be at least 1, got T=0")
    named = [("student_input", student_input), ("student_weight", student_weight),
             ("student_bias", student_bias), ("teacher_input", teacher_input),
             ("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias),
             ("row_mask", row_mask), ("labels", labels)]
    for name, tensor in named:
        if tensor is not None and tensor.device != teacher_input.device:
            raise ValueError(f"{name} must be on teacher_input's device {teacher_input.device}, "
                             f"got {tensor.device}")
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor) or row_mask.dtype != torch.bool:
            raise TypeError(f"row_mask must be a bool tensor of shape [N] = [{rows}], got "
                            f"{getattr(row_mask, 'dtype', type(row_mask).__name__)}")
        if tuple(row_mask.shape) != (rows,):
            raise ValueError(f"row_mask must have shape [N] = [{rows}], got {tuple(row_mask.shape)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long:
            raise TypeError(f"labels must be an int64 tensor of class indices, shape [N] = "
                            f"[{rows}], got {getattr(labels, 'dtype', type(labels).__name__)}")
        if tuple(labels.shape) != (rows,):
            raise ValueError(f"labels must have shape [N] = [{rows}], got {tuple(labels.shape)}")
    _check_chunk_rows(chunk_rows)


def _check_chunk_rows(chunk_rows: object) -> None:
    if chunk_rows is not None and (
            not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or an int >= 1, got {chunk_rows!r}")


def _check_label_range(labels: torch.Tensor, row_index: torch.Tensor | None, classes: int) -> None:
    """Labels of counted rows must be class indices (masked rows may hold anything, e.g. -100)."""
    counted = labels if row_index is None else labels.index_select(0, row_index)
    if counted.numel() and not bool(((counted >= 0) & (counted < classes)).all()):
        raise ValueError(f"labels of counted rows must be class indices in [0, {classes}), got "
                         f"values from {int(counted.min())} to {int(counted.max())}")


def _logits_dtype(student_input, student_weight, student_bias, teacher_input, teacher_weight,
                  teacher_bias) -> torch.dtype:
    """The dtype the loss sees: F.linear's result type under the current autocast state (probed
    on zero rows, which costs nothing), student and teacher promoted to a common one under
    autocast as hta_kl_div does."""
    with torch.no_grad():
        student = F.linear(student_input.narrow(-2, 0, 0), student_weight, student_bias)
        teacher = F.linear(teacher_input.narrow(0, 0, 0), teacher_weight, teacher_bias)
    student, teacher = _autocast_to_common_dtype(student, teacher)
    if student.dtype != teacher.dtype:
        raise TypeError(
            f"the student's logits ({student.dtype}) and the teacher's ({teacher.dtype}) must "
            f"have the same dtype; cast student_input/student_weight or teacher_input/"
            f"teacher_weight"
        )
    return student.dtype


def _chunk_loss(plan: _Plan, student: torch.Tensor, teacher: torch.Tensor,
                labels: torch.Tensor | None, want_student: bool, want_teacher: bool,
                row_scale: float):
    """One chunk's `row_scale x` per-row loss `[R]` (accumulation dtype) and its gradients with
    respect to the student logits `[T, R, C]` and the teacher logits `[R, C]` (None where not
    wanted). The student comes in as `[T, R, C]` (T = 1 for a 2-D student input)."""
    time_input = plan.time_input
    weight = 1.0 if plan.alpha is None else plan.alpha
    accumulate = accumulation_dtype(plan.logits_dtype)
    if weight == 0:  # alpha = 0: the cross-entropy alone (the kernels refuse a zero row_scale)
        loss_rows = student.new_zeros(student.shape[1], dtype=accumulate)
        d_student = torch.zeros_like(student) if want_student else None
        d_teacher = torch.zeros_like(teacher) if want_teacher else None
    elif plan.group is not None:
        loss_rows, d_student, d_teacher = distributed.vocab_parallel_rows(
            student, teacher, plan.group, backend=plan.backend, temperature=plan.temperature,
            delta=plan.delta,
            logit_mean=time_input and plan.time_reduction == "logit_mean",
            detach_weights=plan.detach_weights, row_scale=weight * row_scale,
            grad_student=want_student, grad_teacher=want_teacher)
        if d_student is not None:
            d_student = d_student.contiguous()  # logit_mean's: one softmax's, expanded over T
    elif plan.backend == "reference":
        with torch.enable_grad():
            leaves = (student.detach().requires_grad_(want_student),
                      teacher.detach().requires_grad_(want_teacher))
            loss_rows = reference.hta_kl_div(
                leaves[0] if time_input else leaves[0][0], leaves[1],
                temperature=plan.temperature, delta=plan.delta,
                time_reduction=plan.time_reduction, detach_weights=plan.detach_weights,
                reduction="none",
            ).to(accumulate) * (weight * row_scale)
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            found = iter(torch.autograd.grad(loss_rows.sum(), wanted) if wanted else ())
        loss_rows = loss_rows.detach()
        d_student = next(found) if want_student else None
        d_teacher = next(found) if want_teacher else None
    else:
        loss_rows, d_student, d_teacher = kernel_ops(plan.backend).hta_kl_fused(
            student, teacher, plan.temperature, plan.delta,
            time_input and plan.time_reduction == "logit_mean", plan.detach_weights,
            want_student, want_teacher, weight * row_scale,
        )
        d_student = d_student if want_student else None
        d_teacher = d_teacher if want_teacher else None
    if plan.alpha is not None:
        loss_rows = loss_rows + _cross_entropy_into(plan, student, labels, d_student,
                                                    (1.0 - plan.alpha) * row_scale)
    return loss_rows, d_student, d_teacher


def _cross_entropy_into(plan: _Plan, student: torch.Tensor, labels: torch.Tensor, d_student,
                        scale: float):
    """`scale x` SpikingKDLoss's cross-entropy of each row (of the time-averaged logits),
    computed in the accumulation dtype; its gradient is added into `d_student` when given:
    d CE / d z_t = (softmax(mean_t z) - onehot(label)) / T. On a vocab-parallel head, the
    cross-entropy of the whole rows and the gradient of this rank's classes."""
    steps = student.shape[0]
    mean_logits = student.to(accumulation_dtype(student.dtype)).mean(dim=0)
    if plan.group is not None:
        # The chunk's rows all count and their labels are class indices: no index is ignored.
        loss_rows, gradient = distributed.cross_entropy_rows(
            mean_logits, labels, plan.group, plan.first_class, ignore_index=-1, row_scale=scale)
        gradient_scale = 1.0 / steps  # the gradient is already scaled
    else:
        log_probs = torch.log_softmax(mean_logits, dim=-1)
        loss_rows = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1) * scale
        gradient = log_probs.exp_()
        gradient.scatter_add_(1, labels.unsqueeze(1), gradient.new_full((labels.numel(), 1), -1.0))
        gradient_scale = scale / steps
    if d_student is not None:
        d_student.add_(gradient.mul_(gradient_scale).to(d_student.dtype).unsqueeze(0))
    return loss_rows


def _accumulate_product(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """total += left @ right: in place when the dtypes agree (no [C, H] temporary per chunk),
    else (under autocast, or 16-bit weights accumulated in float32) through the product in the
    matmul's own dtype."""
    if left.dtype == total.dtype and right.dtype == total.dtype:
        total.addmm_(left, right)
    else:
        total.add_(left @ right)


def _run_chunks(plan: _Plan, tensors, wants, row_weights: torch.Tensor | None = None):
    """The chunk loop. Returns the loss (0-d, or `[N]` for reduction "none") in the accumulation
    dtype and the six gradients (None where not wanted). `row_weights` `[N]`: the upstream
    gradient of reduction "none", applied to each row's gradients."""
    student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, \
        labels, row_index = tensors
    time_input = plan.time_input
    device = teacher_input.device
    want_student = any(wants[:3])
    want_teacher = any(wants[3:6])
    row_scale = 1.0 / plan.counted if plan.reduction == "batchmean" and plan.counted else 1.0
    accumulate = accumulation_dtype(plan.logits_dtype)
    grads = [None] * 6
    for position, (wanted, tensor, dtype) in enumerate(zip(
            wants, (student_input, student_weight, student_bias, teacher_input, teacher_weight,
                    teacher_bias),
            (None, accumulate, accumulate, None, accumulate, accumulate))):
        if wanted:
            # Input gradients are written row by row (zeros stay on masked rows); weight and bias
            # gradients are sums over chunks, kept in the accumulation dtype.
            grads[position] = torch.zeros_like(tensor, dtype=dtype or tensor.dtype)
    per_row = plan.reduction == "none"
    loss = (torch.zeros(plan.rows, dtype=accumulate, device=device) if per_row
            else torch.zeros((), dtype=accumulate, device=device))
    for start in range(0, plan.counted, plan.chunk_rows):
        size = min(plan.chunk_rows, plan.counted - start)
        if row_index is None:
            index = None
            student_rows = student_input.narrow(-2, start, size)
            teacher_rows = teacher_input.narrow(0, start, size)
        else:
            index = row_index.narrow(0, start, size)
            student_rows = student_input.index_select(-2, index)
            teacher_rows = teacher_input.index_select(0, index)
        student = F.linear(student_rows, student_weight, student_bias)
        teacher = F.linear(teacher_rows, teacher_weight, teacher_bias)
        student, teacher = _autocast_to_common_dtype(student, teacher)
        student = student if time_input else student.unsqueeze(0)
        chunk_labels = None
        if labels is not None:
            chunk_labels = (labels.narrow(0, start, size) if index is None
                            else labels.index_select(0, index))
        loss_rows, d_student, d_teacher = _chunk_loss(
            plan, student.contiguous(), teacher.contiguous(), chunk_labels, want_student,
            want_teacher, row_scale)
        del student, teacher
        if row_weights is not None:
            weights = (row_weights.narrow(0, start, size) if index is None
                       else row_weights.index_select(0, index))
            if d_student is not None:
                d_student = d_student * weights.to(d_student.dtype).view(1, -1, 1)
            if d_teacher is not None:
                d_teacher = d_teacher * weights.to(d_teacher.dtype).view(-1, 1)
        if per_row:
            _write_rows(loss, loss_rows, start, index)
        else:
            loss += loss_rows.sum()
        if d_student is not None:
            _chunk_gradients(grads[0:3], wants[0:3], d_student if time_input else d_student[0],
                             student_rows, student_weight, start, index)
        if d_teacher is not None:
            _chunk_gradients(grads[3:6], wants[3:6], d_teacher, teacher_rows, teacher_weight,
                             start, index)
    if plan.group is not None:
        _sum_over_ranks(plan.group, [grads[0], grads[3]])
    return loss, grads


def _sum_over_ranks(group: distributed.CollectiveGroup, grads) -> None:
    """Vocab-parallel heads: each rank's input gradients hold its classes' part
    (d_logits[:, slice] @ W[slice]); replace them by the sum over the ranks (one all_reduce, in
    the accumulation dtype), the whole gradient, on every rank."""
    present = [g for g in grads if g is not None]
    if not present:
        return
    dtype = accumulation_dtype(torch.promote_types(present[0].dtype, present[-1].dtype))
    total = group.all_reduce(torch.cat([g.reshape(-1).to(dtype) for g in present]),
                             distributed.dist.ReduceOp.SUM)
    for g, part in zip(present, total.split([g.numel() for g in present])):
        g.copy_(part.view(g.shape))


def _write_rows(target: torch.Tensor, rows: torch.Tensor, start: int, index) -> None:
    """target[chunk rows] = rows, along target's row dimension (-2 for inputs, 0 for [N])."""
    dim = 0 if target.dim() == 1 else -2
    if index is None:
        target.narrow(dim, start, rows.shape[dim]).copy_(rows)
    else:
        target.index_copy_(dim % target.dim(), index, rows.to(target.dtype))


def _chunk_gradients(grads, wants, d_logits, rows, weight, start, index) -> None:
    """One head's chunk: d input rows = d_logits @ W; dW += d_logits^T x; db += column sums."""
    grad_input, grad_weight, grad_bias = grads
    if wants[0]:
        _write_rows(grad_input, d_logits @ weight, start, index)
    flat = d_logits.flatten(0, -2)  # [(T x) rows, C]; C may be 0 on a vocab-parallel rank
    if wants[1]:
        _accumulate_product(grad_weight, flat.t(), rows.reshape(-1, rows.shape[-1]))
    if wants[2]:
        grad_bias += flat.sum(dim=0, dtype=grad_bias.dtype)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _FusedLinearLoss(torch.autograd.Function):
    """Forward: the chunk loop, gradients included (batchmean, sum) or the loss alone ("none").
    Backward: the saved gradients times the upstream scalar, or for "none" (one upstream value
    per row, which cannot be applied to weight gradients already summed over rows) the chunk
    loop again with each row's gradient weighted by its upstream value: a second projection and
    kernel pass, in exchange for keeping nothing of size N x C."""

    @staticmethod
    def forward(ctx, plan, student_input, student_weight, student_bias, teacher_input,
                teacher_weight, teacher_bias, labels, row_index):
        tensors = (student_input, student_weight, student_bias, teacher_input, teacher_weight,
                   teacher_bias, labels, row_index)
        ctx.plan = plan
        ctx.dtypes = [None if t is None else t.dtype for t in tensors[:6]]
        if plan.reduction == "none":
            loss, _ = _run_chunks(plan, tensors, (False,) * 6)
            ctx.save_for_backward(*tensors)
            ctx.autocast = _autocast_state(teacher_input.device.type)
        else:
            loss, grads = _run_chunks(plan, tensors, plan.wants)
            ctx.save_for_backward(*grads)
        return loss.to(plan.logits_dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        check_first_order_backward("fused_linear_hta_kl_div")
        plan = ctx.plan
        if plan.reduction == "none":
            tensors = ctx.saved_tensors
            enabled, dtype = ctx.autocast
            with torch.no_grad(), torch.autocast(tensors[3].device.type, dtype, enabled=enabled):
                _, grads = _run_chunks(plan, tensors, plan.wants, row_weights=grad_loss)
        else:
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (None, *grads, None, None)


# What every rank of a vocab-parallel head must pass alike (distributed.agree).
_AGREEMENT_FIELDS = ("rows", "steps", "time input", "student hidden size", "teacher hidden size",
                     "logits dtype", "temperature", "delta", "time_reduction", "detach_weights",
                     "reduction", "alpha", "chunk_rows", "number of counted rows", "row_mask",
                     "labels", "inputs requiring grad")


def _prepare(student_input, student_weight, teacher_input, teacher_weight, student_bias,
             teacher_bias, temperature, delta, time_reduction, detach_weights, reduction, row_mask,
             chunk_rows, backend, labels, alpha, group):
    """Validate everything (before any work; on a vocab-parallel head, on every rank, with every
    rank agreeing) and build the chunk loop's plan and row index."""
    parallel = distributed.is_parallel(group)

    def check():
        _check_arguments(student_input, student_weight, student_bias, teacher_input,
                         teacher_weight, teacher_bias, row_mask, labels, chunk_rows, parallel)
        check_hta_kl_options(temperature, delta, time_reduction, detach_weights, reduction)
        check_choice("backend", backend, BACKENDS)
        dtype = _logits_dtype(student_input, student_weight, student_bias, teacher_input,
                              teacher_weight, teacher_bias)
        check_rows_for_reduction(teacher_input.shape[0], reduction)
        chosen = resolve_backend(backend, teacher_input.device)
        # Counted rows are gathered once (one read of the mask, a device sync on a GPU): chunks
        # then hold only rows that count, and batchmean's divisor is their number.
        row_index = None if row_mask is None else row_mask.nonzero().squeeze(1)
        grad_on = torch.is_grad_enabled()
        wants = tuple(grad_on and tensor is not None and tensor.requires_grad
                      for tensor in (student_input, student_weight, student_bias, teacher_input,
                                     teacher_weight, teacher_bias))
        return dtype, chosen, row_index, wants

    def check_and_fields():
        dtype, chosen, row_index, wants = result = check()
        fields = [
            teacher_input.shape[0], student_input.shape[0] if student_input.dim() == 3 else 1,
            student_input.dim() - 2, student_input.shape[-1], teacher_input.shape[-1],
            distributed.DTYPE_CODES[dtype], distributed.float_bits(temperature),
            distributed.float_bits(delta), TIME_REDUCTIONS.index(time_reduction),
            int(detach_weights), ROW_REDUCTIONS.index(reduction),
            -1 if alpha is None else distributed.float_bits(alpha), chunk_rows or 0,
            teacher_input.shape[0] if row_index is None else row_index.numel(),
            -1 if row_mask is None else distributed.integer_fingerprint(row_mask),
            -1 if labels is None else distributed.integer_fingerprint(labels),
            sum(int(want) << position for position, want in enumerate(wants)),
        ]
        return result, fields, student_weight.shape[0]

    if parallel:
        comm = distributed.CollectiveGroup(group)
        caller = "fused_linear_hta_kl_div" if labels is None else "fused_linear_spiking_kd_loss"
        (dtype, chosen, row_index, wants), classes = distributed.agree(
            comm, check_and_fields, names=_AGREEMENT_FIELDS, caller=caller)
        # The chunk size must be the same on every rank (each chunk is a round of collectives):
        # the default fits the largest slice.
        total_classes, widest = int(classes.sum()), int(classes.max())
        first_class = int(classes[:comm.rank].sum())
    else:
        comm = None
        dtype, chosen, row_index, wants = check()
        total_classes = widest = student_weight.shape[0]
        first_class = 0
    rows = teacher_input.shape[0]
    counted = rows if row_index is None else row_index.numel()
    if labels is not None:
        # Every rank passed the same labels (agreed above), so this raises on all or none.
        _check_label_range(labels, row_index, total_classes)
    steps = student_input.shape[0] if student_input.dim() == 3 else 1
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(steps, widest, dtype, teacher_input.device)
    plan = _Plan(float(temperature), float(delta), time_reduction, detach_weights, reduction,
                 chosen, chunk_rows, rows, student_input.dim() == 3, dtype, counted, alpha, wants,
                 comm, first_class)
    return plan, row_index


@torch.compiler.disable
def _fused_linear_loss(student_input, student_weight, teacher_input, teacher_weight, *,
                       student_bias, teacher_bias, temperature, delta, time_reduction,
                       detach_weights, reduction, row_mask, chunk_rows, backend, labels, alpha,
                       group):
    # torch.compile breaks the graph here: the chunk loop's trip count depends on the mask's
    # contents, and its kernels compute gradients inside the forward, which a traced graph
    # cannot express. Everything before and after the call is compiled as usual.
    plan, row_index = _prepare(student_input, student_weight, teacher_input, teacher_weight,
                               student_bias, teacher_bias, temperature, delta, time_reduction,
                               detach_weights, reduction, row_mask, chunk_rows, backend, labels,
                               alpha, group)
    return _FusedLinearLoss.apply(plan, student_input, student_weight, student_bias,
                                  teacher_input, teacher_weight, teacher_bias, labels, row_index)


def fused_linear_hta_kl_div(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 2.0,
    delta: float = 0.5,
    time_reduction: str = "prob_mean",
    detach_weights: bool = False,
    reduction: str = "batchmean",
    row_mask: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    backend: str = "auto",
    group=None,
) -> torch.Tensor:
    """`hta_kl_div(F.linear(student_input, student_weight, student_bias),
    F.linear(teacher_input, teacher_weight, teacher_bias), ...)` without materializing the logits.

    Args:
        student_input: `[N, H_s]`, or `[T, N, H_s]` (a spiking student's per-step features).
        student_weight: `[C, H_s]` (an `nn.Linear` weight); `student_bias`: `[C]` or None.
        teacher_input: `[N, H_t]` (no time dimension); `teacher_weight`: `[C, H_t]`;
            `teacher_bias`: `[C]` or None. H_t may differ from H_s; C must match.
        temperature, delta, time_reduction, detach_weights, backend: as for `hta_kl_div`. Every
            backend works underneath (the CPU, CUDA and Triton kernels, or the reference,
            differentiated chunk by chunk); the projections are PyTorch's matmuls.
        reduction: "batchmean" (mean over the counted rows), "sum", or "none" (`[N]`, 0 on rows
            that `row_mask` leaves out).
        row_mask: bool `[N]`; rows that are False (padding) contribute nothing, and batchmean
            divides by the number of True rows. A mask with no True row gives 0 and zero
            gradients for every reduction (a batch of padding only teaches nothing), unlike
            N = 0, which batchmean refuses as hta_kl_div does.
        chunk_rows: rows projected and evaluated at a time. None picks the largest count whose
            student logits `[T, rows, C]` and teacher logits `[rows, C]` (at the logits' dtype)
            fit in 24 MiB on CPU, 256 MiB on CUDA (`default_chunk_rows`). Peak extra memory is
            a small multiple of that (the logits, their gradients, the kernel's scratch) and does
            not grow with N.
        group: a torch.distributed process group over which the heads are split by classes
            (vocab parallelism, as Megatron-LM's column-parallel output layer): each rank passes
            its contiguous slice of the rows of `student_weight` and `teacher_weight` (and of the
            biases), ranks in group order, slices of any size including 0, and the same inputs,
            row_mask, labels and options. Every rank gets the loss of the whole rows; each gets
            the weight and bias gradients of its own slice, and the whole gradient of
            `student_input` and `teacher_input`: the per-slice parts are summed over the ranks by
            one all_reduce after the chunk loop (Megatron's column-parallel linear does the same
            in its backward), so the replicated layers below need no further reduction. Each
            chunk makes `htakl_kernels.distributed`'s collectives (plus two for the
            cross-entropy), and chunk_rows=None sizes chunks by the widest slice. With reduction
            "none" the backward runs the chunk loop, collectives included, again: every rank
            must run it. None, or a group of one rank, is the single-device call.

    Returns the loss in the logits' dtype (under autocast, autocast's dtype: the matmuls run in
    it, the loss math in float32): 0-d, or `[N]` for "none".

    Gradients reach every input that requires grad. They are computed in the forward pass, chunk
    by chunk (the teacher's only if a teacher tensor requires grad), and scaled by the upstream
    gradient in the backward; with reduction "none" the forward computes the loss alone and the
    backward runs the chunk loop again, weighting each row by its upstream gradient (a second
    pass of matmuls and loss kernel instead of keeping per-row gradients of size N x C). The
    backward is first-order only (create_graph=True raises), on every backend. Under
    torch.compile the call is a graph break (the chunk loop runs eagerly); bad input raises
    before any work, naming the argument.
    """
    return _fused_linear_loss(
        student_input, student_weight, teacher_input, teacher_weight, student_bias=student_bias,
        teacher_bias=teacher_bias, temperature=temperature, delta=delta,
        time_reduction=time_reduction, detach_weights=detach_weights, reduction=reduction,
        row_mask=row_mask, chunk_rows=chunk_rows, backend=backend, labels=None, alpha=None,
        group=group,
    )


def fused_linear_spiking_kd_loss(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 2.0,
    delta: float = 0.5,
    time_reduction: str = "prob_mean",
    detach_weights: bool = False,
    reduction: str = "batchmean",
    row_mask: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    backend: str = "auto",
    group=None,
) -> torch.Tensor:
    """`SpikingKDLoss(alpha, ...)(student_logits, teacher_logits, labels)` on the heads' outputs
    without materializing them: `(1 - alpha) * CE(mean_t student logits, labels) + alpha *
    HTA-KL`, both terms reduced over the same rows (`reduction`, `row_mask`) and computed in the
    same chunk loop as `fused_linear_hta_kl_div` (whose other arguments this takes).

    `labels`: int64 `[N]` class indices; rows that `row_mask` leaves out may hold anything (e.g.
    an ignore index); with `group`, global class indices (the cross-entropy is then that of the
    whole rows, `htakl_kernels.distributed.cross_entropy_rows`). The cross-entropy is computed in
    float32 (float64 for float64 logits).
    `alpha = 0` skips the distillation term (SpikingKDLoss computes it and multiplies by 0).
    """
    return _fused_linear_loss(
        student_input, student_weight, teacher_input, teacher_weight, student_bias=student_bias,
        teacher_bias=teacher_bias, temperature=temperature, delta=delta,
        time_reduction=time_reduction, detach_weights=detach_weights, reduction=reduction,
        row_mask=row_mask, chunk_rows=chunk_rows, backend=backend, labels=labels,
        alpha=check_alpha(alpha), group=group,
    )


_OPTION_NAMES = ("temperature", "delta", "time_reduction", "detach_weights", "reduction",
                 "chunk_rows", "backend", "group")


class FusedLinearHTAKLLoss(nn.Module):
    """`FusedLinearHTAKLLoss(**options)(student_input, student_weight, teacher_input,
    teacher_weight, student_bias=None, teacher_bias=None, row_mask=None)` is
    `fused_linear_hta_kl_div` with those options (temperature, delta, time_reduction,
    detach_weights, reduction, chunk_rows, backend, group: a process group over which the heads
    are split by classes).

    As for `HTAKLLoss`, the options are checked here and kept as attributes of the same names,
    which every call reads.
    """

    def __init__(self, *, temperature: float = 2.0, delta: float = 0.5,
                 time_reduction: str = "prob_mean", detach_weights: bool = False,
                 reduction: str = "batchmean", chunk_rows: int | None = None,
                 backend: str = "auto", group=None) -> None:
        super().__init__()
        check_hta_kl_options(temperature, delta, time_reduction, detach_weights, reduction)
        check_choice("backend", backend, BACKENDS)
        _check_chunk_rows(chunk_rows)
        self.temperature, self.delta, self.time_reduction = temperature, delta, time_reduction
        self.detach_weights, self.reduction = detach_weights, reduction
        self.chunk_rows, self.backend, self.group = chunk_rows, backend, group

    @property
    def options(self) -> dict:
        return {name: getattr(self, name) for name in _OPTION_NAMES}

    def forward(self, student_input, student_weight, teacher_input, teacher_weight,
                student_bias=None, teacher_bias=None, row_mask=None) -> torch.Tensor:
        return fused_linear_hta_kl_div(
            student_input, student_weight, teacher_input, teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, row_mask=row_mask,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class FusedLinearSpikingKDLoss(FusedLinearHTAKLLoss):
    """`fused_linear_spiking_kd_loss` as a module: `FusedLinearSpikingKDLoss(alpha, **options)
    (student_input, student_weight, teacher_input, teacher_weight, labels, ...)`."""

    def __init__(self, alpha: float = 0.5, **options) -> None:
        super().__init__(**options)
        self.alpha = check_alpha(alpha)

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, labels,
                student_bias=None, teacher_bias=None, row_mask=None) -> torch.Tensor:
        return fused_linear_spiking_kd_loss(
            student_input, student_weight, teacher_input, teacher_weight, labels,
            alpha=self.alpha, student_bias=student_bias, teacher_bias=teacher_bias,
            row_mask=row_mask, **self.options,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, " + super().extra_repr()
