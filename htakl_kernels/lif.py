"""Fused multi-step LIF neuron, the public function (docs/SPEC.md section 3).

The kernels' contract, what their backward keeps, and their autograd glue are in `_ops/lif.py`;
the SpikingJelly-style module is `neurons.MultiStepLIF`.
"""

from __future__ import annotations

import torch

from . import reference
from ._backends import kernel_ops, resolve_backend
from ._lif_args import check_lif_args
from ._ops.lif import run_lif_kernel


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
    backend: str = "auto",
):
    """Multi-step leaky integrate-and-fire neuron (docs/SPEC.md section 3), fused over time.

    Args:
        x: input current `[T, ...]`, one slice per time step.
        tau: membrane time constant, > 1.
        v_threshold: firing threshold; a neuron spikes when `H - v_threshold >= 0`.
        v_reset: membrane value after a spike (hard reset), or None for soft reset
            (subtract v_threshold).
        decay_input: charge with `(X - (V - v_reset)) / tau` (True) or `X - (V - v_reset) / tau`.
        detach_reset: stop the gradient through the reset's use of the spike.
        surrogate: "sigmoid" or "atan", the derivative used for the spike in the backward.
        alpha: the surrogate's sharpness (default 4 for sigmoid, 2 for atan).
        v_init: membrane before the first step, shape `x.shape[1:]` and x's dtype
            (default v_reset, or 0 for soft reset).
        return_v: None (spikes only), "last" (also the final membrane `[...]`) or "seq" (also the
            membrane after every step, `[T, ...]`).
        backend: "auto", "reference", "cpu", "triton" or "cuda" (env HTAKL_BACKEND overrides auto).

    Returns spikes (0 or 1) in x's dtype, or (spikes, membrane) when return_v is given. Gradients
    flow to x and v_init, and from the returned membrane.
    """
    cfg = check_lif_args(
        x, tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha, v_init, return_v
    )
    chosen = resolve_backend(backend, x.device)
    if chosen == "reference":
        return reference.lif_multistep(
            x, tau=cfg.tau, v_threshold=cfg.v_threshold, v_reset=cfg.v_reset,
            decay_input=cfg.decay_input, detach_reset=cfg.detach_reset, surrogate=cfg.surrogate,
            alpha=cfg.alpha, v_init=v_init, return_v=return_v,
        )
    return run_lif_kernel(kernel_ops(chosen).lif_forward, x, v_init, cfg)
