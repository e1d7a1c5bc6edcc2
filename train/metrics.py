"""Validation metrics in score units: MSE, MAE, R^2, and per-object ranking metrics.

Users pick the best grasp per object, so how well a model ranks one scene's grasps matters as much
as its squared error: per object, then averaged over objects, the Spearman and Kendall (tau-b)
correlations, the top-1 regret (true score of the grasp the model ranks best minus the best true
score; lower scores are better, so the regret is >= 0) and the top-k overlap (share of the k truly best
grasps among the model's k best, k = min(k, the object's grasps)) for k in TOP_K. Each group passed to
`Metrics.add` must be a whole object (validation reads whole scenes). Sums are kept on the device and
all-reduced across ranks before dividing.
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


def spearman_per_group(pred: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Spearman correlation of pred vs target within each group; NaN where undefined (< 2 grasps, constant)."""
    rp = _ranks_within(pred.double(), groups, num_groups)
    rt = _ranks_within(target.double(), groups, num_groups)

    def gsum(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, groups, x)

    n = gsum(torch.ones_like(rp))
    cov = gsum(rp * rt) - gsum(rp) * gsum(rt) / n
    var = (gsum(rp * rp) - gsum(rp) ** 2 / n) * (gsum(rt * rt) - gsum(rt) ** 2 / n)
    return torch.where(var > 0, cov / var.clamp_min(1e-300).sqrt(), torch.full_like(cov, float("nan")))


TOP_K = (1, 5, 10, 50)
KENDALL_BLOCK = 16  # groups per pairwise block: 16 x 480^2 pairs in float64 is ~30 MB per tensor


def _group_sum(x: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, groups, x)


def kendall_per_group(pred: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Kendall's tau-b of pred vs target within each group; NaN where undefined (< 2 grasps, constant)."""
    p, t = pred.double(), target.double()
    order = torch.argsort(groups, stable=True)
    counts = torch.bincount(groups, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(order), device=p.device) - starts[groups[order]]
    width = int(counts.max()) if num_groups and len(order) else 0
    dense_p = torch.full((num_groups, max(width, 1)), float("nan"), dtype=torch.float64, device=p.device)
    dense_t = dense_p.clone()
    dense_p[groups[order], position] = p[order]
    dense_t[groups[order], position] = t[order]
    tau = torch.full((num_groups,), float("nan"), dtype=torch.float64, device=p.device)
    for a in range(0, num_groups, KENDALL_BLOCK):
        bp, bt = dense_p[a : a + KENDALL_BLOCK], dense_t[a : a + KENDALL_BLOCK]
        dp = torch.nan_to_num(torch.sign(bp[:, :, None] - bp[:, None, :]))  # padding pairs -> 0
        dt = torch.nan_to_num(torch.sign(bt[:, :, None] - bt[:, None, :]))
        valid = ~torch.isnan(bp)
        pairs = valid[:, :, None] & valid[:, None, :]
        pairs &= ~torch.eye(pairs.shape[1], dtype=torch.bool, device=p.device)
        n0 = pairs.sum((1, 2)).double() / 2
        untied_p = (pairs & (dp != 0)).sum((1, 2)).double() / 2  # n0 - n1
        untied_t = (pairs & (dt != 0)).sum((1, 2)).double() / 2  # n0 - n2
        score = (dp * dt).sum((1, 2)) / 2  # concordant - discordant pairs
        denom = (untied_p * untied_t).sqrt()
        tau[a : a + KENDALL_BLOCK] = torch.where(
            (n0 > 0) & (denom > 0), score / denom.clamp_min(1e-300), torch.full_like(score, float("nan"))
        )
    return tau


def ranking_per_group(
    pred: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> dict[str, torch.Tensor]:
    """Per group (object): `top1_regret`, `top{k}_overlap` for k in TOP_K, `kendall_tau`, `grasps`.

    Lower scores are better: a model's best grasp is its lowest prediction (ties: the first).
    """
    p, t = pred.double(), target.double()
    rp, rt = _ranks_within(p, groups, num_groups), _ranks_within(t, groups, num_groups)
    n = torch.bincount(groups, minlength=num_groups).double()
    best = torch.full((num_groups,), float("inf"), dtype=torch.float64, device=t.device)
    best = best.scatter_reduce(0, groups, t, reduce="amin")
    picked = _group_sum(torch.where(rp == 0, t, torch.zeros_like(t)), groups, num_groups)
    result = {"top1_regret": picked - best, "grasps": n}
    for k in TOP_K:
        kk = torch.clamp(n, max=k)
        hits = ((rp < kk[groups]) & (rt < kk[groups])).double()
        result[f"top{k}_overlap"] = _group_sum(hits, groups, num_groups) / kk.clamp_min(1)
    result["kendall_tau"] = kendall_per_group(p, t, groups, num_groups)
    return result


class Metrics:
    """Accumulates (prediction, target) pairs in score units; whole scenes per group for Spearman."""

    RANKING = ("top1_regret", *(f"top{k}_overlap" for k in TOP_K))
    KEYS = ("n", "se", "ae", "y", "yy", "rho", "scenes", "objects", *RANKING, "kendall_tau", "tau_objects")

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)

    def add(self, pred: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, num_groups: int) -> None:
        p, t = pred.double(), target.double()
        rho = spearman_per_group(p, t, groups, num_groups)
        defined = ~torch.isnan(rho)
        err = p - t
        ranking = ranking_per_group(p, t, groups, num_groups)
        present = ranking["grasps"] > 0
        tau = ranking["kendall_tau"]
        tau_defined = ~torch.isnan(tau)
        self.sums += torch.stack(
            [
                torch.tensor(float(len(t)), dtype=torch.float64, device=t.device),
                (err * err).sum(),
                err.abs().sum(),
                t.sum(),
                (t * t).sum(),
                rho[defined].sum(),
                defined.sum().double(),
                present.sum().double(),
                *(ranking[k][present].sum() for k in self.RANKING),
                tau[tau_defined].sum(),
                tau_defined.sum().double(),
            ]
        )

    def result(self, baseline: float, prefix: str = "val_") -> dict[str, float]:
        """The metrics, summed over every rank when torch.distributed is initialised.

        `baseline` is the constant a model that ignores its input would predict (the train mean):
        its MSE is reported beside the model's.
        """
        sums = self.sums.clone()
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.all_reduce(sums)
        values = dict(zip(self.KEYS, sums.tolist()))
        n, se, ae, y, yy, rho, scenes = (values[k] for k in self.KEYS[:7])
        objects, tau_objects = values["objects"], values["tau_objects"]
        sst = yy - y * y / n if n else 0.0
        ranking = {f"{prefix}{k}": values[k] / objects if objects else float("nan") for k in self.RANKING}
        ranking[f"{prefix}kendall_tau"] = values["kendall_tau"] / tau_objects if tau_objects else float("nan")
        return {
            f"{prefix}mse": se / n if n else float("nan"),
            f"{prefix}mae": ae / n if n else float("nan"),
            f"{prefix}r2": 1 - se / sst if sst > 0 else float("nan"),
            f"{prefix}spearman": rho / scenes if scenes else float("nan"),
            f"{prefix}mse_mean_baseline": (yy - 2 * baseline * y + n * baseline**2) / n if n else float("nan"),
            f"{prefix}grasps": int(n),
            f"{prefix}scenes": int(scenes),
            **ranking,
        }
