"""The fused C++ CPU kernel (htakl::hta_kl_fused, backend="cpu") against the float64 oracle.

Random teachers are drawn clear of the head boundary (tests/hta_kl_oracle.py), so kernel and oracle
must agree on head membership exactly. Edge cases whose boundary is ambiguous by construction (ties,
all-equal rows, delta = 1) are compared row by row against every membership the float64 oracle
cannot rule out (SPEC 1, "Rounding at the head boundary").
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import htakl_kernels
from htakl_kernels.reference import hta_kl_rows

from hta_kl_oracle import (
    TOLERANCES,
    assert_close_to_oracle,
    boundary_margin,
    boundary_tolerance,
    draw_teacher,
    oracle,
)

OP = torch.ops.htakl.hta_kl_fused.default
REDUCTIONS = ("batchmean", "sum", "none")
# Student modes: name -> (time steps, or None for a 2-D student; time_reduction).
MODES = {
    "2d": (None, "prob_mean"),
    "prob_mean_T1": (1, "prob_mean"),
    "prob_mean_T4": (4, "prob_mean"),
    "logit_mean_T1": (1, "logit_mean"),
    "logit_mean_T4": (4, "logit_mean"),
}
DTYPES = (torch.float64, torch.float32, torch.bfloat16)


def draw_student(teacher: torch.Tensor, steps: int | None, generator: torch.Generator) -> torch.Tensor:
    """Student logits loosely correlated with the teacher, `[R, C]` or `[T, R, C]`."""
    shape = teacher.shape if steps is None else (steps, *teacher.shape)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64) * 4
    return (0.5 * teacher.double() + noise).to(teacher.dtype)


def kernel_loss_and_grads(student, teacher, backend_="cpu", **kwargs):
    """Loss and gradients of hta_kl_div(backend="cpu") for upstream gradient 1 on loss.sum()."""
    student = student.detach().clone().requires_grad_(True)
    teacher = teacher.detach().clone().requires_grad_(True)
    loss = htakl_kernels.hta_kl_div(student, teacher, backend=backend_, **kwargs)
    grad_student, grad_teacher = torch.autograd.grad(loss.sum(), (student, teacher))
    return loss.detach(), grad_student, grad_teacher


def assert_matches_oracle(student, teacher, **kwargs):
    dtype = teacher.dtype
    loss, grad_student, grad_teacher = kernel_loss_and_grads(student, teacher, **kwargs)
    expected_loss, expected_student, expected_teacher = oracle(student, teacher, **kwargs)
    assert loss.dtype == dtype and grad_student.dtype == dtype and grad_teacher.dtype == dtype
    assert_close_to_oracle(loss, expected_loss, dtype, "loss")
    assert_close_to_oracle(grad_student, expected_student, dtype, "d loss / d student")
    assert_close_to_oracle(grad_teacher, expected_teacher, dtype, "d loss / d teacher")


def sweep_sizes(mode: str) -> list[tuple[int, int]]:
    """Every rows count for small C, fewer rows as C grows (keeps the file fast)."""
    sizes = [(rows, classes) for classes in (1, 2, 3, 7) for rows in (1, 5, 64)]
    sizes += [(64, 1000), (5, 1025), (1, 32000)]
    if mode in ("2d", "prob_mean_T4"):
        sizes.append((5, 32000))
    return sizes


def sweep_cases():
    return [
        pytest.param(dtype, mode, rows, classes, id=f"{str(dtype)[6:]}-{mode}-{rows}x{classes}")
        for dtype in DTYPES
        for mode in MODES
        for rows, classes in sweep_sizes(mode)
    ]


@pytest.mark.parametrize("dtype, mode, rows, classes", sweep_cases())
def test_matches_oracle(dtype, mode, rows, classes):
    steps, time_reduction = MODES[mode]
    generator = torch.Generator().manual_seed(rows * 100003 + classes * 7 + len(mode))
    teacher = draw_teacher(rows, classes, temperature=2.0, delta=0.5, dtype=dtype, generator=generator)
    student = draw_student(teacher, steps, generator)
    # Reductions only scale the per-row gradients: rotate them over the cases (all three are
    # covered per mode in test_every_reduction); likewise detach_weights for the large rows.
    reduction = REDUCTIONS[(rows + classes) % 3]
    detach_options = (False, True) if classes < 1000 else (bool((classes + len(mode)) % 2),)
    for detach_weights in detach_options:
        assert_matches_oracle(student, teacher, temperature=2.0, delta=0.5,
                              time_reduction=time_reduction, detach_weights=detach_weights,
                              reduction=reduction)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.float16))
def test_every_reduction(dtype, reduction, mode):
    steps, time_reduction = MODES[mode]
    generator = torch.Generator().manual_seed(11)
    teacher = draw_teacher(6, 33, temperature=1.5, delta=0.3, dtype=dtype, generator=generator)
    student = draw_student(teacher, steps, generator)
    for detach_weights in (False, True):
        assert_matches_oracle(student, teacher, temperature=1.5, delta=0.3,
                              time_reduction=time_reduction, detach_weights=detach_weights,
                              reduction=reduction)


def test_long_rows_and_leading_dims():
    generator = torch.Generator().manual_seed(5)
    teacher = draw_teacher(2, 131072, temperature=2.0, delta=0.7, dtype=torch.float32,
                           generator=generator)
    student = draw_student(teacher, 3, generator)
    assert_matches_oracle(student, teacher, temperature=2.0, delta=0.7)
    # Leading dims are flattened into rows; reduction="none" keeps their shape.
    teacher = draw_teacher(12, 9, temperature=2.0, delta=0.5, dtype=torch.float64,
                           generator=generator).reshape(3, 4, 9)
    student = draw_student(teacher, 2, generator)
    assert_matches_oracle(student, teacher, temperature=2.0, delta=0.5, reduction="none")


# ---- edge cases: compared row by row with every membership the oracle cannot rule out ----------


def possible_heads(teacher_row: torch.Tensor, temperature: float, delta: float,
                   dtype: torch.dtype) -> list[torch.Tensor]:
    """Head masks `[1, C]`: the stable-sort prefixes whose float64 cumulative masses are within
    boundary_tolerance of delta may end on either side; one mask per admissible prefix length."""
    tolerance = boundary_tolerance(teacher_row.numel(), dtype)
    p = torch.softmax(teacher_row.double() / temperature, dim=-1)
    order = torch.sort(p, descending=True, stable=True).indices
    cumulative = p[order].cumsum(0)
    surely = int((cumulative < delta - tolerance).sum())
    possibly = int((cumulative < delta + tolerance).sum())
    masks = []
    for length in range(surely, possibly + 1):
        mask = torch.zeros(1, p.numel(), dtype=torch.bool)
        mask[0, order[:length]] = True
        masks.append(mask)
    return masks


def oracle_row(student_row, teacher_row, head, *, temperature, delta, time_reduction,
               detach_weights):
    student64 = student_row.detach().double().requires_grad_(True)
    teacher64 = teacher_row.detach().double().requires_grad_(True)
    loss = hta_kl_rows(student64, teacher64, temperature, delta, student_row.dim() == 3,
                       time_reduction, detach_weights, head=head)
    grads = torch.autograd.grad(loss.sum(), (student64, teacher64))
    return (loss.detach(), *grads)


def is_close(actual, expected, dtype, slack=None) -> bool:
    """Within the dtype's tolerance of the oracle, plus an elementwise `slack` if given."""
    if slack is None:
        try:
            assert_close_to_oracle(actual, expected, dtype, "")
        except AssertionError:
            return False
        return True
    tolerance = TOLERANCES[dtype]
    error = (actual.double() - expected.double()).abs()
    return bool((error <= tolerance["atol"] + tolerance["rtol"] * expected.abs() + slack).all())


def assert_rows_match_some_membership(student, teacher, *, temperature, delta, time_reduction,
                                      detach_weights, reference_slack=False):
    """Row by row, kernel == oracle for one of the admissible head memberships.

    reference_slack: for inputs whose float32 log-probabilities are themselves inexact (logits / tau
    in the hundreds and more), each element may also be off by 4 times the largest error of the
    reference evaluated in the input's dtype: the kernel must be about as accurate as float32 math
    allows.
    """
    dtype = teacher.dtype
    kwargs = dict(temperature=temperature, delta=delta, time_reduction=time_reduction,
                  detach_weights=detach_weights)
    actual_all = kernel_loss_and_grads(student, teacher, reduction="none", **kwargs)
    slack_all = (None, None, None)
    if reference_slack:
        in_dtype = kernel_loss_and_grads(student, teacher, reduction="none", backend_="reference",
                                         **kwargs)
        exact = oracle(student, teacher, reduction="none", **kwargs)
        slack_all = tuple(4 * (r.double() - e).abs().max() for r, e in zip(in_dtype, exact))
    time_input = student.dim() == teacher.dim() + 1
    for row in range(teacher.shape[0]):
        pick = (slice(None), slice(row, row + 1)) if time_input else (slice(row, row + 1),)
        row_parts = ((slice(row, row + 1),), pick, (slice(row, row + 1),))
        actual = tuple(x[part] for x, part in zip(actual_all, row_parts))
        slack = slack_all
        options = possible_heads(teacher[row], temperature, delta, dtype)
        for head in options:
            expected = oracle_row(student[pick], teacher[row:row + 1], head, **kwargs)
            if all(is_close(*args, dtype, d) for *args, d in zip(actual, expected, slack)):
                break
        else:
            expected = oracle_row(student[pick], teacher[row:row + 1], None, **kwargs)
            for what, a, e, d in zip(("loss", "d student", "d teacher"), actual, expected, slack):
                if d is None:  # report the differences against the oracle's own membership
                    assert_close_to_oracle(a, e, dtype, f"row {row} ({len(options)} memberships), {what}")
                else:
                    assert is_close(a, e, dtype, d), f"row {row}, {what}: beyond reference slack"
            raise AssertionError(f"row {row} matches none of {len(options)} admissible memberships")


def edge_ties(generator):
    # Integer logits: many tied teacher probabilities (ties broken by class index).
    return torch.randint(-2, 3, (6, 7), generator=generator).double(), 1.0, 0.5


def edge_ties_long(generator):
    return torch.randint(-3, 4, (3, 1000), generator=generator).double(), 2.0, 0.4


def edge_all_equal(generator):
    # All-equal rows: every class tied; C = 4 puts a cumulative mass exactly on delta = 0.5.
    return torch.zeros(3, 4, dtype=torch.float64) + torch.tensor([[0.0], [3.5], [-7.0]]), 2.0, 0.5


def edge_all_equal_long(generator):
    return torch.full((2, 1000), 1.25, dtype=torch.float64), 2.0, 0.37


def edge_confident(generator):
    # One dominant class, p_max >= delta: the head is empty.
    teacher = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    teacher[:, 3] += 40.0
    return teacher, 2.0, 0.5


def edge_delta_one(generator):
    return torch.randn(4, 11, generator=generator, dtype=torch.float64) * 3, 2.0, 1.0


def edge_cold(generator):
    return torch.randn(4, 50, generator=generator, dtype=torch.float64) * 3, 0.05, 0.5


def edge_hot(generator):
    return torch.randn(4, 50, generator=generator, dtype=torch.float64) * 3, 20.0, 0.5


def edge_huge_logits(generator):
    signs = torch.randint(0, 2, (4, 13), generator=generator).double() * 2 - 1
    return signs * 1e4 + torch.randn(4, 13, generator=generator, dtype=torch.float64), 1.0, 0.5


EDGES = {
    "ties": edge_ties,
    "ties_long": edge_ties_long,
    "all_equal": edge_all_equal,
    "all_equal_long": edge_all_equal_long,
    "confident": edge_confident,
    "delta_one": edge_delta_one,
    "temperature_0.05": edge_cold,
    "temperature_20": edge_hot,
    "logits_1e4": edge_huge_logits,
}
EDGE_MODES = ("2d", "prob_mean_T4", "logit_mean_T4")
# Logits / tau in the hundreds and more: float32 log-probabilities are inexact there (|log p| eps,
# amplified by 1/tau in the gradients); see assert_rows_match_some_membership's reference_slack.
ILL_CONDITIONED_IN_FLOAT32 = ("temperature_0.05", "logits_1e4")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode", EDGE_MODES)
@pytest.mark.parametrize("edge", EDGES)
def test_edge_case(edge, mode, dtype):
    generator = torch.Generator().manual_seed(3)
    teacher, temperature, delta = EDGES[edge](generator)
    teacher = teacher.to(dtype)
    steps, time_reduction = MODES[mode]
    if edge == "logits_1e4":  # the student far from the teacher too: q underflows in places
        shape = teacher.shape if steps is None else (steps, *teacher.shape)
        signs = torch.randint(0, 2, shape, generator=generator).double() * 2 - 1
        student = (signs * 1e4).to(dtype)
    else:
        student = draw_student(teacher, steps, generator)
    if edge == "confident":
        p = torch.softmax(teacher.double() / temperature, dim=-1)
        assert (p.max(dim=-1).values >= delta).all()
    for detach_weights in (False, True):
        assert_rows_match_some_membership(
            student, teacher, temperature=temperature, delta=delta, time_reduction=time_reduction,
            detach_weights=detach_weights,
            reference_slack=dtype != torch.float64 and edge in ILL_CONDITIONED_IN_FLOAT32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode", EDGE_MODES)
def test_masked_classes(mode, dtype):
    """-inf at the same classes of teacher and student: finite loss, finite gradients, zero at the
    masked classes. Masked in the student only (where the teacher has mass): infinite loss."""
    generator = torch.Generator().manual_seed(8)
    steps, time_reduction = MODES[mode]
    teacher = draw_teacher(5, 12, temperature=2.0, delta=0.5, dtype=torch.float64,
                           generator=generator)
    masked = torch.zeros(5, 12, dtype=torch.bool)
    masked[:, [0, 5, 6]] = True
    masked[2, 11] = True
    teacher = teacher.masked_fill(masked, -math.inf)
    assert (boundary_margin(teacher, 2.0, 0.5) > boundary_tolerance(12, dtype)).all()
    teacher = teacher.to(dtype)
    student = draw_student(teacher.masked_fill(masked, 0.0), steps, generator)
    student = student.masked_fill(masked if steps is None else masked.expand(steps, -1, -1),
                                  -math.inf)
    for detach_weights in (False, True):
        assert_matches_oracle(student, teacher, temperature=2.0, delta=0.5,
                              time_reduction=time_reduction, detach_weights=detach_weights,
                              reduction="none")
        loss, grad_student, grad_teacher = kernel_loss_and_grads(
            student, teacher, temperature=2.0, delta=0.5, time_reduction=time_reduction,
            detach_weights=detach_weights, reduction="none")
        assert torch.isfinite(loss).all()
        assert torch.isfinite(grad_student).all() and torch.isfinite(grad_teacher).all()
        assert (grad_teacher[masked] == 0).all()
        student_masked = masked if steps is None else masked.expand(steps, -1, -1)
        assert (grad_student[student_masked] == 0).all()

    # A class masked in the student only, where the teacher has mass: FKL is +inf, and the row's
    # loss inf or NaN (0 * inf) exactly where the reference's is.
    student_only = student.clone()
    student_only[..., 1, 2] = -math.inf
    loss = htakl_kernels.hta_kl_div(student_only, teacher, temperature=2.0,
                                    time_reduction=time_reduction, reduction="none",
                                    backend="cpu")
    expected, _, _ = oracle(student_only, teacher, temperature=2.0, delta=0.5,
                            time_reduction=time_reduction, reduction="none")
    assert not math.isfinite(expected[1])
    assert_close_to_oracle(loss, expected, dtype, "loss, masked in the student only")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ("teacher", "student"))
def test_nan_inputs_give_nan(where, mode):
    """A NaN logit makes its row's loss and gradients NaN (as in the reference), leaves the other
    rows alone, and never hangs. +inf logits (softmax NaN in the reference) too."""
    generator = torch.Generator().manual_seed(2)
    steps, time_reduction = MODES[mode]
    teacher = draw_teacher(4, 300, temperature=2.0, delta=0.5, dtype=torch.float32,
                           generator=generator)
    student = draw_student(teacher, steps, generator)
    target = teacher if where == "teacher" else student
    target[..., 1, 17] = math.nan
    target[..., 3, :] = math.nan
    target[..., 2, 40] = math.inf
    loss, grad_student, grad_teacher = kernel_loss_and_grads(
        student, teacher, temperature=2.0, time_reduction=time_reduction, reduction="none")
    expected_loss, _, _ = oracle(student, teacher, temperature=2.0, delta=0.5,
                                 time_reduction=time_reduction, reduction="none")
    assert torch.isnan(expected_loss[1:]).all()
    assert torch.isnan(loss[1:]).all() and torch.isfinite(loss[0])
    torch.testing.assert_close(loss[0].double(), expected_loss[0], **TOLERANCES[torch.float32])
    assert torch.isnan(grad_teacher[1:]).all() and torch.isfinite(grad_teacher[0]).all()
    assert torch.isnan(grad_student[..., 1:, :]).all()
    assert torch.isfinite(grad_student[..., 0, :]).all()


# ---- gradcheck, opcheck, determinism, direct calls ----------------------------------------------


def clear_teacher(rows, classes, temperature, delta, generator, margin=1e-3):
    """float64 teacher whose cumulative masses are `margin` from delta: gradcheck's finite
    differences must not move a class across the head boundary."""
    teacher = torch.randn(rows, classes, generator=generator, dtype=torch.float64) * 2
    for _ in range(200):
        close = boundary_margin(teacher, temperature, delta) < margin
        if not close.any():
            return teacher
        teacher[close] = torch.randn(int(close.sum()), classes, generator=generator,
                                     dtype=torch.float64) * 2
    raise AssertionError("no teacher clear of the boundary")


@pytest.mark.parametrize("mode", ("2d", "prob_mean_T4", "logit_mean_T4", "prob_mean_T1"))
def test_gradcheck(mode):
    steps, time_reduction = MODES[mode]
    generator = torch.Generator().manual_seed(4)
    teacher = clear_teacher(3, 6, 1.5, 0.45, generator)
    student = draw_student(teacher, steps, generator)
    teacher.requires_grad_(True)
    student.requires_grad_(True)

    def loss(s, t):
        return htakl_kernels.hta_kl_div(s, t, temperature=1.5, delta=0.45,
                                        time_reduction=time_reduction, detach_weights=False,
                                        reduction="none", backend="cpu")

    assert torch.autograd.gradcheck(loss, (student, teacher), eps=1e-6, atol=1e-7)


def opcheck_args():
    generator = torch.Generator().manual_seed(6)
    cases = []
    for dtype, steps, logit_mean, detach, want_student, want_teacher in (
        (torch.float32, 1, False, False, True, True),
        (torch.float64, 3, False, True, True, False),
        (torch.float64, 3, True, False, False, True),
        (torch.bfloat16, 2, False, False, True, True),
        (torch.float32, 2, True, True, False, False),
    ):
        teacher = torch.randn(4, 10, generator=generator).to(dtype)
        student = torch.randn(steps, 4, 10, generator=generator).to(dtype)
        student.requires_grad_(want_student)
        teacher.requires_grad_(want_teacher)
        row_scale = (0.25,) if logit_mean else ()  # the schema's default (1.0) otherwise
        cases.append((student, teacher, 2.0, 0.5, logit_mean, detach, want_student, want_teacher,
                      *row_scale))
    return cases


@pytest.mark.parametrize("args", opcheck_args(), ids=lambda args: f"{args[0].dtype}-T{args[0].shape[0]}")
def test_opcheck(args):
    torch.library.opcheck(OP, args)


def test_deterministic_across_calls_threads_and_alignment():
    generator = torch.Generator().manual_seed(9)
    teacher = draw_teacher(7, 3001, temperature=2.0, delta=0.5, dtype=torch.float32,
                           generator=generator)
    student = draw_student(teacher, 3, generator)
    for logit_mean in (False, True):
        args = (2.0, 0.5, logit_mean, False, True, True)
        first = OP(student, teacher, *args)
        assert all(torch.equal(a, b) for a, b in zip(first, OP(student, teacher, *args)))
        # Another thread count and another buffer alignment give the same bits.
        shifted_student = torch.empty(student.numel() + 1)[1:].view_as(student).copy_(student)
        shifted_teacher = torch.empty(teacher.numel() + 3)[3:].view_as(teacher).copy_(teacher)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = OP(shifted_student, shifted_teacher, *args)
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for a, b in zip(first, single))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode", ("2d", "prob_mean_T4", "logit_mean_T4"))
def test_instruction_sets_agree(mode, dtype, monkeypatch):
    """The kernel is compiled for the baseline ISA and for AVX2 + FMA (picked at run time); the
    copies differ only by FMA contraction, so they agree to rounding. (Where the CPU lacks AVX2
    both calls run the baseline copy.)"""
    generator = torch.Generator().manual_seed(12)
    steps, _ = MODES[mode]
    teacher = draw_teacher(9, 1037, temperature=2.0, delta=0.5, dtype=dtype, generator=generator)
    student = draw_student(teacher, steps, generator)
    student = student if steps is not None else student.unsqueeze(0)
    args = (2.0, 0.5, mode.startswith("logit_mean"), False, True, True)
    fastest = OP(student, teacher, *args)
    monkeypatch.setenv("HTAKL_CPU_ISA", "baseline")
    baseline = OP(student, teacher, *args)
    for what, a, b in zip(("loss", "d student", "d teacher"), fastest, baseline):
        assert_close_to_oracle(a, b, dtype, what)


def test_direct_call_outputs():
    teacher = torch.randn(3, 5)
    student = torch.randn(1, 3, 5)
    loss, d_student, d_teacher = OP(student, teacher, 2.0, 0.5, False, False, False, False)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    assert d_student.numel() == 0 and d_teacher.numel() == 0
    loss, d_student, d_teacher = OP(student.double(), teacher.double(), 2.0, 0.5, False, False,
                                    True, True)
    assert loss.dtype == torch.float64 and d_student.shape == (1, 3, 5) and d_teacher.shape == (3, 5)
    empty = OP(torch.randn(2, 0, 5), torch.randn(0, 5), 2.0, 0.5, False, False, True, True)
    assert empty[0].shape == (0,) and empty[1].shape == (2, 0, 5) and empty[2].shape == (0, 5)


@pytest.mark.parametrize("mode", ("2d", "prob_mean_T4", "logit_mean_T4"))
def test_row_scale_scales_loss_and_gradients(mode):
    """row_scale (each row's weight in the reduction) multiplies the loss rows and both
    gradients; a power of two does so exactly."""
    generator = torch.Generator().manual_seed(21)
    steps, _ = MODES[mode]
    teacher = draw_teacher(7, 300, temperature=2.0, delta=0.5, dtype=torch.float32,
                           generator=generator)
    student = draw_student(teacher, steps, generator)
    student = student if steps is not None else student.unsqueeze(0)
    args = (2.0, 0.5, mode.startswith("logit_mean"), False, True, True)
    plain = OP(student, teacher, *args)
    for got, want in zip(OP(student, teacher, *args, 0.25), plain):
        assert torch.equal(got, want * 0.25)
    for got, want in zip(OP(student, teacher, *args, 1.0 / 7), plain):
        torch.testing.assert_close(got, want / 7, rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("row_scale", [0.0, -1.0, math.inf, math.nan])
def test_direct_call_rejects_bad_row_scale(row_scale):
    with pytest.raises(RuntimeError, match="row_scale"):
        OP(torch.randn(1, 3, 5), torch.randn(3, 5), 2.0, 0.5, False, False, True, True, row_scale)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upstream_gradients_other_than_one(reduction):
    """The backward returns the kernel's gradients untouched when every row's upstream gradient
    is exactly 1 and scales them otherwise: a weighted loss, and per-row weights for "none"."""
    generator = torch.Generator().manual_seed(22)
    teacher = draw_teacher(6, 40, temperature=2.0, delta=0.5, dtype=torch.float64,
                           generator=generator)
    student = draw_student(teacher, 3, generator)
    weights = torch.rand(6, generator=generator, dtype=torch.float64) + 0.5

    def grads(backend):
        s = student.clone().requires_grad_(True)
        t = teacher.clone().requires_grad_(True)
        loss = htakl_kernels.hta_kl_div(s, t, reduction=reduction, backend=backend)
        weighted = (loss * weights).sum() if reduction == "none" else 2.5 * loss
        return torch.autograd.grad(weighted, (s, t))

    for got, want in zip(grads("cpu"), grads("reference")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ("batchmean", "sum"))
def test_plain_backward_makes_no_pass_over_the_gradient(reduction):
    """loss.backward() on a reduced loss: the kernel already weighed the rows, so the backward
    hands the saved gradient on with no elementwise op (no multiply, no copy)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    student = torch.randn(2, 8, 50, requires_grad=True)  # T = 2 steps
    loss = htakl_kernels.hta_kl_div(student, torch.randn(8, 50), reduction=reduction,
                                    backend="cpu")
    with RecordOps() as recorded:
        loss.backward()
    assert not any(op.startswith(("aten.mul", "aten.copy", "aten.clone", "aten._to_copy"))
                   for op in recorded.ops), recorded.ops
    assert student.grad is not None and student.grad.shape == student.shape


@pytest.mark.parametrize("reduction", ("batchmean", "sum"))
def test_backward_twice_with_retain_graph(reduction):
    """The gradient handed on without a copy is the saved one: a second backward through the same
    graph (retain_graph) must find it intact, and .grad accumulates both."""
    generator = torch.Generator().manual_seed(23)
    teacher = draw_teacher(5, 30, temperature=2.0, delta=0.5, dtype=torch.float64,
                           generator=generator)
    student = draw_student(teacher, None, generator).requires_grad_(True)
    loss = htakl_kernels.hta_kl_div(student, teacher, reduction=reduction, backend="cpu")
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    student.grad.mul_(0)  # an optimizer's in-place zeroing must not reach the saved gradient
    loss.backward()
    assert torch.equal(student.grad, first)
    expected = torch.autograd.grad(
        htakl_kernels.hta_kl_div(student, teacher, reduction=reduction, backend="reference"),
        student)[0]
    torch.testing.assert_close(first, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("student, teacher, temperature, delta, message", [
    (torch.randn(3, 5), torch.randn(3, 5), 2.0, 0.5, "student must be"),
    (torch.randn(1, 3, 5), torch.randn(15), 2.0, 0.5, "teacher must be"),
    (torch.randn(1, 3, 5), torch.randn(3, 4), 2.0, 0.5, "does not match"),
    (torch.randn(1, 3, 5), torch.randn(2, 5), 2.0, 0.5, "does not match"),
    (torch.randn(0, 3, 5), torch.randn(3, 5), 2.0, 0.5, "T >= 1"),
    (torch.randn(1, 3, 0), torch.randn(3, 0), 2.0, 0.5, "C must be"),
    (torch.randn(1, 3, 5), torch.randn(3, 5).double(), 2.0, 0.5, "same dtype"),
    (torch.ones(1, 3, 5, dtype=torch.int64), torch.ones(3, 5, dtype=torch.int64), 2.0, 0.5,
     "floating-point"),
    (torch.randn(1, 5, 3).transpose(1, 2), torch.randn(3, 5), 2.0, 0.5, "contiguous"),
    (torch.randn(1, 3, 5), torch.randn(3, 5), 0.0, 0.5, "temperature"),
    (torch.randn(1, 3, 5), torch.randn(3, 5), math.nan, 0.5, "temperature"),
    (torch.randn(1, 3, 5), torch.randn(3, 5), 2.0, 0.0, "delta"),
    (torch.randn(1, 3, 5), torch.randn(3, 5), 2.0, 1.5, "delta"),
])
def test_direct_call_rejects_bad_input(student, teacher, temperature, delta, message):
    with pytest.raises(RuntimeError, match=message):
        OP(student, teacher, temperature, delta, False, False, True, True)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_huge_rows_do_not_pin_their_scratch():
    """A call with million-class float64 rows needs ~110 MB of scratch per thread; it is freed
    with the call instead of being kept per thread for the life of the process."""

    def resident_mb():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    student = torch.randn(8, 2, 1 << 20, dtype=torch.float64)
    teacher = torch.randn(2, 1 << 20, dtype=torch.float64)
    before = resident_mb()
    loss_rows, _, _ = torch.ops.htakl.hta_kl_fused(student, teacher, 2.0, 0.5, False, False,
                                                   False, False)
    assert torch.isfinite(loss_rows).all()
    assert resident_mb() - before < 50
