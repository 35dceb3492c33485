"""The extension's argument errors, one of each kind of message, on CPU and then on CUDA tensors:
which kinds reach Python as a RuntimeError and which crash the process.

    python3 tests/cuda/binding_error_case.py
    gdb -batch -ex run -ex bt --args python3 tests/cuda/binding_error_case.py

On an H200 build (torch 2.11, the image's newer GCC) the CUDA binding's messages that streamed an
integer, a double or a shape into TORCH_CHECK killed the process with SIGSEGV, while the one that
streamed only strings and a dtype raised. The checks now format numbers and shapes themselves
(csrc/check_text.h) and hand TORCH_CHECK strings. The kinds:

    literal  a message of string literals only (no stream at all: c10 passes it through)
    dtype    string literals and two dtypes (c10 prints a ScalarType as a string)
    integer  an integer, formatted by check_text.h (on CUDA: the kernel's limit on T; on CPU,
             where T has no limit: the slice histogram's digit)
    double   a double, formatted by check_text.h (row_scale)
    sizes    two shapes, formatted by check_text.h (student against teacher)
    torch    torch's own shape error, formatted inside libtorch (a control: not our code)

Each device's kinds run in a child process, in that order; a child that dies is restarted on the
kinds after the one it died in, so one run names every kind that crashes and its signal. Then the
first crashing case, if any, runs once more in this process, for gdb's backtrace and
faulthandler's. Exits 0 when every kind raised a RuntimeError naming the problem.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys

# Run as a file from the repository root, this directory is sys.path[0]: the in-place build
# (bench/gpu_check.sh) is imported from the root.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import htakl_kernels  # noqa: E402,F401  (registers the htakl ops)

faulthandler.enable()

DEVICES = ("cpu", "cuda")
KINDS = ("literal", "dtype", "integer", "double", "sizes", "torch")
# What each kind's message must contain.
EXPECTED = {
    "literal": "hta_kl_fused: C must be >= 1",
    "dtype": "must have the same dtype, got Float and Double",
    "integer": {"cpu": "the digit (shift 30, width 4) must lie within the 31 key bits",
                "cuda": "time dimension T = 100000 exceeds"},
    "double": "row_scale must be finite and > 0, got 0",
    "sizes": "student [1, 2, 5] does not match teacher [3, 5]",
    "torch": "must match the size of tensor b (4)",
}


def fused(student, teacher, row_scale=1.0, grad_student=False):
    torch.ops.htakl.hta_kl_fused(student, teacher, 2.0, 0.5, False, False, grad_student, False,
                                 row_scale)


def raise_kind(kind: str, device: str) -> None:
    """Calls the op with the bad argument of `kind`; returns only if nothing raised."""
    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, dtype=dtype)

    if kind == "literal":
        fused(randn(1, 2, 0), randn(2, 0))
    elif kind == "dtype":
        fused(randn(1, 2, 5), randn(2, 5, dtype=torch.float64))
    elif kind == "integer" and device == "cuda":
        fused(randn(100000, 1, 2, dtype=torch.float64), randn(1, 2, dtype=torch.float64),
              grad_student=True)
    elif kind == "integer":
        torch.ops.htakl.hta_kl_slice_histogram(randn(2, 5), torch.zeros(2, dtype=torch.int64),
                                               30, 4)
    elif kind == "double":
        fused(randn(1, 2, 5), randn(2, 5), row_scale=0.0)
    elif kind == "sizes":
        fused(randn(1, 2, 5), randn(3, 5))
    elif kind == "torch":
        randn(2, 3) + randn(4)
    else:
        raise ValueError(f"unknown kind {kind!r}")


def expected_text(kind: str, device: str) -> str:
    expected = EXPECTED[kind]
    return expected[device] if isinstance(expected, dict) else expected


def run_case(kind: str, device: str) -> str:
    """'raised', 'raised other text' or 'no error', with the message."""
    try:
        raise_kind(kind, device)
    except RuntimeError as error:
        message = str(error).splitlines()[0]
        verdict = "raised" if expected_text(kind, device) in message else "raised other text"
        return f"{verdict}: {message}"
    return "no error"


def run_child(device: str, kinds: list[str]) -> None:
    """In a child: each kind in turn, announced before it runs, so a crash names its kind."""
    for kind in kinds:
        print(f"START {kind}", flush=True)
        print(f"RESULT {kind} {run_case(kind, device)}", flush=True)


def crash_text(returncode: int) -> str:
    if returncode < 0:
        return f"crashed: killed by {signal.Signals(-returncode).name} ({returncode})"
    return f"crashed: exited with status {returncode}"


def run_device(device: str) -> dict[str, str]:
    """Every kind on `device`, each child restarted after the kind it died in."""
    results: dict[str, str] = {}
    remaining = list(KINDS)
    while remaining:
        child = subprocess.run([sys.executable, __file__, "--child", device, *remaining],
                               capture_output=True, text=True, timeout=300)
        started = None
        for line in child.stdout.splitlines():
            if line.startswith("START "):
                started = line.split()[1]
            elif line.startswith("RESULT "):
                _, kind, result = line.split(" ", 2)
                results[kind] = result
        done = [kind for kind in remaining if kind in results]
        if child.returncode == 0 or started is None or started in results:
            # Every kind ran, or the child died outside a case (on import, on exit).
            for kind in remaining:
                if kind not in results:
                    results[kind] = crash_text(child.returncode) + " outside a case"
            break
        # The runtime's first words on stderr: "Fatal Python error: Segmentation fault" from
        # faulthandler, or "terminate called after throwing ..." where the C++ runtime gave up.
        said = child.stderr.strip().splitlines()
        results[started] = crash_text(child.returncode) + (f" | stderr: {said[0]}" if said else "")
        remaining = [kind for kind in remaining if kind not in done and kind != started]
    return results


def print_runtime_libraries() -> None:
    """The C++ runtime libraries this process loaded, and the compilers that built the extension:
    a mismatch between the extension's toolchain and torch's is the first suspect for a crash."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/" in line}
    for path in sorted(paths):
        if any(name in path for name in ("libstdc++", "libgcc_s", "libgomp", "libc10")):
            print("loaded:", path, flush=True)
    import htakl_kernels._C

    with open(htakl_kernels._C.__file__, "rb") as extension:
        data = extension.read()
    for version in sorted({part for part in data.split(b"\0") if part.startswith(b"GCC: (")}):
        print("extension built by:", version.decode(errors="replace"), flush=True)


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        run_child(sys.argv[2], sys.argv[3:])
        return 0
    print_runtime_libraries()
    devices = DEVICES if torch.cuda.is_available() else ("cpu",)
    if "cuda" not in devices:
        print("cuda: not available, CPU only", flush=True)
    crashes = []
    ok = True
    for device in devices:
        results = run_device(device)
        for kind in KINDS:
            result = results[kind]
            print(f"{device:4} {kind:8} {result}", flush=True)
            ok = ok and result.startswith("raised:")
            if result.startswith("crashed"):
                crashes.append((kind, device))
    if crashes:
        crashed = {kind for kind, _ in crashes}
        survived = [kind for kind in KINDS if kind not in crashed]
        print(f"crashed: {sorted(crashed)}; raised everywhere: {survived}", flush=True)
        kind, device = crashes[0]
        print(f"rerunning {kind} on {device} in this process, for a backtrace", flush=True)
        print(run_case(kind, device), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
