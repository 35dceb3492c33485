"""The LIF surrogates by name: every backend knows the names htakl_kernels accepts, and each
refuses any other name (instead of falling back to one of them)."""

from __future__ import annotations

import pytest
import torch

from htakl_kernels import _lif_args, reference
from htakl_kernels._backends import unavailable_reason

needs_cpu_kernel = pytest.mark.skipif(
    unavailable_reason("cpu", "cpu") is not None, reason=str(unavailable_reason("cpu", "cpu"))
)

OPTIONS = dict(tau=2.0, v_threshold=1.0, v_reset=0.0, soft_reset=False, decay_input=True,
               detach_reset=False)


def _backward(surrogate: str, alpha: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(-1.0, 3.0, 24).reshape(3, 8)
    v_init = torch.zeros(8)
    empty = x.new_empty(0)
    return torch.ops.htakl.lif_backward(torch.ones_like(x), empty, empty, x, v_init,
                                        *OPTIONS.values(), surrogate, alpha)


def test_reference_knows_every_accepted_name():
    u = torch.linspace(-2.0, 2.0, 9)
    for name in _lif_args.SURROGATES:
        sg = reference.lif.surrogate_grad(u, name, _lif_args.DEFAULT_ALPHA[name])
        assert torch.all(sg > 0)
        torch.testing.assert_close(sg, sg.flip(0))  # even in u


def test_reference_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="surrogate must be one of 'sigmoid', 'atan', got 'relu'"):
        reference.lif.surrogate_grad(torch.zeros(3), "relu", 1.0)


@needs_cpu_kernel
def test_cpu_kernel_knows_every_accepted_name_and_they_differ():
    grads = {name: _backward(name)[0] for name in _lif_args.SURROGATES}
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    names = list(grads)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert not torch.equal(grads[first], grads[second]), (first, second)


@needs_cpu_kernel
@pytest.mark.parametrize("name", ["relu", "", "Sigmoid", "atan "])
def test_cpu_kernel_refuses_an_unknown_name(name):
    with pytest.raises(RuntimeError, match=f"surrogate must be one of 'sigmoid', 'atan', got '{name}'"):
        _backward(name)
    x = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="surrogate must be one of"):
        torch.ops.htakl.lif_forward(x, torch.zeros(4), *OPTIONS.values(), name, 2.0, False)
