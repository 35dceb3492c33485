"""The census's records: every kernel, dtype, shape and card, predicted (see model.py)."""

from __future__ import annotations

from dataclasses import asdict

from . import hta_kl, lif, model
from .machines import CARDS

LIF_NEURONS = 2**20
LIF_STEPS = (4, 8, 16, 32)
# The benchmark shapes, and those of `python -m bench --quick --device cuda` (so that
# compare.py finds a prediction for every case of a GPU check).
HTA_KL_SHAPES = ((4096, 1000), (4096, 32000), (1024, 131072), (8, 131072), (256, 262144),
                 (1024, 32000), (256, 32000))
HTA_KL_STEPS = (0, 1, 4, 8)  # 0: a 2-D student; T: a [T, R, C] prob_mean student
DTYPES = ("float32", "bfloat16")


def _launch_record(card, launch: model.Launch, timing: model.Timing) -> dict:
    return {
        "name": launch.name, "blocks": launch.blocks, "threads": launch.threads,
        "registers": launch.registers, "shared_bytes": launch.shared_bytes,
        "blocks_per_sm": timing.occupancy_blocks, "active_sms": timing.active_sms,
        "dram_bytes": launch.dram_bytes, "l2_bytes": launch.l2_bytes,
        "thread_instructions": launch.instructions, "mufu": launch.mufu,
        "dram_s": timing.dram_s, "issue_s": timing.issue_s, "mufu_s": timing.mufu_s,
        "l2_s": timing.l2_s, "kernel_s": timing.kernel_s, "bound_by": timing.bound_by,
        "dram_bandwidth": timing.dram_bandwidth, "notes": launch.notes,
    }


def _record(backend, kernel, dtype, card, launches, passes, useful, elements, **shape) -> dict:
    timings = [model.time_launch(card, launch) for launch in launches]
    gpu_s = sum(t.kernel_s for t in timings)
    call_s = sum(model.call_time(t.kernel_s, model.HOST_FLOOR_S[backend]) for t in timings)
    slowest = max(timings, key=lambda t: t.kernel_s)
    return {
        "backend": backend, "kernel": kernel, "dtype": dtype, **shape, "card": card.name,
        "passes": passes,
        "model_bytes": useful,
        "dram_bytes": sum(launch.dram_bytes for launch in launches),
        "instructions_per_element": sum(launch.instructions for launch in launches) / elements,
        "mufu_per_element": sum(launch.mufu for launch in launches) / elements,
        "blocks_per_sm": [t.occupancy_blocks for t in timings],
        "predicted_time_s": gpu_s,
        "predicted_fraction": min(1.0, model.fraction_of_copy(useful, gpu_s, card)),
        "bound_by": slowest.bound_by,
        "predicted_call_time_s": call_s,
        "predicted_call_fraction": min(1.0, model.fraction_of_copy(useful, call_s, card)),
        "call_bound_by": "host" if call_s > gpu_s else slowest.bound_by,
        "launches": [_launch_record(card, launch, t) for launch, t in zip(launches, timings)],
    }


def _pass_records(counts_by_launch) -> list[dict]:
    return [{"launch": launch, **asdict(p)} for launch, counts in counts_by_launch
            for p in counts.passes]


def lif_records(source_root: str, cards, *, steps=LIF_STEPS, dtypes=DTYPES,
                triton_harness: str | None = None, backends=("cuda", "triton")) -> list[dict]:
    kernels = {}
    if "cuda" in backends:
        kernels["cuda"] = lif.cuda_kernels(source_root)
    if "triton" in backends:
        kernels["triton"] = lif.triton_kernels(source_root, triton_harness)
    records = []
    for backend, family in kernels.items():
        for dtype in dtypes:
            passes = _pass_records((d, family[d, dtype][1]) for d in ("forward", "backward"))
            for card in cards:
                for t in steps:
                    launches = lif.launches(card, family, dtype, t, LIF_NEURONS)
                    records.append(_record(
                        backend, "lif", dtype, card, launches, passes,
                        lif.model_bytes(dtype, t, LIF_NEURONS), t * LIF_NEURONS,
                        steps=t, neurons=LIF_NEURONS))
    return records


def hta_kl_records(source_root: str, cards, *, shapes=HTA_KL_SHAPES, steps=HTA_KL_STEPS,
                   dtypes=DTYPES, backends=("cuda", "triton")) -> list[dict]:
    kernels = {}
    if "cuda" in backends:
        kernels["cuda"] = hta_kl.CudaKernels(source_root)
    if "triton" in backends:
        kernels["triton"] = hta_kl.TritonKernels(source_root)
    records = []
    for backend, family in kernels.items():
        for dtype in dtypes:
            for t in steps:
                for rows, classes in shapes:
                    for card in cards:
                        pairs = hta_kl.launches(card, family, dtype, t, rows, classes)
                        records.append(_record(
                            backend, "hta_kl", dtype, card, [launch for launch, _ in pairs],
                            _pass_records((launch.name, counts) for launch, counts in pairs),
                            hta_kl.model_bytes(dtype, t, rows, classes), rows * classes,
                            steps=t, rows=rows, classes=classes))
    return records


def cards(names) -> list:
    unknown = [n for n in names if n not in CARDS]
    if unknown:
        raise ValueError(f"--cards: unknown {unknown}; known: {sorted(CARDS)}")
    return [CARDS[n] for n in names]
