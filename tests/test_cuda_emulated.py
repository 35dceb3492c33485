"""The CUDA HTA-KL kernel's own source, run on the CPU through tests/cuda/host's emulation of
CUDA (tests/cuda_emulated.py). The contract grid (tests/test_hta_kl_contract.py, target
"cuda_emulated") checks its results against the oracle; this file checks the emulation itself,
and what only the emulated launcher can be asked here: rows that are not 16-byte aligned, and the
launcher's refusals."""

from __future__ import annotations

import subprocess

import pytest
import torch

import cuda_emulated
from hta_kl_oracle import assert_close_for_row_size, draw_student, draw_teacher, oracle

pytestmark = [
    pytest.mark.cuda_emulated,
    pytest.mark.skipif(cuda_emulated.unavailable_reason() is not None,
                       reason=str(cuda_emulated.unavailable_reason())),
]


def test_emulation_matches_cuda_semantics():
    """Shuffles (full and partial masks, 64-bit values), ballot, match_any, __syncthreads, shared
    and dynamic shared memory and atomics, each against what the CUDA programming guide
    specifies (tests/cuda/host/emulation_check.cpp)."""
    result = subprocess.run([cuda_emulated.build_emulation_check()], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "all emulation checks passed" in result.stdout


@pytest.mark.parametrize("kernel, message", [
    ("exited_lane", "which has exited"),
    ("divergent_barrier", "deadlocks"),
    ("foreign_mask", "does not include its own lane"),
])
def test_emulation_stops_kernels_that_would_hang(kernel, message):
    """A warp intrinsic waiting for an exited lane or for threads held at a barrier hangs a GPU;
    the emulation stops with an error naming the thread instead."""
    result = subprocess.run([cuda_emulated.build_emulation_check(), kernel], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("steps, time_reduction", [(None, "prob_mean"), (3, "prob_mean"),
                                                   (3, "logit_mean")])
@pytest.mark.parametrize("classes", [40, 1000])
def test_rows_not_16_byte_aligned(dtype, steps, time_reduction, classes):
    """Inputs and gradients one element past a 16-byte boundary: every row takes the kernel's
    element-by-element edge path (a 16-byte access there would be misaligned, which the
    sanitizer reports)."""
    generator = torch.Generator().manual_seed(classes + (steps or 0))
    teacher = draw_teacher(3, classes, temperature=2.0, delta=0.5, dtype=dtype,
                           generator=generator)
    student = draw_student(teacher, steps, generator)
    student3 = student if steps else student.unsqueeze(0)
    loss, d_student, d_teacher = cuda_emulated.hta_kl_fused(
        student3, teacher, 2.0, 0.5, time_reduction == "logit_mean", False, True, True, offset=1)
    expected_loss, expected_student, expected_teacher = oracle(
        student, teacher, temperature=2.0, delta=0.5, time_reduction=time_reduction,
        reduction="none")
    assert_close_for_row_size(loss, expected_loss, dtype, classes, "loss")
    assert_close_for_row_size(d_student.view(student.shape), expected_student, dtype, classes,
                              "d student")
    assert_close_for_row_size(d_teacher, expected_teacher, dtype, classes, "d teacher")


@pytest.mark.parametrize("steps, temperature, delta, row_scale", [
    (1, 0.0, 0.5, 1.0),        # temperature <= 0
    (1, 2.0, 0.0, 1.0),        # delta outside (0, 1]
    (1, 2.0, 1.5, 1.0),
    (1, 2.0, 0.5, 0.0),        # row_scale <= 0
    (100000, 2.0, 0.5, 1.0),   # more steps than shared memory holds per-step values for
])
def test_launcher_refuses_what_the_kernel_cannot_run(steps, temperature, delta, row_scale):
    """The launcher returns cudaErrorInvalidValue (1) before any launch."""
    student = torch.zeros(steps, 1, 1)
    teacher = torch.zeros(1, 1)
    with pytest.raises(RuntimeError, match="status 1:"):
        cuda_emulated.hta_kl_fused(student, teacher, temperature, delta, False, False, True, True,
                                   row_scale)
