"""Streaming loader: DALI reads this rank's shards whole, a window ahead; batches are cut from resident shards.

Two `fn.readers.numpy` readers (SDF files, labels files) walk the shard order of this and the next
epochs (`EPOCHS_PER_PIPELINE` of them), one whole shard per iteration, with no region of interest:
every byte is read once per epoch, which is what DALI's GPU reader (GPUDirect Storage) does anyway,
and its CPU reader then does in long sequential reads. Listing many epochs ahead matters because
DALI's readers run ahead of the consumer and wrap around at the end of their file list: a list of
one epoch would re-read its first shards at every epoch's end. With CUDA the readers run on the GPU
and the data stays there; without it they run on the CPU with `device_id=None`. DALI's prefetch
queue holds the next window while the current one is used. Arriving shards are copied into a ring
of resident shards (as many as a batch can span), checked against the index (`checks.py`), and
batches are cut from the ring by the same index operations as the cache's.

A remote dataset's shards are read from the local cache, where DALI must find each one it opens: the loader
holds the shards of listed positions delivered .. delivered + prefetch + DALI_READS_AHEAD (what DALI may read
before the next `next()`) local before it opens the pipeline and before each `next()`, with PREFETCH_SHARDS more
downloading behind them, and releases each once it is copied into the ring.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from gq.shards import LABEL_DIM

from .base import PREFETCH_SHARDS, Loader, LoaderError
from .cache import check_fits, free_memory
from .dataset import ShardDataset
from .plan import EpochPlan, PlanSpec, shard_order

# Epochs of shard order one pipeline lists (it is rebuilt after them, or when iteration jumps).
EPOCHS_PER_PIPELINE = 64
# Shards DALI's numpy reader may have opened beyond `prefetch` past the last one delivered: its own read-ahead
# of one sample and the one it reads while the consumer takes another. Measured: with DALI 2.4 on the CPU it
# reads positions < delivered + prefetch + 3, before `next()` returns position delivered; one more for margin.
DALI_READS_AHEAD = 4


class DaliLoader(Loader):
    mode = "dali"

    def __init__(
        self,
        dataset: ShardDataset,
        *,
        split: str,
        spec: PlanSpec,
        device: torch.device,
        prefetch: int | None = None,
        num_threads: int | None = None,
    ):
        super().__init__(dataset, split=split, spec=spec, device=device)
        window = min(spec.window or len(self.shards), len(self.shards))
        self.prefetch = max(1, window) if prefetch is None else prefetch
        if self.prefetch < 1:
            raise LoaderError(f"prefetch {self.prefetch}: must be at least 1 shard")
        self.num_threads = num_threads or min(4, os.cpu_count() or 1)
        lay = self.reader.layout
        self._shard_bytes = lay.records_per_shard * (lay.sdf_record_bytes + lay.labels_record_bytes)
        self._capacity = 0  # shards in the ring
        self._pipe = self._iter = None
        self._loaded = 0  # shards of the current epoch's order read into the ring so far
        self._listed: list[tuple[int, int]] = []  # (epoch, position in its shard order) of each shard listed
        self._delivered = 0  # shards of `_listed` the pipeline has delivered
        self._used = np.zeros(self._record.shape, dtype=bool)  # (shard, slot) records the current plan uses
        self._order = np.zeros(0, dtype=np.int64)  # the shard of each position listed
        self._reads = self.prefetch + DALI_READS_AHEAD + 1  # positions from `_delivered` that must be local
        self.lease = self._lease(self._reads + PREFETCH_SHARDS)

    @property
    def resident_bytes(self) -> int:
        """The ring of resident shards plus the shards DALI reads ahead."""
        return (self._capacity + self.prefetch) * self._shard_bytes

    def _rows(self, plan: EpochPlan) -> np.ndarray:
        self._reserve(plan.resident_shards())
        return plan.group_pos % self._capacity * self.reader.layout.records_per_shard + plan.group_slot

    def _reserve(self, capacity: int) -> None:
        """Grow the ring to `capacity` shards (it never shrinks), checking free memory first."""
        if capacity <= self._capacity:
            return
        lay = self.reader.layout
        self.sdf = self.labels = None
        needed = (capacity + self.prefetch) * self._shard_bytes
        check_fits(
            needed,
            free_memory(self.device),
            what=f"dali: {capacity} resident + {self.prefetch} read-ahead shards",
            device=self.device,
            advice="use a smaller --shuffle-window",
        )
        rows = capacity * lay.records_per_shard
        self.sdf = torch.empty((rows,) + (lay.grid,) * 3, dtype=getattr(torch, lay.dtype), device=self.device)
        self.labels = torch.empty((rows, lay.max_grasps, LABEL_DIM), dtype=torch.float32, device=self.device)
        self._capacity = capacity

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._release()  # the pipeline listed the shard orders of another position

    def _begin_epoch(self, plan: EpochPlan, start: int) -> None:
        """Position the pipeline at the first shard batch `start` needs: keep it if it is there already."""
        first = plan.shard_span(start)[0]
        self._loaded = first
        self._used[:] = False
        self._used[plan.group_shard, plan.group_slot] = True  # a shared shard is read whole; its other records unused
        listed = self._listed[self._delivered] if self._delivered < len(self._listed) else None
        if self._pipe is None or listed != (plan.epoch, first):
            self._open(plan, first)

    def _open(self, plan: EpochPlan, first: int) -> None:
        """A pipeline over `plan`'s shard order (from position `first`) and those of the epochs after it."""
        self._release()
        orders = [plan.shard_order[first:]] + [
            shard_order(self.records, self.spec, e) for e in range(plan.epoch + 1, plan.epoch + EPOCHS_PER_PIPELINE)
        ]
        order = np.concatenate(orders)
        self._listed = [
            (plan.epoch + i, k + (first if i == 0 else 0)) for i, o in enumerate(orders) for k in range(len(o))
        ]
        self._delivered = 0
        self._order = order
        self._keep_listed_local()  # DALI starts reading when its iterator is made
        on_gpu = self.device.type == "cuda"

        # exec_dynamic: outputs are reference-counted, so DALIGenericIterator hands them to torch
        # through DLPack without a copy. On the CPU, plain reads (no mmap) copy each shard once in
        # long sequential reads instead of page-faulting it in 4 KiB at a time.
        @pipeline_def(
            batch_size=1,
            num_threads=self.num_threads,
            device_id=self.device.index if on_gpu else None,
            prefetch_queue_depth=self.prefetch,
            exec_dynamic=True,
        )
        def pipe():
            read = dict(device="gpu" if on_gpu else "cpu", random_shuffle=False, cache_header_information=True)
            if not on_gpu:
                read["dont_use_mmap"] = True
            sdf = fn.readers.numpy(files=[str(self.reader.sdf_path(k)) for k in order], name="sdf", **read)
            labels = fn.readers.numpy(files=[str(self.reader.labels_path(k)) for k in order], name="labels", **read)
            return sdf, labels

        self._pipe = pipe()
        self._pipe.build()
        self._iter = iter(
            DALIGenericIterator(
                self._pipe,
                ["sdf", "labels"],
                reader_name="sdf",
                last_batch_policy=LastBatchPolicy.PARTIAL,
                auto_reset=False,
            )
        )

    def _make_resident(self, plan: EpochPlan, b: int) -> None:
        """Read shards into the ring up to the last one batch b touches; each is checked on arrival."""
        r = self.reader.layout.records_per_shard
        last = plan.shard_span(b)[1]
        while self._loaded <= last:
            if self._delivered == len(self._listed):  # the pipeline's epochs are used up: list the next ones
                self._open(plan, self._loaded)
            self._keep_listed_local()
            out = next(self._iter)[0]
            self._delivered += 1
            ring = self._loaded % self._capacity * r
            sdf, labels = self.sdf[ring : ring + r], self.labels[ring : ring + r]
            sdf.copy_(out["sdf"][0])
            labels.copy_(out["labels"][0])
            shard = int(plan.shard_order[self._loaded])
            used = np.flatnonzero(self._used[shard])
            # Used records are a prefix of the shard unless scenes were skipped: then select them.
            pick = slice(0, len(used)) if len(used) == 0 or used[-1] == len(used) - 1 else torch.from_numpy(used)
            self._check(sdf[pick], labels[pick], self._record[shard, used])
            self._loaded += 1

    def _keep_listed_local(self) -> None:
        """Hold local the shards DALI may read before the next `next()` returns, and download a few more; the
        shard delivered last is in the ring already, so it is released."""
        d = self._delivered
        self._keep_local(self._order[d : d + self._reads + PREFETCH_SHARDS], ready=self._reads)

    def _release(self) -> None:
        """Stop DALI's threads: drop the iterator and pipeline and collect them now."""
        if self._pipe is not None:
            self._iter = self._pipe = None
            self._listed, self._delivered = [], 0
            gc.collect()

    def close(self) -> None:
        self._release()
        super().close()
