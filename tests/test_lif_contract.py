"""The multi-step LIF contract (SPEC 3), checked on every kernel against the reference.

Each test runs on every target of tests/backend_targets.py that applies: the C++ CPU kernel, the
Triton kernels (through the interpreter on CPU tensors: a smaller option matrix, and no 16-bit
storage, whose float32 -> bfloat16 rounding the interpreter does differently from a GPU), and the
CUDA and compiled Triton kernels where a GPU is present. Spikes must equal the reference's, the
membrane and the gradients to x and v_init be close to it (tests/lif_cases.py). What only one
backend has (the CPU instruction-set copies and block split, the CUDA auto choice, the Triton
compiler) is tested in that backend's file.
"""

from __future__ import annotations

import math

import pytest
import torch

from htakl_kernels import lif_multistep, reference
from htakl_kernels._backends import kernel_ops

from backend_targets import KERNELS, over
from lif_cases import (
    GRAD_TOLERANCE,
    STEPS,
    SURROGATES,
    assert_matches_reference,
    check_full_matrix,
    make_inputs,
    run_with_grads,
)

ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype)[6:]


def matrix_cases(target):
    if target.interpreted:
        dtypes, steps = (torch.float64, torch.float32), (1, 8)
    else:
        dtypes, steps = ALL_DTYPES, STEPS
    return [((dtype, steps, surrogate, decay_input, detach_reset),
             f"{dtype_id(dtype)}-{surrogate}-decay_input={decay_input}-detach_reset={detach_reset}",
             target.interpreted)
            for dtype in dtypes for surrogate in SURROGATES for decay_input in (False, True)
            for detach_reset in (False, True)]


@pytest.mark.parametrize("target, dtype, steps, surrogate, decay_input, detach_reset",
                         over(KERNELS, matrix_cases))
def test_full_matrix(target, dtype, steps, surrogate, decay_input, detach_reset):
    check_full_matrix(target.backend, dtype, detach_reset, decay_input, surrogate,
                      device=target.device, steps=steps)


def sixteen_bit_cases(target):
    # The interpreter rounds float32 -> bfloat16 differently from the GPU: 16-bit runs compiled.
    dtypes = () if target.interpreted else (torch.bfloat16, torch.float16)
    return [((dtype,), dtype_id(dtype), False) for dtype in dtypes]


@pytest.mark.parametrize("target, dtype", over(KERNELS, sixteen_bit_cases))
def test_16_bit_storage(target, dtype):
    for v_reset in (None, -0.2):
        x, v_init = make_inputs(8, (37,), v_threshold=1.0, v_reset=v_reset, decay_input=True,
                                dtype=dtype, device=target.device)
        assert_matches_reference(target.backend, x, v_init, v_reset=v_reset, surrogate="atan")


@pytest.mark.parametrize("steps", [2, 33])
@pytest.mark.parametrize("v_reset", [None, -0.2])
@pytest.mark.parametrize("target", over(KERNELS))
def test_longer_sequences(target, v_reset, steps):
    for dtype in (torch.float64, torch.float32):
        x, v_init = make_inputs(steps, (2, 7), v_threshold=0.5, v_reset=v_reset, decay_input=True,
                                dtype=dtype, device=target.device)
        assert_matches_reference(target.backend, x, v_init, v_threshold=0.5, v_reset=v_reset,
                                 detach_reset=steps == 2, surrogate="atan")


@pytest.mark.parametrize("return_v", [None, "last", "seq"])
@pytest.mark.parametrize("target", over(KERNELS))
def test_return_modes_and_defaults(target, return_v):
    x, v_init = make_inputs(6, (2, 3, 5), v_threshold=1.0, v_reset=0.0, decay_input=True,
                            dtype=torch.float64, device=target.device)
    assert_matches_reference(target.backend, x, v_init, return_v=return_v, tau=3.3, alpha=2.5)
    # v_init defaults to v_reset (0 for soft reset)
    for v_reset in (None, -0.2):
        got = lif_multistep(x, v_reset=v_reset, return_v="last", backend=target.backend)
        want = reference.lif_multistep(x, v_reset=v_reset, return_v="last")
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)


def large_cases(target):
    """(steps, neurons, options): several blocks or programs with a ragged last one."""
    if target.interpreted:
        # tau and alpha not exactly representable.
        return [((5, 1031, dict(tau=1.7, alpha=3.3, decay_input=False)), "5x1031", False)]
    if target.device == "cuda":
        # An odd count (element-wise access), and a multiple of 16 that is no multiple of a
        # block (the kernels' 16-byte accesses, a ragged last block) over several segments.
        return [((5, 70001, dict(v_threshold=0.5, v_reset=-0.2, decay_input=False)), "5x70001",
                 False),
                ((37, 12400, dict(v_threshold=0.5, v_reset=-0.2, decay_input=True)), "37x12400",
                 False)]
    # More neurons than one block of the CPU kernel (4096): a partial last block; with 3 steps,
    # also more than one parallel task (a task is max(4096, 2^15 / T) neurons), the second
    # starting off the block grid.
    options = dict(v_threshold=0.5, v_reset=-0.2, decay_input=False)
    return [((5, 4099, options), "5x4099", False), ((3, 3 * 4096 + 5, options), "3x12293", False)]


@pytest.mark.parametrize("target, steps, neurons, options", over(KERNELS, large_cases))
def test_large_awkward_non_contiguous(target, steps, neurons, options):
    make_options = {k: options[k] for k in ("tau",) if k in options}
    x, v_init = make_inputs(steps, (neurons,), v_threshold=options.get("v_threshold", 1.0),
                            v_reset=options.get("v_reset", 0.0),
                            decay_input=options["decay_input"], dtype=torch.float32,
                            device=target.device, seed=3, **make_options)
    x = x.t().contiguous().t()  # same values, non-contiguous strides
    assert not x.is_contiguous()
    for return_v in (None, "last", "seq"):
        assert_matches_reference(target.backend, x, v_init, return_v=return_v, **options)


@pytest.mark.parametrize("target", over(KERNELS))
def test_edge_shapes(target):
    # x of shape [T] (scalar neuron), T = 0, zero neurons.
    for shape in [(5,), (0, 3), (4, 0)]:
        x = torch.randn(shape, dtype=torch.float64, device=target.device)
        v_init = torch.randn(shape[1:], dtype=torch.float64, device=target.device)
        assert_matches_reference(target.backend, x, v_init, return_v="last")


def determinism_cases(target):
    if target.interpreted:
        return [((6, 700, torch.float32, None), "6x700-float32", False)]
    if target.device == "cuda":
        return [((9, 3000, torch.bfloat16, None), "9x3000-bfloat16", False)]
    return [((7, 300, torch.float32, 0.0), "7x300-float32", False)]


@pytest.mark.parametrize("target, steps, neurons, dtype, v_reset", over(KERNELS, determinism_cases))
def test_deterministic(target, steps, neurons, dtype, v_reset):
    x, v_init = make_inputs(steps, (neurons,), v_threshold=1.0, v_reset=v_reset, decay_input=True,
                            dtype=dtype, device=target.device)

    def fn(x_, v_):
        return lif_multistep(x_, v_init=v_, v_reset=v_reset, return_v="seq",
                             backend=target.backend)

    first, second = run_with_grads(fn, x, v_init, "seq"), run_with_grads(fn, x, v_init, "seq")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("target", over(KERNELS))
def test_propagates_nan_and_inf_like_reference(target, surrogate, detach_reset, dtype):
    """NaN and inf where the reference has them. 16-bit inputs are held against the reference
    run in float32 (the kernels' state type; the CUDA backward's fast surrogate math included)
    and rounded: the same spikes, gradients within the 16-bit type's rounding."""
    x = torch.tensor([[0.5, math.nan, math.inf, -math.inf, 1e30, 0.2],
                      [1.0, 1.0, 1.0, 1.0, 1.0, -1e30],
                      [0.3, 0.3, 0.3, 0.3, 0.3, 0.3]], dtype=dtype, device=target.device)
    v_init = torch.tensor([0.1, 0.0, -0.3, 0.2, 0.0, math.inf], dtype=dtype, device=target.device)
    wide = dtype.itemsize >= 4
    state = dtype if wide else torch.float32
    tolerance = 1e-5 if wide else 2e-2
    for v_reset in (None, 0.0):
        options = dict(v_reset=v_reset, return_v="seq", detach_reset=detach_reset,
                       surrogate=surrogate)
        got = run_with_grads(
            lambda x_, v_: lif_multistep(x_, v_init=v_, backend=target.backend, **options),
            x, v_init, "seq")
        want = run_with_grads(lambda x_, v_: reference.lif_multistep(x_, v_init=v_, **options),
                              x.to(state), v_init.to(state), "seq")
        assert torch.equal(got[0], want[0].to(dtype))
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b.to(dtype), equal_nan=True, rtol=tolerance,
                                       atol=tolerance)


def gradcheck_cases(target):
    if target.interpreted:  # the interpreter: one case, a smaller layer
        return [((0.0, True, (3, 3)), "v_reset=0.0-decay_input=True", False)]
    return [((v_reset, decay_input, (6, 7)), f"v_reset={v_reset}-decay_input={decay_input}", False)
            for v_reset in (None, 0.0) for decay_input in (False, True)]


@pytest.mark.parametrize("target, v_reset, decay_input, shape", over(KERNELS, gradcheck_cases))
def test_gradcheck_without_spikes(target, v_reset, decay_input, shape):
    # Far below the threshold no spike can occur: the dynamics are smooth and gradcheck applies.
    x = (torch.randn(shape, dtype=torch.float64, device=target.device) * 0.5).requires_grad_()
    v_init = (torch.randn(shape[1:], dtype=torch.float64, device=target.device) * 0.5).requires_grad_()

    def dynamics(x_, v_):
        return lif_multistep(x_, v_init=v_, v_threshold=50.0, v_reset=v_reset,
                             decay_input=decay_input, tau=2.5, return_v="seq",
                             backend=target.backend)

    assert not dynamics(x, v_init)[0].any()
    assert torch.autograd.gradcheck(dynamics, (x, v_init))


@pytest.mark.parametrize("target", over(KERNELS))
def test_gradient_on_v_last_only(target):
    x, v_init = make_inputs(8, (11,), v_threshold=1.0, v_reset=None, decay_input=True,
                            device=target.device)
    grads = []
    for fn in (lambda x_, v_: lif_multistep(x_, v_init=v_, v_reset=None, return_v="last",
                                            backend=target.backend),
               lambda x_, v_: reference.lif_multistep(x_, v_init=v_, v_reset=None, return_v="last")):
        x_, v_ = x.clone().requires_grad_(), v_init.clone().requires_grad_()
        fn(x_, v_)[1].sum().backward()  # the spikes are unused: their gradient never arrives
        grads.append((x_.grad, v_.grad))
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("target", over(KERNELS))
def test_double_backward_is_refused_by_the_kernel_not_the_reference(target):
    """The kernel's gradient is computed, not traced: create_graph=True fails clearly instead of
    giving a gradient whose own gradient is silently missing. The reference stays differentiable."""
    x = (torch.randn(4, 3, device=target.device) + 1.0).requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lif_multistep(x, backend=target.backend).sum(), x, create_graph=True)
    torch.autograd.grad(lif_multistep(x, backend=target.backend).sum(), x)  # a plain backward runs
    grad, = torch.autograd.grad((lif_multistep(x, backend="reference") * x).sum(), x,
                                create_graph=True)
    assert grad.requires_grad


# Forward (surrogate, alpha, return_v_seq) and backward (the three gradients: of the spikes, of
# the last membrane, of the membrane sequence; three flags; surrogate, alpha) argument sets. The
# interpreter (slow) checks one of each.
OPCHECK_FORWARD = (("sigmoid", 4.0, False), ("sigmoid", 4.0, True), ("atan", 2.0, True))
OPCHECK_BACKWARD = (
    ("v_last", (False, True, False), "atan", 2.0),
    ("v_last", (True, True, False), "atan", 2.0),
    ("v_seq", (True, False, True), "sigmoid", 4.0),
)


@pytest.mark.parametrize("target", over(KERNELS))
def test_opcheck(target):
    # AOTAutograd runs a Triton op's Python body on fake tensors, which the interpreter (it needs
    # real memory) cannot take: there, opcheck leaves out its aot_dispatch checks.
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    forward, backward = OPCHECK_FORWARD, OPCHECK_BACKWARD
    if target.interpreted:
        forward, backward = forward[-1:], backward[-1:]
    else:
        tests += ("test_aot_dispatch_dynamic",)
    ops = kernel_ops(target.backend)
    x, v_init = make_inputs(5, (3, 4), v_threshold=1.0, v_reset=0.0, decay_input=True,
                            device=target.device)
    for surrogate, alpha, return_v_seq in forward:
        torch.library.opcheck(
            ops.lif_forward,
            (x.detach().requires_grad_(), v_init.detach().requires_grad_(), 2.0, 1.0, 0.0, False,
             True, False, surrogate, alpha, return_v_seq),
            test_utils=tests)
    for membrane, flags, surrogate, alpha in backward:
        grad_v_last = torch.randn_like(v_init) if membrane == "v_last" else x.new_empty(0)
        grad_v_seq = torch.randn_like(x) if membrane == "v_seq" else x.new_empty(0)
        torch.library.opcheck(
            ops.lif_backward,
            (torch.randn_like(x), grad_v_last, grad_v_seq, x, v_init, 2.0, 1.0, 0.0, *flags,
             surrogate, alpha),
            test_utils=tests)


COMPILERS = {"cpu": "aot_eager", "cuda": "inductor"}


@pytest.mark.parametrize("target", over(KERNELS))
def test_torch_compile_fullgraph(target):
    """torch.compile(fullgraph=True) traces lif_multistep through the backend's ops: the compiled
    spikes, membrane and gradients are the eager kernel's and the reference's. On CPU tensors the
    Triton kernels are the interpreter, which AOTAutograd cannot trace: Dynamo's "eager" backend
    captures the whole graph and runs the ops eagerly."""
    torch._dynamo.reset()
    dtype = torch.float32 if target.backend == "cuda" else torch.float64
    x, v_init = make_inputs(4, (33,), v_threshold=1.0, v_reset=None, decay_input=True,
                            dtype=dtype, device=target.device)

    def fn(x_, v_):
        return lif_multistep(x_, v_init=v_, v_reset=None, return_v="seq", backend=target.backend)

    compiler = "eager" if target.interpreted else COMPILERS[target.device]
    got = run_with_grads(torch.compile(fn, fullgraph=True, backend=compiler), x, v_init, "seq")
    if target.backend != "triton":  # the compiled ops are the eager ones, bit for bit
        for g, w in zip(got, run_with_grads(fn, x, v_init, "seq")):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    want = run_with_grads(
        lambda x_, v_: reference.lif_multistep(x_, v_init=v_, v_reset=None, return_v="seq"),
        x, v_init, "seq")
    assert torch.equal(got[0], want[0])
    rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else GRAD_TOLERANCE[dtype]
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
