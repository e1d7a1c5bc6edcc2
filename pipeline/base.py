"""What both loader modes share: the epoch plan, the resumable position, the batch cut and the record check."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gq.common.errors import UsageError
from gq.shards import GRASP_DIM, LABEL_DIM, SCORE_COLUMN, ScoreStats

from .augment import ROTATIONS, plan_rotations, turn_grasps
from .batch import Batch
from .checks import check_records
from .dataset import LocalLease, ShardDataset, ShardLease
from .plan import EpochPlan, PlanSpec, Segment, make_plan, num_batches

# Shards a loader asks its lease for beyond those it reads now: their downloads run while it reads (a remote
# dataset), so a step waits for the network only when the network is slower than training.
PREFETCH_SHARDS = 4


class LoaderError(UsageError):
    """Settings that cannot work with this dataset; `str()` gives the reason."""


@dataclass(frozen=True)
class EpochIndex:
    """An epoch plan's index arrays on the device, built once per epoch; each batch slices them."""

    group_scene: torch.Tensor  # int64 [groups]: global scene id of each group, in batch order
    rows: torch.Tensor  # int64 [groups]: the resident row holding each group's record
    label_index: torch.Tensor  # int64 [grasps]: each grasp's row of the resident labels viewed as [rows * G, 20]
    scene_of_grasp: torch.Tensor  # int64 [grasps]: each grasp's group position within its batch
    host_rows: np.ndarray  # `rows` on the host, for the per-record copies that gather the SDFs
    rotations: np.ndarray | None  # int64 [groups]: each group's rotation (pipeline/augment.py); None: augment off
    grasp_rotations: torch.Tensor | None  # int64 [grasps]: the rotation of each grasp's group, on the device


class Loader:
    """Batches of one split for one rank, in the order of the epoch plan.

    Iterating yields the current epoch's batches from `position` on. When it yields an epoch's last
    batch the loader has already moved on to (epoch + 1, position 0), so the next `iter()` yields the
    next epoch and a checkpoint taken after the last batch resumes at the next epoch's start;
    `set_epoch` picks an epoch instead. `state_dict()` / `load_state_dict()` carry (seed, epoch,
    position, world size, drop_last, and the epoch's earlier segments on other world sizes): the same
    on every rank, so a run resumes mid-epoch, on this or another number of ranks. Subclasses hold
    records resident in two tensors, `sdf` [rows, D, D, D] and `labels` [rows, G, 20], and say which
    row holds each group's record (`_rows`); every batch is cut from them by the same index operations
    (`_batch`), so both loaders give bit-identical batches.
    """

    mode = ""

    def __init__(self, dataset: ShardDataset, *, split: str, spec: PlanSpec, device: torch.device):
        self.dataset, self.reader = dataset, dataset.reader
        self.split, self.spec, self.device = split, spec, device
        self.records, self._row_of_record = dataset.split(split)  # and each record's index row
        self.scene_ids = self.records.scene
        self.mine = np.flatnonzero(self.records.owner(spec.world_size) == spec.rank)  # this rank's records
        self.shards = np.unique(self.records.shard[self.mine])  # and their shards, ascending
        # Split record number of each (shard, slot).
        self._record = np.full((self.reader.num_shards, self.reader.layout.records_per_shard), -1, dtype=np.int64)
        self._record[self.records.shard, self.records.slot] = np.arange(len(self.records.shard))
        self.epoch, self.position = 0, 0
        self.past: tuple[Segment, ...] = ()  # this epoch's segments trained on other world sizes
        self._lengths: dict[int, int] = {}  # batches of each epoch asked for (the same for all but a mix's)
        self.sdf: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        # The shard files this loader reads: a subclass takes a lease sized for what it holds at once (a no-op
        # for a local dataset); `_keep_local` moves the window of shards it holds along the plan.
        self.lease: ShardLease = LocalLease()
        self._window: list[int] = []

    @property
    def grid(self) -> int:
        return self.reader.layout.grid

    @property
    def max_grasps(self) -> int:
        return self.reader.layout.max_grasps

    @property
    def score_stats(self) -> ScoreStats:
        """The dataset's train split score statistics from its manifest (count, mean, population std, min, max),
        whatever split this loader serves: what scores are standardised with (docs/loading.md)."""
        return self.dataset.score_stats

    @property
    def resident_bytes(self) -> int:
        """Bytes of data this loader holds in memory (host or device)."""
        return 0

    def __len__(self) -> int:
        """Batches of the current epoch on this world size (the rest of an epoch begun on another has
        `len(plan())`); the same every epoch but for a mix of datasets (`epoch_batches`)."""
        return self.epoch_batches(self.epoch)

    def epoch_batches(self, epoch: int) -> int:
        """Batches of `epoch` from its start on this world size: a mix draws other scenes every epoch."""
        key = epoch if self.records.mix is not None else 0
        if key not in self._lengths:
            self._lengths[key] = num_batches(self.records, self.spec, epoch=key)
        return self._lengths[key]

    def set_epoch(self, epoch: int) -> None:
        """Serve `epoch` from its start (evaluation asks for epoch 0 every time)."""
        self.epoch, self.position, self.past = int(epoch), 0, ()

    def state_dict(self) -> dict:
        """Where the run stands, globally: every rank of a step-synchronous run holds the same state."""
        return {
            "seed": self.spec.seed,
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.spec.world_size,
            "drop_last": self.spec.drop_last,
            "past": [[p.world_size, p.drop_last, p.batches] for p in self.past],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; saved on another world size, the rest of its epoch is what no rank had trained."""
        if state["seed"] != self.spec.seed:
            raise LoaderError(f"loader state has seed {state['seed']}, this loader was opened with {self.spec.seed}")
        # States written before the world size was recorded were continued on the same number of ranks.
        saved = Segment(
            int(state.get("world_size", self.spec.world_size)),
            bool(state.get("drop_last", self.spec.drop_last)),
            int(state["position"]),
        )
        past = tuple(Segment(int(w), bool(d), int(b)) for w, d, b in state.get("past", ()))
        position = saved.batches
        if (saved.world_size, saved.drop_last) != (self.spec.world_size, self.spec.drop_last) and position:
            past, position = past + (saved,), 0
        epoch = int(state["epoch"])
        try:
            batches = len(make_plan(self.records, self.spec, epoch, past))
        except ValueError as err:
            raise LoaderError(f"loader state: {err}") from None
        if not 0 <= position <= batches:
            raise LoaderError(f"loader state position {position} is outside 0..{batches}")
        self.epoch, self.position, self.past = epoch, position, past

    def batches_left(self, epochs: int) -> int:
        """Batches from where the loader stands to the end of epoch `epochs - 1`."""
        if self.epoch >= epochs:
            return 0
        return len(self.plan()) - self.position + sum(self.epoch_batches(e) for e in range(self.epoch + 1, epochs))

    def plan(self) -> EpochPlan:
        return make_plan(self.records, self.spec, self.epoch, self.past)

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan()
        if self.position >= len(plan):
            self.position = 0  # a state saved at an epoch's end (position == len) serves that epoch again
        for batch in self._iterate(plan, self.position):
            self.position += 1
            if self.position == len(plan):
                # Moved on before the last batch is handed out: whatever the caller does with it
                # (checkpoint, stop), the state already names the next epoch's start.
                self.epoch, self.position, self.past = plan.epoch + 1, 0, ()
            yield batch

    def _iterate(self, plan: EpochPlan, start: int) -> Iterator[Batch]:
        if start >= len(plan):
            return
        self._begin_epoch(plan, start)
        idx = self._epoch_index(plan)
        for b in range(start, len(plan)):
            self._make_resident(plan, b)
            yield self._batch(plan, b, idx)

    def _epoch_index(self, plan: EpochPlan) -> EpochIndex:
        """The plan's per-group and per-grasp index arrays on the device, built once per epoch."""

        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

        group_of_grasp = plan.group_of_grasp()
        rows = self._rows(plan)
        rotations = plan_rotations(plan) if self.spec.augment == "rot24" else None
        return EpochIndex(
            group_scene=dev(plan.group_scene),
            rows=dev(rows),
            label_index=dev(rows[group_of_grasp] * self.max_grasps + plan.slots),
            scene_of_grasp=dev(plan.place_in_batch()[group_of_grasp]),
            host_rows=rows,
            rotations=rotations,
            grasp_rotations=None if rotations is None else dev(rotations[group_of_grasp]),
        )

    def _batch(self, plan: EpochPlan, b: int, idx: EpochIndex) -> Batch:
        """Batch b: its SDFs and labels gathered from the resident records, turned when augmenting."""
        g0, g1 = plan.groups(b)
        a, z = plan.grasp_range(b)
        lab = self.labels.view(-1, LABEL_DIM).index_select(0, idx.label_index[a:z])
        grasps = lab[:, :GRASP_DIM]
        if idx.grasp_rotations is not None:
            grasps = turn_grasps(grasps, idx.grasp_rotations[a:z], self.grid)
        return Batch(
            sdf=self._gather_sdf(idx, g0, g1),
            grasps=grasps.contiguous(),
            scores=lab[:, SCORE_COLUMN].contiguous(),
            scene_of_grasp=idx.scene_of_grasp[a:z],
            scene_ids=idx.group_scene[g0:g1],
        )

    def _gather_sdf(self, idx: EpochIndex, g0: int, g1: int) -> torch.Tensor:
        """The SDFs of groups g0..g1 as float32 [S, 1, D, D, D], each turned by its group's rotation when augmenting.

        Each record is converted as it is copied (`copy_` from the shard dtype): one pass over the batch, where
        an `index_select` then `.float()` makes two and allocates the half-precision batch between them (on a
        CPU 1.2-1.4 x faster at S=128 G=1, and no slower at S=8 G=16: docs/benchmarks.md, "Cache gather"). On
        CUDA one index_select and one conversion (two kernels) cost less than S copies' launches, so without
        rotations it keeps those.
        """
        if idx.rotations is None and self.device.type == "cuda":
            return self.sdf.index_select(0, idx.rows[g0:g1]).unsqueeze(1).float()
        out = torch.empty((g1 - g0, 1) + tuple(self.sdf.shape[1:]), dtype=torch.float32, device=self.device)
        for i, row in enumerate(idx.host_rows[g0:g1].tolist()):
            record = self.sdf[row]
            out[i, 0].copy_(record if idx.rotations is None else ROTATIONS[idx.rotations[g0 + i]].turn_grid(record))
        return out

    def _check(self, sdf: torch.Tensor, labels: torch.Tensor, records: np.ndarray) -> None:
        """Check resident records (split record numbers `records`, one per row) against the index."""
        rows = self._row_of_record[records]
        index = self.reader.index
        check_records(
            sdf,
            labels,
            expected=index["checksum"][rows],
            device_expected=index["device_checksum"][rows],
            where=lambda i: self.dataset.describe_record(int(rows[i])),
        )

    def _rows(self, plan: EpochPlan) -> np.ndarray:
        """The resident row of each group's record."""
        raise NotImplementedError

    def _begin_epoch(self, plan: EpochPlan, start: int) -> None:
        """Prepare to serve batches `start`.. of `plan` (the cache holds everything already)."""

    def _make_resident(self, plan: EpochPlan, b: int) -> None:
        """Make sure every record batch `b` uses is resident and checked."""

    def _lease(self, at_once: int) -> ShardLease:
        """The dataset's lease for holding `at_once` shards at a time, or all of the split's shards where it has
        fewer: a loader never holds more distinct shards than that, so a cache limit need not make room for more."""
        return self.dataset.lease(min(at_once, len(self.records.shards())))

    def _keep_local(self, shards: Sequence[int], ready: int) -> None:
        """Hold exactly `shards` (the next ones, in the order they are needed) and wait until the first `ready`
        of them are local: those held before and not among them are released first, the rest download in the
        background."""
        window = list(dict.fromkeys(int(k) for k in shards))
        self.lease.release(set(self._window).difference(window))
        self.lease.prefetch(window)
        self._window = window
        self.lease.acquire(dict.fromkeys(int(k) for k in shards[:ready]))

    def close(self) -> None:
        """Release what the loader holds; it cannot be iterated afterwards."""
        self.sdf = self.labels = None
        self.lease.close()
        self._window = []

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
