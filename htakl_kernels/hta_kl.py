"""HTA-KL divergence, the public function (docs/SPEC.md section 1).

The kernels' contract and their autograd glue are in `_ops/hta_kl.py`; the backend table in
`_backends.py`.
"""

from __future__ import annotations

import torch

from . import reference
from .distributed import is_parallel, vocab_parallel_hta_kl_div
from ._backends import kernel_ops, resolve_hta_kl_backend
from ._ops.hta_kl import hta_kl_rows
from ._validation import check_hta_kl_args


def _autocast_to_common_dtype(student, teacher):
    """Under autocast, a student in autocast's dtype and a teacher computed outside it (or the
    reverse) are both promoted to the wider dtype, as autocast does for PyTorch's own losses.
    Outside autocast, mixed dtypes stay an error (check_hta_kl_args); same-dtype inputs are left
    alone either way, so 16-bit pairs keep the 16-bit kernels."""
    if (isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor)
            and student.dtype != teacher.dtype
            and student.is_floating_point() and teacher.is_floating_point()
            and torch.is_autocast_enabled(teacher.device.type)):
        common = torch.promote_types(student.dtype, teacher.dtype)
        return student.to(common), teacher.to(common)
    return student, teacher


def hta_kl_div(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float = 2.0,
    delta: float = 0.5,
    time_reduction: str = "prob_mean",
    detach_weights: bool = False,
    reduction: str = "batchmean",
    backend: str = "auto",
    group=None,
) -> torch.Tensor:
    """Head-tail-aware KL divergence between a student and a teacher (docs/SPEC.md section 1).

    Args:
        student: logits `[..., C]`, or `[T, ..., C]` (one extra leading time dimension, e.g. an
            SNN's per-timestep outputs).
        teacher: logits `[..., C]`.
        temperature: softmax temperature, > 0.
        delta: head mass in (0, 1]: classes whose cumulative teacher mass (largest first) stays
            below delta form the head.
        time_reduction: "prob_mean" (average per-step probabilities) or "logit_mean".
        detach_weights: treat the head/tail weights as constants in the backward.
        reduction: "batchmean" (mean over rows), "sum", or "none" (shape `teacher.shape[:-1]`).
        backend: "auto", "reference", "cpu", "triton" or "cuda" (env HTAKL_BACKEND overrides auto).
        group: a torch.distributed process group whose ranks each hold a contiguous slice of the
            classes (vocab parallelism, ranks in group order, slices of any size including 0):
            every rank passes its slices of the same rows and the same options, and gets the
            loss of the whole rows and, in the backward, the gradient of its own slices
            (`htakl_kernels.distributed` says which collectives run). None, or a group of one
            rank, is the single-device call.

    Returns a 0-d tensor for "batchmean" and "sum", and a tensor of shape `teacher.shape[:-1]`
    (one value per row, also for a `[T, ...]` student) for "none", in the student's dtype. The
    value is the divergence itself: no temperature**2 factor is applied (multiply by it yourself
    to keep gradient magnitudes comparable across temperatures, as Hinton et al. suggest).

    Empty batches: "sum" gives 0, "none" an empty tensor, "batchmean" raises ValueError.
    """
    return weighted_hta_kl_div(
        student, teacher, weight=1.0, temperature=temperature, delta=delta,
        time_reduction=time_reduction, detach_weights=detach_weights, reduction=reduction,
        backend=backend, group=group,
    )


def weighted_hta_kl_div(student: torch.Tensor, teacher: torch.Tensor, *, weight: float,
                        temperature: float, delta: float, time_reduction: str,
                        detach_weights: bool, reduction: str, backend: str,
                        group=None) -> torch.Tensor:
    """`weight * hta_kl_div(...)`, the weight (> 0) applied inside the kernel where one runs, so
    that a weighted sum of losses (SpikingKDLoss's alpha * HTA-KL) still backpropagates without
    a pass over the gradient (`_ops/hta_kl.py`)."""
    student, teacher = _autocast_to_common_dtype(student, teacher)
    if is_parallel(group):
        return vocab_parallel_hta_kl_div(
            student, teacher, group=group, weight=weight, temperature=temperature, delta=delta,
            time_reduction=time_reduction, detach_weights=detach_weights, reduction=reduction,
            backend=backend)
    shape = check_hta_kl_args(student, teacher, temperature, delta, time_reduction, detach_weights,
                              reduction)
    chosen = resolve_hta_kl_backend(backend, teacher.device, teacher.dtype, shape.rows,
                                    shape.classes)
    if chosen == "reference" or shape.rows == 0:  # an empty batch launches no kernel
        loss = reference.hta_kl_div(
            student, teacher, temperature=temperature, delta=delta, time_reduction=time_reduction,
            detach_weights=detach_weights, reduction=reduction,
        )
        return loss if weight == 1.0 else weight * loss
    # SPEC 1.7's reduction: the kernel weighs each row by its share (1/R for batchmean), so what
    # is left is a sum, whose gradient reaches the rows as one expanded value (_ops/hta_kl.py).
    row_scale = shape.row_scale(reduction, weight)
    loss_rows = hta_kl_rows(
        kernel_ops(chosen).hta_kl_fused,
        student.reshape(shape.steps, shape.rows, shape.classes),
        teacher.reshape(shape.rows, shape.classes),
        temperature=temperature, delta=delta,
        logit_mean=shape.time_input and time_reduction == "logit_mean",
        detach_weights=detach_weights, row_scale=row_scale,
    )
    loss = loss_rows.reshape(shape.rows_shape) if reduction == "none" else loss_rows.sum()
    return loss if loss.dtype == student.dtype else loss.to(student.dtype)
