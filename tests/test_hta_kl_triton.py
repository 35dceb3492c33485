"""The Triton HTA-KL op against the float64 oracle (tests/hta_kl_oracle.py).

Without a GPU the kernels run on CPU tensors through Triton's interpreter: TRITON_INTERPRET must be
set before the kernel module is imported (triton.jit reads it when it decorates), so it is set
here, before anything imports htakl_kernels.triton_kernels. It only changes how Triton kernels run.
With a GPU it is left alone, so the CUDA cases test the compiled kernel; the CPU cases then run only
if the caller set TRITON_INTERPRET=1 themselves.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hta_kl_oracle import assert_close_to_oracle, boundary_margin, draw_teacher, oracle  # noqa: E402
from triton_compile import parse_usage, run_compiler_script  # noqa: E402
from htakl_kernels import hta_kl_div  # noqa: E402
from htakl_kernels import reference  # noqa: E402

triton = pytest.importorskip("triton")
from htakl_kernels.triton_kernels.hta_kl import launch_hta_kl  # noqa: E402

# The interpreter evaluates both sides of every tl.where with numpy, which warns about the -inf
# and NaN lanes that the kernel then discards.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRETED, reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no GPU")),
]
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Layouts: rows held on chip (the default limit), or the chunked path forced on small rows.
ON_CHIP = {}
CHUNKED = dict(on_chip_limit=16)
MODES = ("2d", "prob_mean", "logit_mean")
TEMPERATURE = 2.0
DELTA = 0.5


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _student(mode: str, steps: int, rows: int, classes: int, dtype, generator, scale=2.0):
    shape = (rows, classes) if mode == "2d" else (steps, rows, classes)
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def _prob_mean_pair(classes: int, dtype, seed: int, *, temperature=TEMPERATURE, delta=DELTA,
                    scale=3.0):
    """(student, teacher) from one seed: 2 rows of teacher logits (draw_teacher, `scale`) and a
    T = 2 prob_mean student."""
    generator = _generator(seed)
    teacher = draw_teacher(2, classes, temperature=temperature, delta=delta, dtype=dtype,
                           scale=scale, generator=generator)
    return _student("prob_mean", 2, 2, classes, dtype, generator), teacher


def _run(student, teacher, *, mode="prob_mean", detach_weights=False, delta=DELTA,
         temperature=TEMPERATURE, grads=(True, True), **layout):
    """The fused kernel on rows: (loss_rows, d student shaped like student, d teacher)."""
    student_rows = student if student.dim() == 3 else student.unsqueeze(0)
    loss, d_student, d_teacher = launch_hta_kl(
        student_rows.contiguous(), teacher.contiguous(), temperature, delta,
        mode == "logit_mean", detach_weights, *grads, **layout)
    if grads[0]:
        d_student = d_student.reshape(student.shape)
    return loss, d_student, d_teacher


def _oracle(student, teacher, *, mode="prob_mean", detach_weights=False, delta=DELTA,
            temperature=TEMPERATURE):
    time_reduction = "logit_mean" if mode == "logit_mean" else "prob_mean"
    return oracle(student, teacher, temperature=temperature, delta=delta,
                  time_reduction=time_reduction, detach_weights=detach_weights, reduction="none")


def _assert_matches_oracle(student, teacher, dtype, **options):
    layout = {k: options.pop(k) for k in ("on_chip_limit", "chunk") if k in options}
    loss, d_student, d_teacher = _run(student, teacher, **options, **layout)
    expected_loss, expected_student, expected_teacher = _oracle(student, teacher, **options)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert d_student.dtype == dtype and d_teacher.dtype == dtype
    assert_close_to_oracle(loss.cpu(), expected_loss, dtype, "loss rows")
    assert_close_to_oracle(d_student.cpu(), expected_student, dtype, "d student")
    assert_close_to_oracle(d_teacher.cpu(), expected_teacher, dtype, "d teacher")


def _dtypes(device: str, cpu=(torch.float64,)):
    """A GPU runs every case in all dtypes. The interpreter is slow: CPU cases run in float64 (the
    tightest comparison) unless they say otherwise, and test_storage_dtypes_on_cpu covers the
    others."""
    return ALL_DTYPES if device == "cuda" else cpu


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [ON_CHIP, CHUNKED], ids=["on_chip", "chunked"])
@pytest.mark.parametrize("detach_weights", [False, True], ids=["weights", "detached"])
@pytest.mark.parametrize("mode", MODES)
def test_forward_and_gradients_match_oracle(device, layout, detach_weights, mode):
    classes = 37  # three chunks of 16 on the chunked path, the last one partial
    # Not binary fractions: float64 math must get temperature and delta to the last bit.
    temperature, delta = 0.7, 0.37
    for seed, dtype in enumerate(_dtypes(device)):
        generator = _generator(seed)
        teacher = draw_teacher(2, classes, temperature=temperature, delta=delta, dtype=dtype,
                               scale=2.0, generator=generator)
        student = _student(mode, 3, 2, classes, dtype, generator)
        _assert_matches_oracle(student.to(device), teacher.to(device), dtype, mode=mode,
                               detach_weights=detach_weights, temperature=temperature,
                               delta=delta, **layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [ON_CHIP, CHUNKED], ids=["on_chip", "chunked"])
def test_storage_dtypes_on_cpu(dtype, layout):
    if not INTERPRETED:
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    student, teacher = _prob_mean_pair(40, dtype, 7)
    _assert_matches_oracle(student, teacher, dtype, mode="prob_mean", **layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("classes", [1, 3, 1000, 1025])
def test_class_counts(device, classes):
    for seed, dtype in enumerate(_dtypes(device, cpu=(torch.float32,))):
        student, teacher = _prob_mean_pair(classes, dtype, 100 + seed, delta=0.3, scale=4.0)
        _assert_matches_oracle(student.to(device), teacher.to(device), dtype, delta=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_long_row_chunked(device):
    """C = 1025 on the chunked path: five chunks, the last holding one class."""
    for seed, dtype in enumerate(_dtypes(device, cpu=(torch.float32,))):
        student, teacher = _prob_mean_pair(1025, dtype, 200 + seed, temperature=1.0, delta=0.7,
                                           scale=2.0)
        _assert_matches_oracle(student.to(device), teacher.to(device), dtype, temperature=1.0,
                               delta=0.7, on_chip_limit=256)


def _tied_teacher(dtype):
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [ON_CHIP, CHUNKED], ids=["on_chip", "chunked"])
def test_tied_rows_follow_the_stable_sort(device, layout):
    delta = 0.6
    for seed, dtype in enumerate(_dtypes(device, cpu=(torch.float64, torch.float32))):
        teacher = _tied_teacher(dtype)
        p = torch.softmax(teacher.double() / 1.0, dim=-1)
        head = reference.head_mask(p, delta)
        # The cases the docstring describes, checked on the float64 oracle's mask.
        assert head[0].nonzero().flatten().tolist() == [3, 17]
        assert head[1].nonzero().flatten().tolist() == list(range(22))
        assert head[2].nonzero().flatten().tolist() == [1, 2, 9, 16, 30]
        assert (boundary_margin(teacher, 1.0, delta) > 1e-3).all()
        student = _student("prob_mean", 2, 3, 37, dtype, _generator(300 + seed))
        _assert_matches_oracle(student.to(device), teacher.to(device), dtype, temperature=1.0,
                               delta=delta, **layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [ON_CHIP, CHUNKED], ids=["on_chip", "chunked"])
def test_empty_head(device, layout):
    """A confident teacher (p_max >= delta): nothing is in the head, lam_h = 0 unless q = p."""
    for seed, dtype in enumerate(_dtypes(device)):
        generator = _generator(400 + seed)
        teacher = (torch.randn(3, 30, generator=generator)).to(dtype)
        teacher[:, 7] = 12.0
        assert not reference.head_mask(torch.softmax(teacher.double() / TEMPERATURE, -1),
                                       DELTA).any()
        student = _student("2d", 1, 3, 30, dtype, generator)
        _assert_matches_oracle(student.to(device), teacher.to(device), dtype, mode="2d", **layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [ON_CHIP, CHUNKED], ids=["on_chip", "chunked"])
@pytest.mark.parametrize("mode", MODES)
def test_masked_classes(device, layout, mode):
    """-inf logits at the same classes of teacher and student (a masked vocabulary): p = q = 0
    there, every term has 0 log 0 = 0, the gradients there are 0, and the rest of the row is the
    oracle's row without those classes."""
    for seed, dtype in enumerate(_dtypes(device)):
        generator = _generator(500 + seed)
        masked = torch.zeros(40, dtype=torch.bool)
        masked[[0, 5, 16, 17, 39]] = True
        kept = int((~masked).sum())
        teacher = torch.full((2, 40), float("-inf"), dtype=dtype)
        teacher[:, ~masked] = draw_teacher(2, kept, temperature=TEMPERATURE, delta=DELTA,
                                           dtype=dtype, scale=3.0, generator=generator)
        student = torch.full((2, 2, 40), float("-inf"), dtype=dtype)
        student[:, :, ~masked] = _student("prob_mean", 2, 2, kept, dtype, generator)
        if mode == "2d":
            student = student[0]
        loss, d_student, d_teacher = _run(student.to(device), teacher.to(device), mode=mode,
                                          **layout)
        expected_loss, expected_student, expected_teacher = _oracle(
            student[..., ~masked], teacher[:, ~masked], mode=mode)
        assert_close_to_oracle(loss.cpu(), expected_loss, dtype, "loss rows")
        assert_close_to_oracle(d_student[..., ~masked].cpu(), expected_student, dtype,
                               "d student")
        assert_close_to_oracle(d_teacher[:, ~masked].cpu(), expected_teacher, dtype, "d teacher")
        assert (d_student[..., masked] == 0).all() and (d_teacher[:, masked] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [ON_CHIP, CHUNKED], ids=["on_chip", "chunked"])
def test_non_finite_inputs(device, layout):
    """-inf only in the student makes FKL infinite; NaN poisons its own row and no other."""
    for seed, dtype in enumerate(_dtypes(device)):
        generator = _generator(600 + seed)
        teacher = draw_teacher(3, 40, temperature=TEMPERATURE, delta=DELTA, dtype=dtype,
                               scale=3.0, generator=generator)
        student = _student("2d", 1, 3, 40, dtype, generator)
        student[0, 4] = float("-inf")
        teacher[1, 9] = float("nan")
        loss, _, _ = _run(student.to(device), teacher.to(device), mode="2d", **layout)
        expected, _, _ = _oracle(student, teacher, mode="2d")
        assert loss[0].item() == float("inf") and expected[0].item() == float("inf")
        assert loss[1].isnan() and expected[1].isnan()
        assert_close_to_oracle(loss[2:].cpu(), expected[2:], dtype, "finite row")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("time_reduction", ["prob_mean", "logit_mean"])
def test_public_api_matches_reference(device, reduction, time_reduction):
    """hta_kl_div(backend="triton") through the registered op and its autograd, with leading
    batch dimensions and a non-uniform upstream gradient for reduction="none"."""
    generator = _generator(700)
    teacher = draw_teacher(6, 33, temperature=TEMPERATURE, delta=DELTA, dtype=torch.float64,
                           scale=3.0, generator=generator).reshape(2, 3, 33)
    student = torch.randn(3, 2, 3, 33, generator=generator, dtype=torch.float64)
    upstream = torch.rand(2, 3, generator=generator, dtype=torch.float64)
    results = []
    for backend in ("triton", "reference"):
        s = student.to(device).requires_grad_(True)
        t = teacher.to(device).requires_grad_(True)
        loss = hta_kl_div(s, t, temperature=TEMPERATURE, delta=DELTA,
                          time_reduction=time_reduction, reduction=reduction, backend=backend)
        objective = (loss * upstream.to(device)).sum() if reduction == "none" else loss
        results.append((loss.detach(), *torch.autograd.grad(objective, (s, t))))
    for actual, expected, what in zip(results[0], results[1], ("loss", "d student", "d teacher")):
        assert_close_to_oracle(actual.cpu(), expected.cpu(), torch.float64, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("time_reduction", ["prob_mean", "logit_mean", None])
def test_gradcheck(device, time_reduction):
    generator = _generator(800)
    teacher = torch.randn(2, 6, generator=generator, dtype=torch.float64) * 2
    # gradcheck's finite differences must not move a class across the head boundary.
    while (boundary_margin(teacher, TEMPERATURE, DELTA) < 0.05).any():
        teacher = torch.randn(2, 6, generator=generator, dtype=torch.float64) * 2
    shape = (2, 6) if time_reduction is None else (3, 2, 6)
    student = torch.randn(shape, generator=generator, dtype=torch.float64)

    def loss(s, t):
        return hta_kl_div(s, t, temperature=TEMPERATURE, delta=DELTA,
                          time_reduction=time_reduction or "prob_mean", detach_weights=False,
                          reduction="sum", backend="triton")

    inputs = (student.to(device).requires_grad_(True), teacher.to(device).requires_grad_(True))
    # fast_mode: compares v^T J u for random u, v (two finite differences instead of one per
    # input element), which keeps the interpreter run to seconds.
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_untouched_and_results_deterministic(device):
    student, teacher = (t.to(device) for t in _prob_mean_pair(40, torch.float32, 900))
    student_before, teacher_before = student.clone(), teacher.clone()
    for layout in (ON_CHIP, CHUNKED):
        first = _run(student, teacher, **layout)
        second = _run(student, teacher, **layout)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
    assert torch.equal(student, student_before) and torch.equal(teacher, teacher_before)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_only_when_asked(device):
    student, teacher = (t.to(device) for t in _prob_mean_pair(20, torch.float64, 1000))
    full_loss, full_student, _ = _run(student, teacher)
    loss, d_student, d_teacher = _run(student, teacher, grads=(True, False))
    assert d_teacher.numel() == 0
    assert torch.equal(loss, full_loss) and torch.equal(d_student, full_student)
    loss, d_student, _ = _run(student, teacher, grads=(False, False))
    assert d_student.numel() == 0 and torch.equal(loss, full_loss)


@pytest.mark.parametrize("device", DEVICES)
def test_close_agreement_gives_finite_gradients(device):
    """The head/tail distances sum to ~1e-28, whose square underflows in float32: the kernel's
    gradients must stay finite and match the reference's autograd (tests/test_api.py has the
    other backends)."""
    student = torch.tensor([[[0.0, -65.0, -65.0]]], device=device)
    teacher = torch.tensor([[0.0, -60.0, -60.0]], device=device)
    _, d_student, d_teacher = launch_hta_kl(student, teacher, 1.0, 0.5, False, False, True, True)
    s, t = student[0].clone().requires_grad_(), teacher.clone().requires_grad_()
    want_s, want_t = torch.autograd.grad(
        reference.hta_kl_div(s, t, temperature=1.0, reduction="sum"), (s, t))
    torch.testing.assert_close(d_student[0], want_s, rtol=1e-4, atol=0)
    torch.testing.assert_close(d_teacher, want_t, rtol=1e-4, atol=0)


def test_rejects_bad_layout():
    teacher = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="student \\[T, R, C\\]"):
        launch_hta_kl(torch.zeros(2, 5), teacher, 1.0, 0.5, False, False, False, False)
    with pytest.raises(ValueError, match="contiguous"):
        launch_hta_kl(torch.zeros(1, 5, 2).transpose(1, 2), teacher, 1.0, 0.5, False, False,
                      False, False)


def test_rejects_more_classes_than_int32_counts(monkeypatch):
    """Rows past 2^31 - 1 classes would wrap the kernel's int32 class counts: refused up front
    (checked with the limit lowered to 4, as a real such row needs 8 GiB)."""
    import htakl_kernels.triton_kernels.hta_kl as module

    monkeypatch.setattr(module, "MAX_CLASSES", 4)
    with pytest.raises(ValueError, match="C = 5 classes.*at most 4"):
        launch_hta_kl(torch.zeros(1, 2, 5), torch.zeros(2, 5), 1.0, 0.5, False, False, False,
                      False)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    """torch.compile(fullgraph=True) traces hta_kl_div through the Triton op without a graph
    break. On CPU the kernel is Triton's interpreter, which AOTAutograd/Inductor cannot trace
    (they run the op's Python body on fake tensors, and the interpreter needs real memory), so the
    CPU case uses Dynamo's "eager" backend: the full graph is captured, the op runs eagerly. On a
    GPU the default Inductor backend compiles it."""
    torch._dynamo.reset()
    generator = _generator(1100)
    teacher = draw_teacher(4, 50, temperature=TEMPERATURE, delta=DELTA, dtype=torch.float64,
                           scale=3.0, generator=generator).to(device)
    student = torch.randn(3, 4, 50, generator=generator, dtype=torch.float64).to(device)

    def loss_fn(s, t):
        return hta_kl_div(s, t, temperature=TEMPERATURE, delta=DELTA, backend="triton")

    compiled = torch.compile(loss_fn, fullgraph=True,
                             backend="eager" if device == "cpu" else "inductor")
    s = student.requires_grad_(True)
    compiled_loss = compiled(s, teacher)
    (compiled_grad,) = torch.autograd.grad(compiled_loss, s)
    expected_loss, expected_grad, _ = oracle(student.cpu(), teacher.cpu(), temperature=TEMPERATURE,
                                             delta=DELTA)
    assert_close_to_oracle(compiled_loss.detach().cpu(), expected_loss, torch.float64, "loss")
    assert_close_to_oracle(compiled_grad.cpu(), expected_grad, torch.float64, "d student")


def test_schema_is_the_shared_one():
    """triton_op infers the schema from the Python signature; it must be _library.HTA_KL_SCHEMA."""
    from htakl_kernels._library import HTA_KL_SCHEMA

    schema = str(torch.ops.htakl.hta_kl_fused_triton.default._schema)
    # Parsed and printed again, as the op's schema is (a default of 1.0 prints as "1.").
    assert schema == str(torch._C.parse_schema("htakl::hta_kl_fused_triton" + HTA_KL_SCHEMA))


def test_compiles_for_sm90_without_a_gpu():
    """The interpreter skips the compiler's frontend: compile the real kernel for an H100 (sm_90)
    in a process without TRITON_INTERPRET, for a 16-bit on-chip prob_mean row and a float32
    chunked row, and check ptxas' register report is there."""
    script = (
        "from htakl_kernels.triton_kernels.hta_kl_aot import compile_variant, resource_usage\n"
        "for storage, on_chip, block, prob_mean in (('bfloat16', True, 4096, True),\n"
        "                                           ('float32', False, 4096, False)):\n"
        "    kernel = compile_variant(storage, on_chip=on_chip, block=block, prob_mean=prob_mean)\n"
        "    print(*resource_usage(kernel))\n"
    )
    usage = parse_usage(run_compiler_script(script))
    assert len(usage) == 2 and all(0 < registers <= 255 for registers, _ in usage)
