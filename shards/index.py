"""`scenes.parquet`: one row per scene, the dataset's index (pyarrow).

Rows in storage order (shard, then slot). Columns: scene (id = position in the name-sorted source;
skipped scenes leave gaps), name (source name), split, shard, slot, num_grasps, checksum (XXH3-64
of the record's bytes) and device_checksum (their word hash, for GPUs; see `checksum.py`), and the
seed's per-scene extras translation (3 floats) and global_scale, null where the source had none.
pyarrow is imported when an index is read or written, not with the package: a program that only scores
grasps (`gq.train.predict.Estimator`) never loads it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gq.common.files import write_atomically
from gq.common.inputs import read_small_file

if TYPE_CHECKING:
    import pyarrow as pa

COLUMNS = ("scene", "name", "split", "shard", "slot", "num_grasps", "checksum", "device_checksum", "translation",
           "global_scale")  # fmt: skip
MAX_INDEX_BYTES = 1 << 30  # some 20 million scenes' rows; the seed's 15,547 take 0.6 MB


@functools.cache
def schema() -> pa.Schema:
    """The index's Arrow schema: COLUMNS with their types."""
    import pyarrow as pa

    int32, uint64 = pa.int32(), pa.uint64()
    types = (pa.int64(), pa.string(), pa.string(), int32, int32, int32, uint64, uint64, pa.list_(pa.float32(), 3),
             pa.float32())  # fmt: skip
    return pa.schema(list(zip(COLUMNS, types)))


def write_index(path: Path, rows: list[dict]) -> None:
    """Write the index atomically (temporary name, then rename); rows are in scene order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema())
    # No statistics timestamps exist in parquet; pin the writer options that shape the bytes.
    write_atomically(
        path, lambda f: pq.write_table(table, f, compression="zstd", use_dictionary=True, write_statistics=True)
    )


def read_index_file(path: Path) -> bytes:
    """The index file's bytes: a regular file of at most MAX_INDEX_BYTES (gq.common.inputs.InputError otherwise)."""
    return read_small_file(path, "index", MAX_INDEX_BYTES)


def read_index(path: Path, *, data: bytes | None = None) -> dict[str, np.ndarray]:
    """The index as NumPy columns (translation as (n,3) float32 with NaN rows where null); `data`: the
    file's bytes when the caller has read them already (verify checks their CRC first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(_arrow_owned(read_index_file(path) if data is None else data)))
    if tuple(table.schema.names) != COLUMNS:
        raise ValueError(f"{path}: columns {table.schema.names}, expected {list(COLUMNS)}")
    cols = {
        name: table.column(name).to_numpy(zero_copy_only=False)
        for name in ("scene", "name", "split", "shard", "slot", "num_grasps", "checksum", "device_checksum")
    }
    cols["name"] = cols["name"].astype(str)
    cols["split"] = cols["split"].astype(str)
    translation = table.column("translation").to_pylist()
    cols["translation"] = np.array(
        [t if t is not None else [np.nan] * 3 for t in translation], dtype=np.float32
    ).reshape(-1, 3)
    cols["global_scale"] = table.column("global_scale").to_numpy(zero_copy_only=False).astype(np.float32)
    return cols


def _arrow_owned(data: bytes) -> pa.Buffer:
    """A copy of `data` in Arrow's own memory. Parquet's reader threads drop their last reference to the
    buffer after `read_table` returns; a buffer over a Python object then needs the GIL to be released,
    and during interpreter shutdown that ends the process with "terminate called without an active exception"."""
    import pyarrow as pa

    stream = pa.BufferOutputStream()
    stream.write(data)
    return stream.getvalue()
