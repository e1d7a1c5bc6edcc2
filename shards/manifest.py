"""`manifest.json`: what a dataset is, written last; a directory without it is not a dataset.

The fields are typed by `format.Manifest`; this module reads and writes the file and computes the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from gq.common.files import write_atomically

from .format import MANIFEST, DatasetError, Manifest

__all__ = ["DatasetError", "Manifest", "fingerprint", "read_manifest", "write_manifest"]

# Not part of a dataset's identity: where and how it was made, and the fingerprint itself.
_NOT_IDENTITY = ("fingerprint", "made_by")


def fingerprint(manifest: Manifest | Mapping) -> str:
    """The dataset's identity: SHA-256 of its manifest's contents (files, checksums, layout, splits,
    statistics), so a moved or re-spelled directory keeps it and a rebuild with other data changes it."""
    data = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    content = {k: v for k, v in data.items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(root: Path, manifest: Manifest | Mapping) -> Manifest:
    """Write atomically with its fingerprint; keys sorted and no timestamps, so equal builds give equal bytes.

    A mapping is checked as `Manifest.from_dict` checks a read one. Returns the manifest as written."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_dict({k: v for k, v in manifest.items() if k != "fingerprint"})
    manifest = replace(manifest, fingerprint=fingerprint(manifest))
    write_atomically(Path(root) / MANIFEST, json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(root: str | Path) -> Manifest:
    """Load the manifest of the dataset in `root`, its format name, version and every key checked."""
    return Manifest.from_json(Path(root) / MANIFEST)
