"""Where each scene's record goes: split-pure shards, and a seeded order of the scenes within a split.

Each split fills its own consecutive shards (train, then val, then test); its last shard is padded
with empty records, so no shard holds two splits. Within a split the scenes are stored in the order
of SHA-256(shuffle seed, name), not by name: seed names carry the object category (`<digit>_<n>`),
and a window of name-sorted shards would hold one category. So any window of a split's shards is a
random sample of that split, which is what the shuffle window of the epoch plan relies on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .format import SPLITS


def shuffle_key(name: str, shuffle_seed: int) -> bytes:
    """The sort key of a scene within its split."""
    return hashlib.sha256(f"{shuffle_seed}\0{name}".encode()).digest()


@dataclass(frozen=True)
class Placement:
    """Scene id (its position in the name-sorted source) of every record position; -1 for padding."""

    scene_at: np.ndarray  # int64 [num_shards * R]
    shards: dict[str, tuple[int, int]]  # split -> (first shard, number of shards)

    @property
    def num_shards(self) -> int:
        return sum(count for _, count in self.shards.values())


def place_scenes(names: list[str], splits: list[str], shuffle_seed: int, records_per_shard: int) -> Placement:
    """Record positions (shard * R + slot) of the scenes `names[i]` (sorted) with split `splits[i]`."""
    r = records_per_shard
    placed, shards, first = [], {}, 0
    for split in SPLITS:
        ids = [i for i, s in enumerate(splits) if s == split]
        ids.sort(key=lambda i: shuffle_key(names[i], shuffle_seed))
        count = -(-len(ids) // r)
        placed += ids + [-1] * (count * r - len(ids))
        shards[split] = (first, count)
        first += count
    return Placement(np.array(placed, dtype=np.int64), shards)
