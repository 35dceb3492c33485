"""Compile a Triton kernel for an NVIDIA target without a GPU, and read its resource usage.

Triton's interpreter (the CPU test vehicle) does not run the compiler's frontend, so errors that
only the compiled path raises (a non-constexpr global, a loop-carried value changing type, an
unsupported construct) pass the interpreter tests. compile_for_target compiles the real kernel to a
cubin with Triton's bundled ptxas instead. It needs TRITON_INTERPRET unset: under the interpreter
triton.jit returns no compilable kernel. hta_kl_aot.py and lif_aot.py hold each kernel's signature.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Triton's names of the storage dtypes, as signatures spell them ("*fp32" is a float32 pointer).
TYPE_NAMES = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16"}

# The target of these compile checks: Hopper (sm_90), the card the kernels are tuned and measured
# on. It is no build flag: at run time Triton compiles for the device at hand, and the C++
# extension's architectures are scripts/gpu_flags.py's.
AOT_ARCH = 90


def compile_for_target(kernel, signature: dict[str, str], constants: dict, *, num_warps: int,
                       arch: int = AOT_ARCH, aligned_pointers: bool = False,
                       multiples_of_16: tuple[str, ...] = ()):
    """`kernel` (a triton.jit function) compiled for sm_`arch`. `signature` maps each runtime
    argument to its Triton type ("*fp32", "i64", ...); `constants` gives every constexpr.
    `aligned_pointers`: every pointer argument 16-byte aligned, as Triton specialises a launch
    on the tensors PyTorch allocates (else no alignment is assumed). `multiples_of_16`: integer
    arguments specialised as multiples of 16, as Triton specialises a launch whose value is."""
    signature = {**signature, **{name: "constexpr" for name in constants}}
    names = kernel.arg_names
    missing = set(names) - set(signature)
    if missing:
        raise ValueError(f"compile_for_target: no type for {sorted(missing)}")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, kind in signature.items()
             if (aligned_pointers and kind.startswith("*")) or n in multiples_of_16}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(n),): v for n, v in constants.items()},
                       attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def resource_usage(compiled) -> tuple[int, int]:
    """(registers per thread, spill bytes per thread) of a compiled kernel, from cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True,
                                check=True).stdout
    return int(re.search(r"REG:(\d+)", report).group(1)), int(re.search(r"STACK:(\d+)", report).group(1))
