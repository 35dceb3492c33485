"""The Triton HTA-KL kernel's own paths, against the float64 oracle (tests/hta_kl_oracle.py):
the branches of its head selection and of its log q that the shared contract cases seldom reach.

Without a GPU these run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET), so
the rows stay small; the chunked path is forced on them through the launcher's layout knobs.
"""

from __future__ import annotations

import os

import pytest
import torch

from hta_kl_oracle import assert_close_to_oracle, boundary_margin, draw_teacher, oracle
from triton_compile import parse_usage, run_compiler_script

triton = pytest.importorskip("triton")
from htakl_kernels.triton_kernels.hta_kl import launch_hta_kl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = [
    pytest.mark.triton,
    # The interpreter evaluates both sides of every tl.where with numpy, which warns about the
    # -inf and NaN lanes that the kernel then discards.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]
ON_CHIP = {}
# Chunks (and the workspace of boundary candidates) of 16 classes.
CHUNKED = dict(on_chip_limit=16)
# The same chunks, each row split over programs of one chunk each.
SPLIT = dict(on_chip_limit=16, segments=8)
LAYOUTS = pytest.mark.parametrize("layout", [ON_CHIP, CHUNKED, SPLIT],
                                  ids=["on_chip", "chunked", "split"])


def _check(student, teacher, *, temperature, delta, logit_mean=False, **layout):
    """The kernel's loss rows and both gradients against the oracle's, in the inputs' dtype."""
    dtype = teacher.dtype
    loss, d_student, d_teacher = launch_hta_kl(
        student.to(DEVICE), teacher.to(DEVICE), temperature, delta, logit_mean, False, True,
        True, **layout)
    two_d = student.shape[0] == 1
    expected = oracle(student[0] if two_d else student, teacher, temperature=temperature,
                      delta=delta, time_reduction="logit_mean" if logit_mean else "prob_mean",
                      reduction="none")
    assert_close_to_oracle(loss.cpu(), expected[0], dtype, "loss rows")
    assert_close_to_oracle(d_student.cpu().reshape(expected[1].shape), expected[1], dtype,
                           "d student")
    assert_close_to_oracle(d_teacher.cpu(), expected[2], dtype, "d teacher")
    return loss


@pytest.mark.parametrize("layout", [CHUNKED, SPLIT], ids=["chunked", "split"])
def test_boundary_bucket_larger_than_the_workspace(layout):
    """Teacher probabilities within one octave of each other: the first histogram's boundary
    bucket holds every class, far more than the 16 keys of the workspace, so the chunked path
    (and a split row's selection program) narrows it with further histogram passes before the
    bisection."""
    generator = torch.Generator().manual_seed(2)
    delta = 0.4
    teacher = torch.rand(3, 150, generator=generator, dtype=torch.float64) * 0.6
    while (boundary_margin(teacher, 1.0, delta) < 1e-4).any():
        teacher = torch.rand(3, 150, generator=generator, dtype=torch.float64) * 0.6
    p = torch.softmax(teacher, -1)
    assert (p.max(-1).values < 2 * p.min(-1).values).all()
    student = torch.randn(2, 3, 150, generator=generator, dtype=torch.float64)
    _check(student, teacher, temperature=1.0, delta=delta, **layout)


@LAYOUTS
def test_row_of_one_value(layout):
    """Every class tied (a uniform row of 200): the boundary bucket narrows to the one key, whose
    tie count comes from the histogram and the last tied class in the head from a count over the
    row (more ties than the workspace holds); the first ceil(delta C) - 1 classes are the head."""
    teacher = torch.zeros(1, 200, dtype=torch.float64)
    student = torch.randn(1, 1, 200, generator=torch.Generator().manual_seed(3),
                          dtype=torch.float64)
    # delta C = 60.3: classes 0..59 have S_k = (k + 1) / 200 < delta, clear of the boundary.
    _check(student, teacher, temperature=1.0, delta=0.3015, **layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_choose_the_same_head(dtype):
    """On chip and chunked, the selection finds the same boundary from the same fixed-point
    masses: with teachers drawn clear of delta, both match the oracle and each other closely."""
    generator = torch.Generator().manual_seed(4)
    teacher = draw_teacher(3, 70, temperature=2.0, delta=0.6, dtype=dtype, scale=1.5,
                           generator=generator)
    student = torch.randn(1, 3, 70, generator=generator).to(dtype)
    on_chip = _check(student, teacher, temperature=2.0, delta=0.6)
    chunked = _check(student, teacher, temperature=2.0, delta=0.6, **CHUNKED)
    torch.testing.assert_close(on_chip, chunked, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["2d", "prob_mean", "logit_mean"])
@pytest.mark.parametrize("detach_weights", [False, True], ids=["weights", "detached"])
def test_split_rows(mode, detach_weights):
    """Rows of 70 classes over 5 programs, with classes tied at the boundary in different
    segments (row 0: four at the top, two of them in the head; row 1: the boundary in a bucket of
    its own), against the oracle and, bit for bit, against a second call."""
    generator = torch.Generator().manual_seed(6)
    teacher = draw_teacher(3, 70, temperature=0.7, delta=0.37, dtype=torch.float64, scale=2.0,
                           generator=generator)
    teacher[0] = -30.0
    teacher[0, [3, 17, 40, 66]] = 0.0
    teacher[0, [1, 50]] = -2.0
    assert (boundary_margin(teacher, 0.7, 0.37) > 1e-3).all()
    student = torch.randn(1 if mode == "2d" else 3, 3, 70, generator=generator,
                          dtype=torch.float64)
    loss, d_student, d_teacher = launch_hta_kl(student, teacher, 0.7, 0.37, mode == "logit_mean",
                                               detach_weights, True, True, **SPLIT)
    expected = oracle(student[0] if mode == "2d" else student, teacher, temperature=0.7,
                      delta=0.37, time_reduction=mode if mode != "2d" else "prob_mean",
                      detach_weights=detach_weights, reduction="none")
    assert_close_to_oracle(loss, expected[0], torch.float64, "loss rows")
    assert_close_to_oracle(d_student.reshape(expected[1].shape), expected[1], torch.float64,
                           "d student")
    assert_close_to_oracle(d_teacher, expected[2], torch.float64, "d teacher")
    again = launch_hta_kl(student, teacher, 0.7, 0.37, mode == "logit_mean", detach_weights,
                          True, True, **SPLIT)
    for first, second in zip((loss, d_student, d_teacher), again):
        assert torch.equal(first, second)


@pytest.mark.slow
@pytest.mark.parametrize("logit_mean", [False, True], ids=["prob_mean", "logit_mean"])
def test_long_awkward_row(logit_mean):
    """A row of 262141 classes (2^18 - 3: the last chunk partial) on the default chunked layout."""
    generator = torch.Generator().manual_seed(5)
    classes = 2**18 - 3
    # Peaked enough that the boundary stays clear of delta by the oracle's margin for this C.
    teacher = draw_teacher(1, classes, temperature=2.0, delta=0.5, dtype=torch.float32,
                           scale=12.0, generator=generator)
    student = torch.randn(2, 1, classes, generator=generator) * 4.0
    _check(student, teacher, temperature=2.0, delta=0.5, logit_mean=logit_mean)


@pytest.mark.slow
def test_compiled_layouts_do_not_spill():
    """Compiled for sm_90 (no GPU needed), the layouts the benchmark shapes run keep every value in
    registers: a row of 1000 classes on chip, the chunked kernel and every phase of the split one,
    for 2-D and prob_mean students in float32 and bfloat16 (cuobjdump's STACK is 0)."""
    script = (
        "from htakl_kernels.triton_kernels.hta_kl_aot import (\n"
        "    SPLIT_PHASES, compile_split_variant, compile_variant, resource_usage)\n"
        "for storage in ('float32', 'bfloat16'):\n"
        "    for prob_mean, steps_pad in ((False, 1), (True, 4)):\n"
        "        kernels = [compile_variant(storage, on_chip=True, block=1024,\n"
        "                                   prob_mean=prob_mean, steps_pad=steps_pad),\n"
        "                   compile_variant(storage, on_chip=False, block=4096,\n"
        "                                   prob_mean=prob_mean, steps_pad=steps_pad)]\n"
        "        kernels += [compile_split_variant(storage, phase=phase, block=4096,\n"
        "                                          prob_mean=prob_mean, steps_pad=steps_pad)\n"
        "                    for phase in SPLIT_PHASES]\n"
        "        for kernel in kernels:\n"
        "            print(*resource_usage(kernel))\n"
    )
    usage = parse_usage(run_compiler_script(script))
    assert len(usage) == 2 * 2 * 8
    assert all(0 < registers <= 255 and spill == 0 for registers, spill in usage), usage
