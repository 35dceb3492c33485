"""The vocab-parallel phase ops of the CPU kernel (csrc/cpu/hta_kl_cpu_phases.cpp) and of Triton
(triton_kernels/hta_kl_phases.py) against the PyTorch-op phases (htakl_kernels/_ops/
hta_kl_phases.py): integers exactly, floats to rounding, on slices with no class, one class,
ties, -inf classes and NaN rows."""

from __future__ import annotations

import math

import pytest
import torch

from htakl_kernels._backends import phase_ops, unavailable_reason
from htakl_kernels._ops.hta_kl_phases import KernelPhases, TorchPhases, key_bits, selection_keys

# The phase ops under test: the CPU kernel's, and Triton's (its interpreter on CPU tensors).
IMPLEMENTATIONS = [
    pytest.param("cpu", marks=pytest.mark.skipif(unavailable_reason("cpu", "cpu") is not None,
                                                 reason="the C++ extension is not built")),
    pytest.param("triton", marks=[
        pytest.mark.triton,
        pytest.mark.skipif(unavailable_reason("triton", "cpu") is not None,
                           reason="needs Triton's interpreter (TRITON_INTERPRET=1)"),
        pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]),
]

INV_TAU = 0.5
CLOSE = {torch.float64: dict(rtol=1e-12, atol=1e-15), torch.float32: dict(rtol=1e-5, atol=1e-7)}


def _slices(dtype, steps):
    """(name, teacher [R, c], student [S, R, c]) slices: random rows with ties, -inf classes and
    a NaN row; one class; no class."""
    generator = torch.Generator().manual_seed(11 + steps)
    rows, classes = 6, 37
    def draw(*shape):
        return (3 * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)

    teacher, student = draw(rows, classes), draw(steps, rows, classes)
    teacher[0, 3:9] = 1.25  # ties
    teacher[1] = 0.0  # a whole row tied
    teacher[2, :4] = student[:, 2, :4] = -math.inf  # masked in both
    teacher[3, 5] = -math.inf  # masked in the teacher only
    student[:, 4, 7] = -math.inf  # masked in the student only
    teacher[5, 10] = math.nan  # a NaN row
    student[:, 0, 11] = -250.0  # q_t underflows in float32 while log q_t stays finite
    return [("random", teacher, student),
            ("C=1", teacher[:, :1].contiguous(), student[..., :1].contiguous()),
            ("C=0", teacher[:, :0].contiguous(), student[..., :0].contiguous())]


def _softmax_inputs(teacher, student, prob_mean):
    """The phases' inputs p, log p, q, log q, q_t, log q_t as distributed.py forms them from the
    slice's own statistics (the slice as a whole row)."""
    streams = torch.cat([teacher.unsqueeze(0), student])
    row_max = TorchPhases.slice_max(streams)
    shifted, exponentials, sums = TorchPhases.slice_exp_sums(streams, row_max, INV_TAU)
    log_sum = torch.log(sums).to(streams.dtype).unsqueeze(-1)
    log_probs, probs = shifted - log_sum, exponentials * torch.exp(-log_sum)
    log_p, p, log_q_steps, q_steps = log_probs[0], probs[0], log_probs[1:], probs[1:]
    if prob_mean:
        q = q_steps.mean(dim=0)
        log_q = torch.logsumexp(log_q_steps, dim=0) - math.log(q_steps.shape[0])
    else:
        q, log_q = q_steps[0], log_q_steps[0]
    return p, log_p, q.contiguous(), log_q.contiguous(), q_steps, log_q_steps


def test_backends_phase_ops():
    assert phase_ops("cpu") is KernelPhases
    assert phase_ops("reference") is None and phase_ops("cuda") is None
    if unavailable_reason("triton", "cpu") is None:
        from htakl_kernels.triton_kernels.hta_kl_phases import TritonPhases

        assert phase_ops("triton") is TritonPhases


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [1, 3])
def test_phase_ops_match_the_torch_phases(backend, dtype, steps):
    phases = phase_ops(backend)
    for name, teacher, student in _slices(dtype, steps):
        what = f"{name} {dtype} S={steps}"
        streams = torch.cat([teacher.unsqueeze(0), student])
        # Phase 1: maxima exactly, and the shifted logits' exponentials and sums against a
        # larger (whole-row) maximum.
        row_max = TorchPhases.slice_max(streams)
        assert torch.equal(phases.slice_max(streams), row_max), what
        whole_max = torch.where(row_max.isfinite(), row_max + 0.75, 1.5)
        expected = TorchPhases.slice_exp_sums(streams, whole_max, INV_TAU)
        got = phases.slice_exp_sums(streams, whole_max, INV_TAU)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0, equal_nan=True, msg=what)
        for g, e in zip(got[1:], expected[1:]):
            torch.testing.assert_close(g, e, equal_nan=True, **CLOSE[dtype], msg=what)

        tensors = _softmax_inputs(teacher, student, prob_mean=steps > 1)
        p = tensors[0]
        keys = selection_keys(p)
        # Phase 2: every digit of the top class's key as the prefix, and a prefix nobody has.
        bits = key_bits(dtype)
        top = keys.max(dim=1).values if p.shape[1] else keys.new_zeros(p.shape[0])
        remaining = bits
        while remaining > 0:
            width = min(8, remaining)
            remaining -= width
            for prefix in (top >> (remaining + width), top.new_full(top.shape, 3)):
                expected = TorchPhases.slice_histogram(p, prefix, remaining, width)
                got = phases.slice_histogram(p, prefix, remaining, width)
                assert all(torch.equal(g, e) for g, e in zip(got, expected)), \
                    f"{what} shift {remaining}"
        # Membership: a tied boundary with each number of its ties in the head, the whole row,
        # none of it.
        boundary = (keys[:, min(5, p.shape[1] - 1)].contiguous() if p.shape[1]
                    else keys.new_zeros(p.shape[0]))
        for tied in (0, 1, 3, 40):
            tied_in_head = torch.full_like(boundary, tied)
            for bound in (boundary, torch.full_like(boundary, -1),
                          torch.full_like(boundary, torch.iinfo(torch.int64).max)):
                assert torch.equal(phases.slice_head(p, bound, tied_in_head),
                                   TorchPhases.slice_head(p, bound, tied_in_head)), \
                    f"{what} tied={tied}"
        # Phases 3-4 with a head at the tied boundary, the slice's sums as the whole rows'.
        head = TorchPhases.slice_head(p, boundary, torch.full_like(boundary, 2))
        sums = TorchPhases.slice_sums(*tensors, head)
        got = phases.slice_sums(*tensors, head)
        # A NaN row's sums are only NaN where the contract says so: its distance.
        nan_rows = p.isnan().any(dim=1) | tensors[2].isnan().any(dim=1)
        torch.testing.assert_close(got[~nan_rows], sums[~nan_rows], **CLOSE[dtype], msg=what)
        if p.shape[1]:
            assert nan_rows.any() and (got[nan_rows, 0] + got[nan_rows, 1]).isnan().all(), what
        for detach, logit_steps in ((False, steps), (True, 4)):
            arguments = (*tensors, head, sums, INV_TAU, 0.25, detach, logit_steps, True, True)
            expected = TorchPhases.slice_grads(*arguments)
            got = phases.slice_grads(*arguments)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, equal_nan=True, **CLOSE[dtype],
                                           msg=f"{what} detach={detach}")
            no_grads = phases.slice_grads(*arguments[:-2], False, False)
            torch.testing.assert_close(no_grads[0], expected[0], equal_nan=True, **CLOSE[dtype])
            assert no_grads[1].numel() == no_grads[2].numel() == 0


@IMPLEMENTATIONS[0].marks[0]
def test_phase_ops_reject_bad_tensors():
    p = torch.rand(3, 4)
    with pytest.raises(RuntimeError, match="prefix"):
        KernelPhases.slice_histogram(p, torch.zeros(2, dtype=torch.int64), 0, 8)
    with pytest.raises(RuntimeError, match="digit"):
        KernelPhases.slice_histogram(p, torch.zeros(3, dtype=torch.int64), 30, 8)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        KernelPhases.slice_max(torch.zeros(1, 3, 4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="totals"):
        tensors = (p, p, p, p, p.unsqueeze(0), p.unsqueeze(0), p > 0.5)
        KernelPhases.slice_grads(*tensors, torch.zeros(3, 5), 1.0, 1.0, False, 1, True, True)


@pytest.mark.triton
def test_triton_phase_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter skips the compiler's frontend: compile every Triton phase kernel for an
    H100 (sm_90), float32 and float64, in a process without TRITON_INTERPRET; no spills."""
    pytest.importorskip("triton")
    from triton_compile import parse_usage, run_compiler_script

    script = """
import triton.language as tl
from htakl_kernels.triton_kernels import hta_kl_phases as k
from htakl_kernels.triton_kernels.aot import compile_for_target, resource_usage
for ty, key in (("fp32", tl.int32), ("fp64", tl.int64)):
    slice_tensors = dict(p_ptr=f"*{ty}", log_p_ptr=f"*{ty}", q_ptr=f"*{ty}", log_q_ptr=f"*{ty}",
                         q_steps_ptr=f"*{ty}", log_q_steps_ptr=f"*{ty}", head_ptr="*i8")
    sizes = dict(rows="i64", classes="i64", softmaxes="i64", sums_per_row="i64")
    for kernel, signature, constants in (
            (k._slice_max_kernel, dict(x_ptr=f"*{ty}", out_ptr=f"*{ty}", classes="i64"),
             dict(BLOCK=k.BLOCK)),
            (k._slice_exp_sums_kernel, dict(x_ptr=f"*{ty}", max_ptr=f"*{ty}", scale_ptr=f"*{ty}",
                                            shifted_ptr=f"*{ty}", exp_ptr=f"*{ty}",
                                            sums_ptr="*fp64", classes="i64"), dict(BLOCK=k.BLOCK)),
            (k._slice_histogram_kernel, dict(p_ptr=f"*{ty}", prefix_ptr="*i64", counts_ptr="*i64",
                                             masses_ptr="*i64", classes="i64", shift="i32"),
             dict(BUCKET_BITS=8, MASS_SCALE=float(2 ** 62), KEY_INT=key, BLOCK=k.HISTOGRAM_BLOCK)),
            (k._slice_head_kernel, dict(p_ptr=f"*{ty}", boundary_ptr="*i64", tied_ptr="*i64",
                                        head_ptr="*i8", classes="i64"),
             dict(KEY_INT=key, BLOCK=k.BLOCK)),
            (k._slice_sums_kernel, dict(**slice_tensors, out_ptr=f"*{ty}", **sizes),
             dict(BLOCK=k.BLOCK)),
            (k._slice_grads_kernel, dict(**slice_tensors, totals_ptr=f"*{ty}",
                                         scalars_ptr=f"*{ty}", loss_ptr=f"*{ty}",
                                         d_student_ptr=f"*{ty}", d_teacher_ptr=f"*{ty}", **sizes,
                                         detach_weights="i32"),
             dict(GRAD_STUDENT=True, GRAD_TEACHER=True, BLOCK=k.BLOCK))):
        print(*resource_usage(compile_for_target(kernel, signature, constants, num_warps=4)))
"""
    usage = parse_usage(run_compiler_script(script))
    assert len(usage) == 12
    assert all(0 < registers <= 255 and spills == 0 for registers, spills in usage)


@IMPLEMENTATIONS[0].marks[0]
def test_opcheck():
    """The registered ops against their fake implementations and schemas (torch.library)."""
    teacher, student = _slices(torch.float64, 3)[0][1:]
    # Finite losses (opcheck compares NaN as unequal): rows with ties and classes masked in both.
    teacher, student = teacher[:3, :9].contiguous(), student[:, :3, :9].contiguous()
    tensors = _softmax_inputs(teacher, student, True)
    p = tensors[0]
    streams = torch.cat([teacher.unsqueeze(0), student])
    keys = selection_keys(p)
    boundary = keys[:, 2].contiguous()
    head = TorchPhases.slice_head(p, boundary, torch.ones_like(boundary))
    sums = TorchPhases.slice_sums(*tensors, head)
    cases = [
        ("hta_kl_slice_max", (streams,)),
        ("hta_kl_slice_exp_sums", (streams, TorchPhases.slice_max(streams), INV_TAU)),
        ("hta_kl_slice_histogram", (p, keys.new_zeros(3), 55, 8)),
        ("hta_kl_slice_head", (p, boundary, torch.ones_like(boundary))),
        ("hta_kl_slice_sums", (*tensors, head)),
        ("hta_kl_slice_grads", (*tensors, head, sums, INV_TAU, 0.5, False, 3, True, False)),
    ]
    for name, args in cases:
        torch.library.opcheck(getattr(torch.ops.htakl, name).default, args)
