"""The train split's score statistics, from the scores as stored (float32), summed in float64.

Sums are taken per record, merged per shard, then over shards in shard order, so a fresh build,
a resumed build and `verify`'s recomputation from the stored labels give the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class ScoreSums:
    """count, sum, sum of squares, min and max of some scores."""

    count: int = 0
    sum: float = 0.0
    sumsq: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    @classmethod
    def of(cls, scores: np.ndarray) -> ScoreSums:
        s64 = np.asarray(scores).astype(np.float64)
        return cls(int(s64.size), float(s64.sum()), float(np.square(s64).sum()), float(s64.min()), float(s64.max()))

    def add(self, other: ScoreSums) -> None:
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)


def score_stats(parts: list[ScoreSums]) -> dict:
    """The manifest's `score_stats` from per-shard sums (None values for an empty train split)."""
    n = sum(p.count for p in parts)
    mean = sum(p.sum for p in parts) / n if n else None
    std = max(sum(p.sumsq for p in parts) / n - mean**2, 0.0) ** 0.5 if n else None
    return {
        "split": "train",
        "count": n,
        "mean": mean,
        "std": std,
        "min": min(p.min for p in parts) if n else None,
        "max": max(p.max for p in parts) if n else None,
    }
