"""The ownership rule of every writing command: a folder records what its command wrote, and only that is removed.

A command that writes a folder puts a small hidden record in it (`.gq-owned.json`: the tool and the entries
it writes, relative paths). `--overwrite` (and the clean-up of a killed run's temporaries) removes only what
a record covers, and refuses with one line naming the first entry it does not cover. An entry is a file,
a folder owned with all it holds (written with a trailing "/"), or a folder that only contains other
entries; a folder holding its own record (a run inside a comparison) is judged by that record. No command
writes symlinks, so one is never covered (inside a folder owned whole it goes with the folder, unfollowed).
A folder written before records existed has none: each command recognises its old layout exactly
(`legacy`), or refuses. `Lock` is the one lock beside an output, so two runs never share it; `BesideBuild`
builds a new output beside the old one and swaps it in when complete. See docs/ownership.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import GQError, UsageError
from .files import _UMASK, check_writable, swap_in_dir, write_atomically

RECORD = ".gq-owned.json"


class OwnershipError(UsageError):
    """A folder (or file) that a command may not replace or share; `str()` says which entry and what to do."""


class RecordWriteError(GQError):
    """The record could not be written (a read-only or full file system): the command stops before writing."""


@dataclass(frozen=True)
class Owned:
    """What one command wrote into a folder: relative posix paths; a trailing "/" owns a folder whole."""

    tool: str
    entries: frozenset[str]

    def covers_file(self, rel: str) -> bool:
        """`rel` is a recorded file, or a temporary of one (`.<name>.*.tmp` beside it, as write_atomically makes)."""
        if rel in self.entries:
            return True
        parent, _, name = rel.rpartition("/")
        prefix = f"{parent}/" if parent else ""
        return (
            name.startswith(".")
            and name.endswith(".tmp")
            and any(
                name.startswith(f".{e[len(prefix) :]}.")
                for e in self.entries
                if e.startswith(prefix) and "/" not in e[len(prefix) :]
            )
        )


def write_record(folder: Path, *, tool: str, entries: Iterable[str]) -> Owned:
    """Record (atomically) that `tool` writes `entries` into `folder`; the same entries give the same bytes."""
    owned = Owned(tool, frozenset(entries))
    text = json.dumps({"tool": tool, "entries": sorted(owned.entries)}, indent=1) + "\n"
    try:
        write_atomically(Path(folder) / RECORD, text)
    except OSError as err:
        raise RecordWriteError(
            f"{Path(folder) / RECORD}: could not be written ({err.strerror or err}); nothing was written "
            "there: free disk space or choose a writable folder"
        ) from None
    return owned


def read_record(folder: Path) -> Owned | None:
    """The record in `folder`, None without one; OwnershipError when it is there but unreadable (never guessed)."""
    path = Path(folder) / RECORD
    if not path.is_file() or path.is_symlink():
        if path.is_symlink() or path.exists():
            raise OwnershipError(f"{path}: not a record file; remove it or choose another folder")
        return None
    try:
        data = json.loads(path.read_text())
        tool, entries = data["tool"], data["entries"]
        if not (isinstance(tool, str) and isinstance(entries, list) and all(isinstance(e, str) for e in entries)):
            raise ValueError("wrong types")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise OwnershipError(f"{path}: unreadable ownership record ({err}); move the folder's contents away") from None
    return Owned(tool, frozenset(entries))


def _walk(folder: Path, owned: Owned, prefix: str, ours: list[Path], foreign: list[str], ignore: frozenset) -> None:
    """Sort what is under `folder` (relative to the record's folder by `prefix`) into ours and foreign."""
    for path in sorted(folder.iterdir()):
        rel = prefix + path.name
        mode = os.lstat(path).st_mode
        if path.name in ignore or (not prefix and path.name == RECORD):
            continue
        if stat.S_ISLNK(mode):  # no command writes symlinks: one is never ours, and never followed
            foreign.append(rel)
        elif not stat.S_ISDIR(mode):
            (ours.append(path) if owned.covers_file(rel) else foreign.append(rel))
        elif rel + "/" in owned.entries:
            ours.append(path)
        elif (nested := read_record(path)) is not None and rel in owned.entries:
            _walk(path, nested, "", ours, foreign_inner := [], ignore)
            foreign += [f"{rel}/{f}" for f in foreign_inner]
            ours.append(path / RECORD)
        elif any(e.startswith(rel + "/") for e in owned.entries) or rel in owned.entries:
            _walk(path, owned, rel + "/", ours, foreign, ignore)
        else:
            foreign.append(rel)


def foreign_entries(folder: Path, owned: Owned, *, ignore: Iterable[str] = ()) -> list[str]:
    """Entries under `folder` (relative paths, sorted) that `owned` does not cover: never ours to remove."""
    ours: list[Path] = []
    foreign: list[str] = []
    _walk(Path(folder), owned, "", ours, foreign, frozenset(ignore))
    return foreign


def remove_owned(folder: Path, owned: Owned, *, ignore: Iterable[str] = ()) -> None:
    """Delete what `owned` covers in `folder` (its record last), then every folder left empty, `folder` too."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return
    ours: list[Path] = []
    _walk(folder, owned, "", ours, [], frozenset(ignore))
    for path in ours:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (folder / RECORD).unlink(missing_ok=True)
    for dirpath, _, _ in sorted(os.walk(folder), key=lambda d: -len(d[0])):  # deepest first; never follows links
        with contextlib.suppress(OSError):  # not empty: something not ours is inside, it stays
            os.rmdir(dirpath)


def check_replaceable(
    folder: Path,
    *,
    tool: str,
    overwrite: bool,
    flag: str = "--out",
    legacy: Callable[[Path], Owned | None] | None = None,
    ignore: Iterable[str] = (),
) -> Owned | None:
    """What `tool` may remove so that `folder` can be written anew: None for an absent or empty folder, else
    the record (or the recognised older layout, `legacy`) when `overwrite` is given and covers everything.

    OwnershipError otherwise, in one line: a file, a folder of another tool, one without a record that
    `legacy` does not recognise, or the first entry not covered. `ignore` names entries such as a lock file
    that may be there (at any depth).
    """
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise OwnershipError(f"{flag} {folder}: a dangling symlink; remove it or choose another folder")
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise OwnershipError(f"{flag} {folder}: exists and is not a directory; choose another path")
    ignored = set(ignore) | {RECORD}
    if not any(p.name not in ignored for p in folder.iterdir()):
        return None  # nothing to keep: a lone record (of whichever tool) is replaced
    owned = read_record(folder)
    if owned is None and legacy is not None:
        owned = legacy(folder)
    if owned is None:
        first = sorted(p.name for p in folder.iterdir() if p.name not in ignored)[0]
        raise OwnershipError(
            f"{flag} {folder}: holds {first!r}, which {tool} did not write (no {RECORD} there says it did); "
            "choose a new or empty folder, or move its contents away"
        )
    if owned.tool != tool:
        raise OwnershipError(f"{flag} {folder}: written by {owned.tool}, not {tool} ({RECORD}); choose another folder")
    foreign = foreign_entries(folder, owned, ignore=ignore)
    if foreign:
        raise OwnershipError(
            f"{flag} {folder}: holds {foreign[0]!r}, which {tool} did not write ({len(foreign)} such "
            f"entr{'y' if len(foreign) == 1 else 'ies'}); move them away first: {tool} removes only what it wrote"
        )
    if not overwrite:
        raise OwnershipError(
            f"{flag} {folder}: already holds an output of {tool}; pass --overwrite to replace it, or choose another"
        )
    return owned


def check_file_replaceable(
    path: Path,
    *,
    tool: str,
    overwrite: bool,
    written_by: Callable[[Path], str | None],
    kind: str,
    flag: str = "--out",
) -> None:
    """The ownership rule for a command that writes one file (its record is inside the file: `written_by`
    reads it, giving the tool's name or None). A file is replaced only with `overwrite` and only when
    `tool` wrote it; a symlink, a folder or anything else at `path` is refused in one line."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_file():
        raise OwnershipError(f"{flag} {path}: exists and is not a plain file; choose another path")
    owner = written_by(path)
    if owner is None:
        raise OwnershipError(f"{flag} {path}: exists and is not a {kind} that {tool} wrote; choose another file")
    if owner != tool:
        raise OwnershipError(f"{flag} {path}: written by {owner}, not {tool}; choose another file")
    if not overwrite:
        raise OwnershipError(f"{flag} {path}: exists; pass --overwrite to replace it or choose another file")


def stale_temporaries(out: Path, *, tool: str) -> list[tuple[Path, Owned]]:
    """Temporary siblings `.<name>.*.tmp` of `out` that a killed run of `tool` left: each carries its record and
    holds nothing else. Call it holding `Lock(out)`: no live run of `tool` can be writing them then."""
    found = []
    for path in sorted(out.parent.glob(f".{_glob_escape(out.name)}.*.tmp")):
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            owned = read_record(path)
        except OwnershipError:
            continue  # not provably ours: it stays
        if owned is not None and owned.tool == tool and not foreign_entries(path, owned):
            found.append((path, owned))
    return found


def _glob_escape(name: str) -> str:
    """`name` with glob's special characters bracketed, so it matches only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class BesideBuild:
    """A new output built in a temporary sibling `.<name>.<random>.tmp` that carries its record from the start,
    swapped in (files.swap_in_dir) only when complete, under `Lock`; the old output loses only what it owned.

    Construct it to check `out` early, its ownership and that it can be written (before slow work); `with` it to
    lock and re-check, remove what killed runs of the same tool left beside `out` (`stale_temporaries`), and
    create missing parents; `create(entries)` makes the temporary folder; `commit()` swaps it in. Leaving the
    block on an error removes the temporary folder and the parents it made.
    """

    def __init__(
        self,
        out: Path,
        *,
        tool: str,
        overwrite: bool,
        flag: str = "--out",
        legacy: Callable[[Path], Owned | None] | None = None,
    ):
        self.out, self.tool, self.flag = Path(out).absolute(), tool, flag
        self._check = lambda: check_replaceable(self.out, tool=tool, overwrite=overwrite, flag=flag, legacy=legacy)
        self.old = self._check()
        check_writable(self.out, flag=flag)  # a read-only place ends the command now, not after its slow work
        self.tmp: Path | None = None
        self._made: list[Path] = []
        self._lock: Lock | None = None

    def __enter__(self) -> BesideBuild:
        missing = [p for p in reversed(self.out.parents) if not p.exists()]
        existing = self.out.parent if not missing else missing[0].parent
        if not existing.is_dir():
            raise OwnershipError(f"{self.flag} {self.out}: {existing} is not a directory; choose another path")
        self._made = missing
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._lock = Lock(self.out, tool=self.tool, flag=self.flag)
        except BaseException as err:
            self._remove_made()
            if not isinstance(err, OSError):
                raise
            raise OwnershipError(
                f"{self.flag} {self.out}: cannot write in {self.out.parent} ({err.strerror}); choose a writable folder"
            ) from None
        try:
            self.old = self._check()  # again, now that no other run of this tool can change it
            for path, owned in stale_temporaries(self.out, tool=self.tool):
                remove_owned(path, owned)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def create(self, entries: Iterable[str]) -> Path:
        """The temporary folder, with the record of `entries` (all this build will write) already in it."""
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
            self.tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes it private; the output gets the usual mode
            write_record(self.tmp, tool=self.tool, entries=entries)
        except OSError as err:
            raise OwnershipError(
                f"{self.flag} {self.out}: cannot write in {self.out.parent} ({err.strerror}); choose a writable folder"
            ) from None
        return self.tmp

    def commit(self) -> None:
        """Put the complete temporary folder at `out`; the old output is swapped out, then what it owned removed."""
        old = self.old or Owned(self.tool, frozenset())
        swap_in_dir(self.tmp, self.out, remove_old=lambda p: remove_owned(p, old))
        self.tmp, self._made = None, []

    def __exit__(self, kind, *exc) -> None:
        try:
            if kind is not None and self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            if kind is not None:
                self._remove_made()

    def _remove_made(self) -> None:
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):  # not empty or already gone: someone else's now
                folder.rmdir()


# --- one run per output: a lock beside it ------------------------------------------------------------

_HELD: set[int] = set()


def _forget_locks_in_child() -> None:
    """A forked worker closes its copies of held lock fds: the lock then dies with the process that took it."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def lock_path(out: Path) -> Path:
    return Path(out).parent / f".{Path(out).name}.lock"


class Lock:
    """An exclusive `flock` on `.<name>.lock` beside an output (or on `path` given), naming its holder; unlinked
    on release.

    A flock belongs to the open file, which forked workers would share and keep alive after the writer is
    killed; they close their copies at fork, so a killed writer's lock is free at once. Its identity is
    re-checked after locking: a holder unlinks it on release, so a waiter may have opened a stale file.
    """

    def __init__(self, out: Path, *, tool: str, flag: str = "--out", path: Path | None = None):
        self.path = Path(path) if path is not None else lock_path(out)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise OwnershipError(
                    f"{flag} {out}: another {tool} is writing it ({holder}); "
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
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            self.fd = fd
            self.release()
            raise
        self.fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):  # unlinked while still held, so no one locks a stale file
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        _HELD.discard(self.fd)
        os.close(self.fd)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    """The holder's pid, host, command and start time, as it wrote them (it may be writing them now)."""
    for _ in range(50):
        try:
            info = json.loads(os.pread(fd, 65536, 0))
            return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.02)
    return "holder not recorded"
