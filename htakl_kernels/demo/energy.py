"""Firing rates and the usual 45 nm energy estimate of a network's inference, measured with hooks.

Energy per image = (ACs x 0.9 pJ + MACs x 4.6 pJ) / images, the 32-bit float add and
multiply-add energies at 45 nm (Horowitz, ISSCC 2014) used throughout the SNN literature.

How operations are counted, for every synaptic layer (`nn.Conv2d`, `nn.Linear`) on every call:
- Input made only of 0s and 1s (spikes): each spike is delivered to every output it is
  connected to, one accumulate (AC) each, so the layer costs its synaptic operations (SOPs):
  `Linear`: spikes x out_features; `Conv2d`: for every spike, out_channels/groups times the
  number of output positions whose receptive field covers it, computed exactly (borders and
  strides included) by convolving the per-position spike count with a window of ones.
  Summed over the T steps, since the network runs its body on all of them.
- Any other input (the image, or average-pooled spike rates): dense multiply-adds (MACs),
  output elements x (in_channels/groups x kernel area) or x in_features. In a spiking student
  this is the first convolution, which sees the static image and runs once per image rather
  than once per step (models.py), plus, in the ResNets, the linear layer after the global
  average pool. In an ANN every layer counts as MACs.
Not counted, as in the usual estimate: biases, batch norms (foldable into the weights at
inference), pooling, additions of residual branches and the neurons' membrane updates.

Firing rate of a spiking layer = spikes / (neurons x steps x images): the fraction of
neuron-steps that fire.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import Network

ENERGY_PER_AC_PJ = 0.9
ENERGY_PER_MAC_PJ = 4.6


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def synaptic_operations(layer: nn.Module, spikes: torch.Tensor) -> int:
    """ACs that `layer` performs on a 0/1 input: one per (spike, connected output) pair."""
    if isinstance(layer, nn.Linear):
        return int(spikes.count_nonzero()) * layer.out_features
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise NotImplementedError("synaptic operation counting supports numeric zero padding only")
    per_position = spikes.sum(dim=1, keepdim=True)
    window = spikes.new_ones(1, 1, *layer.kernel_size)
    covered = F.conv2d(per_position, window, stride=layer.stride, padding=layer.padding,
                       dilation=layer.dilation)
    return int(covered.sum().item()) * (layer.out_channels // layer.groups)


def dense_operations(layer: nn.Module, output: torch.Tensor) -> int:
    """MACs of `layer`'s dense evaluation: each output element's number of inputs."""
    if isinstance(layer, nn.Linear):
        return output.numel() * layer.in_features
    kernel_area = layer.kernel_size[0] * layer.kernel_size[1]
    return output.numel() * (layer.in_channels // layer.groups) * kernel_area


class ActivityMonitor:
    """Context manager that records, over the forwards run inside it, per-layer operations
    (AC or MAC, see the module docstring) and per-spiking-layer firing rates."""

    def __init__(self, model: Network) -> None:
        self.model = model
        self.operations: dict[str, dict] = {}
        self.spikes: dict[str, list[int]] = {}  # name -> [spike count, neuron-steps]
        self.images = 0
        self._handles: list = []

    def __enter__(self) -> "ActivityMonitor":
        self._handles.append(self.model.register_forward_pre_hook(self._count_images))
        for name, module in self.model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                self.operations[name] = {"AC": 0, "MAC": 0}
                self._handles.append(module.register_forward_hook(self._operation_hook(name)))
        for name, module in self.model.neurons().items():
            self.spikes[name] = [0, 0]
            self._handles.append(module.register_forward_hook(self._spike_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _count_images(self, _module, inputs) -> None:
        self.images += inputs[0].shape[0]

    def _operation_hook(self, name: str):
        def hook(layer, inputs, output):
            x = inputs[0].detach()
            if _is_binary(x):
                self.operations[name]["AC"] += synaptic_operations(layer, x)
            else:
                self.operations[name]["MAC"] += dense_operations(layer, output)
        return hook

    def _spike_hook(self, name: str):
        def hook(_module, _inputs, output):
            self.spikes[name][0] += int(output.detach().count_nonzero())
            self.spikes[name][1] += output.numel()
        return hook

    def firing_rates(self) -> dict[str, float]:
        return {name: fired / max(total, 1) for name, (fired, total) in self.spikes.items()}

    def summary(self) -> dict:
        """Per-image operations and energy (microjoules), per-layer operations and firing rates."""
        images = max(self.images, 1)
        acs = sum(layer["AC"] for layer in self.operations.values())
        macs = sum(layer["MAC"] for layer in self.operations.values())
        energy_pj = acs * ENERGY_PER_AC_PJ + macs * ENERGY_PER_MAC_PJ
        return {
            "images": self.images,
            "synaptic_ops_per_image": acs / images,
            "macs_per_image": macs / images,
            "energy_uj_per_image": energy_pj / images * 1e-6,
            "layer_operations_per_image": {
                name: {kind: count / images for kind, count in layer.items()}
                for name, layer in self.operations.items()
            },
            "firing_rates": self.firing_rates(),
            "overall_firing_rate": (
                sum(fired for fired, _ in self.spikes.values())
                / max(sum(total for _, total in self.spikes.values()), 1)
            ),
        }
