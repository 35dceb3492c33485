"""Glue of the fused HTA-KL op: its fake implementation, its autograd formula, and the call.

Below the kernels: every kernel module registers its op here (`register_hta_kl_op`).

Every kernel backend implements one fused op with this contract (schema `_library.HTA_KL_SCHEMA`;
the C++ kernels implement `htakl::hta_kl_fused`, Triton `htakl::hta_kl_fused_triton`):

    hta_kl_fused(student [T, R, C], teacher [R, C], temperature, delta, logit_mean,
                 detach_weights, grad_student, grad_teacher, row_scale=1.0)
        -> (row_scale * loss_row, [R] in the accumulation dtype (float32, or float64 for float64
            inputs),
            d (row_scale * loss_row) / d student  [T, R, C] in student's dtype, or an empty tensor,
            d (row_scale * loss_row) / d teacher  [R, C] in teacher's dtype, or an empty tensor)

Inputs are contiguous, validated, and 2-D students come in as T = 1 (docs/SPEC.md 1.2's softmax
equals prob_mean with one step). The gradients are those of each row's own loss (upstream
gradient 1, docs/SPEC.md section 2), computed in the forward pass so the backward only scales them
by the incoming per-row gradient: one read of each input and one write of each gradient in all.

`row_scale` is each row's weight in the reduction that follows (1/R for batchmean, 1 for sum):
the reduction is then a plain sum, and when the upstream gradient of that sum is exactly 1 (a
loss on its own, `loss.backward()`) and the graph is not retained, the backward returns the saved
gradients as they are, with no further pass over them (autograd frees the graph's reference, so
the buffer becomes the input's gradient). Otherwise it scales them into a new tensor.
"""

from __future__ import annotations

import torch

from .._library import accumulation_dtype
from .._validation import check_first_order_backward
from .autograd import call, register_autograd


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
    return grad_loss_rows[0].item() == 1  # a Python scalar: no tensor for the comparison


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
    """Give one backend's fused op its fake implementation and autograd formula. Each kernel
    module calls this for its op when it is imported, so an op is never used unregistered."""
    torch.library.register_fake(op, _fake_hta_kl_fused)
    register_autograd(op, _backward, _setup_context)


# The compiled kernels' op (CPU and CUDA register their implementations under it in C++).
register_hta_kl_op(torch.ops.htakl.hta_kl_fused.default)


def hta_kl_rows(op, student_rows: torch.Tensor, teacher_rows: torch.Tensor, *,
                temperature: float, delta: float, logit_mean: bool, detach_weights: bool,
                row_scale: float) -> torch.Tensor:
    """`row_scale` x each row's loss through a backend's fused `op`: `[R]` in the accumulation
    dtype, differentiable to both inputs. `student_rows` is `[T, R, C]` (T = 1 for a 2-D
    student), `teacher_rows` `[R, C]`, both validated."""
    loss_rows, _, _ = call(
        op, student_rows.contiguous(), teacher_rows.contiguous(), float(temperature), float(delta),
        bool(logit_mean), bool(detach_weights),
        student_rows.requires_grad and torch.is_grad_enabled(),
        teacher_rows.requires_grad and torch.is_grad_enabled(),
        float(row_scale),
    )
    return loss_rows
