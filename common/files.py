"""Writing files and directories so that readers see the old version or the whole new one, never a part.

`write_atomically` is the one temp-file-and-rename write of the project (manifests, indexes, run
files, checkpoints, JSON reports); `swap_in_dir` puts a directory built beside its destination in
place (the build folder of `gq.common.ownership.BesideBuild`); `check_writable` finds a read-only
output place before a command starts its work.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import GQError

_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then put back
os.umask(_UMASK)
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15)
_AT_FDCWD = -100


def temporary_file(path: Path) -> tuple[int, Path]:
    """A new, empty temporary file beside `path`, `.<name>.<random>.tmp`: unique, so two writers of one
    path never share it. Returns its open descriptor and its path; the mode is the usual 0666 & ~umask."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from a shared group
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, Path(tmp)


_TEMPORARY = re.compile(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp")  # tempfile.mkstemp's 8 random characters


def temporary_target(name: str) -> str | None:
    """The name a `temporary_file` called `name` was made for, or None when `name` is not one: how a cleaner
    tells a temporary left by a killed writer from a file of the user's."""
    match = _TEMPORARY.fullmatch(name)
    return match.group(1) if match else None


def write_atomically(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write `data` (bytes, text as UTF-8, or a function writing into a binary file) to `path` through a
    temporary file beside it (`temporary_file`), fsync'd and renamed over `path`. On any failure the
    temporary is removed and `path` is as it was; the error propagates unchanged."""
    path = Path(path)
    fd, tmp = temporary_file(path)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:  # unbuffered: a writer's OSError surfaces at its write
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):  # this file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in_dir(
    new: Path,
    out: Path,
    *,
    remove_old: Callable[[Path], None],
    exchange: Callable[[Path, Path], bool] = exchange,
) -> None:
    """Put the complete directory `new` at `out`; `new` and `out` are siblings.

    An existing `out` (the caller has checked it may be replaced) is swapped with `new` in one atomic
    exchange where the file system can, else renamed aside to `.<name>.<random>.old` first (put back if
    the second rename fails, so a crash between the two leaves it whole there). Either way the old
    directory is handed to `remove_old`, which deletes only what the caller owns, once `new` is in
    place. `exchange` is a parameter so callers (and tests) can choose the two-rename path.
    """
    if not out.exists() and not out.is_symlink():
        os.rename(new, out)
        return
    if exchange(new, out):
        remove_old(new)  # now the old directory
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old)  # a directory renames over an empty one
    try:
        os.rename(new, out)
    except OSError:
        os.rename(old, out)
        raise
    remove_old(old)


class UnwritableError(GQError):
    """An output place where nothing can be written (a read-only file system, no permission): exit code 1."""


def check_writable(target: str | os.PathLike, *, flag: str) -> None:
    """UnwritableError unless a file can be created where `target` will be written: in it (an existing folder)
    or in its nearest existing parent folder. Commands call it before any work, so a read-only --out ends
    with one line at once, not with a traceback after the work is done."""
    folder = Path(target)
    while not folder.is_dir() and folder.parent != folder:
        folder = folder.parent
    try:
        fd, probe = temporary_file(folder / ".write-check")
    except OSError as err:
        raise UnwritableError(
            f"{flag} {target}: nothing can be written in {folder} ({err.strerror}); choose another {flag}"
        ) from None
    os.close(fd)
    probe.unlink()
