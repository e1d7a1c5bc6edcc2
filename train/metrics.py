"""Validation metrics in score units: MSE, MAE, R^2, and the mean per-scene Spearman correlation.

Users pick the best grasp per object, so how well a model ranks one scene's grasps matters as much
as its squared error. Sums are kept on the device and all-reduced across ranks before dividing.
"""
from __future__ import annotations

import torch
import torch.distributed as torch_dist


def _ranks_within(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rank (0-based) of each value within its group; ties keep their input order."""
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]  # by group, then by value
    counts = torch.bincount(groups, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(values)
    ranks[order] = (torch.arange(len(values), device=values.device) - starts[groups[order]]).to(values.dtype)
    return ranks


def spearman_per_group(pred: torch.Tensor, target: torch.Tensor, groups: torch.Tensor,
                       num_groups: int) -> torch.Tensor:
    """Spearman correlation of pred vs target within each group; NaN where undefined (< 2 grasps, constant)."""
    rp = _ranks_within(pred.double(), groups, num_groups)
    rt = _ranks_within(target.double(), groups, num_groups)

    def gsum(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, groups, x)

    n = gsum(torch.ones_like(rp))
    cov = gsum(rp * rt) - gsum(rp) * gsum(rt) / n
    var = (gsum(rp * rp) - gsum(rp) ** 2 / n) * (gsum(rt * rt) - gsum(rt) ** 2 / n)
    return torch.where(var > 0, cov / var.clamp_min(1e-300).sqrt(), torch.full_like(cov, float("nan")))


class Metrics:
    """Accumulates (prediction, target) pairs in score units; whole scenes per group for Spearman."""

    KEYS = ("n", "se", "ae", "y", "yy", "rho", "scenes")

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)

    def add(self, pred: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, num_groups: int) -> None:
        p, t = pred.double(), target.double()
        rho = spearman_per_group(p, t, groups, num_groups)
        defined = ~torch.isnan(rho)
        err = p - t
        self.sums += torch.stack([torch.tensor(float(len(t)), dtype=torch.float64, device=t.device),
                                  (err * err).sum(), err.abs().sum(), t.sum(), (t * t).sum(),
                                  rho[defined].sum(), defined.sum().double()])

    def result(self, baseline: float, prefix: str = "val_") -> dict[str, float]:
        """The metrics, summed over every rank when torch.distributed is initialised.

        `baseline` is the constant a model that ignores its input would predict (the train mean):
        its MSE is reported beside the model's.
        """
        sums = self.sums.clone()
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.all_reduce(sums)
        n, se, ae, y, yy, rho, scenes = sums.tolist()
        sst = yy - y * y / n if n else 0.0
        return {f"{prefix}mse": se / n if n else float("nan"), f"{prefix}mae": ae / n if n else float("nan"),
                f"{prefix}r2": 1 - se / sst if sst > 0 else float("nan"),
                f"{prefix}spearman": rho / scenes if scenes else float("nan"),
                f"{prefix}mse_mean_baseline": (yy - 2 * baseline * y + n * baseline ** 2) / n if n else float("nan"),
                f"{prefix}grasps": int(n), f"{prefix}scenes": int(scenes)}
