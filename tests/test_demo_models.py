"""The demo's architectures (spiking students and ANN teachers) and its operation counting."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from htakl_kernels.demo.energy import (
    ENERGY_PER_AC_PJ, ENERGY_PER_MAC_PJ, ActivityMonitor, synaptic_operations,
)
from htakl_kernels.demo.models import build_model, lif_neuron
from htakl_kernels.demo.training import forward

# The demo's own logic is under test here; the LIF kernels are checked against this reference in
# their own tests.
NEURON = functools.partial(lif_neuron, backend="reference")



@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: on a shared 2-core machine a second thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# VGG-16 pools five times and needs 32x32; the ResNets work at any size, 16x16 keeps them fast.
CASES = [("resnet19", 16, 7), ("resnet20", 16, 10), ("vgg16", 32, 10), ("small", 8, 10)]


@pytest.mark.parametrize("arch, size, classes", CASES)
def test_student_shapes_forward_backward(arch, size, classes):
    torch.manual_seed(0)
    model = build_model(arch, (3, size, size), classes, timesteps=2, neuron=NEURON)
    images = torch.randn(2, 3, size, size)
    with ActivityMonitor(model) as monitor:
        logits = model(images)
    assert logits.shape == (2, 2, classes)
    assert torch.isfinite(logits).all()
    neurons = model.neurons()
    assert neurons and all(isinstance(m.neuron, type(NEURON())) for m in neurons.values())
    assert set(monitor.firing_rates()) == set(neurons)
    assert all(0 <= rate <= 1 for rate in monitor.firing_rates().values())
    logits.logsumexp(dim=-1).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # The surrogate gradient reaches the stem through every spiking layer.
    assert grads["stem.0.weight"].abs().sum() > 0


@pytest.mark.parametrize("arch, size, classes", CASES)
def test_teacher_shapes_forward_backward(arch, size, classes):
    torch.manual_seed(0)
    model = build_model(arch, (3, size, size), classes)
    assert not model.neurons() and not model.spiking
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, classes)
    logits.logsumexp(dim=-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch, size, expected", [
    ("small", 8, ["conv1", "conv2", "fc1"]),
    # Shortcut convolutions are not numbered: a block's output neuron follows its second conv.
    ("resnet19", 16, [f"conv{index}" for index in range(1, 18)] + ["fc1"]),
    ("resnet20", 16, [f"conv{index}" for index in range(1, 20)]),
    ("vgg16", 32, [f"conv{index}" for index in range(1, 14)] + ["fc1", "fc2"]),
])
def test_spiking_layers_are_named_after_the_layer_feeding_them(arch, size, expected):
    model = build_model(arch, (3, size, size), 10, timesteps=2, neuron=NEURON)
    labels = model.neuron_labels()
    assert list(labels) == list(model.neurons())
    assert list(labels.values()) == expected
    assert build_model(arch, (3, size, size), 10).neuron_labels() == {}


def test_spiking_layers_emit_spikes_and_state_is_reset_between_batches():
    torch.manual_seed(0)
    model = build_model("small", (1, 8, 8), 10, timesteps=3, neuron=NEURON).eval()
    images = torch.randn(4, 1, 8, 8)
    outputs = {}
    for name, module in model.neurons().items():
        module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    with torch.no_grad():
        first = forward(model, images)
        for spikes in outputs.values():
            assert ((spikes == 0) | (spikes == 1)).all()
        assert any(spikes.any() for spikes in outputs.values())
        second = forward(model, images)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="at least 32x32"):
        build_model("vgg16", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("resnet18", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="timesteps"):
        build_model("small", (1, 8, 8), 10, timesteps=0)


@pytest.mark.parametrize("stride, padding, kernel", [(1, 1, 3), (2, 1, 3), (2, 0, 3), (1, 0, 1)])
def test_conv_synaptic_operations_match_brute_force(stride, padding, kernel):
    generator = torch.Generator().manual_seed(stride * 10 + padding + kernel)
    layer = nn.Conv2d(5, 7, kernel, stride, padding, bias=False)
    spikes = (torch.rand(3, 5, 9, 11, generator=generator) < 0.3).float()
    # Every (spike, connected output) pair: convolve with all-ones weights and count.
    expected = F.conv2d(spikes, torch.ones(7, 5, kernel, kernel), stride=stride, padding=padding).sum()
    assert synaptic_operations(layer, spikes) == int(expected)


def test_linear_synaptic_operations_count_spikes_times_fan_out():
    layer = nn.Linear(6, 4)
    spikes = torch.tensor([[1.0, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    assert synaptic_operations(layer, spikes) == 3 * 4


def test_energy_counts_the_stem_once_per_image_and_spike_layers_per_step():
    torch.manual_seed(0)
    timesteps, batch = 3, 4
    model = build_model("small", (1, 8, 8), 10, timesteps=timesteps, neuron=NEURON).eval()
    images = torch.randn(batch, 1, 8, 8)
    with torch.no_grad(), ActivityMonitor(model) as monitor:
        model(images)
    summary = monitor.summary()
    layers = summary["layer_operations_per_image"]
    # Stem: 32 output channels x 8x8 positions x (1 input channel x 3x3), once per image.
    assert layers["stem.0"] == {"AC": 0, "MAC": 32 * 64 * 9}
    # Every other layer reads spikes (max pooling keeps them binary): accumulates only.
    assert all(ops["MAC"] == 0 for name, ops in layers.items() if name != "stem.0")
    assert summary["macs_per_image"] == 32 * 64 * 9
    expected_pj = summary["synaptic_ops_per_image"] * ENERGY_PER_AC_PJ + summary["macs_per_image"] * ENERGY_PER_MAC_PJ
    assert summary["energy_uj_per_image"] == pytest.approx(expected_pj * 1e-6, rel=1e-12)
    # The classifier's SOPs: spikes of the hidden layer (all T steps) x 10 outputs, per image.
    hidden = {}
    model.body[-2].register_forward_hook(lambda m, i, o: hidden.setdefault("spikes", o))
    with torch.no_grad():
        forward(model, images)
    assert hidden["spikes"].shape[0] == timesteps * batch
    assert layers["body.7"]["AC"] == pytest.approx(hidden["spikes"].sum().item() * 10 / batch)


def test_resnet_classifier_reading_pooled_rates_counts_multiply_adds():
    torch.manual_seed(0)
    # Training mode: batch statistics keep the deep layers firing at initialisation.
    model = build_model("resnet20", (3, 16, 16), 10, timesteps=2, neuron=NEURON).train()
    pooled = {}
    model.body[-1].register_forward_pre_hook(lambda m, inputs: pooled.setdefault("rates", inputs[0]))
    with torch.no_grad(), ActivityMonitor(model) as monitor:
        model(torch.randn(3, 3, 16, 16))
    assert not ((pooled["rates"] == 0) | (pooled["rates"] == 1)).all()  # fractions of 16 positions
    layers = monitor.summary()["layer_operations_per_image"]
    assert layers["body.12"] == {"AC": 0, "MAC": 2 * 10 * 64}  # T steps x 10 outputs x 64 inputs


def test_ann_teacher_counts_only_multiply_adds():
    torch.manual_seed(0)
    model = build_model("small", (1, 8, 8), 10).eval()
    with torch.no_grad(), ActivityMonitor(model) as monitor:
        model(torch.randn(2, 1, 8, 8))
    summary = monitor.summary()
    assert summary["synaptic_ops_per_image"] == 0 and summary["firing_rates"] == {}
    # stem 32x64x9, conv 32x64x(32x9), linear 128x512, linear 10x128
    assert summary["macs_per_image"] == 32 * 64 * 9 + 32 * 64 * 32 * 9 + 128 * 512 + 10 * 128
