"""Shared LIF test machinery: input generators and the kernel-vs-reference comparison.

Every kernel backend (CPU, Triton, CUDA) is checked the same way: spikes and membranes against
htakl_kernels.reference.lif_multistep, gradients to x and v_init against autograd through it,
under a loss that uses both the spikes and the membrane.
"""

from __future__ import annotations

import itertools

import torch

import htakl_kernels
from htakl_kernels import reference

# The option matrix every LIF backend is tested on. v_reset None is soft reset.
RESETS = (None, 0.0, -0.2)
THRESHOLDS = (0.5, 1.0)
STEPS = (1, 2, 8, 33)
SURROGATES = ("sigmoid", "atan")

GRAD_TOLERANCE = {  # (rtol, atol) against the reference, per dtype
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    # 16-bit: kernel and reference both keep float32 state; only the final roundings differ.
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}


def charge(v_prev, x, *, tau, v_reset, decay_input):
    """SPEC 3's H[t], written as the reference writes it (same roundings)."""
    reset_value = 0.0 if v_reset is None else v_reset
    if decay_input:
        return v_prev + (x - (v_prev - reset_value)) / tau
    return v_prev - (v_prev - reset_value) / tau + x


def make_inputs(steps, step_shape, *, v_threshold, v_reset, decay_input, tau=2.0,
                dtype=torch.float64, device="cpu", seed=0, on_threshold=True):
    """x `[T, *step_shape]` and v_init with plenty of spikes; with `on_threshold`, every fifth
    neuron starts at the reset value Vr and gets, at every step, the input that charges H from Vr
    exactly onto v_threshold (found by stepping one ulp at a time). With spikes on >=, such a
    neuron fires and resets to Vr again (hard: v_reset; soft: H - v_threshold = 0 = Vr).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((steps, *step_shape), generator=generator, dtype=torch.float64) * 1.5 + 0.6
    v_init = torch.randn(step_shape, generator=generator, dtype=torch.float64) * 0.6
    x, v_init = x.to(dtype), v_init.to(dtype)
    if on_threshold:
        mask = torch.zeros(step_shape, dtype=torch.bool)
        mask.view(-1)[::5] = True
        vr = torch.tensor(0.0 if v_reset is None else v_reset, dtype=dtype)
        threshold = torch.tensor(v_threshold, dtype=dtype)
        drive = (threshold - vr) * (tau if decay_input else 1.0)
        for _ in range(8):
            h = charge(vr, drive, tau=tau, v_reset=v_reset, decay_input=decay_input)
            if h == threshold:
                break
            drive = torch.nextafter(drive, drive + (1 if h < threshold else -1))
        x[:, mask] = drive
        v_init[mask] = vr
    return x.to(device), v_init.to(device)


def exact_threshold_hits(x, v_init, v_seq, *, v_threshold, tau=2.0, v_reset, decay_input):
    """Where H[t] (recomputed from the reference membranes) equals v_threshold exactly."""
    v_prev = torch.cat([v_init.unsqueeze(0), v_seq[:-1]])
    h = charge(v_prev, x, tau=tau, v_reset=v_reset, decay_input=decay_input)
    return h == v_threshold


def run_with_grads(fn, x, v_init, return_v, weight_seed=1):
    """Run fn(x, v_init) -> spikes or (spikes, membrane), backpropagate a loss that uses both,
    and return (outputs..., grad_x, grad_v_init)."""
    x = x.detach().clone().requires_grad_()
    v_init = v_init.detach().clone().requires_grad_()
    out = fn(x, v_init)
    outputs = out if isinstance(out, tuple) else (out,)
    generator = torch.Generator().manual_seed(weight_seed)
    loss = 0
    for o in outputs:
        weight = torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.dtype).to(o.device)
        loss = loss + (o * weight).sum() + (o * o).sum() * 0.25
    loss.backward()
    # An input that no output depends on (x with T = 0) gets no gradient: count it as zero.
    grads = tuple(torch.zeros_like(t) if t.grad is None else t.grad for t in (x, v_init))
    return tuple(o.detach() for o in outputs) + grads


def assert_matches_reference(backend, x, v_init, *, return_v="seq", **options):
    """Spikes identical, membrane and gradients close to the reference (GRAD_TOLERANCE)."""
    def kernel(x_, v_):
        return htakl_kernels.lif_multistep(x_, v_init=v_, return_v=return_v, backend=backend, **options)

    def oracle(x_, v_):
        return reference.lif_multistep(x_, v_init=v_, return_v=return_v, **options)

    got = run_with_grads(kernel, x, v_init, return_v)
    want = run_with_grads(oracle, x, v_init, return_v)
    rtol, atol = GRAD_TOLERANCE[x.dtype]
    context = f"backend={backend} dtype={x.dtype} T={x.shape[0]} options={options}"
    assert torch.equal(got[0], want[0]), f"spikes differ: {context}"
    if return_v is not None:
        torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=atol, msg=lambda m: f"{context}\n{m}")
    for name, g, w in zip(("grad_x", "grad_v_init"), got[-2:], want[-2:]):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{name} {context}\n{m}")
    return got


def option_matrix(steps=STEPS, thresholds=THRESHOLDS, resets=RESETS):
    """(v_reset, v_threshold, T) combinations of the option matrix."""
    return list(itertools.product(resets, thresholds, steps))


def check_full_matrix(backend, dtype, detach_reset, decay_input, surrogate, device="cpu",
                      steps=STEPS, step_shape=(3, 13)):
    """Every (v_reset, v_threshold, T) of the option matrix for one backend and option set,
    including neurons driven exactly onto the threshold."""
    for index, (v_reset, v_threshold, t) in enumerate(option_matrix(steps)):
        x, v_init = make_inputs(
            t, step_shape, v_threshold=v_threshold, v_reset=v_reset, decay_input=decay_input,
            dtype=dtype, device=device, seed=index,
        )
        spikes, v_seq = assert_matches_reference(
            backend, x, v_init, v_threshold=v_threshold, v_reset=v_reset, decay_input=decay_input,
            detach_reset=detach_reset, surrogate=surrogate,
        )[:2]
        if dtype in (torch.float32, torch.float64):
            hits = exact_threshold_hits(x, v_init, v_seq, v_threshold=v_threshold, v_reset=v_reset,
                                        decay_input=decay_input)
            assert int(hits.sum()) >= t, f"the inputs must put H exactly on the threshold (T={t})"
            assert bool((spikes[hits] == 1).all()), "H == v_threshold must spike (>=)"
