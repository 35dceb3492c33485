"""One error raised by the CUDA binding itself, for a backtrace on a GPU machine.

    gdb -batch -ex run -ex bt --args python3 tests/cuda/binding_error_case.py

On the first H100 run a c10::Error thrown from the CUDA binding crashed the interpreter with a
segmentation fault instead of reaching Python as a RuntimeError (tests/test_hta_kl_cuda.py runs
those cases in child processes). Exits 0 when the error arrives as a RuntimeError naming the
problem, 1 when it arrives otherwise; a crash shows in the backtrace. The CPU op's identical
check runs first, so the log also tells whether throwing from this extension fails everywhere or
only in the CUDA binding.
"""

from __future__ import annotations

import faulthandler
import sys

import torch

import htakl_kernels  # registers the htakl ops
import htakl_kernels._C

faulthandler.enable()


def print_runtime_libraries() -> None:
    """The C++ runtime libraries this process loaded, and the compilers that built the extension:
    a mismatch between the extension's toolchain and torch's is the first suspect for the crash."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/" in line}
    for path in sorted(paths):
        if any(name in path for name in ("libstdc++", "libgcc_s", "libgomp", "libc10")):
            print("loaded:", path, flush=True)
    with open(htakl_kernels._C.__file__, "rb") as extension:
        data = extension.read()
    for version in sorted({part for part in data.split(b"\0") if part.startswith(b"GCC: (")}):
        print("extension built by:", version.decode(errors="replace"), flush=True)



def expect_error(device: str) -> bool:
    student = torch.randn(1, 2, 5, device=device)
    teacher = torch.randn(2, 5, device=device, dtype=torch.float64)
    try:
        torch.ops.htakl.hta_kl_fused(student, teacher, 2.0, 0.5, False, False, False, False)
    except RuntimeError as error:
        print(f"{device}: raised RuntimeError: {error}", flush=True)
        return "same dtype" in str(error)
    print(f"{device}: no error raised", flush=True)
    return False


print_runtime_libraries()
ok = expect_error("cpu")
ok = expect_error("cuda") and ok
sys.exit(0 if ok else 1)
