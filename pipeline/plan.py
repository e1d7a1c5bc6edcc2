"""The epoch plan: one pure function gives every loader the same batches.

(seed, epoch, split, rank, world size, S, G, shuffle window, drop_last) -> this rank's batches.

* **Shards per rank.** The split's shards (consecutive, in storage order) are dealt round-robin:
  rank r owns shards r, r + W, r + 2W, ... of the split, the same set every epoch, so a cache holds
  only its own part and ranks never read each other's. When the shards do not divide evenly, the
  first ranks own one shard more (and one rank may own the split's padded last shard).
* **Windows.** Each epoch a rank takes its shards in a seeded order, `window` shards at a time
  (`window=None`: all of them, a full shuffle over the rank's data). Within a window each scene's
  grasps are shuffled and cut into groups of G (a scene with fewer than G grasps left gets a shorter
  last group, never another scene's data), and the groups are shuffled across the window. The
  windows' groups follow each other, and S consecutive groups make a batch, so a batch may span two
  (or, with tiny windows, more) consecutive windows: a loader keeps every window a batch touches
  resident (`EpochPlan.shard_span`). Two groups of one scene may share a batch; each carries its SDF.
* **Coverage.** Without drop_last every grasp of the rank's shards is visited exactly once per
  epoch, so every grasp of the split once across ranks. With drop_last (DDP) every rank gets the
  same number of full batches, B = min over ranks of its groups // S; a rank drops its groups past
  B * S (at most its share beyond the smallest rank's: about one shard when shards divide unevenly).

Stored scene order is already a seeded shuffle of the split (shards/placement.py), so any window of
shards is a random sample of the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Shards per shuffle window when none is given; chosen by measurement (docs/benchmarks.md, "Shuffle window").
DEFAULT_WINDOW = 4


def parse_window(value: int | str | None) -> int | None:
    """A shuffle window as given on a command line or in a config: a number of shards, or "all" (None)."""
    if value is None or value == "all":
        return None
    try:
        window = int(value)
    except ValueError:
        raise ValueError(f"shuffle window {value!r}: a number of shards, or 'all'") from None
    if window < 1:
        raise ValueError(f"shuffle window {window}: at least 1 shard, or 'all'")
    return window


@dataclass(frozen=True)
class PlanSpec:
    """What shapes an epoch's batches, apart from the data and the epoch number."""

    scenes_per_batch: int
    grasps_per_scene: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False
    window: int | None = None  # shards per shuffle window; None: all of the rank's shards

    def check(self) -> None:
        if self.scenes_per_batch < 1:
            raise ValueError(f"scenes_per_batch {self.scenes_per_batch}: a batch needs at least one scene")
        if self.grasps_per_scene < 1:
            raise ValueError(f"grasps_per_scene {self.grasps_per_scene}: a group needs at least one grasp")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of world size {self.world_size}: need 0 <= rank < world_size")
        if self.seed < 0:
            raise ValueError(f"seed {self.seed}: must be >= 0")
        if self.window is not None and self.window < 1:
            raise ValueError(f"shuffle window {self.window}: at least 1 shard (or None for all)")


@dataclass(frozen=True)
class SplitRecords:
    """A split's scenes as stored (index rows in storage order): what a plan needs from the dataset."""

    scene: np.ndarray  # int64 global scene ids
    shard: np.ndarray  # int64 shard of each record
    slot: np.ndarray  # int64 slot of each record in its shard
    num_grasps: np.ndarray  # int64

    def shards(self) -> np.ndarray:
        """The split's shards, ascending."""
        return np.unique(self.shard)

    def rank_shards(self, rank: int, world_size: int) -> np.ndarray:
        """The shards rank `rank` owns, ascending (round-robin over the split's shards)."""
        return self.shards()[rank::world_size]


@dataclass(frozen=True)
class EpochPlan:
    """One rank's batches for one epoch, as flat arrays (no per-batch Python objects)."""

    spec: PlanSpec
    epoch: int
    shard_order: np.ndarray  # int64 [shards]: this rank's shards in the order the epoch reads them
    window: int  # shards per window (the last window may have fewer)
    group_scene: np.ndarray  # int64 [groups]: global scene id of each group, in batch order
    group_shard: np.ndarray  # int64 [groups]: the shard holding each group's record
    group_slot: np.ndarray  # int64 [groups]: the record's slot in that shard
    group_pos: np.ndarray  # int64 [groups]: position of that shard in `shard_order`
    group_start: np.ndarray  # int64 [groups + 1]: offsets of each group's grasps in `slots`
    slots: np.ndarray  # int64 [grasps]: grasp slot within its scene's record

    def __len__(self) -> int:
        return -(-len(self.group_scene) // self.spec.scenes_per_batch)

    def groups(self, batch: int) -> tuple[int, int]:
        """Range of group indices in batch `batch`."""
        s = self.spec.scenes_per_batch
        return batch * s, min((batch + 1) * s, len(self.group_scene))

    def grasp_range(self, batch: int) -> tuple[int, int]:
        """Range of `slots` indices in batch `batch`."""
        g0, g1 = self.groups(batch)
        return int(self.group_start[g0]), int(self.group_start[g1])

    def group_of_grasp(self) -> np.ndarray:
        """For every grasp, the index of its group; modulo S, its position within its batch."""
        return np.repeat(np.arange(len(self.group_scene), dtype=np.int64), np.diff(self.group_start))

    def shard_span(self, batch: int) -> tuple[int, int]:
        """Positions [first, last] in `shard_order` of the windows batch `batch` touches: what must be resident."""
        g0, g1 = self.groups(batch)
        w = self.window
        first = int(self.group_pos[g0]) // w * w
        last = min((int(self.group_pos[g1 - 1]) // w + 1) * w, len(self.shard_order)) - 1
        return first, last

    def resident_shards(self) -> int:
        """The most shards any batch of the epoch needs resident at once (`shard_span` of every batch)."""
        if not len(self):
            return 0
        s, w = self.spec.scenes_per_batch, self.window
        g0 = np.arange(len(self), dtype=np.int64) * s
        g1 = np.minimum(g0 + s, len(self.group_scene)) - 1
        first = self.group_pos[g0] // w * w
        last = np.minimum((self.group_pos[g1] // w + 1) * w, len(self.shard_order)) - 1
        return int((last - first + 1).max())

    def batch(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scene_ids [S], slots [N], scene_of_grasp [N]) of one batch, for tests and tools."""
        g0, g1 = self.groups(batch)
        a, z = self.grasp_range(batch)
        return (
            self.group_scene[g0:g1],
            self.slots[a:z],
            np.repeat(np.arange(g1 - g0), np.diff(self.group_start[g0 : g1 + 1])),
        )


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x) + 1, dtype=np.int64)
    np.cumsum(x, out=out[1:])
    return out


def _groups_per_rank(records: SplitRecords, spec: PlanSpec) -> np.ndarray:
    """Groups of G each rank's shards make: the same every epoch."""
    groups = -(-records.num_grasps.astype(np.int64) // spec.grasps_per_scene)
    owner = np.searchsorted(records.shards(), records.shard) % spec.world_size
    return np.bincount(owner, weights=groups, minlength=spec.world_size).astype(np.int64)


def _kept_groups(records: SplitRecords, spec: PlanSpec) -> np.ndarray:
    """Groups each rank visits per epoch: all of them, or B * S for every rank with drop_last."""
    groups = _groups_per_rank(records, spec)
    if spec.drop_last:
        return np.full_like(groups, groups.min() // spec.scenes_per_batch * spec.scenes_per_batch)
    return groups


def num_batches(records: SplitRecords, spec: PlanSpec, all_ranks: bool = False) -> int:
    """Batches per epoch for `spec.rank` (or for all ranks together): the same every epoch."""
    per_rank = -(-_kept_groups(records, spec) // spec.scenes_per_batch)
    return int(per_rank.sum() if all_ranks else per_rank[spec.rank])


def shard_order(records: SplitRecords, spec: PlanSpec, epoch: int) -> np.ndarray:
    """The order in which `spec.rank` reads its shards in `epoch`: its own random stream, so a streaming
    loader can list many epochs' shards ahead without planning their batches."""
    rng = np.random.default_rng([spec.seed, epoch, spec.rank, 1])
    return rng.permutation(records.rank_shards(spec.rank, spec.world_size))


def make_plan(records: SplitRecords, spec: PlanSpec, epoch: int) -> EpochPlan:
    """The epoch's batches for `spec.rank`; a pure function of its arguments."""
    spec.check()
    rng = np.random.default_rng([spec.seed, epoch, spec.rank])
    order = shard_order(records, spec, epoch)
    w = max(1, len(order) if spec.window is None else min(spec.window, len(order)))
    pos = np.full(int(records.shard.max()) + 1 if len(records.shard) else 0, -1, dtype=np.int64)
    pos[order] = np.arange(len(order))

    # This rank's records in epoch order: by the position of their shard, then by slot.
    mine = np.flatnonzero(pos[records.shard] >= 0) if len(order) else np.zeros(0, np.int64)
    mine = mine[np.lexsort((records.slot[mine], pos[records.shard[mine]]))]
    n = records.num_grasps[mine].astype(np.int64)
    g = spec.grasps_per_scene

    # Shuffle grasps within each scene: permute each row of a (scenes, max grasps) slot table, in
    # which missing slots are -1, then read the valid entries back row by row (no sort needed).
    width = int(n.max()) if len(n) else 0
    table = np.where(np.arange(width, dtype=np.int32) < n[:, None], np.arange(width, dtype=np.int32), -1)
    table = rng.permuted(table, axis=1)
    shuffled_slot = table[table >= 0].astype(np.int64)

    # Cut each scene's shuffled grasps into groups of G; groups are contiguous in that order.
    groups_per_scene = -(-n // g)
    group_record = np.repeat(np.arange(len(n), dtype=np.int64), groups_per_scene)
    first_group = _exclusive_cumsum(groups_per_scene)
    k = np.arange(first_group[-1], dtype=np.int64) - np.repeat(first_group[:-1], groups_per_scene)
    group_len = np.minimum(g, n[group_record] - k * g)  # the last group of a scene may be shorter
    group_first = _exclusive_cumsum(group_len)

    # Groups are already in window order (records are); shuffle each window's groups in place.
    group_window = pos[records.shard[mine[group_record]]] // w
    bounds = np.searchsorted(group_window, np.arange(-(-len(order) // w) + 1))
    perm = np.concatenate(
        [a + rng.permutation(b - a) for a, b in zip(bounds[:-1], bounds[1:])] + [np.zeros(0, np.int64)]
    )
    perm = perm[: _kept_groups(records, spec)[spec.rank]]

    lengths = group_len[perm]
    starts = _exclusive_cumsum(lengths)
    flat = np.repeat(group_first[perm] - starts[:-1], lengths) + np.arange(starts[-1], dtype=np.int64)
    rec = mine[group_record[perm]]
    return EpochPlan(
        spec=spec,
        epoch=epoch,
        shard_order=order,
        window=w,
        group_scene=records.scene[rec].astype(np.int64),
        group_shard=records.shard[rec].astype(np.int64),
        group_slot=records.slot[rec].astype(np.int64),
        group_pos=pos[records.shard[rec]],
        group_start=starts,
        slots=shuffled_slot[flat],
    )
