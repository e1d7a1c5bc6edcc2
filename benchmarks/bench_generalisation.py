#!/usr/bin/env python
"""Generalisation across object sources: train on generated primitives or on imported real objects, evaluate both.

Makes (in --work, or a temporary directory) P primitive scenes (`synth`) and imports R of pybullet's
`random_urdfs` objects with labels from the same hand model (`meshes`, the seed's conventions), builds
shards of each (80/10/10 hash splits by name), trains the same small model on each train split for the
same --max-time, and evaluates both models on both test splits. Baselines from the same data: predicting
the train mean (MSE) and picking a grasp at random (its expected top-1 regret, mean - min per object).
`--augment off,rot24 --seeds 3` trains each model with and without rotation augmentation, from 3 seeds
each, and gives each cell's mean and spread over the seeds.

    python benchmarks/bench_generalisation.py --primitives 600 --real 400 --max-time 180 --json gen.json
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from gq.common.files import write_atomically
from gq.common.table import format_table
from gq.meshes import ImportOptions, import_meshes
from gq.meshes.pybullet import write_raw
from gq.pipeline import AUGMENTS
from gq.shards import BuildOptions, ShardReader, build_shards
from gq.synth import write_scenes
from gq.train import evaluate_checkpoint, fit
from gq.train.config import FitConfig

SOURCES = ("primitives", "real")
KEYS = ("r2", "spearman", "kendall_tau", "top1_regret", "top5_overlap", "mse", "mse_mean_baseline")


def _random_pick_regret(shards: Path, split: str) -> float:
    """Expected top-1 regret of a uniformly random grasp: per object mean - min, averaged."""
    reader = ShardReader(shards)
    scores = [np.asarray(reader.scores(s), np.float64) for s in reader.split_scenes(split)]
    return float(np.mean([s.mean() - s.min() for s in scores]))


def _evaluate(checkpoint: Path, shards: Path, split: str) -> dict[str, float]:
    metrics = evaluate_checkpoint(checkpoint, shards=shards, split=split, device="cpu", prefix="")
    return {k: metrics[k] for k in KEYS}


def _prepare(root: Path, primitives: int, real: int, grid: int, workers: int | None, progress: bool) -> None:
    """Scenes and shards of both sources in `root`: {primitives,real}_shards."""
    write_scenes(
        root / "primitives_scenes", primitives, grid=grid, seed=0, workers=workers, progress=progress, overwrite=True
    )
    write_raw(root / "real_raw", "random", real)
    summary = import_meshes(
        root / "real_raw",
        root / "real_scenes",
        ImportOptions(grid=grid, label="synth", skip_bad=True),
        workers=workers,
        overwrite=True,
        progress=progress,
    )
    click.echo(
        f"imported {summary['imported']} of {summary['scenes']} real objects (refused: {summary['refused'] or 'none'})",
        err=True,
    )
    for source in SOURCES:
        shutil.rmtree(root / f"{source}_shards", ignore_errors=True)
        build_shards(
            root / f"{source}_scenes",
            root / f"{source}_shards",
            BuildOptions(grid=grid),
            workers=workers,
            progress=False,
        )


def _run_name(source: str, augment: str, seed: int) -> str:
    """The run folder of one model: two benchmarks sharing --work with --reuse-data (one per --augment) never
    share one."""
    return f"{source}_{augment}_seed{seed}_run"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--primitives", default=600, show_default=True, help="Generated primitive scenes.")
@click.option("--real", default=400, show_default=True, help="pybullet random_urdfs objects to import.")
@click.option("--grid", default=48, show_default=True)
@click.option("--max-time", default=180.0, show_default=True, help="Training seconds per model.")
@click.option(
    "--max-steps",
    type=int,
    default=None,
    help="Training steps per model instead of --max-time (the same budget however busy the machine is).",
)
@click.option("--base-channels", default=8, show_default=True)
@click.option(
    "--augment",
    "augments",
    default="off",
    show_default=True,
    help=f"Augmentations to train each model with, comma-separated ({', '.join(AUGMENTS)}).",
)
@click.option("--seeds", default=1, show_default=True, help="Seeds 0..N-1 per model (initialisation and epoch plan).")
@click.option(
    "--train-on",
    type=click.Choice(("both",) + SOURCES),
    default="both",
    show_default=True,
    help="Which sources to train models on (each model is tested on both).",
)
@click.option("--threads", type=int, default=None, help="torch CPU threads of each training [default: torch's].")
@click.option("--workers", type=int, default=None, help="Processes for data preparation [default: all CPUs].")
@click.option(
    "--work",
    type=click.Path(path_type=Path),
    default=None,
    help="Keep data and runs here [default: a temporary directory, removed at the end].",
)
@click.option("--reuse-data", is_flag=True, help="Keep the shards already in --work (from an earlier run).")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="Write the figures here.")
def main(
    primitives: int,
    real: int,
    grid: int,
    max_time: float,
    max_steps: int | None,
    base_channels: int,
    augments: str,
    seeds: int,
    train_on: str,
    threads: int | None,
    workers: int | None,
    work: Path | None,
    reuse_data: bool,
    json_path: Path | None,
) -> None:
    """Train on primitives and on real objects; evaluate each model on both test splits."""
    arms = augments.split(",")
    if unknown := [a for a in arms if a not in AUGMENTS]:
        raise click.BadParameter(f"{unknown[0]}: choose among {', '.join(AUGMENTS)}", param_hint="--augment")
    trained_on = SOURCES if train_on == "both" else (train_on,)
    runs = [(source, augment, seed) for source in trained_on for augment in arms for seed in range(seeds)]
    root = work or Path(tempfile.mkdtemp(prefix="bench_generalisation_"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        progress = sys.stderr.isatty()
        if not reuse_data:
            _prepare(root, primitives, real, grid, workers, progress)
        counts = {s: ShardReader(root / f"{s}_shards").num_scenes for s in SOURCES}
        for source, augment, seed in runs:
            fit(
                FitConfig(
                    shards=str(root / f"{source}_shards"),
                    out=str(root / _run_name(source, augment, seed)),
                    max_time=None if max_steps else max_time,
                    max_steps=max_steps,
                    scenes_per_batch=8,
                    grasps_per_sdf=64,
                    base_channels=base_channels,
                    lr=1e-3,
                    early_stopping=0,
                    val_every=200,
                    overwrite=True,
                    progress=progress,
                    seed=seed,
                    augment=augment,
                    threads=threads,
                )
            )
        wall = {run: json.loads((root / _run_name(*run) / "summary.json").read_text()) for run in runs}
        per_run = {}
        for run in runs:
            for tested in SOURCES:
                row = _evaluate(root / _run_name(*run) / "best.pt", root / f"{tested}_shards", "test")
                row["random_pick_regret"] = _random_pick_regret(root / f"{tested}_shards", "test")
                per_run[run + (tested,)] = row
    finally:
        if work is None:
            shutil.rmtree(root, ignore_errors=True)

    budget = f"{max_steps} steps" if max_steps else f"{max_time:.0f} s"
    click.echo(
        f"bench_generalisation: {counts['primitives']} primitives, {counts['real']} real objects, grid {grid}, "
        f"{budget} of training each (base channels {base_channels}, S=8 G=64, lr 1e-3), test splits"
        + (f"; mean ± std over {seeds} seeds" if seeds > 1 else "")
    )
    for run in runs:
        click.echo(
            f"  trained on {run[0]}, augment {run[1]}, seed {run[2]}: {wall[run]['steps']} steps in "
            f"{wall[run]['train_time_s']:.0f} s"
        )
    table = {}  # per cell (trained, augment, tested): each metric's mean and spread over the seeds
    for source, augment, tested in {(r[0], r[1], r[3]) for r in per_run}:
        cell = [per_run[(source, augment, seed, tested)] for seed in range(seeds)]
        name = f"{source}->{tested}" + (f" {augment}" if arms != ["off"] else "")
        table[name] = {k: float(np.mean([c[k] for c in cell])) for k in cell[0]}
        table[name]["std"] = {k: float(np.std([c[k] for c in cell])) for k in cell[0]}
    table = dict(sorted(table.items()))
    columns = [
        ("train -> test", "<22"),
        ("R2", ">7.3f"),
        ("Spearman", ">9.3f"),
        ("Kendall", ">8.3f"),
        ("top-1 regret", ">13.3f"),
        ("random pick", ">12.3f"),
        ("top-5 overlap", ">14.3f"),
        ("MSE", ">8.2f"),
        ("mean MSE", ">9.2f"),
    ]
    keys = ("r2", "spearman", "kendall_tau", "top1_regret", "random_pick_regret", "top5_overlap", "mse")
    rows = [(name, *(r[k] for k in keys + ("mse_mean_baseline",))) for name, r in table.items()]
    for line in format_table(columns, rows):
        click.echo(line)
    if seeds > 1:
        click.echo("spread (population std over the seeds):")
        spread = [(name, *(r["std"][k] for k in keys + ("mse_mean_baseline",))) for name, r in table.items()]
        for line in format_table(columns, spread):
            click.echo(line)
    if json_path:
        write_atomically(
            json_path,
            json.dumps(
                {
                    "scenes": counts,
                    "grid": grid,
                    "max_time": max_time,
                    "max_steps": max_steps,
                    "base_channels": base_channels,
                    "seeds": seeds,
                    "table": table,
                    "runs": {
                        _run_name(*run): {
                            **{k: wall[run][k] for k in ("steps", "train_time_s")},
                            **{f"->{t}": per_run[run + (t,)] for t in SOURCES},
                        }
                        for run in runs
                    },
                },
                indent=2,
            )
            + "\n",
        )


if __name__ == "__main__":
    main()
