"""Where a build writes: a staging directory beside `--out`, swapped in only when complete, under a lock.

Only a directory that is provably ours is ever removed or resumed: a finished dataset (a manifest
that parses and names our format) or an unfinished build (`.build/journal.jsonl` whose first line
names our format), and then only the files its ownership record names (`gq.common.ownership`; for a
dataset made before records, the files the format names); any other file stops the build. The
new build is made in `.<name>.building` beside `--out` and replaces it by one atomic exchange when
complete (`files.swap_in_dir`), so a failed rebuild leaves the old dataset as it was. `.<name>.lock`
beside `--out` serialises builds (`gq.common.ownership.Lock`).
"""

from __future__ import annotations

import re
from pathlib import Path

from gq.common.errors import UsageError
from gq.common.files import exchange as _exchange
from gq.common.files import swap_in_dir
from gq.common.inputs import open_input, parse_json, read_small_file
from gq.common.ownership import RECORD, Owned, foreign_entries, read_record, remove_owned, write_record
from gq.common.ownership import Lock as Lock  # the one lock beside an output, re-exported for make_shards' callers
from gq.common.ownership import lock_path as lock_path

from .format import BUILD_DIR, FORMAT_NAME, INDEX, MANIFEST, SKIPPED

JOURNAL = "journal.jsonl"
TOOL = "make_shards"
_NAMES = r"(?:sdf|labels)-\d{5}\.npy|manifest\.json|scenes\.parquet|skipped\.jsonl"
# The format's files and their temporaries: `.<name>.tmp` (shards being filled) and
# `.<name>.<random>.tmp` (files.write_atomically).
_DATASET_FILE = re.compile(rf"(?:{_NAMES})|\.(?:{_NAMES})(?:\.\w+)?\.tmp")


class BuildError(UsageError):
    """A build that cannot start or continue; `str()` says what and what to do."""


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.building"


def _first_line_format(path: Path) -> str | None:
    try:
        with open_input(path, "journal") as f:  # a FIFO would block; an InputError is a ValueError
            head = parse_json(f.readline())
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
        manifest = parse_json(read_small_file(path / MANIFEST, "manifest"))
    except (OSError, ValueError):  # not a regular file of a manifest's size, not JSON: not ours
        manifest = None
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME:
        return "dataset"
    if _first_line_format(path / BUILD_DIR / JOURNAL) == FORMAT_NAME:
        return "unfinished"
    return "foreign"


def dataset_entries(num_shards: int) -> list[str]:
    """What a build of `num_shards` shards writes: the entries of its ownership record."""
    shards = [f"{kind}-{k:05d}.npy" for k in range(num_shards) for kind in ("sdf", "labels")]
    return [*shards, MANIFEST, INDEX, SKIPPED, f"{BUILD_DIR}/{JOURNAL}"]


def record_build(staging: Path, num_shards: int) -> None:
    """Mark the staging directory as make_shards' output of `num_shards` shards (it travels with the dataset)."""
    write_record(staging, tool=TOOL, entries=dataset_entries(num_shards))


def _owned(path: Path) -> Owned:
    """The directory's record; without one (a dataset made before records), every file the format names."""
    owned = read_record(path)
    if owned is not None:
        return owned
    names = [p.name for p in path.iterdir() if _DATASET_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
    return Owned(TOOL, frozenset([*names, f"{BUILD_DIR}/{JOURNAL}"]))


def foreign_files(path: Path) -> list[str]:
    """Entries of a dataset directory that its record (or the format) does not name (sorted): never ours to delete."""
    owned = _owned(path)
    if owned.tool != TOOL:
        return [RECORD]
    return foreign_entries(path, owned)


def remove_ours(path: Path) -> None:
    """Delete a dataset or build directory's own files, then the directory if nothing else is left."""
    if path.is_dir() and not path.is_symlink() and kind(path) in ("dataset", "unfinished", "empty"):
        remove_owned(path, _owned(path))


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
