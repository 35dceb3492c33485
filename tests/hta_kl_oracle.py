"""Test inputs and the float64 oracle shared by every HTA-KL backend's tests.

Kernels accumulate in another order than the reference's cumulative sum, so a class whose exact
cumulative teacher mass lies within rounding of delta may land on either side of the head
boundary (SPEC 1, "Rounding at the head boundary"). `draw_case` draws teachers whose every
cumulative mass is at least `boundary_tolerance` away from delta, checked in float64, so kernel and
oracle must agree on the membership exactly; rows that happen to fall too close are redrawn.
"""

from __future__ import annotations

import torch

from htakl_kernels.reference import hta_kl_rows, reduce_rows

ACCUMULATION_EPS = {
    torch.float64: torch.finfo(torch.float64).eps,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.float32).eps,
    torch.float16: torch.finfo(torch.float32).eps,
}

# Tolerances for comparing a kernel against the float64 oracle, by storage dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=2e-4, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
    torch.float16: dict(rtol=5e-3, atol=5e-4),
}


def boundary_tolerance(classes: int, dtype: torch.dtype) -> float:
    """How close to delta a cumulative mass may be before rounding can flip its side.

    SPEC's worst case is about C * eps; kernels sum the masses pairwise (or in a wider type), whose
    error grows like sqrt(C) * eps at most a small factor, so 16 sqrt(C) eps is a safe margin.
    """
    return 16.0 * max(classes, 16) ** 0.5 * ACCUMULATION_EPS[dtype]


def boundary_margin(teacher: torch.Tensor, temperature: float, delta: float) -> torch.Tensor:
    """Per row, the float64 distance between delta and the nearest cumulative teacher mass."""
    p = torch.softmax(teacher.double() / temperature, dim=-1)
    cumulative = torch.sort(p, dim=-1, descending=True, stable=True).values.cumsum(-1)
    return (cumulative - delta).abs().min(dim=-1).values


def draw_teacher(rows: int, classes: int, *, temperature: float, delta: float, dtype: torch.dtype,
                 scale: float = 8.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random teacher logits `[rows, classes]` in `dtype`, every row clear of the head boundary."""
    tolerance = boundary_tolerance(classes, dtype)
    teacher = (torch.randn(rows, classes, generator=generator) * scale).to(dtype)
    for _ in range(200):
        close = boundary_margin(teacher, temperature, delta) < tolerance
        if not close.any():
            return teacher
        redrawn = torch.randn(int(close.sum()), classes, generator=generator) * scale
        teacher[close] = redrawn.to(dtype)
    raise AssertionError(f"could not draw {rows}x{classes} teacher rows clear of delta={delta}")


def oracle(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float, delta: float,
           time_reduction: str = "prob_mean", detach_weights: bool = False,
           reduction: str = "batchmean"):
    """float64 loss and gradients (autograd of the reference) for 2-D or `[T, R, C]` students.

    Returns (loss, d loss / d student, d loss / d teacher), gradients for upstream gradient 1 on
    the reduced loss (for reduction="none", on the sum of the rows).
    """
    student64 = student.detach().double().requires_grad_(True)
    teacher64 = teacher.detach().double().requires_grad_(True)
    time_input = student.dim() == teacher.dim() + 1
    rows = hta_kl_rows(student64, teacher64, temperature, delta, time_input, time_reduction,
                       detach_weights)
    loss = reduce_rows(rows, reduction, teacher.shape[:-1])
    grad_student, grad_teacher = torch.autograd.grad(loss.sum(), (student64, teacher64))
    return loss.detach(), grad_student, grad_teacher


def assert_close_to_oracle(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                           what: str) -> None:
    """Compare in float64 on the CPU; non-finite values must match in place and kind."""
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), equal_nan=True,
                               msg=lambda m: f"{what}: {m}", **TOLERANCES[dtype])
