"""Looking at a dataset before training on it: `gq shards stats` (a report), `gq shards diff` (two versions) and
`gq show` (one scene as a picture). The figures come from `gq.shards.report` and `gq.shards.diff`, the
pictures from `gq.tools.pictures`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from gq.common.errors import UsageError
from gq.common.options import one_line_errors
from gq.common.ownership import BesideBuild, check_file_replaceable

CONTEXT = {"help_option_names": ["-h", "--help"]}
STATS_TOOL = "shards_stats"
SHOW_TOOL = "show"
MESH_GRID = 48  # the seed's grid
OWNER_KEY = "gq.written_by"  # PNG text key of a picture gq show wrote: its ownership record


@click.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Report folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace a report folder written by an earlier gq shards stats.")
@click.option("--workers", type=int, default=None, help="Processes sharing the shards out [default: all CPUs].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def stats_cmd(dataset: Path, out: Path, overwrite: bool, workers: int | None, quiet: bool) -> None:
    """What DATASET holds, from one pass over its shards: counts, scores, SDF checks, leakage and label noise.

    Writes --out/report.md (the summary and the flagged scenes by name), --out/stats.json (every figure and
    every scene) and PNG plots, and prints the summary. A scene is flagged when its SDF has no surface (no
    inside or no outside voxel) or one that does not close within the grid, when its SDF bytes or its grasp
    set equal another scene's (within or across splits), or when its label noise is an outlier of the
    dataset's. No training, and nothing of DATASET is changed.
    """
    from gq.common.workers import worker_count
    from gq.shards import ShardReader
    from gq.shards.report import dataset_report, report_markdown, summary_lines

    from .pictures import REPORT_PLOTS, plot_report

    with one_line_errors(interrupted="no report was written"):
        build = BesideBuild(out, tool=STATS_TOOL, overwrite=overwrite)
        count = worker_count(workers, ShardReader(dataset).num_shards)
        report = dataset_report(dataset, workers=count, progress=not quiet and sys.stderr.isatty())
        with build:
            tmp = build.create(["report.md", "stats.json", *REPORT_PLOTS])
            plots = plot_report(report, tmp)
            (tmp / "stats.json").write_text(json.dumps(report, indent=1) + "\n")
            (tmp / "report.md").write_text(report_markdown(report, plots))
            build.commit()
    for line in summary_lines(report):
        click.echo(line)
    click.echo(f"report: {out / 'report.md'} (every figure: {out / 'stats.json'})")


@click.command(context_settings=CONTEXT)
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the differences as one JSON object.")
def diff_cmd(a: Path, b: Path, as_json: bool) -> None:
    """Scenes added, removed, changed and moved between splits from dataset A to B; build options that differ.

    A scene is changed when its record checksum differs. Exit status as diff's: 0 the same, 1 different, 2 an
    error."""
    from gq.shards.diff import diff_datasets, diff_lines

    with one_line_errors():
        diff = diff_datasets(a, b)
    click.echo(json.dumps(diff, indent=1) if as_json else "\n".join(diff_lines(diff)))
    sys.exit(0 if diff["identical"] else 1)


def _png_owner(path: Path) -> str | None:
    """The tool that wrote a PNG, from its text chunk (None for anything else)."""
    from PIL import Image  # matplotlib's own dependency

    try:
        with Image.open(path) as image:
            return image.info.get(OWNER_KEY) if image.format == "PNG" else None
    except OSError:
        return None


def _dataset_scene(dataset: Path, scene: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(name, sdf, labels) of a dataset's scene given by name or id."""
    from gq.shards import ShardReader

    reader = ShardReader(dataset)
    names = reader.index["name"]
    if scene in names:
        scene_id = int(reader.index["scene"][np.flatnonzero(names == scene)[0]])
    elif scene.isdigit() and int(scene) in set(reader.index["scene"].tolist()):
        scene_id = int(scene)
    else:
        raise UsageError(f"{dataset}: no scene named or numbered {scene!r}; its names look like {names[0]!r}")
    name = str(reader.column("name", [scene_id])[0])
    return name, np.array(reader.sdf(scene_id), np.float32), np.array(reader.labels(scene_id))


@click.command(context_settings=CONTEXT)
@click.argument("targets", nargs=-1, metavar="[DATASET] [SCENE]")
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="PNG file to write.")
@click.option("--scenes", type=click.Path(path_type=Path), help="A processed folder (<scene>/scene.npz) holding SCENE.")
@click.option("--mesh", type=click.Path(path_type=Path), help="A mesh file (any trimesh format), at --grid.")
@click.option("--grasps", type=click.Path(path_type=Path), help="With --mesh: grasps (N,19) .npy in the mesh's frame.")
@click.option(
    "--grid",
    type=int,
    help=f"--mesh: its SDF grid [default: {MESH_GRID}]; --scenes: the grid the scene must have "
    "[default: its own]. With --model: the model's.",
)
@click.option("--model", type=click.Path(path_type=Path), help="A checkpoint: adds its predicted against true scores.")
@click.option("-k", "top_k", type=int, default=10, show_default=True, help="Best and worst grasps drawn.")
@click.option("--overwrite", is_flag=True, help="Replace a picture written by an earlier gq show.")
def show_cmd(
    targets: tuple[str, ...],
    out: Path,
    scenes: Path | None,
    mesh: Path | None,
    grasps: Path | None,
    grid: int | None,
    model: Path | None,
    top_k: int,
    overwrite: bool,
) -> None:
    """One scene as a picture: SDF slices, its zero isosurface, its best and worst grasps; --model adds predictions.

    The SDF's three mid-slices with the zero contour, the zero isosurface in 3-D with the K best and worst
    grasps by score (palm positions, approach directions), and with --model its predictions against the true
    scores, with their Spearman correlation.

    The scene: DATASET SCENE (a shard dataset and a scene's name or id), --scenes DIR SCENE, or --mesh FILE
    (with --grasps FILE.npy to draw grasps; a mesh has no true scores, so --model colours them by prediction).
    """
    with one_line_errors():
        wanted = {"--scenes": 1, "--mesh": 0}.get("--scenes" if scenes else "--mesh" if mesh else "", 2)
        if scenes and mesh:
            raise UsageError("give one of DATASET SCENE, --scenes DIR SCENE and --mesh FILE")
        if len(targets) != wanted:
            usage = {2: "DATASET SCENE", 1: "--scenes DIR SCENE", 0: "--mesh FILE and no SCENE"}[wanted]
            raise UsageError(f"expected {usage}, got {len(targets)} argument(s) {' '.join(targets)}".rstrip())
        if grasps and not mesh:
            raise UsageError("--grasps goes with --mesh (a scene has its own grasps)")
        if top_k < 1:
            raise UsageError(f"-k {top_k}: must be at least 1")
        check_file_replaceable(out, tool=SHOW_TOOL, overwrite=overwrite, written_by=_png_owner, kind="PNG")
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: no folder {out.parent} to write it in; create it or choose another --out")
        estimator = None
        if model:
            from gq.train.predict import Estimator

            estimator = Estimator.load(model, "cpu")
            grid = estimator.grid
        title, labels = _scene(targets, scenes, mesh, grasps, grid)
        sdf, grasp_rows, scores = labels
        predictions = spearman = None
        if estimator is not None and grasp_rows is not None:
            predictions = estimator.scores(sdf, grasp_rows)
            if scores is not None:
                spearman = _spearman(predictions, scores)
        from .pictures import plot_scene

        plot_scene(out, sdf, grasp_rows, scores, title=title, k=top_k, predictions=predictions, spearman=spearman,
                   metadata={OWNER_KEY: SHOW_TOOL})  # fmt: skip
    click.echo(f"wrote {out}")


def _spearman(predictions: np.ndarray, scores: np.ndarray) -> float:
    """Spearman's rank correlation of one scene's predictions and scores, as training's metrics compute it."""
    import torch

    from gq.train.metrics import spearman_per_group

    groups = torch.zeros(len(scores), dtype=torch.int64)
    rho = spearman_per_group(torch.tensor(predictions).double(), torch.tensor(scores).double(), groups, 1)
    return float(rho[0])


def _scene(targets, scenes, mesh, grasps, grid) -> tuple[str, tuple]:
    """The title and (sdf, grasps or None, scores or None) of the scene the arguments name."""
    from gq.shards.source import SCENE_FILE, read_npy, read_scene

    if mesh:
        from gq.meshes import mesh_grid

        try:
            sdf, translation, scale = mesh_grid(mesh, grid or MESH_GRID)
        except ValueError as err:
            raise UsageError(str(err)) from None
        rows = None
        if grasps:
            rows = np.array(read_npy(grasps, key="grasps"), np.float32)
            if rows.ndim != 2 or rows.shape[1] != 19:
                raise UsageError(f"{grasps}: grasps of shape {rows.shape}, expected (N, 19)")
            rows[:, :3] = (rows[:, :3] - translation) * scale
        return mesh.name, (sdf, rows, None)
    if scenes:
        arrays = read_scene(scenes / targets[0] / SCENE_FILE, grid=grid, required=("sdf", "grasps"))
        return targets[0], (arrays["sdf"], arrays["grasps"], arrays.get("scores"))
    name, sdf, labels = _dataset_scene(Path(targets[0]), targets[1])
    return name, (sdf, labels[:, :19], labels[:, 19])
