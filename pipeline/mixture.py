"""Several shard datasets as one: a global numbering of shards and scenes, and each member's share of an epoch.

Member d's shard k is the mixture's shard `offset_d + k`, its scene s the mixture's scene
`scene_offset_d + s` (offsets: the shards and source scenes of the members before it), so the epoch
plan and both loaders work on a mixture as on one dataset: a rank owns whole shards of the mixture
round-robin (members' shards alike), caches or streams only those, and checks every record. The
train split carries a `Mix` (pipeline/mixing.py) that says how many times each scene is used per
epoch; every other split is the plain union of the members' (each scene once).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from gq.shards import DatasetError, ScoreStats

from .dataset import ShardDataset, ShardLease, open_dataset
from .mixing import Mix, epoch_counts
from .plan import SplitRecords

# What members must share: the loaders hold all of them in one tensor and one plan.
_LAYOUT = (
    ("grid", "grid"),
    ("grid_origin", "grid origin"),
    ("grid_spacing", "grid spacing"),
    ("sdf_dtype", "SDF dtype"),
    ("grasp_dim", "grasp values"),
    ("max_grasps", "grasp slots per scene"),
    ("records_per_shard", "records per shard"),
)


class MixedReader:
    """The members' readers behind one numbering: what the loaders read from a dataset."""

    def __init__(self, readers: Sequence):
        self.readers = list(readers)
        self.layout = self.readers[0].layout
        self.shard_offset = np.cumsum([0] + [r.num_shards for r in self.readers])
        self.scene_offset = np.cumsum([0] + [r.manifest.source_scenes for r in self.readers])
        self.row_offset = np.cumsum([0] + [r.num_scenes for r in self.readers])
        self.index = {
            key: np.concatenate([_shifted(key, r.index[key], d, self) for d, r in enumerate(self.readers)])
            for key in self.readers[0].index
        }

    @property
    def num_shards(self) -> int:
        return int(self.shard_offset[-1])

    @property
    def num_scenes(self) -> int:
        return int(self.row_offset[-1])

    def member(self, shard: int) -> tuple[int, int]:
        """(member, its own shard number) of the mixture's shard `shard`."""
        d = int(np.searchsorted(self.shard_offset, shard, side="right")) - 1
        return d, int(shard - self.shard_offset[d])

    def sdf_path(self, shard: int) -> Path:
        d, k = self.member(shard)
        return self.readers[d].sdf_path(k)

    def labels_path(self, shard: int) -> Path:
        d, k = self.member(shard)
        return self.readers[d].labels_path(k)

    def read_records(self, kind: str, shard: int, slots: np.ndarray, out: np.ndarray) -> None:
        d, k = self.member(shard)
        self.readers[d].read_records(kind, k, slots, out)


class MixedLease:
    """A mixture's `ShardLease`: each shard goes to the lease of the member holding it, by the member's own
    shard number (a local member's does nothing; a remote one's makes its shards local in its cache)."""

    def __init__(self, leases: list[ShardLease], reader: MixedReader):
        self.leases, self.reader = leases, reader
        self.bounded = any(lease.bounded for lease in leases)

    def _by_member(self, shards: Iterable[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for shard in shards:  # in order: each member's shards keep the order they are asked for in
            d, own = self.reader.member(int(shard))
            out.setdefault(d, []).append(own)
        return out

    def prefetch(self, shards: Iterable[int]) -> None:
        for d, own in self._by_member(shards).items():
            self.leases[d].prefetch(own)

    def acquire(self, shards: Iterable[int]) -> None:
        for d, own in self._by_member(shards).items():
            self.leases[d].acquire(own)

    def release(self, shards: Iterable[int]) -> None:
        for d, own in self._by_member(shards).items():
            self.leases[d].release(own)

    def close(self) -> None:
        for lease in self.leases:
            lease.close()


def _shifted(key: str, column: np.ndarray, d: int, reader: MixedReader) -> np.ndarray:
    if key == "shard":
        return column + reader.shard_offset[d]
    if key == "scene":
        return column + reader.scene_offset[d]
    return column


class MixedDataset:
    """Several datasets read as one, each contributing its share of every train epoch; make one with
    `open_mixture`. Quacks like `ShardDataset` for the loaders: `reader`, `split`, `score_stats`,
    `fingerprint`, `describe_record`, `lease`, `source`."""

    def __init__(
        self,
        members: Sequence[ShardDataset],
        *,
        weights: Sequence[float] | None = None,
        repeats: Sequence[float] | None = None,
    ):
        self.members = list(members)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.repeats = None if repeats is None else [float(r) for r in repeats]
        _check_members(self.members, self.weights, self.repeats)
        self.reader = MixedReader([m.reader for m in self.members])
        self.sizes = [_train_scenes(m) for m in self.members]
        self.counts = epoch_counts(self.sizes, weights=self.weights, repeats=self.repeats)
        for m, n, c in zip(self.members, self.sizes, self.counts):
            if c and not n:
                raise DatasetError(f"{m.source}: no train scenes, but the mixture asks it for {c} per epoch")
        self._splits: dict[str, tuple[SplitRecords, np.ndarray]] = {}

    @property
    def source(self) -> str:
        """What was opened: the members' directories or URLs."""
        return " + ".join(m.source for m in self.members)

    def lease(self, at_once: int) -> MixedLease:
        """A lease for a loader holding at most `at_once` of the mixture's shards at a time: one per member, each
        for at most `at_once` of its own shards (`ShardDataset.lease`)."""
        return MixedLease([m.lease(min(at_once, m.reader.num_shards)) for m in self.members], self.reader)

    @property
    def names(self) -> list[str]:
        """A short name per member (its directory's or URL's last part; numbered where two agree), for metrics."""
        last = [m.source.rstrip("/").rsplit("/", 1)[-1] if m.remote else m.root.resolve().name for m in self.members]
        base = [re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "dataset" for name in last]
        return [f"{b}_{i}" if base.count(b) > 1 else b for i, b in enumerate(base)]

    @property
    def scene_ranges(self) -> dict[str, tuple[int, int]]:
        """Each member's scene ids in the mixture's numbering, [first, end), by its name."""
        off = self.reader.scene_offset
        return {name: (int(off[d]), int(off[d + 1])) for d, name in enumerate(self.names)}

    @property
    def score_stats(self) -> ScoreStats:
        """The mixture's train score statistics: the members' combined, each weighted by the grasps it
        contributes per epoch (its train grasps x its scenes per epoch / its train scenes)."""
        stats = [m.score_stats for m in self.members]
        used = [(s, c / n * s.count) for s, c, n in zip(stats, self.counts, self.sizes) if c and s.count]
        total = sum(w for _, w in used)
        if not total or any(s.mean is None or s.std is None for s, _ in used):
            return ScoreStats("train", 0, None, None, None, None)
        mean = sum(w * s.mean for s, w in used) / total
        var = sum(w * (s.std**2 + (s.mean - mean) ** 2) for s, w in used) / total
        return ScoreStats(
            "train",
            round(total),
            mean,
            float(np.sqrt(var)),
            min(s.min for s, _ in used),
            max(s.max for s, _ in used),
        )

    def identity(self) -> list[dict]:
        """Each member's fingerprint and share, in order: what a run records of the data it trained on."""
        share = (
            [{"weight": w} for w in self.weights]
            if self.weights is not None
            else [{"repeat": r} for r in (self.repeats or [1.0] * len(self.members))]
        )
        return [{"fingerprint": m.fingerprint, **s} for m, s in zip(self.members, share)]

    @property
    def fingerprint(self) -> str:
        """The mixture's identity: SHA-256 of its members' fingerprints and shares, in order."""
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def split(self, name: str) -> tuple[SplitRecords, np.ndarray]:
        """The members' records of split `name` in mixture numbering, and their rows in the mixture's index."""
        if name not in self._splits:
            parts = [m.split(name) for m in self.members]
            records = SplitRecords(
                *(
                    np.concatenate([getattr(r, k) + off for (r, _), off in zip(parts, offsets)])
                    for k, offsets in (
                        ("scene", self.reader.scene_offset),
                        ("shard", self.reader.shard_offset),
                        ("slot", [0] * len(parts)),
                        ("num_grasps", [0] * len(parts)),
                    )
                ),
                mix=self._mix([len(r.scene) for r, _ in parts]) if name == "train" else None,
            )
            rows = np.concatenate([rows + off for (_, rows), off in zip(parts, self.reader.row_offset)])
            self._splits[name] = records, rows
        return self._splits[name]

    def _mix(self, lengths: list[int]) -> Mix | None:
        """The train split's `Mix`; None when every member contributes each scene once (a plain union)."""
        if list(self.counts) == self.sizes:
            return None
        source = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        return Mix(source=source, counts=self.counts)

    def describe_record(self, row: int) -> str:
        d = int(np.searchsorted(self.reader.row_offset, row, side="right")) - 1
        return self.members[d].describe_record(row - int(self.reader.row_offset[d]))

    def __str__(self) -> str:
        return self.source

    def __repr__(self) -> str:
        return f"MixedDataset({[m.source for m in self.members]!r}, counts={self.counts})"


def _train_scenes(member: ShardDataset) -> int:
    records, _ = member.split("train")
    return int((records.num_grasps > 0).sum())


def _check_members(members: list[ShardDataset], weights: list[float] | None, repeats: list[float] | None) -> None:
    """Shares that make sense, and members that agree on the layout; ValueError naming both sides otherwise."""
    if len(members) < 1:
        raise ValueError("a mixture needs at least one dataset")
    for what, values in (("weights", weights), ("repeats", repeats)):
        if values is None:
            continue
        if len(values) != len(members):
            raise ValueError(f"{len(values)} {what} for {len(members)} datasets: give one per dataset")
        if any(not np.isfinite(v) or v < 0 for v in values) or not sum(values) > 0:
            raise ValueError(f"{what} {','.join(f'{v:g}' for v in values)}: each finite and >= 0, some > 0")
    if weights is not None and repeats is not None:
        raise ValueError("give weights or repeats, not both")
    first = members[0]
    for other in members[1:]:
        for key, what in _LAYOUT:
            a, b = getattr(first.manifest, key), getattr(other.manifest, key)
            if a != b:
                raise DatasetError(
                    f"{first.source} has {what} {a}, {other.source} has {b}: datasets mixed in one run must agree "
                    "on grid and grasp layout; rebuild one with the other's options (gq shards build)"
                )


def open_mixture(
    datasets: Sequence[str | Path | ShardDataset],
    *,
    weights: Sequence[float] | None = None,
    repeats: Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
    cache_limit: int | str | None = None,
) -> ShardDataset | MixedDataset:
    """Open several datasets as one, each contributing its share of every train epoch.

    Args:
        datasets: Dataset directories or URLs (or `ShardDataset`s from `open_dataset`).
        weights: One per dataset: an epoch has as many scenes as the datasets' train splits together, and
            dataset d contributes `weight_d / sum(weights)` of them (fewer than it has: drawn without
            replacement; more: whole passes over it, then the rest drawn without replacement).
        repeats: One per dataset, instead of weights: dataset d contributes `repeat_d x` its train scenes.
            Neither: each scene once per epoch.
        cache_dir: The local shard cache of the URLs among `datasets` (`open_dataset`).
        cache_limit: The most bytes that cache holds (`open_dataset`).

    Returns:
        A `MixedDataset` to pass to `open_loader`; one dataset with no weights or repeats is returned
        as the `ShardDataset` it is.

    Raises:
        ValueError: Weights or repeats that do not fit (count, negative, all zero, both given).
        DatasetError: A directory that is not a usable dataset, or datasets whose grid or grasp layout differ.

    Example:
        ```python
        from gq.pipeline import open_loader, open_mixture

        data = open_mixture(["data/primitives", "data/meshes"], weights=[0.3, 0.7])
        train = open_loader(data, split="train", scenes_per_batch=8, grasps_per_sdf=64)
        ```
    """
    members = [
        d if isinstance(d, ShardDataset) else open_dataset(d, cache_dir=cache_dir, cache_limit=cache_limit)
        for d in datasets
    ]
    if len(members) == 1 and weights is None and repeats is None:
        return members[0]
    return MixedDataset(members, weights=weights, repeats=repeats)
