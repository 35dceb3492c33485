"""Multi-step LIF suite: every built backend against the reference loop (eager and compiled) and
SpikingJelly's multi-step LIFNode backends."""

from __future__ import annotations

import importlib
import inspect
import os
import re

import torch

import htakl_kernels

from .runner import QUICK_SKIPS_COMPILE, Case, Implementation, Inputs, backend_implementations

NEURONS = 1 << 20
STEPS = (4, 8, 16, 32)
QUICK_NEURONS = {"cpu": 1 << 14, "cuda": 1 << 20}
QUICK_STEPS = (4, 8)

EAGER_REFERENCE = "reference loop (eager)"
COMPILED_REFERENCE = "reference loop (torch.compile)"
SPIKINGJELLY_BACKENDS = {"cpu": ("torch",), "cuda": ("torch", "cupy", "triton")}


def _spikes(output) -> torch.Tensor:
    """The spike train: the whole output, or its first item when membranes come along."""
    return output[0] if isinstance(output, (tuple, list)) else output


def make_case(steps: int, neurons: int, dtype: torch.dtype, device: torch.device) -> Case:
    elements = steps * neurons
    size = torch.empty((), dtype=dtype).element_size()

    def make_inputs(generator):
        # Mean drive 1 and unit spread: about a sixth of the neurons fire at the first step,
        # more later, so both reset branches and the surrogate are exercised.
        x = (1.0 + torch.randn((steps, neurons), generator=generator, device=device)).to(dtype)
        grad_spikes = torch.randn((steps, neurons), generator=generator, device=device).to(dtype)
        x.requires_grad_(True)
        return Inputs(args=(x,), wrt=(x,), grad_output=grad_spikes)

    return Case(
        label=f"T{steps}xN{neurons}",
        dims={"steps": steps, "neurons": neurons},
        dtype=dtype,
        elements=elements,
        # SPEC 4: read x, write s, read gS, write gX; the saved residual is added per kernel.
        model_bytes=4 * elements * size,
        make_inputs=make_inputs,
        count_saved_bytes=True,
    )


def _backend_call(name):
    def call(x):
        return _spikes(htakl_kernels.lif_multistep(x, backend=name))

    return call


def _reference_calls(device: torch.device, quick: bool) -> list[Implementation]:
    loop = getattr(htakl_kernels.reference, "lif_multistep", None)
    if loop is None:
        reason = "htakl_kernels.reference.lif_multistep is not there yet"
        return [
            Implementation(EAGER_REFERENCE, "baseline", unavailable=reason),
            Implementation(COMPILED_REFERENCE, "baseline", unavailable=reason),
        ]
    eager = Implementation(EAGER_REFERENCE, "baseline", lambda x: _spikes(loop(x)))
    if quick:
        return [eager, Implementation(COMPILED_REFERENCE, "baseline", unavailable=QUICK_SKIPS_COMPILE)]
    compiled = torch.compile(loop, dynamic=False)
    return [eager, Implementation(COMPILED_REFERENCE, "baseline", lambda x: _spikes(compiled(x)))]


def _spikingjelly_node(neuron, surrogate, **choice):
    # SPEC 3's defaults: tau 2, threshold 1, hard reset to 0, sigmoid surrogate alpha 4.
    return neuron.LIFNode(
        tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0,
        surrogate_function=surrogate.Sigmoid(alpha=4.0), detach_reset=False, step_mode="m",
        **choice,
    )


def _spikingjelly_call(node, device):
    node = node.to(device)

    def call(x):
        node.reset()  # each call starts from the resting membrane, like the other kernels
        return node(x)

    return call


def _spikingjelly_calls(device: torch.device) -> list[Implementation]:
    """SpikingJelly's multi-step LIFNode.

    Up to 0.0.0.0.14 LIFNode takes `backend` ("torch", "cupy"; "triton" in some builds): one
    implementation each. 2.x picks its kernel itself (on CUDA: native, then Triton, then torch,
    overridable by the environment variable SJ_LIF_CUDA_IMPLEMENTATION read at import): one
    implementation, named after that choice.
    """
    try:
        neuron = importlib.import_module("spikingjelly.activation_based.neuron")
        surrogate = importlib.import_module("spikingjelly.activation_based.surrogate")
    except ImportError as error:
        reason = f"spikingjelly is not importable ({error})"
        return [Implementation("SpikingJelly LIFNode", "baseline", unavailable=reason)]
    if "backend" not in inspect.signature(neuron.LIFNode.__init__).parameters:
        choice = os.environ.get("SJ_LIF_CUDA_IMPLEMENTATION", "auto") if device.type == "cuda" else "cpu"
        node = _spikingjelly_node(neuron, surrogate)
        return [Implementation(f"SpikingJelly LIFNode ({choice})", "baseline", _spikingjelly_call(node, device))]
    found = []
    for backend in SPIKINGJELLY_BACKENDS[device.type]:
        name = f"SpikingJelly LIFNode ({backend})"
        try:
            node = _spikingjelly_node(neuron, surrogate, backend=backend)
        except Exception as error:  # noqa: BLE001 - a build may lack a backend
            found.append(Implementation(name, "baseline", unavailable=f"{type(error).__name__}: {error}"))
            continue
        found.append(Implementation(name, "baseline", _spikingjelly_call(node, device)))
    return found


def implementations(device: torch.device, quick: bool) -> list[Implementation]:
    missing = None
    if getattr(htakl_kernels, "lif_multistep", None) is None:
        missing = "htakl_kernels.lif_multistep is not there yet"
    found = backend_implementations(device, _backend_call, missing)
    found.extend(_reference_calls(device, quick))
    found.extend(_spikingjelly_calls(device))
    return found


SHAPE_LABEL = re.compile(r"T(\d+)xN(\d+)")
SHAPE_FORMAT = "TxNNEURONS, e.g. T8xN1048576"


def parse_shape(label: str):
    """(steps, neurons) of a case label as make_case writes it; None if it is not one."""
    match = SHAPE_LABEL.fullmatch(label)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def cases(device: torch.device, dtypes, quick: bool, chosen=None) -> list[Case]:
    """Every dtype of every shape: `chosen` (parsed by parse_shape) or the suite's own."""
    if chosen is None:
        steps, neurons = (QUICK_STEPS, QUICK_NEURONS[device.type]) if quick else (STEPS, NEURONS)
        chosen = [(t, neurons) for t in steps]
    return [make_case(t, neurons, dtype, device) for dtype in dtypes for t, neurons in chosen]
