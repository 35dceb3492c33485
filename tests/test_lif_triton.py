"""Triton LIF kernels against the reference: compiled on CUDA tensors when a GPU is present, else
through Triton's interpreter on CPU tensors (a smaller matrix: the interpreter is slow)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of the Triton kernels (their @triton.jit decorators).
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from htakl_kernels import lif_multistep, reference  # noqa: E402
from htakl_kernels._backends import unavailable_reason  # noqa: E402

from triton_compile import parse_usage, run_compiler_script  # noqa: E402
from lif_cases import (  # noqa: E402
    SURROGATES,
    assert_matches_reference,
    check_full_matrix,
    make_inputs,
    run_with_grads,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
# The interpreter rounds float32 -> bfloat16 differently from the GPU; 16-bit runs on GPU only.
DTYPES = [torch.float64, torch.float32] + ([] if INTERPRETED else [torch.float16, torch.bfloat16])
STEPS = (1, 8) if INTERPRETED else (1, 2, 8, 33)

pytestmark = pytest.mark.skipif(
    unavailable_reason("triton", DEVICE) is not None, reason=str(unavailable_reason("triton", DEVICE))
)


@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("decay_input", [False, True])
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_triton_matrix(detach_reset, decay_input, surrogate):
    for dtype in DTYPES:
        check_full_matrix("triton", dtype, detach_reset, decay_input, surrogate, device=DEVICE,
                          steps=STEPS)


@pytest.mark.parametrize("steps", [2, 33])
@pytest.mark.parametrize("v_reset", [None, -0.2])
def test_triton_longer_sequences(steps, v_reset):
    for dtype in (torch.float64, torch.float32):
        x, v_init = make_inputs(steps, (2, 7), v_threshold=0.5, v_reset=v_reset, decay_input=True,
                                dtype=dtype, device=DEVICE)
        assert_matches_reference("triton", x, v_init, v_threshold=0.5, v_reset=v_reset,
                                 detach_reset=steps == 2, surrogate="atan")


def test_triton_awkward_sizes_and_return_modes():
    # Several programs with a ragged last block; tau and alpha not exactly representable.
    x, v_init = make_inputs(5, (1031,), v_threshold=1.0, v_reset=0.0, decay_input=False,
                            tau=1.7, dtype=torch.float32, device=DEVICE)
    for return_v in (None, "last", "seq"):
        assert_matches_reference("triton", x, v_init, return_v=return_v, tau=1.7, alpha=3.3,
                                 decay_input=False)
    for shape in [(4,), (0, 3), (3, 0)]:
        x = torch.randn(shape, dtype=torch.float64, device=DEVICE)
        assert_matches_reference("triton", x, torch.randn(shape[1:], dtype=torch.float64, device=DEVICE),
                                 return_v="last")


def test_triton_gradcheck_without_spikes():
    x = (torch.randn(3, 3, dtype=torch.float64, device=DEVICE) * 0.5).requires_grad_()
    v_init = (torch.randn(3, dtype=torch.float64, device=DEVICE) * 0.5).requires_grad_()

    def dynamics(x_, v_):
        return lif_multistep(x_, v_init=v_, v_threshold=50.0, tau=2.5, return_v="seq", backend="triton")

    assert not dynamics(x, v_init)[0].any()
    assert torch.autograd.gradcheck(dynamics, (x, v_init))


def test_triton_deterministic():
    x, v_init = make_inputs(6, (700,), v_threshold=1.0, v_reset=None, decay_input=True,
                            dtype=torch.float32, device=DEVICE)

    def fn(x_, v_):
        return lif_multistep(x_, v_init=v_, v_reset=None, return_v="seq", backend="triton")

    first, second = run_with_grads(fn, x, v_init, "seq"), run_with_grads(fn, x, v_init, "seq")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# AOTAutograd runs a Triton op's Python body on fake tensors, which the interpreter (it needs real
# memory) cannot take: on CPU, opcheck leaves out its aot_dispatch checks and torch.compile uses
# Dynamo's "eager" backend (the whole graph is still captured, fullgraph=True); on GPU both are full.
OPCHECK_TESTS = (
    ("test_schema", "test_autograd_registration", "test_faketensor")
    if INTERPRETED
    else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
)


def test_opcheck_triton_ops():
    from htakl_kernels.triton_kernels.lif import lif_backward_triton, lif_forward_triton

    x, v_init = make_inputs(3, (2, 5), v_threshold=1.0, v_reset=0.0, decay_input=True, device=DEVICE)
    torch.library.opcheck(
        lif_forward_triton,
        (x.requires_grad_(), v_init.requires_grad_(), 2.0, 1.0, 0.0, False, True, False, "atan", 2.0, True),
        test_utils=OPCHECK_TESTS,
    )
    torch.library.opcheck(
        lif_backward_triton,
        (torch.randn_like(x), x.new_empty(0), torch.randn_like(x), x.detach(), v_init.detach(),
         2.0, 1.0, 0.0, True, False, True, "sigmoid", 4.0),
        test_utils=OPCHECK_TESTS,
    )


def test_triton_torch_compile_fullgraph():
    x, v_init = make_inputs(3, (6,), v_threshold=1.0, v_reset=0.0, decay_input=True, device=DEVICE)

    def fn(x_, v_):
        return lif_multistep(x_, v_init=v_, return_v="last", backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="eager" if INTERPRETED else "inductor")
    got = run_with_grads(compiled, x, v_init, "last")
    want = run_with_grads(lambda x_, v_: reference.lif_multistep(x_, v_init=v_, return_v="last"),
                          x, v_init, "last")
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_compiles_for_sm90_without_a_gpu():
    """The interpreter skips the compiler's frontend (a float64 division once compiled only under
    the interpreter): compile the forward and backward kernels for an H100 (sm_90) in every storage
    dtype, soft and hard reset, both surrogates, and check ptxas reports no spills."""
    script = (
        "from htakl_kernels.triton_kernels.aot import resource_usage\n"
        "from htakl_kernels.triton_kernels.lif_aot import compile_variants\n"
        "for storage in ('bfloat16', 'float16', 'float32', 'float64'):\n"
        "    for soft_reset, surrogate in ((False, 'sigmoid'), (True, 'atan')):\n"
        "        for kernel in compile_variants(storage, soft_reset=soft_reset, surrogate=surrogate):\n"
        "            print(*resource_usage(kernel))\n"
    )
    usage = parse_usage(run_compiler_script(script))
    assert len(usage) == 16
    assert all(0 < registers <= 255 and spill == 0 for registers, spill in usage), usage


def test_float32_divisions_round_to_nearest_when_compiled():
    """Spikes agree bit for bit only if H[t]'s division by tau is the IEEE one, as on the other
    backends. The interpreter divides exactly whatever the kernel asks for, so read the compiled
    PTX: no approximate float32 division may be left (Triton 3.6 ignored fdiv's ieee_rounding)."""
    script = (
        "import re\n"
        "from htakl_kernels.triton_kernels.lif_aot import compile_variants\n"
        "for soft_reset, surrogate in ((False, 'sigmoid'), (True, 'atan')):\n"
        "    for kernel in compile_variants('float32', soft_reset=soft_reset, surrogate=surrogate):\n"
        "        ptx = kernel.asm['ptx']\n"
        "        print(len(re.findall(r'div\\.rn\\.f32', ptx)),\n"
        "              len(re.findall(r'div\\.(?:full|approx)[.a-z]*\\.f32', ptx)))\n"
    )
    counts = parse_usage(run_compiler_script(script))
    assert len(counts) == 4
    assert all(exact > 0 and approximate == 0 for exact, approximate in counts), counts
