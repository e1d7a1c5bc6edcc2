"""Full-device cache: this rank's shards of the split read once into one device tensor each.

Kept in the shard dtype (float16 by default: half the bytes) and converted per batch. Reads are
whole runs of records (one positional read per shard, straight into the cache on the CPU, through
two pinned staging buffers on CUDA so reading one shard overlaps copying the last); every record
is checked against the index as it arrives. A batch is two `index_select`s and a dtype conversion
on the device: no per-sample Python, no DataLoader, no collate.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from gq.common.memory import available_memory
from gq.shards import LABEL_DIM

from .base import PREFETCH_SHARDS, Loader, LoaderError
from .dataset import LocalLease, ShardDataset
from .plan import EpochPlan, PlanSpec

log = logging.getLogger("pipeline")

# Shards read at once from a remote dataset's local copies (a local dataset is read on every core): each is held
# in the cache while it is read, so the cache limit must hold these beside the ones downloading ahead.
CACHED_READ_THREADS = 4


def free_memory(device: torch.device) -> int:
    """Bytes free on the device: CUDA free memory, or the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_memory()


def check_fits(
    needed: int,
    free: int,
    *,
    what: str,
    device: torch.device,
    advice: str = "stream it with mode='dali' (--loader dali) instead",
) -> None:
    """Refuse to allocate what does not fit, naming both numbers and the alternative."""
    if needed > free:
        raise LoaderError(
            f"{what} needs {needed / 1e9:.3f} GB on {device}, but only {free / 1e9:.3f} GB are free; {advice}"
        )


class CacheLoader(Loader):
    mode = "cache"

    def __init__(
        self,
        dataset: ShardDataset,
        *,
        split: str,
        spec: PlanSpec,
        device: torch.device,
        memory_budget: int | None = None,
        progress: bool = True,
    ):
        super().__init__(dataset, split=split, spec=spec, device=device)
        self.memory_budget, self.progress = memory_budget, progress
        # Cache row i holds split record resident[i]: this rank's records (by shard, then slot), then the
        # extra records the rest of an epoch begun on another world size uses (none otherwise).
        self.resident = np.zeros(0, dtype=np.int64)
        self._row = np.full(self._record.shape, -1, dtype=np.int64)  # (shard, slot) -> row
        self.load_s = self.check_s = 0.0
        self._hold(self.mine)

    @property
    def resident_bytes(self) -> int:
        return self.sdf.nbytes + self.labels.nbytes

    def _rows(self, plan: EpochPlan) -> np.ndarray:
        return self._row[plan.group_shard, plan.group_slot]

    def _begin_epoch(self, plan: EpochPlan, start: int) -> None:
        """Hold this rank's records and those of the plan: more for the rest of an epoch begun on another
        world size (its groups were dealt without regard to ownership), only its own again afterwards."""
        extra = np.setdiff1d(self._record[plan.group_shard, plan.group_slot], self.mine)
        self._hold(np.concatenate([self.mine, extra]))

    def _hold(self, records: np.ndarray) -> None:
        """Make the cache hold exactly `records` (this rank's first): rows already there stay, the rest is read."""
        if np.array_equal(records, self.resident):
            return
        lay = self.reader.layout
        keep = len(self.mine) if len(self.resident) else 0  # both begin with this rank's records
        n = len(records)
        check_fits(  # while the rows kept are copied over, the old cache is still held: ask for all of the new one
            n * (lay.sdf_record_bytes + lay.labels_record_bytes),
            free_memory(self.device) if self.memory_budget is None else int(self.memory_budget),
            what=f"cache: the {self.split} split's records of rank {self.spec.rank} in {len(self.shards)} shards "
            f"({n:,} scenes)",
            device=self.device,
        )
        sdf = torch.empty((n,) + (lay.grid,) * 3, dtype=getattr(torch, lay.dtype), device=self.device)
        labels = torch.empty((n, lay.max_grasps, LABEL_DIM), dtype=torch.float32, device=self.device)
        if keep:
            sdf[:keep].copy_(self.sdf[:keep])
            labels[:keep].copy_(self.labels[:keep])
        self.sdf, self.labels, self.resident = sdf, labels, records
        self._row[:] = -1
        self._row[self.records.shard[records], self.records.slot[records]] = np.arange(n)
        if n > keep:
            self._load(keep)

    def _load(self, first: int) -> None:
        """Shard by shard: read the records of rows `first`.. into the cache, checking each shard's records.

        CPU: one task per shard reads it straight into the cache and checks it, on as many threads as
        there are cores (reads and XXH3 release the GIL; the kernel's page zeroing of the fresh cache
        then runs on every core too). CUDA: reads land in one of two pinned buffers, whose copy to the
        device overlaps the next read; the records are then checked on the device.
        """
        start = time.perf_counter()
        shard_of = self.records.shard[self.resident]
        bounds = np.append(first + np.flatnonzero(np.diff(shard_of[first:], prepend=-1)), len(shard_of))
        parts = [(int(shard_of[a]), int(a), int(z)) for a, z in zip(bounds[:-1], bounds[1:])]
        lay = self.reader.layout
        bar = tqdm(
            total=(len(shard_of) - first) * (lay.sdf_record_bytes + lay.labels_record_bytes),
            unit="B",
            unit_scale=True,
            desc=f"cache {self.split}",
            disable=(not self.progress) or None,
            dynamic_ncols=True,
        )
        # Shards are held in the cache only while they are read (and a few ahead, downloading): the lease ends
        # with the load, and so does its share of the cache limit.
        cores = os.cpu_count() or 1
        self.lease = self._lease(min(cores, CACHED_READ_THREADS) + PREFETCH_SHARDS)
        try:
            if self.device.type == "cuda":
                self._load_staged(parts, bar, first)
            else:
                self._load_parallel(parts, bar, min(cores, CACHED_READ_THREADS) if self.lease.bounded else cores)
        finally:
            self.lease.close()
            self.lease, self._window = LocalLease(), []
        bar.close()
        took = time.perf_counter() - start
        self.load_s += took
        log.info(
            "cache: %s scenes of split %s, rank %d of %d (%.1f MB, sdf %s) loaded into %s and checked in "
            "%.2f s (%.0f MB/s; checks %.2f s)%s",
            f"{len(self.resident) - first:,}",
            self.split,
            self.spec.rank,
            self.spec.world_size,
            self.resident_bytes / 1e6,
            self.reader.layout.dtype,
            self.device,
            took,
            self.resident_bytes / 1e6 / max(took, 1e-9),
            self.check_s,
            f", besides its own {first:,}: the rest of an epoch begun on another world size" if first else "",
        )

    def _load_parallel(self, parts: list[tuple[int, int, int]], bar: tqdm, threads: int) -> None:
        """CPU: read shards on `threads` threads, in order; the shards read and the next few are held local."""
        shards = [shard for shard, _, _ in parts]
        with ThreadPoolExecutor(threads) as pool:
            reading: deque[Future] = deque()
            for i, part in enumerate(parts):
                if len(reading) == threads:
                    bar.update(reading.popleft().result())  # in shard order: the first bad record's error is raised
                self._keep_local(shards[i - len(reading) : i + 1 + PREFETCH_SHARDS], ready=len(reading) + 1)
                reading.append(pool.submit(self._load_shard, *part))
            while reading:
                bar.update(reading.popleft().result())

    def _load_shard(self, shard: int, a: int, z: int) -> int:
        """Read one shard's records into cache rows a..z and check them; returns the bytes read."""
        dest = (self.sdf[a:z], self.labels[a:z])
        slots = self.records.slot[self.resident[a:z]]
        for kind, part in zip(("sdf", "labels"), dest):
            self.reader.read_records(kind, shard, slots, part.numpy())
        self._timed_check(*dest, self.resident[a:z])
        return dest[0].nbytes + dest[1].nbytes

    def _load_staged(self, parts: list[tuple[int, int, int]], bar: tqdm, first: int) -> None:
        """CUDA: read each shard into one of two pinned buffers and copy it to the device while the next is read."""
        r = self.reader.layout.records_per_shard
        staging = [
            (
                torch.empty((r,) + self.sdf.shape[1:], dtype=self.sdf.dtype, pin_memory=True),
                torch.empty((r,) + self.labels.shape[1:], dtype=self.labels.dtype, pin_memory=True),
            )
            for _ in range(2)
        ]
        copied: list[torch.cuda.Event | None] = [None, None]
        shards = [shard for shard, _, _ in parts]
        for i, (shard, a, z) in enumerate(parts):
            self._keep_local(shards[i : i + 1 + PREFETCH_SHARDS], ready=1)
            if copied[i % 2] is not None:
                copied[i % 2].synchronize()  # this buffer's last copy to the device has finished
            stage = (staging[i % 2][0][: z - a], staging[i % 2][1][: z - a])
            slots = self.records.slot[self.resident[a:z]]
            for kind, part in zip(("sdf", "labels"), stage):
                self.reader.read_records(kind, shard, slots, part.numpy())
            for dest, part in zip((self.sdf[a:z], self.labels[a:z]), stage):
                dest.copy_(part, non_blocking=True)
            copied[i % 2] = torch.cuda.Event()
            copied[i % 2].record()
            bar.update(stage[0].nbytes + stage[1].nbytes)
        torch.cuda.synchronize(self.device)
        self._timed_check(self.sdf[first:], self.labels[first:], self.resident[first:])

    def _timed_check(self, sdf: torch.Tensor, labels: torch.Tensor, records: np.ndarray) -> None:
        t = time.perf_counter()
        self._check(sdf, labels, records)
        self.check_s += time.perf_counter() - t
