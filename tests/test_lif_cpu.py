"""What only the C++ CPU LIF kernel has: its copy for the baseline instruction set. The contract it
shares with the other backends (run on the copy the CPU picks) is tests/test_lif_contract.py."""

from __future__ import annotations

import pytest
import torch

from htakl_kernels._backends import unavailable_reason

from lif_cases import SURROGATES, check_full_matrix

pytestmark = pytest.mark.skipif(unavailable_reason("cpu", "cpu") is not None,
                                reason=str(unavailable_reason("cpu", "cpu")))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("decay_input", [False, True])
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_baseline_instruction_set_full_matrix(dtype, detach_reset, decay_input, surrogate,
                                              monkeypatch):
    # The kernels are compiled for the baseline instruction set and for AVX2 + FMA, each once per
    # combination of option flags; HTAKL_CPU_ISA=baseline picks the baseline copy. (Where the CPU
    # lacks AVX2 both runs take the baseline copy.)
    monkeypatch.setenv("HTAKL_CPU_ISA", "baseline")
    check_full_matrix("cpu", dtype, detach_reset, decay_input, surrogate)
