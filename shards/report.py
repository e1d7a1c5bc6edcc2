"""What a dataset holds, from one pass over its shards: per-split counts and score distributions, per-scene SDF
checks, leakage (identical SDFs or grasp sets, within and across splits) and a label-noise figure per scene.

`dataset_report(DIR)` returns the figures as one JSON-ready dict (`gq shards stats` writes it as stats.json,
with report.md and plots). Shards are read one at a time, in storage order, so memory is bounded by one shard
and each split's scores (4 bytes a grasp: 30 MB at the seed's 7.5 million grasps). NumPy and xxhash only.

The label-noise figure of a scene: each grasp's k nearest neighbours in grasp space (palm position, the
quaternion with a canonical sign at half weight, the 12 joints; each dimension scaled by its robust spread in
the scene) and the mean absolute difference of their score ranks from the grasp's, divided by the mean
absolute difference of two random grasps' ranks. Scores that vary with the grasp give less than 1; scores
shuffled among the grasps give 1 whatever their distribution (ranks: a few extreme scores do not dominate
it). A scene is flagged when its figure is an outlier of the dataset's own distribution: a robust z-score
(median and MAD) above NOISE_Z, not a fixed count of worst scenes.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import xxhash
from tqdm import tqdm

from gq.common.workers import worker_pool

from .format import GRASP_DIM, SCORE_COLUMN, SPLITS
from .reader import ShardReader
from .stats import ScoreSums, score_stats

QUANTILES = (0, 1, 5, 25, 50, 75, 95, 99, 100)
BINS = 40
NOISE_NEIGHBOURS = 8
# The robust z-score above which a scene's label noise is flagged. The figure cannot pass 1 (unrelated scores),
# so the clean scenes' upper tail is short: on 2,000 generated scenes of 480 grasps the highest clean z-score
# was 2.19 and the lowest of 40 shuffled ones 2.80 (docs/looking.md).
NOISE_Z = 2.5
# Half weight: on generated scenes of 480 grasps, scored as they are and shuffled, it separated the two better
# than full weight, about as well as the rotation matrix or the approach direction in the quaternion's place,
# and keeps the whole orientation (docs/looking.md).
QUATERNION_WEIGHT = 0.5
MIN_NOISE_SCENES = 5  # fewer scenes with a figure: no distribution to be an outlier of, nothing flagged
MAX_NAMED = 3  # scenes named in a leakage flag (the group in stats.json's `leakage` names them all)
_MAD_SIGMA = 1.4826  # MAD x this = the standard deviation of a normal distribution

# The SDF checks: a zero level set exists (inside and outside voxels) and closes within the grid.
NO_INSIDE = "no inside voxel (SDF >= 0 everywhere: no surface)"
NO_OUTSIDE = "no outside voxel (SDF < 0 everywhere: no surface)"
OPEN = "inside touches the grid's border (the surface does not close within the grid)"


def grasp_features(grasps: np.ndarray) -> np.ndarray:
    """(N, 19) grasps as points for neighbour search: the quaternion (xyzw) given w >= 0, since q and -q are
    the same rotation, and every dimension centred on its median and divided by its robust spread (MAD), so
    that position, orientation and joints weigh alike whatever their units; the quaternion's four components
    then weigh QUATERNION_WEIGHT each, as they are one unit vector, not four free values."""
    f = np.array(grasps, dtype=np.float64)
    f[:, 3:7] *= np.where(f[:, 6:7] < 0, -1.0, 1.0)
    centre = np.median(f, axis=0)
    spread = _MAD_SIGMA * np.median(np.abs(f - centre), axis=0)
    spread[spread <= 0] = 1.0  # a constant dimension: left as it is (it adds nothing to any distance)
    f = (f - centre) / spread
    f[:, 3:7] *= QUATERNION_WEIGHT
    return f


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their mean rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    if (counts > 1).any():
        ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]
    return ranks


def mean_difference(values: np.ndarray) -> float:
    """The mean |a - b| over all pairs of distinct elements (Gini's mean difference), in O(n log n)."""
    v, n = np.sort(np.asarray(values, np.float64)), len(values)
    return float(2 * np.sum((2 * np.arange(1, n + 1) - n - 1) * v) / (n * (n - 1)))


def nearest(points: np.ndarray, k: int, rows_per_block: int = 1024) -> np.ndarray:
    """(N, k) indices of each point's k nearest other points (Euclidean), exactly but in no order, by blocks of rows.

    Brute force rather than a KD-tree: in 19 dimensions a tree prunes little, and one block of squared
    distances (a matrix product) is several times faster at the seed's 480 grasps; blocks bound the memory
    (rows_per_block x N distances) for scenes of many more."""
    n = len(points)
    squares = np.einsum("ij,ij->i", points, points)
    out = np.empty((n, k), np.int64)
    for first in range(0, n, rows_per_block):
        rows = slice(first, min(first + rows_per_block, n))
        distance = squares[rows, None] + squares[None, :] - 2 * points[rows] @ points.T
        distance[np.arange(rows.stop - first), np.arange(first, rows.stop)] = np.inf  # never its own neighbour
        out[rows] = np.argpartition(distance, k - 1, axis=1)[:, :k]  # in no order: the figure is their mean
    return out


def label_noise(grasps: np.ndarray, scores: np.ndarray, k: int = NOISE_NEIGHBOURS) -> float:
    """The scene's label-noise figure (see the module's docstring); NaN with k + 1 grasps or fewer, or all
    scores equal (no ranking to be noisy)."""
    n = len(scores)
    if n <= k + 1:
        return math.nan
    ranks = _ranks(np.asarray(scores))
    spread = mean_difference(ranks)
    if spread == 0:
        return math.nan
    others = nearest(grasp_features(grasps), k)
    return float(np.abs(ranks[:, None] - ranks[others]).mean() / spread)


def sdf_checks(sdf: np.ndarray) -> dict:
    """min, max, fraction inside (SDF < 0) and the problems of one grid's zero level set (empty: none)."""
    sdf = np.asarray(sdf, np.float32)  # exact for float16, and NumPy's float16 reductions are ten times slower
    inside = sdf < 0
    fraction = float(inside.mean())
    problems = []
    if fraction == 0:
        problems.append(NO_INSIDE)
    elif fraction == 1:
        problems.append(NO_OUTSIDE)
    elif any(
        face.any() for face in (inside[0], inside[-1], inside[:, 0], inside[:, -1], inside[:, :, 0], inside[:, :, -1])
    ):
        problems.append(OPEN)
    return {"sdf_min": float(sdf.min()), "sdf_max": float(sdf.max()), "inside_fraction": fraction, "problems": problems}


def grasp_set_hash(grasps: np.ndarray) -> int:
    """XXH3-64 of the grasps' rows in sorted order: equal for the same set of grasps in any order."""
    rows = np.ascontiguousarray(grasps, dtype=np.float32)
    return xxhash.xxh3_64_intdigest(rows[np.lexsort(rows.T[::-1])].tobytes())


def histogram(values: np.ndarray, bins: int = BINS, integer: bool = False) -> dict:
    """{"edges", "counts"} of `values` (integer: bins of whole numbers)."""
    values = np.asarray(values)
    if not len(values):
        return {"edges": [], "counts": []}
    low, high = float(values.min()), float(values.max())
    if integer:
        step = max(1, math.ceil((high - low + 1) / bins))
        edges = np.arange(low, high + step + 1, step) - 0.5
    else:
        edges = np.linspace(low, high if high > low else low + 1, bins + 1)
    counts, edges = np.histogram(values, edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def _split_figures(counts: np.ndarray, scores: np.ndarray) -> dict:
    figures = {
        "scenes": len(counts),
        "grasps": int(counts.sum()),
        "grasps_per_scene": {
            "min": int(counts.min()) if len(counts) else None,
            "max": int(counts.max()) if len(counts) else None,
            "mean": float(counts.mean()) if len(counts) else None,
            "histogram": histogram(counts, integer=True),
        },
    }
    s = scores.astype(np.float64)
    figures["scores"] = {
        "count": len(s),
        "mean": float(s.mean()) if len(s) else None,
        "std": float(s.std()) if len(s) else None,
        "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, np.percentile(s, QUANTILES))} if len(s) else {},
        "histogram": histogram(s),
    }
    return figures


def _duplicates(hashes: np.ndarray, names: np.ndarray, splits: np.ndarray, kind: str) -> list[dict]:
    """Groups of scenes with the same hash: their names, splits, and whether the group spans splits."""
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    groups = []
    for group in np.flatnonzero(counts > 1):
        rows = np.flatnonzero(inverse == group)
        groups.append(
            {
                "kind": kind,
                "scenes": names[rows].tolist(),
                "splits": splits[rows].tolist(),
                "across_splits": len(set(splits[rows])) > 1,
            }
        )
    return sorted(groups, key=lambda g: g["scenes"])


def _noise_outliers(noise: np.ndarray) -> tuple[dict, np.ndarray]:
    """The dataset's distribution of the noise figure (median, scaled MAD, threshold) and each scene's z-score."""
    valid = noise[np.isfinite(noise)]
    summary = {"neighbours": NOISE_NEIGHBOURS, "z_threshold": NOISE_Z, "scenes": len(valid)}
    z = np.full(len(noise), np.nan)
    if len(valid) >= MIN_NOISE_SCENES:
        median = float(np.median(valid))
        mad = _MAD_SIGMA * float(np.median(np.abs(valid - median)))
        if mad > 0:
            z = (noise - median) / mad
        summary |= {"median": median, "mad": mad, "threshold": median + NOISE_Z * mad if mad > 0 else None}
    return summary, z


def _shard_figures(task: tuple[Path, np.ndarray]) -> dict:
    """The per-scene figures of one shard's scenes (index `rows`, all in one shard), its scores by split, and
    the train scores' sums (per record, merged in slot order, as `verify` and the build sum them)."""
    root, rows = task
    reader = ShardReader(root)
    index = reader.index
    shard = int(index["shard"][rows[0]])
    sdfs, labels = reader.sdf_shard(shard), reader.labels_shard(shard)
    out = {"sdf_hash": [], "grasp_hash": [], "checks": [], "noise": [], "scores": [], "sums": ScoreSums()}
    for row in rows:
        slot, used = int(index["slot"][row]), int(index["num_grasps"][row])
        sdf, label = np.asarray(sdfs[slot]), np.array(labels[slot, :used])
        out["sdf_hash"].append(xxhash.xxh3_64_intdigest(sdf.tobytes()))
        out["grasp_hash"].append(grasp_set_hash(label[:, :GRASP_DIM]))
        out["checks"].append(sdf_checks(sdf))
        out["noise"].append(label_noise(label[:, :GRASP_DIM], label[:, SCORE_COLUMN]))
        out["scores"].append(label[:, SCORE_COLUMN])
        if index["split"][row] == "train":
            out["sums"].add(ScoreSums.of(label[:, SCORE_COLUMN]))
    return out


def dataset_report(root: str | Path, *, workers: int = 1, progress: bool = False) -> dict:
    """Every figure of the dataset in `root` (see the module's docstring), read in one pass over its shards,
    `workers` processes sharing the shards out (the figures do not depend on it).

    Returns a JSON-ready dict: `dataset`, `fingerprint`, `splits` (per split: scenes, grasps, grasps per
    scene, scores), `standardisation` (the train statistics training will use, recomputed and compared with
    the manifest's), `leakage` (groups of scenes with identical SDF bytes or grasp sets), `noise` (the
    distribution of the label-noise figure and its threshold), `scenes` (one entry per scene, in storage
    order: its figures and `flags`) and `flagged` (the names of scenes with any flag).
    """
    reader = ShardReader(root)
    index, layout = reader.index, reader.layout
    n = reader.num_scenes
    sdf_hash, grasp_hash = np.zeros(n, np.uint64), np.zeros(n, np.uint64)
    noise = np.full(n, np.nan)
    checks: list[dict] = [{}] * n
    scores: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    train_sums: list[ScoreSums] = []
    tasks = [(reader.root, rows) for rows in np.split(np.arange(n), np.flatnonzero(np.diff(index["shard"])) + 1)]
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(worker_pool(workers)) if workers > 1 and len(tasks) > 1 else None
        parts = pool.imap(_shard_figures, tasks) if pool else map(_shard_figures, tasks)  # in shard order
        for (_, rows), part in tqdm(zip(tasks, parts), total=len(tasks), unit="shard", desc="stats",
                                    disable=(not progress) or None):  # fmt: skip
            sdf_hash[rows], grasp_hash[rows], noise[rows] = part["sdf_hash"], part["grasp_hash"], part["noise"]
            for row, check, row_scores in zip(rows, part["checks"], part["scores"]):
                checks[row] = check
                scores[index["split"][row]].append(row_scores)
            if index["split"][rows[0]] == "train":
                train_sums.append(part["sums"])
    names, splits = index["name"], index["split"]
    leakage = _duplicates(sdf_hash, names, splits, "sdf") + _duplicates(grasp_hash, names, splits, "grasps")
    noise_summary, z = _noise_outliers(noise)
    flags: list[list[str]] = [list(c["problems"]) for c in checks]
    for group in leakage:
        what = "SDF bytes" if group["kind"] == "sdf" else "grasp set"
        rows = np.flatnonzero(np.isin(names, group["scenes"]))
        for row in rows:
            others = [f"{names[o]} ({splits[o]})" for o in rows if o != row]
            more = f" and {len(others) - MAX_NAMED} more" if len(others) > MAX_NAMED else ""
            flags[row].append(f"same {what} as {', '.join(others[:MAX_NAMED])}{more}")
    for row in np.flatnonzero(z > NOISE_Z):
        flags[row].append(f"label noise {noise[row]:.3f}, robust z {z[row]:.1f} > {NOISE_Z}")
    recomputed = score_stats(train_sums)
    stored = reader.manifest.score_stats.to_dict()
    scene_rows = [
        {
            "scene": int(index["scene"][row]),
            "name": str(names[row]),
            "split": str(splits[row]),
            "num_grasps": int(index["num_grasps"][row]),
            **{k: v for k, v in checks[row].items() if k != "problems"},
            "sdf_hash": f"{int(sdf_hash[row]):016x}",
            "grasps_hash": f"{int(grasp_hash[row]):016x}",
            "label_noise": None if math.isnan(noise[row]) else float(noise[row]),
            "label_noise_z": None if math.isnan(z[row]) else float(z[row]),
            "flags": flags[row],
        }
        for row in range(n)
    ]
    return {
        "dataset": str(Path(root)),
        "fingerprint": reader.manifest.fingerprint,
        "grid": layout.grid,
        "max_grasps": layout.max_grasps,
        "splits": {
            s: _split_figures(
                index["num_grasps"][splits == s].astype(np.int64),
                np.concatenate(scores[s]) if scores[s] else np.zeros(0, np.float32),
            )
            for s in SPLITS
        },
        "standardisation": {"recomputed": recomputed, "manifest": stored, "match": _same_stats(recomputed, stored)},
        "leakage": leakage,
        "noise": noise_summary,
        "scenes": scene_rows,
        "flagged": [r["name"] for r in scene_rows if r["flags"]],
    }


def _same_stats(a: dict, b: dict) -> bool:
    return all(
        a[k] == b[k] if not isinstance(a[k], float) else math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12)
        for k in a
    )


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def summary_lines(report: dict) -> list[str]:
    """The report in a few lines: counts per split, and how many scenes each check flagged."""
    splits = ", ".join(f"{s} {f['scenes']} scenes / {f['grasps']} grasps" for s, f in report["splits"].items())
    scenes = report["scenes"]
    empty = sum(1 for r in scenes if NO_INSIDE in r["flags"] or NO_OUTSIDE in r["flags"])
    cut = sum(1 for r in scenes if OPEN in r["flags"])
    across = sum(1 for g in report["leakage"] if g["across_splits"])
    noisy = sum(1 for r in scenes if any(f.startswith("label noise") for f in r["flags"]))
    std = report["standardisation"]["recomputed"]
    return [
        f"{report['dataset']}: {splits}",
        f"train scores: mean {_number(std['mean'])}, std {_number(std['std'])}"
        + ("" if report["standardisation"]["match"] else " (differ from the manifest's: run gq shards verify)"),
        f"flagged {len(report['flagged'])} of {len(scenes)} scenes: {empty} with no surface, {cut} cut by the "
        "grid's border, "
        f"{len(report['leakage'])} groups of identical SDFs or grasp sets ({across} across splits), "
        f"{noisy} with outlying label noise",
    ]


def report_markdown(report: dict, plots: list[str]) -> str:
    """report.md: the summary, the figures per split, the checks and the flagged scenes by name, the plots."""
    lines = [f"# Dataset report: {report['dataset']}", "", f"Fingerprint `{report['fingerprint']}`, grid "
             f"{report['grid']}^3, up to {report['max_grasps']} grasps per scene. Every figure and every scene: "
             "stats.json.", ""]  # fmt: skip
    lines += [f"- {line}" for line in summary_lines(report)] + ["", "## Splits", ""]
    lines += ["| split | scenes | grasps | grasps per scene: min / mean / max | score mean | std | 1% | median | 99% |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for split, f in report["splits"].items():
        g, s = f["grasps_per_scene"], f["scores"]
        q = s["quantiles"]
        lines.append(
            f"| {split} | {f['scenes']} | {f['grasps']} | {_number(g['min'])} / {_number(g['mean'])} / "
            f"{_number(g['max'])} | {_number(s['mean'])} | {_number(s['std'])} | {_number(q.get('1'))} | "
            f"{_number(q.get('50'))} | {_number(q.get('99'))} |"
        )
    std, noise = report["standardisation"], report["noise"]
    lines += [
        "",
        "## Checks",
        "",
        f"- Standardisation (train scores, as training uses them): mean {_number(std['recomputed']['mean'], 8)}, "
        f"std {_number(std['recomputed']['std'], 8)}; "
        + ("the same as the manifest's." if std["match"] else "NOT the manifest's: run gq shards verify."),
        "- SDF: a scene is flagged with no inside voxel, no outside voxel, or inside voxels on the grid's border.",
        f"- Leakage: {len(report['leakage'])} groups of scenes with identical SDF bytes or grasp sets "
        f"({sum(g['across_splits'] for g in report['leakage'])} across splits).",
        f"- Label noise ({noise['neighbours']} nearest grasps; 1 = scores unrelated to the grasps): median "
        f"{_number(noise.get('median'))}, MAD {_number(noise.get('mad'))} over {noise['scenes']} scenes; flagged "
        f"above {_number(noise.get('threshold'))} (robust z > {noise['z_threshold']}).",
        "",
        "## Flagged scenes",
        "",
    ]
    flagged = [r for r in report["scenes"] if r["flags"]]
    if flagged:
        lines += ["| scene | split | why |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['split']} | {'; '.join(r['flags'])} |" for r in flagged]
    else:
        lines.append("None.")
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
