"""The pure-PyTorch oracle against SPEC 1 (hand-checked cases) and SPEC 2 (gradient formulas)."""

from __future__ import annotations

import math

import pytest
import torch

from htakl_kernels.reference import head_mask, hta_kl_div, hta_kl_rows

MODES = [("2d", "prob_mean"), ("time", "prob_mean"), ("time", "logit_mean")]


def spec_gradients(student, teacher, tau, delta, time_input, time_reduction, detach_weights):
    """SPEC 2's handwritten formulas, written independently of the reference, in float64."""
    p = torch.softmax(teacher / tau, -1)
    log_p = torch.log_softmax(teacher / tau, -1)
    steps = student.shape[0] if time_input else 1
    if not time_input or time_reduction == "logit_mean":
        logits = student.mean(0) if time_input else student
        q, log_q = torch.softmax(logits / tau, -1), torch.log_softmax(logits / tau, -1)
    else:
        q_t = torch.softmax(student / tau, -1)
        q = q_t.mean(0)
        log_q = torch.logsumexp(torch.log_softmax(student / tau, -1), 0) - math.log(steps)
    head = head_mask(p, delta)
    dist = (p - q).abs()
    d_head, d_tail = (dist * head).sum(-1, keepdim=True), (dist * ~head).sum(-1, keepdim=True)
    total = d_head + d_tail
    lam_h, lam_t = d_head / total, d_tail / total
    fkl = (p * (log_p - log_q)).sum(-1, keepdim=True)
    rkl = (q * (log_q - log_p)).sum(-1, keepdim=True)
    sign = torch.sign(q - p)
    dl = sign * torch.where(head, d_tail, -d_head) / total**2
    if detach_weights:
        dl = torch.zeros_like(dl)
    if not time_input or time_reduction == "logit_mean":
        grad_z = (lam_h * (q - p) + lam_t * q * (log_q - log_p - rkl)
                  + (fkl - rkl) * q * (dl - (q * dl).sum(-1, keepdim=True))) / tau
        grad_student = grad_z.expand_as(student) / steps if time_input else grad_z
    else:
        g = -lam_h * p / q + lam_t * (log_q - log_p + 1) + (fkl - rkl) * dl
        grad_student = q_t * (g - (q_t * g).sum(-1, keepdim=True)) / (steps * tau)
    grad_teacher = (lam_h * p * (log_p - log_q - fkl) + lam_t * (p - q)
                    - (fkl - rkl) * (p * dl - p * (p * dl).sum(-1, keepdim=True))) / tau
    return grad_student, grad_teacher


@pytest.mark.parametrize("mode,time_reduction", MODES)
@pytest.mark.parametrize("detach_weights", [False, True])
def test_autograd_of_reference_matches_spec_formulas(mode, time_reduction, detach_weights):
    generator = torch.Generator().manual_seed(0)
    rows, classes, steps, tau, delta = 6, 37, 3, 1.7, 0.6
    teacher = torch.randn(rows, classes, dtype=torch.float64, generator=generator) * 2
    shape = (steps, rows, classes) if mode == "time" else (rows, classes)
    student = torch.randn(shape, dtype=torch.float64, generator=generator) * 2
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    loss = hta_kl_rows(s, t, tau, delta, mode == "time", time_reduction, detach_weights).sum()
    auto_student, auto_teacher = torch.autograd.grad(loss, (s, t))
    spec_student, spec_teacher = spec_gradients(student, teacher, tau, delta, mode == "time",
                                                time_reduction, detach_weights)
    torch.testing.assert_close(auto_student, spec_student, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(auto_teacher, spec_teacher, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode,time_reduction", MODES)
def test_gradcheck_reference(mode, time_reduction):
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(3, 9, dtype=torch.float64, generator=generator).requires_grad_()
    shape = (2, 3, 9) if mode == "time" else (3, 9)
    student = torch.randn(shape, dtype=torch.float64, generator=generator).requires_grad_()
    torch.autograd.gradcheck(
        lambda s, t: hta_kl_div(s, t, temperature=1.5, delta=0.5, time_reduction=time_reduction),
        (student, teacher),
    )


def test_head_mask_follows_stable_descending_order():
    # Ties keep ascending class index; cumulative mass 0.25, 0.5, 0.75, 1.0.
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    assert head_mask(p, 0.6).tolist() == [[True, True, False, False]]
    assert head_mask(p, 0.5).tolist() == [[True, False, False, False]]  # strict: 0.5 is not < 0.5
    p = torch.tensor([[0.1, 0.4, 0.1, 0.4]])  # order 1, 3, 0, 2
    assert head_mask(p, 0.85).tolist() == [[False, True, False, True]]
    assert head_mask(p, 0.95).tolist() == [[True, True, False, True]]


def test_confident_teacher_has_an_empty_head():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    assert not head_mask(p, 0.5).any()


def test_delta_one_keeps_only_the_last_class_out_of_the_head():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    assert head_mask(p, 1.0).tolist() == [[True, True, False]]


def test_identical_distributions_give_zero_loss_and_zero_gradient():
    logits = torch.randn(4, 11, dtype=torch.float64)
    student = logits.clone().requires_grad_()
    loss = hta_kl_div(student, logits, temperature=3.0, reduction="sum")
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == pytest.approx(0.0, abs=1e-14)
    assert grad.abs().max().item() < 1e-14


def test_weights_follow_head_and_tail_distances():
    # Hand-computed row: teacher p = (0.5, 0.3, 0.2), delta = 0.6 -> head {0}, tail {1, 2}.
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    teacher, student = p.log(), q.log()
    d_head, d_tail = 0.3, 0.2 + 0.1
    fkl = (p * (p / q).log()).sum().item()
    rkl = (q * (q / p).log()).sum().item()
    expected = d_head / (d_head + d_tail) * fkl + d_tail / (d_head + d_tail) * rkl
    loss = hta_kl_div(student, teacher, temperature=1.0, delta=0.6, reduction="sum")
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_masked_classes_give_finite_loss_and_zero_gradient_there():
    teacher = torch.randn(3, 6, dtype=torch.float64)
    student = torch.randn(2, 3, 6, dtype=torch.float64)
    teacher[:, 4] = -math.inf
    student[:, :, 4] = -math.inf
    s, t = student.requires_grad_(), teacher.requires_grad_()
    loss = hta_kl_div(s, t, reduction="sum")
    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
    assert math.isfinite(loss.item())
    assert grad_s[:, :, 4].abs().max() == 0 and grad_t[:, 4].abs().max() == 0
    assert torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()


def test_class_masked_in_teacher_only_gives_infinite_loss():
    teacher = torch.randn(2, 5, dtype=torch.float64)
    teacher[0, 2] = -math.inf
    loss = hta_kl_div(torch.randn(2, 5, dtype=torch.float64), teacher, reduction="none")
    assert loss[0].item() == math.inf and math.isfinite(loss[1].item())


def test_nan_input_gives_nan():
    teacher = torch.randn(2, 5)
    teacher[1, 3] = math.nan
    loss = hta_kl_div(torch.randn(2, 5), teacher, reduction="none")
    assert math.isfinite(loss[0].item()) and math.isnan(loss[1].item())


def test_reductions_and_row_shape():
    student, teacher = torch.randn(4, 2, 3, 10), torch.randn(2, 3, 10)
    rows = hta_kl_div(student, teacher, reduction="none")
    assert rows.shape == (2, 3)
    torch.testing.assert_close(hta_kl_div(student, teacher, reduction="sum"), rows.sum())
    torch.testing.assert_close(hta_kl_div(student, teacher), rows.mean())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_computed_in_float32(dtype):
    student, teacher = torch.randn(3, 4, 50), torch.randn(4, 50)
    expected = hta_kl_div(student.to(dtype).float(), teacher.to(dtype).float())
    actual = hta_kl_div(student.to(dtype), teacher.to(dtype))
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected.to(dtype).float())
