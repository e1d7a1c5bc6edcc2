"""Where a build writes: beside `--out`, in the one build-beside of the project (`gq.common.ownership.BesideBuild`).

The build is made in a temporary `.<name>.<id>.tmp` beside `--out`, whose id the lock `.<name>.lock` records,
and swapped in only when complete, so a failed rebuild leaves the old dataset as it was. An interrupted or
killed build leaves that temporary and the lock file naming it: `--resume` continues it (its journal,
`.build/journal.jsonl`, says which shards are done), `--overwrite` removes what its record covers. The
dataset's record names the files of the format (`dataset_entries`), and travels with the finished dataset.
"""

from __future__ import annotations

from pathlib import Path

from gq.common.errors import UsageError
from gq.common.ownership import noted_temporary

from .format import BUILD_DIR, INDEX, MANIFEST, SKIPPED

JOURNAL = "journal.jsonl"
SPILL = ("spill-sdf.bin", "spill-labels.bin")  # in BUILD_DIR: records in arrival order (`ShardWriter`)
TOOL = "make_shards"


class BuildError(UsageError):
    """A build that cannot start or continue; `str()` says what and what to do."""


def unfinished_build(out: Path) -> Path | None:
    """The build folder of a running, interrupted or killed build into `out` (what the lock beside it names)."""
    return noted_temporary(out)


def dataset_entries(num_shards: int) -> list[str]:
    """What a build of `num_shards` shards writes: the entries of its ownership record."""
    shards = [f"{kind}-{k:05d}.npy" for k in range(num_shards) for kind in ("sdf", "labels")]
    return [*shards, MANIFEST, INDEX, SKIPPED, *(f"{BUILD_DIR}/{name}" for name in (JOURNAL, *SPILL))]
