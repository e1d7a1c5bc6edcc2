#!/usr/bin/env python
"""Benchmark scale-out: training samples/s on 1, 2, 4 ... CPU ranks (gloo, torchrun), both loaders.

Each row is the real trainer (`fit`) started by torchrun with that many ranks on one dataset, for the
same number of steps at the same S and G per rank. Its samples/s are the job's (all ranks' samples over
the slowest rank's training time, the first step left out), so samples/s per rank is that divided by
the ranks, and the scaling efficiency is a row's samples/s per rank over the one-rank row's of the same
loader, measured in the same invocation (with --repeat, each row's best run: on a shared machine the
slowest runs measure the other load). On one machine the ranks share its cores (each rank gets
--threads): the figures then show what the data path and gloo's all-reduce cost, not what more
machines would give.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import torch

from gq.common.files import write_atomically
from gq.common.table import format_table
from gq.pipeline import MODES
from gq.train import run as fit_script


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: comma-separated numbers, e.g. 1,2,4", param_hint=what) from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: numbers of at least 1", param_hint=what)
    return values


def run_fit(shards: Path, *, out: Path, ranks: int, loader: str, flags: list[str], timeout: float) -> dict:
    """One `fit` job of `ranks` CPU processes under torchrun; its summary.json."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
        fit_script.__file__, "fit", "--shards", str(shards), "--out", str(out), "--loader", loader, "--device", "cpu",
        "--quiet", "--overwrite", *flags,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise click.ClickException(f"fit on {ranks} ranks with the {loader} loader failed ({done.returncode}): {last}")
    return json.loads((out / "summary.json").read_text())


def scaling(rows: list[dict]) -> list[dict]:
    """Add samples/s per rank and the efficiency against the same loader's one-rank row."""
    base = {r["loader"]: r["samples_per_s"] for r in rows if r["ranks"] == 1}
    for r in rows:
        r["samples_per_s_per_rank"] = r["samples_per_s"] / r["ranks"]
        one = base.get(r["loader"])
        r["efficiency"] = r["samples_per_s_per_rank"] / one if one else None
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--shards", required=True, type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--ranks", default="1,2,4", show_default=True, help="Comma-separated numbers of CPU ranks (1 first).")
@click.option("--loaders", default=",".join(MODES), show_default=True, help="Comma-separated loader modes.")
@click.option("--steps", default=40, show_default=True, help="Training steps per run (the first is not timed).")
@click.option("-S", "--scenes-per-batch", default=8, show_default=True, help="SDFs per batch, per rank.")
@click.option("-G", "--grasps-per-sdf", default=16, show_default=True, help="Grasps per SDF per batch.")
@click.option("--threads", default=1, show_default=True, help="torch threads per rank.")
@click.option("--base-channels", default=8, show_default=True)
@click.option("--fc-dims", default="256,128,64", show_default=True)
@click.option("--repeat", default=1, show_default=True, help="Runs per row; the row reports the fastest.")
@click.option("--timeout", default=1800.0, show_default=True, help="Seconds one run may take.")
@click.option("--json", "json_path", type=click.Path(path_type=Path))
def main(
    shards: Path,
    ranks: str,
    loaders: str,
    steps: int,
    scenes_per_batch: int,
    grasps_per_sdf: int,
    threads: int,
    base_channels: int,
    fc_dims: str,
    repeat: int,
    timeout: float,
    json_path: Path | None,
) -> None:
    """Samples/s per rank and scaling efficiency on 1, 2, 4 CPU ranks under torchrun, for each loader."""
    if repeat < 1:
        raise click.BadParameter(f"{repeat}: at least 1", param_hint="--repeat")
    worlds = _ints(ranks, "--ranks")
    if worlds[0] != 1:
        raise click.BadParameter(f"{ranks!r}: start with 1, the baseline of the efficiency", param_hint="--ranks")
    modes = loaders.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: choose from {', '.join(MODES)}", param_hint="--loaders")
    flags = ["--max-steps", str(steps), "-S", str(scenes_per_batch), "-G", str(grasps_per_sdf),
             "--threads", str(threads), "--base-channels", str(base_channels), "--fc-dims", fc_dims,
             "--early-stopping", "0", "--log-every", str(steps)]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        for loader in modes:
            for world in worlds:
                runs = [
                    run_fit(shards, out=Path(tmp) / f"{loader}-{world}", ranks=world, loader=loader, flags=flags,
                            timeout=timeout)
                    for _ in range(repeat)
                ]  # fmt: skip
                summary = max(runs, key=lambda r: r["samples_per_s"])
                rows.append(
                    {
                        "loader": loader,
                        "ranks": world,
                        "samples_per_s": summary["samples_per_s"],
                        "data_wait": summary["data_wait"],
                        "steps": summary["steps"],
                    }
                )
    rows = scaling(rows)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    machine = (
        f"{os.cpu_count()}-core {platform.machine()}, {ram:.0f} GiB, {gpu} (the ranks run on the CPU), "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
    click.echo(
        f"scale-out on {machine}: {steps} steps of S={scenes_per_batch} x G={grasps_per_sdf} per rank, "
        f"{threads} thread(s) per rank, gloo" + (f", best of {repeat} runs per row" if repeat > 1 else "")
    )
    columns = [("loader", "<6"), ("ranks", ">5"), ("samples/s", ">10,.0f"), ("per rank", ">9,.0f"),
               ("efficiency", ">10.2f"), ("data wait", ">9.1%")]  # fmt: skip
    keys = ["loader", "ranks", "samples_per_s", "samples_per_s_per_rank", "efficiency", "data_wait"]
    for line in format_table(columns, [["-" if r[k] is None else r[k] for k in keys] for r in rows]):
        click.echo(line)
    if json_path is not None:
        result = {"machine": machine, "steps": steps, "repeat": repeat, "scenes_per_batch": scenes_per_batch,
                  "grasps_per_scene": grasps_per_sdf, "threads_per_rank": threads, "rows": rows}  # fmt: skip
        write_atomically(json_path, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
