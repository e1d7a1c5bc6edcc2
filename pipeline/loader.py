"""`open_loader` and what both loader modes share: checks, the epoch plan, resumable position."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from shards import GRASP_DIM, LABEL_DIM, SCORE_COLUMN, DatasetError, ShardReader, verify

from .batch import Batch
from .checks import check_records
from .plan import DEFAULT_WINDOW, EpochPlan, PlanSpec, SplitRecords, make_plan, num_batches

MODES = ("cache", "dali")


class LoaderError(ValueError):
    """Settings that cannot work with this dataset; `str()` gives the reason."""


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device ("auto": CUDA when present, else CPU), refusing CUDA when this torch has none."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise LoaderError(f"device {device!r}: {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoaderError(f"device {device!r}: CUDA is not available to this torch; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise LoaderError(f"device {device!r}: only cpu and cuda are supported")
    return dev


def split_records(reader: ShardReader, split: str) -> tuple[SplitRecords, np.ndarray]:
    """A split's records in storage order, and their rows in the index."""
    rows = np.flatnonzero(reader.index["split"] == split)
    return SplitRecords(
        *(reader.index[k][rows].astype(np.int64) for k in ("scene", "shard", "slot", "num_grasps"))
    ), rows


class Loader:
    """Batches of one split for one rank, in the order of the epoch plan.

    Iterating yields the current epoch's batches from `position` on; `state_dict()` /
    `load_state_dict()` carry (seed, epoch, position), so a run resumes mid-epoch. Subclasses hold
    records resident in two tensors, `sdf` [rows, D, D, D] and `labels` [rows, G, 20], and say which
    row holds each group's record (`_rows`); every batch is cut from them by the same index
    operations (`_batch`), so both loaders give bit-identical batches.
    """

    mode = ""

    def __init__(self, reader: ShardReader, split: str, spec: PlanSpec, device: torch.device):
        self.reader, self.split, self.spec, self.device = reader, split, spec, device
        self.records, self._row_of_record = split_records(reader, split)  # and each record's index row
        self.scene_ids = self.records.scene
        self.shards = self.records.rank_shards(spec.rank, spec.world_size)  # this rank's, ascending
        self.epoch, self.position = 0, 0
        self._len = num_batches(self.records, spec)
        self.sdf: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    @property
    def grid(self) -> int:
        return self.reader.layout.grid

    @property
    def max_grasps(self) -> int:
        return self.reader.layout.max_grasps

    @property
    def resident_bytes(self) -> int:
        """Bytes of data this loader holds in memory (host or device)."""
        return 0

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        return {"seed": self.spec.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.spec.seed:
            raise LoaderError(f"loader state has seed {state['seed']}, this loader was opened with {self.spec.seed}")
        if not 0 <= state["position"] <= len(self):
            raise LoaderError(f"loader state position {state['position']} is outside 0..{len(self)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def plan(self) -> EpochPlan:
        return make_plan(self.records, self.spec, self.epoch)

    def __iter__(self) -> Iterator[Batch]:
        if self.position >= len(self):
            self.position = 0  # a finished epoch iterates again from its start, like a DataLoader
        plan = self.plan()
        for batch in self._iterate(plan, self.position):
            self.position += 1
            yield batch

    def _iterate(self, plan: EpochPlan, start: int) -> Iterator[Batch]:
        if start >= len(plan):
            return
        self._begin_epoch(plan, start)
        idx = self._epoch_index(plan)
        for b in range(start, len(plan)):
            self._make_resident(plan, b)
            yield self._batch(plan, b, idx)

    def _epoch_index(self, plan: EpochPlan) -> dict[str, torch.Tensor]:
        """The plan's per-group and per-grasp index arrays on the device, built once per epoch."""

        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

        group_of_grasp = plan.group_of_grasp()
        rows = self._rows(plan)
        return {
            "group_scene": dev(plan.group_scene),
            "rows": dev(rows),
            "label_index": dev(rows[group_of_grasp] * self.max_grasps + plan.slots),
            "scene_of_grasp": dev(group_of_grasp % self.spec.scenes_per_batch),
        }

    def _batch(self, plan: EpochPlan, b: int, idx: dict[str, torch.Tensor]) -> Batch:
        """Batch b: its SDFs and labels gathered from the resident records (two index_selects)."""
        g0, g1 = plan.groups(b)
        a, z = plan.grasp_range(b)
        lab = self.labels.view(-1, LABEL_DIM).index_select(0, idx["label_index"][a:z])
        sdf = self.sdf.index_select(0, idx["rows"][g0:g1])
        return Batch(
            sdf=sdf.unsqueeze(1).float(),
            grasps=lab[:, :GRASP_DIM].contiguous(),
            scores=lab[:, SCORE_COLUMN].contiguous(),
            scene_of_grasp=idx["scene_of_grasp"][a:z],
            scene_ids=idx["group_scene"][g0:g1],
        )

    def _check(self, sdf: torch.Tensor, labels: torch.Tensor, records: np.ndarray) -> None:
        """Check resident records (split record numbers `records`, one per row) against the index."""
        rows = self._row_of_record[records]
        index = self.reader.index

        def where(i: int) -> str:
            r = rows[i]
            shard = int(index["shard"][r])
            return (
                f"{self.reader.sdf_path(shard)}: shard {shard} slot {index['slot'][r]} scene "
                f"{index['scene'][r]} ({index['name'][r]})"
            )

        check_records(sdf, labels, index["checksum"][rows], index["device_checksum"][rows], where)

    def _rows(self, plan: EpochPlan) -> np.ndarray:
        """The resident row of each group's record."""
        raise NotImplementedError

    def _begin_epoch(self, plan: EpochPlan, start: int) -> None:
        """Prepare to serve batches `start`.. of `plan` (the cache holds everything already)."""

    def _make_resident(self, plan: EpochPlan, b: int) -> None:
        """Make sure every record batch `b` uses is resident and checked."""

    def close(self) -> None:
        """Release what the loader holds; it cannot be iterated afterwards."""
        self.sdf = self.labels = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_dataset(root: Path) -> None:
    """Fail before any work when the directory is not a usable dataset (quick verify)."""
    problems = verify(root, quick=True).problems
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DatasetError(
            f"{root}: not a usable dataset: {problems[0]}{more}; "
            "run tools/verify_shards.py on it, or rebuild it with tools/make_shards.py"
        )


def open_loader(
    shards_dir: str | Path,
    mode: str = "cache",
    split: str = "train",
    scenes_per_batch: int = 8,
    grasps_per_scene: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    *,
    shuffle_window: int | None = DEFAULT_WINDOW,
    memory_budget: int | None = None,
    prefetch: int | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> Loader:
    """Open a loader of `Batch`es over one split of a shard dataset, for one rank.

    mode "cache" reads this rank's shards of the split once into one device tensor (pass
    `memory_budget` to cap it); mode "dali" streams them, whole shards at a time, a window
    ahead (`prefetch` shards; default one window). `shuffle_window` is in shards (None: all of the
    rank's shards). Both yield bit-identical batches for the same settings.
    """
    if mode not in MODES:
        raise LoaderError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    spec = PlanSpec(scenes_per_batch, grasps_per_scene, seed, rank, world_size, drop_last, shuffle_window)
    try:
        spec.check()
    except ValueError as err:
        raise LoaderError(str(err)) from None
    root = Path(shards_dir)
    _check_dataset(root)
    reader = ShardReader(root)
    if grasps_per_scene > reader.layout.max_grasps:
        raise LoaderError(
            f"grasps_per_scene {grasps_per_scene}: more than the {reader.layout.max_grasps} "
            f"grasp slots per scene of {root}"
        )
    records, _ = split_records(reader, split)
    if len(records.scene) == 0:
        raise LoaderError(f"split {split!r} of {root} has no scenes")
    # A rank may get no batch (a small split, many ranks, no drop_last); the split as a whole must.
    if num_batches(records, spec, all_ranks=True) == 0:
        raise LoaderError(
            f"split {split!r} of {root} ({len(records.shards())} shards) gives no batches with "
            f"scenes_per_batch {scenes_per_batch}, grasps_per_scene {grasps_per_scene}, world_size "
            f"{world_size}, drop_last {drop_last}"
        )
    dev = resolve_device(device)
    if mode == "cache":
        from .cache import CacheLoader

        loader: Loader = CacheLoader(reader, split, spec, dev, memory_budget=memory_budget, progress=progress)
    else:
        from .dali_loader import DaliLoader

        loader = DaliLoader(reader, split, spec, dev, prefetch=prefetch, num_threads=num_threads)
    return loader
