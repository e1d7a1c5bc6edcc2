"""Run files written atomically, and the one-line error a full disk gives while a run writes them.

Its own module (not rundir's) so that checkpoints and plots can write without importing the run's options:
config -> checkpoint -> rundir -> config was a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from gq.common.errors import GQError
from gq.common.files import write_atomically as common_write_atomically


class WriteError(GQError, RuntimeError):
    """A run file could not be written (full disk, quota, read-only); `str()` names it and what to do."""


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` atomically (`gq.common.files.write_atomically`: a unique temporary beside it, fsync'd, renamed
    over it): readers see the old file or the whole new one. On failure the temporary is removed,
    `path` is left as it was, and WriteError names the file."""
    path = Path(path)
    try:
        common_write_atomically(path, write)
    except (OSError, RuntimeError) as err:  # torch.save's RuntimeError ("unexpected pos") follows an OSError
        cause = err
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        raise WriteError(
            f"{path}: could not be written ({cause.strerror or cause}); {kept}. Free disk space "
            f"(or choose another --out), then rerun; --resume continues from last.pt"
        ) from None
