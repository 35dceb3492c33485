"""Compile the Triton HTA-KL kernel for an NVIDIA target without a GPU, and report its registers.

Triton's interpreter (the CPU test vehicle) does not run the compiler's frontend, so errors that
only the compiled path raises (a non-constexpr global, a loop-carried value changing type) pass the
interpreter tests; this compiles the real kernel to a cubin with Triton's bundled ptxas instead.
It needs TRITON_INTERPRET unset (under the interpreter triton.jit returns no compilable kernel):

    python -m htakl_kernels.triton_kernels.hta_kl_aot        # a table of the launch layouts

Each row reports the registers per thread and the bytes of spill per thread (cuobjdump's STACK),
which sized the default layouts and the warps per block in hta_kl.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .hta_kl import RADIX_BITS, RADIX_BLOCK, _hta_kl_kernel, _num_warps, default_layout

_POINTER_TYPES = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16"}


def compile_variant(storage: str, *, on_chip: bool, block: int, prob_mean: bool, steps_pad: int = 4,
                    arch: int = 90):
    """The kernel compiled for sm_`arch` with the launch parameters launch_hta_kl would pick."""
    wide = storage == "float64"
    element = _POINTER_TYPES[storage]
    accumulate = "fp64" if wide else "fp32"
    signature = {
        "student_ptr": f"*{element}", "teacher_ptr": f"*{element}", "loss_ptr": f"*{accumulate}",
        "d_student_ptr": f"*{element}", "d_teacher_ptr": f"*{element}",
        "temperature": "fp64", "head_mass": "fp64",
        "steps": "i32", "classes": "i32", "slice_stride": "i64",
    }
    constants = dict(
        PROB_MEAN=prob_mean, STEPS_PAD=steps_pad if prob_mean else 1, ON_CHIP=on_chip, BLOCK=block,
        RADIX_BLOCK=min(RADIX_BLOCK, block), RADIX_BITS=RADIX_BITS, DETACH=False, GRAD_S=True,
        GRAD_T=True, ACC=tl.float64 if wide else tl.float32, BITS=tl.int64 if wide else tl.int32,
        TOP_BIT=61 if wide else 29,
    )
    signature.update({name: "constexpr" for name in constants})
    names = _hta_kl_kernel.arg_names
    source = ASTSource(fn=_hta_kl_kernel, signature=signature,
                       constexprs={(names.index(n),): v for n, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": _num_warps(block, wide)})


def resource_usage(compiled) -> tuple[int, int]:
    """(registers per thread, spill bytes per thread) of a compiled kernel, from cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True,
                                check=True).stdout
    return int(re.search(r"REG:(\d+)", report).group(1)), int(re.search(r"STACK:(\d+)", report).group(1))


def _main() -> None:
    print(f"{'storage':9} {'layout':8} {'block':>6} {'prob_mean':>9} {'warps':>5} {'regs':>5} "
          f"{'spill B':>7}")
    for storage in ("bfloat16", "float32", "float64"):
        wide = storage == "float64"
        for on_chip, block in zip((True, False), default_layout(wide)):
            for prob_mean in (False, True):
                compiled = compile_variant(storage, on_chip=on_chip, block=block,
                                           prob_mean=prob_mean)
                registers, spill = resource_usage(compiled)
                print(f"{storage:9} {'on chip' if on_chip else 'chunked':8} {block:6} "
                      f"{prob_mean!s:>9} {_num_warps(block, wide):5} {registers:5} {spill:7}")


if __name__ == "__main__":
    _main()
