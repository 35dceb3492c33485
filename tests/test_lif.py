"""Multi-step LIF: reference against SPEC 3, the CPU kernel against the reference, the op
registration (opcheck, torch.compile), argument checks, MultiStepLIF and reset_net."""

from __future__ import annotations

import math

import pytest
import torch

import htakl_kernels
from htakl_kernels import MultiStepLIF, lif_multistep, reference, reset_net
from htakl_kernels._backends import unavailable_reason

from lif_cases import (
    SURROGATES,
    assert_matches_reference,
    check_full_matrix,
    make_inputs,
    run_with_grads,
)

needs_cpu_kernel = pytest.mark.skipif(
    unavailable_reason("cpu", "cpu") is not None, reason=str(unavailable_reason("cpu", "cpu"))
)


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


# --- the CPU kernel against the reference -----------------------------------------------------

@needs_cpu_kernel
@pytest.mark.parametrize("isa", ["native", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("decay_input", [False, True])
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_cpu_kernel_full_matrix(dtype, detach_reset, decay_input, surrogate, isa, monkeypatch):
    # The kernels are compiled for the baseline instruction set and for AVX2 + FMA, each once per
    # combination of option flags; HTAKL_CPU_ISA=baseline picks the baseline copy. (Where the CPU
    # lacks AVX2 both runs take the baseline copy.)
    if isa == "baseline":
        monkeypatch.setenv("HTAKL_CPU_ISA", "baseline")
    check_full_matrix("cpu", dtype, detach_reset, decay_input, surrogate)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_16_bit(dtype):
    for v_reset in (None, -0.2):
        x, v_init = make_inputs(8, (37,), v_threshold=1.0, v_reset=v_reset, decay_input=True,
                                dtype=dtype)
        assert_matches_reference("cpu", x, v_init, v_reset=v_reset, surrogate="atan")


@needs_cpu_kernel
@pytest.mark.parametrize("return_v", [None, "last", "seq"])
def test_cpu_kernel_return_modes_and_defaults(return_v):
    x, v_init = make_inputs(6, (2, 3, 5), v_threshold=1.0, v_reset=0.0, decay_input=True,
                            dtype=torch.float64)
    assert_matches_reference("cpu", x, v_init, return_v=return_v, tau=3.3, alpha=2.5)
    # v_init defaults to v_reset (0 for soft reset)
    for v_reset in (None, -0.2):
        got = lif_multistep(x, v_reset=v_reset, return_v="last", backend="cpu")
        want = reference.lif_multistep(x, v_reset=v_reset, return_v="last")
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)


@needs_cpu_kernel
@pytest.mark.parametrize("steps, neurons", [(5, 4099), (3, 3 * 4096 + 5)])
def test_cpu_kernel_large_and_awkward(steps, neurons):
    # More neurons than one block of the kernel (4096): a partial last block; with 3 steps, also
    # more than one parallel task (a task is max(4096, 2^15 / T) neurons), the second starting
    # off the block grid. Non-contiguous input.
    x, v_init = make_inputs(steps, (neurons,), v_threshold=0.5, v_reset=-0.2, decay_input=False,
                            dtype=torch.float32, seed=3)
    x_t = x.t().contiguous().t()  # same values, non-contiguous strides
    assert not x_t.is_contiguous()
    assert_matches_reference("cpu", x_t, v_init, v_threshold=0.5, v_reset=-0.2, decay_input=False)


@needs_cpu_kernel
def test_cpu_kernel_deterministic_and_edge_shapes():
    x, v_init = make_inputs(7, (300,), v_threshold=1.0, v_reset=0.0, decay_input=True,
                            dtype=torch.float32)
    a = run_with_grads(lambda x_, v_: lif_multistep(x_, v_init=v_, return_v="seq", backend="cpu"),
                       x, v_init, "seq")
    b = run_with_grads(lambda x_, v_: lif_multistep(x_, v_init=v_, return_v="seq", backend="cpu"),
                       x, v_init, "seq")
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    # x of shape [T] (scalar neuron), T = 0, zero neurons.
    for shape in [(5,), (0, 3), (4, 0)]:
        x = torch.randn(shape, dtype=torch.float64)
        v_init = torch.randn(shape[1:], dtype=torch.float64)
        assert_matches_reference("cpu", x, v_init, return_v="last")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_cpu_kernel_propagates_nan_and_inf_like_reference(dtype, detach_reset, surrogate):
    x = torch.tensor([[0.5, math.nan, math.inf, -math.inf, 1e30, 0.2],
                      [1.0, 1.0, 1.0, 1.0, 1.0, -1e30],
                      [0.3, 0.3, 0.3, 0.3, 0.3, 0.3]], dtype=dtype)
    v_init = torch.tensor([0.1, 0.0, -0.3, 0.2, 0.0, math.inf], dtype=dtype)
    for v_reset in (None, 0.0):
        options = dict(v_reset=v_reset, return_v="seq", detach_reset=detach_reset,
                       surrogate=surrogate)
        got = run_with_grads(lambda x_, v_: lif_multistep(x_, v_init=v_, backend="cpu", **options),
                             x, v_init, "seq")
        want = run_with_grads(lambda x_, v_: reference.lif_multistep(x_, v_init=v_, **options),
                              x, v_init, "seq")
        assert torch.equal(got[0], want[0])
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-5)


@needs_cpu_kernel
@pytest.mark.parametrize("v_reset", [None, 0.0])
@pytest.mark.parametrize("decay_input", [False, True])
def test_cpu_kernel_gradcheck_without_spikes(v_reset, decay_input):
    # Far below the threshold no spike can occur: the dynamics are smooth and gradcheck applies.
    x = (torch.randn(6, 7, dtype=torch.float64) * 0.5).requires_grad_()
    v_init = (torch.randn(7, dtype=torch.float64) * 0.5).requires_grad_()

    def dynamics(x_, v_):
        return lif_multistep(x_, v_init=v_, v_threshold=50.0, v_reset=v_reset,
                             decay_input=decay_input, tau=2.5, return_v="seq", backend="cpu")

    assert not dynamics(x, v_init)[0].any()
    assert torch.autograd.gradcheck(dynamics, (x, v_init))


@needs_cpu_kernel
def test_cpu_kernel_gradient_on_v_last_only():
    x, v_init = make_inputs(8, (11,), v_threshold=1.0, v_reset=None, decay_input=True)
    grads = []
    for fn in (lambda x_, v_: lif_multistep(x_, v_init=v_, v_reset=None, return_v="last", backend="cpu"),
               lambda x_, v_: reference.lif_multistep(x_, v_init=v_, v_reset=None, return_v="last")):
        x_, v_ = x.clone().requires_grad_(), v_init.clone().requires_grad_()
        fn(x_, v_)[1].sum().backward()  # the spikes are unused: their gradient never arrives
        grads.append((x_.grad, v_.grad))
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


# --- op registration ----------------------------------------------------------------------------

def lif_op_args(x, v_init, return_v_seq=True):
    return (x, v_init, 2.0, 1.0, 0.0, False, True, False, "sigmoid", 4.0, return_v_seq)


@needs_cpu_kernel
def test_opcheck_cpu_ops():
    x, v_init = make_inputs(5, (3, 4), v_threshold=1.0, v_reset=0.0, decay_input=True)
    for return_v_seq in (False, True):
        torch.library.opcheck(
            torch.ops.htakl.lif_forward.default,
            lif_op_args(x.requires_grad_(), v_init.requires_grad_(), return_v_seq),
        )
    grads = (torch.randn_like(x), torch.randn_like(v_init), x.new_empty(0))
    torch.library.opcheck(
        torch.ops.htakl.lif_backward.default,
        grads + (x.detach(), v_init.detach(), 2.0, 1.0, 0.0, False, True, False, "atan", 2.0),
    )


@needs_cpu_kernel
def test_torch_compile_fullgraph():
    x, v_init = make_inputs(4, (9,), v_threshold=1.0, v_reset=None, decay_input=True)

    def fn(x_, v_):
        return lif_multistep(x_, v_init=v_, v_reset=None, return_v="seq", backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = run_with_grads(compiled, x, v_init, "seq")
    want = run_with_grads(fn, x, v_init, "seq")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


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


def test_double_backward_is_refused_by_the_kernel_not_the_reference():
    """The kernel's gradient is computed, not traced: create_graph=True fails clearly instead of
    giving a gradient whose own gradient is silently missing. The reference stays differentiable."""
    x = (torch.randn(4, 3) + 1.0).requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lif_multistep(x, backend="cpu").sum(), x, create_graph=True)
    torch.autograd.grad(lif_multistep(x, backend="cpu").sum(), x)  # a plain backward still runs
    grad, = torch.autograd.grad((lif_multistep(x, backend="reference") * x).sum(), x,
                                create_graph=True)
    assert grad.requires_grad


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
