"""The prediction's arithmetic: occupancy, the three times of a launch, the fraction of copy
bandwidth under SPEC section 4's byte model.

A launch takes the longest of
  * DRAM time: its DRAM bytes over the bandwidth it can draw, which is the copy bandwidth or, when
    too few loads are in flight to cover the memory latency, bytes in flight / latency (Little's
    law: a few blocks on a few SMs cannot keep HBM busy);
  * issue time: its thread instructions over what the SMs that have work can issue (4 warp
    instructions per SM and clock), stretched by the last, partial wave of blocks;
  * MUFU time: its special-function operations over 16 per SM and clock, likewise;
  * L2 time: the bytes its passes read through L2 (a multi-pass kernel re-reads its rows there)
    over what the SMs with work can draw from L2, or what their loads in flight allow;
plus the gap between back-to-back launches, plus OVERLAP_LOSS times the second largest (a
thread of these kernels issues its loads, waits, then computes: with a few warps per scheduler
the memory and compute phases overlap only in part).

The issue time assumes every scheduler issues each clock, which needs a ready warp each clock. A
launch may state how many cycles one of its warps takes from one instruction to its next on
average (`Launch.warp_issue_interval`: dependent latencies, shared-memory and L2 round trips,
barriers); a scheduler with w resident warps then issues min(1, w / interval) per clock, so a
kernel with few resident warps issues slower (HTA-KL on the H200: a block of 16 warps alone on
its SM ran at about one warp instruction per clock, a quarter of the SM's peak).

An op call as the benchmarks time it (one call at a time from Python) takes at least the host's
time to issue it, whatever the kernels need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .machines import Card

# Global-memory latency under load on Hopper: about 500 ns unloaded (published microbenchmarks
# of the H100 put it near 470-480 ns); loaded HBM adds queueing, hence the round figure used for
# the bytes-in-flight limit.
DRAM_LATENCY_S = 600e-9

# L2 to SM: Hopper's L2 returns about 64 bytes per clock to each SM (published microbenchmarks
# measure 60-120 B/clk/SM; the low end, as a kernel on few SMs sees it), at about 200 ns latency
# (260-300 cycles) under load.
L2_BYTES_PER_CLOCK_PER_SM = 64
L2_LATENCY_S = 200e-9

# Share of the second-largest time that is not hidden under the largest. 0 is the ideal roofline
# (perfect overlap), 1 no overlap at all. Fitted on the H100 LIF measurements (16 rows, CUDA and
# Triton, float32 and bfloat16; bench/results/census/calibration.md): 0.5 brings every row within
# 10 points of the measured fraction, where 0 leaves misses up to 19 points and 1 up to 22.
OVERLAP_LOSS = 0.5

# An op call timed on its own (the benchmarks' CUDA events around one call) lasts at least the
# host's time to issue it: Python, the dispatcher, the op's checks and allocations. From the H100
# run (bench/results/nvidia-h100-80gb-hbm3/lif-gpu-check.md): the shortest forward calls, whose
# kernels need under 20 us, took 25-34 us through the CUDA extension and 65-69 us through
# Triton's launcher.
HOST_FLOOR_S = {"cuda": 30e-6, "triton": 67e-6}


@dataclass
class Launch:
    """One kernel launch: its shape, resources and totals over the whole grid."""

    name: str
    blocks: int
    threads: int  # per block
    registers: int  # per thread
    shared_bytes: int  # per block, static + dynamic
    dram_bytes: float
    instructions: float  # thread instructions issued, whole grid
    mufu: float  # thread MUFU operations, whole grid
    inflight_bytes_per_thread: float  # global bytes one thread has requested before it waits
    l2_bytes: float = 0.0  # bytes read through L2 (re-reads of a multi-pass kernel included)
    notes: list[str] = field(default_factory=list)
    # Cycles from one instruction of a warp to its next, on average (1: a warp can issue every
    # clock, the ideal roofline); see the module's docstring.
    warp_issue_interval: float = 1.0


def blocks_per_sm(card: Card, threads: int, registers: int, shared_bytes: int) -> int:
    """Resident blocks per SM, from threads, registers (allocated per warp in units of 256) and
    shared memory (plus the 1 KiB the driver reserves per block)."""
    warps = math.ceil(threads / 32)
    registers_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = (card.registers_per_sm // registers_per_warp) // warps
    by_threads = card.max_threads_per_sm // (warps * 32)
    by_shared = card.shared_per_sm // (shared_bytes + card.shared_reserved_per_block)
    return max(0, min(by_registers, by_threads, by_shared, card.max_blocks_per_sm))


def issue_share(card: Card, launch: Launch, per_sm: int) -> float:
    """The share of the schedulers' clocks an SM with work issues in: min(1, resident warps per
    scheduler / launch.warp_issue_interval); 1 for an interval of 1 (the ideal roofline)."""
    if launch.warp_issue_interval <= 1.0:
        return 1.0
    blocks = min(per_sm, math.ceil(launch.blocks / min(card.sms, launch.blocks)))
    warps_per_scheduler = blocks * math.ceil(launch.threads / 32) / card.issue_per_sm
    return min(1.0, warps_per_scheduler / launch.warp_issue_interval)


@dataclass
class Timing:
    dram_s: float
    issue_s: float
    mufu_s: float
    l2_s: float
    kernel_s: float  # the largest term, OVERLAP_LOSS times the second, plus the launch gap
    # "dram", "latency" (DRAM, with too few bytes in flight), "issue", "mufu" or "l2"
    bound_by: str
    occupancy_blocks: int
    active_sms: int
    dram_bandwidth: float  # what the launch can draw


def time_launch(card: Card, launch: Launch, overlap_loss: float | None = None) -> Timing:
    """`overlap_loss`: OVERLAP_LOSS unless given (0 gives the plain roofline)."""
    overlap_loss = OVERLAP_LOSS if overlap_loss is None else overlap_loss
    per_sm = blocks_per_sm(card, launch.threads, launch.registers, launch.shared_bytes)
    if per_sm == 0:
        raise ValueError(f"{launch.name}: a block of {launch.threads} threads, "
                         f"{launch.registers} registers and {launch.shared_bytes} B of shared "
                         f"memory does not fit on an SM")
    active_sms = min(card.sms, launch.blocks)
    wave = card.sms * per_sm
    waves = math.ceil(launch.blocks / wave)
    # Work is spread over active_sms SMs; the last wave leaves part of them idle.
    wave_efficiency = launch.blocks / (waves * wave) if launch.blocks > wave else 1.0
    compute_share = active_sms / card.sms * wave_efficiency
    resident_threads = min(launch.blocks, wave) * launch.threads
    latency_bandwidth = resident_threads * launch.inflight_bytes_per_thread / DRAM_LATENCY_S
    bandwidth = min(card.copy_bandwidth, latency_bandwidth)
    dram_s = launch.dram_bytes / bandwidth
    l2_bandwidth = min(active_sms * L2_BYTES_PER_CLOCK_PER_SM * card.clock_hz,
                       resident_threads * launch.inflight_bytes_per_thread / L2_LATENCY_S)
    l2_s = launch.l2_bytes / l2_bandwidth
    issue_s = launch.instructions / (card.issue_rate * compute_share * issue_share(card, launch,
                                                                                  per_sm))
    mufu_s = launch.mufu / (card.mufu_rate * compute_share)
    terms = {"dram" if bandwidth == card.copy_bandwidth else "latency": dram_s,
             "issue": issue_s, "mufu": mufu_s, "l2": l2_s}
    bound_by = max(terms, key=terms.get)
    second = sorted(terms.values())[-2]
    kernel_s = card.launch_s + terms[bound_by] + overlap_loss * second
    return Timing(dram_s, issue_s, mufu_s, l2_s, kernel_s, bound_by, per_sm, active_sms,
                  bandwidth)


def call_time(kernel_s: float, host_floor_s: float) -> float:
    """An op call timed on its own: the GPU waits for the host when the host is slower."""
    return max(kernel_s, host_floor_s)


def fraction_of_copy(model_bytes: float, seconds: float, card: Card) -> float:
    """SPEC 4's achieved bandwidth as a fraction of the copy bandwidth."""
    return model_bytes / seconds / card.copy_bandwidth
