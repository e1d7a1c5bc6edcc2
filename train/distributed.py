"""One process per GPU under torchrun: rank, world size and device from the environment.

NCCL on GPUs, gloo on CPU. Multi-node is torchrun's rendezvous, not code of ours: the device is the
LOCAL_RANK-th GPU of its node; what only one process may do (hold the run folder, write) is global
RANK 0's. A worker that torchrun restarts after a failure continues the run from its last.pt, if that run
is its own job's.
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

from .config import ConfigError, FitConfig

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
        return is_main_rank(self.rank)

    @classmethod
    def from_env(cls, device_type: str) -> Distributed:
        """Read torchrun's variables and join the process group when there is more than one rank."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        dist = cls(env_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
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


def env_rank() -> int:
    """This process's global rank as torchrun gives it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def is_main_rank(rank: int | None = None) -> bool:
    """Whether `rank` (default: this process's) is the main rank: the one that holds and writes the run
    folder and speaks for the job. The one place that decides it."""
    return (env_rank() if rank is None else rank) == 0


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0: the first start, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def job_id() -> str | None:
    """The torchrun job this process belongs to (its rendezvous run id: --standalone makes a fresh one per job,
    multi-node jobs name theirs with --rdzv-id), the same for every attempt of the job; None without torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def resume_on_restart(cfg: FitConfig) -> FitConfig:
    """`cfg` as a restarted worker must run it: continuing from last.pt as --resume would, never --overwrite-ing it.

    Only the run this very job holds: its config.json names the job (written when a job starts or resumes a
    run). Anything else (a run of another job, which refused this one: a refusal is final; a folder this
    job never wrote in) is a ConfigError, said by each rank at once, so no restart trains or rewrites another
    job's run. Without last.pt (the failure came before the first checkpoint) this job's run is started over.
    """
    if not restart_count():
        return cfg
    out = Path(cfg.out)
    try:
        config = json.loads((out / "config.json").read_text())
        holder = config["resolved"]["job"]
    except (OSError, ValueError, KeyError, TypeError):
        config, holder = None, None
    if config is None and not (out / "last.pt").exists():
        return cfg  # the first attempt failed before it wrote anything of a run: the usual checks apply
    if holder is None or holder != job_id():
        raise ConfigError(
            f"--out {out}: restart {restart_count()} of job {job_id()}: the run there is not this job's (another "
            f"job's run, which refused this one, or an older run); not resumed. Resume it yourself once nothing "
            f"else holds it: gq fit --out {out} --resume"
        )
    if (out / "last.pt").exists():
        if is_main_rank():
            log.warning("restart %d of the job's workers: resuming from %s", restart_count(), out / "last.pt")
        return dataclasses.replace(cfg, resume=True, overwrite=False)
    return dataclasses.replace(cfg, overwrite=True) if config["options"] == cfg.to_dict() else cfg


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
