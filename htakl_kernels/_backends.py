"""The backend table: for each backend, its kernels, where they run, and the automatic order.

Adding a backend is one `Backend` entry here (and its name in `_AUTO_ORDER` if `backend="auto"`
should pick it); the op glue (`_ops/`) and the public API take everything from this table.
The reference backend has no kernels: the public functions call `htakl_kernels.reference`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ._library import EXTENSION, EXTENSION_ERROR, extension_built_with_cuda

BACKEND_ENV = "HTAKL_BACKEND"


class KernelOps(NamedTuple):
    """One backend's implementations of the ops in `_library` (same schemas)."""

    hta_kl_fused: object
    lif_forward: object
    lif_backward: object


@dataclass(frozen=True)
class Backend:
    name: str
    # device type -> None if the backend runs on tensors of that device type here, else what is
    # missing and how to get it
    unavailable_reason: Callable[[str], str | None]
    # imports the kernels (lazily: importing Triton costs seconds); None for the reference
    load_ops: Callable[[], KernelOps] | None
    # the vocab-parallel HTA-KL's phase ops (_ops/hta_kl_phases.py); None: the PyTorch-op phases
    load_phases: Callable[[], object] | None = None


def _always_available(_device_type: str) -> None:
    return None


def _extension_missing() -> str | None:
    if EXTENSION is None:
        return (
            f"the C++ extension htakl_kernels._C is not built ({EXTENSION_ERROR}); build it with "
            f"`pip install --no-build-isolation -e .` from the repository root"
        )
    return None


def _cpu_unavailable(device_type: str) -> str | None:
    if device_type != "cpu":
        return f"backend 'cpu' runs on CPU tensors, got {device_type}"
    return _extension_missing()


def _cuda_unavailable(device_type: str) -> str | None:
    if device_type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, got {device_type}"
    missing = _extension_missing()
    if missing is None and not extension_built_with_cuda():
        return (
            "htakl_kernels._C was built without CUDA; rebuild on a machine with nvcc and a CUDA "
            "build of torch (and HTAKL_NO_CUDA unset)"
        )
    return missing


# Looked up once: torch.compile cannot trace importlib, and resolve_backend runs in traced code.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_unavailable(device_type: str) -> str | None:
    if not _TRITON_INSTALLED:
        return "Triton is not installed (pip install triton)"
    if device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"Triton kernels run on CUDA tensors, or on CPU tensors only under Triton's interpreter "
        f"(set TRITON_INTERPRET=1 before importing triton); got tensors on {device_type}"
    )


# Importing a kernel module registers its ops' fake implementations and autograd (`_ops`).
def _compiled_ops() -> KernelOps:
    from ._ops import hta_kl, lif  # noqa: F401  (the compiled ops' registrations)

    ops = torch.ops.htakl
    return KernelOps(ops.hta_kl_fused.default, ops.lif_forward.default, ops.lif_backward.default)


def _kernel_phases():
    from ._ops.hta_kl_phases import KernelPhases

    return KernelPhases


def _triton_phases():
    from .triton_kernels.hta_kl_phases import TritonPhases

    return TritonPhases


def _triton_ops() -> KernelOps:
    # Import statements, not importlib: torch.compile traces this call.
    from .triton_kernels import hta_kl, lif

    return KernelOps(hta_kl.hta_kl_fused_triton, lif.lif_forward_triton, lif.lif_backward_triton)


_TABLE = {
    backend.name: backend
    for backend in (
        Backend("reference", _always_available, None),
        Backend("cpu", _cpu_unavailable, _compiled_ops, _kernel_phases),
        Backend("triton", _triton_unavailable, _triton_ops, _triton_phases),
        # The CPU and CUDA kernels register under the same ops; the dispatcher picks by device.
        Backend("cuda", _cuda_unavailable, _compiled_ops),
    )
}
BACKENDS = ("auto", *_TABLE)

# Fastest first. Triton on CPU tensors means its interpreter: a test vehicle, never picked by auto.
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if `backend` can run on tensors of `device_type`, else what is missing and how to get it."""
    return _TABLE[backend].unavailable_reason(device_type)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable for tensors on `device` (default: every device this machine has)."""
    if device is None:
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        device_types = [torch.device(device).type]
    return [
        name for name in _TABLE
        if any(unavailable_reason(name, device_type) is None for device_type in device_types)
    ]


def resolve_backend(requested: str, device: torch.device) -> str:
    """Turn a backend argument into the backend that runs, or raise saying what is missing."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {requested!r}")
    if requested == "auto":
        override = os.environ.get(BACKEND_ENV)
        if override:
            if override not in BACKENDS:
                raise ValueError(
                    f"environment variable {BACKEND_ENV} must be one of "
                    f"{', '.join(map(repr, BACKENDS))}, got {override!r}"
                )
            requested = override
    if requested == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ()):
            if unavailable_reason(candidate, device.type) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(requested, device.type)
    if reason is not None:
        raise RuntimeError(f"backend {requested!r} is not available: {reason}")
    return requested


def resolve_hta_kl_backend(requested: str, device: torch.device, dtype: torch.dtype, rows: int,
                           classes: int) -> str:
    """resolve_backend for HTA-KL rows of `classes` of `dtype`: where "auto" resolves to the CUDA
    kernel, which runs one block per row, and there are fewer long rows than multiprocessors,
    Triton is picked instead when it runs here: its split kernel spreads each row over several
    programs (an H200 measured [4, 8, 131072] at 0.76 ms in Triton against 1.44 ms in CUDA).
    Only in eager mode (no device query while tracing); an explicit backend or HTAKL_BACKEND
    other than "auto" is taken as given."""
    chosen = resolve_backend(requested, device)
    if (chosen != "cuda" or requested != "auto"
            or os.environ.get(BACKEND_ENV, "auto") not in ("", "auto")
            or torch.compiler.is_compiling() or rows == 0):
        return chosen
    # split_segments splits nothing for this many rows: decided before importing Triton
    processors = torch.cuda.get_device_properties(device).multi_processor_count
    if rows >= processors or unavailable_reason("triton", device.type) is not None:
        return chosen
    try:
        from .triton_kernels.hta_kl import default_layout, split_segments
    except ImportError:  # installed but broken: the CUDA kernel serves
        return chosen
    on_chip_limit, chunk = default_layout(dtype == torch.float64)
    if classes > on_chip_limit and split_segments(rows, classes, chunk, processors) > 1:
        return "triton"
    return chosen


_LOADED_OPS: dict[str, KernelOps] = {}


def kernel_ops(backend: str) -> KernelOps:
    """The kernels of a resolved, non-reference backend (imported on first use)."""
    loader = _TABLE[backend].load_ops
    if loader is None:
        raise ValueError(f"backend {backend!r} has no kernels; call htakl_kernels.reference")
    ops = _LOADED_OPS.get(backend)
    if ops is None:  # the first call imports the kernels; later ones skip the import machinery
        ops = _LOADED_OPS[backend] = loader()
    return ops


def phase_ops(backend: str):
    """The vocab-parallel phase ops of a resolved backend, or None where it has none (the
    reference and CUDA, whose phases run as PyTorch ops)."""
    loader = _TABLE[backend].load_phases
    return None if loader is None else loader()
