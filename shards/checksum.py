"""Per-record checksums, cheap enough for a loader to check every record it reads.

Two functions of a record's bytes (its SDF, then its labels), each fast where the record lives:

* `checksum`: XXH3-64 (the `xxhash` library), ~25 GB/s on one CPU core; loaders check records in
  host memory with it, and `verify_shards` checks every record with it.
* `device_checksum`: a linear hash of the record's 32-bit words, sum(w_i * k_i) mod 2^64 with fixed
  odd 64-bit keys k_i. One multiply and one sum per word, so a GPU checks a whole shard it has just
  read with two tensor operations (`pipeline.checks`) instead of copying it back to the host. Any
  change of one word changes it (k_i odd); it guards against corruption, not against tampering.

Both are stored in `scenes.parquet` as unsigned 64-bit integers.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import xxhash

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def checksum(sdf: bytes | memoryview, labels: bytes | memoryview) -> int:
    """XXH3-64 of the record's SDF bytes followed by its labels bytes."""
    h = xxhash.xxh3_64(sdf)
    h.update(labels)
    return h.intdigest()


@lru_cache(maxsize=4)
def word_keys(count: int) -> np.ndarray:
    """The first `count` keys of the device checksum: splitmix64 of 1, 2, ..., forced odd (uint64, read-only)."""
    with np.errstate(over="ignore"):
        z = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        keys = (z ^ (z >> np.uint64(31))) | np.uint64(1)
    keys.flags.writeable = False
    return keys


def device_checksum(sdf: bytes | memoryview, labels: bytes | memoryview, keys: np.ndarray) -> int:
    """sum(w_i * k_i) mod 2^64 over the record's 32-bit words (SDF words, then labels words)."""
    words = np.concatenate([np.frombuffer(sdf, dtype="<u4"), np.frombuffer(labels, dtype="<u4")])
    if len(words) != len(keys):
        raise ValueError(f"record of {len(words)} words, keys for {len(keys)}")
    with np.errstate(over="ignore"):
        return int((words.astype(np.uint64) * keys).sum(dtype=np.uint64))
