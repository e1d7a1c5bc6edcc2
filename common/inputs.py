"""Reading a file a user names: a regular file of a bounded size, or one line saying what it is instead.

Every file gq reads from a user's path (a scene.npz, --splits, --config, a manifest, an index, a mesh,
a recording, --grasps) is opened here. `open_input` opens without blocking, so a FIFO cannot hang the
command waiting for a writer, and checks the opened file itself (not the path, which could change
between a check and the open): a FIFO, a device such as /dev/zero, a socket or a folder is refused,
and so is a file larger than the reader's limit, before a byte is read. `read_small_file` reads a whole
bounded file (JSON and YAML inputs: far larger than any real one, far smaller than memory), and
`parse_json` turns JSON nested past Python's recursion limit into a ValueError like any other bad JSON.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import UsageError

MAX_TEXT_BYTES = 64 << 20  # JSON and YAML inputs: a 15,547-scene splits file is 0.3 MB
_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


class InputError(UsageError):
    """A named input that is not a regular file of a readable size; `reason` says what it is instead (for
    callers that name the file in their own words), `str()` adds what to do."""

    def __init__(self, what: str, path: str | os.PathLike, reason: str):
        super().__init__(f"{what} {path}: {reason}; give a regular file")
        self.what, self.path, self.reason = what, Path(path), reason

    def __reduce__(self):  # travels back from worker processes intact
        return InputError, (self.what, self.path, self.reason)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_input(path: str | os.PathLike, what: str, *, limit: int | None = None) -> BinaryIO:
    """`path` opened for binary reading, if it is a regular file of at most `limit` bytes (None: any size);
    InputError (naming `what`, e.g. "--splits", and the path) otherwise. A missing or unreadable file raises
    the OSError as open() would, for the caller's own message."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: a FIFO opens without a writer
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(what, path, f"is {_kind(st.st_mode)}, not a regular file")
        if limit is not None and st.st_size > limit:
            raise InputError(what, path, f"{st.st_size:,} bytes, more than the {limit:,} such a file may hold")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str | os.PathLike, what: str, *, limit: int | None = None) -> None:
    """`open_input`'s checks alone, for a reader that opens the file by its name (NumPy's memory map)."""
    open_input(path, what, limit=limit).close()


def read_small_file(path: str | os.PathLike, what: str, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (`open_input`); a file that grew past the limit
    while being read is refused too."""
    with open_input(path, what, limit=limit) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(what, path, f"more than the {limit:,} bytes such a file may hold")
    return data


def parse_json(data: bytes | str) -> object:
    """json.loads, with nesting too deep for the parser's recursion a ValueError (as a syntax error is)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply to be read") from None
