"""Data-parallel training of the demo under torchrun (DistributedDataParallel).

`torchrun --nproc_per_node=N -m htakl_kernels.demo ...` starts N processes with the rendezvous
in their environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Each trains a
replica of every model on its share of every batch (gloo on CPU, NCCL on CUDA, one GPU per
process); DistributedDataParallel averages the gradients, so every step sees the whole batch as
one process does. Rank 0 alone reads and writes files (the configuration, checkpoints, results,
the plot), evaluates and prints; it sends what it read to the other ranks, which therefore need
no shared file system. Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) nothing here runs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


class DataParallel:
    """The process group of a torchrun launch, and what the training needs from it."""

    def __init__(self) -> None:
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cpu")
        # CPU tensors through gloo, CUDA tensors through NCCL: the configuration is exchanged
        # before the device is known.
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")

    @staticmethod
    def from_environment() -> "DataParallel | None":
        """The group when launched by torchrun with two or more processes, else None."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        return DataParallel()

    def use_device(self, name: str) -> torch.device:
        """The device this process trains on, for --device `name`: with CUDA (`auto` where there
        is a GPU, `cuda`, `cuda:N`), GPU LOCAL_RANK of its machine, one GPU per process."""
        if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise SystemExit(f"--device {name}: this torch has no usable CUDA device")
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device(name if name != "auto" else "cpu")
        return self.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The replica that trains (its construction copies rank 0's weights to every rank)."""
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's share of one batch's sample indices: every world-th, from its rank. A
        batch smaller than the group is topped up with its own first samples, so that no rank
        gets an empty share (DistributedDataParallel needs every rank to step)."""
        if len(index) < self.world:
            index = index.repeat(-(-self.world // len(index)))[:self.world]
        return index[self.rank::self.world]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object)."""
        holder = [value if self.is_main else None]
        dist.broadcast_object_list(holder, src=0, device=torch.device("cpu"))
        return holder[0]

    def sum(self, value: float) -> float:
        """The sum of `value` over the ranks."""
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total)

    def close(self) -> None:
        dist.destroy_process_group()
