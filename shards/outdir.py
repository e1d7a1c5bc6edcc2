"""Where a build writes: a staging directory beside `--out`, swapped in only when complete, under a lock.

Only a directory that is provably ours is ever removed or resumed: a finished dataset (a manifest
that parses and names our format) or an unfinished build (`.build/journal.jsonl` whose first line
names our format), and then only the files the format names; any other file stops the build. The
new build is made in `.<name>.building` beside `--out` and replaces it by one atomic exchange when
complete (`files.swap_in_dir`), so a failed rebuild leaves the old dataset as it was. `.<name>.lock` beside `--out`
serialises builds: `flock` on it, with its identity re-checked after locking (a holder unlinks it
on release, so a waiter may have opened a file that is no longer there).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import socket
import sys
import time
from pathlib import Path

from gq.common.errors import UsageError
from gq.common.files import exchange as _exchange
from gq.common.files import swap_in_dir

from .format import BUILD_DIR, FORMAT_NAME, MANIFEST

JOURNAL = "journal.jsonl"
_NAMES = r"(?:sdf|labels)-\d{5}\.npy|manifest\.json|scenes\.parquet|skipped\.jsonl"
# The format's files and their temporaries: `.<name>.tmp` (shards being filled) and
# `.<name>.<random>.tmp` (files.write_atomically).
_DATASET_FILE = re.compile(rf"(?:{_NAMES})|\.(?:{_NAMES})(?:\.\w+)?\.tmp")


class BuildError(UsageError):
    """A build that cannot start or continue; `str()` says what and what to do."""


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.building"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _first_line_format(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            head = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return head.get("format") if isinstance(head, dict) else None


def kind(path: Path) -> str:
    """'absent', 'empty', 'dataset' (our manifest), 'unfinished' (our journal) or 'foreign'."""
    if not path.exists():
        if path.is_symlink():
            raise BuildError(f"--out {path}: a dangling symlink; remove it or choose another directory")
        return "absent"
    if not path.is_dir():
        raise BuildError(f"--out {path}: exists and is not a directory")
    if not any(path.iterdir()):
        return "empty"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME:
        return "dataset"
    if _first_line_format(path / BUILD_DIR / JOURNAL) == FORMAT_NAME:
        return "unfinished"
    return "foreign"


def foreign_files(path: Path) -> list[str]:
    """Entries of a dataset directory that the format does not name (sorted): never ours to delete."""
    found = []
    for p in sorted(path.iterdir()):
        if p.name == BUILD_DIR and p.is_dir() and not p.is_symlink():
            found += [f"{BUILD_DIR}/{q.name}" for q in sorted(p.iterdir()) if q.name != JOURNAL or not q.is_file()]
        elif not (_DATASET_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink()):
            found.append(p.name)
    return found


def remove_ours(path: Path) -> None:
    """Delete a dataset or build directory's own files, then the directory if nothing else is left."""
    if not path.is_dir():
        return
    for p in path.iterdir():
        if p.name == BUILD_DIR and p.is_dir() and not p.is_symlink():
            (p / JOURNAL).unlink(missing_ok=True)
            _rmdir_if_empty(p)
        elif _DATASET_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()
    _rmdir_if_empty(path)


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # something not ours is inside: it stays
        path.rmdir()


def check_ours(path: Path, what: str) -> str:
    """kind(path), refusing a directory that holds anything the format does not name."""
    k = kind(path)
    if k == "foreign":
        example = sorted(p.name for p in path.iterdir())[0]
        raise BuildError(
            f"{what} {path}: not empty and not a dataset (it holds {example!r}); choose a new or empty directory"
        )
    if k in ("dataset", "unfinished"):
        extra = foreign_files(path)
        if extra:
            raise BuildError(
                f"{what} {path}: holds {extra[0]!r} ({len(extra)} file(s) not of the dataset); "
                "move them away first: make_shards removes only dataset files"
            )
    return k


def replace(out: Path, staging: Path) -> None:
    """Put the complete build in `staging` at `out`; an old dataset there is swapped out, then its files removed."""
    check_ours(out, "--out")
    swap_in_dir(staging, out, remove_old=remove_ours, exchange=_exchange)


_HELD: set[int] = set()


def _forget_locks_in_child() -> None:
    """A forked worker closes its copies of held lock fds: the lock then dies with the process that took it."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


class Lock:
    """An exclusive `flock` on `.<name>.lock` beside `--out`, naming its holder; unlinked on release.

    A flock belongs to the open file, which forked workers would share and keep alive after the
    builder is killed; they close their copies at fork, so a killed builder's lock is free at once.
    """

    def __init__(self, out: Path):
        self.path = lock_path(out)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise BuildError(
                    f"--out {out}: another make_shards is building it ({holder}); "
                    "wait for it to finish, or stop that process"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and unlinked it after we opened it: lock the new one
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)  # while still holding it, so no one locks a stale file
        _HELD.discard(self.fd)
        os.close(self.fd)


def _holder(fd: int) -> str:
    """The holder's pid, host, command and start time, as it wrote them (it may be writing them now)."""
    for _ in range(50):
        try:
            info = json.loads(os.pread(fd, 65536, 0))
            return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.02)
    return "holder not recorded"
