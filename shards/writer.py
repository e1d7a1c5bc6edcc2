"""Shard files on disk: created under temporary names, filled record by record, renamed when complete.

A record's place (position = shard * R + slot) is fixed before its scene is read (`placement.py`),
so worker processes write their records straight into the shard files with `pwrite`, in any
order, and nothing but small metadata travels back to the builder. Files are created at full
size; a split's padding is left a sparse hole of zeros that takes no disk space (its SDFs are
never written; its labels are written as empty records).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .format import HEADER_BYTES, Layout, labels_name, sdf_name


def temporary(path: Path) -> Path:
    """A shard file's name while it is filled: fixed (not `files.temporary_file`'s unique name), because
    worker processes open it by name and `--resume` finds it; the build's lock keeps it to one writer."""
    return path.with_name(f".{path.name}.tmp")


def shard_paths(out: Path, shard: int) -> tuple[Path, Path]:
    return out / sdf_name(shard), out / labels_name(shard)


def create_shard(out: Path, layout: Layout, shard: int, records: int) -> None:
    """Create a shard's two temporary files at full size, header written.

    The first `records` slots are allocated up front (writes into a hole cost ~5x more than into
    allocated blocks); the slots after them, the last shard's padding, stay a hole.
    """
    for path, header, record in zip(
        shard_paths(out, shard), layout.headers(), (layout.sdf_record_bytes, layout.labels_record_bytes)
    ):
        with open(temporary(path), "wb") as f:
            f.write(header)
            if records:
                os.posix_fallocate(f.fileno(), HEADER_BYTES, records * record)
            f.truncate(HEADER_BYTES + layout.records_per_shard * record)


def write_record(out: Path, layout: Layout, position: int, sdf: bytes | None, labels: bytes) -> None:
    """Write one record into its shard's temporary files; `sdf=None` leaves the SDF a hole (zeros)."""
    shard, slot = divmod(position, layout.records_per_shard)
    for path, data, record in zip(
        shard_paths(out, shard), (sdf, labels), (layout.sdf_record_bytes, layout.labels_record_bytes)
    ):
        if data is None:
            continue
        fd = os.open(temporary(path), os.O_WRONLY)
        try:
            os.pwrite(fd, data, HEADER_BYTES + slot * record)
        finally:
            os.close(fd)


def copy_record(out: Path, layout: Layout, position: int, sources: tuple[tuple[int, int], tuple[int, int]]) -> None:
    """Copy one record into its shard's temporary files from (fd, offset) of its SDF and of its labels elsewhere
    (a spill file): in the kernel (`copy_file_range`), or through memory where the file system cannot."""
    shard, slot = divmod(position, layout.records_per_shard)
    for path, (src, offset), record in zip(
        shard_paths(out, shard), sources, (layout.sdf_record_bytes, layout.labels_record_bytes)
    ):
        fd = os.open(temporary(path), os.O_WRONLY)
        try:
            done, target = 0, HEADER_BYTES + slot * record
            while done < record:
                try:
                    n = os.copy_file_range(src, fd, record - done, offset + done, target + done)
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    n = os.pwrite(fd, os.pread(src, record - done, offset + done), target + done)
                if n == 0:
                    raise OSError(errno.EIO, f"record source ended after {done} of {record} bytes", path.name)
                done += n
        finally:
            os.close(fd)


def commit_shard(out: Path, shard: int, checksums: tuple[int, int]) -> list[dict]:
    """Rename a complete shard's files into place; returns their manifest entries."""
    entries = []
    for path, crc in zip(shard_paths(out, shard), checksums):
        os.replace(temporary(path), path)
        entries.append({"name": path.name, "bytes": path.stat().st_size, "crc32": f"{crc:08x}"})
    return entries
