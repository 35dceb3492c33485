"""The CUDA kernels' own source run on the CPU (tests/cuda/host's emulation of CUDA).

`build()` compiles csrc/cuda/hta_kl_cuda.cu, the per-type .cu files and tests/cuda/
hta_kl_emulated.cpp with the host C++ compiler, under AddressSanitizer and
UndefinedBehaviorSanitizer (once per source state, cached in the temporary directory);
`hta_kl_fused(...)` takes the arguments of the op htakl::hta_kl_fused and returns its
results, computed by that program. `build_lif()`, `lif_forward(...)` and `lif_backward(...)`
do the same for the LIF kernels (lif_cuda*.cu, tests/cuda/lif_emulated.cpp). Far slower than a GPU (every CUDA thread is a fiber, and the
sanitizers check every access), so the tests give it rows of at most a few hundred thousand
classes.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = os.path.join(REPO, "csrc", "cuda")
PROGRAMS = os.path.join(REPO, "tests", "cuda")
TYPES = ("float32", "float64", "float16", "bfloat16")
HTA_KL_SOURCES = [os.path.join(CUDA_SOURCES, "hta_kl_cuda.cu"),
                  *(os.path.join(CUDA_SOURCES, f"hta_kl_cuda_{type_}.cu") for type_ in TYPES),
                  os.path.join(PROGRAMS, "hta_kl_emulated.cpp")]
LIF_SOURCES = [os.path.join(CUDA_SOURCES, "lif_cuda.cu"),
               *(os.path.join(CUDA_SOURCES, f"lif_cuda_{type_}{part}.cu")
                 for type_ in TYPES for part in ("", "_long")),
               os.path.join(PROGRAMS, "lif_emulated.cpp")]
HOST = os.path.join(PROGRAMS, "host")
# The headers the programs include (a changed one rebuilds them).
HEADERS = [
    os.path.join(directory, name)
    for directory in (HOST, os.path.join(REPO, "csrc"), CUDA_SOURCES)
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
    return _build("hta_kl_emulated", tuple(HTA_KL_SOURCES))


def build_lif() -> str:
    """The emulated LIF kernels' program (tests/cuda/lif_emulated.cpp)."""
    return _build("lif_emulated", tuple(LIF_SOURCES))


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
        _write(work, student=student, teacher=teacher)
        result = subprocess.run(
            [build(), str(STORAGE[dtype]), str(steps), str(rows), str(classes), repr(temperature),
             repr(delta), str(int(logit_mean)), str(int(detach_weights)), repr(row_scale),
             str(int(grad_student)), str(int(grad_teacher)), str(offset), paths["student"],
             paths["teacher"], paths["out"]],
            capture_output=True, text=True, timeout=600)
        _check(result, "HTA-KL")
        loss = _read(paths["out"] + ".loss", (rows,), acc)
        d_student = (_read(paths["out"] + ".grad_student", student.shape, dtype)
                     if grad_student else student.new_empty(0))
        d_teacher = (_read(paths["out"] + ".grad_teacher", teacher.shape, dtype)
                     if grad_teacher else teacher.new_empty(0))
    return loss, d_student, d_teacher


def lif_forward(x: torch.Tensor, v_init: torch.Tensor, tau: float, v_threshold: float,
                v_reset: float, soft_reset: bool, decay_input: bool, detach_reset: bool,
                surrogate: str, alpha: float, return_v_seq: bool, *, offset: int = 0):
    """The op htakl::lif_forward's (spikes, v_last, v_seq) by the emulated CUDA kernels; `offset`
    as for hta_kl_fused."""
    with tempfile.TemporaryDirectory() as work:
        _write(work, x=x, v_init=v_init)
        if return_v_seq:
            open(os.path.join(work, "want_v_seq"), "w").close()
        _check(_run_lif(work, "forward", x, v_init, tau, v_threshold, v_reset, soft_reset,
                        decay_input, detach_reset, surrogate, alpha, offset), "LIF forward")
        spikes = _read(os.path.join(work, "spikes"), x.shape, x.dtype)
        v_last = _read(os.path.join(work, "v_last"), v_init.shape, x.dtype)
        v_seq = (_read(os.path.join(work, "v_seq"), x.shape, x.dtype) if return_v_seq
                 else x.new_empty(0))
    return spikes, v_last, v_seq


def lif_backward(grad_spikes: torch.Tensor, grad_v_last: torch.Tensor, grad_v_seq: torch.Tensor,
                 x: torch.Tensor, v_init: torch.Tensor, tau: float, v_threshold: float,
                 v_reset: float, soft_reset: bool, decay_input: bool, detach_reset: bool,
                 surrogate: str, alpha: float, *, offset: int = 0):
    """The op htakl::lif_backward's (grad_x, grad_v_init) by the emulated CUDA kernels (an empty
    gradient is a zero one, as the op takes it)."""
    with tempfile.TemporaryDirectory() as work:
        given = {name: grad for name, grad in (("grad_spikes", grad_spikes),
                                               ("grad_v_last", grad_v_last),
                                               ("grad_v_seq", grad_v_seq)) if grad.numel()}
        _write(work, x=x, v_init=v_init, **given)
        _check(_run_lif(work, "backward", x, v_init, tau, v_threshold, v_reset, soft_reset,
                        decay_input, detach_reset, surrogate, alpha, offset), "LIF backward")
        return (_read(os.path.join(work, "grad_x"), x.shape, x.dtype),
                _read(os.path.join(work, "grad_v_init"), v_init.shape, x.dtype))


def _run_lif(work, pass_, x, v_init, tau, v_threshold, v_reset, soft_reset, decay_input,
             detach_reset, surrogate, alpha, offset):
    steps = x.shape[0]
    neurons = v_init.numel()
    return subprocess.run(
        [build_lif(), str(STORAGE[x.dtype]), pass_, str(steps), str(neurons), repr(tau),
         repr(v_threshold), repr(v_reset), str(int(soft_reset)), str(int(decay_input)),
         str(int(detach_reset)), surrogate, repr(alpha), str(offset),
         work], capture_output=True, text=True, timeout=600)


def _write(directory: str, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        tensor.detach().contiguous().view(torch.uint8).numpy().tofile(
            os.path.join(directory, name))


def _read(path: str, shape, dtype: torch.dtype) -> torch.Tensor:
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    data = torch.from_file(path, size=count * dtype.itemsize, dtype=torch.uint8)
    return data.view(dtype).view(shape).clone()


def _check(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"emulated CUDA {what} failed with status {result.returncode}: "
                           f"{result.stderr.strip()}")
