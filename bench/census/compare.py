"""Measured against predicted: join a benchmark run's JSON (`python -m bench`) with the census's
predictions (census.json) and print, per case of this project's kernels, the measured fraction of
copy bandwidth, the predicted one (as one timed call) and their ratio; in brackets, the same for
the GPU's own time (the profiler's, where the run measured it) against the kernels' prediction.

    python -m bench.census.compare RUN/lif.json RUN/loss.json [--census bench/results/census/current/census.json]

Needs neither a GPU nor the CUDA tools: it reads the two JSON files only (gpu_check.sh runs it
after the benchmarks). Writes the table as Markdown with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_CENSUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "results", "census", "current", "census.json")
SUITE_KERNEL = {"lif": "lif", "loss": "hta_kl"}


def card_of(device: dict) -> str | None:
    """The census's card name for a benchmark run's device, None for a card it does not model."""
    description = device.get("description", "")
    for card in ("H200", "H100"):
        if card in description:
            return card
    return None


def shape_key(kernel: str, dims: dict) -> tuple:
    if kernel == "lif":
        return (dims["steps"], dims["neurons"])
    return (dims.get("steps") or 0, dims["rows"], dims["classes"])


def record_key(record: dict) -> tuple:
    shape = ((record["steps"], record["neurons"]) if record["kernel"] == "lif"
             else (record["steps"], record["rows"], record["classes"]))
    return (record["backend"], record["kernel"], record["dtype"], record["card"], shape)


def join(runs: list[dict], census: list[dict]) -> list[dict]:
    """One row per measured case of an `htakl <backend>` implementation the census covers."""
    predicted = {record_key(r): r for r in census}
    rows = []
    for run in runs:
        kernel = SUITE_KERNEL.get(run.get("suite"))
        card = card_of(run.get("device", {}))
        if kernel is None:
            continue
        for row in run["rows"]:
            name = row["implementation"]
            if not name.startswith("htakl ") or row.get("status") != "ok":
                continue
            backend = name.split()[1]
            key = (backend, kernel, row["dtype"], card, shape_key(kernel, row["dims"]))
            record = predicted.get(key)
            measured = row.get("fraction_of_copy_bandwidth")
            entry = {"backend": backend, "kernel": kernel, "dtype": row["dtype"],
                     "case": row["case"], "card": card, "measured_fraction": measured,
                     "measured_s": row["forward_backward"]["median_s"],
                     "measured_device_fraction": row.get("device_fraction_of_copy_bandwidth")}
            if record is not None:
                entry.update(predicted_fraction=record["predicted_call_fraction"],
                             predicted_kernel_fraction=record["predicted_fraction"],
                             predicted_s=record["predicted_call_time_s"],
                             bound_by=record["call_bound_by"])
                if measured:
                    entry["measured_over_predicted"] = measured / record["predicted_call_fraction"]
                if entry["measured_device_fraction"]:
                    entry["device_over_predicted"] = (entry["measured_device_fraction"]
                                                      / record["predicted_fraction"])
            rows.append(entry)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| backend | kernel | dtype | case | card | measured % (GPU only) | "
             "predicted % (kernel only) | measured / predicted | predicted bound by |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        measured = f"{100 * r['measured_fraction']:.0f}" if r["measured_fraction"] else "n/a"
        if r.get("measured_device_fraction"):
            measured += f" ({100 * r['measured_device_fraction']:.0f})"
        if "predicted_fraction" in r:
            predicted = (f"{100 * r['predicted_fraction']:.0f} "
                         f"({100 * r['predicted_kernel_fraction']:.0f})")
            ratio = (f"{r['measured_over_predicted']:.2f}"
                     if "measured_over_predicted" in r else "n/a")
            if "device_over_predicted" in r:
                ratio += f" ({r['device_over_predicted']:.2f})"
            bound = r["bound_by"]
        else:
            predicted, ratio, bound = "no census record", "", ""
        lines.append(f"| {r['backend']} | {r['kernel']} | {r['dtype']} | {r['case']} | "
                     f"{r['card'] or 'unmodelled card'} | {measured} | {predicted} | {ratio} | "
                     f"{bound} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="benchmark JSON files (lif.json, loss.json, ...)")
    parser.add_argument("--census", default=DEFAULT_CENSUS)
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    runs = []
    for path in args.runs:
        if not os.path.exists(path):
            print(f"{path}: missing, skipped", file=sys.stderr)
            continue
        with open(path) as handle:
            runs.append(json.load(handle))
    with open(args.census) as handle:
        census = json.load(handle)
    text = markdown(join(runs, census))
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
