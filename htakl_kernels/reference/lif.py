"""Pure-PyTorch multi-step LIF neuron: the correctness oracle for every LIF kernel.

A step-by-step loop over time that mirrors docs/SPEC.md section 3 line by line; the Heaviside
spike uses a surrogate derivative in the backward and everything else is differentiated by
autograd. The state is float32 for float16/bfloat16/float32 inputs and float64 for float64, the
outputs are cast back to x's dtype (the kernels follow the same convention).
"""

from __future__ import annotations

import math

import torch

from .._library import accumulation_dtype
from .._lif_args import LifConfig, check_lif_args


def _sigmoid_grad(u: torch.Tensor, alpha: float) -> torch.Tensor:
    sig = torch.sigmoid(alpha * u)
    return alpha * sig * (1 - sig)


def _atan_grad(u: torch.Tensor, alpha: float) -> torch.Tensor:
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * u) ** 2)


# SPEC 3's surrogate derivatives by name: the names are _lif_args.SURROGATES.
_SURROGATE_GRADS = {"sigmoid": _sigmoid_grad, "atan": _atan_grad}


def surrogate_grad(u: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """SPEC 3: the surrogate derivative sg at u = H - v_threshold."""
    grad = _SURROGATE_GRADS.get(surrogate)
    if grad is None:
        raise ValueError(f"surrogate must be one of {', '.join(map(repr, _SURROGATE_GRADS))}, "
                         f"got {surrogate!r}")
    return grad(u, alpha)


class SurrogateSpike(torch.autograd.Function):
    """S = (u >= 0) in the forward, d S / d u = sg(u) in the backward (SPEC 3)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_spike: torch.Tensor):
        (u,) = ctx.saved_tensors
        return grad_spike * surrogate_grad(u, ctx.surrogate, ctx.alpha), None, None


def lif_steps(x: torch.Tensor, v: torch.Tensor, cfg: LifConfig) -> tuple[list, list]:
    """Run SPEC 3 over x's time steps from membrane v; returns the per-step spikes and membranes."""
    spikes, membranes = [], []
    reset_value = cfg.reset_value
    for x_t in x.unbind(0):
        if cfg.decay_input:
            h = v + (x_t - (v - reset_value)) / cfg.tau
        else:
            h = v - (v - reset_value) / cfg.tau + x_t
        spike = SurrogateSpike.apply(h - cfg.v_threshold, cfg.surrogate, cfg.alpha)
        spike_in_reset = spike.detach() if cfg.detach_reset else spike
        if cfg.soft_reset:
            v = h - cfg.v_threshold * spike_in_reset
        else:
            v = h * (1 - spike_in_reset) + cfg.v_reset * spike_in_reset
        spikes.append(spike)
        membranes.append(v)
    return spikes, membranes


def lif_multistep(
    x: torch.Tensor,
    *,
    tau: float = 2.0,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
    surrogate: str = "sigmoid",
    alpha: float | None = None,
    v_init: torch.Tensor | None = None,
    return_v: str | None = None,
):
    """Reference of htakl_kernels.lif_multistep (same arguments but `backend`)."""
    cfg = check_lif_args(
        x, tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha, v_init, return_v
    )
    compute = accumulation_dtype(x.dtype)
    if v_init is None:
        v = torch.full(x.shape[1:], cfg.reset_value, dtype=compute, device=x.device)
    else:
        v = v_init.to(compute)
    spikes, membranes = lif_steps(x.to(compute), v, cfg)
    step_shape = x.shape[1:]
    spike_seq = torch.stack(spikes) if spikes else x.new_empty((0, *step_shape), dtype=compute)
    spike_seq = spike_seq.to(x.dtype)
    if return_v is None:
        return spike_seq
    if return_v == "last":
        return spike_seq, (membranes[-1] if membranes else v).to(x.dtype)
    v_seq = torch.stack(membranes) if membranes else x.new_empty((0, *step_shape), dtype=compute)
    return spike_seq, v_seq.to(x.dtype)
