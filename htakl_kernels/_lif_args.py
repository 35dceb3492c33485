"""Argument checks for the multi-step LIF neuron (SPEC 3): bad input fails here, before any kernel."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._validation import check_bool, check_choice, check_float_tensor, check_real

# The surrogates of SPEC 3 by name, each with its default alpha (SpikingJelly's: Sigmoid(alpha=4),
# ATan(alpha=2)). The C++ kernels (lif_math.h), the Triton kernel and the reference know the same
# names; every other name is refused here, naming `surrogate`.
DEFAULT_ALPHA = {"sigmoid": 4.0, "atan": 2.0}
SURROGATES = tuple(DEFAULT_ALPHA)
RETURN_V = (None, "last", "seq")


class LifConfig(NamedTuple):
    """Validated scalar options of one LIF call, with the defaults resolved."""

    tau: float
    v_threshold: float
    v_reset: float | None  # None: soft reset
    decay_input: bool
    detach_reset: bool
    surrogate: str
    alpha: float
    return_v: str | None

    @property
    def soft_reset(self) -> bool:
        return self.v_reset is None

    @property
    def reset_value(self) -> float:
        """Vr in SPEC 3's charge equation: v_reset, or 0 for soft reset; also v_init's default."""
        return 0.0 if self.v_reset is None else self.v_reset


def check_lif_args(
    x: torch.Tensor,
    tau: float,
    v_threshold: float,
    v_reset: float | None,
    decay_input: bool,
    detach_reset: bool,
    surrogate: str,
    alpha: float | None,
    v_init: torch.Tensor | None,
    return_v: str | None,
) -> LifConfig:
    """Validate lif_multistep's arguments (SPEC 3) and resolve the defaults."""
    check_float_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension, the time steps [T, ...]; got a 0-d tensor")
    tau = check_real("tau", tau)
    if not tau > 1:
        raise ValueError(f"tau must be > 1 (the membrane time constant), got {tau}")
    v_threshold = check_real("v_threshold", v_threshold)
    if v_reset is not None:
        v_reset = check_real("v_reset", v_reset)
    decay_input = check_bool("decay_input", decay_input)
    detach_reset = check_bool("detach_reset", detach_reset)
    check_choice("surrogate", surrogate, SURROGATES)
    if alpha is None:
        alpha = DEFAULT_ALPHA[surrogate]
    alpha = check_real("alpha", alpha)
    if not alpha > 0:
        raise ValueError(f"alpha (the surrogate's sharpness) must be > 0, got {alpha}")
    if return_v not in RETURN_V:
        raise ValueError(f"return_v must be None, 'last' or 'seq', got {return_v!r}")
    if v_init is not None:
        if not isinstance(v_init, torch.Tensor):
            raise TypeError(f"v_init must be a torch.Tensor or None, got {type(v_init).__name__}")
        if v_init.shape != x.shape[1:]:
            raise ValueError(
                f"v_init must have the shape of one time step of x, {tuple(x.shape[1:])}, got "
                f"{tuple(v_init.shape)}"
            )
        if v_init.dtype != x.dtype:
            raise TypeError(f"v_init must have x's dtype {x.dtype}, got {v_init.dtype}")
        if v_init.device != x.device:
            raise ValueError(f"v_init must be on x's device {x.device}, got {v_init.device}")
    return LifConfig(tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha, return_v)
