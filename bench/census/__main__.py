"""`python -m bench.census`: predict the GPU kernels' speed from their compiled code, no GPU.

Compiles every GPU kernel for sm_90 as the build compiles it (CUDA: nvcc with scripts/gpu_flags.py's
flags; Triton: the AOT harness), disassembles it with line info, attributes each loop's
instructions to the pass it belongs to, and predicts per kernel, dtype, benchmark shape and card
(H100, H200) the time and the fraction of copy bandwidth under SPEC 4's byte model (model.py says
how). Writes census.json (one record per case) and census.md (a table per kernel) into --out
(default bench/results/census/).

--quick: the LIF kernels only, one card (a minute on 2 cores, compilation included: CI runs it).
--kernels, --backends: a subset (`--kernels hta_kl --backends cuda`: the CUDA HTA-KL kernel only).
--calibrate: the H100 LIF measurements against the predictions for --source (the commit they
measured), into calibration.json and calibration.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

from . import build, calibration, census, model
from .machines import CARDS


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def _passes_text(record: dict) -> str:
    ran = [p for p in record["passes"] if p["loops"] and p["instructions"] > 0]
    return str(len(ran))


def census_markdown(records: list[dict], header: list[str]) -> str:
    lines = ["# Cost census of the GPU kernels (predicted, no GPU)", "", *header, ""]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["backend"], r["kernel"], r["card"]), []).append(r)
    for (backend, kernel, card), rows in groups.items():
        element = "neuron-step" if kernel == "lif" else "class"
        lines += [f"## {backend} {kernel}, {card}", "",
                  f"| shape | dtype | passes | DRAM / model bytes | instr/{element} | "
                  f"MUFU/{element} | blocks/SM | bound by | predicted % of copy | "
                  f"as one timed call |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if kernel == "lif":
                shape = f"T={r['steps']} N=2^{r['neurons'].bit_length() - 1}"
            else:
                lead = f"[{r['steps']}, " if r["steps"] else "["
                shape = f"{lead}{r['rows']}, {r['classes']}]"
            lines.append(
                f"| {shape} | {r['dtype']} | {_passes_text(r)} | "
                f"{r['dram_bytes'] / r['model_bytes']:.2f} | "
                f"{r['instructions_per_element']:.0f} | {r['mufu_per_element']:.1f} | "
                f"{'/'.join(map(str, r['blocks_per_sm']))} | {r['bound_by']} | "
                f"{_pct(r['predicted_fraction'])} | {_pct(r['predicted_call_fraction'])} "
                f"({r['call_bound_by']}) |")
        lines.append("")
        passes = rows[0]["passes"]
        lines += [f"Per pass ({rows[0]['dtype']}, first shape): " + "; ".join(
            f"{p['launch']} / {p['name']}: {p['instructions']:.0f} instr, {p['mufu']:.1f} MUFU, "
            f"{p['global_bytes']:.0f} B global per {element}" for p in passes), ""]
    return "\n".join(lines) + "\n"


def calibration_markdown(rows: list[dict], header: list[str]) -> str:
    lines = ["# Census calibration: H100 LIF measurements against the predictions", "",
             *header, "",
             "Percent of copy bandwidth under the benchmark's byte model (5 E b). `roofline`: the "
             "largest of the DRAM, issue and MUFU times; `+ overlap`: plus OVERLAP_LOSS times the "
             "second largest; `predicted`: each op call at least the host floor, as the run timed "
             "one call at a time. Times are forward / backward per call.", "",
             "| backend | dtype | T | measured us | measured % | roofline % | + overlap % | "
             "predicted us | predicted % | diff (points) | bound by (fwd, bwd) | why |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['dtype']} | {r['steps']} | "
            f"{r['measured_forward_us']} / {r['measured_backward_us']} | "
            f"{r['measured_percent']} | {r['roofline_percent']:.0f} | "
            f"{r['overlap_percent']:.0f} | {r['predicted_forward_us']:.0f} / "
            f"{r['predicted_backward_us']:.0f} | {r['predicted_percent']:.0f} | "
            f"{r['difference_points']:+.0f} | {', '.join(r['bound_by'])} | {r['explanation']} |")
    worst = max(abs(r["difference_points"]) for r in rows)
    lines += ["", f"Largest difference: {worst:.0f} points over {len(rows)} rows.", "",
              "## Where the plain roofline misses by more than 15 points, and the term that "
              "closes it", ""]
    for r in rows:
        miss = r["roofline_percent"] - r["measured_percent"]
        if abs(miss) <= 15:
            continue
        host = r["predicted_percent"] < r["overlap_percent"] - 0.5
        overlap = r["overlap_percent"] < r["roofline_percent"] - 0.5
        terms = [name for name, used in (
            ("overlap loss (DRAM and issue times of one thread do not overlap fully)", overlap),
            ("host floor (the op call takes longer to issue than its kernels to run)", host))
            if used]
        lines.append(f"- {r['backend']} {r['dtype']} T = {r['steps']}: roofline "
                     f"{r['roofline_percent']:.0f}% against {r['measured_percent']}% measured "
                     f"({miss:+.0f}); closed by " + " and ".join(terms) +
                     f" to {r['predicted_percent']:.0f}%.")
    lines.append("")
    return "\n".join(lines) + "\n"


def _revision(source: str) -> str:
    """The tree's commit, with "+ local changes" when its kernel sources differ from it."""
    try:
        commit = subprocess.run(["git", "-C", source, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", source, "status", "--porcelain", "--", "csrc",
                                "triton_kernels"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return commit + (" + local changes" if dirty else "")


def _header(args, source: str) -> list[str]:
    constants = "; ".join(
        f"{c.name}: copy {c.copy_bandwidth / 1e12:.2f} TB/s ({c.copy_source}), {c.sms} SMs, "
        f"{c.clock_hz / 1e9:.3f} GHz, L2 {c.l2_bytes >> 20} MiB" for c in CARDS.values())
    return [
        f"Command: `python -m bench.census {' '.join(sys.argv[1:])}`, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}; kernels of commit "
        f"{_revision(source)}.",
        f"Cards: {constants}.",
        f"Model (bench/census/model.py): DRAM latency {model.DRAM_LATENCY_S * 1e9:.0f} ns, L2 "
        f"{model.L2_BYTES_PER_CLOCK_PER_SM} B/clock/SM at {model.L2_LATENCY_S * 1e9:.0f} ns, "
        f"overlap loss {model.OVERLAP_LOSS}, host floor per call "
        + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in model.HOST_FLOOR_S.items()) + ".",
        "Instructions are the heaviest path through each loop body (one arm of each branch, "
        "the costliest option set), times the loop's trip count per element; straight-line and "
        "per-row code is spread over the row (HTA-KL) or left out (LIF). Predictions are "
        "uncalibrated except for the LIF terms calibration.md fits.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("bench", "results", "census"))
    parser.add_argument("--source", default=build.REPO,
                        help="source tree whose kernels are compiled (default: this checkout)")
    parser.add_argument("--triton-harness", metavar="REVISION",
                        help="take the Triton AOT harness (triton_kernels/*aot.py) from this git "
                             "revision (for a --source older than the harness)")
    parser.add_argument("--quick", action="store_true",
                        help="LIF kernels only, H100 only, two T (the CI smoke run)")
    parser.add_argument("--calibrate", action="store_true",
                        help="compare with the H100 LIF measurements instead of the census")
    parser.add_argument("--cards", default="H100,H200")
    parser.add_argument("--kernels", default="lif,hta_kl",
                        help="comma-separated kernels to predict: lif, hta_kl")
    parser.add_argument("--backends", default="cuda,triton",
                        help="comma-separated backends to predict: cuda, triton")
    args = parser.parse_args(argv)
    source = os.path.abspath(args.source)
    if not os.path.isdir(os.path.join(source, "csrc")):
        parser.error(f"--source {args.source}: not a source tree (no csrc/)")
    kernels = args.kernels.split(",")
    backends = tuple(args.backends.split(","))
    for name, given, known in (("--kernels", kernels, ("lif", "hta_kl")),
                               ("--backends", backends, ("cuda", "triton"))):
        unknown = [g for g in given if g not in known]
        if unknown or not given:
            parser.error(f"{name}: unknown {unknown}; known: {', '.join(known)}")
    harness = build.harness_at(args.triton_harness) if args.triton_harness else None
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    header = _header(args, source)
    if args.calibrate:
        rows = calibration.calibrate(source, harness,
                                     os.path.join(build.REPO, calibration.MEASURED))
        stem = "calibration"
        with open(os.path.join(args.out, f"{stem}.json"), "w") as handle:
            json.dump({"header": header, "rows": rows}, handle, indent=1)
        text = calibration_markdown(rows, header)
    else:
        card_list = census.cards(["H100"] if args.quick else args.cards.split(","))
        if args.quick:
            records = census.lif_records(source, card_list, steps=(4, 32),
                                         triton_harness=harness)
        else:
            records = []
            if "lif" in kernels:
                records += census.lif_records(source, card_list, triton_harness=harness,
                                              backends=backends)
            if "hta_kl" in kernels:
                records += census.hta_kl_records(source, card_list, backends=backends)
        stem = "census-quick" if args.quick else "census"
        with open(os.path.join(args.out, f"{stem}.json"), "w") as handle:
            json.dump(records, handle, indent=1)
        text = census_markdown(records, header)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as handle:
        handle.write(text)
    print(text)
    print(f"wrote {args.out}/{stem}.json and .md in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
