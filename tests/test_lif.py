"""Multi-step LIF: the reference against SPEC 3, argument checks, MultiStepLIF and reset_net. The
kernels against the reference are tests/test_lif_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

import htakl_kernels
from htakl_kernels import MultiStepLIF, lif_multistep, reference, reset_net

from lif_cases import SURROGATES, make_inputs


# --- the reference against SPEC 3 -------------------------------------------------------------

def spec_backward(x, v_init, grad_spikes, grad_v_seq, *, tau, v_threshold, v_reset, decay_input,
                  detach_reset, surrogate, alpha):
    """SPEC 3's backward table, written out independently of every kernel."""
    soft = v_reset is None
    vr = 0.0 if soft else v_reset
    hs, v = [], v_init
    for x_t in x:  # forward, keeping H
        h = v + (x_t - (v - vr)) / tau if decay_input else v - (v - vr) / tau + x_t
        s = (h - v_threshold >= 0).to(x.dtype)
        v = h - v_threshold * s if soft else h * (1 - s) + vr * s
        hs.append(h)
    grad_x = torch.empty_like(x)
    carry = torch.zeros_like(v_init)
    for t in reversed(range(x.shape[0])):
        h = hs[t]
        s = (h - v_threshold >= 0).to(x.dtype)
        sg = reference.lif.surrogate_grad(h - v_threshold, surrogate, alpha)
        g_v, g_s = carry + grad_v_seq[t], grad_spikes[t]
        if soft:
            g_h = g_s * sg + g_v if detach_reset else (g_s - v_threshold * g_v) * sg + g_v
        else:
            g_h = g_s * sg + g_v * (1 - s) if detach_reset else (g_s + g_v * (vr - h)) * sg + g_v * (1 - s)
        grad_x[t] = g_h / tau if decay_input else g_h
        carry = g_h * (1 - 1 / tau)
    return grad_x, carry


@pytest.mark.parametrize("v_reset", [None, 0.0, -0.2])
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("decay_input", [False, True])
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_reference_autograd_matches_spec_table(v_reset, detach_reset, decay_input, surrogate):
    options = dict(tau=1.7, v_threshold=0.5, v_reset=v_reset, decay_input=decay_input,
                   detach_reset=detach_reset, surrogate=surrogate, alpha=3.0)
    x, v_init = make_inputs(9, (4, 5), v_threshold=0.5, v_reset=v_reset, decay_input=decay_input,
                            tau=1.7)
    grad_spikes = torch.randn(x.shape, dtype=torch.float64)
    grad_v_seq = torch.randn(x.shape, dtype=torch.float64)
    x_, v_ = x.clone().requires_grad_(), v_init.clone().requires_grad_()
    spikes, v_seq = reference.lif_multistep(x_, v_init=v_, return_v="seq", **options)
    torch.autograd.backward((spikes, v_seq), (grad_spikes, grad_v_seq))
    want_x, want_v = spec_backward(x, v_init, grad_spikes, grad_v_seq, **options)
    torch.testing.assert_close(x_.grad, want_x, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(v_.grad, want_v, rtol=1e-13, atol=1e-13)


def test_reference_forward_by_hand():
    # tau = 2, decay_input, hard reset to 0, threshold 1: H = V + (X - V) / 2.
    x = torch.tensor([[2.0], [1.0], [3.0], [0.0]], dtype=torch.float64)
    spikes, v_seq = reference.lif_multistep(x, return_v="seq")
    assert spikes.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]  # H = 1 (on threshold), 0.5, 1.75, 0
    assert v_seq.flatten().tolist() == [0.0, 0.5, 0.0, 0.0]
    spikes, v_last = reference.lif_multistep(x, v_reset=None, return_v="last")  # soft reset
    # H: 1 -> V 0; 0.5; 0.5 + (3 - 0.5)/2 = 1.75 -> V 0.75; 0.75/2 = 0.375
    assert spikes.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]
    assert v_last.item() == 0.375


# --- argument checks ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(x=torch.zeros(())), ValueError, "x"),
        (dict(x=torch.zeros(3, 2, dtype=torch.int64)), TypeError, "x"),
        (dict(tau=1.0), ValueError, "tau"),
        (dict(tau=math.inf), ValueError, "tau"),
        (dict(v_threshold=math.nan), ValueError, "v_threshold"),
        (dict(v_reset=math.inf), ValueError, "v_reset"),
        (dict(surrogate="relu"), ValueError, "surrogate"),
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(return_v="all"), ValueError, "return_v"),
        (dict(decay_input=1), TypeError, "decay_input"),
        (dict(detach_reset="no"), TypeError, "detach_reset"),
        (dict(v_init=torch.zeros(3)), ValueError, "v_init"),
        (dict(v_init=torch.zeros(2, dtype=torch.float64)), TypeError, "v_init"),
        (dict(backend="cupy"), ValueError, "backend"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, name):
    kwargs = dict(kwargs)
    x = kwargs.pop("x", torch.zeros(3, 2))
    with pytest.raises(error, match=name):
        lif_multistep(x, **kwargs)


def test_unavailable_backend_is_a_clear_error():
    # CPU tensors never run on the CUDA kernels.
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        lif_multistep(torch.zeros(3, 2), backend="cuda")


# --- MultiStepLIF and reset_net -----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("store_v_seq", [False, True])
def test_module_state_persists_across_calls(backend, store_v_seq):
    torch.manual_seed(0)
    x = torch.randn(8, 4, 6, dtype=torch.float64) + 0.5
    layer = MultiStepLIF(tau=2.5, v_reset=None, surrogate_function="atan", backend=backend,
                         store_v_seq=store_v_seq)
    x1, x2 = x[:3].clone().requires_grad_(), x[3:].clone().requires_grad_()
    s = torch.cat([layer(x1), layer(x2)])
    whole = x.clone().requires_grad_()
    s_ref, v_ref = reference.lif_multistep(whole, tau=2.5, v_reset=None, surrogate="atan", return_v="seq")
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(layer.v, v_ref[-1], rtol=1e-12, atol=1e-12)
    if store_v_seq:
        torch.testing.assert_close(layer.v_seq, v_ref[3:], rtol=1e-12, atol=1e-12)
    # The graph runs through the persistent membrane, as in SpikingJelly.
    weight = torch.randn_like(s)
    (s * weight).sum().add(layer.v.sum()).backward()
    (s_ref * weight).sum().add(v_ref[-1].sum()).backward()
    torch.testing.assert_close(torch.cat([x1.grad, x2.grad]), whole.grad, rtol=1e-10, atol=1e-10)
    # After reset() the next call starts afresh.
    layer.reset()
    assert torch.equal(layer(x[3:]), reference.lif_multistep(x[3:], tau=2.5, v_reset=None))


def test_module_defaults_and_surrogate_spellings():
    layer = MultiStepLIF()
    assert (layer.tau, layer.decay_input, layer.v_threshold, layer.v_reset) == (2.0, True, 1.0, 0.0)
    assert (layer.surrogate, layer.alpha, layer.detach_reset, layer.store_v_seq) == ("sigmoid", 4.0, False, False)
    assert layer.step_mode == "m" and layer.v == 0.0
    assert MultiStepLIF(surrogate_function=("atan", 3.0)).alpha == 3.0

    class ATan:  # duck-types SpikingJelly's surrogate.ATan(alpha=2.)
        alpha = 2.5

    layer = MultiStepLIF(surrogate_function=ATan())
    assert (layer.surrogate, layer.alpha) == ("atan", 2.5)
    with pytest.raises(ValueError, match="step_mode"):
        MultiStepLIF(step_mode="s")
    with pytest.raises(ValueError, match="surrogate_function"):
        MultiStepLIF(surrogate_function=object())
    with pytest.raises(ValueError, match="tau"):
        MultiStepLIF(tau=0.5)


def test_module_takes_spikingjelly_settings_after_construction():
    """What SpikingJelly's functional.set_step_mode / set_backend do to every module that has the
    attribute: a single-step mode is refused (not run as T = batch), SJ's backend names work."""
    layer = MultiStepLIF()
    with pytest.raises(ValueError, match="step_mode"):
        layer.step_mode = "s"
    assert {"torch", "cupy", "triton"} <= set(layer.supported_backends)
    layer.backend = "torch"  # SpikingJelly's pure-PyTorch path: our reference
    x = torch.randn(5, 2, 3) + 1.0
    assert torch.equal(layer(x), reference.lif_multistep(x))
    with pytest.raises(ValueError, match="backend"):
        layer.backend = "gpu"


def test_module_surrogate_and_v_seq_settings_as_in_spikingjelly():
    class ATan(torch.nn.Module):  # duck-types SpikingJelly's surrogate.ATan
        def __init__(self, alpha=2.0, spiking=True):
            super().__init__()
            self.alpha, self.spiking = alpha, spiking

    layer = MultiStepLIF(surrogate_function=ATan(3.0), store_v_seq=True)
    x = (torch.randn(4, 5) + 1.0).requires_grad_()
    layer.surrogate_function = ATan(5.0)  # swapped after construction: honoured
    assert (layer.surrogate, layer.alpha) == ("atan", 5.0)
    grad, = torch.autograd.grad(layer(x).sum(), x)
    expected, = torch.autograd.grad(
        reference.lif_multistep(x, surrogate="atan", alpha=5.0).sum(), x)
    torch.testing.assert_close(grad, expected)
    assert layer.v_seq.shape == x.shape
    layer.store_v_seq = False
    assert layer.v_seq is None
    with pytest.raises(ValueError, match="spiking=False"):
        MultiStepLIF(surrogate_function=ATan(spiking=False))


def test_module_state_follows_a_new_batch_shape_or_dtype():
    """As SpikingJelly materializes its states: a stored membrane of another shape (a smaller last
    batch without reset) starts afresh; one of another dtype is cast to x's."""
    layer = MultiStepLIF(backend="cpu")
    layer(torch.randn(4, 3, 5) + 1.0)
    smaller = torch.randn(4, 2, 5) + 1.0
    assert torch.equal(layer(smaller), reference.lif_multistep(smaller))
    stored = layer.v
    wider = torch.randn(4, 2, 5, dtype=torch.float64) + 1.0
    assert torch.equal(layer(wider), reference.lif_multistep(wider, v_init=stored.double()))
    assert layer.v.dtype == torch.float64


def test_reset_net_resets_every_stateful_module():
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.count = 0

        def reset(self):
            self.count = 0

        def forward(self, x):
            self.count += 1
            return x

    net = torch.nn.Sequential(torch.nn.Linear(5, 5), MultiStepLIF(backend="reference"), Counter(),
                              torch.nn.Sequential(MultiStepLIF(v_reset=None, backend="reference")))
    x = torch.randn(4, 2, 5) + 1.0
    first = net(x)
    assert isinstance(net[1].v, torch.Tensor) and net[2].count == 1
    reset_net(net)
    assert net[1].v == 0.0 and net[3][0].v == 0.0 and net[2].count == 0
    assert torch.equal(net(x), first)


def test_public_exports():
    assert htakl_kernels.lif_multistep is lif_multistep
    assert htakl_kernels.reference.lif_multistep is reference.lif_multistep
    assert htakl_kernels.MultiStepLIF is MultiStepLIF and htakl_kernels.reset_net is reset_net
