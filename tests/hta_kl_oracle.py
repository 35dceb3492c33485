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


def draw_student(teacher: torch.Tensor, steps: int | None, generator: torch.Generator) -> torch.Tensor:
    """Student logits loosely correlated with the teacher, `[R, C]` or `[T, R, C]`."""
    shape = teacher.shape if steps is None else (steps, *teacher.shape)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64) * 4
    return (0.5 * teacher.double() + noise).to(teacher.dtype)


def call_op(target, *args):
    """The target's fused op (loss rows, d student, d teacher) with the op's positional args."""
    if target.backend == "triton":
        from htakl_kernels.triton_kernels.hta_kl import launch_hta_kl

        return launch_hta_kl(*args, **target.launch_options)
    if target.emulated:
        import cuda_emulated

        return cuda_emulated.hta_kl_fused(*args)
    return torch.ops.htakl.hta_kl_fused.default(*args)


def fused(target, student, teacher, *, temperature, delta, time_reduction="prob_mean",
          detach_weights=False, grad_student=True, grad_teacher=True):
    """The op on a 2-D or `[T, R, C]` student, moved to the target's device: (loss rows,
    d student shaped like student, d teacher)."""
    time_input = student.dim() == teacher.dim() + 1
    student3 = student if time_input else student.unsqueeze(0)
    loss, d_student, d_teacher = call_op(
        target, student3.to(target.device).contiguous(), teacher.to(target.device).contiguous(),
        temperature, delta, time_input and time_reduction == "logit_mean", detach_weights,
        grad_student, grad_teacher)
    if grad_student and not time_input:
        d_student = d_student[0]
    return loss, d_student, d_teacher


def assert_close_for_row_size(actual, expected, dtype, classes, what):
    """assert_close_to_oracle, with the tolerance widened by sqrt(C / 1024) beyond 1024 classes.

    Row sums (log-sum-exps, F, R, d_head, d_tail) carry a rounding error that grows like sqrt(C)
    eps, and every gradient element contains them (SPEC 2): even the float32 reference misses the
    fixed float32 tolerance by a few times at C = 50257. Up to 1024 classes the tolerance is exactly
    the oracle's.
    """
    widen = max(1.0, (classes / 1024) ** 0.5)
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), equal_nan=True,
                               rtol=tolerance["rtol"] * widen, atol=tolerance["atol"] * widen,
                               msg=lambda m: f"{what}: {m}")


def check_fused_against_oracle(target, student, teacher, *, temperature, delta, time_reduction,
                               detach_weights=False, what=""):
    """The op's loss rows and both gradients against the float64 oracle (reduction "none"), with
    the op's result dtypes: loss rows in the accumulation dtype, gradients in the input's.
    Returns the op's results, on the CPU."""
    dtype = teacher.dtype
    classes = teacher.shape[-1]
    loss, d_student, d_teacher = fused(target, student, teacher, temperature=temperature,
                                       delta=delta, time_reduction=time_reduction,
                                       detach_weights=detach_weights)
    expected_loss, expected_student, expected_teacher = oracle(
        student.cpu(), teacher.cpu(), temperature=temperature, delta=delta,
        time_reduction=time_reduction, detach_weights=detach_weights, reduction="none")
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert d_student.dtype == dtype and d_student.shape == student.shape
    assert d_teacher.dtype == dtype and d_teacher.shape == teacher.shape
    assert_close_for_row_size(loss, expected_loss, dtype, classes, f"{what} loss")
    assert_close_for_row_size(d_student, expected_student, dtype, classes, f"{what} d student")
    assert_close_for_row_size(d_teacher, expected_teacher, dtype, classes, f"{what} d teacher")
    return loss.cpu(), d_student.cpu(), d_teacher.cpu()


PEAKED_DELTA = 0.6


def add_peaks(teacher, generator):
    """Give each row (temperature 1) three peaks over its bulk: p about 0.46, 0.27, 0.17.

    With very many classes, random logits put countless cumulative masses within rounding of any
    delta; with the peaks, the head for PEAKED_DELTA is the first peak, 0.13 clear of delta.
    """
    bulk = torch.logsumexp(teacher.float(), dim=-1, keepdim=True)
    for row in range(teacher.shape[0]):
        peaks = torch.randperm(teacher.shape[-1], generator=generator)[:3].to(teacher.device)
        heights = bulk[row] + torch.tensor([4.7, 2.8, 1.7], device=teacher.device).log()
        teacher[row, peaks] = heights.to(teacher.dtype)
    assert (boundary_margin(teacher, 1.0, PEAKED_DELTA) > 0.05).all()
    return teacher
