"""torch.compile(fullgraph=True) traces the public loss through every backend's op."""

from __future__ import annotations

import pytest
import torch

from htakl_kernels import available_backends, hta_kl_div

# Triton on CPU tensors is its interpreter, which Inductor cannot compile; its own tests cover it.
COMPILED_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_compiled_loss_and_gradients_match_eager(backend):
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(3, 4, 50, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 50, dtype=torch.float64, generator=generator) * 3

    def loss_fn(s, t):
        return hta_kl_div(s, t, temperature=2.0, delta=0.5, backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True)
    eager_loss = loss_fn(student, teacher)
    (eager_grad,) = torch.autograd.grad(eager_loss, student)
    compiled_loss = compiled(student, teacher)
    (compiled_grad,) = torch.autograd.grad(compiled_loss, student)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)
