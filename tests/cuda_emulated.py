"""The CUDA HTA-KL kernel's own source run on the CPU (tests/cuda/host's emulation of CUDA).

`build()` compiles csrc/cuda/hta_kl_cuda.cu, the per-type .cu files and tests/cuda/
hta_kl_emulated.cpp with the host C++ compiler, under AddressSanitizer and
UndefinedBehaviorSanitizer (once per source state, cached in the temporary directory);
`hta_kl_fused(...)` takes the arguments of the op htakl::hta_kl_fused and returns its
results, computed by that program. Far slower than a GPU (every CUDA thread is a fiber, and the
sanitizers check every access), so the tests give it rows of at most a few hundred thousand
classes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(REPO, "csrc", "cuda", f"hta_kl_cuda{suffix}.cu")
           for suffix in ("", "_float32", "_float64", "_float16", "_bfloat16")]
DRIVER = os.path.join(REPO, "tests", "cuda", "hta_kl_emulated.cpp")
HOST = os.path.join(REPO, "tests", "cuda", "host")
# The headers the programs include (a changed one rebuilds them).
HEADERS = [
    os.path.join(directory, name)
    for directory in (HOST, os.path.join(REPO, "csrc"), os.path.join(REPO, "csrc", "cuda"))
    for name in sorted(os.listdir(directory)) if name.endswith((".h", ".cuh"))]
# AddressSanitizer (any access past an input, output or the dynamic shared memory) and
# UndefinedBehaviorSanitizer (misaligned vector accesses, signed overflow, out-of-range shifts
# and conversions) stop the program with a report.
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
FLAGS = ["-std=c++17", "-O1", "-g", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror",
         *SANITIZERS, f"-I{HOST}", f"-I{os.path.join(REPO, 'csrc')}"]
STORAGE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def unavailable_reason() -> str | None:
    return None if shutil.which("g++") else "needs g++ to build the emulated CUDA kernel"


def build() -> str:
    """The emulated HTA-KL kernel's program (tests/cuda/hta_kl_emulated.cpp)."""
    return _build("hta_kl_emulated", tuple(SOURCES + [DRIVER]))


def build_emulation_check() -> str:
    """The emulation's own checks (tests/cuda/host/emulation_check.cpp)."""
    return _build("emulation_check", (os.path.join(HOST, "emulation_check.cpp"),))


@functools.lru_cache(maxsize=None)
def _build(name: str, sources: tuple[str, ...]) -> str:
    """A program built from `sources` (.cu files compiled as C++), again only when a file it is
    built from changed; kept in the temporary directory under the digest of those files."""
    digest = hashlib.sha256()
    for path in (*sources, *HEADERS):
        with open(path, "rb") as source:
            digest.update(path.encode() + source.read())
    digest.update(" ".join(FLAGS).encode())
    directory = os.path.join(tempfile.gettempdir(), f"htakl-cuda-emulated-{digest.hexdigest()[:16]}")
    program = os.path.join(directory, name)
    if os.path.exists(program):
        return program
    os.makedirs(directory, exist_ok=True)

    def compile_one(source: str) -> str:
        target = os.path.join(directory, f"{name}-{os.path.basename(source)}.{os.getpid()}.o")
        language = ["-x", "c++"] if source.endswith(".cu") else []
        compiled = subprocess.run(["g++", *FLAGS, *language, "-c", source, "-o", target],
                                  capture_output=True, text=True)
        if compiled.returncode != 0:
            raise RuntimeError(f"g++ failed on {source}:\n{compiled.stderr}")
        return target

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_one, sources))
    partial = f"{program}.{os.getpid()}"
    subprocess.run(["g++", *SANITIZERS, *objects, "-o", partial], check=True, capture_output=True,
                   text=True)
    os.replace(partial, program)  # atomic: a concurrent build finds a whole program or none
    return program


def hta_kl_fused(student: torch.Tensor, teacher: torch.Tensor, temperature: float, delta: float,
                 logit_mean: bool, detach_weights: bool, grad_student: bool, grad_teacher: bool,
                 row_scale: float = 1.0, *, offset: int = 0):
    """The op's (loss rows, d student, d teacher) for a `[T, R, C]` student, by the emulated CUDA
    kernel; `offset` elements before each input's data in its allocation (rows not 16-byte
    aligned when offset * element size is not a multiple of 16)."""
    steps, rows, classes = student.shape
    dtype = teacher.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    with tempfile.TemporaryDirectory() as work:
        paths = {name: os.path.join(work, name) for name in ("student", "teacher", "out")}
        for name, tensor in (("student", student), ("teacher", teacher)):
            tensor.detach().contiguous().view(torch.uint8).numpy().tofile(paths[name])
        result = subprocess.run(
            [build(), str(STORAGE[dtype]), str(steps), str(rows), str(classes), repr(temperature),
             repr(delta), str(int(logit_mean)), str(int(detach_weights)), repr(row_scale),
             str(int(grad_student)), str(int(grad_teacher)), str(offset), paths["student"],
             paths["teacher"], paths["out"]],
            capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"emulated CUDA HTA-KL failed with status {result.returncode}: "
                               f"{result.stderr.strip()}")

        def read(suffix, count, kind):
            if count == 0:
                return torch.empty(0, dtype=kind)
            data = torch.from_file(paths["out"] + suffix, size=count * kind.itemsize,
                                   dtype=torch.uint8)
            return data.view(kind).clone()

        loss = read(".loss", rows, acc)
        d_student = (read(".grad_student", student.numel(), dtype).view(student.shape)
                     if grad_student else student.new_empty(0))
        d_teacher = (read(".grad_teacher", teacher.numel(), dtype).view(teacher.shape)
                     if grad_teacher else teacher.new_empty(0))
    return loss, d_student, d_teacher
