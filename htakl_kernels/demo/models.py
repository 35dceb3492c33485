"""Students (spiking, built from htakl_kernels.MultiStepLIF) and their ANN teachers.

Every architecture is written once, parameterised by its activation: a ReLU gives the ANN
teacher, a multi-step LIF neuron the spiking student. Inside a spiking network time is folded
into the batch (`[T*B, ...]`), so convolutions, batch norms and pools run on all steps at once;
each neuron unfolds `[T, B, ...]`, integrates over time, and folds its spikes back.

The first convolution and its batch norm (the "stem") see the static image, identical at every
step, so they run once per image and their output is repeated over the T steps (direct
encoding). The energy estimate (energy.py) counts it that way too.

Architectures (`ARCHITECTURES`):
- `small`: two 3x3 convolutions (32 channels), a 2x2 max pool and two linear layers; sized for
  the 8x8 digits, the default.
- `resnet19`: the spiking ResNet-19 of the SNN literature (tdBN, Zheng et al. 2021): a 128-channel
  stem, basic blocks 3x128, 3x256 (stride 2), 2x512 (stride 2), average pool, linear 256, linear.
- `resnet20`: the CIFAR ResNet-20 of He et al. 2016: a 16-channel stem, basic blocks 3x16,
  3x32 (stride 2), 3x64 (stride 2), average pool, linear.
- `vgg16`: 13 3x3 convolutions (64-64-M-128-128-M-256x3-M-512x3-M-512x3-M, M a 2x2 max pool),
  then linear 512, linear 512, linear; needs images of at least 32x32.
Linear layers followed by a neuron carry a batch norm, like the convolutions. A spiking basic block is `act(bn(conv(act(bn(conv(x))))) + shortcut(x))`, the shortcut being
the identity or a strided 1x1 convolution with batch norm. Max pools (of spikes) keep spikes
binary; the ResNets' global average pool does not, so their first linear layer reads rates.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import htakl_kernels

ARCHITECTURES = ("small", "resnet19", "resnet20", "vgg16")

Activation = Callable[[], nn.Module]

# Initial batch-norm scale in spiking networks, as in threshold-dependent batch norm (tdBN, Zheng
# et al. 2021): tau * v_threshold of the default LIF (2 * 1), so that an input one standard
# deviation above the mean charges the membrane (by x / tau per step) to the threshold in one
# step. With the default scale of 1 almost no neuron fires at initialisation and the students
# spend their first epochs at chance level.
SPIKING_NORM_GAIN = 2.0


def lif_neuron(backend: str = "auto") -> nn.Module:
    """The students' neuron: this package's multi-step LIF with its defaults (tau 2, hard reset,
    sigmoid surrogate), running on the kernel `backend`."""
    return htakl_kernels.MultiStepLIF(backend=backend)


class MultiStepNeuron(nn.Module):
    """Runs a multi-step neuron (`[T, ...]` in, spikes out) on time-folded `[T*B, ...]` tensors."""

    def __init__(self, neuron: nn.Module, timesteps: int) -> None:
        super().__init__()
        self.neuron = neuron
        self.timesteps = timesteps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neuron(x.unflatten(0, (self.timesteps, -1))).flatten(0, 1)


class Network(nn.Module):
    """`stem` once per image, then `body` on every time step; logits `[T, B, K]` or `[B, K]`."""

    def __init__(self, stem: nn.Module, body: nn.Module, timesteps: int | None) -> None:
        super().__init__()
        self.stem = stem
        self.body = body
        self.timesteps = timesteps  # None: an ANN

    @property
    def spiking(self) -> bool:
        return self.timesteps is not None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.stem(images)
        if not self.spiking:
            return self.body(encoded)
        repeated = encoded.unsqueeze(0).expand(self.timesteps, *encoded.shape).flatten(0, 1)
        return self.body(repeated).unflatten(0, (self.timesteps, -1))

    def neurons(self) -> dict[str, MultiStepNeuron]:
        """The spiking layers by module path, in forward order."""
        return {name: module for name, module in self.named_modules() if isinstance(module, MultiStepNeuron)}

    def neuron_labels(self) -> dict[str, str]:
        """Readable names of the spiking layers, by module path: each is named after the
        synaptic layer that feeds it, convolutions and linear layers numbered in forward order
        ("conv1", "conv2", ..., "fc1"). The ResNets' 1x1 shortcut convolutions are not numbered,
        so a basic block's output neuron carries the name of its residual branch's second
        convolution, and ResNet-20's convolutions are conv1 ... conv19 as in the literature."""
        shortcuts = {
            id(module) for block in self.modules() if isinstance(block, BasicBlock)
            for module in block.shortcut.modules()
        }
        counts, feeding, labels = {"conv": 0, "fc": 0}, None, {}
        # Registration order is forward order in every architecture here (models.py builds
        # each one in the order it runs).
        for name, module in self.named_modules():
            kind = "conv" if isinstance(module, nn.Conv2d) else "fc" if isinstance(module, nn.Linear) else None
            if kind is not None and id(module) not in shortcuts:
                counts[kind] += 1
                feeding = f"{kind}{counts[kind]}"
            elif isinstance(module, MultiStepNeuron):
                labels[name] = feeding
        return labels


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def _linear_bn(in_features: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, out_features, bias=False), nn.BatchNorm1d(out_features))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: Activation) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            _conv_bn(in_channels, out_channels, stride=stride), activation(),
            _conv_bn(out_channels, out_channels),
        )
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = _conv_bn(in_channels, out_channels, 1, stride) if needs_projection else nn.Identity()
        self.activation = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.residual(x) + self.shortcut(x))


def _resnet(in_channels, num_classes, activation, stem_width, stages, head_width):
    blocks, width = [], stem_width
    for stage_index, (stage_width, count) in enumerate(stages):
        for block_index in range(count):
            stride = 2 if stage_index > 0 and block_index == 0 else 1
            blocks.append(BasicBlock(width, stage_width, stride, activation))
            width = stage_width
    head = [_linear_bn(width, head_width), activation(), nn.Linear(head_width, num_classes)] if head_width \
        else [nn.Linear(width, num_classes)]
    body = nn.Sequential(activation(), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), *head)
    return _conv_bn(in_channels, stem_width), body


def _vgg16(in_channels, image_size, num_classes, activation):
    if min(image_size) < 32:
        raise ValueError(f"vgg16 pools five times and needs images of at least 32x32, got {image_size}")
    config = [64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers, width = [activation()], 64
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [_conv_bn(width, item), activation()]
            width = item
    spatial = (image_size[0] // 32) * (image_size[1] // 32)
    layers += [
        nn.Flatten(), _linear_bn(512 * spatial, 512), activation(), _linear_bn(512, 512), activation(),
        nn.Linear(512, num_classes),
    ]
    return _conv_bn(in_channels, 64), nn.Sequential(*layers)


def _small(in_channels, image_size, num_classes, activation):
    pooled = (image_size[0] // 2) * (image_size[1] // 2)
    body = nn.Sequential(
        activation(), _conv_bn(32, 32), activation(), nn.MaxPool2d(2), nn.Flatten(),
        _linear_bn(32 * pooled, 128), activation(), nn.Linear(128, num_classes),
    )
    return _conv_bn(in_channels, 32), body


def build_model(
    arch: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    timesteps: int | None = None,
    neuron: Callable[[], nn.Module] = lif_neuron,
) -> Network:
    """The ANN (`timesteps=None`, ReLU) or the spiking network with `timesteps` steps of `neuron()`.

    `image_shape` is `(channels, height, width)`.
    """
    if timesteps is None:
        activation: Activation = nn.ReLU
    else:
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")

        def activation() -> nn.Module:
            return MultiStepNeuron(neuron(), timesteps)

    channels, size = image_shape[0], tuple(image_shape[1:])
    if arch == "small":
        stem, body = _small(channels, size, num_classes, activation)
    elif arch == "resnet19":
        stem, body = _resnet(channels, num_classes, activation, 128, [(128, 3), (256, 3), (512, 2)], 256)
    elif arch == "resnet20":
        stem, body = _resnet(channels, num_classes, activation, 16, [(16, 3), (32, 3), (64, 3)], None)
    elif arch == "vgg16":
        stem, body = _vgg16(channels, size, num_classes, activation)
    else:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    network = Network(stem, body, timesteps)
    if network.spiking:
        for module in network.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.constant_(module.weight, SPIKING_NORM_GAIN)
    return network
