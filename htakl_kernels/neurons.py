"""SpikingJelly-style neuron module over the fused LIF kernels, and `reset_net`."""

from __future__ import annotations

import torch
from torch import nn

from ._backends import BACKENDS
from ._lif_args import DEFAULT_ALPHA, SURROGATES, check_lif_args
from ._validation import check_choice
from .lif import lif_multistep


def _surrogate_name_and_alpha(surrogate_function) -> tuple[str, float | None]:
    """Our surrogate name and alpha from a name, a (name, alpha) pair, or a SpikingJelly
    surrogate object (`surrogate.Sigmoid(alpha=4.)`, `surrogate.ATan(alpha=2.)`)."""
    if isinstance(surrogate_function, str):
        return surrogate_function, None
    if isinstance(surrogate_function, tuple) and len(surrogate_function) == 2:
        return surrogate_function
    name = type(surrogate_function).__name__.lower()
    if getattr(surrogate_function, "spiking", True) is False:
        raise ValueError(
            "surrogate_function with spiking=False (its smooth primitive in the forward instead of "
            "the Heaviside) is not supported: the kernels fire with the Heaviside"
        )
    if name in SURROGATES and hasattr(surrogate_function, "alpha"):
        return name, float(surrogate_function.alpha)
    raise ValueError(
        f"surrogate_function must be one of {', '.join(map(repr, SURROGATES))}, a (name, alpha) "
        f"pair, or a SpikingJelly Sigmoid/ATan surrogate object; got {surrogate_function!r}"
    )


# SpikingJelly's backend names, for code written against its LIFNode.
SPIKINGJELLY_BACKENDS = {"torch": "reference", "cupy": "cuda"}


class MultiStepLIF(nn.Module):
    """Drop-in for SpikingJelly's `LIFNode(step_mode="m")`, running the fused LIF kernels.

    Same parameter names and defaults as SpikingJelly's LIFNode (`surrogate_function` takes
    "sigmoid", "atan", a (name, alpha) pair or a SpikingJelly Sigmoid/ATan object; only
    `step_mode="m"`; `backend` is one of ours, or SpikingJelly's "torch" (our "reference") or "cupy"
    (our "cuda")). The membrane `v` persists across calls (and so
    does the graph through it, as in SpikingJelly) until `reset()`; with `store_v_seq=True` the
    membrane after every step of the last call is kept in `v_seq`.
    """

    def __init__(
        self,
        tau: float = 2.0,
        decay_input: bool = True,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function="sigmoid",
        detach_reset: bool = False,
        step_mode: str = "m",
        backend: str = "auto",
        store_v_seq: bool = False,
    ):
        super().__init__()
        surrogate, alpha = _surrogate_name_and_alpha(surrogate_function)
        # Validate the options now rather than at the first call.
        check_lif_args(
            torch.empty(1), tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha,
            None, None,
        )
        self.tau, self.decay_input, self.v_threshold, self.v_reset = tau, decay_input, v_threshold, v_reset
        # Kept as given (a SpikingJelly surrogate object becomes a submodule, as in SpikingJelly),
        # and read at every call, so that code swapping it later is honoured.
        self.surrogate_function = surrogate_function
        self.detach_reset, self.step_mode, self.backend = detach_reset, step_mode, backend
        self.store_v_seq = store_v_seq
        self.reset()

    def _surrogate_and_alpha(self) -> tuple[str, float]:
        """The surrogate's name and sharpness from `surrogate_function` (its name's default
        sharpness if it gives none)."""
        surrogate, alpha = _surrogate_name_and_alpha(self.surrogate_function)
        return surrogate, DEFAULT_ALPHA[surrogate] if alpha is None else float(alpha)

    @property
    def surrogate(self) -> str:
        return self._surrogate_and_alpha()[0]

    @property
    def alpha(self) -> float:
        return self._surrogate_and_alpha()[1]

    @property
    def step_mode(self) -> str:
        return self._step_mode

    @step_mode.setter
    def step_mode(self, value: str) -> None:
        # Checked on assignment too: SpikingJelly's functional.set_step_mode assigns it.
        if value != "m":
            raise ValueError(f"step_mode must be 'm' (multi-step, input [T, ...]), got {value!r}")
        self._step_mode = value

    @property
    def store_v_seq(self) -> bool:
        return self._store_v_seq

    @store_v_seq.setter
    def store_v_seq(self, value: bool) -> None:
        # As SpikingJelly's setter: turning it off drops the kept sequence.
        self._store_v_seq = value
        if not value:
            self.v_seq = None

    @property
    def supported_backends(self) -> tuple[str, ...]:
        """Ours, and SpikingJelly's names for its pure-PyTorch path and its CUDA kernel."""
        return BACKENDS + tuple(SPIKINGJELLY_BACKENDS)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_choice("backend", value, self.supported_backends)
        self._backend = value

    def reset(self) -> None:
        """Forget the membrane: the next call starts from v_reset (or 0 for soft reset)."""
        self.v: float | torch.Tensor = 0.0 if self.v_reset is None else self.v_reset
        self.v_seq: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v_init = self.v if isinstance(self.v, torch.Tensor) else None
        if v_init is not None and isinstance(x, torch.Tensor) and x.dim() >= 1:
            # As SpikingJelly materializes its states: a membrane of another shape (a new batch
            # size without reset()) starts afresh, and one of another dtype or device follows x.
            if v_init.shape != x.shape[1:]:
                v_init = None
            else:
                v_init = v_init.to(dtype=x.dtype, device=x.device)
        surrogate, alpha = self._surrogate_and_alpha()
        spikes, membrane = lif_multistep(
            x, tau=self.tau, v_threshold=self.v_threshold, v_reset=self.v_reset,
            decay_input=self.decay_input, detach_reset=self.detach_reset,
            surrogate=surrogate, alpha=alpha, v_init=v_init,
            return_v="seq" if self.store_v_seq else "last",
            backend=SPIKINGJELLY_BACKENDS.get(self.backend, self.backend),
        )
        if self.store_v_seq:
            self.v_seq = membrane
            if membrane.shape[0] > 0:
                self.v = membrane[-1]
        else:
            self.v = membrane
        return spikes

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau}, v_threshold={self.v_threshold}, v_reset={self.v_reset}, "
            f"decay_input={self.decay_input}, detach_reset={self.detach_reset}, "
            f"surrogate={self.surrogate!r}, alpha={self.alpha}, step_mode={self.step_mode!r}, "
            f"backend={self.backend!r}, store_v_seq={self.store_v_seq}"
        )


def reset_net(net: nn.Module) -> None:
    """Reset every submodule that has a `reset()` (our MultiStepLIF, SpikingJelly's memory
    modules), as SpikingJelly's `functional.reset_net` does."""
    for module in net.modules():
        reset = getattr(module, "reset", None)
        if callable(reset):
            reset()
