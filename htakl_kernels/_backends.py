"""Which kernel backends are built and usable here, and which one a call runs on."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
BACKEND_ENV = "HTAKL_BACKEND"


from ._ops import EXTENSION as _EXTENSION
from ._ops import EXTENSION_ERROR as _EXTENSION_ERROR


# Read once: torch.compile cannot trace the extension's plain C function, and it never changes.
_BUILT_WITH_CUDA = _EXTENSION is not None and bool(_EXTENSION.built_with_cuda())


def extension_built_with_cuda() -> bool:
    return _BUILT_WITH_CUDA


def _triton_usable_on(device_type: str) -> str | None:
    """None if Triton kernels can run on tensors of this device type, else the reason."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if device_type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"Triton kernels run on CUDA tensors, or on CPU tensors only under Triton's interpreter "
        f"(set TRITON_INTERPRET=1 before importing triton); got tensors on {device_type}"
    )


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if `backend` can run on tensors of `device_type`, else what is missing and how to get it."""
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_usable_on(device_type)
    if _EXTENSION is None:
        return (
            f"the C++ extension htakl_kernels._C is not built ({_EXTENSION_ERROR}); build it with "
            f"`pip install --no-build-isolation -e .` from the repository root"
        )
    if backend == "cpu":
        return None if device_type == "cpu" else f"backend 'cpu' runs on CPU tensors, got {device_type}"
    # backend == "cuda"
    if device_type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, got {device_type}"
    if not extension_built_with_cuda():
        return (
            "htakl_kernels._C was built without CUDA; rebuild on a machine with nvcc and a CUDA "
            "build of torch (and HTAKL_NO_CUDA unset)"
        )
    return None


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable for tensors on `device` (default: every device this machine has)."""
    if device is None:
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        device_types = [torch.device(device).type]
    return [
        name
        for name in BACKENDS[1:]
        if any(unavailable_reason(name, device_type) is None for device_type in device_types)
    ]


# Fastest first. Triton on CPU tensors means its interpreter: a test vehicle, never picked by auto.
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


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
