"""A shard dataset opened once: the quick verify, the reader and each split's records, shared by its loaders.

A dataset is a local directory or a URL (s3://, gs://, https://: any fsspec URL). A remote one is read from
its copy in the local shard cache (`remote.py`, `shard_cache.py`); loaders reach its shards through
`ShardDataset.lease`, which is the same for both, so the loaders do not know which kind they read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from gq.shards import DatasetError, Manifest, ScoreStats, ShardReader, fingerprint, verify
from gq.shards.remote import is_remote

from .plan import SplitRecords

if TYPE_CHECKING:
    from .remote import RemoteShards


def split_records(reader: ShardReader, split: str) -> tuple[SplitRecords, np.ndarray]:
    """A split's records in storage order, and their rows in the index."""
    rows = np.flatnonzero(reader.index["split"] == split)
    return SplitRecords(
        *(reader.index[k][rows].astype(np.int64) for k in ("scene", "shard", "slot", "num_grasps"))
    ), rows


class ShardLease(Protocol):
    """A loader's hold on the shard files it reads: `ShardDataset.lease(at_once)` gives one.

    A loader tells its lease which shards it reads next and which it is done with; the lease makes them local
    files (`reader.sdf_path(k)`, `reader.labels_path(k)`) and keeps them there in between. For a local dataset
    every method does nothing: its files are always there. For a remote one, shards are downloaded whole into
    the local cache, checked, and held (never evicted) from when they are local until released. A loader holds
    at most `at_once` shards at a time (the cache limit was checked for that many when the lease was made).
    Shard numbers are the dataset's (`reader.index["shard"]`). A dataset made of several datasets gives a
    lease that hands each shard to the lease of the dataset holding it.
    """

    bounded: bool  # True when shards live in a bounded cache: hold few at once, release each when done

    def prefetch(self, shards: Iterable[int]) -> None:
        """Start making `shards` local in the background, in this order (a bounded number of downloads at
        once); each is held from when it is local until released. Shards held already are left as they are."""

    def acquire(self, shards: Iterable[int]) -> None:
        """Hold `shards` (as `prefetch`) and wait until each is local and checked; raises a download's error."""

    def release(self, shards: Iterable[int]) -> None:
        """Stop holding `shards` (a download under way finishes first); they may be evicted afterwards."""

    def close(self) -> None:
        """Release every shard held; the lease cannot be used afterwards."""


class LocalLease:
    """The lease of a local dataset: its files are always there, so there is nothing to do."""

    bounded = False
    at_once = 0

    def prefetch(self, shards: Iterable[int]) -> None:
        pass

    def acquire(self, shards: Iterable[int]) -> None:
        pass

    def release(self, shards: Iterable[int]) -> None:
        pass

    def close(self) -> None:
        pass


class ShardDataset:
    """A dataset that passed the quick verify, opened read-only; make one with `open_dataset`.

    The train and val loaders of a run share one, so the manifest and index are read (and each split's
    records found) once, not once per loader. `source` is what was opened (a directory or a URL); `root` is
    the directory the reader reads (for a URL, its folder in the shard cache).
    """

    def __init__(self, reader: ShardReader, *, remote: RemoteShards | None = None):
        self.reader = reader
        self.remote = remote
        self._splits: dict[str, tuple[SplitRecords, np.ndarray]] = {}

    @property
    def source(self) -> str:
        return self.remote.url if self.remote is not None else str(self.root)

    def lease(self, at_once: int) -> ShardLease:
        """A lease for a loader that holds at most `at_once` shards at a time (`ShardLease`).

        Raises:
            CacheError: The cache limit of a remote dataset cannot hold `at_once` shards beside what this
                process's other leases may hold: one line with the smallest limit that works.
        """
        return self.remote.lease(at_once) if self.remote is not None else LocalLease()

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

    def __repr__(self) -> str:
        return f"ShardDataset({self.source!r})"


def open_dataset(
    path: str | Path, *, cache_dir: str | Path | None = None, cache_limit: int | str | None = None
) -> ShardDataset:
    """Open a dataset directory or URL, failing before any work when it is not usable (the quick verify).

    The manifest and index are read once; pass the result to several `open_loader` calls (a run's
    train and val loaders) instead of the path, so they are not read again. A URL's manifest and index are
    downloaded into the cache (and checked), its shards when a loader needs them (docs/remote.md).

    Args:
        path: A dataset directory written by `build_shards` (`gq shards build`), or the URL of one published
            with `gq shards upload` (s3://bucket/prefix, gs://..., https://...; needs the s3 extra for s3://).
        cache_dir: A URL's local cache folder [default: $XDG_CACHE_HOME/gq, or ~/.cache/gq]; shared safely by
            the processes of a node. Not used for a directory: a local dataset is never under the cache.
        cache_limit: The most bytes the cache folder holds, in bytes or as text ("20GB", "1.5TiB")
            [default: no limit but the disk's].

    Returns:
        The opened dataset, read-only.

    Raises:
        DatasetError: The directory is missing, has no manifest, fails the quick verify (sizes, headers,
            index) or holds another format version; the message names the first problem.
        CacheError: The cache folder cannot be used (not a cache, a full disk, a limit too small for the metadata).
        RemoteError: The URL cannot be read (after retries); the message names it.

    Example:
        ```python
        from gq.pipeline import open_dataset, open_loader

        dataset = open_dataset("data/shards")
        train = open_loader(dataset, split="train", scenes_per_batch=8, grasps_per_sdf=64)
        val = open_loader(dataset, split="val", scenes_per_batch=8,
                          grasps_per_sdf=dataset.reader.layout.max_grasps)  # every grasp of a scene
        ```
    """
    if is_remote(path):
        from .remote import open_remote  # fsspec and the cache only for a URL

        remote = open_remote(str(path), cache_dir=cache_dir, cache_limit=cache_limit)
        problems = verify(remote.folder, quick=True, remote_sizes=remote.sizes()).problems
        _refuse(str(path), problems, "run gq shards verify on it, or publish it again with gq shards upload")
        return ShardDataset(ShardReader(remote.folder), remote=remote)
    root = Path(path)
    _refuse(
        str(root), verify(root, quick=True).problems, "run gq shards verify on it, or rebuild it with gq shards build"
    )
    return ShardDataset(ShardReader(root))


def _refuse(where: str, problems: list[str], advice: str) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DatasetError(f"{where}: not a usable dataset: {problems[0]}{more}; {advice}")
