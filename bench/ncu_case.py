"""One forward + backward of each fused kernel at a shape its performance target names, for Nsight
Compute on a GPU machine (bench/gpu_check.sh runs it under `ncu`):

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section MemoryWorkloadAnalysis -k regex:'hta_kl|lif_' python3 bench/ncu_case.py

The census predicts these kernels from their SASS; ncu's counters say where a measured kernel
actually waits (warp stall reasons), how many warps it keeps resident and how much of DRAM's
bandwidth it draws, which is what the census must get right. Each call runs once (ncu replays
each kernel once per section it collects), on random logits, never zeros.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import htakl_kernels as hk  # noqa: E402


def hta_kl(backend: str, shape, dtype: torch.dtype) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    student = (3 * torch.randn(shape, generator=generator, device="cuda")).to(dtype)
    teacher = (3 * torch.randn(shape[-2:], generator=generator, device="cuda")).to(dtype)
    student.requires_grad_(True)
    loss = hk.hta_kl_div(student, teacher, temperature=2.0, delta=0.5, backend=backend)
    loss.backward()


def lif(backend: str, steps: int, dtype: torch.dtype) -> None:
    generator = torch.Generator(device="cuda").manual_seed(1)
    x = (1 + torch.randn(steps, 1 << 20, generator=generator, device="cuda")).to(dtype)
    x.requires_grad_(True)
    spikes = hk.lif_multistep(x, backend=backend)
    spikes.backward(torch.randn_like(spikes))


def main() -> int:
    for backend in ("cuda", "triton"):
        hta_kl(backend, (4096, 32000), torch.bfloat16)
        hta_kl(backend, (1024, 131072), torch.float32)
        lif(backend, 32, torch.float32)
    torch.cuda.synchronize()
    print("ncu cases ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
