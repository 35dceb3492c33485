"""The Triton ops launch on their tensors' GPU. A Triton launch runs on the current device
whatever device its arguments are on, so every op enters `on_device_of` around its launches (the
C++ ops hold a CUDAGuard). Checked here without a GPU: the guard's choice of device, and, through
the interpreter, that every launch of every op happens inside it."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from htakl_kernels._backends import unavailable_reason

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(unavailable_reason("triton", "cpu") is not None,
                       reason="needs Triton's interpreter (TRITON_INTERPRET=1)"),
]

from htakl_kernels.triton_kernels import common, hta_kl, hta_kl_phases, lif  # noqa: E402


def test_guard_sets_the_tensors_gpu(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or
                        contextlib.nullcontext())
    with common.on_device_of(types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    with common.on_device_of(torch.zeros(1)):  # CPU (the interpreter): nothing to set
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.fixture
def launches(monkeypatch):
    """Counts the interpreter's kernel launches inside and outside the (recorded) guard."""
    from triton.runtime.interpreter import InterpretedFunction

    state = {"guarded": [], "depth": 0, "inside": 0, "outside": 0}

    @contextlib.contextmanager
    def recording_guard(tensor):
        state["guarded"].append(tensor)
        state["depth"] += 1
        try:
            yield
        finally:
            state["depth"] -= 1

    for module in (hta_kl, hta_kl_phases, lif):
        monkeypatch.setattr(module, "on_device_of", recording_guard)
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        state["inside" if state["depth"] else "outside"] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    return state


def test_hta_kl_launches_inside_the_guard(launches):
    generator = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 5, generator=generator)
    student = torch.randn(3, 2, 5, generator=generator)
    torch.ops.htakl.hta_kl_fused_triton(student, teacher, 2.0, 0.5, False, False, True, True)
    assert launches["guarded"] == [teacher]
    assert launches["inside"] >= 1 and launches["outside"] == 0


def test_lif_launches_inside_the_guard(launches):
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(4))
    v_init = torch.zeros(3, 5)
    spikes, _, _ = torch.ops.htakl.lif_forward_triton(x, v_init, 2.0, 1.0, 0.0, False, True,
                                                      False, "sigmoid", 4.0, False)
    empty = x.new_empty(0)
    torch.ops.htakl.lif_backward_triton(torch.ones_like(spikes), empty, empty, x, v_init, 2.0,
                                        1.0, 0.0, False, True, False, "sigmoid", 4.0)
    assert [t is x for t in launches["guarded"]] == [True, True]
    assert launches["inside"] == 2 and launches["outside"] == 0


def test_every_phase_op_is_guarded(launches):
    phases = hta_kl_phases.TritonPhases
    names = [name for name in vars(phases) if not name.startswith("_")]
    assert names and all(hasattr(getattr(phases, name), "__wrapped__") for name in names), names
    x = torch.randn(2, 7, generator=torch.Generator().manual_seed(5))
    row_max = phases.slice_max(x)
    phases.slice_exp_sums(x, row_max, 0.5)
    assert launches["guarded"] == [x, x]
    assert launches["inside"] == 2 and launches["outside"] == 0
