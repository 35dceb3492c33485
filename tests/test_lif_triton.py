"""What only the Triton LIF kernels have: their compiled form for an NVIDIA GPU, checked without
one. The contract they share with the other backends (compiled on a GPU, else through the
interpreter) is tests/test_lif_contract.py."""

from __future__ import annotations

import pytest

from triton_compile import parse_usage, run_compiler_script

pytest.importorskip("triton")
pytestmark = pytest.mark.triton


def test_compiles_for_sm90_without_a_gpu():
    """The interpreter skips the compiler's frontend (a float64 division once compiled only under
    the interpreter): compile the forward and backward kernels for an H100 (sm_90) in every storage
    dtype, soft and hard reset, both surrogates, and check ptxas reports no spills."""
    script = (
        "from htakl_kernels.triton_kernels.aot import resource_usage\n"
        "from htakl_kernels.triton_kernels.lif_aot import compile_variants\n"
        "for storage in ('bfloat16', 'float16', 'float32', 'float64'):\n"
        "    for soft_reset, surrogate in ((False, 'sigmoid'), (True, 'atan')):\n"
        "        for kernel in compile_variants(storage, soft_reset=soft_reset, surrogate=surrogate):\n"
        "            print(*resource_usage(kernel))\n"
    )
    usage = parse_usage(run_compiler_script(script))
    assert len(usage) == 16
    assert all(0 < registers <= 255 and spill == 0 for registers, spill in usage), usage


def test_float32_divisions_round_to_nearest_when_compiled():
    """Spikes agree bit for bit only if H[t]'s division by tau is the IEEE one, as on the other
    backends. The interpreter divides exactly whatever the kernel asks for, so read the compiled
    PTX: no approximate float32 division may be left (Triton 3.6 ignored fdiv's ieee_rounding)."""
    script = (
        "import re\n"
        "from htakl_kernels.triton_kernels.lif_aot import compile_variants\n"
        "for soft_reset, surrogate in ((False, 'sigmoid'), (True, 'atan')):\n"
        "    for kernel in compile_variants('float32', soft_reset=soft_reset, surrogate=surrogate):\n"
        "        ptx = kernel.asm['ptx']\n"
        "        print(len(re.findall(r'div\\.rn\\.f32', ptx)),\n"
        "              len(re.findall(r'div\\.(?:full|approx)[.a-z]*\\.f32', ptx)))\n"
    )
    counts = parse_usage(run_compiler_script(script))
    assert len(counts) == 4
    assert all(exact > 0 and approximate == 0 for exact, approximate in counts), counts
