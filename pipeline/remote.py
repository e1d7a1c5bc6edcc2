"""A dataset at a URL (s3://, gs://, https://: any fsspec URL), read through the local shard cache.

Opening one downloads its small metadata into the cache (the manifest, parsed and checked as any manifest is,
and the index, checked against the manifest's CRC-32) and runs the quick verify on what is local plus the
remote files' sizes; a normal `ShardReader` then reads the local copies. Shards come on demand through a
`CachedLease` (`ShardDataset.lease`), which downloads them whole in background threads, following the order the
loader gives, and holds them in the cache while the loader uses them.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from gq.common.sizes import format_size, parse_size
from gq.shards.format import INDEX, MANIFEST, FileEntry, Manifest, labels_name, sdf_name
from gq.shards.remote import RemoteStore, read_remote_manifest

from .shard_cache import ShardCache

# Downloads one lease runs at once: a few streams fill a link to an object store without crowding the disk.
FETCH_THREADS = 4

_caches: dict[Path, ShardCache] = {}
_opened: dict[tuple[Path, str], RemoteShards] = {}
_caches_lock = threading.Lock()


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/gq`, or `~/.cache/gq`: the user's cache directory, as the XDG convention places it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gq"


def shard_cache(cache_dir: str | Path | None, cache_limit: int | str | None) -> ShardCache:
    """The process's one `ShardCache` of a folder (its datasets share its limit and the bytes promised to leases);
    opened again with another limit, it takes that one.

    `cache_limit` in bytes, or text such as "20GB" (`gq.common.sizes.parse_size`); None: the disk's space."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    limit = parse_size(cache_limit, what="cache limit") if isinstance(cache_limit, str) else cache_limit
    with _caches_lock:
        key = root.resolve()
        cache = _caches.get(key)
        if cache is None:
            cache = _caches[key] = ShardCache(root, limit)
        else:
            cache.limit = limit  # the latest wins: what is held already stays until released
        return cache


def dataset_key(url: str, manifest_fingerprint: str) -> str:
    """A dataset's folder in the cache: its fingerprint and its URL (so a dataset replaced at the same URL, or the
    same one at two URLs, never shares files with another)."""
    return f"{manifest_fingerprint[:16]}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:8]}"


class RemoteShards:
    """The files of one remote dataset in the cache: where they go, and holding them (the cache downloads)."""

    def __init__(self, url: str, store: RemoteStore, cache: ShardCache, manifest: Manifest, manifest_bytes: bytes):
        self.url, self.store, self.cache = url, store, cache
        self.key = dataset_key(url, manifest.fingerprint)
        self.folder = cache.folder(self.key)
        self.entries = {f.name: f for f in manifest.files}
        self.shard_bytes = max(
            (self.entries[sdf_name(k)].bytes + self.entries[labels_name(k)].bytes for k in range(manifest.num_shards)),
            default=0,
        )
        meta = [self.entries[INDEX], FileEntry(MANIFEST, len(manifest_bytes), "")]
        self.meta_bytes = sum(e.bytes for e in meta)
        self.cache.promise(self.meta_bytes, what=f"the manifest and index of {url} ({format_size(self.meta_bytes)})")
        cache.hold_meta(store, self.key, manifest_bytes, self.entries[INDEX])

    def sizes(self) -> dict[str, int]:
        """The byte size of each file at the URL, for the quick verify of the files not fetched yet."""
        return self.store.sizes(self.entries)

    def files(self, shard: int) -> list[FileEntry]:
        return [self.entries[sdf_name(shard)], self.entries[labels_name(shard)]]

    def hold(self, shard: int) -> None:
        self.cache.hold(self.store, self.key, str(shard), self.files(shard))

    def release(self, shard: int) -> None:
        self.cache.release(self.key, str(shard))

    def lease(self, at_once: int) -> CachedLease:
        return CachedLease(self, at_once)


class CachedLease:
    """A loader's hold on shards of a remote dataset: see `ShardDataset.lease` for the contract.

    `prefetch` queues downloads on `FETCH_THREADS` threads, in the order given; each shard is held from when it
    is local until `release`. At most `at_once` shards are held at a time (the limit was checked for them).
    """

    bounded = True

    def __init__(self, shards: RemoteShards, at_once: int):
        self._shards, self.at_once = shards, at_once
        shards.cache.promise(
            at_once * shards.shard_bytes,
            what=f"the {at_once} shards of {shards.url} a loader holds at once "
            f"({format_size(at_once * shards.shard_bytes)})",
        )
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="gq-fetch")
        self._held: dict[int, Future] = {}
        self._lock = threading.Lock()

    def prefetch(self, shards: Iterable[int]) -> None:
        with self._lock:
            for k in map(int, shards):
                if k not in self._held:
                    if len(self._held) >= self.at_once:
                        raise RuntimeError(f"a lease of {self.at_once} shards asked to hold one more (shard {k})")
                    self._held[k] = self._pool.submit(self._shards.hold, k)

    def acquire(self, shards: Iterable[int]) -> None:
        shards = list(map(int, shards))
        self.prefetch(shards)
        for k in shards:
            with self._lock:
                future = self._held[k]
            future.result()  # its download's error, if it failed

    def release(self, shards: Iterable[int]) -> None:
        with self._lock:
            for k in map(int, shards):
                future = self._held.pop(k, None)
                if future is not None and not future.cancel():
                    future.add_done_callback(lambda f, k=k: f.exception() is None and self._shards.release(k))

    def close(self) -> None:
        if self._pool is None:
            return
        with self._lock:
            held = list(self._held)
        self.release(held)
        self._pool.shutdown(wait=True, cancel_futures=True)  # a download under way ends, then is released
        self._pool = None
        self._shards.cache.unpromise(self.at_once * self._shards.shard_bytes)

    def __enter__(self) -> CachedLease:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_remote(url: str, *, cache_dir: str | Path | None, cache_limit: int | str | None) -> RemoteShards:
    """The metadata of the dataset at `url` in the cache, checked; the caller runs the quick verify on it."""
    cache = shard_cache(cache_dir, cache_limit)
    store = RemoteStore(url)
    manifest, data = read_remote_manifest(store)
    with _caches_lock:
        key = (cache.root.resolve(), dataset_key(url, manifest.fingerprint))
        if key not in _opened:  # opened once per process: its metadata is held (and counted) once
            _opened[key] = RemoteShards(url, store, cache, manifest, data)
        return _opened[key]
