#!/usr/bin/env python
"""Benchmark training: samples/s per model, loader and grouping, time-to-quality of G=16 vs G=1,
(--window-study) val MSE after a fixed number of steps for several shuffle windows, and (--time-study)
val quality after a fixed wall-clock budget for several batch shapes and learning rates.

Throughput rows time whole training steps (batch fetch, forward, backward, optimizer) with the
trainer's own `train_step`, after warm-up steps. Time-to-quality runs the real trainer (`fit`):
G=1 (S=128) trains for --budget-s seconds and its final val MSE becomes the target; G=16 (S=8,
the same 128 grasps per batch) then trains, validating every --val-every steps, and the training
time (validation excluded) at which its val MSE first reaches the target is reported. The window
study runs the real trainer once per window, same seed, steps and settings, and reports each final
val MSE against the full shuffle's (`all`). The time study runs fit as a user does, stopping on time
(`--max-time`), because a recipe that learns more per step may still learn less per second.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import click
import torch

from gq.common.files import write_atomically
from gq.common.table import format_table
from gq.models import GRASP_DIM, MODEL_KINDS, ModelSizeError, build_model
from gq.pipeline import DEFAULT_WINDOW, MODES, keep_freed_host_memory, open_dataset, parse_window, resolve_device
from gq.pipeline.cache import free_memory
from gq.train import FitConfig, FitRecipe, fit
from gq.train.config import AMP_MODES, DEVICES, parse_fc_dims

CONFIGS = [(128, 1), (8, 16)]


def training_memory(cfg: FitConfig, grid: int) -> int:
    """Bytes a training step of `cfg` needs, estimated without allocating: fp32 parameters four times
    (weights, gradients, Adam's two moments) and every layer's output twice (kept for backward, and its
    gradient), counted by a forward pass on torch's meta device. GQEstimatorLarge at S=128 G=1 on 48^3
    SDFs: ~30 GB, the size a 24 GiB machine was killed at."""
    counted = [0]

    def count(module: torch.nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            counted[0] += output.numel()

    s, g = cfg.scenes_per_batch, cfg.grasps_per_sdf
    with torch.device("meta"):
        model = build_model(cfg.model or "small", input_size=grid, base_channels=cfg.base_channels,
                            fc_dims=cfg.fc_dims)  # fmt: skip
        for module in model.modules():
            if not any(module.children()):
                module.register_forward_hook(count)
        model(torch.empty(s, 1, grid, grid, grid), torch.empty(s * g, GRASP_DIM), torch.zeros(s * g, dtype=torch.long))
    parameters = sum(p.numel() for p in model.parameters())
    return 4 * (4 * parameters + 2 * counted[0])


def row_too_large(cfg: FitConfig, grid: int, device: torch.device) -> str | None:
    """Why a row cannot run here (a model above the size any run may build, or a training step needing more
    memory than `device` has free), or None when it fits."""
    try:
        needed = training_memory(cfg, grid)
    except ModelSizeError as err:
        return str(err)
    free = free_memory(device)
    if needed <= free:
        return None
    return (
        f"a training step needs ~{needed / 1e9:.1f} GB on {device} (parameters, gradients, Adam state, "
        f"activations), {free / 1e9:.1f} GB are free"
    )


def throughput(cfg: FitConfig, *, steps: int, warmup: int) -> float:
    """Training samples/s of the trainer's own setup and train_step, over `steps` steps after `warmup` steps."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp, FitRecipe(replace(cfg, out=tmp)) as recipe:
        recipe.setup()
        loader, device = recipe.train_loader, recipe.device
        if len(loader) < warmup + steps:
            raise click.UsageError(
                f"{cfg.model}/{cfg.loader} S={cfg.scenes_per_batch} G={cfg.grasps_per_sdf}: an epoch has "
                f"{len(loader)} batches, fewer than the {warmup + steps} needed; use a larger dataset or fewer --steps"
            )
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        batches = iter(loader)
        samples = 0
        for i in range(warmup + steps):
            if i == warmup:
                sync()
                start = time.perf_counter()
            batch = next(batches)
            recipe.train_step(batch)
            samples += batch.num_grasps if i >= warmup else 0
        sync()
        return samples / (time.perf_counter() - start)


def time_to_quality(
    shards: Path,
    device: str,
    budget_s: float,
    val_every: int,
    base_channels: int | None,
    fc_dims: tuple[int, ...] | None,
    lr: float,
    window: str,
) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        common = dict(
            shards=str(shards),
            device=device,
            base_channels=base_channels,
            fc_dims=fc_dims,
            lr=lr,
            max_time=budget_s,
            early_stopping=0,
            ckpt_every=10**9,
            progress=False,
            shuffle_window=window,
        )
        g1 = fit(FitConfig(out=f"{tmp}/g1", scenes_per_batch=128, grasps_per_sdf=1, val_every=10**9, **common))
        target = g1["val_mse"]
        fit(FitConfig(out=f"{tmp}/g16", scenes_per_batch=8, grasps_per_sdf=16, val_every=val_every, **common))
        rows = [json.loads(x) for x in Path(f"{tmp}/g16/metrics.jsonl").read_text().splitlines()]
        reached = [r for r in rows if "val_mse" in r and r["val_mse"] <= target]
        return {
            "target_val_mse": target,
            "budget_s": budget_s,
            "g1_s": g1["train_time_s"],
            "g1_steps": g1["steps"],
            "g16_s": reached[0]["time_s"] if reached else None,
            "g16_steps": reached[0]["step"] if reached else None,
            "g16_final_val_mse": [r for r in rows if "val_mse" in r][-1]["val_mse"],
        }


def _write_json(path: Path | None, result: dict) -> None:
    if path:
        write_atomically(path, json.dumps(result, indent=2) + "\n")


# The defaults study per step (docs/benchmarks.md): FitConfig overrides, each run on the same data and steps.
RECIPES = {
    "seed README": dict(lr=1e-4, weight_decay=1e-4, base_channels=16, lr_schedule="plateau"),
    "train_gq.py": dict(lr=1e-3, weight_decay=1e-5, base_channels=8, lr_schedule="linear"),
    "train_gq.py c16": dict(lr=1e-3, weight_decay=1e-5, base_channels=16, lr_schedule="linear"),
    "lr 1e-3 plateau": dict(lr=1e-3, weight_decay=1e-5, base_channels=8, lr_schedule="plateau"),
}
ZERO_SDF = " + zero SDF"  # a control run: the recipe fed zeros instead of SDFs (what the grasps alone can learn)


def run_study(
    shards: Path, device: str, recipes: dict[str, dict], seeds: list[int], limit: dict, **common
) -> list[dict]:
    """Final val metrics of the real trainer for each recipe (FitConfig overrides) and seed, each run stopped by
    `limit` ({"max_steps": N} or {"max_time": seconds}), every other option the same (`common`, then fit's
    defaults)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_study_") as tmp:
        for seed in seeds:
            for i, (name, overrides) in enumerate(recipes.items()):
                options = {**common, **limit, **overrides}
                cfg = FitConfig(
                    shards=str(shards), out=f"{tmp}/s{seed}r{i}", device=device, seed=seed, progress=False, **options
                )
                summary = fit(cfg)
                if "val_mse" not in summary:  # stopped by a signal before its last validation
                    raise click.ClickException(
                        f"{name!r} (seed {seed}) stopped ({summary['stopped']}) before validating"
                    )
                shown = {k: v for k, v in overrides.items() if k != "zero_sdf"}
                rows.append(
                    {"recipe": name, "seed": seed, **shown, "steps": summary["steps"], "val_mse": summary["val_mse"],
                     "val_r2": summary.get("val_r2"), "val_spearman": summary.get("val_spearman"),
                     "val_mse_mean_baseline": summary.get("val_mse_mean_baseline"),
                     "samples_per_s": summary["samples_per_s"], "train_time_s": summary["train_time_s"]}
                )  # fmt: skip
    return rows


# The time study's recipes name only what they change from fit's defaults: "S16 G64 lr3e-3 c8".
RECIPE_KEYS = {"S": ("scenes_per_batch", int), "G": ("grasps_per_sdf", int), "lr": ("lr", float),
               "c": ("base_channels", int)}  # fmt: skip


def parse_recipe(text: str) -> dict:
    """'S16 G64 lr3e-3' -> {"scenes_per_batch": 16, "grasps_per_sdf": 64, "lr": 0.003}."""
    overrides = {}
    for token in text.split():
        match = re.fullmatch(r"(S|G|lr|c)([0-9.eE+-]+)", token)
        if not match:
            raise click.BadParameter(
                f"{token!r} in {text!r}: use S<scenes> G<grasps> lr<rate> c<channels>, e.g. 'S16 G64 lr3e-3'",
                param_hint="--time-study",
            )
        name, kind = RECIPE_KEYS[match.group(1)]
        try:
            overrides[name] = kind(match.group(2))
        except ValueError:
            raise click.BadParameter(
                f"{token!r}: {match.group(2)!r} is not a number", param_hint="--time-study"
            ) from None
    return overrides


def print_time_study(title: str, rows: list[dict]) -> None:
    """One row per recipe, budget and seed; then each budget's best recipe by mean val R2 over seeds."""
    click.echo(title)
    columns = [("recipe", "<22"), ("budget s", ">8.0f"), ("seed", ">4"), ("steps", ">6"), ("samples/s", ">10,.0f"),
               ("val MSE", ">9.3f"), ("R2", ">7.3f"), ("Spearman", ">9.3f")]  # fmt: skip
    keys = ("recipe", "budget_s", "seed", "steps", "samples_per_s", "val_mse", "val_r2", "val_spearman")
    # a budget too short to time a step (a loaded machine) has no rate: "-", as in print_study
    for line in format_table(columns, [["-" if r[k] is None else r[k] for k in keys] for r in rows]):
        click.echo(line)
    for budget in dict.fromkeys(r["budget_s"] for r in rows):
        mine = [r for r in rows if r["budget_s"] == budget]
        means = {
            name: sum(r["val_r2"] for r in mine if r["recipe"] == name) / sum(r["recipe"] == name for r in mine)
            for name in dict.fromkeys(r["recipe"] for r in mine)
        }
        best = max(means, key=means.get)
        click.echo(f"  {budget:.0f} s: best mean val R2 {means[best]:.3f} with {best!r} (mean-predictor MSE "
                   f"{mine[0]['val_mse_mean_baseline']:.3f})")  # fmt: skip


def relative_mse(rows: list[dict], key: str, reference: Callable[[str], str]) -> None:
    """rows[i][key] = its val MSE / that of recipe `reference(recipe)` with the same seed (None when not run)."""
    for row in rows:
        ref = next(
            (r["val_mse"] for r in rows if r["seed"] == row["seed"] and r["recipe"] == reference(row["recipe"])), None
        )
        row[key] = row["val_mse"] / ref if ref else None


def print_study(title: str, rows: list[dict], *, ratio_key: str, column: str, versus: str, label: str = "") -> None:
    """The study's rows, then each recipe's means over seeds (its val MSE / `versus`'s first, when it has one)."""
    click.echo(title)
    columns = [("recipe", "<28"), ("seed", ">4"), ("val MSE", ">9.4f"), ("R2", ">7.3f"), ("Spearman", ">9.4f"),
               (column, ">8.3f"), ("train s", ">8.1f")]  # fmt: skip
    keys = ("recipe", "seed", "val_mse", "val_r2", "val_spearman", ratio_key, "train_time_s")
    for line in format_table(columns, [["-" if r[k] is None else r[k] for k in keys] for r in rows]):
        click.echo(line)
    for name in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == name]
        ratios = [r[ratio_key] for r in mine if r[ratio_key] and r[ratio_key] != 1.0]
        mean = {k: sum(r[k] or 0 for r in mine) / len(mine) for k in ("val_mse", "val_r2", "val_spearman")}
        ratio = (
            f"val MSE / {versus}, mean over {len(ratios)} seed(s): {sum(ratios) / len(ratios):.3f} "
            f"(range {min(ratios):.3f}-{max(ratios):.3f}); "
            if ratios
            else ""
        )
        click.echo(
            f"  {label}{name}: {ratio}mean over {len(mine)} seed(s): val MSE {mean['val_mse']:.4f}, "
            f"R2 {mean['val_r2']:.3f}, Spearman {mean['val_spearman']:.3f}"
        )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--shards", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--models", default=",".join(MODEL_KINDS), show_default=True, help="Comma-separated model kinds.")
@click.option("--loaders", default=",".join(MODES), show_default=True, help="Comma-separated loader modes.")
@click.option("--steps", default=10, show_default=True, help="Timed steps per small-model row.")
@click.option("--large-steps", default=2, show_default=True, help="Timed steps per large-model row.")
@click.option("--warmup", default=1, show_default=True)
@click.option("--base-channels", type=int, default=None, help="Applies to every model [default: each model's own].")
@click.option("--fc-dims", default=None)
@click.option("--amp", type=click.Choice(AMP_MODES), default="off", show_default=True)
@click.option("--channels-last", is_flag=True)
@click.option("--compile", "compile_model", is_flag=True)
@click.option("--budget-s", default=300.0, show_default=True, help="Time-to-quality: G=1's training budget (s).")
@click.option("--val-every", default=50, show_default=True, help="Time-to-quality: G=16's validation period (steps).")
@click.option("--lr", default=1e-3, show_default=True, help="Time-to-quality learning rate (both runs).")
@click.option("--skip-quality", is_flag=True, help="Only the throughput rows.")
@click.option("--shuffle-window", default=str(DEFAULT_WINDOW), show_default=True, help="Shards per window, or 'all'.")
@click.option(
    "--window-study",
    default=None,
    help="Instead of everything else: val MSE after --study-steps for these windows, e.g. 1,2,4,all.",
)
@click.option(
    "--defaults-study",
    default=None,
    help=f"Instead of everything else: val metrics after --study-steps for these recipes ({', '.join(RECIPES)}).",
)
@click.option(
    "--time-study",
    default=None,
    help="Instead of everything else: val metrics after each of --study-budgets seconds of training for these "
    "recipes, e.g. 'S8 G16,S8 G64,S16 G64 lr3e-3' (S, G, lr, c: scenes and grasps per batch, learning rate, "
    "channels; fit's defaults otherwise).",
)
@click.option(
    "--study-budgets", default="60,120", show_default=True, help="Time study: training budgets in seconds (--max-time)."
)
@click.option("--study-controls", default=None, help="Defaults study: recipes to also run with zero SDFs (control).")
@click.option("--study-steps", default=600, show_default=True, help="Studies: training steps per run.")
@click.option(
    "--study-seeds",
    default="0",
    show_default=True,
    help="Studies: seeds (comma-separated), one run per recipe and seed, to see the run-to-run spread.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path))
def main(
    shards: Path,
    device: str,
    models: str,
    loaders: str,
    steps: int,
    large_steps: int,
    warmup: int,
    base_channels: int | None,
    fc_dims: str | None,
    amp: str,
    channels_last: bool,
    compile_model: bool,
    budget_s: float,
    val_every: int,
    lr: float,
    skip_quality: bool,
    shuffle_window: str,
    window_study: str | None,
    defaults_study: str | None,
    time_study: str | None,
    study_budgets: str,
    study_controls: str | None,
    study_steps: int,
    study_seeds: str,
    json_path: Path | None,
) -> None:
    """Training samples/s (each model x loader x (S,G)) and time for G=16 to reach G=1's val MSE."""
    logging.basicConfig(level=logging.WARNING)
    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_host_memory()
    dims = parse_fc_dims(fc_dims)
    try:
        parse_window(shuffle_window)
        for w in window_study.split(",") if window_study else []:
            parse_window(w)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--shuffle-window / --window-study") from None
    seeds = [int(x) for x in study_seeds.split(",")]
    if window_study:
        # Validation only at the end (val_every huge): the windows differ in shuffling, nothing else.
        recipes = {w: {"shuffle_window": w} for w in window_study.split(",")}
        rows = run_study(shards, device, recipes, seeds, {"max_steps": study_steps}, base_channels=base_channels,
                         fc_dims=dims, lr=lr, val_every=10**9, early_stopping=0, ckpt_every=10**9)  # fmt: skip
        relative_mse(rows, "val_mse_vs_all", lambda recipe: "all")
        print_study(f"bench_train window study: {shards}, device {dev}, S=8 G=16, {study_steps} steps, lr {lr}",
                    rows, ratio_key="val_mse_vs_all", column="x all", versus="all's", label="window ")  # fmt: skip
        _write_json(json_path, {"window_study": rows})
        return
    if time_study:
        # As a new user runs fit, stopping on time: fit's defaults for everything a recipe does not name.
        recipes = {name.strip(): parse_recipe(name) for name in time_study.split(",")}
        try:
            budgets = [float(b) for b in study_budgets.split(",")]
        except ValueError:
            raise click.BadParameter(
                f"{study_budgets!r}: seconds, comma-separated", param_hint="--study-budgets"
            ) from None
        rows = [
            {**row, "budget_s": budget}
            for budget in budgets
            for row in run_study(shards, device, recipes, seeds, {"max_time": budget})
        ]
        print_time_study(f"bench_train time study: {shards}, device {dev}, fit's defaults but for each recipe's "
                         f"options, stopped by --max-time", rows)  # fmt: skip
        _write_json(json_path, {"time_study": rows})
        return
    if defaults_study:
        # As a new user runs fit: its defaults for everything the recipe does not set (validation every epoch,
        # so the plateau schedule sees its signal); controls fed zeros show what the grasps alone explain.
        names = defaults_study.split(",")
        unknown = [n for n in names if n not in RECIPES]
        if unknown:
            raise click.BadParameter(f"{unknown}: choose from {', '.join(RECIPES)}", param_hint="--defaults-study")
        recipes = {n: RECIPES[n] for n in names}
        for n in study_controls.split(",") if study_controls else []:
            if n not in recipes:
                raise click.BadParameter(f"{n}: not one of --defaults-study's recipes", param_hint="--study-controls")
            recipes[n + ZERO_SDF] = {**RECIPES[n], "zero_sdf": True}
        rows = run_study(shards, device, recipes, seeds, {"max_steps": study_steps}, early_stopping=0)
        relative_mse(rows, "val_mse_vs_control", lambda recipe: recipe.removesuffix(ZERO_SDF) + ZERO_SDF)
        print_study(f"bench_train defaults study: {shards}, device {dev}, {study_steps} steps per run, fit's defaults "
                    "otherwise", rows, ratio_key="val_mse_vs_control", column="x zero",
                    versus="its zero-SDF control's")  # fmt: skip
        _write_json(json_path, {"defaults_study": rows})
        return
    rows, skipped = [], []
    click.echo(
        f"bench_train: {shards}, device {dev}, amp {amp}, channels_last {channels_last}, compile {compile_model}"
    )
    grid = open_dataset(shards).reader.layout.grid
    for kind in models.split(","):
        for mode in loaders.split(","):
            for s, g in CONFIGS:
                cfg = FitConfig(
                    shards=str(shards), out="-", device=str(dev), loader=mode, model=kind, scenes_per_batch=s,
                    grasps_per_sdf=g, base_channels=base_channels, fc_dims=dims, amp=amp,
                    channels_last=channels_last, compile=compile_model, shuffle_window=shuffle_window, progress=False,
                )  # fmt: skip
                # Checked before the row runs (as the cache checks its own size): a row that cannot fit is
                # skipped, not left to the out-of-memory killer or the allocator.
                if (why := row_too_large(cfg, grid, dev)) is not None:
                    click.echo(f"  skipped {kind}/{mode} S={s} G={g}: {why}")
                    skipped.append({"model": kind, "loader": mode, "scenes_per_batch": s, "grasps_per_scene": g,
                                    "why": why})  # fmt: skip
                    continue
                rate = throughput(cfg, steps=large_steps if kind == "large" else steps, warmup=warmup)
                rows.append(
                    {
                        "model": kind,
                        "loader": mode,
                        "device": str(dev),
                        "scenes_per_batch": s,
                        "grasps_per_scene": g,
                        "samples_per_s": rate,
                        "amp": amp,
                        "channels_last": channels_last,
                        "compile": compile_model,
                        "shuffle_window": shuffle_window,
                    }
                )
    columns = [("model", "<6"), ("loader", "<6"), ("S", ">4"), ("G", ">3"), ("samples/s", ">10,.0f")]
    keys = ("model", "loader", "scenes_per_batch", "grasps_per_scene", "samples_per_s")
    for line in format_table(columns, [[r[k] for k in keys] for r in rows]):
        click.echo(line)
    for kind in models.split(","):
        for mode in loaders.split(","):
            pick = {
                (r["scenes_per_batch"]): r["samples_per_s"] for r in rows if r["model"] == kind and r["loader"] == mode
            }
            if len(pick) == 2:  # both rows ran
                click.echo(
                    f"  {kind} / {mode}: G=16 trains {pick[8] / pick[128]:.1f} x the samples/s of G=1 (target >= 8)"
                )
    result = {"throughput": rows, "skipped": skipped}
    if not skip_quality:
        ttq = time_to_quality(shards, device, budget_s, val_every, base_channels, dims, lr, shuffle_window)
        result["time_to_quality"] = ttq
        if ttq["g16_s"] is None:
            click.echo(
                f"  time to quality: G=16 did not reach G=1's val MSE {ttq['target_val_mse']:.3f} "
                f"within {budget_s:.0f} s (its final: {ttq['g16_final_val_mse']:.3f})"
            )
        else:
            click.echo(
                f"  time to quality: G=1 reached val MSE {ttq['target_val_mse']:.3f} in {ttq['g1_s']:.0f} s; "
                f"G=16 reached it in {ttq['g16_s']:.0f} s = {ttq['g16_s'] / ttq['g1_s']:.2f} x (target <= 0.33)"
            )
    if json_path:
        _write_json(json_path, result)


if __name__ == "__main__":
    main()
