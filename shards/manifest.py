"""`manifest.json`: what a dataset is, written last; a directory without it is not a dataset."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .format import FORMAT_NAME, FORMAT_VERSION, MANIFEST


class DatasetError(ValueError):
    """A directory that is not a readable dataset of this format; `str()` says what and what to do."""


# Not part of a dataset's identity: where and how it was made, and the fingerprint itself.
_NOT_IDENTITY = ("fingerprint", "made_by")


def fingerprint(manifest: dict) -> str:
    """The dataset's identity: SHA-256 of its manifest's contents (files, checksums, layout, splits,
    statistics), so a moved or re-spelled directory keeps it and a rebuild with other data changes it."""
    content = {k: v for k, v in manifest.items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(root: Path, manifest: dict) -> None:
    """Write atomically with its fingerprint; keys sorted and no timestamps, so equal builds give equal bytes."""
    manifest = {**manifest, "fingerprint": fingerprint(manifest)}
    path = root / MANIFEST
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_manifest(root: Path) -> dict:
    """Load and check the manifest's format name and version."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory; build one with tools/make_shards.py")
    path = root / MANIFEST
    if not path.exists():
        hint = " (an unfinished build: rerun make_shards with --resume)" if (root / ".build").exists() else ""
        raise DatasetError(f"{path}: missing, so {root} is not a finished dataset{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: unreadable manifest ({err}); rebuild the dataset") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: format version {manifest.get('version')}, this reader reads version "
            f"{FORMAT_VERSION}; rebuild the dataset with tools/make_shards.py SOURCE --out DIR"
        )
    return manifest
