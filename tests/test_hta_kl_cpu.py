"""What only the C++ CPU HTA-KL kernel has: its instruction-set copies, its thread split and its
per-thread scratch. The contract it shares with the other backends is tests/test_hta_kl_contract.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from htakl_kernels._backends import unavailable_reason

from hta_kl_oracle import assert_close_to_oracle, draw_student, draw_teacher

pytestmark = pytest.mark.skipif(unavailable_reason("cpu", "cpu") is not None,
                                reason=str(unavailable_reason("cpu", "cpu")))

OP = torch.ops.htakl.hta_kl_fused.default
MODES = {"2d": None, "prob_mean_T4": 4, "logit_mean_T4": 4}


def test_deterministic_across_thread_counts_and_alignment():
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


def test_each_row_selects_its_head_as_it_would_alone():
    """Within one thread a float row's head selection starts from the previous row's boundary
    (only the classes near or above it are added up) and redoes the round over every class when
    the boundary lies lower. Rows whose boundaries lie far apart, in either order, and a row of
    ties, give the bits each gives alone."""
    generator = torch.Generator().manual_seed(21)
    classes = 2000
    # peaked, nearly flat, peaked, moderate, flat (every class tied), very peaked, mild
    scales = (8.0, 0.05, 8.0, 1.0, 0.0, 20.0, 0.5)
    teacher = torch.stack([scale * torch.randn(classes, generator=generator) for scale in scales])
    student = 3.0 * torch.randn(1, len(scales), classes, generator=generator)
    args = (2.0, 0.5, False, False, True, True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        together = OP(student, teacher, *args)
        alone = [OP(student[:, row:row + 1], teacher[row:row + 1], *args)
                 for row in range(len(scales))]
    finally:
        torch.set_num_threads(threads)
    for row, (loss, d_student, d_teacher) in enumerate(alone):
        assert torch.equal(together[0][row], loss[0]), row
        assert torch.equal(together[1][:, row], d_student[:, 0]), row
        assert torch.equal(together[2][row], d_teacher[0]), row


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16),
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("isa", ("widest", "avx2"))
def test_instruction_sets_agree(isa, mode, dtype, monkeypatch):
    """The kernel is compiled for the baseline ISA, for AVX2 + FMA and for AVX-512 (the widest
    the CPU has runs; HTAKL_CPU_ISA=avx2 caps it at AVX2); the copies differ only by FMA
    contraction, so each agrees with the baseline copy to rounding. (Where the CPU lacks a copy's
    instructions the next narrower copy runs.)"""
    generator = torch.Generator().manual_seed(12)
    steps = MODES[mode]
    teacher = draw_teacher(9, 1037, temperature=2.0, delta=0.5, dtype=dtype, generator=generator)
    student = draw_student(teacher, steps, generator)
    student = student if steps is not None else student.unsqueeze(0)
    args = (2.0, 0.5, mode.startswith("logit_mean"), False, True, True)
    if isa != "widest":
        monkeypatch.setenv("HTAKL_CPU_ISA", isa)
    wide = OP(student, teacher, *args)
    monkeypatch.setenv("HTAKL_CPU_ISA", "baseline")
    baseline = OP(student, teacher, *args)
    for what, a, b in zip(("loss", "d student", "d teacher"), wide, baseline):
        assert_close_to_oracle(a, b, dtype, what)


@pytest.mark.slow
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
    loss_rows, _, _ = OP(student, teacher, 2.0, 0.5, False, False, False, False)
    assert torch.isfinite(loss_rows).all()
    assert resident_mb() - before < 50
