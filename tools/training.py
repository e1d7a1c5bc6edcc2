"""The training commands: gq fit, compare, eval, predict (click over the gq.train library).

gq fit --shards DIR --out RUN_DIR [options]
gq fit --config FILE.yaml [options]            (flags given override the file)
gq fit --out RUN_DIR --resume [--max-steps N]   (the run's own options)
gq compare --shards DIR --out DIR [fit options]
gq eval CKPT --shards DIR [--split test|val]
gq predict CKPT (--scenes DIR | --shards DIR --split S | --mesh OBJ --grasps G.npy) --out F.parquet
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from gq.common.errors import UsageError
from gq.common.options import click_options, one_line_errors
from gq.common.table import format_table
from gq.meshes import OPEN_MESH_MODES, SDF_BACKENDS
from gq.pipeline import MODES
from gq.shards import SPLITS
from gq.train import evaluate_checkpoint, fit
from gq.train.compare import compare as run_compare
from gq.train.compare import report
from gq.train.config import DEVICES, RENAMED, FitConfig, renamed_flags, resolve_config
from gq.train.distributed import is_main_rank
from gq.train.predict import PredictError


def plural(n: int, noun: str) -> str:
    """'1 object', '2 objects', '1,024 predictions'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _errors(fn):
    """Known failures (every GQError: config, data, checkpoint, a failed write) end with one line, not a traceback."""
    return one_line_errors()(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train and evaluate grasp-quality estimators on shard datasets."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


# Given on the command line (or through an environment variable click reads), not left at their defaults.
EXPLICIT = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _old_flags(fn):
    """fit's and compare's old flags (FitConfig's RENAMED options), hidden: still read, with a deprecation note."""
    for old, new in RENAMED.items():
        old_help = f"Old name of --{new.replace('_', '-')} (deprecated)."
        fn = click.option("--" + old.replace("_", "-"), old, type=int, hidden=True, help=old_help)(fn)
    return fn


def _given(options: dict) -> dict:
    """The options given on the command line (not left at their defaults); old flags by their old names."""
    ctx = click.get_current_context()
    return {name: value for name, value in options.items() if ctx.get_parameter_source(name) in EXPLICIT}


# --cache-dir and --cache-limit of the commands that read a dataset without training (eval, predict): fit's own.
_cache_options = click_options(FitConfig, only=("cache_dir", "cache_limit"))


# Every fit and compare option comes from FitConfig's fields (help text, type, default, choices live there).
@cli.command("fit")
@click_options(
    FitConfig,
    defaults={"shards": None, "out": None},  # required, but may come from --config or the run resumed
    help={
        "shards": "Shard dataset directory or URL; several (--shards A --shards B) train on their mixture "
        "(docs/mixing.md) [required, unless --config or the run resumed gives it].",
        "out": "Run directory [required, unless --config gives it].",
    },
)
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
    help="YAML or JSON file of options (a run's config.json too); flags given override it.",
)  # fmt: skip
@click.option("--print-config", is_flag=True, help="Print the resolved options as JSON and exit without training.")
@_old_flags
@click.option(
    "--nproc-per-node", type=click.IntRange(min=1), default=None,
    help="Train on N processes of this machine (one per GPU): starts torchrun --standalone itself. Several "
    "machines: run torchrun on each (docs/scale-out.md).",
)  # fmt: skip
@_errors
def fit_cmd(config_file: Path | None, print_config: bool, nproc_per_node: int | None, **options) -> None:
    """Train a model; writes config.json, metrics.jsonl, last.pt, best.pt, summary.json, curves.png.

    Options come from the defaults, then --config FILE, then the flags given. `--out RUN --resume`
    continues a run with its own options (RUN/config.json); flags given with it must agree with the run,
    except those that do not change what is computed (--max-steps, --max-time, --epochs, --log-every, ...).
    """
    ctx = click.get_current_context()
    if nproc_per_node and nproc_per_node > 1 and not print_config:
        start_torchrun(ctx, nproc_per_node)
    cfg = resolve_config(_given(options), config_file=config_file)
    if print_config:
        cfg.check()
        click.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    summary = fit(cfg)
    if is_main_rank():  # under torchrun, rank 0 speaks for the job
        click.echo(fit_line(summary, cfg.out))


def start_torchrun(ctx: click.Context, nproc: int) -> None:
    """Replace this process by a single-node torchrun of `nproc` workers running this fit (as torchtune's
    `tune run --nproc_per_node`): `python -m torch.distributed.run --standalone --nproc-per-node N -m
    gq.tools.cli fit OPTIONS`, the options given here spelled back (all but --nproc-per-node)."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ:
        raise UsageError("--nproc-per-node: already running under torchrun; give torchrun's --nproc-per-node only")
    args = []
    for param in ctx.command.params:
        if param.name == "nproc_per_node" or ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Option) and param.is_flag:
            args += [param.opts[0]] if value else param.secondary_opts[:1]
        elif isinstance(param, click.Option) and param.multiple:  # --shards A --shards B
            args += [arg for v in value for arg in (param.opts[0], str(v))]
        else:
            args += [param.opts[0], ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *launcher, "-m", "gq.tools.cli", "fit", *args])


def fit_line(summary: dict, out: str) -> str:
    """fit's last line: steps and why it stopped, the rate, the last and the best validation (or that none ran)."""
    val = " ".join(
        f"{k[4:]} {summary[k]:.4f}"
        for k in ("val_mse", "val_mae", "val_r2", "val_spearman")
        if isinstance(summary.get(k), float)
    )
    rate = summary["samples_per_s"]  # None: no step was timed here (one step, or a run that had ended)
    stopped = f"stopped by {summary['signal']}" if summary.get("signal") else summary["stopped"]
    if math.isfinite(summary["best_val_mse"]):
        validated = f"val {val}; best val MSE {summary['best_val_mse']:.4f} at step {summary['best_step']}"
    else:  # stopped before its first validation
        validated = "no validation ran"
    return (
        f"fit: {summary['steps']} steps ({stopped}), "
        f"{'no steady-state rate' if rate is None else f'{rate:,.0f} samples/s'}; {validated}; "
        f"outputs in {out} (curves.png)"
    )


@cli.command("compare")
@click_options(
    FitConfig,
    exclude=("loader", "resume"),  # it runs each loader, each from scratch
    defaults={"max_steps": 100},  # a fixed budget: the comparison is about the loaders, not convergence
    help={"out": "Directory for both runs.", "overwrite": "Replace earlier runs in --out."},
)
@_old_flags
@_errors
def compare_cmd(**options) -> None:
    """Run fit with each loader (cache, dali) on identical settings; writes compare.json and compare.png."""
    out = Path(options["out"])
    defaults = {name: value for name, value in options.items() if name not in RENAMED}
    result = run_compare(FitConfig(**{**defaults, **renamed_flags(_given(options))}), out)
    click.echo(report(result))
    click.echo(f"plot: {out / 'compare.png'}  table: {out / 'compare.json'}")


@cli.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--shards", required=True, help="Shard dataset directory, or its URL (s3://bucket/prefix, ...).")
@_cache_options
@click.option(
    "--split", type=click.Choice(SPLITS), default="test", show_default=True,
    help="test: held out, how good a finished model is; val: what training chose its best.pt by (biased upward); "
    "train is refused (the model was fitted on it).",
)  # fmt: skip
@click.option(
    "--loader", type=click.Choice(MODES), default="cache", show_default=True,
    help="Full cache in memory, or DALI streaming of whole shards (same metrics).",
)  # fmt: skip
@click.option(
    "--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="auto: CUDA when present, else CPU."
)
@click.option(
    "--scenes-per-batch", default=8, show_default=True, help="SDFs per batch (each with all its grasps); memory only."
)
@_errors
def eval_cmd(checkpoint: Path, **options) -> None:
    """Metrics of CHECKPOINT (ours, or a seed state_dict) on a split, as JSON on stdout."""
    if options["split"] == "train":  # a choice for click, so that it reaches this one line rather than a usage error
        raise UsageError(
            "--split train: the model was fitted on the train split, so it does not measure it; "
            "use --split test (held out) or --split val"
        )
    metrics = evaluate_checkpoint(checkpoint, **options, warn=lambda line: click.echo(line, err=True))
    click.echo(json.dumps({"checkpoint": str(checkpoint), "split": options["split"], **metrics}, indent=2))


@cli.command("predict")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--scenes", type=click.Path(path_type=Path), help="Processed directory: <scene>/scene.npz (scores optional)."
)
@click.option("--shards", help="Shard dataset directory or URL (with --split).")
@_cache_options
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
    type=click.Choice(OPEN_MESH_MODES),
    default="refuse",
    show_default=True,
    help="With --mesh: how to sign a mesh that is not closed.",
)
@click.option(
    "--sdf-backend",
    type=click.Choice(SDF_BACKENDS),
    default="mesh2sdf",
    show_default=True,
    help="With --mesh: the SDF backend (as gq import-meshes made the training data).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Parquet file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (only a Parquet file).")
@click.option("--top-k", default=5, show_default=True, help="Best grasps per object to print.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@_errors
def predict_cmd(
    checkpoint: Path,
    scenes: Path | None,
    shards: str | None,
    cache_dir: str | None,
    cache_limit: str | None,
    split: str,
    mesh: Path | None,
    grasps: Path | None,
    mesh_max_extent: float | None,
    open_meshes: str,
    sdf_backend: str,
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
        check_out,
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
    check_out(
        out, overwrite=overwrite
    )  # before any work: a folder to write in; only a predictions file of ours replaced
    estimator = Estimator.load(checkpoint, device)
    if scenes:
        predictions = predict_scenes(estimator, scenes, progress=sys.stderr.isatty())
    elif shards:
        predictions = predict_shards(estimator, shards, split=split, cache_dir=cache_dir, cache_limit=cache_limit)
    else:
        predictions = predict_mesh(
            estimator,
            mesh,
            grasps_path=grasps,
            mesh_max_extent=mesh_max_extent,
            open_meshes=open_meshes,
            sdf_backend=sdf_backend,
        )
    write_parquet(predictions, out)
    columns = [("scene", "<24"), ("rank", ">4"), ("grasp", ">6"), ("prediction", ">11.4f"), ("score", ">9.4f")]
    rows = best_grasps(predictions, top_k)
    if all(math.isnan(row[-1]) for row in rows):  # no true scores (a mesh, unlabelled scenes): no column
        columns, rows = columns[:-1], [row[:-1] for row in rows]
    else:  # some unknown: "-" where a score is unknown
        rows = [(*row[:-1], "-" if math.isnan(row[-1]) else row[-1]) for row in rows]
    for line in format_table(columns, rows, indent=""):
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
        click.echo(f"per object: {values}  ({plural(metrics['scenes'], 'object')})")
    objects = plural(len(set(predictions.scene)), "object")
    click.echo(f"wrote {plural(len(predictions.grasp), 'prediction')} of {objects} to {out}")
