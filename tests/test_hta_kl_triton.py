"""What only the Triton HTA-KL kernel has: its long-row layout, its class-count limit, its
op schema (inferred from Python) and its compiled form. The contract it shares with the other
backends, including the on-chip and the chunked layouts, is tests/test_hta_kl_contract.py.

Without a GPU the kernel runs on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton); with a GPU the CUDA cases test the compiled
kernel.
"""

from __future__ import annotations

import pytest
import torch

from backend_targets import TARGETS, target_marks
from hta_kl_oracle import assert_close_to_oracle, draw_teacher, oracle
from triton_compile import parse_usage, run_compiler_script

pytest.importorskip("triton")
from htakl_kernels.triton_kernels.hta_kl import launch_hta_kl  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    # The interpreter evaluates both sides of every tl.where with numpy, which warns about the
    # -inf and NaN lanes that the kernel then discards.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]
DEVICES = [pytest.param(TARGETS[name].device, id=TARGETS[name].device,
                        marks=target_marks(TARGETS[name])) for name in ("triton", "triton_cuda")]
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_long_row_chunked(device):
    """C = 1025 on the chunked path: five chunks, the last holding one class."""
    dtypes = (torch.float32,) if device == "cpu" else ALL_DTYPES
    for seed, dtype in enumerate(dtypes):
        generator = torch.Generator().manual_seed(200 + seed)
        teacher = draw_teacher(2, 1025, temperature=1.0, delta=0.7, dtype=dtype, scale=2.0,
                               generator=generator)
        student = (torch.randn(2, 2, 1025, generator=generator) * 2.0).to(dtype)
        loss, d_student, d_teacher = launch_hta_kl(
            student.to(device), teacher.to(device), 1.0, 0.7, False, False, True, True,
            on_chip_limit=256)
        expected = oracle(student, teacher, temperature=1.0, delta=0.7, reduction="none")
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert d_student.dtype == dtype and d_teacher.dtype == dtype
        for what, actual, want in zip(("loss rows", "d student", "d teacher"),
                                      (loss, d_student, d_teacher), expected):
            assert_close_to_oracle(actual.cpu(), want, dtype, what)


def test_rejects_more_classes_than_int32_counts(monkeypatch):
    """Rows past 2^31 - 1 classes would wrap the kernel's int32 class counts: refused up front
    (checked with the limit lowered to 4, as a real such row needs 8 GiB)."""
    import htakl_kernels.triton_kernels.hta_kl as module

    monkeypatch.setattr(module, "MAX_CLASSES", 4)
    with pytest.raises(ValueError, match="C = 5 classes.*at most 4"):
        launch_hta_kl(torch.zeros(1, 2, 5), torch.zeros(2, 5), 1.0, 0.5, False, False, False,
                      False)


def test_schema_is_the_shared_one():
    """triton_op infers the schema from the Python signature; it must be _library.HTA_KL_SCHEMA."""
    from htakl_kernels._library import HTA_KL_SCHEMA

    schema = str(torch.ops.htakl.hta_kl_fused_triton.default._schema)
    # Parsed and printed again, as the op's schema is (a default of 1.0 prints as "1.").
    assert schema == str(torch._C.parse_schema("htakl::hta_kl_fused_triton" + HTA_KL_SCHEMA))


def test_compiles_for_sm90_without_a_gpu():
    """The interpreter skips the compiler's frontend: compile the real kernel for an H100 (sm_90)
    in a process without TRITON_INTERPRET, for a 16-bit on-chip prob_mean row and a float32
    chunked row, and check ptxas' register report is there."""
    script = (
        "from htakl_kernels.triton_kernels.hta_kl_aot import compile_variant, resource_usage\n"
        "for storage, on_chip, block, prob_mean in (('bfloat16', True, 4096, True),\n"
        "                                           ('float32', False, 4096, False)):\n"
        "    kernel = compile_variant(storage, on_chip=on_chip, block=block, prob_mean=prob_mean)\n"
        "    print(*resource_usage(kernel))\n"
    )
    usage = parse_usage(run_compiler_script(script))
    assert len(usage) == 2 and all(0 < registers <= 255 for registers, _ in usage)
