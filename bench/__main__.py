"""`python -m bench`: time the HTA-KL loss (alone, through classifier heads) and LIF kernels.

Run from the repository root. Writes `<suite>.json`, `<suite>.md` and `<suite>-time.png`,
`<suite>-bandwidth.png` (stem `<suite>-quick` with --quick) into --out, default
`runs/bench/<device-name>/` (git-ignored: the committed results in `bench/results/<device-name>/`
are replaced only when --out names that folder), and prints the tables. Exits 1 when an implementation failed
(one that is missing or not implemented yet is only noted), 130 when interrupted (Ctrl-C or
SIGTERM, e.g. from `timeout`) after writing the cases measured so far.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import signal
import subprocess
import sys

import torch

import htakl_kernels

from . import distributed_suite, linear_suite, lif_suite, loss_suite, measure, report
from .runner import run_case

SUITES = {
    # name: (module, x axis of the plots, its label, SPEC 4 byte model in words)
    "loss": (loss_suite, "classes", "classes C", (
        "byte model (SPEC 4): 3 E b for a 2-D student (read student and teacher, write the "
        "student's gradient), (2T + 1) E b for a [T, rows, C] student; E = rows * C"
    )),
    "lif": (lif_suite, "steps", "time steps T", (
        "byte model (SPEC 4): 4 E b (read x, write spikes, read their gradient, write x's "
        "gradient), E = T * N; for this project's kernels plus their saved-for-backward residual "
        "counted twice (written, read back) and their re-reads of x and the spikes (baselines: "
        "4 E b, so their bandwidth is the rate of useful bytes)"
    )),
    "linear": (linear_suite, "rows", "rows N", linear_suite.DESCRIPTION),
}
# The suites whose shapes --shapes can choose.
SHAPED_SUITES = ("loss", "lif")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=(*SUITES, "distributed", "all"), default="all",
                        help="distributed: vocab-parallel HTA-KL on 1, 2 and 4 CPU ranks (not in all)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a few small shapes (seconds on CPU)")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated, from " + ", ".join(DTYPES)
                        + " (default: float32 on CPU, bfloat16,float32 on CUDA)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated case labels instead of the suite's shapes (--suite loss: "
                             + loss_suite.SHAPE_FORMAT + "; --suite lif: " + lif_suite.SHAPE_FORMAT + ")")
    parser.add_argument("--implementations", default=None,
                        help="comma-separated, case-insensitive parts of implementation names: only "
                             "those run (e.g. 'htakl,F.kl_div,liger'; default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/bench/<device>/; name bench/results/<device> "
                             "to replace the committed results)")
    arguments = parser.parse_args(argv)
    if arguments.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    names = arguments.dtype.split(",") if arguments.dtype else (
        ["bfloat16", "float32"] if arguments.device == "cuda" else ["float32"]
    )
    unknown = [name for name in names if name not in DTYPES]
    if unknown:
        parser.error(f"--dtype: unknown {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    arguments.dtypes = [DTYPES[name] for name in names]
    if arguments.threads is not None and arguments.threads < 1:
        parser.error("--threads must be at least 1")
    arguments.chosen_shapes = None
    if arguments.shapes is not None:
        if arguments.suite not in SHAPED_SUITES:
            parser.error("--shapes: name one suite of " + ", ".join(SHAPED_SUITES) + " with --suite")
        module = SUITES[arguments.suite][0]
        labels = [label.strip() for label in arguments.shapes.split(",") if label.strip()]
        parsed = [module.parse_shape(label) for label in labels]
        bad = [label for label, shape in zip(labels, parsed) if shape is None or 0 in shape]
        if bad or not labels:
            parser.error(f"--shapes: {', '.join(bad) or 'none given'}: write {module.SHAPE_FORMAT}")
        arguments.chosen_shapes = parsed
    arguments.implementation_parts = None
    if arguments.implementations is not None:
        parts = [part.strip().lower() for part in arguments.implementations.split(",") if part.strip()]
        if not parts:
            parser.error("--implementations: none given")
        arguments.implementation_parts = parts
    return arguments


def chosen_implementations(found, parts):
    """The implementations whose names contain one of `parts` (all when parts is None)."""
    if parts is None:
        return found
    return [implementation for implementation in found
            if any(part in implementation.name.lower() for part in parts)]


def output_folder(out: str | None, device: torch.device) -> str:
    """--out, or `runs/bench/<device-name>`: a plain run never overwrites the committed results."""
    return out or os.path.join("runs", "bench", measure.device_folder_name(device))


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _source_revision() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(htakl_kernels.__file__)))
    try:
        revision = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return revision + ("+dirty" if dirty else "")


def versions() -> dict:
    return {
        "htakl_kernels": _source_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _distribution_version("triton"),
        "liger-kernel": _distribution_version("liger-kernel"),
        "spikingjelly": _distribution_version("spikingjelly"),
    }


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _interrupt_on_sigterm() -> None:
    """`timeout` sends SIGTERM: stop measuring, but still write what was measured."""

    def interrupt(_signal, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the writing
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    arguments = parse_arguments(argv)
    device = torch.device(arguments.device)
    if arguments.suite == "distributed":  # process groups of its own, not the per-case runner
        return distributed_suite.main(arguments, argv, output_folder(arguments.out, device),
                                      versions(), _log)
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    # Every shape and dtype compiles its own graph: no silent fallback to eager after a few.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    folder = output_folder(arguments.out, device)
    timer = measure.make_timer(device, arguments.quick)
    cache = measure.cache_bytes(device)
    _log(f"measuring the copy bandwidth of {measure.device_description(device)}")
    copy = measure.copy_bandwidth(device, timer, cache)
    _interrupt_on_sigterm()
    failed = interrupted = False
    for suite in tuple(SUITES) if arguments.suite == "all" else (arguments.suite,):
        module, x_key, x_label, byte_model = SUITES[suite]
        implementations = chosen_implementations(module.implementations(device, arguments.quick),
                                                 arguments.implementation_parts)
        if not implementations:
            print(f"--implementations: no {suite} implementation's name contains "
                  + " or ".join(arguments.implementation_parts), file=sys.stderr)
            return 2
        # A suite may run its cases its own way (linear: its own timer, memory in a child).
        case_runner = getattr(module, "run_case", run_case)
        rows = []
        try:
            chosen = () if arguments.chosen_shapes is None else (arguments.chosen_shapes,)
            for case in module.cases(device, arguments.dtypes, arguments.quick, *chosen):
                rows += case_runner(case, implementations, suite=suite, device=device,
                                    timer=timer, copy_bps=copy["bytes_per_s"], cache=cache, log=_log)
        except KeyboardInterrupt:
            interrupted = True
            _log(f"interrupted: writing the {suite} cases measured so far")
        result = {
            "suite": suite,
            "quick": arguments.quick,
            "interrupted": interrupted,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable), "-m", "bench", *argv]),
            "device": {"type": device.type, "description": measure.device_description(device),
                       "cache_bytes": cache, "threads": torch.get_num_threads()},
            "copy_bandwidth": copy,
            "byte_model": byte_model,
            "versions": versions(),
            "rows": rows,
        }
        stem = suite + ("-quick" if arguments.quick else "")
        paths = report.write(result, folder, stem, x_key, x_label)
        header, cells = report.table(rows)
        print(f"\n{suite} on {result['device']['description']}, copy bandwidth "
              f"{copy['bytes_per_s'] / 1e9:.4g} GB/s" + (" (interrupted: partial)" if interrupted else ""))
        print(report.text_table(header, cells))
        for line in report.notes(rows):
            print("not measured:", line)
        print("wrote", ", ".join(paths))
        failed |= any(row["status"] == "failed" for row in rows)
        if interrupted:
            return 130
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
