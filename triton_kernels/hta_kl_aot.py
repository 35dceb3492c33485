"""Compile the Triton HTA-KL kernel for an NVIDIA target without a GPU (aot.py), and report its
registers. Needs TRITON_INTERPRET unset:

    python -m htakl_kernels.triton_kernels.hta_kl_aot        # a table of the launch layouts

Each row reports the registers per thread and the bytes of spill per thread (cuobjdump's STACK),
which sized the default layouts and the warps per block in hta_kl.py.
"""

from __future__ import annotations

from .aot import AOT_ARCH, TYPE_NAMES, compile_for_target, resource_usage
from .hta_kl import (RADIX_BITS, RADIX_BLOCK, _hta_kl_kernel, _hta_kl_split_kernel, _num_warps,
                     default_layout, kernel_constants, row_alignment)

# The split kernel's phases (hta_kl.py, _hta_kl_split_kernel).
SPLIT_PHASES = (1, 2, 3, 4, 5, 6)


def _signature(storage: str, split: bool) -> dict[str, str]:
    wide = storage == "float64"
    element = TYPE_NAMES[storage]
    accumulate = "fp64" if wide else "fp32"
    key = "*i64" if wide else "*i32"
    pointers = {
        "student_ptr": f"*{element}", "teacher_ptr": f"*{element}", "loss_ptr": f"*{accumulate}",
        "d_student_ptr": f"*{element}", "d_teacher_ptr": f"*{element}",
    }
    if split:
        pointers.update(normalisers_ptr=f"*{accumulate}", histograms_ptr=key, candidates_ptr=key,
                        selection_ptr=key, sums_ptr=f"*{accumulate}")
    else:
        pointers.update(workspace_ptr=key)
    scalars = {
        "temperature": "fp64", "head_mass": "fp64", "row_scale_in": "fp64",
        "head_mass_fixed": "i64", "steps": "i32", "classes": "i32", "slice_stride": "i64",
    }
    if split:
        scalars.update(segments="i32", segment_length="i32")
    return {**pointers, **scalars}


def _constants(storage: str, block: int, prob_mean: bool, steps_pad: int, classes: int) -> dict:
    """The constexprs launch_hta_kl passes for T steps padded to `steps_pad` (1: T = 1, the 2-D
    kernel) and rows of `classes`."""
    two_d = steps_pad == 1
    return dict(
        PROB_MEAN=prob_mean and not two_d, TWO_D=two_d,
        STEPS_PAD=steps_pad if prob_mean and not two_d else 1, BLOCK=block,
        RADIX_BLOCK=min(RADIX_BLOCK, block), RADIX_BUCKETS=1 << RADIX_BITS, DETACH=False,
        GRAD_S=True, GRAD_T=True, ALIGN=row_alignment(classes),
        **kernel_constants(storage == "float64"),
    )


def compile_variant(storage: str, *, on_chip: bool, block: int, prob_mean: bool, steps_pad: int = 4,
                    classes: int | None = None, arch: int = AOT_ARCH):
    """The one-program-per-row kernel compiled for sm_`arch` with the launch parameters
    launch_hta_kl would pick for T steps padded to `steps_pad` (a power of two; steps_pad = 1 is
    T = 1, the 2-D kernel) and rows of `classes` (default: `block`, a multiple of 16), from
    tensors PyTorch allocated (16-byte aligned)."""
    constants = _constants(storage, block, prob_mean, steps_pad,
                           block if classes is None else classes)
    return compile_for_target(
        _hta_kl_kernel, _signature(storage, split=False), dict(ON_CHIP=on_chip, **constants),
        num_warps=_num_warps(block, storage == "float64"), arch=arch, aligned_pointers=True)


def compile_split_variant(storage: str, *, phase: int, block: int, prob_mean: bool,
                          steps_pad: int = 4, classes: int | None = None, arch: int = AOT_ARCH):
    """One phase of the split kernel (rows over several programs), as compile_variant."""
    constants = _constants(storage, block, prob_mean, steps_pad,
                           block if classes is None else classes)
    return compile_for_target(
        _hta_kl_split_kernel, _signature(storage, split=True), dict(PHASE=phase, **constants),
        num_warps=_num_warps(block, storage == "float64"), arch=arch, aligned_pointers=True)


def _main() -> None:
    print(f"{'storage':9} {'layout':10} {'block':>6} {'student':>9} {'warps':>5} {'regs':>5} "
          f"{'spill B':>7}")

    def report(storage, layout, block, student, compiled):
        registers, spill = resource_usage(compiled)
        warps = _num_warps(block, storage == "float64")
        print(f"{storage:9} {layout:10} {block:6} {student:>9} {warps:5} {registers:5} "
              f"{spill:7}")

    for storage in ("bfloat16", "float32", "float64"):
        on_chip_limit, chunk = default_layout(storage == "float64")
        for student, prob_mean, steps_pad in (("2-D", False, 1), ("prob_mean", True, 4)):
            for on_chip, block in ((True, on_chip_limit), (False, chunk)):
                report(storage, "on chip" if on_chip else "chunked", block, student,
                       compile_variant(storage, on_chip=on_chip, block=block,
                                       prob_mean=prob_mean, steps_pad=steps_pad))
            for phase in SPLIT_PHASES:
                report(storage, f"split {phase}", chunk, student,
                       compile_split_variant(storage, phase=phase, block=chunk,
                                             prob_mean=prob_mean, steps_pad=steps_pad))


if __name__ == "__main__":
    _main()
