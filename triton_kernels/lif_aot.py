"""Compile the Triton LIF kernels for an NVIDIA target without a GPU (aot.py), and report their
registers. Needs TRITON_INTERPRET unset:

    python -m htakl_kernels.triton_kernels.lif_aot
"""

from __future__ import annotations

import torch

from .aot import AOT_ARCH, TYPE_NAMES, compile_for_target, resource_usage
from .common import tl_accumulation_dtype
from .lif import (NUM_WARPS, SEGMENTS, SURROGATE_IDS, _lif_backward_kernel, _lif_forward_kernel,
                  block_of)


def compile_variants(storage: str, *, soft_reset: bool = False, decay_input: bool = True,
                     detach_reset: bool = False, surrogate: str = "sigmoid",
                     segment: int = SEGMENTS[-1], arch: int = AOT_ARCH):
    """(forward, backward) compiled for sm_`arch` as the ops launch them for `storage`, with every
    optional tensor present (the membrane sequence stored, every gradient given), on aligned
    tensors of a neuron count that is a multiple of 16 (the vectorized variant); the backward
    holds H of `segment` steps (lif.SEGMENTS; the longest by default, the most registers)."""
    element = TYPE_NAMES[storage]
    wide = storage == "float64"
    state = "fp64" if wide else "fp32"
    options = {"tau_in": "fp64", "v_threshold_in": "fp64", "v_reset_in": "fp64",
               "steps": "i32", "neurons": "i32"}
    common = dict(ACC=tl_accumulation_dtype(getattr(torch, storage)), SOFT_RESET=soft_reset,
                  DECAY_INPUT=decay_input, BLOCK=block_of(getattr(torch, storage)))
    aligned = dict(aligned_pointers=True, multiples_of_16=("neurons",))
    forward = compile_for_target(
        _lif_forward_kernel,
        {**{name: f"*{element}" for name in ("x_ptr", "v_init_ptr", "spikes_ptr", "v_last_ptr",
                                              "v_seq_ptr")}, **options},
        {**common, "STORE_V_SEQ": True}, num_warps=NUM_WARPS, arch=arch, **aligned)
    backward = compile_for_target(
        _lif_backward_kernel,
        {**{name: f"*{element}" for name in ("grad_spikes_ptr", "grad_v_last_ptr",
                                              "grad_v_seq_ptr", "x_ptr", "v_init_ptr",
                                              "grad_x_ptr", "grad_v_init_ptr")},
         "checkpoint_ptr": f"*{state}", "alpha_in": "fp64", "half_pi_in": "fp64", **options},
        {**common, "DETACH_RESET": detach_reset,
         "SURROGATE": SURROGATE_IDS[surrogate], "HAS_GRAD_SPIKES": True,
         "HAS_GRAD_V_LAST": True, "HAS_GRAD_V_SEQ": True, "SEGMENT": segment},
        num_warps=NUM_WARPS, arch=arch, **aligned)
    return forward, backward


def _main() -> None:
    print(f"{'storage':9} {'kernel':9} {'segment':>7} {'regs':>5} {'spill B':>7}")
    for storage in ("bfloat16", "float16", "float32", "float64"):
        for segment in SEGMENTS:
            forward, backward = compile_variants(storage, segment=segment)
            kernels = [("backward", backward)] if segment != SEGMENTS[0] else [
                ("forward", forward), ("backward", backward)]
            for name, compiled in kernels:
                registers, spill = resource_usage(compiled)
                shown = segment if name == "backward" else ""
                print(f"{storage:9} {name:9} {shown:>7} {registers:5} {spill:7}")


if __name__ == "__main__":
    _main()
