"""The C++ CPU ops' argument errors, word for word. The checks format their numbers and shapes
with csrc/check_text.h instead of streaming them into TORCH_CHECK; the text must stay what c10's
stream printed: integers in decimal, doubles as std::ostream's default "%g" (6 significant
digits), shapes as "[2, 3, 5]". The CUDA bindings share these checks (hta_kl_op.h, lif_op.h)."""

from __future__ import annotations

import pytest
import torch

from htakl_kernels._backends import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason("cpu", "cpu") is not None,
                                reason=str(unavailable_reason("cpu", "cpu")))

OPS = torch.ops.htakl


def hta_kl(student_shape=(1, 2, 5), teacher_shape=(2, 5), temperature=2.0, delta=0.5,
           row_scale=1.0):
    return lambda: OPS.hta_kl_fused(torch.zeros(student_shape), torch.zeros(teacher_shape),
                                    temperature, delta, False, False, False, False, row_scale)


LIF_OPTIONS = {"tau": 2.0, "v_threshold": 1.0, "v_reset": 0.0, "alpha": 2.0}


def lif_forward(x_shape=(3, 4), v_init_shape=(4,), **options):
    o = {**LIF_OPTIONS, **options}
    return lambda: OPS.lif_forward(torch.zeros(x_shape), torch.zeros(v_init_shape), o["tau"],
                                   o["v_threshold"], o["v_reset"], False, True, False, "atan",
                                   o["alpha"], False)


def lif_backward_segments(grad_spikes_shape=(3, 4), segment=64):
    return lambda: OPS._lif_backward_segments(
        torch.zeros(grad_spikes_shape), torch.zeros(0), torch.zeros(0), torch.zeros(3, 4),
        torch.zeros(4), 2.0, 1.0, 0.0, False, True, False, "atan", 2.0, segment)


P = torch.rand(2, 5)
PHASE_TENSORS = (P, P, P, P, P.unsqueeze(0), P.unsqueeze(0), P > 0.5)


def slice_grads(totals_shape=(2, 8), steps=1):
    return lambda: OPS.hta_kl_slice_grads(*PHASE_TENSORS, torch.zeros(totals_shape), 1.0, 1.0,
                                          False, steps, True, True)


CASES = {
    # shapes
    "student_rank": (hta_kl(student_shape=(2, 5)),
                     "hta_kl_fused: student must be [T, R, C], got [2, 5]"),
    "teacher_rank": (hta_kl(teacher_shape=(1, 2, 5)),
                     "hta_kl_fused: teacher must be [R, C], got [1, 2, 5]"),
    "mismatched_shapes": (hta_kl(teacher_shape=(3, 5)),
                          "hta_kl_fused: student [1, 2, 5] does not match teacher [3, 5]"),
    "no_time_steps": (hta_kl(student_shape=(0, 2, 5)),
                      "hta_kl_fused: student needs T >= 1 time steps"),
    "no_classes": (hta_kl(student_shape=(1, 2, 0), teacher_shape=(2, 0)),
                   "hta_kl_fused: C must be >= 1"),
    # doubles: "%g" rounds to 6 significant digits, as std::ostream did
    "temperature_zero": (hta_kl(temperature=0.0),
                         "hta_kl_fused: temperature must be finite and > 0, got 0"),
    "temperature_third": (hta_kl(temperature=-1 / 3),
                          "hta_kl_fused: temperature must be finite and > 0, got -0.333333"),
    "temperature_large": (hta_kl(temperature=-1234567.0),
                          "hta_kl_fused: temperature must be finite and > 0, got -1.23457e+06"),
    "temperature_small": (hta_kl(temperature=-1e-7),
                          "hta_kl_fused: temperature must be finite and > 0, got -1e-07"),
    "temperature_inf": (hta_kl(temperature=float("inf")),
                        "hta_kl_fused: temperature must be finite and > 0, got inf"),
    "temperature_nan": (hta_kl(temperature=float("nan")),
                        "hta_kl_fused: temperature must be finite and > 0, got nan"),
    "delta_above_one": (hta_kl(delta=1.5), "hta_kl_fused: delta must be in (0, 1], got 1.5"),
    "delta_tiny": (hta_kl(delta=-2.5e-300),
                   "hta_kl_fused: delta must be in (0, 1], got -2.5e-300"),
    "row_scale_zero": (hta_kl(row_scale=0.0),
                       "hta_kl_fused: row_scale must be finite and > 0, got 0"),
    "row_scale_inexact": (hta_kl(row_scale=-0.1 - 0.2),
                          "hta_kl_fused: row_scale must be finite and > 0, got -0.3"),
    "row_scale_minus_inf": (hta_kl(row_scale=float("-inf")),
                            "hta_kl_fused: row_scale must be finite and > 0, got -inf"),
    "lif_v_init_shape": (lif_forward(v_init_shape=(5,)),
                         "lif: v_init must have the shape x.shape[1:] = [4], got [5]"),
    "lif_v_init_of_a_vector": (lif_forward(x_shape=(3,), v_init_shape=(2,)),
                               "lif: v_init must have the shape x.shape[1:] = [], got [2]"),
    "lif_tau": (lif_forward(tau=0.5), "lif: tau must be a finite number > 1, got 0.5"),
    "lif_v_threshold": (lif_forward(v_threshold=float("nan")),
                        "lif: v_threshold must be finite, got nan"),
    "lif_v_reset": (lif_forward(v_reset=float("inf")), "lif: v_reset must be finite, got inf"),
    "lif_alpha": (lif_forward(alpha=-4.0), "lif: alpha must be a finite number > 0, got -4"),
    "lif_gradient_shape": (
        lif_backward_segments(grad_spikes_shape=(2, 4)),
        "lif_backward: grad_spikes must be empty or have shape [3, 4], got [2, 4]"),
    "lif_segment": (lif_backward_segments(segment=0),
                    "lif_backward: segment must be >= 1, got 0"),
    "lif_divide_by_tau": (lambda: OPS._lif_divide_by_tau(torch.zeros(3), 1.0),
                          "_lif_divide_by_tau: tau must be a finite number > 1, got 1"),
    # the slice ops (distributed HTA-KL): integers and shapes
    "slice_rank": (lambda: OPS.hta_kl_slice_max(torch.zeros(2, 5)),
                   "x must have 3 dimensions, got [2, 5]"),
    "slice_row_max": (lambda: OPS.hta_kl_slice_exp_sums(torch.zeros(1, 2, 5), torch.zeros(1, 3),
                                                        1.0),
                      "row_max must be [K, R] = [1, 2] in x's dtype"),
    "slice_prefix": (lambda: OPS.hta_kl_slice_histogram(P, torch.zeros(3, dtype=torch.int64), 0,
                                                        4),
                     "prefix must be a contiguous CPU int64 tensor of shape [2]"),
    "slice_digit": (lambda: OPS.hta_kl_slice_histogram(P, torch.zeros(2, dtype=torch.int64), 30,
                                                       4),
                    "the digit (shift 30, width 4) must lie within the 31 key bits, at most 16 "
                    "bits wide"),
    "slice_same_shape": (lambda: OPS.hta_kl_slice_sums(P, torch.zeros(2, 4), *PHASE_TENSORS[2:]),
                         "log_p must have p's shape [2, 5], got [2, 4]"),
    "slice_q_steps": (lambda: OPS.hta_kl_slice_sums(*PHASE_TENSORS[:4], torch.zeros(1, 3, 5),
                                                    torch.zeros(1, 3, 5), PHASE_TENSORS[6]),
                      "q_steps must be [S, R, c] with p's R, c and dtype, got [1, 3, 5]"),
    "slice_steps": (slice_grads(steps=0), "steps must be >= 1, got 0"),
    "slice_totals": (slice_grads(totals_shape=(2, 7)),
                     "totals must be [R, 8] in p's dtype, got [2, 7]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_message_text(case):
    call, message = CASES[case]
    with pytest.raises(RuntimeError) as error:
        call()
    assert str(error.value).splitlines()[0] == message
