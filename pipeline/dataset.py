"""A shard dataset opened once: the quick verify, the reader and each split's records, shared by its loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gq.shards import DatasetError, Manifest, ScoreStats, ShardReader, fingerprint, verify
from gq.shards.verify import corrupt_files

from .plan import SplitRecords


def split_records(reader: ShardReader, split: str) -> tuple[SplitRecords, np.ndarray]:
    """A split's records in storage order, and their rows in the index."""
    rows = np.flatnonzero(reader.index["split"] == split)
    return SplitRecords(
        *(reader.index[k][rows].astype(np.int64) for k in ("scene", "shard", "slot", "num_grasps"))
    ), rows


class ShardDataset:
    """A dataset directory that passed the quick verify, opened read-only; make one with `open_dataset`.

    The train and val loaders of a run share one, so the manifest and index are read (and each split's
    records found) once, not once per loader.
    """

    def __init__(self, reader: ShardReader):
        self.reader = reader
        self._splits: dict[str, tuple[SplitRecords, np.ndarray]] = {}

    @property
    def root(self) -> Path:
        return self.reader.root

    @property
    def manifest(self) -> Manifest:
        return self.reader.manifest

    @property
    def score_stats(self) -> ScoreStats:
        """The train split's score statistics (count, mean, std, min, max), from the manifest."""
        return self.reader.manifest.score_stats

    @property
    def fingerprint(self) -> str:
        """The dataset's identity: its manifest's fingerprint, the same whatever path spells the directory
        (computed from the manifest where an older build did not record one)."""
        return self.reader.manifest.fingerprint or fingerprint(self.reader.manifest)

    def split(self, name: str) -> tuple[SplitRecords, np.ndarray]:
        """`split_records` of one split, computed on first use."""
        if name not in self._splits:
            self._splits[name] = split_records(self.reader, name)
        return self._splits[name]

    def describe_record(self, row: int) -> str:
        """Where the record of index row `row` lives, for a failed check: the file that changed (a record's
        checksum covers its SDF and labels bytes together), shard, slot, scene and its source name."""
        index = self.reader.index
        shard = int(index["shard"][row])
        files = " and ".join(map(str, corrupt_files(self.root, self.manifest, shard)))
        return f"{files}: shard {shard} slot {index['slot'][row]} scene {index['scene'][row]} ({index['name'][row]})"

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"ShardDataset({str(self.root)!r})"


def open_dataset(path: str | Path) -> ShardDataset:
    """Open a dataset directory, failing before any work when it is not usable (the quick verify).

    The manifest and index are read once; pass the result to several `open_loader` calls (a run's
    train and val loaders) instead of the path, so they are not read again.

    Args:
        path: A dataset directory written by `build_shards` (`gq shards build`).

    Returns:
        The opened dataset, read-only.

    Raises:
        DatasetError: The directory is missing, has no manifest, fails the quick verify (sizes, headers,
            index) or holds another format version; the message names the first problem.

    Example:
        ```python
        from gq.pipeline import open_dataset, open_loader

        dataset = open_dataset("data/shards")
        train = open_loader(dataset, split="train", scenes_per_batch=8, grasps_per_sdf=64)
        val = open_loader(dataset, split="val", scenes_per_batch=8,
                          grasps_per_sdf=dataset.reader.layout.max_grasps)  # every grasp of a scene
        ```
    """
    root = Path(path)
    problems = verify(root, quick=True).problems
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DatasetError(
            f"{root}: not a usable dataset: {problems[0]}{more}; "
            "run gq shards verify on it, or rebuild it with gq shards build"
        )
    return ShardDataset(ShardReader(root))
