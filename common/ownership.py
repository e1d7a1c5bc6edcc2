"""The ownership rule of every writing command: a folder records what its command wrote, and only that is removed.

A command that writes a folder puts a small hidden record in it (`.gq-owned.json`: the tool, the entries it
writes, relative paths, and for each file it finished writing its size and content hash, `fingerprint`).
`--overwrite` removes only what a record covers, as it was written, and refuses with one line naming the
first entry it does not cover. An entry is a file, a folder owned with all it holds (written with a trailing
"/"; a folder inside it holding a record of its own is still judged by that record), or a folder that only
contains other entries; a folder holding its own record (a run inside a comparison) is judged by that record.
A folder without a record is never removed: no command can tell its own old output from a user's folder of
the same shape. No command writes symlinks, so one is never covered (inside a folder owned whole it goes with
the folder, unfollowed).

`Lock` is the one lock beside an output, so two runs never share it; `BesideBuild` builds a new output in a
temporary beside the old one, named by a random id that the lock records (so a killed run's temporary is
found by that id, never by its name's shape), and swaps it in when complete. See docs/ownership.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import secrets
import shlex
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from .errors import GQError, UsageError
from .files import check_writable, swap_in_dir, write_atomically
from .files import exchange as _exchange
from .inputs import parse_json, read_small_file

RECORD = ".gq-owned.json"
WHOLE_HASH_BYTES = 64 << 20  # a file up to this size is hashed whole; a larger one (a shard) by its ends
END_BLOCK = 1 << 20


class OwnershipError(UsageError):
    """A folder (or file) that a command may not replace or share; `str()` says which entry and what to do."""


class RecordWriteError(GQError):
    """The record could not be written (a read-only or full file system): the command stops before writing."""


def fingerprint(path: Path) -> str:
    """`size:xxh3-64` of a file's bytes: all of them up to 64 MiB, else its first and last MiB (a shard's
    fingerprint costs two reads, and a change of size, header or tail still shows)."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= WHOLE_HASH_BYTES:
            for chunk in iter(lambda: f.read(END_BLOCK), b""):
                h.update(chunk)
        else:
            h.update(f.read(END_BLOCK))
            f.seek(size - END_BLOCK)
            h.update(f.read(END_BLOCK))
    return f"{size}:{h.hexdigest()}"


@dataclass(frozen=True)
class Owned:
    """What one command wrote into a folder: relative posix paths (a trailing "/" owns a folder whole), and the
    fingerprint of each file it finished writing (`files`: a claim, checked before the file is removed)."""

    tool: str
    entries: frozenset[str]
    files: Mapping[str, str] = field(default_factory=dict)

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

    def unchanged(self, rel: str, path: Path) -> bool:
        """`path` is as the record claims (or the record claims nothing of it: written when the command stopped)."""
        claim = self.files.get(rel)
        if claim is None:
            return True
        try:
            st = os.lstat(path)
            return _fingerprint_of(str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == claim
        except OSError:
            return False


@functools.lru_cache(maxsize=1 << 16)
def _fingerprint_of(path: str, *identity: int) -> str:
    """`fingerprint`, once per file version in this process: a command checks an output several times (before
    its work, under the lock, at the swap) and a hash of every scene each time would cost more than the check.
    The identity includes ctime, which no one can set back, so a file written in between is hashed again."""
    return fingerprint(Path(path))


def write_record(folder: Path, *, tool: str, entries: Iterable[str], files: Mapping[str, str] | None = None) -> Owned:
    """Record (atomically) that `tool` writes `entries` into `folder`, and the fingerprints `files` of those it
    finished; the same entries and files give the same bytes (no time, no process id)."""
    owned = Owned(tool, frozenset(entries), dict(sorted((files or {}).items())))
    data = {"tool": tool, "entries": sorted(owned.entries)}
    if owned.files:
        data["files"] = owned.files
    try:
        write_atomically(Path(folder) / RECORD, json.dumps(data, indent=1) + "\n")
    except OSError as err:
        raise RecordWriteError(
            f"{Path(folder) / RECORD}: could not be written ({err.strerror or err}); nothing was written "
            "there: free disk space or choose a writable folder"
        ) from None
    return owned


def seal_record(folder: Path, owned: Owned) -> Owned:
    """Rewrite `folder`'s record with the fingerprint of every recorded file now there: what it claims to
    have written, so a file changed later (or a forged entry) is kept by `--overwrite`."""
    files = {}
    for rel in owned.entries:
        path = Path(folder) / rel
        if not rel.endswith("/") and stat.S_ISREG(_lmode(path)):
            files[rel] = fingerprint(path)
    return write_record(folder, tool=owned.tool, entries=owned.entries, files=files)


def _lmode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def read_record(folder: Path) -> Owned | None:
    """The record in `folder`, None without one; OwnershipError when it is there but unreadable (never guessed)."""
    path = Path(folder) / RECORD
    if not path.is_file() or path.is_symlink():
        if path.is_symlink() or path.exists():
            raise OwnershipError(f"{path}: not a record file; remove it or choose another folder")
        return None
    try:
        data = parse_json(read_small_file(path, "ownership record"))  # bounded: a record lists a folder's entries
        tool, entries, files = data["tool"], data["entries"], data.get("files", {})
        if not (
            isinstance(tool, str)
            and isinstance(entries, list)
            and all(isinstance(e, str) for e in entries)
            and isinstance(files, dict)
            and all(isinstance(v, str) for v in files.values())
        ):
            raise ValueError("wrong types")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise OwnershipError(f"{path}: unreadable ownership record ({err}); move the folder's contents away") from None
    return Owned(tool, frozenset(entries), files)


def _holds_record(folder: Path) -> bool:
    """A record anywhere under `folder` (links never followed)."""
    return any(RECORD in names for _, _, names in os.walk(folder))


def _walk_whole(path: Path, rel: str, ours: list[Path], foreign: list[str]) -> None:
    """A folder owned whole is ours with all it holds, except a folder inside that holds a record of its own
    (another command's output put there): that one is named, never removed with it."""
    if os.path.lexists(path / RECORD):
        foreign.append(rel)
    elif not _holds_record(path):
        ours.append(path)
    else:
        for child in sorted(path.iterdir()):
            if stat.S_ISDIR(_lmode(child)):
                _walk_whole(child, f"{rel}/{child.name}", ours, foreign)
            else:
                ours.append(child)


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
            (ours.append(path) if owned.covers_file(rel) and owned.unchanged(rel, path) else foreign.append(rel))
        elif rel + "/" in owned.entries:
            _walk_whole(path, rel, ours, foreign)
        elif (nested := read_record(path)) is not None and rel in owned.entries:
            _walk(path, nested, "", ours, foreign_inner := [], ignore)
            foreign += [f"{rel}/{f}" for f in foreign_inner]
            ours.append(path / RECORD)
        elif any(e.startswith(rel + "/") for e in owned.entries) or rel in owned.entries:
            _walk(path, owned, rel + "/", ours, foreign, ignore)
        else:
            foreign.append(rel)


def foreign_entries(folder: Path, owned: Owned, *, ignore: Iterable[str] = ()) -> list[str]:
    """Entries under `folder` (relative paths, sorted) that `owned` does not cover, or that changed since it was
    recorded: never ours to remove."""
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


def _entries(count: int) -> str:
    return f"{count} such entr{'y' if count == 1 else 'ies'}"


def check_replaceable(
    folder: Path, *, tool: str, overwrite: bool, flag: str = "--out", ignore: Iterable[str] = ()
) -> Owned | None:
    """What `tool` may remove so that `folder` can be written anew: None for an absent or empty folder, else
    its record when `overwrite` is given and the record covers everything there, as it was written.

    OwnershipError otherwise, in one line: a file, a folder of another tool, a folder without a record (never
    removed, whatever it holds), the first entry not covered or changed since it was recorded. `ignore` names
    entries such as a lock file that may be there (at any depth).
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
    if owned is None:
        first = sorted(p.name for p in folder.iterdir() if p.name not in ignored)[0]
        raise OwnershipError(
            f"{flag} {folder}: holds {first!r} and no {RECORD} says {tool} wrote it, so no command removes it; "
            f"choose another {flag}, or delete it by hand (rm -r {shlex.quote(str(folder))}) if you no longer need it"
        )
    if owned.tool != tool:
        raise OwnershipError(f"{flag} {folder}: written by {owned.tool}, not {tool} ({RECORD}); choose another folder")
    foreign = foreign_entries(folder, owned, ignore=ignore)
    if foreign:
        first = foreign[0]
        what = f"changed since {tool} wrote it" if first in owned.files else f"which {tool} did not write"
        raise OwnershipError(
            f"{flag} {folder}: holds {first!r}, {what} ({_entries(len(foreign))}); it is kept: move them away "
            f"first: {tool} removes only what it wrote, as it wrote it"
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


def noted_temporary(out: Path) -> Path | None:
    """The temporary that the lock beside `out` names (a running, killed or interrupted build's), if it is there."""
    try:
        info = json.loads(lock_path(out).read_text())
    except (OSError, ValueError):
        return None
    return _temporary(Path(out), info)


def _temporary(out: Path, info: object) -> Path | None:
    name = info.get("temporary") if isinstance(info, dict) else None
    if not (isinstance(name, str) and "/" not in name and name.startswith(f".{out.name}.") and name.endswith(".tmp")):
        return None
    path = out.parent / name
    return path if stat.S_ISDIR(_lmode(path)) else None


class BesideBuild:
    """A new output built in a temporary sibling `.<name>.<id>.tmp` that carries its record from the start,
    swapped in (files.swap_in_dir) only when complete, under `Lock`; the old output loses only what it owned.

    The random id is written into the lock file before the temporary is made: the lock file outlives a killed
    run, so the next run (holding the lock, so no live run writes there) finds that temporary by the id and
    removes it (or, `resumable`, hands it back as `unfinished`); a folder is never taken for a temporary because
    of its name. A `resumable` build also keeps its temporary when interrupted (Ctrl-C, SIGTERM).

    Construct it to check `out` early, its ownership and that it can be written (before slow work); `with` it to
    lock and re-check, and create missing parents; `create(entries)` makes the temporary folder (`resume`
    continues the unfinished one); `commit()` swaps it in. Leaving the block on an error removes the temporary
    folder and the parents it made.
    """

    def __init__(self, out: Path, *, tool: str, overwrite: bool, flag: str = "--out", resumable: bool = False):
        self.out, self.tool, self.flag, self.resumable = Path(out).absolute(), tool, flag, resumable
        self._check = lambda: check_replaceable(self.out, tool=tool, overwrite=overwrite, flag=flag)
        self.old = self._check()
        check_writable(self.out, flag=flag)  # a read-only place ends the command now, not after its slow work
        self.tmp: Path | None = None
        self.unfinished: Path | None = None
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
            raise self._unwritable(err) from None
        try:
            self.old = self._check()  # again, now that no other run of this tool can change it
            previous = _temporary(self.out, self._lock.previous)
            owned = read_record(previous) if previous is not None else None
            if owned is not None and owned.tool == self.tool:
                self.unfinished = previous
                self._lock.note(temporary=previous.name)  # still named if this run ends without touching it
                if not self.resumable:
                    self.discard_unfinished()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _unwritable(self, err: OSError) -> OwnershipError:
        return OwnershipError(
            f"{self.flag} {self.out}: cannot write in {self.out.parent} ({err.strerror}); choose a writable folder"
        )

    def discard_unfinished(self) -> None:
        """Remove what the unfinished build's record covers (anything else in it stays)."""
        if self.unfinished is not None:
            remove_owned(self.unfinished, read_record(self.unfinished) or Owned(self.tool, frozenset()))
            self.unfinished = None
            self._lock.note(temporary=None)

    def create(self, entries: Iterable[str]) -> Path:
        """A new temporary folder, with the record of `entries` (all this build will write) already in it."""
        self.discard_unfinished()
        try:
            while self.tmp is None:
                path = self.out.parent / f".{self.out.name}.{secrets.token_hex(6)}.tmp"
                self._lock.note(temporary=path.name)  # named before it exists: a kill never leaves one unnamed
                with contextlib.suppress(FileExistsError):
                    path.mkdir()
                    self.tmp = path
            write_record(self.tmp, tool=self.tool, entries=entries)
        except OSError as err:
            raise self._unwritable(err) from None
        return self.tmp

    def resume(self, entries: Iterable[str]) -> Path:
        """The unfinished build's folder, to continue; its record now names `entries`."""
        self.tmp, self.unfinished = self.unfinished, None
        write_record(self.tmp, tool=self.tool, entries=entries)
        return self.tmp

    def commit(self) -> None:
        """Seal the temporary's record (`seal_record`) and put it at `out`. Entries of the old output that it did
        not own (written there during the build) move into the new one; one where the new output has its own
        entry refuses the swap, leaving the old output as it was. Then the old output's own entries go."""
        seal_record(self.tmp, read_record(self.tmp))
        old = self.old or Owned(self.tool, frozenset())
        late = foreign_entries(self.out, old) if self.out.is_dir() and not self.out.is_symlink() else []
        clash = [rel for rel in late if os.path.lexists(self.tmp / rel)]
        if clash:
            raise OwnershipError(
                f"{self.flag} {self.out}: {clash[0]!r} was written there during the build, where the new output "
                f"has its own ({_entries(len(clash))}); {self.out} is left as it was: move them away and run again"
            )
        swapped = False

        def settle(folder: Path) -> None:
            nonlocal swapped
            swapped = True  # `folder` is the old output now: never removed as the temporary
            self._settle(folder, old)

        try:
            swap_in_dir(self.tmp, self.out, remove_old=settle, exchange=_exchange)  # looked up now: tests vary it
        except BaseException:
            if swapped:
                self.tmp, self._made = None, []
            raise
        self.tmp, self._made = None, []
        self._lock.note(temporary=None)

    def _settle(self, folder: Path, old: Owned) -> None:
        """The old output, swapped out to `folder`: what it did not own moves into the new output, the rest goes."""
        stuck = []
        for rel in foreign_entries(folder, old):
            target = self.out / rel
            if os.path.lexists(target):  # written in the moment between the check and the swap
                stuck.append(rel)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(folder / rel, target)
        remove_owned(folder, old)
        if stuck:
            raise OwnershipError(
                f"{self.flag} {self.out}: {stuck[0]!r} was written there during the swap ({_entries(len(stuck))}); "
                f"the new output is in place and the old entries are kept in {folder}: look at them there"
            )

    def __exit__(self, kind, *exc) -> None:
        interrupted = kind is not None and issubclass(kind, (KeyboardInterrupt, SystemExit))
        try:
            if kind is not None and self.tmp is not None and not (self.resumable and interrupted):
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None
        finally:
            if self._lock is not None:
                pending = self.tmp is not None or self.unfinished is not None
                self._lock.release(keep=pending)  # the lock file names what a later run resumes or removes
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
    on release unless kept (`release(keep=True)`: it then names an unfinished build for the next holder).

    A flock belongs to the open file, which forked workers would share and keep alive after the writer is
    killed; they close their copies at fork, so a killed writer's lock is free at once. Its identity is
    re-checked after locking: a holder unlinks it on release, so a waiter may have opened a stale file.
    `previous` is what the last holder wrote (it is gone: a killed or interrupted run), read before this
    holder's text replaces it, whole (truncated first: no tail of a longer text is left).
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
                    f"{flag} {out}: in use by another {tool} ({holder}); "
                    f"wait for it to end or stop it, or choose another {flag}"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and unlinked it after we opened it: lock the new one
        self.fd = fd
        try:
            self.previous = json.loads(os.pread(fd, 65536, 0))
        except ValueError:
            self.previous = None
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            self._write()
        except OSError:
            self.release()
            raise
        _HELD.add(fd)

    def note(self, **fields: object) -> None:
        """Add `fields` to the holder's text (None removes one), rewritten whole."""
        self.info.update(fields)
        self.info = {k: v for k, v in self.info.items() if v is not None}
        self._write()

    def _write(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(self.info) + "\n").encode(), 0)

    def release(self, *, keep: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):  # unlinked while still held, so no one locks a stale file
            if not keep and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
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
