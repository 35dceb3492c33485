"""CUDA LIF kernels against the reference (runs only where CUDA is available; the .cu file is
compile-checked without a GPU by the nvcc check)."""

from __future__ import annotations

import pytest
import torch

from htakl_kernels import lif_multistep
from htakl_kernels._backends import resolve_backend

from lif_cases import (
    SURROGATES,
    assert_matches_reference,
    check_full_matrix,
    make_inputs,
    run_with_grads,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def test_auto_picks_the_cuda_kernel():
    assert resolve_backend("auto", torch.device("cuda")) == "cuda"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("decay_input", [False, True])
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_cuda_kernel_full_matrix(dtype, detach_reset, decay_input, surrogate):
    check_full_matrix("cuda", dtype, detach_reset, decay_input, surrogate, device="cuda")


@pytest.mark.parametrize("return_v", [None, "last", "seq"])
def test_cuda_kernel_large_awkward_non_contiguous(return_v):
    x, v_init = make_inputs(5, (70001,), v_threshold=0.5, v_reset=-0.2, decay_input=False,
                            dtype=torch.float32, device="cuda", seed=4)
    x = x.t().contiguous().t()
    assert not x.is_contiguous()
    assert_matches_reference("cuda", x, v_init, return_v=return_v, v_threshold=0.5, v_reset=-0.2,
                             decay_input=False)


def test_cuda_kernel_edge_shapes():
    for shape in [(5,), (0, 3), (4, 0)]:
        x = torch.randn(shape, dtype=torch.float64, device="cuda")
        v_init = torch.randn(shape[1:], dtype=torch.float64, device="cuda")
        assert_matches_reference("cuda", x, v_init, return_v="last")


def test_cuda_kernel_deterministic():
    x, v_init = make_inputs(9, (3000,), v_threshold=1.0, v_reset=None, decay_input=True,
                            dtype=torch.bfloat16, device="cuda")

    def fn(x_, v_):
        return lif_multistep(x_, v_init=v_, v_reset=None, return_v="seq", backend="cuda")

    first, second = run_with_grads(fn, x, v_init, "seq"), run_with_grads(fn, x, v_init, "seq")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("v_reset", [None, 0.0])
def test_cuda_kernel_gradcheck_without_spikes(v_reset):
    x = (torch.randn(6, 7, dtype=torch.float64, device="cuda") * 0.5).requires_grad_()
    v_init = (torch.randn(7, dtype=torch.float64, device="cuda") * 0.5).requires_grad_()

    def dynamics(x_, v_):
        return lif_multistep(x_, v_init=v_, v_threshold=50.0, v_reset=v_reset, tau=2.5,
                             return_v="seq", backend="cuda")

    assert not dynamics(x, v_init)[0].any()
    assert torch.autograd.gradcheck(dynamics, (x, v_init))


def test_opcheck_cuda_ops():
    x, v_init = make_inputs(5, (3, 4), v_threshold=1.0, v_reset=0.0, decay_input=True, device="cuda")
    torch.library.opcheck(
        torch.ops.htakl.lif_forward.default,
        (x.requires_grad_(), v_init.requires_grad_(), 2.0, 1.0, 0.0, False, True, False, "sigmoid",
         4.0, True),
    )
    torch.library.opcheck(
        torch.ops.htakl.lif_backward.default,
        (torch.randn_like(x), torch.randn_like(v_init), x.new_empty(0), x.detach(), v_init.detach(),
         2.0, 1.0, 0.0, True, True, False, "atan", 2.0),
    )


def test_cuda_torch_compile_fullgraph():
    x, v_init = make_inputs(4, (33,), v_threshold=1.0, v_reset=None, decay_input=True,
                            dtype=torch.float32, device="cuda")

    def fn(x_, v_):
        return lif_multistep(x_, v_init=v_, v_reset=None, return_v="seq", backend="cuda")

    compiled = torch.compile(fn, fullgraph=True)
    got = run_with_grads(compiled, x, v_init, "seq")
    want = run_with_grads(fn, x, v_init, "seq")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
