"""Which split each scene belongs to: the seed's `splits.json`, or a hash of the scene name.

Splits are by scene, never by grasp, so no validation object is ever seen in training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from gq.common.errors import UsageError
from gq.common.inputs import InputError, parse_json, read_small_file

from .format import SPLITS


class SplitError(UsageError):
    """A splits file that cannot assign every scene exactly one split."""


def hash_split(name: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from the name alone: stable when scenes are added or removed."""
    u = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def part_of(name: str, count: int) -> int:
    """The part (0 .. count-1) of a scene in a build made in `count` parts: a hash of the name alone, so every
    task of a cluster array agrees on it without talking to the others."""
    return int.from_bytes(hashlib.sha256(f"part\0{name}".encode()).digest()[:8], "big") % count


def splits_digest(splits: str | None) -> str | None:
    """SHA-256 of a splits file's bytes (None without one): its content decides placement, not its name."""
    if splits is None:
        return None
    return hashlib.sha256(read_splits_file(Path(splits))).hexdigest()


def read_splits_file(path: Path) -> bytes:
    """The bytes of a splits file (a regular file of at most MAX_TEXT_BYTES); SplitError names it otherwise."""
    try:
        return read_small_file(path, "--splits")
    except InputError as err:
        raise SplitError(str(err)) from None
    except OSError as err:
        raise SplitError(f"{path}: unreadable splits file ({err})") from None


def load_splits(path: Path) -> dict[str, str]:
    """name -> split from a `{"train": [...], "val": [...], "test": [...]}` file."""
    text = read_splits_file(path)
    try:
        data = parse_json(text)
    except ValueError as err:
        raise SplitError(f"{path}: unreadable splits file ({err})") from None
    if not isinstance(data, dict) or not set(data) <= set(SPLITS):
        raise SplitError(f"{path}: expected an object with keys among {', '.join(SPLITS)}")
    assignment: dict[str, str] = {}
    for split, names in data.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SplitError(f"{path}: '{split}' must be a list of scene names")
        for name in names:
            if name in assignment and assignment[name] != split:
                raise SplitError(f"{path}: scene {name} is in both '{assignment[name]}' and '{split}'")
            assignment[name] = split
    return assignment


def assign_splits(
    names: list[str],
    splits_file: Path | None,
    val_fraction: float,
    test_fraction: float,
    present: list[str] | None = None,
    allow_missing: bool = False,
) -> list[str]:
    """The split of each name, from the file when given: a scene in no split is an error, and so is a
    scene the file names that is not `present` in SOURCE (a half-copied SOURCE) unless `allow_missing`."""
    if splits_file is None:
        return [hash_split(n, val_fraction, test_fraction) for n in names]
    assignment = load_splits(splits_file)
    missing = [n for n in names if n not in assignment]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SplitError(f"{splits_file}: scene {missing[0]}{more} is in no split; add it to the file")
    known = set(names if present is None else present)
    absent = sorted(n for n in assignment if n not in known)
    if absent and not allow_missing:
        raise SplitError(
            f"{splits_file}: scene {absent[0]} ({len(absent)} of its {len(assignment)} scenes in all) "
            "is not in SOURCE; copy the missing scenes in, or pass --allow-missing-scenes"
        )
    return [assignment[n] for n in names]
