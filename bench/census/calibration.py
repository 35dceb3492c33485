"""Predicted against measured: the LIF kernels of the H100 run (bench/results/
nvidia-h100-80gb-hbm3/lif-gpu-check.md, code of commit 5d1d8dd), each row predicted three ways:
the plain roofline (largest time only), with OVERLAP_LOSS, and as the benchmark timed it (one op
call at a time, so never under the host's time to issue the call)."""

from __future__ import annotations

import os
import re

from . import lif, model
from .machines import CARDS

MEASURED = os.path.join("bench", "results", "nvidia-h100-80gb-hbm3", "lif-gpu-check.md")
NEURONS = 2**20  # the run's N (the file's "N = 2^20 neurons")


def measured_rows(path: str) -> list[dict]:
    """The timing table of lif-gpu-check.md: per dtype and T, CUDA and Triton forward and
    backward times (us) and the SPEC-model fraction (%)."""
    rows = []
    pattern = re.compile(r"^\| (\w+) \| (\d+) \| (\d+) us \| (\d+) us \| (\d+)% \| (\d+) us \| "
                         r"(\d+) us \| (\d+)% \|$")
    for line in open(path).read().splitlines():
        match = pattern.match(line.strip())
        if match:
            dtype, steps = match.group(1), int(match.group(2))
            values = [int(v) for v in match.groups()[2:]]
            for backend, (fwd, bwd, pct) in (("cuda", values[:3]), ("triton", values[3:])):
                rows.append({"backend": backend, "dtype": dtype, "steps": steps,
                             "measured_forward_us": fwd, "measured_backward_us": bwd,
                             "measured_percent": pct})
    if not rows:
        raise ValueError(f"{path}: no timing rows found")
    return rows


def explain(row: dict, timings, floor_s: float) -> str:
    """Which terms set the prediction, in words."""
    parts = []
    for direction, t in zip(("fwd", "bwd"), timings):
        terms = {"DRAM": t.dram_s, "issue": t.issue_s, "MUFU": t.mufu_s}
        top = sorted(terms, key=terms.get, reverse=True)
        text = f"{direction}: {t.bound_by}"
        if terms[top[1]] > 0.5 * terms[top[0]]:
            text += f" with {top[1]} close behind (partial overlap)"
        if t.kernel_s < floor_s:
            text += f"; kernel {t.kernel_s * 1e6:.0f} us < host floor {floor_s * 1e6:.0f} us"
        parts.append(text)
    return "; ".join(parts)


def calibrate(source_root: str, harness: str | None, measured_path: str) -> list[dict]:
    card = CARDS["H100"]
    kernels = {"cuda": lif.cuda_kernels(source_root),
               "triton": lif.triton_kernels(source_root, harness)}
    results = []
    for row in measured_rows(measured_path):
        backend, dtype, steps = row["backend"], row["dtype"], row["steps"]
        launches = lif.launches(card, kernels[backend], dtype, steps, NEURONS)
        useful = lif.model_bytes(dtype, steps, NEURONS)
        roofline = [model.time_launch(card, launch, overlap_loss=0.0) for launch in launches]
        timings = [model.time_launch(card, launch) for launch in launches]
        floor_s = model.HOST_FLOOR_S[backend]
        calls = [model.call_time(t.kernel_s, floor_s) for t in timings]

        def percent(seconds):
            return round(100 * model.fraction_of_copy(useful, seconds, card), 1)

        predicted = percent(sum(calls))
        results.append({
            **row,
            "roofline_percent": percent(sum(t.kernel_s for t in roofline)),
            "overlap_percent": percent(sum(t.kernel_s for t in timings)),
            "predicted_percent": predicted,
            "difference_points": round(predicted - row["measured_percent"], 1),
            "predicted_forward_us": round(calls[0] * 1e6, 1),
            "predicted_backward_us": round(calls[1] * 1e6, 1),
            "kernel_forward_us": round(timings[0].kernel_s * 1e6, 1),
            "kernel_backward_us": round(timings[1].kernel_s * 1e6, 1),
            "bound_by": [t.bound_by for t in timings],
            "notes": [note for launch in launches for note in launch.notes],
            "explanation": explain(row, timings, floor_s),
        })
    return results
