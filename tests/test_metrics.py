"""Per-object ranking metrics (train.metrics): hand-computed cases and a brute-force reference."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from gq.train.metrics import TOP_K, Metrics, kendall_per_group, ranking_per_group


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Three objects, interleaved in one batch. Lower scores are better.
# object 0: true [1, 2, 3, 4], pred [0.4, 0.1, 0.3, 0.2]: the model's best is grasp 1 (true 2) -> regret 1;
#   pairs: (0,1) (0,2) (0,3) (2,3) discordant, (1,2) (1,3) concordant -> tau = (2 - 4) / 6 = -1/3.
# object 1: true [5, 3], pred [1, 0]: best found (regret 0, top-1 overlap 1), tau 1.
# object 2: true [1, 2, 3], pred [1, 1, 2]: tie in pred, the first counts -> grasp 0, regret 0;
#   tau-b = (C - D) / sqrt((n0 - n1)(n0 - n2)) = 2 / sqrt(2 * 3).
TRUE = [[1, 2, 3, 4], [5, 3], [1, 2, 3]]
PRED = [[0.4, 0.1, 0.3, 0.2], [1, 0], [1, 1, 2]]


def _interleaved():
    items = [(g, p, t) for g in range(3) for p, t in zip(PRED[g], TRUE[g])]
    order = [0, 4, 6, 1, 5, 7, 2, 8, 3]  # objects mixed within the batch
    g, p, t = zip(*[items[i] for i in order])
    return _t(p), _t(t), torch.tensor(g)


def test_hand_computed_cases():
    pred, target, groups = _interleaved()
    r = ranking_per_group(pred, target, groups, 3)
    torch.testing.assert_close(r["top1_regret"], _t([1.0, 0.0, 0.0]))
    torch.testing.assert_close(r["top1_overlap"], _t([0.0, 1.0, 1.0]))
    torch.testing.assert_close(r["top5_overlap"], _t([1.0, 1.0, 1.0]))  # k = min(5, grasps)
    torch.testing.assert_close(r["kendall_tau"], _t([-1 / 3, 1.0, 2 / math.sqrt(6)]))
    metrics = Metrics(torch.device("cpu"))
    metrics.add(pred, target, groups, 3)
    out = metrics.result(baseline=0.0, prefix="test_")
    assert out["test_top1_regret"] == pytest.approx(1 / 3)
    assert out["test_top1_overlap"] == pytest.approx(2 / 3)
    assert out["test_kendall_tau"] == pytest.approx((-1 / 3 + 1 + 2 / math.sqrt(6)) / 3)
    assert {f"test_top{k}_overlap" for k in TOP_K} <= out.keys()


def test_top_k_overlap_counts_shared_grasps():
    # The truly best grasp 0 is the model's sixth; the rest keep their order.
    target = _t(np.arange(12.0))
    pred = _t([5, 0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11])  # grasp 0 moved to 6th place
    r = ranking_per_group(pred, target, torch.zeros(12, dtype=torch.long), 1)
    assert r["top1_overlap"].item() == 0.0  # the model's best is grasp 1
    assert r["top5_overlap"].item() == pytest.approx(4 / 5)  # it ranks grasps 1..5 best, truth 0..4
    assert r["top10_overlap"].item() == 1.0 and r["top50_overlap"].item() == 1.0
    assert r["top1_regret"].item() == 1.0


def _reference(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Brute force, one object: the definitions written out with Python loops."""
    n = len(pred)
    c = d = tp = tt = 0
    for i, j in itertools.combinations(range(n), 2):
        s = np.sign(pred[i] - pred[j]) * np.sign(target[i] - target[j])
        c, d = c + (s > 0), d + (s < 0)
        tp, tt = tp + (pred[i] == pred[j]), tt + (target[i] == target[j])
    n0 = n * (n - 1) / 2
    out = {
        "top1_regret": target[np.argmin(pred)] - target.min(),
        "kendall_tau": (c - d) / math.sqrt((n0 - tp) * (n0 - tt)),
    }
    for k in TOP_K:
        kk = min(k, n)
        best_p, best_t = np.argsort(pred, kind="stable")[:kk], np.argsort(target, kind="stable")[:kk]
        out[f"top{k}_overlap"] = len(set(best_p) & set(best_t)) / kk
    return out


def test_matches_brute_force_on_random_objects():
    rng = np.random.default_rng(0)
    sizes = [60, 3, 17, 120, 2]
    target = [rng.gamma(1.0, 5.0, n) for n in sizes]
    pred = [t + rng.normal(0, 3.0, len(t)) for t in target]
    pred[2] = np.round(pred[2])  # ties in the predictions
    groups = torch.tensor(np.repeat(np.arange(len(sizes)), sizes))
    perm = torch.tensor(rng.permutation(sum(sizes)))
    p, t = _t(np.concatenate(pred))[perm], _t(np.concatenate(target))[perm]
    r = ranking_per_group(p, t, groups[perm], len(sizes))
    for g in range(len(sizes)):
        for key, value in _reference(pred[g], target[g]).items():
            assert r[key][g].item() == pytest.approx(value, abs=1e-12), (g, key)
    scipy_stats = pytest.importorskip("scipy.stats")
    for g in range(len(sizes)):
        assert r["kendall_tau"][g].item() == pytest.approx(scipy_stats.kendalltau(pred[g], target[g])[0])


def test_undefined_kendall_is_nan_and_left_out_of_the_mean():
    tau = kendall_per_group(_t([1.0, 2.0, 3.0]), _t([1.0, 1.0, 2.0]), torch.tensor([0, 0, 1]), 2)
    assert math.isnan(tau[0].item()) and math.isnan(tau[1].item())  # constant truth; a single grasp
    metrics = Metrics(torch.device("cpu"))
    metrics.add(_t([1.0, 2.0, 3.0, 4.0]), _t([2.0, 1.0, 5.0, 5.0]), torch.tensor([0, 0, 1, 1]), 2)
    out = metrics.result(0.0)
    assert out["val_kendall_tau"] == -1.0 and out["val_top1_regret"] == pytest.approx(0.5)
