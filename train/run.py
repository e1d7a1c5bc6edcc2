#!/usr/bin/env python
"""Train grasp-quality estimators on a shard dataset: fit, compare the two loaders, eval.

python train/run.py fit --shards DIR --out RUN_DIR [options]
python train/run.py compare --shards DIR --out DIR [fit options]
python train/run.py eval CKPT --shards DIR --split val|test
python train/run.py predict CKPT (--scenes DIR | --shards DIR --split S | --mesh OBJ --grasps G.npy) --out F.parquet
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from gq.common.files import check_writable
from gq.common.options import click_options, one_line_errors
from gq.common.table import format_table
from gq.pipeline import MODES
from gq.shards import SPLITS
from gq.train import evaluate_checkpoint, fit
from gq.train.compare import compare as run_compare
from gq.train.compare import report
from gq.train.config import DEVICES, FitConfig
from gq.train.predict import PredictError


def _errors(fn):
    """Known failures (every GQError: config, data, checkpoint, a failed write) end with one line, not a traceback."""
    return one_line_errors()(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train and evaluate grasp-quality estimators on shard datasets."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


# Every fit and compare option comes from FitConfig's fields (help text, type, default, choices live there).
@cli.command("fit")
@click_options(FitConfig)
@_errors
def fit_cmd(**options) -> None:
    """Train a model; writes config.json, metrics.jsonl, last.pt, best.pt, summary.json, curves.png."""
    summary = fit(FitConfig(**options))
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 speaks for the job
    val = " ".join(
        f"{k[4:]} {summary[k]:.4f}"
        for k in ("val_mse", "val_mae", "val_r2", "val_spearman")
        if isinstance(summary.get(k), float)
    )
    rate = summary["samples_per_s"]  # None: no step was timed here (one step, or a run that had ended)
    click.echo(
        f"fit: {summary['steps']} steps ({summary['stopped']}), "
        f"{'no steady-state rate' if rate is None else f'{rate:,.0f} samples/s'}; "
        f"val {val}; best val MSE {summary['best_val_mse']:.4f} at step {summary['best_step']}; "
        f"outputs in {options['out']} (curves.png)"
    )


@cli.command("compare")
@click_options(
    FitConfig,
    exclude=("loader", "resume"),  # it runs each loader, each from scratch
    defaults={"max_steps": 100},  # a fixed budget: the comparison is about the loaders, not convergence
    help={"out": "Directory for both runs.", "overwrite": "Replace earlier runs in --out."},
)
@_errors
def compare_cmd(**options) -> None:
    """Run fit with each loader (cache, dali) on identical settings; writes compare.json and compare.png."""
    out = Path(options["out"])
    result = run_compare(FitConfig(**options), out)
    click.echo(report(result))
    click.echo(f"plot: {out / 'compare.png'}  table: {out / 'compare.json'}")


@cli.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--shards", required=True, type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(SPLITS[1:]), default="val", show_default=True)
@click.option("--loader", type=click.Choice(MODES), default="cache", show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--scenes-per-batch", default=8, show_default=True)
@_errors
def eval_cmd(checkpoint: Path, **options) -> None:
    """Metrics of CHECKPOINT (ours, or a seed state_dict) on a split, as JSON on stdout."""
    metrics = evaluate_checkpoint(checkpoint, **options, warn=lambda line: click.echo(line, err=True))
    click.echo(json.dumps({"checkpoint": str(checkpoint), "split": options["split"], **metrics}, indent=2))


@cli.command("predict")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--scenes", type=click.Path(path_type=Path), help="Processed directory: <scene>/scene.npz (scores optional)."
)
@click.option("--shards", type=click.Path(path_type=Path), help="Shard dataset (with --split).")
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@click.option(
    "--mesh", type=click.Path(path_type=Path), help="One mesh file (with --grasps), prepared as import_meshes does."
)
@click.option(
    "--grasps", type=click.Path(path_type=Path), help="(N,19) .npy of grasps in the mesh's frame (with --mesh)."
)
@click.option(
    "--mesh-max-extent",
    type=float,
    default=None,
    help="With --mesh: the training data's mesh_max_extent.txt value [default: the mesh's own extent].",
)
@click.option(
    "--open-meshes",
    type=click.Choice(["refuse", "winding", "repair"]),
    default="refuse",
    show_default=True,
    help="With --mesh: how to sign a mesh that is not closed.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Parquet file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (only a Parquet file).")
@click.option("--top-k", default=5, show_default=True, help="Best grasps per object to print.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@_errors
def predict_cmd(
    checkpoint: Path,
    scenes: Path | None,
    shards: Path | None,
    split: str,
    mesh: Path | None,
    grasps: Path | None,
    mesh_max_extent: float | None,
    open_meshes: str,
    out: Path,
    overwrite: bool,
    top_k: int,
    device: str,
) -> None:
    """Per-grasp predictions of CHECKPOINT to --out (scene, grasp, prediction, score); prints each object's best."""
    from gq.train.predict import (
        Estimator,
        best_grasps,
        check_mesh_max_extent,
        predict_mesh,
        predict_scenes,
        predict_shards,
        ranking_metrics,
        write_parquet,
    )

    sources = [name for name, value in (("--scenes", scenes), ("--shards", shards), ("--mesh", mesh)) if value]
    if len(sources) != 1:
        raise PredictError(f"give exactly one of --scenes, --shards, --mesh (got {', '.join(sources) or 'none'})")
    if bool(mesh) != bool(grasps):
        raise PredictError("--mesh and --grasps go together")
    if top_k < 1:
        raise PredictError(f"--top-k {top_k}: must be at least 1")
    check_mesh_max_extent(mesh_max_extent)
    # --out is checked before any work: its folder must exist (predict makes none) and take a file.
    if not out.parent.is_dir():
        raise PredictError(f"--out {out}: no folder {out.parent} to write it in; create it or choose another --out")
    check_writable(out, flag="--out")
    if out.exists():  # never replace a file that is not a Parquet file (someone else's), nor any without --overwrite
        with open(out, "rb") as f:
            parquet = f.read(4) == b"PAR1"
        if not (overwrite and parquet):
            raise PredictError(
                f"--out {out}: exists{'' if parquet else ' and is not a Parquet file'}; "
                f"{'pass --overwrite to replace it or ' if parquet else ''}choose another file"
            )
    estimator = Estimator.load(checkpoint, device)
    if scenes:
        predictions = predict_scenes(estimator, scenes, progress=sys.stderr.isatty())
    elif shards:
        predictions = predict_shards(estimator, shards, split=split)
    else:
        predictions = predict_mesh(
            estimator, mesh, grasps_path=grasps, mesh_max_extent=mesh_max_extent, open_meshes=open_meshes
        )
    write_parquet(predictions, out)
    columns = [("scene", "<24"), ("rank", ">4"), ("grasp", ">6"), ("prediction", ">11.4f"), ("score", ">9.4f")]
    for line in format_table(columns, best_grasps(predictions, top_k), indent=""):
        click.echo(line)
    metrics = ranking_metrics(predictions)
    if metrics:
        keys = (
            "spearman",
            "kendall_tau",
            "top1_regret",
            "top1_overlap",
            "top5_overlap",
            "top10_overlap",
            "top50_overlap",
            "r2",
        )
        values = "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)
        click.echo(f"per object: {values}  ({metrics['scenes']} objects)")
    click.echo(f"wrote {len(predictions.grasp):,} predictions of {len(set(predictions.scene))} objects to {out}")


if __name__ == "__main__":
    cli()
