"""The epoch plan: one pure function gives every loader the same batches.

(seed, epoch, split, rank, world size, S, G, shuffle window, drop_last[, past]) -> this rank's batches.

* **Shards per rank.** The split's shards (consecutive, in storage order) are dealt round-robin:
  rank r owns shards r, r + W, r + 2W, ... of the split, the same set every epoch, so a cache holds
  only its own part and ranks never read each other's. When the shards do not divide evenly, the
  first ranks own one shard more (and one rank may own the split's padded last shard).
* **Ranks sharing shards.** When a split has fewer shards n than ranks W, rank r owns the records
  whose place in the split, counted in shards (shard + the fraction of its shard's grasps before the
  record's middle), lies in [r n / W, (r + 1) n / W): a contiguous part of one or two shards, about
  n / W of a shard's grasps. When W is a multiple of n every part lies within one shard.
* **Windows.** Each epoch a rank takes its shards in a seeded order, `window` shards at a time
  (`window=None`: all of them, a full shuffle over the rank's data). Within a window each scene's
  grasps are shuffled and cut into groups of G (a scene with fewer than G grasps left gets a shorter
  last group, never another scene's data), and the groups are shuffled across the window. The
  windows' groups follow each other, and S consecutive groups make a batch, so a batch may span two
  (or, with tiny windows, more) consecutive windows: a loader keeps every window a batch touches
  resident (`EpochPlan.shard_span`). Two groups of one scene may share a batch; each carries its SDF.
* **Coverage.** Without drop_last every grasp of the rank's records is visited exactly once per
  epoch, so every grasp of the split once across ranks. With drop_last (DDP) every rank gets the
  same number of full batches, B = min over ranks of its groups // S; a rank drops its groups past
  B * S (at most its share beyond the smallest rank's: about one shard when shards divide unevenly).
* **The rest of an epoch on another world size** (`past`). A run interrupted after `k` steps of an
  epoch on W ranks has trained, on every rank, the first k batches of that rank's plan: what was
  trained is a function of (epoch, W, drop_last, k) alone. Resumed on W' ranks, the groups no rank
  had trained (the W ranks' untrained groups, rank after rank, in plan order) are dealt in
  contiguous parts to the W' ranks, as the same number of batches on every rank with near-equal
  scene counts (at most S), so each is trained exactly once. Each part's shards are read in windows
  in the order they are first used. Later epochs follow the plan for W'. Resuming again within the
  same epoch adds a segment to `past`.

* **Several datasets** (`SplitRecords.mix`, pipeline/mixing.py). Ownership is as above, over the
  mixture's shards. Each epoch a rank uses each of its records 0, 1 or more times (its share of each
  dataset's count, drawn from (seed, epoch, rank, dataset)); a record's k-th copy is read as a virtual
  shard of its own (`k * n + shard`, n one past the last shard), so copies take their own places in the
  shard order and windows (`shard_order` lists a shard once per copy). Copies never put one grasp twice in
  a batch (`mixing.separate_copies`). Coverage, drop_last and the rest of an epoch hold for the copies as
  for records; a mixture's epochs differ a little in length.

Stored scene order is already a seeded shuffle of the split (shards/placement.py), so any window of
shards is a random sample of the split.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from .mixing import Mix, copies, separate_copies

# Shards per shuffle window when none is given; chosen by measurement (docs/benchmarks.md, "Shuffle window").
DEFAULT_WINDOW = 4
# Grasps per SDF in a batch (G) when none is given, for `gq fit` and `open_loader` alike: G = 64 trains ~3x the
# grasps per second of G = 16 at S = 8 (docs/benchmarks.md, "Choosing fit's defaults").
DEFAULT_GRASPS_PER_SDF = 64


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
    grasps_per_sdf: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False
    window: int | None = None  # shards per shuffle window; None: all of the rank's shards
    augment: str = "off"  # "rot24": each group's SDF and grasps turned by one of 24 rotations (pipeline/augment.py)

    def check(self) -> None:
        if self.scenes_per_batch < 1:
            raise ValueError(f"scenes_per_batch {self.scenes_per_batch}: a batch needs at least one scene")
        if self.grasps_per_sdf < 1:
            raise ValueError(f"grasps per SDF (G) {self.grasps_per_sdf}: a group needs at least one grasp")
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
    mix: Mix | None = None  # a split of several datasets whose members contribute other than once each

    def shards(self) -> np.ndarray:
        """The split's shards, ascending."""
        return np.unique(self.shard)

    def owner(self, world_size: int) -> np.ndarray:
        """The rank owning each record: whole shards round-robin, or parts of shards when ranks outnumber them."""
        shards = self.shards()
        index = np.searchsorted(shards, self.shard)
        n = len(shards)
        if n >= world_size:
            return index % world_size
        # The fraction of its shard's grasps before each record's middle (records are in storage order).
        grasps = self.num_grasps.astype(np.float64)
        before = np.cumsum(grasps) - grasps
        first = np.searchsorted(index, np.arange(n))
        total = np.bincount(index, weights=grasps, minlength=n)
        within = (before - before[first][index] + grasps / 2) / np.maximum(total, 1)[index]
        return np.minimum(np.floor((index * world_size + within * world_size) / n), world_size - 1).astype(np.int64)

    def rank_shards(self, rank: int, world_size: int) -> np.ndarray:
        """The shards holding records of rank `rank`, ascending."""
        return np.unique(self.shard[self.owner(world_size) == rank])


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
    batch_start: np.ndarray  # int64 [batches + 1]: offsets of each batch's groups (S each, but the rest of an epoch)

    def __len__(self) -> int:
        return len(self.batch_start) - 1

    def groups(self, batch: int) -> tuple[int, int]:
        """Range of group indices in batch `batch`."""
        return int(self.batch_start[batch]), int(self.batch_start[batch + 1])

    def grasp_range(self, batch: int) -> tuple[int, int]:
        """Range of `slots` indices in batch `batch`."""
        g0, g1 = self.groups(batch)
        return int(self.group_start[g0]), int(self.group_start[g1])

    def group_of_grasp(self) -> np.ndarray:
        """For every grasp, the index of its group."""
        return np.repeat(np.arange(len(self.group_scene), dtype=np.int64), np.diff(self.group_start))

    def place_in_batch(self) -> np.ndarray:
        """For every group, its position within its batch."""
        sizes = np.diff(self.batch_start)
        return np.arange(len(self.group_scene), dtype=np.int64) - np.repeat(self.batch_start[:-1], sizes)

    @cached_property
    def _spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Per batch, the first and last position in `shard_order` that must be resident when it is cut: the
        earliest window it or any later batch uses, and the latest window it or any earlier batch used (a
        loader reads shards in order). Groups follow their windows, so these are a batch's own first and last
        windows, but where a mix swapped copies apart (`mixing.separate_copies`) across windows."""
        if not len(self):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        starts = self.batch_start[:-1]
        low = np.minimum.reduceat(self.group_pos, starts) // self.window
        high = np.maximum.reduceat(self.group_pos, starts) // self.window
        low = np.minimum.accumulate(low[::-1])[::-1] * self.window
        high = np.minimum((np.maximum.accumulate(high) + 1) * self.window, len(self.shard_order)) - 1
        return low, high

    def shard_span(self, batch: int) -> tuple[int, int]:
        """Positions [first, last] in `shard_order` of the windows batch `batch` touches: what must be resident."""
        low, high = self._spans
        return int(low[batch]), int(high[batch])

    def resident_shards(self) -> int:
        """The most shards any batch of the epoch needs resident at once (`shard_span` of every batch)."""
        if not len(self):
            return 0
        low, high = self._spans
        return int((high - low + 1).max())

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


def _groups_per_rank(records: SplitRecords, spec: PlanSpec, epoch: int) -> np.ndarray:
    """Groups of G each rank's records make in `epoch`: the same every epoch but for a mix of datasets."""
    groups = -(-records.num_grasps.astype(np.int64) // spec.grasps_per_sdf)
    owner = records.owner(spec.world_size)
    if records.mix is None:
        return np.bincount(owner, weights=groups, minlength=spec.world_size).astype(np.int64)
    return np.array([int(groups[_epoch_records(records, replace(spec, rank=r), epoch, owner)[0]].sum())
                     for r in range(spec.world_size)], dtype=np.int64)  # fmt: skip


def _kept_groups(records: SplitRecords, spec: PlanSpec, epoch: int) -> np.ndarray:
    """Groups each rank visits in `epoch`: all of them, or B * S for every rank with drop_last."""
    groups = _groups_per_rank(records, spec, epoch)
    if spec.drop_last:
        return np.full_like(groups, groups.min() // spec.scenes_per_batch * spec.scenes_per_batch)
    return groups


def num_batches(records: SplitRecords, spec: PlanSpec, all_ranks: bool = False, epoch: int = 0) -> int:
    """Batches of `epoch` for `spec.rank` (or for all ranks together): the same every epoch but for a mix."""
    per_rank = -(-_kept_groups(records, spec, epoch) // spec.scenes_per_batch)
    return int(per_rank.sum() if all_ranks else per_rank[spec.rank])


def _epoch_records(
    records: SplitRecords, spec: PlanSpec, epoch: int, owner: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`spec.rank`'s records in `epoch` (split record numbers in storage order, one per copy), and the shard
    each copy is read as. A record's k-th copy in an epoch of a mix is read as the virtual shard
    `k * n + shard` (n: one past the last shard), so every copy of a shard is a shard of its own in the
    epoch's shard order and windows; without a mix each record is there once, as its own shard."""
    owner = records.owner(spec.world_size) if owner is None else owner
    mine = np.flatnonzero(owner == spec.rank)
    if records.mix is None:
        return mine, records.shard[mine]
    n = copies(records.mix, records.num_grasps, owner, mine, seed=spec.seed, epoch=epoch, rank=spec.rank,
               world_size=spec.world_size)  # fmt: skip
    rec = np.repeat(mine, n)
    k = np.arange(len(rec), dtype=np.int64) - np.repeat(_exclusive_cumsum(n)[:-1], n)
    return rec, records.shard[rec] + k * _shard_bound(records)


def _shard_bound(records: SplitRecords) -> int:
    return int(records.shard.max()) + 1 if len(records.shard) else 0


def _virtual_order(vshard: np.ndarray, spec: PlanSpec, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([spec.seed, epoch, spec.rank, 1])
    return rng.permutation(np.unique(vshard))


def shard_order(records: SplitRecords, spec: PlanSpec, epoch: int) -> np.ndarray:
    """The order in which `spec.rank` reads its shards in `epoch` (a shard once per copy of a mix's records in
    it): its own random stream, so a streaming loader can list many epochs' shards ahead without planning
    their batches."""
    order = _virtual_order(_epoch_records(records, spec, epoch)[1], spec, epoch)
    return order % max(_shard_bound(records), 1)


def make_plan(records: SplitRecords, spec: PlanSpec, epoch: int, past: tuple[Segment, ...] = ()) -> EpochPlan:
    """The epoch's batches for `spec.rank`; a pure function of its arguments.

    `past`: the segments of this epoch already trained on other world sizes (oldest first); the plan is
    then this rank's part of the groups they left.
    """
    spec.check()
    if past:
        return _deal(left_after(records, spec, epoch, past), spec, epoch, separate=records.mix is not None)
    rng = np.random.default_rng([spec.seed, epoch, spec.rank])
    mine, vshard = _epoch_records(records, spec, epoch)
    order = _virtual_order(vshard, spec, epoch)
    w = max(1, len(order) if spec.window is None else min(spec.window, len(order)))
    pos = np.full(int(order.max()) + 1 if len(order) else 0, -1, dtype=np.int64)
    pos[order] = np.arange(len(order))

    # This rank's records (copies) in epoch order: by the position of their (virtual) shard, then by slot.
    sort = np.lexsort((records.slot[mine], pos[vshard]))
    mine, vpos = mine[sort], pos[vshard[sort]]
    n = records.num_grasps[mine].astype(np.int64)
    g = spec.grasps_per_sdf

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
    group_window = vpos[group_record] // w
    bounds = np.searchsorted(group_window, np.arange(-(-len(order) // w) + 1))
    perm = np.concatenate(
        [a + rng.permutation(b - a) for a, b in zip(bounds[:-1], bounds[1:])] + [np.zeros(0, np.int64)]
    )

    def cut(perm: np.ndarray) -> Groups:  # the groups `perm`, in that order
        lengths = group_len[perm]
        starts = _exclusive_cumsum(lengths)
        flat = np.repeat(group_first[perm] - starts[:-1], lengths) + np.arange(starts[-1], dtype=np.int64)
        rec = mine[group_record[perm]]
        return Groups(*(getattr(records, k)[rec].astype(np.int64) for k in ("scene", "shard", "slot")), starts,
                      shuffled_slot[flat])  # fmt: skip

    if records.mix is not None:  # copies of a record share their shard's windows: keep their grasps apart
        batch = np.arange(len(perm), dtype=np.int64) // spec.scenes_per_batch
        g = cut(perm)
        perm = perm[separate_copies(g.scene, g.start, g.slots, batch, group_window[perm])]
    perm = perm[: _kept_groups(records, spec, epoch)[spec.rank]]
    groups = cut(perm)
    return EpochPlan(
        spec=spec,
        epoch=epoch,
        shard_order=order % max(_shard_bound(records), 1),
        window=w,
        group_scene=groups.scene,
        group_shard=groups.shard,
        group_slot=groups.slot,
        group_pos=vpos[group_record[perm]],
        group_start=groups.start,
        slots=groups.slots,
        batch_start=np.minimum(
            np.arange(-(-len(perm) // spec.scenes_per_batch) + 1) * spec.scenes_per_batch, len(perm)
        ),
    )


@dataclass(frozen=True)
class Segment:
    """Part of an epoch trained on one world size: its first `batches` batches on each of `world_size` ranks."""

    world_size: int
    drop_last: bool
    batches: int


@dataclass(frozen=True)
class Groups:
    """Groups in a fixed order, as flat arrays: what a plan's batches are cut from."""

    scene: np.ndarray  # int64 [groups]
    shard: np.ndarray  # int64 [groups]
    slot: np.ndarray  # int64 [groups]
    start: np.ndarray  # int64 [groups + 1]: offsets of each group's grasps in `slots`
    slots: np.ndarray  # int64 [grasps]

    def __len__(self) -> int:
        return len(self.scene)

    @classmethod
    def of(cls, plan: EpochPlan, *, first: int = 0) -> Groups:
        """The plan's groups from group `first` on."""
        a = int(plan.group_start[first])
        return cls(
            plan.group_scene[first:], plan.group_shard[first:], plan.group_slot[first:],
            plan.group_start[first:] - a, plan.slots[a:],
        )  # fmt: skip

    def take(self, index: np.ndarray) -> Groups:
        """The groups `index` (an array of group numbers), in that order."""
        lengths = np.diff(self.start)[index]
        start = _exclusive_cumsum(lengths)
        flat = np.repeat(self.start[index] - start[:-1], lengths) + np.arange(start[-1], dtype=np.int64)
        return Groups(self.scene[index], self.shard[index], self.slot[index], start, self.slots[flat])

    @staticmethod
    def concat(parts: list[Groups]) -> Groups:
        """The groups of `parts`, one part after the other."""
        starts = [p.start[:-1] + off for p, off in zip(parts, _exclusive_cumsum([p.start[-1] for p in parts]))]
        return Groups(
            *(np.concatenate([getattr(p, k) for p in parts]) for k in ("scene", "shard", "slot")),
            np.append(np.concatenate(starts), sum(int(p.start[-1]) for p in parts)),
            np.concatenate([p.slots for p in parts]),
        )


def left_after(records: SplitRecords, spec: PlanSpec, epoch: int, past: tuple[Segment, ...]) -> Groups:
    """The groups of `epoch` that no rank had trained after the segments `past`: every rank's untrained
    groups of the last segment, rank after rank, in the order of its plan. Depends on no rank's own record."""
    *before, last = past
    parts = []
    for rank in range(last.world_size):
        seg = PlanSpec(
            spec.scenes_per_batch, spec.grasps_per_sdf, spec.seed, rank, last.world_size, last.drop_last, spec.window
        )
        plan = make_plan(records, seg, epoch, tuple(before))
        if not 0 <= last.batches <= len(plan):
            raise ValueError(f"epoch {epoch}: {last.batches} batches trained on {last.world_size} ranks, "
                             f"but rank {rank}'s plan has {len(plan)}")  # fmt: skip
        parts.append(Groups.of(plan, first=int(plan.batch_start[last.batches])))
    return Groups.concat(parts)


def _deal(left: Groups, spec: PlanSpec, epoch: int, *, separate: bool = False) -> EpochPlan:
    """`spec.rank`'s plan for the groups `left`: a contiguous part of them, as the same number of batches on
    every rank with near-equal scene counts (at most S, or 2 when S = 1 and the groups do not divide evenly).
    `separate`: the groups hold copies of records (a mix); keep their grasps apart (`separate_copies`)."""
    t, w, s = len(left), spec.world_size, spec.scenes_per_batch
    batches = -(-t // (w * s))
    if t < w * batches:  # some batch would be empty: fewer, fuller batches
        batches = t // w
    if batches == 0:
        raise ValueError(
            f"epoch {epoch} has {t} groups left to train, fewer than the {w} ranks; resume on at most {t} ranks"
        )
    sizes = np.full(w * batches, t // (w * batches), dtype=np.int64)
    sizes[: t % (w * batches)] += 1
    sizes = sizes.reshape(w, batches)
    first = int(sizes[: spec.rank].sum())
    mine = left.take(np.arange(first, first + int(sizes[spec.rank].sum()), dtype=np.int64))
    # Shards in the order first used, read a window at a time; a stable sort by window keeps the order otherwise.
    used, first_use = np.unique(mine.shard, return_index=True)
    order = used[np.argsort(first_use)]
    window = max(1, len(order) if spec.window is None else min(spec.window, len(order)))
    pos = np.zeros(int(order.max()) + 1 if len(order) else 0, dtype=np.int64)
    pos[order] = np.arange(len(order))
    mine = mine.take(np.argsort(pos[mine.shard] // window, kind="stable"))
    if separate:
        batch = np.repeat(np.arange(batches, dtype=np.int64), sizes[spec.rank])
        mine = mine.take(separate_copies(mine.scene, mine.start, mine.slots, batch, pos[mine.shard] // window))
    return EpochPlan(
        spec=spec,
        epoch=epoch,
        shard_order=order,
        window=window,
        group_scene=mine.scene,
        group_shard=mine.shard,
        group_slot=mine.slot,
        group_pos=pos[mine.shard],
        group_start=mine.start,
        slots=mine.slots,
        batch_start=_exclusive_cumsum(sizes[spec.rank]),
    )
