"""The CUDA kernels' own source, run on the CPU through tests/cuda/host's emulation of CUDA
(tests/cuda_emulated.py). The HTA-KL contract grid (tests/test_hta_kl_contract.py, target
"cuda_emulated") checks the HTA-KL kernel's results against the oracle; this file checks the
emulation itself, what only the emulated HTA-KL launcher can be asked here (rows that are not
16-byte aligned, the launcher's refusals), and the LIF kernels against the reference."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch

import cuda_emulated
from backend_targets import TARGETS
from hta_kl_oracle import (assert_close_for_row_size, check_fused_against_oracle, draw_student,
                           draw_teacher, oracle)
from htakl_kernels import reference
from lif_cases import GRAD_TOLERANCE, make_inputs, run_with_grads

EMULATED = TARGETS["cuda_emulated"]

pytestmark = [
    pytest.mark.cuda_emulated,
    pytest.mark.skipif(cuda_emulated.unavailable_reason() is not None,
                       reason=str(cuda_emulated.unavailable_reason())),
]


def test_emulation_matches_cuda_semantics():
    """Shuffles (full and partial masks, 64-bit values), ballot, match_any, reduce_add (groups
    with different masks at once), __syncthreads, shared
    and dynamic shared memory and atomics, each against what the CUDA programming guide
    specifies (tests/cuda/host/emulation_check.cpp)."""
    result = subprocess.run([cuda_emulated.build_emulation_check()], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "all emulation checks passed" in result.stdout


def test_emulated_16_bit_conversions_round_like_torch(tmp_path):
    """__float2half_rn and __float2bfloat16_rn (round to nearest even, overflow to inf, NaN kept)
    and their inverses, against torch's conversions: every float32 whose bits step through the
    range, ties and the edges of both formats included."""
    bits = torch.arange(0, 2**32, 65521, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.5,
                          3 * 2.0**-26, 6.1e-5, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8,
                          1.0 + 3 * 2.0**-8, 3.4e38, math.inf, -math.inf, math.nan])
    values = torch.cat([bits.view(torch.float32), edges])
    source, converted = tmp_path / "in", tmp_path / "out"
    values.numpy().tofile(source)
    result = subprocess.run([cuda_emulated.build_emulation_check(), "convert", str(source),
                             str(converted)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = torch.from_file(str(converted), size=values.numel() * 12, dtype=torch.uint8)
    records = records.view(values.numel(), 12)
    half_bits = records[:, 0:2].contiguous().view(torch.int16).flatten()
    bfloat_bits = records[:, 2:4].contiguous().view(torch.int16).flatten()
    back = records[:, 4:12].contiguous().view(torch.float32)
    for name, got_bits, got_back, dtype in (("half", half_bits, back[:, 0], torch.float16),
                                            ("bfloat16", bfloat_bits, back[:, 1], torch.bfloat16)):
        want = values.to(dtype)
        nan = torch.isnan(values)
        assert torch.isnan(want[nan].float()).all() and torch.isnan(got_back[nan]).all(), name
        assert torch.equal(got_bits[~nan], want.view(torch.int16)[~nan]), name
        assert torch.equal(got_back[~nan], want.float()[~nan]), name


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


# ---- LIF -----------------------------------------------------------------------------------------


class EmulatedLif(torch.autograd.Function):
    """lif_multistep's kernel path on the emulated CUDA ops: forward, and the backward op fed
    with the upstream gradients of the spikes, v_last and v_seq."""

    @staticmethod
    def forward(ctx, x, v_init, options):
        ctx.save_for_backward(x, v_init)
        ctx.options = options
        return cuda_emulated.lif_forward(x, v_init, *options, True)

    @staticmethod
    def backward(ctx, grad_spikes, grad_v_last, grad_v_seq):
        x, v_init = ctx.saved_tensors
        empty = x.new_empty(0)
        grad_x, grad_v_init = cuda_emulated.lif_backward(
            *(empty if g is None else g.contiguous() for g in (grad_spikes, grad_v_last, grad_v_seq)),
            x, v_init, *ctx.options)
        return grad_x, grad_v_init, None


def lif_option_sets():
    """(v_reset, v_threshold, decay_input, detach_reset, surrogate, alpha): every reset kind and
    surrogate, each flag both ways."""
    return [(None, 1.0, True, False, "sigmoid", 4.0), (0.0, 0.5, False, True, "atan", 2.0),
            (-0.2, 1.0, True, True, "sigmoid", 3.0), (0.0, 1.0, False, False, "atan", 2.5)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("steps", [1, 2, 15, 16, 17, 33, 64, 100])
@pytest.mark.parametrize("neurons, offset", [(64, 0), (39, 0), (64, 1)])
def test_lif_kernels_match_reference(dtype, steps, neurons, offset):
    """The CUDA LIF kernels (vector and scalar neurons, the one-neuron, short- and long-segment
    backwards with their checkpoints) against the reference: spikes identical, membranes and
    gradients within the LIF contract's tolerances. Steps around the backward's segment lengths;
    64 neurons take the 16-byte vector path, 39 or an offset base the scalar one."""
    for index, (v_reset, v_threshold, decay_input, detach_reset, surrogate, alpha) in enumerate(
            lif_option_sets()):
        x, v_init = make_inputs(steps, (neurons,), v_threshold=v_threshold, v_reset=v_reset,
                                decay_input=decay_input, dtype=dtype, seed=steps + index)
        options = (2.0, v_threshold, 0.0 if v_reset is None else v_reset, v_reset is None,
                   decay_input, detach_reset, surrogate, alpha)
        for return_v in ("seq", "last"):
            def kernel(x_, v_):
                spikes, v_last, v_seq = EmulatedLif.apply(x_, v_, options)
                return spikes, (v_seq if return_v == "seq" else v_last)

            def oracle(x_, v_):
                return reference.lif_multistep(
                    x_, v_init=v_, return_v=return_v, tau=2.0, v_threshold=v_threshold,
                    v_reset=v_reset, decay_input=decay_input, detach_reset=detach_reset,
                    surrogate=surrogate, alpha=alpha)

            got = run_with_grads(kernel, x, v_init, return_v)
            want = run_with_grads(oracle, x, v_init, return_v)
            rtol, atol = GRAD_TOLERANCE[dtype]
            context = f"options {index}, return_v={return_v}"
            assert torch.equal(got[0], want[0]), f"spikes differ: {context}"
            for name, g, w in zip(("membrane", "grad_x", "grad_v_init"), got[1:], want[1:]):
                torch.testing.assert_close(g, w, rtol=rtol, atol=atol,
                                           msg=lambda m: f"{name}, {context}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("surrogate, alpha", [("sigmoid", 4.0), ("atan", 2.0)])
@pytest.mark.parametrize("detach_reset", [False, True])
def test_lif_kernels_propagate_nan_and_inf_like_reference(dtype, surrogate, alpha, detach_reset):
    """The LIF contract's NaN and inf case (tests/test_lif_contract.py) on the emulated CUDA
    kernels: 16-bit inputs against the reference run in float32 and rounded."""
    x = torch.tensor([[0.5, math.nan, math.inf, -math.inf, 1e30, 0.2],
                      [1.0, 1.0, 1.0, 1.0, 1.0, -1e30],
                      [0.3, 0.3, 0.3, 0.3, 0.3, 0.3]], dtype=dtype)
    v_init = torch.tensor([0.1, 0.0, -0.3, 0.2, 0.0, math.inf], dtype=dtype)
    state = dtype if dtype.itemsize >= 4 else torch.float32
    tolerance = 1e-5 if dtype.itemsize >= 4 else 2e-2
    for v_reset in (None, 0.0):
        options = (2.0, 1.0, 0.0 if v_reset is None else v_reset, v_reset is None, True,
                   detach_reset, surrogate, alpha)
        got = run_with_grads(lambda x_, v_: EmulatedLif.apply(x_, v_, options)[::2], x, v_init,
                             "seq")
        want = run_with_grads(
            lambda x_, v_: reference.lif_multistep(x_, v_init=v_, return_v="seq", v_reset=v_reset,
                                                   detach_reset=detach_reset,
                                                   surrogate=surrogate, alpha=alpha),
            x.to(state), v_init.to(state), "seq")
        assert torch.equal(got[0], want[0].to(dtype))
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b.to(dtype), equal_nan=True, rtol=tolerance,
                                       atol=tolerance)


# ---- HTA-KL paths the op grid reaches rarely -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("classes", [2047, 2048, 2049, 4100])
def test_selection_around_the_candidate_list_capacity(dtype, classes):
    """Rows of about kCandidates (2048) classes: listed from the first round, or one class too
    many (a second sweep of the row before the list takes over)."""
    generator = torch.Generator().manual_seed(classes)
    teacher = draw_teacher(2, classes, temperature=2.0, delta=0.5, dtype=dtype,
                           generator=generator, scale=3.0)
    student = draw_student(teacher, None, generator)
    check_fused_against_oracle(EMULATED, student, teacher, temperature=2.0, delta=0.5,
                               time_reduction="prob_mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("classes", [300, 5000])
def test_boundary_tied_in_more_classes_than_the_list_holds(dtype, classes):
    """A uniform teacher row: every class ties at the boundary. With 5000 classes the ties
    outnumber the candidate list, and the r-th tie by class index is found by sweeping the row
    (tie_limit_of); the head is exactly the first k classes."""
    k = classes * 2 // 5
    teacher = torch.zeros(2, classes, dtype=dtype)
    student = torch.randn(2, classes, generator=torch.Generator().manual_seed(5)).to(dtype)
    check_fused_against_oracle(EMULATED, student, teacher, temperature=2.0,
                               delta=(k + 0.5) / classes, time_reduction="prob_mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("steps", [2, 4, 5, 8, 9, 17])
def test_prob_mean_steps_across_step_groups(dtype, steps):
    """prob_mean gradients gather per-step sums a group of steps per pass (4 in float, 1 in
    double): step counts at, below and past group boundaries."""
    generator = torch.Generator().manual_seed(steps)
    teacher = draw_teacher(3, 333, temperature=2.0, delta=0.5, dtype=dtype, generator=generator)
    student = draw_student(teacher, steps, generator)
    check_fused_against_oracle(EMULATED, student, teacher, temperature=2.0, delta=0.5,
                               time_reduction="prob_mean")
