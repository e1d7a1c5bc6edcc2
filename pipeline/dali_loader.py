"""Streaming loader: a DALI pipeline reads exactly the records the epoch plan names.

Two `fn.readers.numpy` readers (SDFs and labels) walk a file list that names, for every group of
the plan in order, the shard holding its scene; an external source feeds each sample's record
slot as the region of interest, so only that record is read. With CUDA the readers run on the GPU
(GPUDirect Storage where the system has it) and the tensors stay on the device; without it they
run on the CPU with `device_id=None`. Grasp slots are selected after the read, on the device.
"""
from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from shards import LABEL_DIM, ShardReader

from .batch import Batch
from .loader import Loader, LoaderError
from .plan import EpochPlan, PlanSpec


class DaliLoader(Loader):
    mode = "dali"

    def __init__(self, reader: ShardReader, split: str, spec: PlanSpec, device: torch.device, *,
                 prefetch: int = 2, num_threads: int | None = None):
        super().__init__(reader, split, spec, device)
        if prefetch < 1:
            raise LoaderError(f"prefetch {prefetch}: must be at least 1 batch")
        self.prefetch = prefetch
        self.num_threads = num_threads or min(4, os.cpu_count() or 1)
        self._sdf_paths = np.array([str(reader.sdf_path(k)) for k in range(reader.num_shards)], dtype=object)
        self._label_paths = np.array([str(reader.labels_path(k)) for k in range(reader.num_shards)], dtype=object)
        self._pipe = self._iter = None

    @property
    def resident_bytes(self) -> int:
        """Bytes of the batches DALI keeps in flight (prefetch queue plus the one being consumed)."""
        lay = self.reader.layout
        return (self.prefetch + 1) * self.spec.scenes_per_batch * (lay.sdf_record_bytes + lay.labels_record_bytes)

    def _open(self, plan: EpochPlan, start: int) -> DALIGenericIterator:
        """A pipeline over the plan's groups from batch `start` to the end of the epoch."""
        self.close()
        s, lay = self.spec.scenes_per_batch, self.reader.layout
        groups = plan.group_scene[start * s:]
        shard, slot = np.divmod(groups, lay.records_per_shard)
        slot = slot.astype(np.int32)
        # The readers pad the last batch by repeating the last sample; the ROI feed does the same.
        padded = np.concatenate([slot, np.repeat(slot[-1:], -len(slot) % s)])
        sdf_start = np.zeros((len(padded), 4), np.int32)
        label_start = np.zeros((len(padded), 3), np.int32)
        sdf_start[:, 0] = label_start[:, 0] = padded
        last = len(padded) // s - 1

        def roi(starts: np.ndarray):
            # DALI may ask ahead past the epoch's end while prefetching: repeat the last batch.
            return lambda info: list(starts[min(info.iteration, last) * s:(min(info.iteration, last) + 1) * s])

        on_gpu = self.device.type == "cuda"

        # exec_dynamic: outputs are reference-counted, so DALIGenericIterator hands them to torch
        # through DLPack without a copy, and they stay valid while a Batch still refers to them.
        @pipeline_def(batch_size=s, num_threads=self.num_threads, device_id=self.device.index if on_gpu else None,
                      prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        def pipe():
            read = dict(device="gpu" if on_gpu else "cpu", pad_last_batch=True, random_shuffle=False,
                        cache_header_information=True)
            sdf = fn.readers.numpy(files=self._sdf_paths[shard].tolist(), name="sdf", roi_shape=[1] + [lay.grid] * 3,
                                   roi_start=fn.external_source(roi(sdf_start), batch=True, batch_info=True), **read)
            labels = fn.readers.numpy(files=self._label_paths[shard].tolist(), name="labels",
                                      roi_shape=[1, lay.max_grasps, LABEL_DIM],
                                      roi_start=fn.external_source(roi(label_start), batch=True, batch_info=True),
                                      **read)
            return sdf, labels

        self._pipe = pipe()
        self._pipe.build()
        self._iter = DALIGenericIterator(self._pipe, ["sdf", "labels"], reader_name="sdf",
                                         last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
        return self._iter

    def _iterate(self, plan: EpochPlan, start: int) -> Iterator[Batch]:
        if start >= len(plan):
            return  # nothing left for this rank this epoch (DALI cannot read an empty file list)
        idx = self._epoch_index(plan)
        label_index = idx["scene_of_grasp"] * self.max_grasps + idx["slots"]
        batches = self._open(plan, start)
        for b, out in zip(range(start, len(plan)), batches):
            data = out[0]
            yield self._batch(plan, b, idx, data["sdf"], data["labels"].view(-1, LABEL_DIM), label_index)
        self.close()

    def close(self) -> None:
        """Stop DALI's threads: drop the iterator and pipeline and collect them now."""
        if self._pipe is not None:
            self._iter = self._pipe = None
            gc.collect()
