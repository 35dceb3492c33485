"""Compile the GPU kernels for sm_90 as the build compiles them, cached by source hash.

CUDA: nvcc with scripts/gpu_flags.py's flags (the one definition the real build uses), from the
source tree given (the current checkout by default, read afresh on every run). Triton: the AOT
path of triton_kernels/aot.py in a subprocess (census/_triton_worker.py), which imports the given
tree's kernels under the package name they are installed as. Cubins are cached under
runs/census-cache/ (ignored by git) by a hash of every input file, the flags and the tool versions.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(REPO, "runs", "census-cache")
ARCH = "90"


def _gpu_flags():
    """scripts/gpu_flags.py of this checkout (the flags the census must share with the build)."""
    spec = importlib.util.spec_from_file_location("htakl_gpu_flags",
                                                  os.path.join(REPO, "scripts", "gpu_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nvcc_command(source: str, output: str, include: str) -> list[str]:
    flags = _gpu_flags().nvcc_flags((ARCH,), with_torch_defines=True)
    return ["nvcc", *flags, f"-I{include}", "-cubin", "-o", output, source]


def _digest(paths: list[str], *extra: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.encode())
        with open(path, "rb") as handle:
            digest.update(handle.read())
    for item in extra:
        digest.update(item.encode())
    return digest.hexdigest()[:20]


def _tool_version(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True).stdout
    except FileNotFoundError:
        return ""


def cuda_cubin(source_root: str, kernel_file: str) -> str:
    """Path of the sm_90 cubin of csrc/cuda/<kernel_file> in `source_root`, compiled if needed."""
    source = os.path.join(source_root, "csrc", "cuda", kernel_file)
    inputs = [source] + glob.glob(os.path.join(source_root, "csrc", "*.h")) + glob.glob(
        os.path.join(source_root, "csrc", "cuda", "*.h")) + glob.glob(
        os.path.join(source_root, "csrc", "cuda", "*.cuh"))
    command = nvcc_command(source, "OUT", os.path.join(source_root, "csrc"))
    key = _digest(inputs, " ".join(command), _tool_version(["nvcc", "--version"]))
    output = os.path.join(CACHE, f"{os.path.splitext(kernel_file)[0]}-{key}.cubin")
    if not os.path.exists(output):
        os.makedirs(CACHE, exist_ok=True)
        partial = output + f".{os.getpid()}.tmp"
        result = subprocess.run(nvcc_command(source, partial, os.path.join(source_root, "csrc")),
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source}:\n{result.stderr}")
        os.replace(partial, output)
    return output


def cuda_kernel_cubins(source_root: str, family: str, dtypes) -> tuple[str, list[str]]:
    """(the file holding the CUDA kernels of `family` ("lif" or "hta_kl") in `source_root`, the
    sm_90 cubins of their storage types `dtypes`): the kernels live in
    csrc/cuda/<family>_cuda_kernels.cuh and compile from <family>_cuda_<dtype>*.cu (one or two
    files per storage type); in trees before that split, <family>_cuda.cu holds and compiles them all."""
    folder = os.path.join(source_root, "csrc", "cuda")
    header = os.path.join(folder, f"{family}_cuda_kernels.cuh")
    if os.path.exists(header):
        # lif_cuda_<dtype>_long.cu holds a type's long-segment backward
        return header, [cuda_cubin(source_root, os.path.basename(path)) for dtype in dtypes
                        for path in sorted(glob.glob(os.path.join(folder, f"{family}_cuda_{dtype}*.cu")))]
    return os.path.join(folder, f"{family}_cuda.cu"), [cuda_cubin(source_root, f"{family}_cuda.cu")]


def harness_at(revision: str) -> str:
    """A folder holding the Triton AOT harness (triton_kernels/*aot.py) as of `revision`: the
    harness follows the kernels' signatures, so an older tree compiles with the harness of its
    time."""
    listing = subprocess.run(["git", "ls-tree", "--name-only", revision, "triton_kernels/"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    folder = os.path.join(CACHE, f"harness-{revision}")
    os.makedirs(folder, exist_ok=True)
    for name in listing:
        if name.endswith("aot.py"):
            text = subprocess.run(["git", "show", f"{revision}:{name}"], cwd=REPO,
                                  capture_output=True, text=True, check=True).stdout
            with open(os.path.join(folder, os.path.basename(name)), "w") as handle:
                handle.write(text)
    return folder


def triton_cubins(source_root: str, family: str, harness: str | None = None) -> dict:
    """{variant name: {"cubin": path, "num_warps": .., "shared": .., ...}} of the Triton
    kernels of `family` ("lif" or "hta_kl") in `source_root`, compiled for sm_90 if needed
    through the AOT harness in folder `harness` (default: the tree's own triton_kernels when it
    has one, else this checkout's)."""
    import triton

    own = os.path.join(source_root, "triton_kernels")
    if harness is None:
        harness = own if glob.glob(os.path.join(own, "*_aot.py")) else os.path.join(
            REPO, "triton_kernels")
    inputs = glob.glob(os.path.join(source_root, "triton_kernels", "*.py")) + glob.glob(
        os.path.join(harness, "*aot.py")) + [
        os.path.join(REPO, "bench", "census", "_triton_worker.py")]
    key = _digest(inputs, family, triton.__version__)
    folder = os.path.join(CACHE, f"triton-{family}-{key}")
    index = os.path.join(folder, "index.json")
    if not os.path.exists(index):
        partial = f"{folder}.{os.getpid()}.tmp"
        os.makedirs(partial, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        result = subprocess.run(
            [sys.executable, "-m", "bench.census._triton_worker", "--source", source_root,
             "--family", family, "--out", partial, "--harness", harness], cwd=REPO, env=env, capture_output=True,
            text=True)
        if result.returncode != 0:
            raise RuntimeError(f"Triton AOT compile of {family} failed:\n{result.stderr[-4000:]}")
        with open(os.path.join(partial, "index.json")) as handle:
            entries = json.load(handle)
        for entry in entries.values():  # the cubins' final place
            entry["cubin"] = os.path.join(folder, os.path.basename(entry["cubin"]))
        with open(os.path.join(partial, "index.json"), "w") as handle:
            json.dump(entries, handle, indent=1)
        try:
            os.replace(partial, folder)
        except OSError:
            if not os.path.exists(index):
                raise
            shutil.rmtree(partial)  # another run compiled the same sources meanwhile
    with open(index) as handle:
        return json.load(handle)
