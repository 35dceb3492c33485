"""Timing, bandwidth, memory and device facts shared by the benchmark suites."""

from __future__ import annotations

import math
import platform
import re
import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch.utils import benchmark as torch_benchmark


@dataclass
class Timing:
    """Seconds per call: the median and interquartile range of the timed samples."""

    median_s: float
    iqr_s: float
    samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def _quartiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    low, median, high = statistics.quantiles(samples, n=4, method="inclusive")
    return low, median, high


class CpuTimer:
    """torch.utils.benchmark's blocked_autorange, with every thread torch would use.

    Samples are per-block means (a block repeats the call enough times to dwarf the timer's
    resolution), so the IQR is the spread between blocks. Calls so slow that the run time
    holds few blocks get more blocks, up to `min_samples`, so that the IQR means something.
    """

    def __init__(self, min_run_time_s: float, min_samples: int, warmup_calls: int = 2):
        self.min_run_time_s = min_run_time_s
        self.min_samples = min_samples
        self.warmup_calls = warmup_calls

    def time(self, call: Callable[[], object]) -> Timing:
        for _ in range(self.warmup_calls):
            call()
        timer = torch_benchmark.Timer(
            "call()", globals={"call": call}, num_threads=torch.get_num_threads()
        )
        measurement = timer.blocked_autorange(min_run_time=self.min_run_time_s)
        samples = list(measurement.times)
        while len(samples) < self.min_samples:
            samples += timer.timeit(number=measurement.number_per_run).times
        low, median, high = _quartiles(samples)
        return Timing(median_s=median, iqr_s=high - low, samples=len(samples))


class CudaTimer:
    """CUDA events around each call after a warm-up, like triton.testing.do_bench.

    The number of timed calls is chosen so that they take about `target_s` in all.
    """

    def __init__(self, target_s: float, warmup_s: float = 0.025, max_calls: int = 2000):
        self.target_s = target_s
        self.warmup_s = warmup_s
        self.max_calls = max_calls

    def time(self, call: Callable[[], object]) -> Timing:
        call()  # first call: compilation, autotuning, allocator growth
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            call()
        end.record()
        torch.cuda.synchronize()
        estimate_s = max(start.elapsed_time(end) / 3e3, 1e-7)
        for _ in range(max(1, math.ceil(self.warmup_s / estimate_s))):
            call()
        calls = int(min(self.max_calls, max(10, math.ceil(self.target_s / estimate_s))))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
        for begin, finish in zip(starts, ends):
            begin.record()
            call()
            finish.record()
        torch.cuda.synchronize()
        samples = [begin.elapsed_time(finish) / 1e3 for begin, finish in zip(starts, ends)]
        low, median, high = _quartiles(samples)
        return Timing(median_s=median, iqr_s=high - low, samples=calls)


def device_microseconds(events, device_type) -> float:
    """Summed durations of the profiler's events on `device_type` (each kernel, copy and memset
    is one event of its own there)."""
    return sum(event.time_range.elapsed_us() for event in events if event.device_type == device_type)


def device_seconds_per_call(call: Callable[[], object], calls: int = 10) -> float | None:
    """The GPU's own time per call: the device work the profiler records over `calls` calls, per
    call. CUDA events around a call measure the longer of the host's and the GPU's time, and a call
    whose kernels are short takes the host's; this is what the kernels take, the figure the cost
    census predicts. None when the profiler recorded no device work."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    total = device_microseconds(profile.events(), torch.autograd.DeviceType.CUDA)
    return total / calls / 1e6 if total > 0 else None


def make_timer(device: torch.device, quick: bool):
    if device.type == "cuda":
        return CudaTimer(target_s=0.05 if quick else 0.2)
    return CpuTimer(min_run_time_s=0.02 if quick else 0.4, min_samples=3 if quick else 5)


def cache_bytes(device: torch.device) -> int:
    """Size of the last cache level the inputs could sit in (L2 on CUDA, LLC on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    largest = 0
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as size_file:
                text = size_file.read().strip()
        except OSError:
            break
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        largest = max(largest, int(text.rstrip("KMG")) * scale)
    return largest or 32 << 20  # unknown: assume a large server LLC


def rotation_count(bytes_per_call: int, cache: int, limit: int = 32) -> int:
    """Input sets to cycle through so that each call finds its inputs out of cache.

    Enough sets that the calls between two uses of one set touch four times the cache.
    """
    return int(min(limit, max(1, math.ceil(4 * cache / max(bytes_per_call, 1)))))


def copy_bandwidth(device: torch.device, timer, cache: int) -> dict:
    """Device-to-device copy bandwidth (bytes read + bytes written per second)."""
    size = max(1 << 30 if device.type == "cuda" else 64 << 20, 4 * cache)
    source = torch.rand(size // 4, device=device)
    target = torch.empty_like(source)
    timing = timer.time(lambda: target.copy_(source))
    moved = 2 * source.numel() * source.element_size()
    return {"bytes_per_call": moved, "timing": timing.as_dict(), "bytes_per_s": moved / timing.median_s}


def peak_extra_bytes(device: torch.device, call: Callable[[], object]) -> int | None:
    """Peak memory a call allocates beyond what is live before it (CUDA allocator statistics).

    None on CPU: torch's CPU allocator keeps no statistics to read.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return int(peak)


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def saved_for_backward(
    forward: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]
) -> dict | None:
    """Bytes an implementation keeps alive for its backward, read through saved-tensor hooks.

    Each distinct storage counts once. `residual_bytes` is what the forward writes only for the
    backward (not an input, not the output); `reread_bytes` what the backward reads again of
    the inputs and the output. None when the hooks cannot see inside (a compiled graph that
    refuses them).
    """
    seen: dict[int, torch.Tensor] = {}

    def pack(tensor):
        seen.setdefault(_storage_key(tensor), tensor)
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = forward()
    except Exception:  # noqa: BLE001 - some graphs refuse hooks; then we cannot tell
        return None
    input_keys = {_storage_key(tensor) for tensor in inputs}
    output_key = _storage_key(output)
    residual = reread = 0
    for key, tensor in seen.items():
        size = tensor.untyped_storage().nbytes()
        if key in input_keys or key == output_key:
            reread += size
        else:
            residual += size
    return {"residual_bytes": residual, "reread_bytes": reread}


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{_cpu_model()} ({threads} thread{'' if threads == 1 else 's'})"


def device_folder_name(device: torch.device) -> str:
    """`cpu-<model>` or the CUDA card's name, as a safe folder name."""
    if device.type == "cuda":
        return _sanitize(torch.cuda.get_device_name(device))
    return "cpu-" + _sanitize(_cpu_model())

