"""Compare the two loader modes: the same fit, once with `cache` and once with `dali`.

Each fit runs in its own process (so peak memory is its own) for the same number of steps;
compare.json and compare.png hold time to first batch, steady-state samples/s, data-wait
fraction, peak memory and both loss curves. With identical batches the curves coincide.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from gq.common.files import check_writable
from gq.common.ownership import check_replaceable, lock_path, write_record
from gq.common.table import format_table
from gq.pipeline import MODES

from .config import ConfigError, FitConfig
from .files import write_atomically
from .plots import plot_compare
from .rundir import RunDir, replaceable_run
from .step import TrainError

LOADERS = MODES
OUTPUTS = (*LOADERS, "compare.json", "compare.png")  # all that compare writes into --out: its ownership record
TOOL = "compare"


def _child(send: Connection, fn: Callable, args: tuple) -> None:
    """In the child: run fn(*args) and send back ("ok", result) or ("error", one-line message)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        send.send(("ok", fn(*args)))
    except (ValueError, RuntimeError) as err:  # the CLI's own error types all derive from these
        send.send(("error", str(err)))


def in_child(fn: Callable, *args: Any) -> Any:
    """fn(*args) in a fresh (spawned) process, so its peak memory and CUDA context are its own; its result
    (picklable) comes back through a pipe. A failure in the child is a RuntimeError here with its message."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, fn, args))
    child.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:  # the child died without a word (killed, out of memory)
        status, value = "error", None
    child.join()
    if status != "ok":
        raise RuntimeError(value or f"the child process exited with code {child.exitcode}")
    return value


def _fit_and_rows(options: dict) -> tuple[dict, list[dict]]:
    """One loader's run: its summary and its training and validation rows (for the curves)."""
    from .recipe import fit

    summary = fit(FitConfig.from_dict(options))
    rows = RunDir(Path(options["out"]), writer=False).rows()
    return summary, [r for r in rows if "train_mse" in r or "val_mse" in r]


def compare(base: FitConfig, out: Path) -> dict:
    """Run `base` with each loader into out/<loader>; returns the comparison table."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory; choose a directory for the runs")
    # Each run folder is fit's own (its record; fit --overwrite clears it) and so is its lock beside it; compare
    # owns the rest. Anything else, or a folder without a record, is refused untouched.
    check_replaceable(out, tool=TOOL, overwrite=True, ignore=[lock_path(out / name).name for name in LOADERS])
    for loader in LOADERS:  # every run folder checked before anything is changed: no comparison of two runs' mix
        replaceable_run(out / loader, overwrite=base.overwrite)
    check_writable(out, flag="--out")
    out.mkdir(parents=True, exist_ok=True)
    write_record(out, tool=TOOL, entries=OUTPUTS)
    runs, table = {}, {}
    for loader in LOADERS:
        cfg = replace(base, loader=loader, out=str(out / loader))
        try:
            summary, runs[loader] = in_child(_fit_and_rows, cfg.to_dict())
        except RuntimeError as err:
            raise TrainError(f"the {loader} run failed: {err}") from None
        table[loader] = {
            k: summary[k]
            for k in (
                "first_batch_s",
                "samples_per_s",
                "data_wait",
                "peak_memory_bytes",
                "peak_memory_kind",
                "steps",
                "val_mse",
                "val_r2",
                "val_mse_mean_baseline",
                "device",
            )
        }
    a, b = ([r["loss"] for r in runs[name] if "loss" in r] for name in LOADERS)
    max_diff = max((abs(x - y) for x, y in zip(a, b)), default=0.0)
    identical = len(a) == len(b) and max_diff == 0.0
    result = {
        "runs": table,
        "loss_curves_identical": identical,
        "max_loss_difference": max_diff,
        "settings": {k: v for k, v in base.to_dict().items() if k not in ("out", "loader")},
    }
    text = json.dumps(result, indent=2) + "\n"
    write_atomically(out / "compare.json", lambda f: f.write(text.encode()))
    plot_compare(
        runs,
        table=table,
        baseline=table["cache"]["val_mse_mean_baseline"],
        path=out / "compare.png",
        title=f"S={base.scenes_per_batch} G={base.grasps_per_sdf}, {table['cache']['steps']} steps, "
        f"{table['cache']['device']}: loss curves {'identical' if identical else 'DIFFER'}",
    )
    return result


def report(result: dict) -> str:
    """compare's table (one row per loader: speed, memory, and how much the model learned against predicting
    the train mean) and its verdict on the loss curves."""
    columns = [("loader", "<8"), ("first batch s", ">13.2f"), ("samples/s", ">11,.0f"), ("data wait", ">10.1%"),
               ("peak memory GB", ">14.2f"), ("val MSE", ">9.4f"), ("mean-predictor MSE", ">18.4f"),
               ("val R2", ">7.3f")]  # fmt: skip
    rows = [
        [name, r["first_batch_s"], r["samples_per_s"], r["data_wait"], r["peak_memory_bytes"] / 1e9, r["val_mse"],
         r["val_mse_mean_baseline"], r["val_r2"]]
        for name, r in result["runs"].items()
    ]  # fmt: skip
    # None: a rate a run of one step does not have (its only step carries start-up and is left out)
    rows = [["-" if value is None else value for value in row] for row in rows]
    lines = format_table(columns, rows, indent="")
    first = next(iter(result["runs"].values()))
    lines.append(
        f"val R2 {first['val_r2']:.3f}: the model's val MSE is {first['val_mse'] / first['val_mse_mean_baseline']:.0%} "
        "of the mean-predictor's (predicting the train mean for every grasp: R2 0)"
    )
    verdict = (
        "loss curves identical step for step (both loaders gave the same batches)"
        if result["loss_curves_identical"]
        else f"loss curves DIFFER (max difference {result['max_loss_difference']:.3g}): the loaders did not give "
        "identical batches"
    )
    return "\n".join(lines + [verdict])
