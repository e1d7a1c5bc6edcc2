"""The shard format, version 2: names, constants and the 4 KiB-aligned NPY header.

A shard file is a plain NPY 1.0 file whose header is padded so the data starts at byte 4096:
any NumPy reads it with `np.load(mmap_mode="r")`, and every record of a 48^3 float16 grid is
4 KiB aligned on disk, which is what O_DIRECT and GPUDirect Storage reads want. Version 2 keeps
each split in its own consecutive shards, in a seeded order of its scenes (see `build.py`).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

FORMAT_NAME = "gq-shards"
FORMAT_VERSION = 2
HEADER_BYTES = 4096
GRASP_DIM = 19
LABEL_DIM = GRASP_DIM + 1  # the 19 grasp values, then the score
SCORE_COLUMN = GRASP_DIM
SDF_DTYPES = ("float16", "float32")
LABEL_DTYPE = np.dtype("<f4")

MANIFEST = "manifest.json"
INDEX = "scenes.parquet"
SKIPPED = "skipped.jsonl"
BUILD_DIR = ".build"  # resume journal of an unfinished build; removed when the manifest is written

_MAGIC = b"\x93NUMPY\x01\x00"


def grid_points(grid: int) -> tuple[float, float]:
    """(origin, spacing) of the seed's (mesh2sdf's) grid: voxel i sits at origin + i * spacing = -1 + 2i/n."""
    return -1.0, 2.0 / grid


def sdf_name(shard: int) -> str:
    return f"sdf-{shard:05d}.npy"


def labels_name(shard: int) -> str:
    return f"labels-{shard:05d}.npy"


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """NPY 1.0 header for a C-order array, padded with spaces to exactly HEADER_BYTES."""
    text = repr(
        {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": tuple(int(s) for s in shape),
        }
    )
    body = text.encode("latin1")
    pad = HEADER_BYTES - len(_MAGIC) - 2 - len(body) - 1
    if pad < 0:
        raise ValueError(f"NPY header for shape {shape} does not fit in {HEADER_BYTES} bytes")
    body += b" " * pad + b"\n"
    return _MAGIC + len(body).to_bytes(2, "little") + body


def read_npy_header(path: Path) -> tuple[tuple[int, int], tuple[int, ...], bool, np.dtype, int]:
    """(version, shape, fortran_order, dtype, data offset) of an NPY file, without reading data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported NPY version {version}")
        return version, shape, fortran, dtype, f.tell()


def file_crc32(path: Path, chunk: int = 1 << 22) -> str:
    """Whole-file CRC-32 as 8 hex digits (zlib's, the same as the `crc32` command prints)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"
