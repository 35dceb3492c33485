"""Runs every implementation on every case of a suite and turns timings into result rows."""

from __future__ import annotations

import itertools
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

import htakl_kernels

from . import measure


QUICK_SKIPS_COMPILE = "skipped by --quick (torch.compile takes tens of seconds per shape)"


@dataclass
class Implementation:
    """One way to compute a suite's function.

    `role`: "ours" (this project's kernels) or "baseline" (anything they are compared with).
    """

    name: str
    role: str
    call: Callable[..., torch.Tensor] | None = None
    unavailable: str | None = None  # why it cannot run here (then `call` is None)


@dataclass
class Inputs:
    """One input set: the call's arguments, what to differentiate, the upstream gradient."""

    args: tuple[torch.Tensor, ...]
    wrt: tuple[torch.Tensor, ...]
    grad_output: torch.Tensor | None = None


@dataclass
class Case:
    """One shape and dtype of a suite."""

    label: str
    dims: dict
    dtype: torch.dtype
    elements: int  # elements of the student (loss) or of x (LIF): per-element figures use it
    model_bytes: int  # SPEC section 4's byte model, before any residual
    make_inputs: Callable[[torch.Generator], Inputs]
    # SPEC 4 (LIF): add the residual our kernels save (written once, read once) and their
    # re-reads of inputs and outputs. Baselines keep the plain model: their bandwidth is then
    # the rate of useful bytes, comparable with ours, not inflated by what they store.
    count_saved_bytes: bool = False


def backend_implementations(
    device: torch.device, make_call: Callable[[str], Callable], missing: str | None = None
) -> list[Implementation]:
    """One "htakl <backend>" implementation per backend built for `device`, reference aside.

    `missing`: why the suite's public function cannot run at all yet (then every backend is
    listed as unavailable with that reason).
    """
    found = []
    for name in htakl_kernels.available_backends(device):
        if name == "reference":
            continue
        label = f"htakl {name}"
        if missing is not None:
            found.append(Implementation(label, "ours", unavailable=missing))
        elif name == "triton" and device.type == "cpu":
            found.append(Implementation(
                label, "ours",
                unavailable="Triton on CPU tensors is its interpreter (TRITON_INTERPRET=1), not a fast path",
            ))
        else:
            found.append(Implementation(label, "ours", make_call(name)))
    return found


def _call_forward(implementation: Implementation, inputs: Inputs) -> torch.Tensor:
    return implementation.call(*inputs.args)


def _call_forward_backward(implementation: Implementation, inputs: Inputs):
    output = implementation.call(*inputs.args)
    grad_outputs = None if inputs.grad_output is None else (inputs.grad_output,)
    return torch.autograd.grad((output,), inputs.wrt, grad_outputs)


def _first_line(error: BaseException) -> str:
    """The error's type and first sentence (dispatcher errors go on for a page)."""
    text = str(error).strip()
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(error).__name__}: {first}"[:300]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_one(implementation, case, input_sets, timer, device, copy_bps) -> dict:
    rotation = itertools.cycle(input_sets)

    def forward():
        return _call_forward(implementation, next(rotation))

    def forward_backward():
        return _call_forward_backward(implementation, next(rotation))

    started = time.perf_counter()
    forward_backward()  # compiles / autotunes where the implementation does
    _synchronize(device)
    first_call_s = time.perf_counter() - started
    timing = timer.time(forward_backward)
    forward_timing = timer.time(forward)
    saved = measure.saved_for_backward(
        lambda: _call_forward(implementation, input_sets[0]), input_sets[0].args
    )
    model_bytes = case.model_bytes
    if case.count_saved_bytes and implementation.role == "ours":
        if saved is None:
            model_bytes = None
        else:
            model_bytes += 2 * saved["residual_bytes"] + saved["reread_bytes"]
    row = {
        "status": "ok",
        "first_call_s": first_call_s,
        "forward_backward": timing.as_dict(),
        "forward": forward_timing.as_dict(),
        "model_bytes": model_bytes,
        "saved_for_backward": saved,
        "peak_extra_bytes": measure.peak_extra_bytes(device, forward_backward),
        "forward_backward_device_s": (measure.device_seconds_per_call(forward_backward)
                                      if device.type == "cuda" else None),
    }
    if model_bytes is not None:
        row["bandwidth_bytes_per_s"] = model_bytes / timing.median_s
        row["fraction_of_copy_bandwidth"] = row["bandwidth_bytes_per_s"] / copy_bps
        if row["forward_backward_device_s"]:
            row["device_fraction_of_copy_bandwidth"] = (
                model_bytes / row["forward_backward_device_s"] / copy_bps)
    return row


def run_case(
    case: Case,
    implementations: list[Implementation],
    *,
    suite: str,
    device: torch.device,
    timer,
    copy_bps: float,
    cache: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Result rows for one case: every implementation, in order, with speedups filled in."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    input_sets = [
        case.make_inputs(generator) for _ in range(measure.rotation_count(case.model_bytes, cache))
    ]
    rows = []
    for implementation in implementations:
        row = {
            "suite": suite,
            "case": case.label,
            "dims": case.dims,
            "dtype": str(case.dtype).removeprefix("torch."),
            "elements": case.elements,
            "implementation": implementation.name,
            "role": implementation.role,
            "input_sets": len(input_sets),
        }
        if implementation.unavailable is not None:
            row.update(status="skipped", note=implementation.unavailable)
        else:
            log(f"  {suite} {case.label} {row['dtype']}: {implementation.name}")
            try:
                row.update(_measure_one(implementation, case, input_sets, timer, device, copy_bps))
            except NotImplementedError as error:
                row.update(status="not implemented", note=_first_line(error))
            except torch.OutOfMemoryError as error:
                row.update(status="out of memory", note=_first_line(error))
                torch.cuda.empty_cache()
            except Exception as error:  # noqa: BLE001 - one broken implementation must not stop the suite
                row.update(status="failed", note=_first_line(error))
                log(traceback.format_exc())
        rows.append(row)
    _add_speedups(rows)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """speedup[baseline] = baseline's median time / this row's median time, per timed mode."""
    baselines = [row for row in rows if row["role"] == "baseline" and row["status"] == "ok"]
    for row in rows:
        if row["status"] != "ok":
            continue
        row["speedup"] = {
            mode: {
                baseline["implementation"]: baseline[mode]["median_s"] / row[mode]["median_s"]
                for baseline in baselines
            }
            for mode in ("forward_backward", "forward")
        }
