"""The HTA-KL contract (SPEC 1 and 2), checked on every backend against the float64 oracle.

Each test runs on every target of tests/backend_targets.py that applies: the C++ CPU kernel, the
Triton kernel (through its interpreter on CPU tensors, with its default layout and with the
chunked path forced on small rows), the CUDA kernel and the compiled Triton kernel where a GPU is
present, and the reference where the check means something for it. Random teachers are drawn
clear of the head boundary (tests/hta_kl_oracle.py), so kernel and oracle must agree on head
membership exactly. Edge cases whose boundary is ambiguous by construction (ties, all-equal rows,
delta = 1) are compared row by row against every membership the float64 oracle cannot rule out
(SPEC 1, "Rounding at the head boundary"), or are built so that no rounding can move the boundary.
What only one backend has (CPU instruction-set copies, the CUDA launch paths, the Triton layouts
and compiler) is tested in that backend's file.
"""

from __future__ import annotations

import math

import pytest
import torch

from htakl_kernels import hta_kl_div, reference
from htakl_kernels._backends import kernel_ops
from htakl_kernels.reference import hta_kl_rows

from backend_targets import KERNELS, LAYOUTS, TARGETS, over
from hta_kl_oracle import (
    PEAKED_DELTA,
    TOLERANCES,
    add_peaks,
    assert_close_to_oracle,
    boundary_margin,
    boundary_tolerance,
    call_op,
    check_fused_against_oracle,
    draw_student,
    draw_teacher,
    fused,
    oracle,
)

# The interpreter evaluates both sides of every tl.where with numpy, which warns about the -inf
# and NaN lanes that the kernel then discards.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

REDUCTIONS = ("batchmean", "sum", "none")
# Student modes: name -> (time steps, or None for a 2-D student; time_reduction).
MODES = {
    "2d": (None, "prob_mean"),
    "prob_mean_T1": (1, "prob_mean"),
    "prob_mean_T4": (4, "prob_mean"),
    "logit_mean_T1": (1, "logit_mean"),
    "logit_mean_T4": (4, "logit_mean"),
}
# The op's modes: T = 3 leaves a partial group of the CUDA prob_mean gradient's per-step sums (4
# steps per pass), T = 6 needs two groups.
OP_MODES = {
    "2d": (None, "prob_mean"),
    "prob_mean_T3": (3, "prob_mean"),
    "prob_mean_T6": (6, "prob_mean"),
    "logit_mean_T3": (3, "logit_mean"),
}
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
DEVICE_TARGETS = ("cpu", "cuda", "triton_cuda")  # kernels that run at full speed
GPU_TARGETS = ("cuda", "triton_cuda", "cuda_emulated")
API_TARGETS = KERNELS  # the public function's kernels (each with its default layout)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype)[6:]


def kernel_loss_and_grads(target, student, teacher, backend=None, **kwargs):
    """Loss and gradients of hta_kl_div on the target for upstream gradient 1 on loss.sum(),
    returned on the CPU."""
    student = student.detach().to(target.device).clone().requires_grad_(True)
    teacher = teacher.detach().to(target.device).clone().requires_grad_(True)
    loss = hta_kl_div(student, teacher, backend=backend or target.backend, **kwargs)
    grad_student, grad_teacher = torch.autograd.grad(loss.sum(), (student, teacher))
    return loss.detach().cpu(), grad_student.cpu(), grad_teacher.cpu()


def assert_matches_oracle(target, student, teacher, **kwargs):
    dtype = teacher.dtype
    loss, grad_student, grad_teacher = kernel_loss_and_grads(target, student, teacher, **kwargs)
    expected_loss, expected_student, expected_teacher = oracle(student, teacher, **kwargs)
    assert loss.dtype == dtype and grad_student.dtype == dtype and grad_teacher.dtype == dtype
    assert_close_to_oracle(loss, expected_loss, dtype, "loss")
    assert_close_to_oracle(grad_student, expected_student, dtype, "d loss / d student")
    assert_close_to_oracle(grad_teacher, expected_teacher, dtype, "d loss / d teacher")


# ---- the public function against the oracle: every option ---------------------------------------


def sweep_sizes(mode: str) -> list[tuple[int, int]]:
    """Every rows count for small C, fewer rows as C grows."""
    sizes = [(rows, classes) for classes in (1, 2, 3, 7) for rows in (1, 5, 64)]
    sizes += [(64, 1000), (5, 1025), (1, 32000)]
    if mode in ("2d", "prob_mean_T4"):
        sizes.append((5, 32000))
    return sizes


def sweep_cases(target):
    return [((dtype, mode, rows, classes), f"{dtype_id(dtype)}-{mode}-{rows}x{classes}",
             classes >= 32000)
            for dtype in DTYPES for mode in MODES for rows, classes in sweep_sizes(mode)]


@pytest.mark.parametrize("target, dtype, mode, rows, classes", over(DEVICE_TARGETS, sweep_cases))
def test_matches_oracle(target, dtype, mode, rows, classes):
    steps, time_reduction = MODES[mode]
    generator = torch.Generator().manual_seed(rows * 100003 + classes * 7 + len(mode))
    teacher = draw_teacher(rows, classes, temperature=2.0, delta=0.5, dtype=dtype, generator=generator)
    student = draw_student(teacher, steps, generator)
    # Reductions only scale the per-row gradients: rotate them over the cases (all three are
    # covered per mode in test_every_reduction); likewise detach_weights for the large rows.
    reduction = REDUCTIONS[(rows + classes) % 3]
    detach_options = (False, True) if classes < 1000 else (bool((classes + len(mode)) % 2),)
    for detach_weights in detach_options:
        assert_matches_oracle(target, student, teacher, temperature=2.0, delta=0.5,
                              time_reduction=time_reduction, detach_weights=detach_weights,
                              reduction=reduction)


def every_reduction_cases(target):
    # The interpreter's reductions are in test_upstream_gradients (and its detach_weights in
    # test_op_matches_oracle).
    return [((dtype, reduction, mode), f"{dtype_id(dtype)}-{reduction}-{mode}", False)
            for dtype in (torch.float64, torch.float32, torch.float16)
            for reduction in REDUCTIONS for mode in MODES]


@pytest.mark.parametrize("target, dtype, reduction, mode", over(DEVICE_TARGETS, every_reduction_cases))
def test_every_reduction(target, dtype, reduction, mode):
    steps, time_reduction = MODES[mode]
    generator = torch.Generator().manual_seed(11)
    teacher = draw_teacher(6, 33, temperature=1.5, delta=0.3, dtype=dtype, generator=generator)
    student = draw_student(teacher, steps, generator)
    for detach_weights in (False, True):
        assert_matches_oracle(target, student, teacher, temperature=1.5, delta=0.3,
                              time_reduction=time_reduction, detach_weights=detach_weights,
                              reduction=reduction)


@pytest.mark.parametrize("target", over(DEVICE_TARGETS))
def test_leading_dims(target):
    # Leading dims are flattened into rows; reduction="none" keeps their shape.
    generator = torch.Generator().manual_seed(5)
    teacher = draw_teacher(12, 9, temperature=2.0, delta=0.5, dtype=torch.float64,
                           generator=generator).reshape(3, 4, 9)
    student = draw_student(teacher, 2, generator)
    assert_matches_oracle(target, student, teacher, temperature=2.0, delta=0.5, reduction="none")


@pytest.mark.slow
@pytest.mark.parametrize("target", over(DEVICE_TARGETS))
def test_long_rows(target):
    generator = torch.Generator().manual_seed(5)
    teacher = draw_teacher(2, 131072, temperature=2.0, delta=0.7, dtype=torch.float32,
                           generator=generator)
    student = draw_student(teacher, 3, generator)
    assert_matches_oracle(target, student, teacher, temperature=2.0, delta=0.7)


def upstream_cases(target):
    sizes = ((torch.float64, 33),) if target.interpreted else ((torch.float64, 40), (torch.float32, 333))
    # The interpreter's quick loop: one reduction.
    return [((dtype, classes, reduction, time_reduction),
             f"{dtype_id(dtype)}-C{classes}-{reduction}-{time_reduction}",
             target.interpreted and reduction != "none")
            for dtype, classes in sizes for reduction in REDUCTIONS
            for time_reduction in ("prob_mean", "logit_mean")]


@pytest.mark.parametrize("target, dtype, classes, reduction, time_reduction",
                         over(API_TARGETS, upstream_cases))
def test_upstream_gradients(target, dtype, classes, reduction, time_reduction):
    """The backward returns the kernel's gradients untouched when every row's upstream gradient
    is exactly 1 and scales them otherwise: a weighted loss, per-row weights for "none"; with
    leading batch dimensions. Against the float64 reference's autograd."""
    generator = torch.Generator().manual_seed(22 + classes)
    teacher = draw_teacher(6, classes, temperature=3.0, delta=0.6, dtype=dtype,
                           generator=generator).reshape(2, 3, classes)
    student = (torch.randn(3, 2, 3, classes, generator=generator, dtype=torch.float64) * 5).to(dtype)
    weights = torch.rand(2, 3, generator=generator, dtype=torch.float64) + 0.5
    options = dict(temperature=3.0, delta=0.6, time_reduction=time_reduction, reduction=reduction)

    def run(backend, s, t):
        s = s.detach().clone().requires_grad_(True)
        t = t.detach().clone().requires_grad_(True)
        loss = hta_kl_div(s, t, backend=backend, **options)
        objective = (loss * weights.to(loss)).sum() if reduction == "none" else 2.5 * loss
        return (loss.detach().cpu(), *(g.cpu() for g in torch.autograd.grad(objective, (s, t))))

    device = target.device
    got = run(target.backend, student.to(device), teacher.to(device))
    want = run("reference", student.double(), teacher.double())
    # "auto" picks a backend for the device, with the same result shape.
    assert hta_kl_div(student.to(device), teacher.to(device), **options).shape == got[0].shape
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else TOLERANCES[dtype]
    for actual, expected, what in zip(got, want, ("loss", "d student", "d teacher")):
        torch.testing.assert_close(actual.double(), expected, **tolerance,
                                   msg=lambda m: f"{what}: {m}")


# The backward is the op glue every backend shares (htakl_kernels/_ops/hta_kl.py).
@pytest.mark.parametrize("reduction", ("batchmean", "sum"))
@pytest.mark.parametrize("target", over(DEVICE_TARGETS))
def test_plain_backward_makes_no_pass_over_the_gradient(target, reduction):
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

    student = torch.randn(2, 4, 50, device=target.device, requires_grad=True)  # T = 2 steps
    loss = hta_kl_div(student, torch.randn(4, 50, device=target.device), reduction=reduction,
                      backend=target.backend)
    with RecordOps() as recorded:
        loss.backward()
    assert not any(op.startswith(("aten.mul", "aten.copy", "aten.clone", "aten._to_copy"))
                   for op in recorded.ops), recorded.ops
    assert student.grad is not None and student.grad.shape == student.shape


@pytest.mark.parametrize("reduction", ("batchmean", "sum"))
@pytest.mark.parametrize("target", over(DEVICE_TARGETS))
def test_backward_twice_with_retain_graph(target, reduction):
    """The gradient handed on without a copy is the saved one: a second backward through the same
    graph (retain_graph) must find it intact, and .grad accumulates both."""
    generator = torch.Generator().manual_seed(23)
    teacher = draw_teacher(5, 30, temperature=2.0, delta=0.5, dtype=torch.float64,
                           generator=generator)
    student = draw_student(teacher, None, generator)
    student, teacher = student.to(target.device).requires_grad_(True), teacher.to(target.device)
    loss = hta_kl_div(student, teacher, reduction=reduction, backend=target.backend)
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    student.grad.mul_(0)  # an optimizer's in-place zeroing must not reach the saved gradient
    loss.backward()
    assert torch.equal(student.grad, first)
    expected = torch.autograd.grad(
        hta_kl_div(student, teacher, reduction=reduction, backend="reference"), student)[0]
    torch.testing.assert_close(first, expected, rtol=1e-10, atol=1e-12)


# ---- the op against the oracle: every class count, storage dtype and student shape --------------


def op_cases(target):
    """(rows, classes, dtype, mode, detach_weights, temperature, delta, student scale, seed)."""
    cases = []

    def add(rows, classes, dtype, mode, detach, temperature, delta, scale, seed, slow=False):
        # The interpreter's quick loop: the default layout's float64 cases.
        slow = slow or (target.interpreted and (bool(target.layout) or dtype != torch.float64))
        case_id = f"{rows}x{classes}-{dtype_id(dtype)}-{mode}-{'detached' if detach else 'weights'}"
        if (temperature, delta) != (2.0, 0.5):
            case_id += f"-tau{temperature}-delta{delta}"
        cases.append(((rows, classes, dtype, mode, detach, temperature, delta, scale, seed),
                      case_id, slow))

    chunked = bool(target.layout)
    # 37 classes: three chunks of 16 on the chunked path, the last one partial. Temperature and
    # delta are not binary fractions: float64 math must get them to the last bit.
    for dtype in ((torch.float64,) if target.interpreted else ALL_DTYPES):
        for mode in ("2d", "prob_mean_T3", "logit_mean_T3"):
            for detach in (False, True):
                add(2, 37, dtype, mode, detach, 0.7, 0.37, 2.0, 1)
    if target.interpreted:
        # The other storage dtypes on a short row, and (default layout) the awkward class counts.
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            add(2, 40, dtype, "prob_mean_T3", False, 2.0, 0.5, 2.0, 7)
        if not chunked:
            for classes in (1, 3, 1000, 1025):
                add(2, classes, torch.float32, "prob_mean_T3", False, 2.0, 0.3, 2.0, classes,
                    slow=classes >= 1000)
        return cases
    for dtype in ALL_DTYPES:
        for classes in (1, 2, 3, 1000, 1025):
            for mode in OP_MODES:
                for detach in (False, True):
                    add(5, classes, dtype, mode, detach, 2.0, 0.5, 6.0, classes)
        # delta near 1: the head is all but the row's last few classes
        add(5, 40, dtype, "prob_mean_T3", False, 2.0, 0.99, 6.0, 99)
    return cases


# The CPU kernel's class counts and dtypes are in test_matches_oracle and test_every_reduction.
@pytest.mark.parametrize(
    "target, rows, classes, dtype, mode, detach_weights, temperature, delta, scale, seed",
    over(tuple(name for name in LAYOUTS if name != "cpu"), op_cases))
def test_op_matches_oracle(target, rows, classes, dtype, mode, detach_weights, temperature, delta,
                           scale, seed):
    steps, time_reduction = OP_MODES[mode]
    generator = torch.Generator().manual_seed(seed)
    teacher = draw_teacher(rows, classes, temperature=temperature, delta=delta, dtype=dtype,
                           generator=generator)
    shape = (rows, classes) if steps is None else (steps, rows, classes)
    student = (torch.randn(*shape, generator=generator) * scale).to(dtype)
    check_fused_against_oracle(target, student, teacher, temperature=temperature, delta=delta,
                               time_reduction=time_reduction, detach_weights=detach_weights,
                               what=f"C={classes}")


def large_vocabulary_cases(target):
    return [((dtype, mode), f"{dtype_id(dtype)}-{mode}", True)
            for dtype in ALL_DTYPES for mode in ("2d", "prob_mean_T3", "logit_mean_T3")]


# Large rows: 50257 classes (a GPT-2 vocabulary). With T = 3 or in float32 and wider, the row no
# longer fits a CUDA block's shared memory and every pass re-reads global memory.
@pytest.mark.parametrize("target, dtype, mode", over(GPU_TARGETS, large_vocabulary_cases))
def test_large_vocabulary(target, dtype, mode):
    steps, time_reduction = OP_MODES[mode]
    generator = torch.Generator().manual_seed(7)
    teacher = draw_teacher(2, 50257, temperature=2.0, delta=0.7, dtype=dtype, generator=generator)
    shape = (2, 50257) if steps is None else (steps, 2, 50257)
    student = (torch.randn(*shape, generator=generator) * 6).to(dtype)
    check_fused_against_oracle(target, student, teacher, temperature=2.0, delta=0.7,
                               time_reduction=time_reduction, what="C=50257")


def very_large_cases(target):
    return [((dtype, mode), f"{dtype_id(dtype)}-{mode}", True)
            for dtype in (torch.float32, torch.bfloat16) for mode in ("2d", "prob_mean_T3")]


@pytest.mark.parametrize("target, dtype, mode", over(GPU_TARGETS, very_large_cases))
def test_very_large_rows(target, dtype, mode):
    classes = 262144
    steps, time_reduction = OP_MODES[mode]
    generator = torch.Generator().manual_seed(11)
    teacher = add_peaks((torch.randn(1, classes, generator=generator) * 2).to(dtype), generator)
    student = (torch.randn(*((steps,) if steps else ()), 1, classes, generator=generator) * 4)
    check_fused_against_oracle(target, student.to(dtype), teacher, temperature=1.0,
                               delta=PEAKED_DELTA, time_reduction=time_reduction,
                               what="C=262144")


# ---- ties, empty and full heads: SPEC 1.3's stable order -----------------------------------------


def tied_teacher(rows, classes, generator):
    """Rows that are permutations of one multiset of logits (temperature 1), and a delta.

    The multiset: one top class, a group of m tied classes just below it, and a bulk of small
    integer logits (ties everywhere in the tail too). delta puts the head boundary in the middle of
    the tied group, half a tied probability w away from the nearest cumulative mass. The group is
    heavy (w about 1/(m + e)) because SPEC 1.3's boundary may legitimately move by the rounding of
    a cumulative sum (up to C eps): a boundary inside a group of tiny tied probabilities is not
    testable in float32 at large C.
    Returns (teacher [rows, classes] float64, delta, number of tied classes in the head).
    """
    group = max(2, min(20, (classes - 1) // 2))
    height = float(torch.tensor(float(classes)).log()) + 3.0
    values = torch.randint(0, 3, (classes,), generator=generator).double()
    values[0] = height + 1.0
    values[1:1 + group] = height
    teacher = torch.stack([values[torch.randperm(classes, generator=generator)]
                           for _ in range(rows)])
    p = torch.softmax(values, dim=-1)
    inside = group // 2
    delta = float(p[0]) + (inside + 0.5) * float(p[1])
    return teacher, delta, inside


def tie_cases(target):
    def wanted(dtype, classes, mode):
        # The emulated kernel (a CPU running every CUDA thread, under sanitizers): long rows in
        # two dtypes and two modes.
        return not (target.emulated and classes > 1000 and (
            dtype not in (torch.float32, torch.bfloat16) or mode not in ("2d", "prob_mean_T3")))

    return [((dtype, classes, mode), f"{dtype_id(dtype)}-C{classes}-{mode}", classes > 1000)
            for dtype in ALL_DTYPES for classes in (7, 1000, 50257) for mode in OP_MODES
            if wanted(dtype, classes, mode)]


# The CPU kernel's ties are in test_edge_case.
@pytest.mark.parametrize("target, dtype, classes, mode", over(GPU_TARGETS, tie_cases))
def test_ties_split_by_ascending_class_index(target, dtype, classes, mode):
    generator = torch.Generator().manual_seed(classes)
    teacher, delta, inside = tied_teacher(3, classes, generator)
    teacher = teacher.to(dtype)
    assert 0 < inside and 0 < delta < 1
    assert (boundary_margin(teacher, 1.0, delta) >= boundary_tolerance(classes, dtype)).all()
    steps, time_reduction = OP_MODES[mode]
    shape = (steps, 3, classes) if steps else (3, classes)
    student = (torch.randn(*shape, generator=generator) * 3).to(dtype)
    check_fused_against_oracle(target, student, teacher, temperature=1.0, delta=delta,
                               time_reduction=time_reduction, what="ties")


def handmade_tied_teacher(dtype):
    """Rows with exact ties at the head boundary, spread over several chunks of 16.

    Row 0: four classes tied for the top (at 3, 17, 20 and 33); each has mass x ~ 0.234, so with
    delta = 0.6 the stable sort puts the first two (S = x, 2x < 0.6) in the head and the rest
    (S >= 3x > 0.6) in the tail. Row 1: all 37 classes equal (p = 1/37): the first 22 are head.
    Row 2: two tied classes above a tie of five: head = the top two plus the first three of five.
    """
    teacher = torch.full((3, 37), -30.0, dtype=torch.float64)
    teacher[0, [3, 17, 20, 33]] = 0.0
    teacher[0, [0, 5]] = -2.0
    teacher[1] = 1.0
    teacher[2] = -3.0
    teacher[2, [30, 2]] = 0.0
    teacher[2, [1, 9, 16, 25, 36]] = -1.0
    return teacher.to(dtype)


def dtype_cases(interpreted_dtypes=(torch.float64,)):
    """Every storage dtype; the interpreter (slow) only `interpreted_dtypes`."""
    def cases(target):
        dtypes = interpreted_dtypes if target.interpreted else ALL_DTYPES
        return [((dtype,), dtype_id(dtype), False) for dtype in dtypes]
    return cases


@pytest.mark.parametrize("target, dtype",
                         over(LAYOUTS, dtype_cases((torch.float64, torch.float32))))
def test_tied_rows_follow_the_stable_sort(target, dtype):
    delta = 0.6
    teacher = handmade_tied_teacher(dtype)
    p = torch.softmax(teacher.double() / 1.0, dim=-1)
    head = reference.head_mask(p, delta)
    # The cases the docstring describes, checked on the float64 oracle's mask.
    assert head[0].nonzero().flatten().tolist() == [3, 17]
    assert head[1].nonzero().flatten().tolist() == list(range(22))
    assert head[2].nonzero().flatten().tolist() == [1, 2, 9, 16, 30]
    assert (boundary_margin(teacher, 1.0, delta) > 1e-3).all()
    generator = torch.Generator().manual_seed(300 + ALL_DTYPES.index(dtype))
    student = (torch.randn(2, 3, 37, generator=generator) * 2).to(dtype)
    check_fused_against_oracle(target, student, teacher, temperature=1.0, delta=delta,
                               time_reduction="prob_mean", what="ties")


@pytest.mark.parametrize("target, dtype", over(DEVICE_TARGETS + ("cuda_emulated",), dtype_cases()))
def test_uniform_teacher(target, dtype):
    # Every class tied: the head is exactly the first k classes by index.
    classes, k = 300, 120
    teacher = torch.zeros(2, classes, dtype=dtype)
    student = torch.randn(2, classes, generator=torch.Generator().manual_seed(1)).to(dtype)
    check_fused_against_oracle(target, student, teacher, temperature=2.0,
                               delta=(k + 0.5) / classes, time_reduction="prob_mean",
                               what="uniform")


@pytest.mark.parametrize("target, dtype", over(LAYOUTS, dtype_cases()))
def test_confident_teacher_has_an_empty_head(target, dtype):
    """A confident teacher (p_max >= delta): nothing is in the head, lam_h = 0 unless q = p."""
    generator = torch.Generator().manual_seed(400)
    teacher = torch.randn(3, 30, generator=generator).to(dtype)
    teacher[:, 7] = 12.0
    assert not reference.head_mask(torch.softmax(teacher.double() / 2.0, -1), 0.5).any()
    student = (torch.randn(3, 30, generator=generator) * 2).to(dtype)
    check_fused_against_oracle(target, student, teacher, temperature=2.0, delta=0.5,
                               time_reduction="prob_mean", what="empty head")
    if target.interpreted:
        return  # the long row below costs the interpreter minutes
    generator = torch.Generator().manual_seed(2)
    teacher = torch.randn(4, 500, generator=generator)
    teacher[:, 17] = 40.0  # p_max ~ 1 >= delta
    student = (torch.randn(2, 4, 500, generator=generator) * 4).to(dtype)
    for time_reduction in ("prob_mean", "logit_mean"):
        check_fused_against_oracle(target, student, teacher.to(dtype), temperature=1.0,
                                   delta=0.5, time_reduction=time_reduction, what="empty head")


@pytest.mark.parametrize("target", over(DEVICE_TARGETS + ("cuda_emulated",)))
def test_delta_one_puts_all_or_all_but_the_last_class_in_the_head(target):
    # With delta = 1 only the last class's cumulative mass (the row total, 1 up to rounding) is
    # near delta: it may land on either side, every other class is head. Accept both memberships.
    generator = torch.Generator().manual_seed(4)
    teacher = torch.randn(6, 40, generator=generator, dtype=torch.float64) * 2
    student = torch.randn(6, 40, generator=generator, dtype=torch.float64) * 2
    loss, _, _ = fused(target, student, teacher, temperature=1.0, delta=1.0)
    last = torch.argmin(teacher, dim=-1, keepdim=True)
    all_head = torch.ones_like(teacher, dtype=torch.bool)
    but_last = all_head.clone().scatter_(-1, last, False)
    with_all = hta_kl_rows(student, teacher, 1.0, 1.0, False, head=all_head)
    with_but_last = hta_kl_rows(student, teacher, 1.0, 1.0, False, head=but_last)
    loss = loss.cpu()
    close = dict(rtol=1e-9, atol=1e-12)
    matches = torch.isclose(loss, with_all, **close) | torch.isclose(loss, with_but_last, **close)
    assert bool(matches.all()), (loss, with_all, with_but_last)


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


def assert_rows_match_some_membership(target, student, teacher, *, temperature, delta,
                                      time_reduction, detach_weights, reference_slack=False):
    """Row by row, kernel == oracle for one of the admissible head memberships.

    reference_slack: for inputs whose float32 log-probabilities are themselves inexact (logits / tau
    in the hundreds and more), each element may also be off by 4 times the largest error of the
    reference evaluated in the input's dtype: the kernel must be about as accurate as float32 math
    allows.
    """
    dtype = teacher.dtype
    kwargs = dict(temperature=temperature, delta=delta, time_reduction=time_reduction,
                  detach_weights=detach_weights)
    actual_all = kernel_loss_and_grads(target, student, teacher, reduction="none", **kwargs)
    slack_all = (None, None, None)
    if reference_slack:
        in_dtype = kernel_loss_and_grads(TARGETS["reference"], student, teacher, reduction="none",
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


def edge_cases(target):
    return [((edge, mode, dtype), f"{edge}-{mode}-{dtype_id(dtype)}", False)
            for edge in EDGES for mode in EDGE_MODES for dtype in DTYPES]


@pytest.mark.parametrize("target, edge, mode, dtype", over(DEVICE_TARGETS, edge_cases))
def test_edge_case(target, edge, mode, dtype):
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
            target, student, teacher, temperature=temperature, delta=delta,
            time_reduction=time_reduction, detach_weights=detach_weights,
            reference_slack=dtype != torch.float64 and edge in ILL_CONDITIONED_IN_FLOAT32)


# ---- non-finite inputs ---------------------------------------------------------------------------


def masked_cases(target):
    """(rows, classes, masked class lists per row (None: every row), dtype, mode)."""
    if target.interpreted:
        shapes = [(2, 40, {None: [0, 5, 16, 17, 39]}, "C40")]
        dtypes, modes = (torch.float64,), ("2d", "prob_mean_T3", "logit_mean_T3")
    else:
        # Fixed classes (one row with one more), and a random fifth of 257 classes.
        generator = torch.Generator().manual_seed(22)
        random = {row: [c for c in range(3, 257) if torch.rand(1, generator=generator) < 0.2]
                  for row in range(4)}
        shapes = [(5, 12, {None: [0, 5, 6], 2: [11]}, "C12")]
        dtypes, modes = DTYPES, ("2d", "prob_mean_T3", "logit_mean_T3")
        if target.device == "cuda":
            shapes.append((4, 257, random, "C257"))
            dtypes, modes = ALL_DTYPES, tuple(OP_MODES)
    return [((rows, classes, masks, dtype, mode), f"{name}-{dtype_id(dtype)}-{mode}", False)
            for rows, classes, masks, name in shapes for dtype in dtypes for mode in modes]


@pytest.mark.parametrize("target, rows, classes, masks, dtype, mode", over(LAYOUTS, masked_cases))
def test_masked_classes(target, rows, classes, masks, dtype, mode):
    """-inf at the same classes of teacher and student (a masked vocabulary): p = q = 0 there,
    every term has 0 log 0 = 0: finite loss, zero gradients there, and the rest of the row is the
    oracle's row without those classes. Masked in the student only, where the teacher has mass:
    FKL is +inf, and the row's loss inf or NaN (0 * inf) exactly where the reference's is."""
    steps, time_reduction = OP_MODES[mode]
    generator = torch.Generator().manual_seed(500 + classes)
    masked = torch.zeros(rows, classes, dtype=torch.bool)
    for row, columns in masks.items():
        masked[slice(None) if row is None else row, columns] = True
    # Drawn over the kept classes, so the masked rows are as clear of the head boundary.
    teacher = torch.full((rows, classes), -math.inf, dtype=dtype)
    for row in range(rows):
        kept = int((~masked[row]).sum())
        teacher[row, ~masked[row]] = draw_teacher(1, kept, temperature=2.0, delta=0.5, dtype=dtype,
                                                  generator=generator)[0]
    kept_counts = (~masked).sum(-1).tolist()
    margins = boundary_margin(teacher, 2.0, 0.5).tolist()
    assert all(margin >= boundary_tolerance(kept, dtype) for margin, kept in zip(margins, kept_counts))
    student = draw_student(teacher.masked_fill(masked, 0.0), steps, generator)
    student_masked = masked if steps is None else masked.expand(steps, -1, -1)
    student = student.masked_fill(student_masked, -math.inf)
    for detach_weights in ((False,) if target.interpreted else (False, True)):
        options = dict(temperature=2.0, delta=0.5, time_reduction=time_reduction,
                       detach_weights=detach_weights)
        loss, d_student, d_teacher = check_fused_against_oracle(target, student, teacher,
                                                                **options, what="masked")
        assert torch.isfinite(loss).all()
        assert torch.isfinite(d_student).all() and torch.isfinite(d_teacher).all()
        assert (d_teacher[masked] == 0).all() and (d_student[student_masked] == 0).all()
        for row in range(rows):  # the row without its masked classes
            kept = ~masked[row]
            expected_loss, expected_student, expected_teacher = oracle(
                student[..., row:row + 1, kept], teacher[row:row + 1, kept], reduction="none",
                **options)
            assert_close_to_oracle(loss[row:row + 1], expected_loss, dtype, f"row {row} loss")
            assert_close_to_oracle(d_student[..., row:row + 1, kept], expected_student, dtype,
                                   f"row {row} d student")
            assert_close_to_oracle(d_teacher[row:row + 1, kept], expected_teacher, dtype,
                                   f"row {row} d teacher")
        if not (target.layout or target.interpreted or target.emulated):
            assert_matches_oracle(target, student, teacher, reduction="none", **options)

    student_only = student.clone()
    student_only[..., 1, 2] = -math.inf
    assert not masked[1, 2]
    expected, _, _ = oracle(student_only, teacher, temperature=2.0, delta=0.5,
                            time_reduction=time_reduction, reduction="none")
    assert not math.isfinite(expected[1]) and torch.isfinite(expected[[0]]).all()
    loss, _, _ = fused(target, student_only, teacher, temperature=2.0, delta=0.5,
                       time_reduction=time_reduction, grad_student=False, grad_teacher=False)
    assert_close_to_oracle(loss, expected, dtype, "loss rows, masked in the student only")
    if not (target.layout or target.interpreted or target.emulated):
        loss = hta_kl_div(student_only.to(target.device), teacher.to(target.device),
                          temperature=2.0, time_reduction=time_reduction, reduction="none",
                          backend=target.backend)
        assert_close_to_oracle(loss, expected, dtype, "loss, masked in the student only")


def nan_cases(target):
    wheres = ("teacher", "student")
    if target.interpreted:
        dtypes, modes, wheres = (torch.float64,), ("2d",), ("teacher",)
    elif target.device == "cpu":
        dtypes, modes = (torch.float32,), tuple(MODES)
    else:
        dtypes, modes = ALL_DTYPES, ("2d", "prob_mean_T1", "prob_mean_T3", "prob_mean_T4",
                                     "prob_mean_T6", "logit_mean_T1", "logit_mean_T3",
                                     "logit_mean_T4")
    classes = 40 if target.interpreted else 300
    return [((classes, dtype, mode, where), f"C{classes}-{dtype_id(dtype)}-{mode}-{where}", False)
            for dtype in dtypes for mode in modes for where in wheres]


@pytest.mark.parametrize("target, classes, dtype, mode, where", over(LAYOUTS, nan_cases))
def test_nan_poisons_its_row_only(target, classes, dtype, mode, where):
    """A NaN logit makes its row's loss and gradients NaN (as in the reference), leaves the other
    rows alone, and never hangs. +inf logits (softmax NaN in the reference) too."""
    steps = int(mode.split("_T")[1]) if "_T" in mode else None
    time_reduction = "logit_mean" if mode.startswith("logit_mean") else "prob_mean"
    generator = torch.Generator().manual_seed(29)
    teacher = draw_teacher(5, classes, temperature=2.0, delta=0.5, dtype=dtype, generator=generator)
    student = draw_student(teacher, steps, generator)
    poisoned = teacher if where == "teacher" else student
    poisoned[..., 1, 17] = math.nan
    poisoned[..., 2, 30] = math.inf
    poisoned[..., 3, :] = math.nan
    loss, d_student, d_teacher = (x.cpu() for x in fused(
        target, student, teacher, temperature=2.0, delta=0.5, time_reduction=time_reduction))
    expected_loss, expected_student, expected_teacher = oracle(
        student, teacher, temperature=2.0, delta=0.5, time_reduction=time_reduction,
        reduction="none")
    assert torch.isnan(expected_loss[1:4]).all()
    assert torch.isnan(loss[1:4]).all()
    assert torch.isnan(d_teacher[1:4]).all() and torch.isnan(d_student[..., 1:4, :]).all()
    finite = [0, 4]
    assert torch.isfinite(loss[finite]).all()
    assert torch.isfinite(d_teacher[finite]).all() and torch.isfinite(d_student[..., finite, :]).all()
    assert_close_to_oracle(loss[finite], expected_loss[finite], dtype, "loss")
    assert_close_to_oracle(d_teacher[finite], expected_teacher[finite], dtype, "d teacher")
    assert_close_to_oracle(d_student[..., finite, :], expected_student[..., finite, :], dtype,
                           "d student")


@pytest.mark.parametrize("target", over(LAYOUTS))
def test_steps_whose_probabilities_all_underflow(target):
    """prob_mean with a class that every step all but rules out (q_t ~ e^-280, below float32's
    range): its log q is the finite logsumexp of the steps' log q_t, and the ratio q_t / q in its
    gradient (SPEC 2) is of order 1, not 0, although q_t itself underflows. A kernel that zeroes
    the ratio where q_t underflows loses the teacher's pull on that class."""
    generator = torch.Generator().manual_seed(1)
    teacher = draw_teacher(2, 40, temperature=1.0, delta=0.5, dtype=torch.float32, scale=2.0,
                           generator=generator)
    student = torch.randn(3, 2, 40, generator=generator)
    student[:, 0, 7] = -280.0
    student[:, 1, [3, 30]] = -300.0
    student[1, 1, 30] = -260.0
    teacher[0, 7] = teacher[0].max() + 1.0  # the teacher's favourite: a large pull in the gradient
    loss, d_student, d_teacher = (x.cpu() for x in fused(
        target, student, teacher, temperature=1.0, delta=0.5))
    expected_loss, expected_student, expected_teacher = oracle(
        student, teacher, temperature=1.0, delta=0.5, reduction="none")
    assert torch.isfinite(loss).all()
    assert expected_student[:, 0, 7].abs().min() > 1e-3  # the gradient at stake is not tiny
    assert_close_to_oracle(loss, expected_loss, torch.float32, "loss")
    assert_close_to_oracle(d_student, expected_student, torch.float32, "d student")
    assert_close_to_oracle(d_teacher, expected_teacher, torch.float32, "d teacher")


@pytest.mark.parametrize("dtype, gap", [(torch.float32, 65.0), (torch.float64, 405.0)])
@pytest.mark.parametrize("target", over(("reference",) + API_TARGETS))
def test_close_agreement_gives_finite_gradients(target, dtype, gap):
    """Student and teacher agreeing on a confident class: the head/tail distances sum to ~1e-28
    (float32), whose square underflows. The gradient of lam_h must still be finite and match
    the reference's autograd (it divides lam by the sum, never by its square)."""
    student = torch.tensor([[0.0, -gap, -gap]], dtype=dtype, device=target.device).requires_grad_()
    teacher = torch.tensor([[0.0, 5.0 - gap, 5.0 - gap]], dtype=dtype,
                           device=target.device).requires_grad_()
    grads = torch.autograd.grad(
        hta_kl_div(student, teacher, temperature=1.0, backend=target.backend), (student, teacher))
    expected = torch.autograd.grad(
        hta_kl_div(student, teacher, temperature=1.0, backend="reference"), (student, teacher))
    for got, want in zip(grads, expected):
        assert torch.isfinite(got).all() and want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


# ---- determinism, the op's outputs and arguments -------------------------------------------------


def determinism_cases(target):
    if target.interpreted:
        return [((2, 40, 2, ("prob_mean",), 1), "2x40", False)]
    if target.device == "cuda":
        return [((8, classes, 4, ("prob_mean", "logit_mean"), 3), f"8x{classes}", False)
                for classes in (1000, 50257)]
    return [((7, 3001, 3, ("prob_mean", "logit_mean"), 3), "7x3001", False)]


@pytest.mark.parametrize("target, rows, classes, steps, time_reductions, reruns",
                         over(LAYOUTS, determinism_cases))
def test_bitwise_deterministic_and_inputs_untouched(target, rows, classes, steps, time_reductions,
                                                   reruns):
    generator = torch.Generator().manual_seed(31)
    teacher = draw_teacher(rows, classes, temperature=2.0, delta=0.5, dtype=torch.float32,
                           generator=generator).to(target.device)
    student = draw_student(teacher.cpu(), steps, generator).to(target.device)
    student_before, teacher_before = student.clone(), teacher.clone()
    for time_reduction in time_reductions:
        first = fused(target, student, teacher, temperature=2.0, delta=0.5,
                      time_reduction=time_reduction)
        for _ in range(reruns):
            again = fused(target, student, teacher, temperature=2.0, delta=0.5,
                          time_reduction=time_reduction)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(student, student_before) and torch.equal(teacher, teacher_before)


@pytest.mark.parametrize("target", over(LAYOUTS))
def test_gradients_only_when_requested(target):
    generator = torch.Generator().manual_seed(37)
    if target.interpreted:
        shape, dtype = (2, 20), torch.float64
    else:
        shape, dtype = (3, 100), torch.float32
    teacher = draw_teacher(*shape, temperature=2.0, delta=0.5, dtype=dtype, generator=generator)
    student = (torch.randn(2, *shape, generator=generator) * 6).to(dtype)
    options = dict(temperature=2.0, delta=0.5)
    loss, d_student, d_teacher = fused(target, student, teacher, **options, grad_student=False,
                                       grad_teacher=False)
    assert d_student.numel() == 0 and d_teacher.numel() == 0
    full_loss, full_student, full_teacher = fused(target, student, teacher, **options)
    assert torch.equal(loss, full_loss)
    for want_student, want_teacher in ((True, False), (False, True)):
        only_loss, only_student, only_teacher = fused(target, student, teacher, **options,
                                                      grad_student=want_student,
                                                      grad_teacher=want_teacher)
        assert torch.equal(only_loss, full_loss)
        if want_student:
            assert torch.equal(only_student, full_student) and only_teacher.numel() == 0
        else:
            assert torch.equal(only_teacher, full_teacher) and only_student.numel() == 0


@pytest.mark.parametrize("target", over(LAYOUTS))
def test_direct_call_outputs(target):
    device = target.device
    teacher = torch.randn(3, 5, device=device)
    student = torch.randn(1, 3, 5, device=device)
    loss, d_student, d_teacher = call_op(target, student, teacher, 2.0, 0.5, False, False, False,
                                         False)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    assert d_student.numel() == 0 and d_teacher.numel() == 0
    loss, d_student, d_teacher = call_op(target, student.double(), teacher.double(), 2.0, 0.5,
                                         False, False, True, True)
    assert loss.dtype == torch.float64 and d_student.shape == (1, 3, 5) and d_teacher.shape == (3, 5)
    empty = call_op(target, torch.randn(2, 0, 5, device=device), torch.randn(0, 5, device=device),
                    2.0, 0.5, False, False, True, True)
    assert empty[0].shape == (0,) and empty[1].shape == (2, 0, 5) and empty[2].shape == (0, 5)


def row_scale_cases(target):
    rows, classes = (2, 16) if target.interpreted else (7, 300)
    return [((rows, classes, mode), f"{rows}x{classes}-{mode}", False)
            for mode in ("2d", "prob_mean_T4", "logit_mean_T4")]


@pytest.mark.parametrize("target, rows, classes, mode",
                         over(KERNELS + ("cuda_emulated",), row_scale_cases))
def test_row_scale_scales_loss_and_gradients(target, rows, classes, mode):
    """row_scale (each row's weight in the reduction) multiplies the loss rows and both
    gradients; a power of two does so exactly."""
    generator = torch.Generator().manual_seed(21)
    steps, _ = MODES[mode]
    teacher = draw_teacher(rows, classes, temperature=2.0, delta=0.5, dtype=torch.float32,
                           generator=generator)
    student = draw_student(teacher, steps, generator)
    student = student if steps is not None else student.unsqueeze(0)
    student, teacher = student.to(target.device), teacher.to(target.device)
    args = (2.0, 0.5, mode.startswith("logit_mean"), False, True, True)
    plain = call_op(target, student, teacher, *args)
    for got, want in zip(call_op(target, student, teacher, *args, 0.25), plain):
        assert torch.equal(got, want * 0.25)
    for got, want in zip(call_op(target, student, teacher, *args, 1.0 / 7), plain):
        torch.testing.assert_close(got, want / 7, rtol=2e-6, atol=1e-12)


# The CUDA binding's errors are checked in a child process (tests/test_hta_kl_cuda.py).
IN_PROCESS_ERRORS = ("cpu", "triton", "triton_chunked")


@pytest.mark.parametrize("row_scale", [0.0, -1.0, math.inf, math.nan])
@pytest.mark.parametrize("target", over(IN_PROCESS_ERRORS))
def test_direct_call_rejects_bad_row_scale(target, row_scale):
    error = ValueError if target.backend == "triton" else RuntimeError
    with pytest.raises(error, match="row_scale"):
        call_op(target, torch.randn(1, 3, 5), torch.randn(3, 5), 2.0, 0.5, False, False, True,
                True, row_scale)


# (student, teacher, temperature, delta, the compiled op's message, Triton's error and message or
# None where the Triton launcher leaves the check to the public function).
BAD_INPUTS = {
    "student_2d": (torch.randn(3, 5), torch.randn(3, 5), 2.0, 0.5, "student must be",
                   (ValueError, r"student \[T, R, C\]")),
    "teacher_1d": (torch.randn(1, 3, 5), torch.randn(15), 2.0, 0.5, "teacher must be",
                   (ValueError, r"student \[T, R, C\]")),
    "classes_differ": (torch.randn(1, 3, 5), torch.randn(3, 4), 2.0, 0.5, "does not match",
                       (ValueError, r"student \[T, R, C\]")),
    "rows_differ": (torch.randn(1, 3, 5), torch.randn(2, 5), 2.0, 0.5, "does not match",
                    (ValueError, r"student \[T, R, C\]")),
    "no_steps": (torch.randn(0, 3, 5), torch.randn(3, 5), 2.0, 0.5, "T >= 1", None),
    "no_classes": (torch.randn(1, 3, 0), torch.randn(3, 0), 2.0, 0.5, "C must be", None),
    "dtypes_differ": (torch.randn(1, 3, 5), torch.randn(3, 5).double(), 2.0, 0.5, "same dtype",
                      (TypeError, "same dtype")),
    "integers": (torch.ones(1, 3, 5, dtype=torch.int64), torch.ones(3, 5, dtype=torch.int64), 2.0,
                 0.5, "floating-point", None),
    "not_contiguous": (torch.randn(1, 5, 3).transpose(1, 2), torch.randn(3, 5), 2.0, 0.5,
                       "contiguous", (ValueError, "contiguous")),
    "temperature_0": (torch.randn(1, 3, 5), torch.randn(3, 5), 0.0, 0.5, "temperature", None),
    "temperature_nan": (torch.randn(1, 3, 5), torch.randn(3, 5), math.nan, 0.5, "temperature",
                        None),
    "delta_0": (torch.randn(1, 3, 5), torch.randn(3, 5), 2.0, 0.0, "delta", None),
    "delta_1.5": (torch.randn(1, 3, 5), torch.randn(3, 5), 2.0, 1.5, "delta", None),
}


def bad_input_cases(target):
    return [((case,), case, False) for case, (*_, triton_error) in BAD_INPUTS.items()
            if target.backend != "triton" or triton_error is not None]


@pytest.mark.parametrize("target, case", over(IN_PROCESS_ERRORS, bad_input_cases))
def test_direct_call_rejects_bad_input(target, case):
    student, teacher, temperature, delta, message, triton_error = BAD_INPUTS[case]
    error, message = triton_error if target.backend == "triton" else (RuntimeError, message)
    with pytest.raises(error, match=message):
        call_op(target, student, teacher, temperature, delta, False, False, True, True)


# ---- autograd and torch.library registration -----------------------------------------------------


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


def gradcheck_cases(target):
    modes = ("2d", "prob_mean_T4", "logit_mean_T4") + (() if target.interpreted else ("prob_mean_T1",))
    return [((mode,), mode, False) for mode in modes]


@pytest.mark.parametrize("target, mode", over(API_TARGETS, gradcheck_cases))
def test_gradcheck(target, mode):
    steps, time_reduction = MODES[mode]
    generator = torch.Generator().manual_seed(4)
    teacher = clear_teacher(2 if target.interpreted else 3, 6, 1.5, 0.45, generator)
    student = draw_student(teacher, steps, generator)
    teacher = teacher.to(target.device).requires_grad_(True)
    student = student.to(target.device).requires_grad_(True)

    def loss(s, t):
        return hta_kl_div(s, t, temperature=1.5, delta=0.45, time_reduction=time_reduction,
                          detach_weights=False, reduction="none", backend=target.backend)

    # fast_mode on the interpreter: v^T J u for random u, v (two finite differences instead of
    # one per input element) keeps the run to seconds.
    assert torch.autograd.gradcheck(loss, (student, teacher), eps=1e-6, atol=1e-7,
                                     fast_mode=target.interpreted)


@pytest.mark.parametrize("target", over(("reference",) + API_TARGETS))
def test_double_backward_is_refused_by_kernels(target):
    """A kernel's gradient is computed, not traced: create_graph=True fails clearly instead of
    silently dropping the second-order term. The reference stays differentiable to any order."""
    student = torch.randn(3, 6, device=target.device, requires_grad=True)
    teacher = torch.randn(3, 6, device=target.device)
    if target.backend != "reference":
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(hta_kl_div(student, teacher, backend=target.backend)
                                + (student ** 3).sum(), student, create_graph=True)
    grad, = torch.autograd.grad(
        hta_kl_div(student, teacher, backend="reference") + (student ** 3).sum(), student,
        create_graph=True)
    assert grad.requires_grad


@pytest.mark.parametrize("target", over(("reference",) + API_TARGETS))
def test_empty_batch_has_defined_results(target):
    student, teacher = (torch.randn(0, 6, device=target.device) for _ in range(2))
    assert hta_kl_div(student, teacher, reduction="sum", backend=target.backend).item() == 0.0
    assert hta_kl_div(student, teacher, reduction="none", backend=target.backend).shape == (0,)


def opcheck_cases(target):
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
        row_scale = (0.25,) if logit_mean else ()  # the schema's default (1.0) otherwise
        args = (student, teacher, 2.0, 0.5, logit_mean, detach, want_student, want_teacher,
                *row_scale)
        cases.append(((args,), f"{dtype_id(dtype)}-T{steps}", False))
    # The interpreter (slow) checks the registration with all gradients and with row_scale.
    return [cases[0], cases[2]] if target.interpreted else cases


@pytest.mark.parametrize("target, args", over(KERNELS, opcheck_cases))
def test_opcheck(target, args):
    student, teacher, *options = args
    want_student, want_teacher = options[4], options[5]
    student = student.to(target.device).requires_grad_(want_student)
    teacher = teacher.to(target.device).requires_grad_(want_teacher)
    # AOTAutograd runs a Triton op's Python body on fake tensors, which the interpreter (it needs
    # real memory) cannot take: there, opcheck leaves out its aot_dispatch checks.
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not target.interpreted:
        tests += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(kernel_ops(target.backend).hta_kl_fused, (student, teacher, *options),
                          test_utils=tests)


@pytest.mark.parametrize("target", over(("reference",) + API_TARGETS))
def test_torch_compile_fullgraph(target):
    """torch.compile(fullgraph=True) traces hta_kl_div through the backend's op without a graph
    break; the compiled loss and gradient are the eager ones and the oracle's. On CPU the Triton
    kernel is Triton's interpreter, which AOTAutograd/Inductor cannot trace (they run the op's
    Python body on fake tensors, and the interpreter needs real memory), so that case uses Dynamo's
    "eager" backend: the full graph is captured, the op runs eagerly."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(1100)
    teacher = draw_teacher(4, 50, temperature=2.0, delta=0.5, dtype=torch.float64, scale=3.0,
                           generator=generator).to(target.device)
    student = torch.randn(3, 4, 50, generator=generator, dtype=torch.float64).to(target.device)

    def loss_fn(s, t):
        return hta_kl_div(s, t, temperature=2.0, delta=0.5, backend=target.backend)

    compiled = torch.compile(loss_fn, fullgraph=True,
                             backend="eager" if target.interpreted else "inductor")
    s = student.requires_grad_(True)
    eager_loss = loss_fn(s, teacher)
    (eager_grad,) = torch.autograd.grad(eager_loss, s)
    compiled_loss = compiled(s, teacher)
    (compiled_grad,) = torch.autograd.grad(compiled_loss, s)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)
    expected_loss, expected_grad, _ = oracle(student.cpu(), teacher.cpu(), temperature=2.0,
                                             delta=0.5)
    assert_close_to_oracle(compiled_loss.detach().cpu(), expected_loss, torch.float64, "loss")
    assert_close_to_oracle(compiled_grad.cpu(), expected_grad, torch.float64, "d student")

