"""Glue of the LIF ops: their fake implementations, the autograd formula, and the call.

Below the kernels: every kernel module registers its ops here (`register_lif_ops`).

Every kernel backend implements two ops with these contracts (schemas `_library.LIF_FORWARD_SCHEMA`
and `_library.LIF_BACKWARD_SCHEMA`; the C++ kernels implement `htakl::lif_forward` and
`htakl::lif_backward` for CPU and CUDA, Triton `htakl::lif_forward_triton` and
`htakl::lif_backward_triton`):

    lif_forward(x [T, ...], v_init [...], tau, v_threshold, v_reset, soft_reset, decay_input,
                detach_reset, surrogate, alpha, return_v_seq)
        -> (spikes [T, ...], v_last [...], v_seq [T, ...] or an empty tensor), all in x's dtype

    lif_backward(grad_spikes, grad_v_last, grad_v_seq, x, v_init, <the same options>)
        -> (grad_x [T, ...], grad_v_init [...]), in x's dtype

`v_init` has x's dtype; `v_reset` is ignored (pass 0) for soft reset. The state is float32
(float64 for float64 inputs). `detach_reset`, `surrogate` ("sigmoid" or "atan") and `alpha` only
matter to the backward; the forward takes them so that its autograd formula can pass them on.
An empty gradient tensor (numel 0) stands for a zero gradient (an output nobody used).

What the backward keeps: nothing beyond the forward's own inputs x and v_init. The backward
recomputes H[t] from x and walks t from T-1 down to 0 (SPEC 3's table), recovering each spike
exactly from the recomputed H. It holds H of K steps at a time (csrc/lif_math.h,
lif_backward_segments; in registers on the GPU: K = 16 for CUDA,
4 in Triton; 64 on the CPU): for T <= K it reads x once, and the whole call moves the byte
model's 4 E b plus one read of x (5 E b; b bytes per element of x's dtype). For T > K it checkpoints
V at the start of every segment but the first and the last (ceil(T/K) - 2 values of the state
dtype per neuron, written and read once) and reads x again for every segment but the last: about
6 E b.
Storing H in the storage dtype plus one spike bit instead would keep `b + 1/8` bytes per element
alive from forward to backward (4.125 for float32, 2.125 for bfloat16) and move more bytes (H
written by the forward, H and the bits read by the backward, against one read of x); an H
rounded to a 16-bit dtype could also land on the other side of the threshold.
"""

from __future__ import annotations

import torch

from .._lif_args import LifConfig
from .._validation import check_first_order_backward
from .autograd import call, register_autograd


def _fake_lif_forward(x, v_init, tau, v_threshold, v_reset, soft_reset, decay_input,
                      detach_reset, surrogate, alpha, return_v_seq):
    v_seq = torch.empty_like(x) if return_v_seq else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(v_init), v_seq


def _fake_lif_backward(grad_spikes, grad_v_last, grad_v_seq, x, v_init, tau, v_threshold, v_reset,
                       soft_reset, decay_input, detach_reset, surrogate, alpha):
    return torch.empty_like(x), torch.empty_like(v_init)


def _gradient_or_empty(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The gradient on one output in x's dtype, contiguous; empty (= zero) if it did not arrive."""
    if grad is None or grad.numel() == 0 or like.numel() == 0:
        return like.new_empty(0)
    return grad.to(like.dtype).contiguous()


def register_lif_ops(forward_op, backward_op) -> None:
    """Give one backend's forward op its fake implementation and its autograd formula (which runs
    the same backend's backward op), and the backward op its fake implementation."""
    torch.library.register_fake(forward_op, _fake_lif_forward)
    torch.library.register_fake(backward_op, _fake_lif_backward)

    def setup_context(ctx, inputs, output):
        x, v_init, *options = inputs
        ctx.save_for_backward(x, v_init)
        ctx.options = options[:-1]  # all but return_v_seq
        # An output nobody differentiated arrives as None (an empty gradient for the kernel)
        # instead of a zero-filled tensor of its size.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_spikes, grad_v_last, grad_v_seq):
        check_first_order_backward("lif_multistep")
        x, v_init = ctx.saved_tensors
        grad_x, grad_v_init = backward_op(
            _gradient_or_empty(grad_spikes, x),
            _gradient_or_empty(grad_v_last, v_init),
            _gradient_or_empty(grad_v_seq, x),
            x, v_init, *ctx.options,
        )
        return (grad_x, grad_v_init) + (None,) * 9

    register_autograd(forward_op, backward, setup_context)




# The compiled kernels' ops (CPU and CUDA register their implementations under them in C++).
register_lif_ops(torch.ops.htakl.lif_forward.default, torch.ops.htakl.lif_backward.default)


def run_lif_kernel(forward_op, x: torch.Tensor, v_init: torch.Tensor | None, cfg: LifConfig):
    if v_init is None:
        v_init = torch.full(x.shape[1:], cfg.reset_value, dtype=x.dtype, device=x.device)
    spikes, v_last, v_seq = call(
        forward_op, x.contiguous(), v_init.contiguous(), cfg.tau, cfg.v_threshold, cfg.reset_value,
        cfg.soft_reset, cfg.decay_input, cfg.detach_reset, cfg.surrogate, cfg.alpha,
        cfg.return_v == "seq",
    )
    if cfg.return_v is None:
        return spikes
    return spikes, (v_last if cfg.return_v == "last" else v_seq)
