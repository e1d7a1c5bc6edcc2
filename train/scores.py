"""Score units: the model trains on scores standardised with the train split's statistics.

Adam's step size then suits the output layer whatever the scores' scale; every reported metric and
prediction is turned back into score units. A checkpoint records its statistics, so a model trained
on one dataset can be re-expressed in another's units by refolding its last layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gq.models import GQEstimatorBase

if TYPE_CHECKING:
    from .checkpoint import Trained


@dataclass(frozen=True)
class Standardiser:
    """Scores <-> standardised units: z = (score - mean) / std."""

    mean: float = 0.0
    std: float = 1.0  # the defaults are the identity: the seed's models predict raw scores

    @classmethod
    def from_stats(cls, stats: object, source: str) -> Standardiser:
        """From statistics with `mean` and `std` (attributes or keys); ValueError naming `source` when unusable."""
        get = stats.get if isinstance(stats, dict) else lambda key: getattr(stats, key, None)
        mean, std = get("mean"), get("std")
        if not (isinstance(mean, int | float) and isinstance(std, int | float)):
            raise ValueError(f"{source}: no score statistics (mean {mean}, std {std})")
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(
                f"{source}: train score statistics mean {mean}, std {std}: the scores cannot be standardised "
                "(std must be finite and > 0)"
            )
        return cls(float(mean), float(std))

    @classmethod
    def of_checkpoint(cls, trained: Trained | None) -> Standardiser:
        """The units a loaded model predicts in: `load_model`'s second value (None: a seed model, raw scores)."""
        return cls() if trained is None else trained.units

    def encode(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / self.std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}

    def refold(self, model: GQEstimatorBase, trained_in: Standardiser) -> None:
        """Make `model`, which predicts in `trained_in`'s units, predict in these: rescale its last Linear layer."""
        scale, shift = trained_in.std / self.std, (trained_in.mean - self.mean) / self.std
        last = model.gq_head[-1]
        with torch.no_grad():
            last.weight.mul_(scale)
            last.bias.mul_(scale).add_(shift)
