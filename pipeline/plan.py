"""The epoch plan: one pure function gives every loader the same batches.

(seed, epoch, split, rank, world size, S, G, drop_last) -> this rank's batches. Each scene's grasps
are shuffled and cut into groups of G (a scene with fewer than G grasps left over gets a shorter
last group, never padding from another scene); groups are shuffled across the whole split; S
consecutive groups make a batch; global batch j goes to rank j % world_size. Every grasp of the
split is visited exactly once per epoch across ranks; with drop_last the short last batch and the
batches that would leave ranks unequal are dropped, so every rank has the same number of full
batches (what DDP needs). Two groups of one scene may share a batch: the batch then holds that
scene's SDF twice, once per group, and `scene_of_grasp` keeps each grasp with its own group.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlanSpec:
    """What shapes an epoch's batches, apart from the data and the epoch number."""

    scenes_per_batch: int
    grasps_per_scene: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False

    def check(self) -> None:
        if self.scenes_per_batch < 1:
            raise ValueError(f"scenes_per_batch {self.scenes_per_batch}: a batch needs at least one scene")
        if self.grasps_per_scene < 1:
            raise ValueError(f"grasps_per_scene {self.grasps_per_scene}: a group needs at least one grasp")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of world size {self.world_size}: need 0 <= rank < world_size")
        if self.seed < 0:
            raise ValueError(f"seed {self.seed}: must be >= 0")


@dataclass(frozen=True)
class EpochPlan:
    """One rank's batches for one epoch, as flat arrays (no per-batch Python objects)."""

    spec: PlanSpec
    epoch: int
    group_scene: np.ndarray   # int64 [groups]: global scene id of each group, in batch order
    group_start: np.ndarray   # int64 [groups + 1]: offsets of each group's grasps in `slots`
    slots: np.ndarray         # int64 [grasps]: grasp slot within its scene's record

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

    def batch(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scene_ids [S], slots [N], scene_of_grasp [N]) of one batch, for tests and tools."""
        g0, g1 = self.groups(batch)
        a, z = self.grasp_range(batch)
        return (self.group_scene[g0:g1], self.slots[a:z],
                np.repeat(np.arange(g1 - g0), np.diff(self.group_start[g0:g1 + 1])))


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x) + 1, dtype=np.int64)
    np.cumsum(x, out=out[1:])
    return out


def num_batches(num_grasps: np.ndarray, spec: PlanSpec, all_ranks: bool = False) -> int:
    """Batches per epoch for `spec.rank` (or for all ranks together): the same every epoch."""
    groups = int((-(-np.asarray(num_grasps, dtype=np.int64) // spec.grasps_per_scene)).sum())
    return _rank_batches(groups, spec)[0 if all_ranks else 1]


def _rank_batches(groups: int, spec: PlanSpec) -> tuple[int, int]:
    """(global batches kept, batches of this rank)."""
    s, w = spec.scenes_per_batch, spec.world_size
    kept = (groups // s) // w * w if spec.drop_last else -(-groups // s)
    return kept, len(range(spec.rank, kept, w))


def make_plan(scene_ids: np.ndarray, num_grasps: np.ndarray, spec: PlanSpec, epoch: int) -> EpochPlan:
    """The epoch's batches for `spec.rank`; a pure function of its arguments."""
    spec.check()
    n = np.asarray(num_grasps, dtype=np.int64)
    rng = np.random.default_rng([spec.seed, epoch])
    g = spec.grasps_per_scene

    # Shuffle grasps within each scene: permute each row of a (scenes, max grasps) slot table, in
    # which missing slots are -1, then read the valid entries back row by row (no sort needed).
    width = int(n.max()) if len(n) else 0
    table = np.where(np.arange(width, dtype=np.int32) < n[:, None], np.arange(width, dtype=np.int32), -1)
    table = rng.permuted(table, axis=1)
    shuffled_slot = table[table >= 0].astype(np.int64)

    # Cut each scene's shuffled grasps into groups of G; groups are contiguous in that order.
    groups_per_scene = -(-n // g)
    group_scene_pos = np.repeat(np.arange(len(n), dtype=np.int64), groups_per_scene)
    first_group = _exclusive_cumsum(groups_per_scene)
    k = np.arange(first_group[-1], dtype=np.int64) - np.repeat(first_group[:-1], groups_per_scene)
    group_len = np.minimum(g, n[group_scene_pos] - k * g)  # the last group of a scene may be shorter
    group_first = _exclusive_cumsum(group_len)

    # Shuffle groups across the split, cut into batches, deal batches to ranks.
    order = rng.permutation(len(group_len))
    kept, _ = _rank_batches(len(group_len), spec)
    s, w = spec.scenes_per_batch, spec.world_size
    full = min(kept, len(order) // s)
    rank_groups = order[:full * s].reshape(full, s)[spec.rank::w].ravel()
    if kept > full and full % w == spec.rank:  # the short last batch (no drop_last) is batch `full`
        rank_groups = np.concatenate([rank_groups, order[full * s:]])

    lengths = group_len[rank_groups]
    starts = _exclusive_cumsum(lengths)
    flat = np.repeat(group_first[rank_groups] - starts[:-1], lengths) + np.arange(starts[-1], dtype=np.int64)
    return EpochPlan(spec=spec, epoch=epoch,
                     group_scene=np.asarray(scene_ids, dtype=np.int64)[group_scene_pos[rank_groups]],
                     group_start=starts, slots=shuffled_slot[flat])
