"""Streaming shard writer: records go straight to disk, one open shard at a time.

Each shard's two files are written under temporary names, hashed as they are written, and renamed
into place only when the shard holds all R records, so a complete-looking file is a complete file.
The last shard is padded with empty records; its SDF padding is a sparse hole (zeros that take no
disk space).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format import HEADER_BYTES, LABEL_DIM, LABEL_DTYPE, SCORE_COLUMN, labels_name, npy_header, sdf_name


@dataclass(frozen=True)
class Layout:
    """Shapes and dtypes shared by every shard of a dataset."""

    grid: int
    dtype: str
    max_grasps: int
    records_per_shard: int

    @property
    def sdf_record_bytes(self) -> int:
        return self.grid ** 3 * np.dtype(self.dtype).itemsize

    @property
    def labels_record_bytes(self) -> int:
        return self.max_grasps * LABEL_DIM * LABEL_DTYPE.itemsize

    def sdf_shape(self) -> tuple[int, ...]:
        return (self.records_per_shard,) + (self.grid,) * 3

    def labels_shape(self) -> tuple[int, ...]:
        return (self.records_per_shard, self.max_grasps, LABEL_DIM)

    def file_bytes(self, kind: str) -> int:
        per = self.sdf_record_bytes if kind == "sdf" else self.labels_record_bytes
        return HEADER_BYTES + self.records_per_shard * per

    def empty_labels(self) -> bytes:
        """Labels of a padding record: zero grasps, NaN scores."""
        labels = np.zeros((self.max_grasps, LABEL_DIM), dtype=LABEL_DTYPE)
        labels[:, SCORE_COLUMN] = np.nan
        return labels.tobytes()


class _HashedFile:
    """A file written under a temporary name, SHA-256 hashed on the way, renamed on close."""

    def __init__(self, path: Path, header: bytes):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.file = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.write(header)

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.hash.update(data)

    def skip_zeros(self, nbytes: int) -> None:
        """Leave a hole of zeros: hashed as zeros, allocated on disk by nobody."""
        zeros = bytes(min(nbytes, 1 << 22))
        left = nbytes
        while left:
            step = min(left, len(zeros))
            self.hash.update(zeros[:step])
            left -= step
        self.file.seek(nbytes, os.SEEK_CUR)

    def commit(self) -> dict:
        self.file.truncate()  # materialises a trailing hole
        size = self.file.tell()
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"name": self.path.name, "bytes": size, "sha256": self.hash.hexdigest()}

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class ShardWriter:
    """Appends records to shards `first_shard, first_shard + 1, ...` in `out_dir`."""

    def __init__(self, out_dir: Path, layout: Layout, first_shard: int = 0):
        self.out_dir, self.layout = Path(out_dir), layout
        self.shard, self.slot = first_shard, 0
        self._files: tuple[_HashedFile, _HashedFile] | None = None

    def append(self, sdf: bytes, labels: bytes) -> list[dict] | None:
        """Write one record; returns the shard's file entries when this record completes it."""
        if self._files is None:
            lay = self.layout
            self._files = (
                _HashedFile(self.out_dir / sdf_name(self.shard), npy_header(lay.sdf_shape(), np.dtype(lay.dtype))),
                _HashedFile(self.out_dir / labels_name(self.shard), npy_header(lay.labels_shape(), LABEL_DTYPE)),
            )
        self._files[0].write(sdf)
        self._files[1].write(labels)
        self.slot += 1
        return self._complete() if self.slot == self.layout.records_per_shard else None

    def finish(self) -> list[dict] | None:
        """Pad the open shard with empty records and commit it; None when no shard is open."""
        if self._files is None:
            return None
        pad = self.layout.records_per_shard - self.slot
        self._files[0].skip_zeros(pad * self.layout.sdf_record_bytes)
        empty = self.layout.empty_labels()
        for _ in range(pad):
            self._files[1].write(empty)
        return self._complete()

    def abort(self) -> None:
        """Drop the open shard's temporary files."""
        if self._files is not None:
            for f in self._files:
                f.discard()
            self._files = None

    def _complete(self) -> list[dict]:
        entries = [f.commit() for f in self._files]
        self._files = None
        self.shard, self.slot = self.shard + 1, 0
        return entries
