"""HTA-KL divergence: public function, op registration shared by the kernels, autograd glue.

Every kernel backend implements one fused op with this contract (schema `_ops.HTA_KL_SCHEMA`;
the C++ kernels implement `htakl::hta_kl_fused`, Triton `htakl::hta_kl_fused_triton`):

    hta_kl_fused(student [T, R, C], teacher [R, C], temperature, delta, logit_mean,
                 detach_weights, grad_student, grad_teacher, row_scale=1.0)
        -> (row_scale * loss_row, [R] in the accumulation dtype (float32, or float64 for float64
            inputs),
            d (row_scale * loss_row) / d student  [T, R, C] in student's dtype, or an empty tensor,
            d (row_scale * loss_row) / d teacher  [R, C] in teacher's dtype, or an empty tensor)

Inputs are contiguous, validated, and 2-D students come in as T = 1 (SPEC 1.2's softmax equals
prob_mean with one step). The gradients are those of each row's own loss (upstream gradient 1,
SPEC 2), computed in the forward pass so the backward only scales them by the incoming
per-row gradient: one read of each input and one write of each gradient in all.

`row_scale` is each row's weight in the reduction that follows (1/R for batchmean, 1 for sum):
the reduction is then a plain sum, and when the upstream gradient of that sum is exactly 1 (a
loss on its own, `loss.backward()`) and the graph is not retained, the backward returns the saved
gradients as they are, with no further pass over them (autograd frees the graph's reference, so
the buffer becomes the input's gradient). Otherwise it scales them into a new tensor.
"""

from __future__ import annotations

import torch

from . import reference
from ._backends import resolve_backend
from ._validation import check_first_order_backward, check_hta_kl_args



def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_hta_kl_fused(student, teacher, temperature, delta, logit_mean, detach_weights,
                       grad_student, grad_teacher, row_scale=1.0):
    loss_rows = teacher.new_empty(teacher.shape[0], dtype=accumulation_dtype(teacher.dtype))
    d_student = torch.empty_like(student) if grad_student else student.new_empty(0)
    d_teacher = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    return loss_rows, d_student, d_teacher


def _setup_context(ctx, inputs, output):
    _, d_student, d_teacher = output
    ctx.save_for_backward(d_student, d_teacher)
    ctx.wants = (inputs[6], inputs[7])
    # The gradient outputs carry no gradient themselves; without this, autograd would allocate and
    # zero-fill a full-size tensor for each of them on every backward.
    ctx.mark_non_differentiable(d_student, d_teacher)
    ctx.set_materialize_grads(False)


def _hand_on_saved_gradients(grad_loss_rows: torch.Tensor) -> bool:
    """Whether the backward may return the saved gradients themselves: every row's upstream
    gradient is exactly 1, and the graph is freed after this backward (no retain_graph), so the
    returned buffer has no other owner. The upstream test reads no rows: the gradient of a sum
    over the rows is its scalar gradient expanded (stride 0), and only that one value is read,
    which synchronizes with a GPU (as Liger-Kernel's test of grad_output does). A traced backward
    (torch.compile) and one captured into a CUDA graph, where no value can be read, always
    scale."""
    if torch.compiler.is_compiling() or grad_loss_rows.dim() != 1:
        return False
    if grad_loss_rows.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None or keep_graph():
        return False
    if grad_loss_rows.numel() > 1 and grad_loss_rows.stride(0) != 0:
        return False
    return bool(grad_loss_rows.reshape(-1)[0] == 1)


def _backward(ctx, grad_loss_rows, _grad_d_student, _grad_d_teacher):
    check_first_order_backward("hta_kl_div")
    if grad_loss_rows is None:  # the loss rows did not reach what was differentiated
        return (None,) * 9
    d_student, d_teacher = ctx.saved_tensors
    want_student, want_teacher = ctx.wants
    if _hand_on_saved_gradients(grad_loss_rows):
        grad_student, grad_teacher = d_student, d_teacher
    else:
        grad_student = d_student * grad_loss_rows.to(d_student.dtype).view(1, -1, 1)
        grad_teacher = d_teacher * grad_loss_rows.to(d_teacher.dtype).view(-1, 1)
    return (grad_student if want_student else None, grad_teacher if want_teacher else None,
            None, None, None, None, None, None, None)


def register_hta_kl_op(op) -> None:
    """Give a kernel backend's fused op its fake implementation and autograd formula."""
    torch.library.register_fake(op, _fake_hta_kl_fused)
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


def _fused_op(backend: str):
    if backend == "triton":
        from .triton_kernels.hta_kl import hta_kl_fused_triton

        return hta_kl_fused_triton
    return torch.ops.htakl.hta_kl_fused.default


register_hta_kl_op(torch.ops.htakl.hta_kl_fused.default)


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
    _weight: float = 1.0,
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

    Empty batches: "sum" gives 0, "none" an empty tensor, "batchmean" raises ValueError.
    """
    # `_weight` (internal, > 0) multiplies the result, inside the kernel where one runs, so that a
    # weighted sum of losses (SpikingKDLoss's alpha * HTA-KL) still backpropagates without a pass
    # over the gradient (_backward).
    student, teacher = _autocast_to_common_dtype(student, teacher)
    shape = check_hta_kl_args(student, teacher, temperature, delta, time_reduction, detach_weights,
                              reduction)
    chosen = resolve_backend(backend, teacher.device)
    if chosen == "reference" or shape.rows == 0:  # an empty batch launches no kernel
        loss = reference.hta_kl_div(
            student, teacher, temperature=temperature, delta=delta, time_reduction=time_reduction,
            detach_weights=detach_weights, reduction=reduction,
        )
        return loss if _weight == 1.0 else _weight * loss
    student_rows = student.reshape(shape.steps, shape.rows, shape.classes).contiguous()
    teacher_rows = teacher.reshape(shape.rows, shape.classes).contiguous()
    # SPEC 1.7's reduction: the kernel weighs each row by its share (1/R for batchmean), so what
    # is left is a sum, whose gradient reaches the rows as one expanded value (_backward).
    row_scale = (1.0 / shape.rows if reduction == "batchmean" else 1.0) * _weight
    loss_rows, _, _ = _fused_op(chosen)(
        student_rows, teacher_rows, float(temperature), float(delta),
        shape.time_input and time_reduction == "logit_mean", bool(detach_weights),
        student.requires_grad and torch.is_grad_enabled(),
        teacher.requires_grad and torch.is_grad_enabled(),
        row_scale,
    )
    loss = loss_rows.reshape(shape.rows_shape) if reduction == "none" else loss_rows.sum()
    return loss.to(student.dtype)
