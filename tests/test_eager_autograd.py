"""The eager path of the ops' autograd (htakl_kernels/_ops/autograd.py): the public functions call
each op through an autograd.Function of the formulas registered with torch.library, and must get
exactly what the op's registered autograd gives."""

from __future__ import annotations

import pytest
import torch

import htakl_kernels as hk
from htakl_kernels._ops.autograd import call

LIF_OPTIONS = (2.0, 1.0, 0.0, False, True, False, "sigmoid", 4.0)


def _lif_args(x, v_init, return_v_seq):
    return (x, v_init, *LIF_OPTIONS, return_v_seq)


@pytest.mark.parametrize("return_v_seq", [False, True])
def test_lif_forward_through_call_matches_the_registered_autograd(return_v_seq):
    op = torch.ops.htakl.lif_forward.default
    generator = torch.Generator().manual_seed(3)
    x = (1 + torch.randn(5, 7, generator=generator, dtype=torch.float64)).requires_grad_(True)
    v_init = torch.rand(7, generator=generator, dtype=torch.float64).requires_grad_(True)
    eager = call(op, *_lif_args(x, v_init, return_v_seq))
    registered = op(*_lif_args(x, v_init, return_v_seq))
    assert type(eager[0].grad_fn).__name__.startswith("Eager_")
    assert "Eager_" not in type(registered[0].grad_fn).__name__
    upstream = [torch.randn(o.shape, generator=generator, dtype=o.dtype) if o.numel() else None
                for o in registered]
    used = [i for i, g in enumerate(upstream) if g is not None]
    for a, b in zip(eager, registered):
        assert torch.equal(a, b)
    grads = [torch.autograd.grad([out[i] for i in used], (x, v_init), [upstream[i] for i in used])
             for out in (eager, registered)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_hta_kl_through_call_matches_the_registered_autograd():
    op = torch.ops.htakl.hta_kl_fused.default
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(3, 4, 9, generator=generator, dtype=torch.float64).requires_grad_(True)
    teacher = torch.randn(4, 9, generator=generator, dtype=torch.float64).requires_grad_(True)
    args = (student, teacher, 2.0, 0.5, False, False, True, True, 0.25)
    eager, registered = call(op, *args), op(*args)
    upstream = torch.randn(4, generator=generator, dtype=torch.float64)
    assert torch.equal(eager[0], registered[0])
    for a, b in zip(torch.autograd.grad(eager[0], (student, teacher), upstream),
                    torch.autograd.grad(registered[0], (student, teacher), upstream)):
        assert torch.equal(a, b)


def test_public_functions_take_the_eager_path_only_with_gradients():
    x = torch.randn(4, 6, requires_grad=True)
    assert type(hk.lif_multistep(x, backend="cpu").grad_fn).__name__.startswith("Eager_")
    with torch.no_grad():
        assert hk.lif_multistep(x, backend="cpu").grad_fn is None
    student, teacher = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
    loss = hk.hta_kl_div(student, teacher, backend="cpu")
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
