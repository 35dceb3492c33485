"""What only the CUDA HTA-KL kernel (csrc/cuda/hta_kl_cuda_kernels.cuh) has: its shared-memory
and global-memory row paths, its vector loads (and the scalar path for unaligned storage), its
binding's errors and 64-bit offsets. The contract it shares with the other backends is
tests/test_hta_kl_contract.py.

Runs only where CUDA is available and the extension was built with CUDA.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from backend_targets import TARGETS
from hta_kl_oracle import (
    PEAKED_DELTA,
    add_peaks,
    assert_close_for_row_size,
    check_fused_against_oracle,
    draw_teacher,
    fused,
    oracle,
)
from htakl_kernels._backends import extension_built_with_cuda

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and extension_built_with_cuda()),
                       reason="needs a CUDA device and htakl_kernels._C built with CUDA"),
]

CUDA = TARGETS["cuda"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def draw_case(rows, classes, steps, dtype, *, seed):
    """A prob_mean student of `steps` steps and a teacher clear of the head boundary, on the GPU."""
    generator = torch.Generator().manual_seed(seed)
    teacher = draw_teacher(rows, classes, temperature=2.0, delta=0.5, dtype=dtype,
                           generator=generator)
    student = (torch.randn(steps, rows, classes, generator=generator) * 6).to(dtype)
    return student.cuda(), teacher.cuda()


def test_rows_that_fit_shared_memory_and_rows_that_do_not_agree_with_the_oracle():
    # float32, T = 3: 4 * 8192 * 4 bytes = 128 KiB fits an sm_80/sm_90 block's shared memory,
    # 4 * 16384 * 4 bytes does not (both paths, same oracle).
    for classes in (8192, 16384):
        student, teacher = draw_case(3, classes, 3, torch.float32, seed=5)
        check_fused_against_oracle(CUDA, student, teacher, temperature=2.0, delta=0.5,
                                   time_reduction="prob_mean", what=f"C={classes}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_storage_uses_the_scalar_path(dtype):
    # Contiguous tensors whose data starts one element past a 16-byte boundary: no row is aligned.
    rows, classes, steps = 3, 1024, 2
    student, teacher = draw_case(rows, classes, steps, dtype, seed=13)
    shifted_student = torch.empty(student.numel() + 1, dtype=dtype, device="cuda")[1:]
    shifted_student.copy_(student.flatten())
    shifted_teacher = torch.empty(teacher.numel() + 1, dtype=dtype, device="cuda")[1:]
    shifted_teacher.copy_(teacher.flatten())
    shifted_student = shifted_student.view(student.shape)
    shifted_teacher = shifted_teacher.view(teacher.shape)
    assert shifted_student.data_ptr() % 16 != 0 and shifted_student.is_contiguous()
    check_fused_against_oracle(CUDA, shifted_student, shifted_teacher, temperature=2.0, delta=0.5,
                               time_reduction="prob_mean", what="unaligned")


# The head selection sweeps the row until the classes left in it fit its shared-memory list of
# kCandidates = 2048 keys (hta_kl_cuda_kernels.cuh), then reads only the list: rows listed in the
# first sweep and after the first digit, each for the three kernels (one softmax, prob_mean,
# logit_mean).
SELECTION_ROWS = {
    "listed at once": (2047, 8.0),
    "exactly the list": (2048, 8.0),
    "listed after a digit": (2049, 8.0),
    "long row": (50257, 8.0),
}
STUDENTS = {"2-D": (None, "prob_mean"), "prob_mean": (3, "prob_mean"),
            "logit_mean": (3, "logit_mean")}


@pytest.mark.parametrize("student_kind", sorted(STUDENTS))
@pytest.mark.parametrize("row_kind", sorted(SELECTION_ROWS))
def test_head_selection_paths_agree_with_the_oracle(row_kind, student_kind):
    classes, scale = SELECTION_ROWS[row_kind]
    steps, time_reduction = STUDENTS[student_kind]
    generator = torch.Generator().manual_seed(classes)
    teacher = draw_teacher(3, classes, temperature=2.0, delta=0.5, dtype=torch.float32,
                           scale=scale, generator=generator)
    shape = (3, classes) if steps is None else (steps, 3, classes)
    student = torch.randn(shape, generator=generator) * 6
    check_fused_against_oracle(CUDA, student.cuda(), teacher.cuda(), temperature=2.0, delta=0.5,
                               time_reduction=time_reduction, what=f"{row_kind}, {student_kind}")


# Each pass walks a row's whole 16-byte chunks (every pointer it touches aligned), then its edge
# element by element (hta_kl_cuda_kernels.cuh's for_each_span): a row length that is not a
# multiple of the chunk leaves row 0 a partial last chunk and puts the other rows off the vector
# path; steps whose distance is not a multiple of 16 bytes put a prob_mean or logit_mean row off it
# although its first step is aligned. Rows held in shared memory (C about 1000) and rows re-read
# from global memory (C = 65539), for every kind of student.
CHUNK_EDGES = {"partial last chunk": (4, 1003, 3), "steps off the vector path": (3, 1002, 2),
               "long rows with an edge": (4, 65539, 3)}


@pytest.mark.parametrize("student_kind", sorted(STUDENTS))
@pytest.mark.parametrize("case", sorted(CHUNK_EDGES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_chunks_and_row_edges_agree_with_the_oracle(dtype, case, student_kind):
    rows, classes, steps = CHUNK_EDGES[case]
    two_d = STUDENTS[student_kind][0] is None
    student, teacher = draw_case(rows, classes, 1 if two_d else steps, dtype, seed=classes)
    check_fused_against_oracle(CUDA, student[0] if two_d else student, teacher, temperature=2.0,
                               delta=0.5, time_reduction=STUDENTS[student_kind][1],
                               what=f"{case}, {student_kind}")


# (classes, logit levels): the top level's group of tied classes is listed in the first sweep,
# after the first digit, or never (more ties than the list holds: every round sweeps the row).
TIED_GROUPS = {"listed at once": (2000, 4), "listed after a digit": (5000, 4),
               "larger than the list": (5000, 2)}


@pytest.mark.parametrize("group", sorted(TIED_GROUPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_boundary_inside_a_group_of_ties(group, dtype):
    # Integer logits: the top level is one group of about C / levels classes with equal p; delta
    # puts the boundary half a class inside it, so the head takes the first r of them by
    # ascending index (SPEC 1.3) and the rest go to the tail.
    classes, levels = TIED_GROUPS[group]
    generator = torch.Generator().manual_seed(classes + levels)
    teacher = torch.randint(0, levels, (1, classes), generator=generator).to(dtype)
    p = torch.softmax(teacher.double(), dim=-1)[0]
    top = p.max()
    tied = int((p == top).sum())
    delta = float(top * (tied // 2 + 0.5))
    student = (torch.randn(1, classes, generator=generator) * 3).to(dtype)
    first = check_fused_against_oracle(CUDA, student.cuda(), teacher.cuda(), temperature=1.0,
                                       delta=delta, time_reduction="prob_mean", what="ties")
    # The list is filled by atomics in any order; the results do not depend on it.
    again = fused(CUDA, student.cuda(), teacher.cuda(), temperature=1.0, delta=delta)
    for a, b in zip(first, again):
        assert torch.equal(a, b.cpu())


# A sweep of the head selection combines the masses of the lanes that share a digit and one of
# them updates the histogram, element after element. Rows whose lanes all share a digit (equal
# logits), whose lanes alternate between two digits, and whose levels repeat every 3 classes, both
# short (one or two warps) and long (16 warps on the same buckets, swept twice); run twice, same
# bits.
HISTOGRAM_ROWS = {"equal logits": lambda index: 0.0 * index,
                  "two alternating levels": lambda index: 3.0 * (index % 2),
                  "three repeating levels": lambda index: 0.5 * (index % 3)}


@pytest.mark.parametrize("classes", [1000, 50257])
@pytest.mark.parametrize("pattern", sorted(HISTOGRAM_ROWS))
def test_warp_histograms_of_rows_sharing_digits(pattern, classes):
    index = torch.arange(classes, dtype=torch.float64)
    teacher = HISTOGRAM_ROWS[pattern](index).float().expand(2, classes).contiguous()
    generator = torch.Generator().manual_seed(classes)
    student = torch.randn(2, classes, generator=generator) * 3
    # The boundary falls inside the top level's ties, at least 0.1 class from a whole class in
    # every row here (e.g. 370.5 classes of 1000 equal ones): no rounding decides the head.
    first = check_fused_against_oracle(CUDA, student.cuda(), teacher.cuda(), temperature=1.0,
                                       delta=0.3705, time_reduction="prob_mean", what=pattern)
    again = fused(CUDA, student.cuda(), teacher.cuda(), temperature=1.0, delta=0.3705)
    for a, b in zip(first, again):
        assert torch.equal(a, b.cpu())


# A prob_mean student's first steps (kStepGroupOf: 4 for float32, 1 for float64) gather their sums
# of SPEC 2's G_t in the row-sums pass, and only when its gradient is asked for; each further
# group takes a pass.
@pytest.mark.parametrize("steps", [2, 4, 5, 9], ids=lambda t: f"T={t}")
@pytest.mark.parametrize("wanted", ["student", "teacher", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_prob_mean_step_groups_and_requested_gradients(dtype, steps, wanted):
    student, teacher = draw_case(2, 3000, steps, dtype, seed=steps)
    expected_loss, expected_student, expected_teacher = oracle(
        student.cpu(), teacher.cpu(), temperature=2.0, delta=0.5, reduction="none")
    loss, d_student, d_teacher = torch.ops.htakl.hta_kl_fused(
        student, teacher, 2.0, 0.5, False, False, wanted != "teacher", wanted != "student")
    assert_close_for_row_size(loss, expected_loss, dtype, 3000, "loss")
    if wanted != "teacher":
        assert_close_for_row_size(d_student, expected_student, dtype, 3000, "d student")
    else:
        assert d_student.numel() == 0
    if wanted != "student":
        assert_close_for_row_size(d_teacher, expected_teacher, dtype, 3000, "d teacher")
    else:
        assert d_teacher.numel() == 0


# The binding's own errors (c10::Error thrown from the CUDA binding) are checked in a child
# process: on the first H100 run (2026-11-26, torch 2.11, the image's /opt/gcc toolchain) both of
# these crashed the interpreter with a segmentation fault instead of raising, which would abort
# every test after them. In a child, a crash is this test's failure and nothing else's.
BINDING_ERROR_CASES = {
    "too_many_time_steps": (
        "student = torch.randn(100000, 1, 2, dtype=torch.float64, device='cuda')\n"
        "teacher = torch.randn(1, 2, dtype=torch.float64, device='cuda')\n"
        "torch.ops.htakl.hta_kl_fused(student, teacher, 2.0, 0.5, False, False, True, False)",
        "time dimension T = 100000 exceeds",
    ),
    "mismatched_dtypes": (
        "student = torch.randn(1, 2, 5, device='cuda')\n"
        "teacher = torch.randn(2, 5, device='cuda').double()\n"
        "torch.ops.htakl.hta_kl_fused(student, teacher, 2.0, 0.5, False, False, False, False)",
        "same dtype",
    ),
    "mismatched_shapes": (
        "student = torch.randn(1, 2, 5, device='cuda')\n"
        "teacher = torch.randn(3, 5, device='cuda')\n"
        "torch.ops.htakl.hta_kl_fused(student, teacher, 2.0, 0.5, False, False, False, False)",
        "student must be",
    ),
    "bad_row_scale": (
        "student = torch.randn(1, 2, 5, device='cuda')\n"
        "teacher = torch.randn(2, 5, device='cuda')\n"
        "torch.ops.htakl.hta_kl_fused(student, teacher, 2.0, 0.5, False, False, True, True, 0.0)",
        "row_scale",
    ),
}


@pytest.mark.parametrize("case", sorted(BINDING_ERROR_CASES))
def test_binding_raises_a_clear_error(case):
    code, message = BINDING_ERROR_CASES[case]
    program = (
        "import torch, htakl_kernels\n"
        "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) +
        "except RuntimeError as error:\n"
        "    print('RAISED:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"child died with {result.returncode}: {result.stderr[-2000:]}"
    assert "RAISED:" in result.stdout and message in result.stdout, result.stdout[-2000:]


def _free_gpu_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


# rows x C = 16385 x 131072 = 2^31 + 2^17 elements in float16: offsets past 2^31 must be 64-bit.
# Inputs and gradients take 17.2 GB.
HUGE_ROWS, HUGE_CLASSES = 16385, 131072


@pytest.mark.skipif(
    not torch.cuda.is_available() or _free_gpu_bytes() < 24 * 2**30,
    reason="needs a GPU with 24 GiB free for a > 2^31-element case",
)
def test_more_than_two_to_the_31_elements():
    dtype = torch.float16
    generator = torch.Generator(device="cuda").manual_seed(43)
    # Drawn in float16 and scaled in place: no float32 temporaries of 8.6 GB.
    teacher = torch.randn(HUGE_ROWS, HUGE_CLASSES, generator=generator, device="cuda",
                          dtype=dtype).mul_(2)
    student = torch.randn(HUGE_ROWS, HUGE_CLASSES, generator=generator, device="cuda",
                          dtype=dtype).mul_(4)
    assert teacher.numel() > 2**31
    # Checked rows: the first and the last two, whose elements all lie past 2^31.
    rows = torch.tensor([0, HUGE_ROWS - 2, HUGE_ROWS - 1], device="cuda")
    teacher[rows] = add_peaks(teacher[rows], torch.Generator().manual_seed(44))
    loss, d_student, d_teacher = fused(CUDA, student, teacher, temperature=1.0, delta=PEAKED_DELTA)
    expected_loss, expected_student, expected_teacher = oracle(
        student[rows], teacher[rows], temperature=1.0, delta=PEAKED_DELTA, reduction="none")
    assert_close_for_row_size(loss[rows], expected_loss, dtype, HUGE_CLASSES, "loss")
    assert_close_for_row_size(d_student[rows], expected_student, dtype, HUGE_CLASSES, "d student")
    assert_close_for_row_size(d_teacher[rows], expected_teacher, dtype, HUGE_CLASSES, "d teacher")
