"""Full-device cache: the split's SDFs and labels read once into one device tensor each.

Kept in the shard dtype (float16 by default: half the bytes) and converted per batch. A batch is
two `index_select`s and a dtype conversion on the device: no per-sample Python, no DataLoader,
no collate.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from shards import LABEL_DIM, ShardReader

from .batch import Batch
from .loader import Loader, LoaderError
from .plan import EpochPlan, PlanSpec

log = logging.getLogger("pipeline")


def free_memory(device: torch.device) -> int:
    """Bytes free on the device: CUDA free memory, or the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(needed: int, free: int, what: str, device: torch.device) -> None:
    """Refuse to allocate a cache that does not fit, naming both numbers and the alternative."""
    if needed > free:
        raise LoaderError(f"cache: {what} needs {needed / 1e9:.3f} GB on {device}, but only "
                          f"{free / 1e9:.3f} GB are free; stream it with mode='dali' (--loader dali) instead")


class CacheLoader(Loader):
    mode = "cache"

    def __init__(self, reader: ShardReader, split: str, spec: PlanSpec, device: torch.device, *,
                 memory_budget: int | None = None, progress: bool = True):
        super().__init__(reader, split, spec, device)
        lay = reader.layout
        n = len(self.scene_ids)
        needed = n * (lay.sdf_record_bytes + lay.labels_record_bytes)
        free = free_memory(device) if memory_budget is None else int(memory_budget)
        check_fits(needed, free, f"the {split} split ({n:,} scenes)", device)
        dtype = getattr(torch, lay.dtype)
        self.sdf = torch.empty((n,) + (lay.grid,) * 3, dtype=dtype, device=device)
        self.labels = torch.empty((n, lay.max_grasps, LABEL_DIM), dtype=torch.float32, device=device)
        self._row = np.full(reader.manifest["num_records"], -1, dtype=np.int64)  # scene id -> cache row
        self._row[self.scene_ids] = np.arange(n)
        self._load(progress)

    @property
    def resident_bytes(self) -> int:
        return self.sdf.nbytes + self.labels.nbytes

    def _load(self, progress: bool) -> None:
        """Shard by shard: read the split's records into the cache rows.

        On CUDA the reads land in a pinned staging buffer and are copied to the device; on the
        CPU they land in the cache tensor itself. Rows follow ascending scene id.
        """
        start = time.perf_counter()
        shard_of, slot_of = np.divmod(self.scene_ids, self.reader.layout.records_per_shard)
        shards = np.unique(shard_of)
        staging = None
        if self.device.type == "cuda":
            r = self.reader.layout.records_per_shard
            staging = (torch.empty((r,) + self.sdf.shape[1:], dtype=self.sdf.dtype, pin_memory=True),
                       torch.empty((r,) + self.labels.shape[1:], dtype=self.labels.dtype, pin_memory=True))
        row, done = 0, 0
        bar = tqdm(shards, unit="shard", desc=f"cache {self.split}", disable=(not progress) or None, dynamic_ncols=True)
        for shard in bar:
            sel = slot_of[shard_of == shard]
            k = len(sel)
            for i, (kind, cache) in enumerate((("sdf", self.sdf), ("labels", self.labels))):
                dest = cache[row:row + k]
                if staging is None:
                    self.reader.read_records(kind, shard, sel, dest.numpy())
                else:
                    stage = staging[i][:k]
                    self.reader.read_records(kind, shard, sel, stage.numpy())
                    dest.copy_(stage, non_blocking=True)
                    torch.cuda.current_stream(self.device).synchronize()  # before the buffer is refilled
            row += k
            done += k * (self.sdf[0].nbytes + self.labels[0].nbytes)
            bar.set_postfix_str(f"{done / 1e6 / max(time.perf_counter() - start, 1e-9):.0f} MB/s")
        bar.close()
        elapsed = time.perf_counter() - start
        log.info("cache: %s scenes of split %s (%.1f MB, sdf %s) loaded into %s in %.2f s (%.0f MB/s)",
                 f"{row:,}", self.split, self.resident_bytes / 1e6, self.reader.layout.dtype, self.device,
                 elapsed, self.resident_bytes / 1e6 / max(elapsed, 1e-9))

    def _iterate(self, plan: EpochPlan, start: int) -> Iterator[Batch]:
        idx = self._epoch_index(plan)
        rows = torch.from_numpy(self._row[plan.group_scene]).to(self.device)
        label_index = rows[idx["group_of_grasp"]] * self.max_grasps + idx["slots"]
        labels = self.labels.view(-1, LABEL_DIM)
        for b in range(start, len(plan)):
            g0, g1 = plan.groups(b)
            yield self._batch(plan, b, idx, self.sdf.index_select(0, rows[g0:g1]), labels, label_index)

    def close(self) -> None:
        self.sdf = self.labels = None
