"""Vocab-parallel HTA-KL suite (`python -m bench --suite distributed`): one call's time
(forward + backward) with the classes split evenly over 1, 2 and 4 CPU ranks (gloo on 127.0.0.1),
and the bytes each rank passes to the collectives and sends under the ring algorithms.

One rank is the single-device call (the CPU kernel); two or more run the phases of
`htakl_kernels.distributed` on each rank's slice twice: through the CPU kernel's phase ops
(backend "cpu", what "auto" picks) and as PyTorch ops (backend "reference"). The machine's
threads are shared out among the ranks (`threads // ranks` each, at least 1), so the table shows
what splitting the classes costs or saves on one machine; on several machines each rank would
have its own cores.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import htakl_kernels as hk
from htakl_kernels import distributed as hkd

from . import measure

SHAPES = [(256, 32000), (64, 131072)]
QUICK_SHAPES = [(32, 4096)]
RANKS = (1, 2, 4)
# backend -> the path it takes on two or more ranks
PATHS = {"cpu": "vocab-parallel (CPU phase ops, gloo)",
         "reference": "vocab-parallel (torch-op phases, gloo)"}
REPEATS = 5
QUICK_REPEATS = 2
GROUP_TIMEOUT_S = 1800


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank, ranks, port, shapes, dtypes, repeats, threads, out_path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=ranks,
                            timeout=datetime.timedelta(seconds=600))
    group = dist.group.WORLD if ranks > 1 else None
    rows_out = []
    cases = [(dtype, shape, backend) for dtype in dtypes for shape in shapes
             for backend in (("cpu",) if ranks == 1 else tuple(PATHS))]
    for dtype, (rows, classes), backend in cases:
        share = [classes // ranks + (r < classes % ranks) for r in range(ranks)]
        start = sum(share[:rank])
        generator = torch.Generator().manual_seed(0)
        # Logits spread like a trained classifier's, as in the loss suite.
        teacher = (3.0 * torch.randn(rows, classes, generator=generator))
        student = (3.0 * torch.randn(rows, classes, generator=generator))
        teacher = teacher[:, start:start + share[rank]].to(dtype).contiguous()
        student = student[:, start:start + share[rank]].to(dtype).contiguous()
        student.requires_grad_(True)

        def call():
            hk.hta_kl_div(student, teacher, group=group, backend=backend).backward()
            student.grad = None

        call()  # warm-up
        with hkd.Traffic() as traffic:
            call()
        times = []
        for _ in range(repeats):
            dist.barrier()
            begin = time.perf_counter()
            call()
            # a call takes as long as its slowest rank
            elapsed = torch.tensor([time.perf_counter() - begin], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(float(elapsed))
        rows_out.append({
            "case": f"{rows}x{classes}", "rows": rows, "classes": classes,
            "dtype": str(dtype).removeprefix("torch."), "ranks": ranks,
            "threads_per_rank": threads,
            "path": "CPU kernel (single device)" if ranks == 1 else PATHS[backend],
            "median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
            "max_ms": max(times) * 1e3, "repeats": repeats,
            "collectives": traffic.collectives,
            "bytes_passed_per_rank": traffic.bytes,
            "bytes_sent_per_rank": traffic.sent_bytes(ranks) if ranks > 1 else 0,
        })
    dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(rows_out, handle)


def _run_group(ranks, shapes, dtypes, repeats, threads, scratch, log) -> list[dict]:
    out_path = os.path.join(scratch, f"ranks{ranks}.json")
    log(f"  distributed: {ranks} rank(s), {threads} thread(s) each")
    context = mp.start_processes(
        _rank_main, args=(ranks, _free_port(), shapes, dtypes, repeats, threads, out_path),
        nprocs=ranks, join=False, start_method="spawn")
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"the group of {ranks} ranks did not finish in {GROUP_TIMEOUT_S} s")
    with open(out_path) as handle:
        return json.load(handle)


HEADER = ["case", "dtype", "ranks", "threads/rank", "path", "median ms (min-max)", "collectives",
          "KiB passed/rank", "KiB sent/rank"]


def _cells(rows: list[dict]) -> list[list[str]]:
    return [[row["case"], row["dtype"], str(row["ranks"]), str(row["threads_per_rank"]), row["path"],
             f"{row['median_ms']:.4g} ({row['min_ms']:.4g}-{row['max_ms']:.4g})",
             str(row["collectives"]), f"{row['bytes_passed_per_rank'] / 1024:.4g}",
             f"{row['bytes_sent_per_rank'] / 1024:.4g}"] for row in rows]


def _markdown(result: dict) -> str:
    lines = [
        f"# Vocab-parallel HTA-KL on {result['device']['description']}", "",
        f"`{result['command']}`, {result['date']}, {result['device']['threads']} threads shared "
        f"out among the ranks; the machine's 1-minute load average was "
        f"{result['device']['load_average_1min'][0]:.3g} before and "
        f"{result['device']['load_average_1min'][1]:.3g} after (on {result['device']['cores']} "
        f"cores: other jobs' load inflates every time). One call = forward + backward of `hta_kl_div(student_slice, "
        f"teacher_slice, group=...)`, 2-D student, classes split evenly; time of the slowest "
        f"rank, median of {result['rows'][0]['repeats'] if result['rows'] else 0}. "
        "\"passed\" is what a rank hands to the collectives; \"sent\" what it transmits under the "
        "ring algorithms (all_reduce 2 n (P-1)/P, all_gather n (P-1)).", "",
        "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(result["rows"])]
    return "\n".join(lines) + "\n"


def main(arguments, argv, folder: str, versions: dict, log) -> int:
    """Run the suite for `python -m bench --suite distributed` and write distributed.json/.md
    (distributed-quick.* with --quick) into `folder`."""
    if arguments.device != "cpu":
        raise SystemExit("--suite distributed measures CPU ranks (gloo); pass --device cpu")
    shapes = QUICK_SHAPES if arguments.quick else SHAPES
    repeats = QUICK_REPEATS if arguments.quick else REPEATS
    total_threads = arguments.threads or torch.get_num_threads()
    os.makedirs(folder, exist_ok=True)
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        for ranks in RANKS:
            rows += _run_group(ranks, shapes, arguments.dtypes, repeats,
                               max(1, total_threads // ranks), scratch, log)
    device = torch.device("cpu")
    result = {
        "suite": "distributed",
        "quick": arguments.quick,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), "-m", "bench", *argv]),
        "device": {"type": "cpu", "description": measure.device_description(device),
                   "threads": total_threads, "cores": os.cpu_count(),
                   # other processes' load skews every time on a shared machine
                   "load_average_1min": [load_before, os.getloadavg()[0]]},
        "versions": versions,
        "rows": rows,
    }
    stem = "distributed" + ("-quick" if arguments.quick else "")
    paths = [os.path.join(folder, stem + ".json"), os.path.join(folder, stem + ".md")]
    with open(paths[0], "w") as handle:
        json.dump(result, handle, indent=1)
    with open(paths[1], "w") as handle:
        handle.write(_markdown(result))
    widths = [max(len(line[i]) for line in [HEADER, *_cells(rows)]) for i in range(len(HEADER))]
    for line in [HEADER, *_cells(rows)]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
    print("wrote", ", ".join(paths))
    return 0
