"""The cards the census predicts for: every machine constant in one place, with its source."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    name: str
    copy_bandwidth: float  # bytes/s, read + write, of a device-to-device copy (the bench's yardstick)
    copy_source: str
    sms: int
    # SM clock under sustained load: 1.98 GHz is the boost ceiling (datasheet; nvidia-smi read it
    # on an H200 just after a matrix product); memory-bound kernels at 700 W run nearer 1.75 GHz,
    # and the H100 calibration (bench/results/census/calibration.md) fits 1.755 better than 1.98.
    clock_hz: float
    l2_bytes: int
    # Per SM and clock (Hopper, compute capability 9.0; CUDA C++ Programming Guide, "Arithmetic
    # Instructions" throughput table and the compute-capability feature table):
    issue_per_sm: int = 4  # warp instructions: 4 schedulers, one instruction each per clock
    fp32_lanes: int = 128
    mufu_lanes: int = 16  # special-function unit (ex2, rcp, rsqrt, lg2, sin, cos)
    registers_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    shared_per_sm: int = 233472  # 228 KiB; 1 KiB of it is reserved per resident block
    shared_reserved_per_block: int = 1024
    # A kernel launch as the torch extension makes it, GPU side: from one kernel's end to the next
    # one's start when launches queue back to back (a few microseconds on Hopper).
    launch_s: float = 3e-6

    @property
    def issue_rate(self) -> float:
        """Thread instructions per second the whole card can issue."""
        return self.sms * self.issue_per_sm * 32 * self.clock_hz

    @property
    def mufu_rate(self) -> float:
        """Thread MUFU operations per second."""
        return self.sms * self.mufu_lanes * self.clock_hz


CARDS = {
    "H100": Card(
        name="H100", copy_bandwidth=2961e9,
        copy_source="measured: bench/results/nvidia-h100-80gb-hbm3/lif-gpu-check.md (H100 SXM 80GB "
                    "HBM3, 2961 GB/s read + write; 3.35 TB/s HBM3 by the datasheet)",
        sms=132, clock_hz=1.755e9,
        l2_bytes=50 * 2**20,  # H100 SXM5 (NVIDIA Hopper architecture whitepaper)
    ),
    "H200": Card(
        name="H200", copy_bandwidth=4.3e12,
        copy_source="measured through PyTorch on an H200 SXM machine, 2026-10-28: 8.6 GB read + "
                    "written in 2.0 ms (4.8 TB/s HBM3e by the datasheet)",
        sms=132, clock_hz=1.755e9,
        l2_bytes=60 * 2**20,  # as torch.cuda.get_device_properties reported it there
    ),
}
