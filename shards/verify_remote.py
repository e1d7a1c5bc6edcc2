"""`gq shards verify URL`: the checks of `verify` on a dataset in object storage, through a local stand-in.

The stand-in is a temporary folder holding the manifest (checked as it is read), the index, and each shard
file as a sparse file of the object's size whose first 4 KiB are the object's real NPY header: what the quick
checks read (sizes, headers, the index) is then exactly the remote dataset's, at the cost of one small read per
file. The full check downloads each shard's two files in turn just before its records are read, and drops
them after, so it needs local room for one shard, not the dataset.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .format import HEADER_BYTES, INDEX, MANIFEST, DatasetError, labels_name, sdf_name
from .remote import RemoteStore, read_remote_manifest
from .verify import VerifyResult, verify


def _stand_in(path: Path, head: bytes, size: int) -> None:
    """A sparse file of `size` bytes that starts with `head`."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


def verify_remote(url: str, *, quick: bool = False, progress: bool = False) -> VerifyResult:
    """Check the dataset at `url` as `verify` checks a local one; the result names the URL."""
    store = RemoteStore(url)
    try:
        manifest, raw = read_remote_manifest(store)
    except DatasetError as err:
        return VerifyResult(Path(), [str(err)], quick=quick)
    sizes = store.sizes(entry.name for entry in manifest.files)
    with tempfile.TemporaryDirectory(prefix="gq-verify-") as folder:
        root = Path(folder)
        (root / MANIFEST).write_bytes(raw)
        for entry in manifest.files:
            if entry.name not in sizes:
                continue  # verify names it as missing
            if entry.name == INDEX:
                store.copy_to(INDEX, root / INDEX)
            else:
                _stand_in(root / entry.name, store.read_head(entry.name, HEADER_BYTES), sizes[entry.name])

        @contextlib.contextmanager
        def shard_files(shard: int) -> Iterator[None]:
            names = [name for name in (sdf_name(shard), labels_name(shard)) if name in sizes]
            try:
                for name in names:
                    store.copy_to(name, root / name)
                yield
            finally:
                for name in names:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(root / name)

        return verify(root, quick=quick, progress=progress, shard_files=shard_files, label=store.url)
