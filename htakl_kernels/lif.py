"""Fused multi-step LIF neuron: public function, SpikingJelly-style module, op registration.

Every kernel backend implements two ops with these contracts (schemas `_ops.LIF_FORWARD_SCHEMA`
and `_ops.LIF_BACKWARD_SCHEMA`; the C++ kernels implement `htakl::lif_forward` and
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
recomputes H[t] from x in a first sweep over time (into a scratch buffer, on GPU the grad_x
buffer itself when x is float32/float64), then sweeps t from T-1 down to 0 (SPEC 3's table),
recovering each spike exactly from the recomputed H. Storing H in the storage dtype plus one
spike bit would keep `b + 1/8` bytes per element (b = bytes of x's dtype: 4.125 for float32,
2.125 for bfloat16) alive from forward to backward in addition to x; recomputation keeps 0, and
moves the same number of bytes in all (forward: read x, write spikes; backward: read x, gS,
write gX, plus the scratch H written and read back, instead of H written by the forward and H
plus spike bits read by the backward). It also keeps the spikes exact for 16-bit inputs, where
an H rounded to the storage dtype could land on the other side of the threshold.
"""

from __future__ import annotations

import torch
from torch import nn

from . import reference
from ._backends import BACKENDS, resolve_backend
from ._lif_args import DEFAULT_ALPHA, SURROGATES, LifConfig, check_lif_args
from ._validation import check_choice, check_first_order_backward


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

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


register_lif_ops(torch.ops.htakl.lif_forward.default, torch.ops.htakl.lif_backward.default)


def _forward_op(backend: str):
    if backend == "triton":
        from .triton_kernels.lif import lif_forward_triton

        return lif_forward_triton
    return torch.ops.htakl.lif_forward.default


def _run_kernel(x: torch.Tensor, v_init: torch.Tensor | None, cfg: LifConfig, backend: str):
    if v_init is None:
        v_init = torch.full(x.shape[1:], cfg.reset_value, dtype=x.dtype, device=x.device)
    spikes, v_last, v_seq = _forward_op(backend)(
        x.contiguous(), v_init.contiguous(), cfg.tau, cfg.v_threshold, cfg.reset_value,
        cfg.soft_reset, cfg.decay_input, cfg.detach_reset, cfg.surrogate, cfg.alpha,
        cfg.return_v == "seq",
    )
    if cfg.return_v is None:
        return spikes
    return spikes, (v_last if cfg.return_v == "last" else v_seq)


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
    return _run_kernel(x, v_init, cfg, chosen)


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
