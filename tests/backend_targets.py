"""The backends a contract test runs on, as pytest parameters.

A target is a backend on a device, with, for Triton, optional layout knobs of its launcher (the
chunked path, or the split one, forced on small rows); "cuda_emulated" is the CUDA kernel's source
run on the CPU (tests/cuda_emulated.py), reached through its op's arguments only. Targets that cannot run here are skipped with the reason:
no CUDA device, the extension not built, Triton missing or (on CPU tensors) not interpreted.
Triton on CPU tensors is its interpreter, orders of magnitude slower than the other targets: the
tests give it smaller case lists, and mark the longer ones slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import pytest
import torch

from htakl_kernels._backends import unavailable_reason


@dataclass(frozen=True)
class Target:
    backend: str
    device: str
    # Keyword arguments of the Triton launcher (launch_hta_kl), as (name, value) pairs.
    layout: tuple = ()

    @property
    def interpreted(self) -> bool:
        return self.backend == "triton" and self.device == "cpu"

    @property
    def emulated(self) -> bool:
        """The CUDA kernel's source on the CPU (tests/cuda_emulated.py): its op only, no public
        backend."""
        return self.backend == "cuda_emulated"

    @property
    def launch_options(self) -> dict:
        return dict(self.layout)


CHUNKED = (("on_chip_limit", 16),)
# The chunked path with each row split over programs of one chunk each (the split kernel).
SPLIT = (("on_chip_limit", 16), ("segments", 8))

TARGETS = {
    "reference": Target("reference", "cpu"),
    "cpu": Target("cpu", "cpu"),
    "triton": Target("triton", "cpu"),
    "triton_chunked": Target("triton", "cpu", CHUNKED),
    "triton_split": Target("triton", "cpu", SPLIT),
    "cuda": Target("cuda", "cuda"),
    "triton_cuda": Target("triton", "cuda"),
    "triton_chunked_cuda": Target("triton", "cuda", CHUNKED),
    "triton_split_cuda": Target("triton", "cuda", SPLIT),
    "cuda_emulated": Target("cuda_emulated", "cpu"),
}
KERNELS = ("cpu", "triton", "cuda", "triton_cuda")  # every kernel, default layout
# and the forced chunked and split paths, and the CUDA kernel emulated on the CPU (op tests only)
LAYOUTS = KERNELS + ("triton_chunked", "triton_chunked_cuda", "triton_split", "triton_split_cuda",
                     "cuda_emulated")


def skip_reason(target: Target) -> str | None:
    if target.emulated:
        from cuda_emulated import unavailable_reason as emulation_unavailable

        return emulation_unavailable()
    if target.device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device"
    return unavailable_reason(target.backend, target.device)


def target_marks(target: Target) -> list:
    marks = []
    if target.backend == "triton":
        marks.append(pytest.mark.triton)
    if target.device == "cuda":
        marks.append(pytest.mark.cuda)
    if target.emulated:
        marks.append(pytest.mark.cuda_emulated)
    reason = skip_reason(target)
    if reason is not None:
        marks.append(pytest.mark.skip(reason=reason))
    return marks


# A case: (values after the target, id, slow).
Case = tuple[tuple, str, bool]


def over(names: Iterable[str], cases: Callable[[Target], Iterable[Case]] | None = None) -> list:
    """pytest params `(target, *values)` for every target name and each of its cases."""
    params = []
    for name in names:
        target = TARGETS[name]
        for values, case_id, slow in (cases(target) if cases else [((), "", False)]):
            marks = target_marks(target) + ([pytest.mark.slow] if slow else [])
            params.append(pytest.param(target, *values, marks=marks,
                                       id=f"{name}-{case_id}" if case_id else name))
    return params
