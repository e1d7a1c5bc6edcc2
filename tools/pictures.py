"""Pictures of a dataset for a person to look at: the plots of `gq shards stats` and the scene view of `gq show`.

Imported only by those commands (matplotlib, and scikit-image's marching cubes for the scene view).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gq.common.extras import import_extra  # noqa: E402
from gq.common.files import write_atomically  # noqa: E402
from gq.shards.format import SPLITS, grid_points  # noqa: E402
from gq.synth.rotations import quaternion_to_matrix  # noqa: E402

SPLIT_COLORS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}
SCORE_CMAP = "viridis_r"  # lower scores are better: the best grasps bright
REPORT_PLOTS = ("grasps_per_scene.png", "scores.png", "label_noise.png")


def _save(fig: plt.Figure, path: Path, metadata: dict[str, str] | None = None) -> None:
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=90, metadata=metadata))
    plt.close(fig)


def _steps(ax: plt.Axes, histogram: dict, label: str, color: str, density: bool = False) -> None:
    edges, counts = np.asarray(histogram["edges"]), np.asarray(histogram["counts"], np.float64)
    if not len(counts):
        return
    if density and counts.sum():
        counts = counts / counts.sum() / np.diff(edges)
    ax.stairs(counts, edges, label=label, color=color, lw=1.6)


def plot_report(report: dict, folder: Path) -> list[str]:
    """The report's plots in `folder` (REPORT_PLOTS): grasps per scene and scores per split, and the
    label-noise figure's distribution with its threshold. Returns their file names."""
    title = report["dataset"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for split in SPLITS:
        _steps(ax, report["splits"][split]["grasps_per_scene"]["histogram"], split, SPLIT_COLORS[split])
    ax.set(xlabel="grasps per scene", ylabel="scenes", title=f"{title}: grasps per scene")
    ax.legend()
    _save(fig, folder / REPORT_PLOTS[0])

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for split in SPLITS:
        _steps(ax, report["splits"][split]["scores"]["histogram"], split, SPLIT_COLORS[split], density=True)
    ax.set(xlabel="score (lower is better)", ylabel="density (log scale)", title=f"{title}: scores per split")
    ax.set_yscale("log")
    ax.legend()
    _save(fig, folder / REPORT_PLOTS[1])

    fig, ax = plt.subplots(figsize=(6, 3.6))
    noise = np.array([r["label_noise"] for r in report["scenes"] if r["label_noise"] is not None])
    if len(noise):
        ax.hist(noise, bins=40, color="#4c72b0")
    threshold = report["noise"].get("threshold")
    if threshold is not None:
        ax.axvline(threshold, color="#c44e52", ls="--", label=f"flagged above {threshold:.3f}")
        ax.legend()
    ax.set(
        xlabel=f"label noise ({report['noise']['neighbours']} nearest grasps; 1 = unrelated to the grasp)",
        ylabel="scenes",
        title=f"{title}: label noise per scene",
    )
    _save(fig, folder / REPORT_PLOTS[2])
    return list(REPORT_PLOTS)


def _isosurface(sdf: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Vertices (in the grid's coordinates) and faces of the zero isosurface, or None when there is none."""
    if not (sdf.min() < 0 < sdf.max()):
        return None
    measure = import_extra("skimage.measure", "look")
    origin, spacing = grid_points(sdf.shape[0])
    vertices, faces, _, _ = measure.marching_cubes(np.array(sdf, np.float32), level=0.0, spacing=(spacing,) * 3)
    return vertices + origin, faces


def plot_scene(
    path: Path,
    sdf: np.ndarray,
    grasps: np.ndarray | None,
    scores: np.ndarray | None,
    *,
    title: str,
    k: int = 10,
    predictions: np.ndarray | None = None,
    spearman: float | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """scene.png: the SDF's three mid-slices with the zero contour; the zero isosurface in 3-D with the k best
    and k worst grasps (palm position, approach direction) coloured by score (by prediction when there are no
    scores); with `predictions` and scores, predicted against true scores. `metadata`: PNG text chunks."""
    sdf = np.asarray(sdf, np.float32)
    n = sdf.shape[0]
    origin, spacing = grid_points(n)
    extent = (origin, origin + (n - 1) * spacing)
    panels = 5 if predictions is not None and scores is not None else 4
    fig = plt.figure(figsize=(4 * panels + 2, 4.4))
    grid = fig.add_gridspec(1, panels, width_ratios=[1, 1, 1, 1.5] + [1] * (panels - 4))
    limit = float(np.abs(sdf).max()) or 1.0
    axis_names = "xyz"
    for a in range(3):
        ax = fig.add_subplot(grid[0, a])
        plane = np.take(sdf, n // 2, axis=a)
        rest = [axis_names[i] for i in range(3) if i != a]
        image = ax.imshow(plane.T, origin="lower", cmap="RdBu", vmin=-limit, vmax=limit,
                          extent=(extent[0], extent[1], extent[0], extent[1]))  # fmt: skip
        if plane.min() < 0 < plane.max():
            ax.contour(plane.T, levels=[0], colors="k", linewidths=1.2, origin="lower",
                       extent=(extent[0], extent[1], extent[0], extent[1]))  # fmt: skip
        ax.set(xlabel=rest[0], ylabel=rest[1], title=f"{axis_names[a]} = {origin + (n // 2) * spacing:.2f} slice")
        fig.colorbar(image, ax=ax, shrink=0.8, label="SDF (black: zero level)")
    ax = fig.add_subplot(grid[0, 3], projection="3d")
    surface = _isosurface(sdf)
    if surface is not None:
        vertices, faces = surface
        ax.plot_trisurf(*vertices.T, triangles=faces, color="0.75", alpha=0.35, linewidth=0)
    else:
        ax.text2D(0.5, 0.5, "no zero level set", transform=ax.transAxes, ha="center")
    colour = scores if scores is not None else predictions
    if grasps is not None and colour is not None and len(grasps):
        order = np.argsort(colour, kind="stable")
        chosen = np.unique(np.concatenate([order[:k], order[-k:]]))
        position = grasps[chosen, :3]
        approach = quaternion_to_matrix(np.asarray(grasps[chosen, 3:7], np.float64))[:, :, 2] * 0.25
        norm = plt.Normalize(float(colour[chosen].min()), float(colour[chosen].max()))
        cmap = plt.get_cmap(SCORE_CMAP)
        points = ax.scatter(*position.T, c=colour[chosen], cmap=SCORE_CMAP, norm=norm, s=30, depthshade=False)
        ax.quiver(*position.T, *approach.T, colors=cmap(norm(colour[chosen])), linewidth=1.2)
        what = "score" if scores is not None else "predicted score"
        fig.colorbar(points, ax=ax, shrink=0.7, pad=0.12, label=f"{what} (lower is better)")
        ax.set_title(f"surface; {k} best, {k} worst grasps", fontsize=10)
    else:
        ax.set_title("zero isosurface")
    ax.set(xlabel="x", ylabel="y", zlabel="z", xlim=extent, ylim=extent, zlim=extent)
    if panels == 5:
        ax = fig.add_subplot(grid[0, 4])
        ax.scatter(scores, predictions, s=6, alpha=0.5, color="#4c72b0")
        low, high = float(min(scores.min(), predictions.min())), float(max(scores.max(), predictions.max()))
        ax.plot([low, high], [low, high], color="grey", ls=":", lw=1, label="prediction = score")
        ax.set(xlabel="true score", ylabel="predicted score", title=f"predicted vs true: Spearman {spearman:.3f}")
        ax.legend(loc="upper left")
    count = f"{len(grasps)} grasps" if grasps is not None else "no grasps"
    fig.suptitle(f"{title} ({n}^3 grid, {count})")
    _save(fig, path, metadata)
