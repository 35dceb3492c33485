"""The LIF backward's segments (csrc/lif_math.h, lif_backward_segments): H held a few steps at a
time, V checkpointed at each segment's start and H recomputed, as the CUDA kernel holds it in
registers. The CPU kernel runs the same schedule; `htakl::_lif_backward_segments` picks its segment
length, so these tests run checkpoints and recomputation at small T.

A recomputed H comes from the same V by the same functions as the forward's, so the gradients must
equal, bit for bit, those of one segment holding every H (the CPU op's path for T <= 64), in every
dtype; and they must match the float64 reference's autograd.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import htakl_kernels  # noqa: F401  (loads the ops)
from htakl_kernels import reference
from htakl_kernels._library import extension_built_with_cuda

from lif_cases import GRAD_TOLERANCE, make_inputs

SEGMENT = 5
# 1 and 2 steps, one short of a segment, exactly one, one more (a checkpoint-free recompute), three
# and a bit (two checkpoints), many segments.
STEPS = (1, 2, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT + 2, 64)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# (v_reset, detach_reset, decay_input, surrogate): v_reset None is the soft reset.
OPTIONS = list(itertools.product((None, -0.2), (False, True), (False, True), ("sigmoid", "atan")))
CPU_SEGMENT = 64  # lif_cpu.cpp's kCpuSegment: the op's own segment


def op_options(v_reset, detach_reset, decay_input, surrogate, *, tau=1.7, v_threshold=0.5,
               alpha=3.0):
    """The scalar arguments of lif_backward after the tensors, in schema order."""
    soft = v_reset is None
    return (tau, v_threshold, 0.0 if soft else v_reset, soft, decay_input, detach_reset, surrogate,
            alpha)


def gradients(steps, dtype, v_reset, decay_input, *, seed=0, neurons=(3, 7)):
    """x, v_init and the three output gradients (random, of x's dtype)."""
    x, v_init = make_inputs(steps, neurons, v_threshold=0.5, v_reset=v_reset,
                            decay_input=decay_input, tau=1.7, dtype=dtype, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    grad_spikes, grad_v_seq = (
        torch.randn(x.shape, generator=generator, dtype=torch.float64).to(dtype) for _ in range(2))
    grad_v_last = torch.randn(v_init.shape, generator=generator, dtype=torch.float64).to(dtype)
    return x, v_init, grad_spikes, grad_v_last, grad_v_seq


def backward(grads, options, segment=None):
    x, v_init, grad_spikes, grad_v_last, grad_v_seq = grads
    if segment is None:
        return torch.ops.htakl.lif_backward(grad_spikes, grad_v_last, grad_v_seq, x, v_init,
                                            *options)
    return torch.ops.htakl._lif_backward_segments(grad_spikes, grad_v_last, grad_v_seq, x, v_init,
                                                  *options, segment)


def assert_identical(got, want, context):
    for name, g, w in zip(("grad_x", "grad_v_init"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name} {context}"
        # equal bits: NaNs in the same places, signed zeros alike
        assert torch.equal(g.view(-1).view(torch.uint8), w.view(-1).view(torch.uint8)), \
            f"{name} differs bitwise: {context}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps", STEPS)
def test_segments_give_the_single_segment_gradients_bit_for_bit(dtype, steps):
    for index, (v_reset, detach_reset, decay_input, surrogate) in enumerate(OPTIONS):
        grads = gradients(steps, dtype, v_reset, decay_input, seed=index)
        options = op_options(v_reset, detach_reset, decay_input, surrogate)
        want = backward(grads, options)  # T <= 64: one segment, every H held
        for segment in (1, SEGMENT):
            got = backward(grads, options, segment)
            assert_identical(got, want, f"segment={segment} T={steps} dtype={dtype} "
                                        f"options={options}")


@pytest.mark.parametrize("steps", [CPU_SEGMENT + 1, 3 * CPU_SEGMENT + 2])
def test_long_sequences_checkpoint_in_the_op_itself(steps):
    """Past kCpuSegment steps lif_backward recomputes too: same bits as one segment of all T."""
    for index, (v_reset, detach_reset, decay_input, surrogate) in enumerate(OPTIONS[::3]):
        grads = gradients(steps, torch.float32, v_reset, decay_input, seed=index, neurons=(5,))
        options = op_options(v_reset, detach_reset, decay_input, surrogate)
        assert_identical(backward(grads, options), backward(grads, options, steps),
                         f"T={steps} options={options}")


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_segments_match_the_reference(steps, dtype):
    """Against autograd through the reference (htakl_kernels/reference/lif.py), every option set,
    with some gradients absent (an empty tensor: zero)."""
    for index, (v_reset, detach_reset, decay_input, surrogate) in enumerate(OPTIONS):
        x, v_init, grad_spikes, grad_v_last, grad_v_seq = gradients(
            steps, dtype, v_reset, decay_input, seed=index)
        if index % 3 == 1:
            grad_v_seq = grad_v_seq.new_empty(0)
        if index % 3 == 2:
            grad_v_last = grad_v_last.new_empty(0)
        options = op_options(v_reset, detach_reset, decay_input, surrogate)
        got = backward((x, v_init, grad_spikes, grad_v_last, grad_v_seq), options, SEGMENT)
        x_, v_ = x.clone().requires_grad_(), v_init.clone().requires_grad_()
        spikes, v_seq = reference.lif_multistep(
            x_, v_init=v_, tau=1.7, v_threshold=0.5, v_reset=v_reset, decay_input=decay_input,
            detach_reset=detach_reset, surrogate=surrogate, alpha=3.0, return_v="seq")
        outputs, seeds = [spikes], [grad_spikes]
        if grad_v_seq.numel():
            outputs.append(v_seq)
            seeds.append(grad_v_seq)
        if grad_v_last.numel():
            outputs.append(v_seq[-1])
            seeds.append(grad_v_last)
        want = torch.autograd.grad(outputs, (x_, v_), seeds)
        rtol, atol = GRAD_TOLERANCE[dtype]
        for name, g, w in zip(("grad_x", "grad_v_init"), got, want):
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{name} T={steps} options={options}\n{m}")


def test_no_steps_pass_the_last_gradient_through():
    grads = gradients(0, torch.float32, None, True)
    grad_x, grad_v_init = backward(grads, op_options(None, False, True, "sigmoid"), SEGMENT)
    assert grad_x.shape == (0, 3, 7)
    assert torch.equal(grad_v_init, grads[3])


def test_segment_must_be_positive():
    grads = gradients(4, torch.float32, None, True)
    with pytest.raises(RuntimeError, match="segment must be >= 1"):
        backward(grads, op_options(None, False, True, "sigmoid"), 0)


# The GPU kernels' own segments (Triton: lif.SEGMENTS = 4; CUDA: 8, then 16): one step short of
# each, on it, one past, and several segments.
GPU_STEPS = (3, 4, 5, 7, 8, 9, 15, 16, 17, 26, 31, 32, 33, 64, 98)


def assert_close_to_cpu(backward_op, device, dtype, steps_list):
    for index, steps in enumerate(steps_list):
        v_reset, detach_reset, decay_input, surrogate = OPTIONS[index % len(OPTIONS)]
        grads = gradients(steps, dtype, v_reset, decay_input, seed=index)
        options = op_options(v_reset, detach_reset, decay_input, surrogate)
        want = backward(grads, options)
        x, v_init, grad_spikes, grad_v_last, grad_v_seq = (g.to(device) for g in grads)
        got = backward_op(grad_spikes, grad_v_last, grad_v_seq, x, v_init, *options)
        rtol, atol = GRAD_TOLERANCE[dtype]
        for name, g, w in zip(("grad_x", "grad_v_init"), got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{name} T={steps} options={options}\n{m}")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_segments_match_the_cpu_kernel(dtype):
    """Not bit for bit: the CPU kernel's exp is its own. The Triton segments' boundaries."""
    triton_lif = pytest.importorskip("htakl_kernels.triton_kernels.lif")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = GPU_STEPS if dtype == torch.float32 else (7, 9, 26)
    assert_close_to_cpu(triton_lif.lif_backward_triton, device, dtype, steps)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_segments_match_the_cpu_kernel(dtype):
    if not torch.cuda.is_available() or not extension_built_with_cuda():
        pytest.skip("needs a CUDA device and the extension built with CUDA")
    assert_close_to_cpu(torch.ops.htakl.lif_backward, "cuda", dtype, GPU_STEPS)
