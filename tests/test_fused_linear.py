"""fused_linear_hta_kl_div and fused_linear_spiking_kd_loss against the unfused compositions
(F.linear, then hta_kl_div / SpikingKDLoss), on every backend available here (Triton through its
interpreter, at tiny sizes only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import htakl_kernels as hk
from htakl_kernels import fused_linear
from htakl_kernels.fused_linear import (
    FusedLinearHTAKLLoss, FusedLinearSpikingKDLoss, default_chunk_rows, fused_linear_hta_kl_div,
    fused_linear_spiking_kd_loss,
)

BACKENDS = hk.available_backends("cpu")
FAST_BACKENDS = [name for name in BACKENDS if name != "triton"]
# Awkward sizes: N not a multiple of the chunk, C and the hidden sizes prime, H_t != H_s.
ROWS, CLASSES, HIDDEN_S, HIDDEN_T = 13, 37, 11, 7
MASKS = ("none", "empty", "one", "all", "random")


def _heads(steps, rows=ROWS, classes=CLASSES, *, bias=True, dtype=torch.float64, seed=0,
           teacher_grad=True):
    """Student and teacher features and heads, all requiring grad unless told otherwise."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, scale=1.0, grad=True):
        value = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
        return value.requires_grad_(grad)

    student_shape = (rows, HIDDEN_S) if steps is None else (steps, rows, HIDDEN_S)
    return dict(
        student_input=normal(*student_shape),
        student_weight=normal(classes, HIDDEN_S, scale=0.8),
        student_bias=normal(classes, scale=0.5) if bias else None,
        teacher_input=normal(rows, HIDDEN_T, grad=teacher_grad),
        teacher_weight=normal(classes, HIDDEN_T, scale=0.8, grad=teacher_grad),
        teacher_bias=normal(classes, scale=0.5, grad=teacher_grad) if bias else None,
    )


def _mask(kind, rows=ROWS, seed=1):
    if kind == "none":
        return None
    mask = torch.zeros(rows, dtype=torch.bool)
    if kind == "one":
        mask[rows // 2] = True
    elif kind == "all":
        mask[:] = True
    elif kind == "random":
        mask = torch.rand(rows, generator=torch.Generator().manual_seed(seed)) < 0.6
        mask[0] = True
    return mask


def _leaves(heads):
    return [value for value in heads.values() if value is not None and value.requires_grad]


def _fused(heads, **options):
    return fused_linear_hta_kl_div(
        heads["student_input"], heads["student_weight"], heads["teacher_input"],
        heads["teacher_weight"], student_bias=heads["student_bias"],
        teacher_bias=heads["teacher_bias"], **options)


def _unfused(heads, *, row_mask=None, reduction="batchmean", chunk_rows=None, **options):
    """The composition the fused function must equal: masked rows dropped, "none" scattered."""
    student = F.linear(heads["student_input"], heads["student_weight"], heads["student_bias"])
    teacher = F.linear(heads["teacher_input"], heads["teacher_weight"], heads["teacher_bias"])
    if row_mask is None:
        return hk.hta_kl_div(student, teacher, reduction=reduction, **options)
    loss = hk.hta_kl_div(student[..., row_mask, :], teacher[row_mask], reduction=reduction,
                         **options)
    if reduction == "none":
        return loss.new_zeros(row_mask.shape[0]).index_put((row_mask,), loss)
    return loss


def _value_and_grads(loss, leaves, upstream):
    return loss.detach(), torch.autograd.grad(loss, leaves, upstream, allow_unused=True)


def _upstream(reduction, rows, dtype):
    """A random per-row upstream gradient for "none" (the backward's recompute path), 0.7 else
    (the scaled saved gradients)."""
    if reduction == "none":
        return torch.rand(rows, generator=torch.Generator().manual_seed(2), dtype=dtype) + 0.5
    return torch.tensor(0.7, dtype=dtype)


def _assert_close_grads(got, expected, **tolerance):
    for index, (a, b) in enumerate(zip(got, expected)):
        b = torch.zeros_like(a) if b is None else b  # masked rows, or no row counted at all
        torch.testing.assert_close(a, b, msg=lambda m: f"gradient {index}: {m}", **tolerance)


def _assert_matches_unfused(heads, row_mask, chunk_rows, upstream, **options):
    """The fused call (in chunks of `chunk_rows`) against F.linear + hta_kl_div: the loss and
    every gradient, backpropagated from `upstream`."""
    got = _value_and_grads(_fused(heads, row_mask=row_mask, chunk_rows=chunk_rows, **options),
                           _leaves(heads), upstream)
    expected = _value_and_grads(_unfused(heads, row_mask=row_mask, **options), _leaves(heads),
                                upstream)
    torch.testing.assert_close(got[0], expected[0])
    _assert_close_grads(got[1], expected[1])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("steps", [None, 1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("mask", ["none", "one", "all", "random"])
def test_matches_unfused_composition(backend, steps, bias, reduction, mask):
    heads = _heads(steps, bias=bias, seed=2 * (steps or 0) + bias)
    row_mask = _mask(mask)
    options = dict(temperature=1.5, delta=0.6, reduction=reduction, backend=backend)
    _assert_matches_unfused(heads, row_mask, 4, _upstream(reduction, ROWS, torch.float64),
                            **options)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_mask_without_rows_gives_zero_and_zero_gradients(backend, reduction):
    heads = _heads(3)
    loss = _fused(heads, row_mask=_mask("empty"), reduction=reduction, backend=backend)
    assert loss.shape == ((ROWS,) if reduction == "none" else ())
    assert torch.equal(loss, torch.zeros_like(loss))
    for gradient in torch.autograd.grad(loss.sum(), _leaves(heads)):
        assert torch.equal(gradient, torch.zeros_like(gradient))


@pytest.mark.triton
@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not available here")
@pytest.mark.parametrize("steps", [None, 3])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_triton_matches_unfused_composition(steps, reduction):
    heads = _heads(steps, rows=5, classes=9, dtype=torch.float32)
    row_mask = torch.tensor([True, False, True, True, False])
    options = dict(reduction=reduction, backend="triton")
    _assert_matches_unfused(heads, row_mask, 2, _upstream(reduction, 5, torch.float32), **options)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("steps", [None, 3])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("time_reduction", ["prob_mean", "logit_mean"])
def test_gradcheck_float64(backend, steps, reduction, time_reduction):
    heads = _heads(steps, rows=5, classes=6, seed=3)
    names = list(heads)
    row_mask = torch.tensor([True, True, False, True, True])

    def function(*tensors):
        return fused_linear_hta_kl_div(
            tensors[0], tensors[1], tensors[3], tensors[4], student_bias=tensors[2],
            teacher_bias=tensors[5], reduction=reduction, time_reduction=time_reduction,
            row_mask=row_mask, chunk_rows=2, backend=backend)

    assert torch.autograd.gradcheck(function, [heads[name] for name in names])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, dict(rtol=2e-5, atol=2e-6)),
                                             (torch.bfloat16, dict(rtol=2e-2, atol=2e-3))])
def test_low_precision_values_and_gradients(backend, dtype, tolerance):
    heads = _heads(3, rows=20, classes=50, dtype=dtype)
    row_mask = _mask("random", rows=20)
    got = _value_and_grads(_fused(heads, row_mask=row_mask, chunk_rows=6, backend=backend),
                           _leaves(heads), None)
    expected = _value_and_grads(_unfused(heads, row_mask=row_mask, backend=backend),
                                _leaves(heads), None)
    assert got[0].dtype == dtype
    torch.testing.assert_close(got[0], expected[0], **tolerance)
    _assert_close_grads(got[1], expected[1], **tolerance)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_autocast_runs_bf16_matmuls_and_returns_parameter_dtype_gradients(backend):
    heads = _heads(3, rows=17, classes=40, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _fused(heads, chunk_rows=5, backend=backend)
        expected = _unfused(heads, backend=backend)
    assert loss.dtype == expected.dtype == torch.bfloat16
    got = torch.autograd.grad(loss, _leaves(heads))
    wanted = torch.autograd.grad(expected, _leaves(heads))
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-3)
    for gradient, reference_gradient, leaf in zip(got, wanted, _leaves(heads)):
        assert gradient.dtype == leaf.dtype == torch.float32
        torch.testing.assert_close(gradient, reference_gradient, rtol=3e-2, atol=3e-3)


@pytest.mark.parametrize("chunk_rows", [1, 4, 13, 100, None])
def test_chunk_size_does_not_change_the_result(chunk_rows):
    heads = _heads(3)
    got = _value_and_grads(_fused(heads, chunk_rows=chunk_rows, backend="cpu"), _leaves(heads),
                           None)
    expected = _value_and_grads(_unfused(heads, backend="cpu"), _leaves(heads), None)
    torch.testing.assert_close(got[0], expected[0])
    _assert_close_grads(got[1], expected[1])


def test_default_chunk_rows_follows_the_budget():
    cpu = torch.device("cpu")
    # [4, rows, 32000] + [rows, 32000] float32 logits in 24 MiB
    assert default_chunk_rows(4, 32000, torch.float32, cpu) == (24 << 20) // (5 * 32000 * 4)
    assert default_chunk_rows(1, 32000, torch.bfloat16, cpu) == (24 << 20) // (2 * 32000 * 2)
    assert default_chunk_rows(8, 10 ** 7, torch.float32, cpu) == 1


class _KernelSpy:
    """Records the gradient flags each chunk's kernel call gets."""

    def __init__(self, ops):
        self.ops, self.flags = ops, []

    def hta_kl_fused(self, *args):
        self.flags.append((args[6], args[7]))
        return self.ops.hta_kl_fused(*args)


def test_frozen_teacher_costs_no_teacher_gradient_work(monkeypatch):
    spies = []

    def spy_ops(name):
        spies.append(_KernelSpy(hk._backends.kernel_ops(name)))
        return spies[-1]

    monkeypatch.setattr(fused_linear, "kernel_ops", spy_ops)
    heads = _heads(3, teacher_grad=False)
    loss = _fused(heads, chunk_rows=4, backend="cpu")
    loss.backward()
    flags = [flag for spy in spies for flag in spy.flags]
    assert flags == [(True, False)] * 4  # 13 rows in chunks of 4
    heads = _heads(3)
    _fused(heads, chunk_rows=4, backend="cpu").backward()
    assert all(value.grad is not None for value in _leaves(heads))


def test_retained_graph_gives_the_same_gradients_twice():
    heads = _heads(3)
    loss = _fused(heads, backend="cpu")
    first = torch.autograd.grad(loss, _leaves(heads), retain_graph=True)
    second = torch.autograd.grad(loss, _leaves(heads))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_double_backward_is_refused(backend):
    heads = _heads(None)
    loss = _fused(heads, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, _leaves(heads), create_graph=True)


def test_torch_compile_graph_breaks_at_the_call_and_agrees():
    heads = _heads(3, dtype=torch.float32)
    projection = torch.nn.Linear(HIDDEN_S, HIDDEN_S, dtype=torch.float32)

    def step(features, weight, teacher_input, teacher_weight):
        return fused_linear_hta_kl_div(torch.tanh(projection(features)), weight, teacher_input,
                                       teacher_weight, chunk_rows=4, backend="cpu")

    arguments = (heads["student_input"], heads["student_weight"], heads["teacher_input"],
                 heads["teacher_weight"])
    compiled = torch.compile(step, backend="aot_eager")
    got = _value_and_grads(compiled(*arguments), list(arguments), None)
    expected = _value_and_grads(step(*arguments), list(arguments), None)
    torch.testing.assert_close(got[0], expected[0])
    _assert_close_grads(got[1], expected[1])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("steps", [None, 3])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_spiking_kd_loss_matches_spiking_kd_loss_module(backend, steps, reduction, alpha):
    heads = _heads(steps, seed=4)
    row_mask = _mask("random")
    labels = torch.randint(0, CLASSES, (ROWS,), generator=torch.Generator().manual_seed(5))
    labels[~row_mask] = -100  # masked rows may hold an ignore index
    loss = fused_linear_spiking_kd_loss(
        heads["student_input"], heads["student_weight"], heads["teacher_input"],
        heads["teacher_weight"], labels, alpha=alpha, student_bias=heads["student_bias"],
        teacher_bias=heads["teacher_bias"], reduction=reduction, row_mask=row_mask,
        chunk_rows=5, backend=backend)
    upstream = _upstream(reduction, ROWS, torch.float64)
    got = _value_and_grads(loss, _leaves(heads), upstream)
    student = F.linear(heads["student_input"], heads["student_weight"], heads["student_bias"])
    teacher = F.linear(heads["teacher_input"], heads["teacher_weight"], heads["teacher_bias"])
    criterion = hk.SpikingKDLoss(alpha=alpha, reduction=reduction, backend=backend)
    expected = criterion(student[..., row_mask, :], teacher[row_mask], labels[row_mask])
    if reduction == "none":
        expected = expected.new_zeros(ROWS).index_put((row_mask,), expected)
    expected = _value_and_grads(expected, _leaves(heads), upstream)
    torch.testing.assert_close(got[0], expected[0])
    _assert_close_grads(got[1], expected[1])


def test_modules_hold_and_read_their_options():
    heads = _heads(3)
    criterion = FusedLinearHTAKLLoss(temperature=3.0, reduction="sum", chunk_rows=4)
    assert "temperature=3.0" in repr(criterion)
    criterion.temperature = 1.0
    arguments = (heads["student_input"], heads["student_weight"], heads["teacher_input"],
                 heads["teacher_weight"], heads["student_bias"], heads["teacher_bias"])
    torch.testing.assert_close(criterion(*arguments),
                               _unfused(heads, temperature=1.0, reduction="sum"))
    labels = torch.randint(0, CLASSES, (ROWS,), generator=torch.Generator().manual_seed(6))
    kd = FusedLinearSpikingKDLoss(alpha=0.25, chunk_rows=3)
    student = F.linear(heads["student_input"], heads["student_weight"], heads["student_bias"])
    teacher = F.linear(heads["teacher_input"], heads["teacher_weight"], heads["teacher_bias"])
    torch.testing.assert_close(
        kd(*arguments[:4], labels, *arguments[4:]),
        hk.SpikingKDLoss(alpha=0.25)(student, teacher, labels))
    with pytest.raises(ValueError, match="chunk_rows"):
        FusedLinearHTAKLLoss(chunk_rows=0)
    with pytest.raises(ValueError, match="alpha"):
        FusedLinearSpikingKDLoss(alpha=1.5)


def _f64(*shape):
    return torch.randn(shape, dtype=torch.float64)


def _bad(**changes):
    heads = _heads(3, bias=True)
    heads.update(changes)
    return heads


BAD_INPUTS = [
    (dict(teacher_weight=_f64(CLASSES + 1, HIDDEN_T)), {}, ValueError,
     "student_weight and teacher_weight must have the same number of classes"),
    (dict(student_weight=_f64(CLASSES, HIDDEN_S + 1)), {}, ValueError,
     "student_input's hidden size"),
    (dict(teacher_weight=_f64(CLASSES, HIDDEN_T + 2)), {}, ValueError,
     "teacher_input's hidden size"),
    (dict(teacher_input=_f64(2, ROWS, HIDDEN_T)), {}, ValueError,
     "teacher_input must be \\[N, H_t\\].*time dimension"),
    (dict(teacher_input=_f64(ROWS + 1, HIDDEN_T)), {}, ValueError, "same number of rows N"),
    (dict(student_bias=_f64(CLASSES - 1)), {}, ValueError, "student_bias must be \\[C\\]"),
    (dict(teacher_weight=_f64(CLASSES)), {}, ValueError, "teacher_weight must be \\[C, H\\]"),
    (dict(student_input=torch.randn(ROWS, HIDDEN_S)), {}, TypeError,
     "student_weight must have student_input's dtype"),
    (dict(student_input=torch.ones(ROWS, HIDDEN_S, dtype=torch.long)), {}, TypeError,
     "student_input must be a floating-point tensor"),
    ({}, dict(row_mask=torch.ones(ROWS + 1, dtype=torch.bool)), ValueError,
     "row_mask must have shape \\[N\\]"),
    ({}, dict(row_mask=torch.ones(ROWS)), TypeError, "row_mask must be a bool tensor"),
    ({}, dict(chunk_rows=0), ValueError, "chunk_rows"),
    ({}, dict(reduction="mean"), ValueError, "reduction"),
    ({}, dict(temperature=0.0), ValueError, "temperature"),
    ({}, dict(backend="metal"), ValueError, "backend"),
]


@pytest.mark.parametrize("changes,options,error,message", BAD_INPUTS)
def test_bad_input_is_refused_before_any_work(monkeypatch, changes, options, error, message):
    def no_work(*_args, **_kwargs):
        raise AssertionError("the chunk loop ran")

    monkeypatch.setattr(fused_linear, "_run_chunks", no_work)
    with pytest.raises(error, match=message):
        _fused(_bad(**changes), **options)


def test_bad_labels_are_refused():
    heads = _heads(None)
    arguments = (heads["student_input"], heads["student_weight"], heads["teacher_input"],
                 heads["teacher_weight"])
    with pytest.raises(ValueError, match="labels of counted rows"):
        fused_linear_spiking_kd_loss(*arguments, torch.full((ROWS,), CLASSES))
    with pytest.raises(TypeError, match="labels must be an int64"):
        fused_linear_spiking_kd_loss(*arguments, torch.zeros(ROWS))
    with pytest.raises(ValueError, match="labels must have shape"):
        fused_linear_spiking_kd_loss(*arguments, torch.zeros(ROWS + 1, dtype=torch.long))


def test_empty_batch_follows_hta_kl_div():
    heads = _heads(3, rows=0)
    assert _fused(heads, reduction="sum", backend="cpu").item() == 0.0
    assert _fused(heads, reduction="none", backend="cpu").shape == (0,)
    with pytest.raises(ValueError, match="batchmean"):
        _fused(heads, backend="cpu")
