"""One process per GPU under torchrun: rank, world size and device from the environment.

NCCL on GPUs, gloo on CPU. Multi-node is torchrun's rendezvous, not code of ours: the device is the
LOCAL_RANK-th GPU of its node; what only one process may do (hold the run folder, write) is global
RANK 0's. A worker that torchrun restarts after a failure continues the run from its last.pt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.distributed.constants import default_pg_timeout

from .config import FitConfig

log = logging.getLogger("train")


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
            backend = "nccl" if device_type == "cuda" else "gloo"
            store = _attempt_store(world)
            if store is None:
                torch_dist.init_process_group(backend)
            else:
                torch_dist.init_process_group(backend, store=store, rank=dist.rank, world_size=world)
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


def _attempt_store(world_size: int) -> torch_dist.Store | None:
    """On a restart under torchrun, the job's store seen through a namespace of this attempt's own; else None.

    torchrun keeps one store (its agent's) for the whole job, across restarts, though torch's env://
    rendezvous no longer prefixes keys by attempt: a restarted process group would read the keys the
    failed attempt's group left (its workers' addresses) and hang, or be refused a connection to a
    dead worker. Every worker of a restart has the same TORCHELASTIC_RESTART_COUNT, so it names the namespace.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not restart_count():
        return None
    store = torch_dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
        timeout=default_pg_timeout,
    )  # fmt: skip
    return torch_dist.PrefixStore(f"gq/attempt-{restart_count()}", store)


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0: the first start, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def resume_on_restart(cfg: FitConfig) -> FitConfig:
    """`cfg` as a restarted worker must run it: continuing from last.pt as --resume would, never --overwrite-ing it.

    Without last.pt (the failure came before the first checkpoint) a folder holding this very run's
    config.json (same options) is started over; anything else is left to the usual checks.
    """
    if not restart_count() or cfg.resume:
        return cfg
    out = Path(cfg.out)
    if (out / "last.pt").exists():
        if int(os.environ.get("RANK", "0")) == 0:
            log.warning("restart %d of the job's workers: resuming from %s", restart_count(), out / "last.pt")
        return dataclasses.replace(cfg, resume=True, overwrite=False)
    try:
        ours = json.loads((out / "config.json").read_text())["options"] == cfg.to_dict()
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    return dataclasses.replace(cfg, overwrite=True) if ours else cfg


def world_change_note(saved: dict, *, cfg: FitConfig, world_size: int, rest: int) -> str:
    """The line said when a run saved on another number of ranks resumes (a loader state `saved`, `rest`
    steps left in its epoch); '' if the number is the same."""
    was = int(saved.get("world_size", world_size))
    if was == world_size:
        return ""
    s, g = cfg.scenes_per_batch, cfg.grasps_per_sdf
    midway = saved["position"] or saved.get("past")
    then = (
        f"the rest of epoch {saved['epoch']} trains the groups no rank had trained yet, in {rest} steps; "
        if midway
        else ""
    )
    return (
        f"resuming a run saved on {was} ranks on {world_size}: {then}a step now trains {world_size} x {s} scenes "
        f"x {g} grasps (was {was} x {s}), so the effective learning rate changes with the global batch "
        f"(-S and --lr are kept per rank and per step)"
    )
