"""The project's error base: a failure the user can act on ends a command with one line and its exit code."""

from __future__ import annotations

from pathlib import Path


class GQError(Exception):
    """A failure with a one-line `str()` (what, which file or value, what to do); `exit_code` is the command's."""

    exit_code = 1  # the run itself failed (a write, a diverged loss)


class UsageError(GQError, ValueError):
    """Bad input: an option, a file or a dataset that cannot be used as given (exit code 2, like click's)."""

    exit_code = 2


class FileError(UsageError):
    """One file that cannot be used: `str()` is "PATH: reason"; `path` and `reason` stay apart for callers that
    list reasons (skipped.jsonl). Pickles back from worker processes and Ray tasks intact."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.path, self.reason)
