"""One process per GPU under torchrun: rank, world size and device from the environment.

NCCL on GPUs, gloo on CPU. Multi-node is torchrun's rendezvous, not code of ours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> Distributed:
        """Read torchrun's variables and join the process group when there is more than one rank."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        dist = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return dist

    def device(self, requested: torch.device) -> torch.device:
        """Each rank drives its own GPU (its local rank)."""
        if requested.type == "cuda" and self.enabled:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return requested

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def shutdown(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
