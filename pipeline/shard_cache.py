"""The local cache of remote datasets: whole shards, downloaded once per node, evicted LRU under a limit that holds.

Layout of a cache folder (`--cache-dir`), shared by every process of a node that uses it:

    .gq-cache                 marks the folder as a shard cache (a folder without it and not empty is refused)
    .lock                     the cache-wide lock: accounting and eviction happen under it
    .reserved/<KEY>.<UNIT>    the bytes a download in progress will take (UNIT: a shard number or "meta")
    <KEY>/                    one dataset (KEY: its fingerprint and URL, hashed): manifest.json, scenes.parquet,
        sdf-K.npy labels-K.npy   shards as the dataset holds them, so a normal ShardReader reads the folder
        .locks/K.pin K.dl      a shard's locks

Locks are `flock`s, released by the kernel when their holder dies, so a killed process never leaves one held:

- K.pin, shared while a process holds (pins) shard K; eviction takes it exclusively without waiting, so a
  shard held by anyone is never evicted.
- K.dl, exclusive while a process downloads shard K: a second process wanting K waits for the first and then
  finds it complete, so each shard is downloaded once per node.
- .lock, exclusive around accounting, eviction and reservations.

The limit holds at every moment: before a download, its bytes are reserved (a record in .reserved) while the
cache-wide lock is held, evicting least-recently-used shards that nobody holds (and the metadata of datasets
that no process has open) until the files present plus the reservations fit. Use refreshes a shard's mtime,
which is what LRU orders by. A download writes through `RemoteStore.fetch` (a temporary name, then a rename once
its size and CRC-32 match the manifest), so a shard file under its own name is always complete and checked; the
temporary of a killed download (its name says which file it was for, and no process holds that shard's download
lock) is removed by the next accounting.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gq.common.errors import UsageError
from gq.common.files import temporary_target, write_atomically
from gq.common.sizes import format_size
from gq.shards.format import INDEX, MANIFEST, FileEntry, labels_name, sdf_name
from gq.shards.remote import RemoteStore

log = logging.getLogger("pipeline")

MARKER = ".gq-cache"
META = "meta"  # the unit of a dataset's manifest and index
_DATASET_FOLDER = re.compile(r"[0-9a-f]{16}-[0-9a-f]{8}")
_SHARD_FILE = re.compile(r"(?:sdf|labels)-(\d+)\.npy")
# Room for the cache's own small files (its marker, the records of downloads in progress), promised first.
OWN_FILES_BYTES = 4096
# How long a download waits for room that other processes hold (their shards in use) before giving up.
WAIT_FOR_ROOM_S = 600.0
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class CacheError(UsageError):
    """A cache that cannot work as asked (too small, a full disk, a folder that is not a cache); one line."""


def _flock(path: Path, mode: int) -> int | None:
    """An open descriptor of `path` holding flock `mode`, or None when `mode` has LOCK_NB and another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, mode)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _locked(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[int]:
    fd = _flock(path, mode)
    try:
        yield fd
    finally:
        os.close(fd)


def _unit_of(name: str) -> str | None:
    """The unit (shard number as text, or META) a file of a dataset folder belongs to; None for others."""
    match = _SHARD_FILE.fullmatch(name)
    if match:
        return str(int(match.group(1)))
    return META if name in (MANIFEST, INDEX) else None


@dataclass
class _Usage:
    """What the cache folder holds, as one accounting pass found it."""

    used: int  # bytes of files plus reservations
    # Shards (whole or partial) and metadata, the candidates for eviction: (last use, folder, unit, bytes).
    shards: list[tuple[float, Path, str, int]]


class ShardCache:
    """One cache folder with a limit, shared by the datasets a process opens from it and by other processes.

    Thread-safe: a loader's download threads call `hold` at once. Holds are counted per (dataset, unit) in this
    process; the shared flock of a held unit is taken once and kept until its last hold is released.

    Args:
        root: The cache folder; made (with its marker) when missing. A folder that exists, holds something and
            has no marker is refused: the cache removes files, so it never manages a folder it did not make.
        limit: Bytes the folder may hold at most (files of every dataset in it, downloads in progress
            included); None: no limit but the disk's.
    """

    def __init__(self, root: Path, limit: int | None):
        self.root, self.limit = Path(root), limit
        if limit is not None and limit <= 0:
            raise CacheError(f"cache limit {limit}: must be more than 0 bytes")
        self._claim()
        (self.root / ".reserved").mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._holds: Counter[tuple[str, str]] = Counter()
        self._pins: dict[tuple[str, str], int] = {}
        self._promised = OWN_FILES_BYTES  # bytes this process's datasets and leases may hold at once (`promise`)
        self.peak = 0  # the most bytes an accounting pass found (files and reservations): for tests and logs
        self.downloaded = 0  # bytes this process downloaded into the cache

    def _claim(self) -> None:
        marker = self.root / MARKER
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not marker.exists():
                if any(p.name != MARKER for p in self.root.iterdir()):
                    raise CacheError(
                        f"{self.root}: not empty and not a shard cache (no {MARKER} in it); the cache removes what it "
                        "evicts, so give it a folder of its own (--cache-dir)"
                    )
                write_atomically(marker, json.dumps({"what": "gq shard cache; safe to delete when no run uses it"}))
        except OSError as err:
            raise CacheError(
                f"{self.root}: cannot be used as a cache folder ({err.strerror}); give another --cache-dir"
            ) from None

    def folder(self, key: str) -> Path:
        """The folder of the dataset `key`, made when missing."""
        if not _DATASET_FOLDER.fullmatch(key):
            raise ValueError(f"dataset key {key!r}: not a cache folder name")
        path = self.root / key
        (path / ".locks").mkdir(parents=True, exist_ok=True)
        return path

    # -- holding -----------------------------------------------------------------------------------------

    def promise(self, nbytes: int, *, what: str) -> None:
        """Check that the limit can hold `nbytes` more at once beside what this process's other leases may hold,
        and count them in; CacheError with the smallest limit that works otherwise. `what` names the need."""
        with self._lock:
            if self.limit is not None and self._promised + nbytes > self.limit:
                need = self._promised + nbytes
                raise CacheError(
                    f"{self.root}: cache limit {format_size(self.limit)} ({self.limit:,} bytes) cannot hold {what} "
                    f"beside the {format_size(self._promised)} this process needs there already (metadata, other "
                    f"loaders): the smallest limit that works is {format_size(need)} ({need:,} bytes); give "
                    f"--cache-limit {need}B or more"
                )
            self._promised += nbytes

    def unpromise(self, nbytes: int) -> None:
        with self._lock:
            self._promised -= nbytes

    def hold(self, store: RemoteStore, key: str, unit: str, files: list[FileEntry]) -> None:
        """Make `files` (one unit of dataset `key`: a shard's two files, or META) present and checked, and hold
        them: they are not evicted until `release`. Downloads what is missing (once per node, whoever asks)."""
        folder = self.root / key
        pin = _flock(folder / ".locks" / f"{unit}.pin", fcntl.LOCK_SH)  # waits while an eviction removes it
        try:
            if not self._complete(folder, files):
                with _locked(folder / ".locks" / f"{unit}.dl"):  # waits while another process downloads it
                    self._download(store, folder, unit, files)
            os.utime(folder / files[0].name)  # last use: what LRU orders by
        except BaseException:
            os.close(pin)
            raise
        with self._lock:
            self._holds[key, unit] += 1
            if (key, unit) in self._pins:
                os.close(pin)  # this process holds it already
            else:
                self._pins[key, unit] = pin

    def hold_meta(self, store: RemoteStore, key: str, manifest: bytes, index: FileEntry) -> None:
        """Put the checked `manifest` bytes of dataset `key` in its folder (unless there already) and `hold` its
        index (fetched if missing): a dataset's metadata, held while it is open."""
        folder = self.root / key
        path = folder / MANIFEST
        self.hold(store, key, META, [index])  # first: held, the metadata is not evicted while the manifest is put
        with _locked(folder / ".locks" / f"{META}.dl"):  # so no accounting takes its temporary for a dead one
            if not (path.exists() and path.read_bytes() == manifest):
                record = self.root / ".reserved" / f"{key}.{META}"
                self._reserve(record, len(manifest), folder)
                try:
                    write_atomically(path, manifest)
                finally:
                    record.unlink(missing_ok=True)

    def release(self, key: str, unit: str) -> None:
        """Give back one `hold`; at the last the unit may be evicted again."""
        with self._lock:
            self._holds[key, unit] -= 1
            if self._holds[key, unit] == 0:
                del self._holds[key, unit]
                os.close(self._pins.pop((key, unit)))

    @staticmethod
    def _complete(folder: Path, files: list[FileEntry]) -> bool:
        """Every file present under its own name at its listed size (a name is only ever given to a checked file)."""
        for entry in files:
            try:
                if (folder / entry.name).stat().st_size != entry.bytes:
                    return False
            except FileNotFoundError:
                return False
        return True

    def _download(self, store: RemoteStore, folder: Path, unit: str, files: list[FileEntry]) -> None:
        """Fetch the files of `unit` that are missing, their bytes reserved first (holding its download lock)."""
        missing = [e for e in files if not self._complete(folder, [e])]
        if not missing:
            return  # another process fetched it while this one waited for the lock
        record = self.root / ".reserved" / f"{folder.name}.{unit}"
        self._reserve(record, sum(e.bytes for e in missing), folder)
        try:
            for entry in missing:  # a full disk is LocalWriteError, a damaged object RemoteMismatchError: one line
                got = store.fetch(entry.name, folder / entry.name, size=entry.bytes, crc32=entry.crc32)
                with self._lock:
                    self.downloaded += got
        finally:
            record.unlink(missing_ok=True)

    def _full_disk(self, err: OSError) -> str:
        free = os.statvfs(self.root)
        return (
            f"{self.root}: the disk is full ({err.strerror}; {format_size(free.f_bavail * free.f_frsize)} free): "
            "give a --cache-limit below the space the disk has, or another --cache-dir"
        )

    # -- accounting and eviction --------------------------------------------------------------------------

    def _reserve(self, record: Path, nbytes: int, folder: Path) -> None:
        """Write the reservation `record` of `nbytes` once the files and reservations fit beside it under the limit,
        evicting least-recently-used shards nobody holds; wait while what fills the cache is held by others."""
        deadline = time.monotonic() + WAIT_FOR_ROOM_S
        while True:
            with _locked(self.root / ".lock"):
                usage = self._account()
                text = str(nbytes)  # the record's own bytes count too
                short = usage.used + nbytes + len(text) - (self.limit or 0)
                freed = self._evict(usage.shards, short) if self.limit is not None and short > 0 else 0
                if self.limit is None or freed >= short:
                    try:
                        write_atomically(record, text)
                    except OSError as err:
                        if err.errno in _FULL_DISK:
                            raise CacheError(self._full_disk(err)) from None
                        raise
                    with self._lock:
                        self.peak = max(self.peak, usage.used - freed + nbytes + len(text))
                    return
            if time.monotonic() > deadline:
                raise CacheError(
                    f"{self.root}: cache limit {format_size(self.limit)} has been full of shards in use for "
                    f"{WAIT_FOR_ROOM_S:.0f} s, with {format_size(nbytes)} of {folder.name} to download: processes "
                    "sharing a cache folder need their loaders' limits together; give a larger --cache-limit"
                )
            time.sleep(0.05)

    def usage(self) -> int:
        """Bytes the cache folder holds now (files and reservations), as the limit counts them."""
        with _locked(self.root / ".lock"):
            return self._account().used

    def _account(self) -> _Usage:
        """Files and reservations, under the cache-wide lock. A unit with a live reservation counts as its
        reservation (which covers its temporaries and files), a stale one (its downloader died: nobody holds
        its download lock) is dropped with its temporaries; a temporary of a download that no process runs
        is removed: it was never given its name, so nothing ever used it."""
        reserved: dict[tuple[str, str], int] = {}
        for record in (self.root / ".reserved").iterdir():
            key, _, unit = record.name.partition(".")
            if self._downloading(self.root / key, unit):
                try:
                    text = record.read_text()
                except FileNotFoundError:
                    continue  # its download finished just now: its files count as they are
                reserved[key, unit] = int(text or 0) + len(text)
            else:
                record.unlink(missing_ok=True)
        used = sum(reserved.values())
        shards: dict[tuple[str, str], list] = {}
        for entry in os.scandir(self.root):
            if entry.is_file(follow_symlinks=False):
                used += entry.stat(follow_symlinks=False).st_size
                continue
            if not (entry.is_dir(follow_symlinks=False) and _DATASET_FOLDER.fullmatch(entry.name)):
                continue
            folder = Path(entry.path)
            for item in os.scandir(folder):
                if not item.is_file(follow_symlinks=False):
                    continue
                target = temporary_target(item.name)
                unit = _unit_of(target or item.name)
                if unit is not None and (entry.name, unit) in reserved:
                    continue
                if target is not None and unit is not None and not self._downloading(folder, unit):
                    Path(item.path).unlink(missing_ok=True)
                    log.info("cache: removed %s, the temporary of a download that stopped", item.path)
                    continue
                stat = item.stat(follow_symlinks=False)
                used += stat.st_size
                if unit is not None and target is None:
                    slot = shards.setdefault((entry.name, unit), [0.0, folder, unit, 0])
                    slot[0], slot[3] = max(slot[0], stat.st_mtime), slot[3] + stat.st_size
        return _Usage(used, sorted(tuple(s) for s in shards.values()))

    @staticmethod
    def _downloading(folder: Path, unit: str) -> bool:
        """Whether a process holds `unit`'s download lock now."""
        path = folder / ".locks" / f"{unit}.dl"
        if not path.exists():
            return False
        fd = _flock(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:
            return True
        os.close(fd)
        return False

    def _evict(self, shards: list[tuple[float, Path, str, int]], needed: int) -> int:
        """Remove least-recently-used shards nobody holds until `needed` bytes are free; returns the bytes freed.
        The metadata of a dataset that no process has open (its META pin is free) goes the same way."""
        freed = 0
        for _, folder, unit, nbytes in shards:
            if freed >= needed:
                break
            fd = _flock(folder / ".locks" / f"{unit}.pin", fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is None:
                continue  # held by a loader (of this process or another)
            try:
                names = (MANIFEST, INDEX) if unit == META else (sdf_name(int(unit)), labels_name(int(unit)))
                for name in names:
                    (folder / name).unlink(missing_ok=True)
            finally:
                os.close(fd)
            freed += nbytes
            log.debug("cache: evicted shard %s of %s (%s)", unit, folder.name, format_size(nbytes))
        return freed
