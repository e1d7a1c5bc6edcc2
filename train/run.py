#!/usr/bin/env python
"""Train grasp-quality estimators on a shard dataset: fit, compare the two loaders, eval.

python train/run.py fit --shards DIR --out RUN_DIR [options]
python train/run.py compare --shards DIR --out DIR [fit options]
python train/run.py eval CKPT --shards DIR --split val|test
python train/run.py predict CKPT (--scenes DIR | --shards DIR --split S | --mesh OBJ --grasps G.npy) --out F.parquet
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from models import CheckpointError
from pipeline import DEFAULT_WINDOW, LoaderError, resolve_device
from shards import DatasetError
from train.compare import compare as run_compare
from train.compare import format_table
from train.config import ConfigError, FitConfig, parse_fc_dims
from train.loop import TrainError, dataset_identity, evaluate, fit
from train.predict import PredictError
from train.rundir import WriteError

USAGE_ERRORS = (ConfigError, LoaderError, DatasetError, CheckpointError, PredictError)


def _errors(fn):
    """Known failures end with one line on stderr and a non-zero exit, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USAGE_ERRORS as err:
            click.echo(f"run.py {fn.__name__}: error: {err}", err=True)
            sys.exit(2)
        except (TrainError, WriteError) as err:
            click.echo(f"run.py {fn.__name__}: error: {err}", err=True)
            sys.exit(1)

    return wrapper


def fit_options(fn):
    """The options of `fit`, shared by `compare`."""
    options = [
        click.option("--shards", required=True, type=click.Path(path_type=Path), help="Shard dataset directory."),
        click.option(
            "--model",
            type=click.Choice(["small", "large"]),
            default=None,
            help="GQEstimator (small) or GQEstimatorLarge (large) [default: small, or --init-from's].",
        ),
        click.option("--base-channels", type=int, default=None, help="Conv channels c (c, 2c, 4c, 8c)."),
        click.option("--fc-dims", default=None, help="Head sizes, comma-separated, e.g. 256,128,64."),
        click.option("--scenes-per-batch", "-S", default=8, show_default=True, help="SDFs per batch."),
        click.option(
            "--grasps-per-scene",
            "-G",
            default=16,
            show_default=True,
            help="Grasps per SDF per batch (1 = the seed's independent grasps).",
        ),
        click.option(
            "--shuffle-window",
            default=str(DEFAULT_WINDOW),
            show_default=True,
            help="Shards per shuffle window (each rank reads its shards a window at a time), or 'all'.",
        ),
        click.option("--epochs", default=100, show_default=True),
        click.option("--max-steps", type=int, default=None, help="Stop after this many steps (overrides --epochs)."),
        click.option(
            "--max-time",
            type=float,
            default=None,
            help="Stop after this many seconds of training (validation not counted).",
        ),
        click.option("--lr", default=1e-4, show_default=True),
        click.option("--weight-decay", default=1e-4, show_default=True),
        click.option(
            "--lr-schedule",
            type=click.Choice(["plateau", "linear"]),
            default="plateau",
            show_default=True,
            help="plateau: lr x --plateau-factor after --plateau-patience validations without improvement; "
            "linear: lr x 1 -> --lr-end-factor over the planned steps (the seed's train_gq.py).",
        ),
        click.option(
            "--lr-end-factor", default=0.05, show_default=True, help="linear schedule: the last step's lr factor."
        ),
        click.option("--plateau-factor", default=0.5, show_default=True),
        click.option("--plateau-patience", default=5, show_default=True),
        click.option(
            "--early-stopping",
            default=15,
            show_default=True,
            help="Stop after this many validations without improvement (0: never).",
        ),
        click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", show_default=True),
        click.option("--channels-last", is_flag=True, help="channels_last_3d memory format."),
        click.option("--compile", is_flag=True, help="torch.compile the model."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--seed", default=0, show_default=True),
        click.option(
            "--init-from",
            type=click.Path(path_type=Path),
            default=None,
            help="Start from a checkpoint: ours (best.pt/last.pt) or the seed's state_dict files.",
        ),
        click.option("--val-every", type=int, default=None, help="Steps between validations [default: one epoch]."),
        click.option("--val-scenes-per-batch", default=8, show_default=True),
        click.option("--log-every", default=10, show_default=True, help="Steps between metrics rows."),
        click.option(
            "--ckpt-every",
            default=500,
            show_default=True,
            help="Steps between last.pt saves (also saved at every validation and at the end).",
        ),
        click.option("--zero-sdf", is_flag=True, help="Control run: feed zeros instead of the SDFs."),
        click.option("--threads", type=int, default=None, help="torch CPU threads [default: torch's]."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _config(kwargs: dict, **fixed) -> FitConfig:
    kwargs = dict(kwargs)
    quiet = kwargs.pop("quiet")
    kwargs["fc_dims"] = parse_fc_dims(kwargs["fc_dims"])
    for key in ("shards", "init_from"):
        kwargs[key] = str(kwargs[key]) if kwargs[key] is not None else None
    return FitConfig(progress=not quiet, **fixed, **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train and evaluate grasp-quality estimators on shard datasets."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


@cli.command("fit")
@fit_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--loader", type=click.Choice(["cache", "dali"]), default="cache", show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out.")
@_errors
def fit_cmd(**kwargs) -> None:
    """Train a model; writes config.json, metrics.jsonl, last.pt, best.pt, summary.json, curves.png."""
    out = kwargs.pop("out")
    summary = fit(_config(kwargs, out=str(out)))
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 speaks for the job
    val = " ".join(
        f"{k[4:]} {summary[k]:.4f}"
        for k in ("val_mse", "val_mae", "val_r2", "val_spearman")
        if isinstance(summary.get(k), float)
    )
    click.echo(
        f"fit: {summary['steps']} steps ({summary['stopped']}), {summary['samples_per_s'] or 0:,.0f} samples/s; "
        f"val {val}; best val MSE {summary['best_val_mse']:.4f} at step {summary['best_step']}; "
        f"outputs in {out} (curves.png)"
    )


@cli.command("compare")
@fit_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for both runs.")
@click.option("--overwrite", is_flag=True, help="Replace earlier runs in --out.")
@_errors
def compare_cmd(**kwargs) -> None:
    """Run fit with each loader (cache, dali) on identical settings; writes compare.json and compare.png."""
    out = kwargs.pop("out")
    if kwargs["max_steps"] is None:
        kwargs["max_steps"] = 100  # a fixed budget: the comparison is about the loaders, not convergence
    result = run_compare(_config(kwargs, out=str(out)), out)
    click.echo(format_table(result))
    click.echo(f"plot: {out / 'compare.png'}  table: {out / 'compare.json'}")


@cli.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--shards", required=True, type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True)
@click.option("--loader", type=click.Choice(["cache", "dali"]), default="cache", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--scenes-per-batch", default=8, show_default=True)
@_errors
def eval_cmd(checkpoint: Path, shards: Path, split: str, loader: str, device: str, scenes_per_batch: int) -> None:
    """Metrics of CHECKPOINT (ours, or a seed state_dict) on a split, as JSON on stdout."""
    from pipeline import open_loader
    from shards import read_manifest
    from train.checkpoint import dataset_warning, load_model

    dev = resolve_device(device)
    model, stats = load_model(checkpoint)
    manifest = read_manifest(shards)
    try:
        max_grasps, grid = int(manifest["max_grasps"]), int(manifest["grid"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        raise DatasetError(f"{shards}/manifest.json: no valid max_grasps and grid; rebuild the dataset") from None
    if model.input_size != grid:
        raise ConfigError(f"{checkpoint}: model input size {model.input_size} != the dataset's grid {grid}")
    if warning := dataset_warning(checkpoint, stats, dataset_identity(manifest)):
        click.echo(warning, err=True)
    mean, std = (0.0, 1.0) if stats is None else (stats["mean"], stats["std"])
    with open_loader(
        shards,
        mode=loader,
        split=split,
        scenes_per_batch=scenes_per_batch,
        grasps_per_scene=max_grasps,
        device=dev,
        progress=False,
    ) as data:
        metrics = evaluate(model.to(dev), data, mean, std, prefix=f"{split}_")
    click.echo(json.dumps({"checkpoint": str(checkpoint), "split": split, **metrics}, indent=2))


@cli.command("predict")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--scenes", type=click.Path(path_type=Path), help="Processed directory: <scene>/scene.npz (scores optional)."
)
@click.option("--shards", type=click.Path(path_type=Path), help="Shard dataset (with --split).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
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
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
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
    from train.predict import (
        Estimator,
        best_grasps,
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
        predictions = predict_shards(estimator, shards, split)
    else:
        predictions = predict_mesh(estimator, mesh, grasps, mesh_max_extent, open_meshes)
    write_parquet(predictions, out)
    click.echo(f"{'scene':<24} {'rank':>4} {'grasp':>6} {'prediction':>11} {'score':>9}")
    for name, rank, grasp, pred, score in best_grasps(predictions, top_k):
        click.echo(f"{name:<24} {rank:>4} {grasp:>6} {pred:>11.4f} {score:>9.4f}")
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
