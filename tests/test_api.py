"""Public API: argument validation, backend dispatch, loss modules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import htakl_kernels
from htakl_kernels import HTAKLLoss, SpikingKDLoss, available_backends, hta_kl_div


def _pair(*shape):
    return torch.randn(*shape), torch.randn(*shape)


@pytest.mark.parametrize(
    "student,teacher,kwargs,error,match",
    [
        (torch.randn(4, 5), torch.randn(4, 6), {}, ValueError, "number of classes C"),
        (torch.randn(3, 4, 6), torch.randn(5, 6), {}, ValueError, "per-step shape"),
        (torch.randn(2, 3, 4, 6), torch.randn(4, 6), {}, ValueError, "one extra leading time"),
        (torch.randn(6), torch.randn(4, 6), {}, ValueError, "student must have"),
        (torch.randn(4, 6), torch.tensor(1.0), {}, ValueError, "teacher must have at least one"),
        (torch.randn(4, 0), torch.randn(4, 0), {}, ValueError, "C >= 1"),
        (torch.randn(0, 4, 6), torch.randn(4, 6), {}, ValueError, "T=0"),
        (torch.randint(0, 5, (4, 6)), torch.randn(4, 6), {}, TypeError, "student must be a floating"),
        (torch.randn(4, 6), torch.randint(0, 5, (4, 6)), {}, TypeError, "teacher must be a floating"),
        (torch.randn(4, 6), torch.randn(4, 6, dtype=torch.float64), {}, TypeError, "same dtype"),
        ([1.0, 2.0], torch.randn(2), {}, TypeError, "student must be a torch.Tensor"),
        (*_pair(4, 6), dict(temperature=0.0), ValueError, "temperature"),
        (*_pair(4, 6), dict(temperature=-1.0), ValueError, "temperature"),
        (*_pair(4, 6), dict(temperature=math.inf), ValueError, "temperature"),
        (*_pair(4, 6), dict(temperature="2"), TypeError, "temperature"),
        (*_pair(4, 6), dict(delta=0.0), ValueError, "delta"),
        (*_pair(4, 6), dict(delta=1.5), ValueError, "delta"),
        (*_pair(4, 6), dict(delta=math.nan), ValueError, "delta"),
        (*_pair(4, 6), dict(reduction="mean"), ValueError, "reduction"),
        (*_pair(4, 6), dict(time_reduction="max"), ValueError, "time_reduction"),
        (*_pair(4, 6), dict(backend="metal"), ValueError, "backend"),
        (*_pair(4, 6), dict(detach_weights="yes"), TypeError, "detach_weights"),
        (*_pair(4, 6), dict(detach_weights=None), TypeError, "detach_weights"),
        (torch.randn(0, 6), torch.randn(0, 6), {}, ValueError, "empty batch"),
    ],
)
def test_bad_input_is_rejected_naming_the_argument(student, teacher, kwargs, error, match):
    with pytest.raises(error, match=match):
        hta_kl_div(student, teacher, **kwargs)


def test_autocast_promotes_a_mixed_pair():
    """A student under autocast (bfloat16) and a float32 teacher computed outside it: both go in
    as float32, as autocast treats PyTorch's own losses. Outside autocast that pair is an error."""
    layer = torch.nn.Linear(6, 6)
    inputs, teacher = torch.randn(2, 4, 6), torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = layer(inputs)
        assert student.dtype == torch.bfloat16
        loss = hta_kl_div(student, teacher)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, hta_kl_div(student.float(), teacher))
    with pytest.raises(TypeError, match="same dtype"):
        hta_kl_div(student, teacher)


def test_numpy_scalars_are_numbers():
    student, teacher = _pair(3, 6)
    expected = hta_kl_div(student, teacher, temperature=2.0, delta=0.5)
    assert hta_kl_div(student, teacher, temperature=np.float32(2.0),
                      delta=np.float64(0.5)) == expected
    assert SpikingKDLoss(alpha=np.float32(0.5)).alpha == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match="same device"):
        hta_kl_div(torch.randn(2, 3), torch.randn(2, 3, device="cuda"))


def test_mixed_devices_are_rejected_on_meta():
    # The meta device stands in for a second device on machines without a GPU.
    with pytest.raises(ValueError, match="same device"):
        hta_kl_div(torch.randn(2, 3), torch.randn(2, 3, device="meta"))


def test_unavailable_backend_says_what_is_missing():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*CUDA tensors"):
        hta_kl_div(*_pair(2, 5), backend="cuda")


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("HTAKL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="HTAKL_BACKEND"):
        hta_kl_div(*_pair(2, 5))
    monkeypatch.setenv("HTAKL_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        hta_kl_div(*_pair(2, 5))
    monkeypatch.setenv("HTAKL_BACKEND", "reference")
    student, teacher = _pair(2, 5)
    assert hta_kl_div(student, teacher) == htakl_kernels.reference.hta_kl_div(student, teacher)


def test_available_backends_lists_what_runs_here():
    backends = available_backends()
    assert backends[0] == "reference"
    assert set(backends) <= {"reference", "cpu", "triton", "cuda"}
    assert "cuda" not in available_backends("cpu")
    for backend in available_backends("cpu"):
        hta_kl_div(*_pair(2, 5), backend=backend)  # every listed backend runs


def test_loss_modules_match_the_function():
    student, teacher = torch.randn(4, 3, 10), torch.randn(3, 10)
    labels = torch.randint(0, 10, (3,))
    options = dict(temperature=3.0, delta=0.7, time_reduction="logit_mean", reduction="sum")
    torch.testing.assert_close(HTAKLLoss(**options)(student, teacher),
                               hta_kl_div(student, teacher, **options))
    expected = (0.75 * F.cross_entropy(student.mean(0), labels, reduction="sum")
                + 0.25 * hta_kl_div(student, teacher, **options))
    torch.testing.assert_close(SpikingKDLoss(alpha=0.25, **options)(student, teacher, labels),
                               expected)
    assert "alpha=0.25" in repr(SpikingKDLoss(alpha=0.25))


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_spiking_kd_loss_reduces_both_terms_alike(reduction):
    """`reduction` applies to the cross-entropy as to the distillation term: "none" gives each
    row's own objective, "sum" their sum (additive over a split batch), "batchmean" their mean."""
    student, teacher = torch.randn(2, 6, 7), torch.randn(6, 7)
    labels = torch.randint(0, 7, (6,))
    loss = SpikingKDLoss(alpha=0.5, reduction=reduction)
    per_row = torch.stack([
        SpikingKDLoss(alpha=0.5, reduction="sum")(student[:, i:i + 1], teacher[i:i + 1],
                                                  labels[i:i + 1])
        for i in range(6)])
    expected = {"none": per_row, "sum": per_row.sum(), "batchmean": per_row.mean()}[reduction]
    torch.testing.assert_close(loss(student, teacher, labels), expected)


def test_loss_modules_check_options_at_construction_and_read_them_at_each_call():
    with pytest.raises(ValueError, match="temperature"):
        HTAKLLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="backend"):
        HTAKLLoss(backend="gpu")
    with pytest.raises(TypeError, match="detach_weights"):
        HTAKLLoss(detach_weights="yes")
    student, teacher = torch.randn(2, 3, 10), torch.randn(3, 10)
    loss = SpikingKDLoss(alpha=1.0)
    loss.temperature = 4.0  # a temperature schedule
    torch.testing.assert_close(loss(student, teacher, torch.zeros(3, dtype=torch.long)),
                               hta_kl_div(student, teacher, temperature=4.0))
    loss.alpha = 2.0
    with pytest.raises(ValueError, match="alpha"):
        loss(student, teacher, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_spiking_kd_loss_value_and_gradients(alpha):
    # alpha travels into the kernel with the loss (hta_kl_div's _weight); the result must be
    # SPEC 1.7's weighted sum all the same, gradients included.
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(4, 3, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 10, (3,), generator=generator)
    got = SpikingKDLoss(alpha=alpha)(student, teacher, labels)
    want = (1 - alpha) * F.cross_entropy(student.mean(0), labels) + alpha * hta_kl_div(
        student, teacher, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (student, teacher)),
                    torch.autograd.grad(want, (student, teacher))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_spiking_kd_loss_checks_its_arguments():
    with pytest.raises(ValueError, match="alpha"):
        SpikingKDLoss(alpha=1.5)
    with pytest.raises(ValueError, match="labels"):
        SpikingKDLoss()(torch.randn(2, 4, 5), torch.randn(4, 5), torch.zeros(3, dtype=torch.long))


def test_auto_picks_triton_for_few_long_rows_on_cuda(monkeypatch):
    """On a CUDA device, "auto" takes Triton where its split kernel spreads fewer long rows than
    multiprocessors over the chip, and the CUDA kernel everywhere else (a CUDA device simulated:
    the decision reads only the backends' availability and the multiprocessor count)."""
    triton_hta_kl = pytest.importorskip("htakl_kernels.triton_kernels.hta_kl")
    from htakl_kernels import _backends

    monkeypatch.setattr(_backends, "resolve_backend", lambda requested, device: (
        "cuda" if requested == "auto" else requested))
    monkeypatch.setattr(_backends, "unavailable_reason", lambda backend, device_type: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Properties", (), {"multi_processor_count": 132}))
    monkeypatch.delenv("HTAKL_BACKEND", raising=False)

    def pick(rows, classes, requested="auto", dtype=torch.float32, device="cuda"):
        return _backends.resolve_hta_kl_backend(requested, torch.device(device), dtype, rows,
                                                classes)

    assert pick(8, 131072) == "triton"
    assert pick(8, 131072, device="cuda:0") == "triton"
    assert pick(131, 4097) == "triton"
    assert pick(8, 131072, dtype=torch.float64) == "triton"
    assert pick(132, 131072) == "cuda"  # every multiprocessor has a row
    assert pick(8, 4096) == "cuda"  # on chip in one program: nothing to split
    assert pick(0, 131072) == "cuda"  # an empty batch launches nothing
    assert pick(8, 131072, device="cuda:1") == "triton"  # the op launches on the tensors' GPU
    assert pick(8, 131072, requested="cuda") == "cuda"  # asked for by name
    monkeypatch.setenv("HTAKL_BACKEND", "auto")
    assert pick(8, 131072) == "triton"
    monkeypatch.setenv("HTAKL_BACKEND", "cuda")
    assert pick(8, 131072) == "cuda"
