"""Compile the Triton HTA-KL kernel for an NVIDIA target without a GPU (aot.py), and report its
registers. Needs TRITON_INTERPRET unset:

    python -m htakl_kernels.triton_kernels.hta_kl_aot        # a table of the launch layouts

Each row reports the registers per thread and the bytes of spill per thread (cuobjdump's STACK),
which sized the default layouts and the warps per block in hta_kl.py.
"""

from __future__ import annotations

from .aot import TYPE_NAMES, compile_for_target, resource_usage
from .hta_kl import (RADIX_BITS, RADIX_BLOCK, _hta_kl_kernel, _num_warps, default_layout,
                     kernel_constants)


def compile_variant(storage: str, *, on_chip: bool, block: int, prob_mean: bool, steps_pad: int = 4,
                    arch: int = 90):
    """The kernel compiled for sm_`arch` with the launch parameters launch_hta_kl would pick for
    T steps padded to `steps_pad` (a power of two): steps_pad = 1 is T = 1, the 2-D kernel."""
    two_d = steps_pad == 1
    wide = storage == "float64"
    element = TYPE_NAMES[storage]
    accumulate = "fp64" if wide else "fp32"
    signature = {
        "student_ptr": f"*{element}", "teacher_ptr": f"*{element}", "loss_ptr": f"*{accumulate}",
        "d_student_ptr": f"*{element}", "d_teacher_ptr": f"*{element}",
        "workspace_ptr": "*i64" if wide else "*i32",
        "temperature": "fp64", "head_mass": "fp64", "row_scale_in": "fp64",
        "head_mass_fixed": "i64", "steps": "i32", "classes": "i32", "slice_stride": "i64",
    }
    constants = dict(
        PROB_MEAN=prob_mean and not two_d, TWO_D=two_d,
        STEPS_PAD=steps_pad if prob_mean and not two_d else 1, ON_CHIP=on_chip, BLOCK=block,
        RADIX_BLOCK=min(RADIX_BLOCK, block), RADIX_BUCKETS=1 << RADIX_BITS, DETACH=False,
        GRAD_S=True, GRAD_T=True, **kernel_constants(wide),
    )
    return compile_for_target(_hta_kl_kernel, signature, constants,
                              num_warps=_num_warps(block, wide), arch=arch)


def _main() -> None:
    print(f"{'storage':9} {'layout':8} {'block':>6} {'student':>9} {'warps':>5} {'regs':>5} "
          f"{'spill B':>7}")
    for storage in ("bfloat16", "float32", "float64"):
        wide = storage == "float64"
        for on_chip, block in zip((True, False), default_layout(wide)):
            for student in ("2-D", "prob_mean"):
                compiled = compile_variant(storage, on_chip=on_chip, block=block,
                                           prob_mean=student == "prob_mean",
                                           steps_pad=1 if student == "2-D" else 4)
                registers, spill = resource_usage(compiled)
                print(f"{storage:9} {'on chip' if on_chip else 'chunked':8} {block:6} "
                      f"{student:>9} {_num_warps(block, wide):5} {registers:5} {spill:7}")


if __name__ == "__main__":
    _main()
