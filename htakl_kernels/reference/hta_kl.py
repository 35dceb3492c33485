"""Pure-PyTorch HTA-KL: the correctness oracle for every kernel.

Mirrors docs/SPEC.md section 1 step by step and is differentiated by autograd. Half and
bfloat16 inputs are computed in float32 and the result cast back; float32 and float64 are
computed in their own dtype.
"""

from __future__ import annotations

import math

import torch

from .._library import accumulation_dtype
from .._validation import check_hta_kl_args


def _xlogy_difference(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x (log x - log y) with 0 log 0 = 0 (SPEC 1.6), without NaN gradients where x == 0."""
    positive = x > 0
    safe_log_x = torch.where(positive, log_x, torch.zeros_like(log_x))
    safe_log_y = torch.where(positive, log_y, torch.zeros_like(log_y))
    return torch.where(positive, x * (safe_log_x - safe_log_y), torch.zeros_like(x))


def head_mask(p: torch.Tensor, delta: float) -> torch.Tensor:
    """SPEC 1.3: stable descending sort, cumulative mass, head = cumulative mass < delta."""
    order = torch.sort(p.detach(), dim=-1, descending=True, stable=True).indices
    cumulative = torch.cumsum(torch.gather(p.detach(), -1, order), dim=-1)
    mask = torch.empty_like(cumulative, dtype=torch.bool)
    mask.scatter_(-1, order, cumulative < delta)
    return mask


def student_distribution(
    student: torch.Tensor, temperature: float, time_input: bool, time_reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 1.2: the student's q and log q over rows `[R, C]` (student `[T, R, C]` or `[R, C]`)."""
    if not time_input:
        log_q = torch.log_softmax(student / temperature, dim=-1)
        return torch.softmax(student / temperature, dim=-1), log_q
    if time_reduction == "logit_mean":
        mean_logits = student.mean(dim=0)
        return (
            torch.softmax(mean_logits / temperature, dim=-1),
            torch.log_softmax(mean_logits / temperature, dim=-1),
        )
    steps = student.shape[0]
    q = torch.softmax(student / temperature, dim=-1).mean(dim=0)
    log_q_steps = torch.log_softmax(student / temperature, dim=-1)
    # A class masked (-inf) at every step has q = 0 exactly: log q = -inf. Its logsumexp is kept
    # off the autograd path, whose backward would compute exp(-inf - (-inf)) = NaN.
    never = torch.isneginf(log_q_steps).all(dim=0)
    safe_log_q_steps = torch.where(never, torch.zeros_like(log_q_steps), log_q_steps)
    log_q = torch.where(
        never, torch.full_like(q, -math.inf), torch.logsumexp(safe_log_q_steps, dim=0) - math.log(steps)
    )
    return q, log_q


def hta_kl_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    delta: float,
    time_input: bool,
    time_reduction: str = "prob_mean",
    detach_weights: bool = False,
    head: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row HTA-KL loss, SPEC 1 steps 1-6, in the dtype the inputs are computed in.

    `head` overrides step 3's membership (a bool mask like the teacher): tests use it to evaluate
    both sides of a row whose boundary lies within rounding of delta.
    """
    # Step 1: teacher.
    p = torch.softmax(teacher / temperature, dim=-1)
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    # Step 2: student.
    q, log_q = student_distribution(student, temperature, time_input, time_reduction)
    # Step 3: head / tail split (piecewise constant: no gradient).
    if head is None:
        head = head_mask(p, delta)
    # Step 4: distances.
    distance = (p - q).abs()
    d_head = torch.where(head, distance, torch.zeros_like(distance)).sum(dim=-1)
    d_tail = torch.where(head, torch.zeros_like(distance), distance).sum(dim=-1)
    # Step 5: weights, 1/2 each when both distances vanish.
    total = d_head + d_tail
    vanished = total == 0
    safe_total = torch.where(vanished, torch.ones_like(total), total)
    half = torch.full_like(total, 0.5)
    lam_h = torch.where(vanished, half, d_head / safe_total)
    lam_t = torch.where(vanished, half, d_tail / safe_total)
    if detach_weights:
        lam_h, lam_t = lam_h.detach(), lam_t.detach()
    # Step 6: forward and reverse KL, weighted.
    fkl = _xlogy_difference(p, log_p, log_q).sum(dim=-1)
    rkl = _xlogy_difference(q, log_q, log_p).sum(dim=-1)
    return lam_h * fkl + lam_t * rkl


def reduce_rows(loss_rows: torch.Tensor, reduction: str, rows_shape: torch.Size) -> torch.Tensor:
    """SPEC 1.7: batchmean (mean over rows), sum, or none (shaped like the teacher's rows)."""
    if reduction == "none":
        return loss_rows.reshape(rows_shape)
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.mean()


def hta_kl_div(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float = 2.0,
    delta: float = 0.5,
    time_reduction: str = "prob_mean",
    detach_weights: bool = False,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Reference HTA-KL divergence; same contract as :func:`htakl_kernels.hta_kl_div`."""
    shape = check_hta_kl_args(student, teacher, temperature, delta, time_reduction, detach_weights,
                              reduction)
    compute_dtype = accumulation_dtype(student.dtype)
    classes = shape.classes
    student_rows = student.to(compute_dtype).reshape(
        (shape.steps, shape.rows, classes) if shape.time_input else (shape.rows, classes)
    )
    teacher_rows = teacher.to(compute_dtype).reshape(shape.rows, classes)
    loss_rows = hta_kl_rows(
        student_rows, teacher_rows, temperature, delta, shape.time_input, time_reduction, detach_weights
    )
    return reduce_rows(loss_rows, reduction, shape.rows_shape).to(student.dtype)
