"""Record checks where the records live: XXH3-64 in host memory, the word hash on a GPU.

Every record a loader makes resident is checked against the index before any batch uses it.
On the host that is `shards.checksum.checksum` (~25 GB/s per core, and it releases the GIL, so the
cache runs it beside its reads); on a GPU it is the same linear word hash the builder stored as
`device_checksum`, two tensor operations per shard, so data read by GPUDirect Storage never has to
come back to the host to be checked.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch

from gq.shards import DatasetError
from gq.shards.checksum import checksum, word_keys

# Words hashed per chunk on a GPU: bounds the int64 temporaries (8 bytes a word) to 256 MB.
_CHUNK_WORDS = 32 << 20


@lru_cache(maxsize=4)
def _device_keys(count: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(word_keys(count).view(np.int64).copy()).to(device)


def _device_sums(sdf: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """The word hash of each record (row) of `sdf` and `labels`, as uint64, a chunk of rows at a time."""
    n = sdf.shape[0]
    sdf_words, label_words = sdf.reshape(n, -1).view(torch.int32), labels.reshape(n, -1).view(torch.int32)
    split = sdf_words.shape[1]
    keys = _device_keys(split + label_words.shape[1], sdf.device)
    rows = max(1, _CHUNK_WORDS // keys.shape[0])
    sums = []
    for a in range(0, n, rows):
        # int64 products and sums wrap, which is the arithmetic mod 2^64 the builder used
        s = ((sdf_words[a : a + rows].to(torch.int64) & 0xFFFFFFFF) * keys[:split]).sum(dim=1)
        s += ((label_words[a : a + rows].to(torch.int64) & 0xFFFFFFFF) * keys[split:]).sum(dim=1)
        sums.append(s)
    return torch.cat(sums).cpu().numpy().view(np.uint64) if sums else np.zeros(0, np.uint64)


def _host_sums(sdf: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    s, lab = sdf.numpy(), labels.numpy()
    return np.array([checksum(s[i], lab[i]) for i in range(len(s))], dtype=np.uint64)


def check_records(
    sdf: torch.Tensor,
    labels: torch.Tensor,
    *,
    expected: np.ndarray,
    device_expected: np.ndarray,
    where: Callable[[int], str],
) -> None:
    """Raise DatasetError for the first record whose bytes do not match the index.

    `sdf` [n, D, D, D] and `labels` [n, G, 20] are resident records (host or GPU); `expected` and
    `device_expected` their index checksums (uint64); `where(i)` names record i (file, shard, slot, scene).
    """
    if len(expected) == 0:
        return
    on_host = sdf.device.type == "cpu"
    got = _host_sums(sdf, labels) if on_host else _device_sums(sdf, labels)
    want = expected if on_host else device_expected
    bad = np.flatnonzero(got != want.astype(np.uint64))
    if len(bad):
        i = int(bad[0])
        more = f" (and {len(bad) - 1} more records)" if len(bad) > 1 else ""
        raise DatasetError(
            f"{where(i)}: record checksum {int(got[i]):016x}, the index says {int(want[i]):016x}"
            f"{more}: the data on disk is corrupt or not this dataset's; run gq shards verify "
            "on the dataset and rebuild it with gq shards build"
        )
