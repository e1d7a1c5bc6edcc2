#!/usr/bin/env python
"""Benchmark datasets on object storage: whole epochs from a local S3 server through the bounded shard cache.

One run generates scenes, builds a dataset, starts a real S3-compatible server on 127.0.0.1 (moto's, behind
a meter of the bytes it serves: `gq.benchmarks.s3_server`), publishes the dataset there (`gq shards upload`),
and reads whole epochs of one split through each loader:

- from the local dataset (the baseline: no server, nothing downloaded);
- from its URL with the shard cache limited to 100 % and to 25 % of the split's shard bytes;
- and, with `--streaming-python`, MosaicML Streaming (`StreamingDataset(remote=..., local=..., cache_limit=...)`
  through a torch DataLoader) reading an MDS copy of the same scenes from the same server with the same two
  limits of its own split's bytes (`streaming_side.py`, run in Streaming's own Python environment).

Each row: seconds per epoch (the first includes opening the dataset and loader), the split's scenes and grasps
per second over all epochs, and the bytes the server served in each epoch over the split's bytes. Each gq row
runs in a fresh process with a fresh cache folder; each Streaming row in a fresh process of its Python.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import numpy as np
import torch

from gq.benchmarks import streaming_side
from gq.benchmarks.bench_loaders import split_file_bytes, window_and_modes
from gq.benchmarks.s3_server import CONTROL, s3_server
from gq.common.extras import missing_extra
from gq.common.files import write_atomically
from gq.common.options import one_line_errors
from gq.common.table import format_table
from gq.pipeline import (
    DEFAULT_GRASPS_PER_SDF,
    DEFAULT_WINDOW,
    MODES,
    keep_freed_host_memory,
    open_loader,
    resolve_device,
)
from gq.shards import BuildOptions, ShardReader, build_shards
from gq.shards.publish import upload
from gq.shards.remote import RemoteStore
from gq.synth import write_scenes

BUCKET = "gq-bench"
LIMITS = (1.0, 0.25)  # cache limits as shares of the split's bytes; None below: the local dataset
STREAMING_ENV = (
    "python3 -m venv ENV && ENV/bin/pip install mosaicml-streaming boto3 (docs/benchmarks.md, "
    '"Datasets on object storage")'
)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 when there is none)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def measure_gq(
    source: str,
    *,
    loader: str,
    split: str,
    s: int,
    g: int,
    window: int | None,
    device: str,
    epochs: int,
    cache_dir: Path | None,
    cache_limit: int | None,
    stats_url: str,
) -> dict:
    """Whole epochs of one gq loader, timed in the calling process (main runs each row in a fresh one)."""
    keep_freed_host_memory()
    dev = resolve_device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    remote = {} if cache_dir is None else {"cache_dir": cache_dir, "cache_limit": cache_limit}
    rows = []
    start, before = time.perf_counter(), streaming_side.served_bytes(stats_url)
    with open_loader(source, mode=loader, split=split, scenes_per_batch=s, grasps_per_sdf=g, seed=0, device=dev,
                     shuffle_window=window, progress=False, **remote) as batches:  # fmt: skip
        for epoch in range(epochs):
            batches.set_epoch(epoch)
            scenes, grasps = set(), 0
            for batch in batches:
                grasps += batch.num_grasps
                scenes.update(batch.scene_ids.tolist())
            sync()
            now, served = time.perf_counter(), streaming_side.served_bytes(stats_url)
            rows.append({"seconds": now - start, "scenes": len(scenes), "grasps": grasps, "bytes": served - before})
            start, before = now, served
    return {"epochs": rows, "cache_bytes_at_end": folder_bytes(cache_dir) if cache_dir else 0}


def run_streaming(python: str, *args, endpoint: str) -> dict:
    """streaming_side.py ARGS under Streaming's interpreter, pointed at the server; its JSON result."""
    env = {**os.environ, "S3_ENDPOINT_URL": endpoint}  # the variable Streaming's S3 client reads
    done = subprocess.run([python, streaming_side.__file__, *map(str, args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise click.ClickException(f"the Streaming side ({python}) failed with exit status {done.returncode}: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def split_records(shards: Path, split: str) -> dict:
    """What streaming_side.py's `write` reads: per shard of the split, its files and (slot, scene, grasps)."""
    reader = ShardReader(shards)
    index = {k: np.asarray(reader.index[k]) for k in ("scene", "split", "shard", "slot", "num_grasps")}
    chosen = index["split"] == split
    return {
        "grid": reader.layout.grid,
        "dtype": reader.layout.dtype,
        "shards": [
            {
                "sdf": str(reader.sdf_path(k)),
                "labels": str(reader.labels_path(k)),
                **{
                    key: index[col][chosen & (index["shard"] == k)].tolist()
                    for key, col in (("slots", "slot"), ("scenes", "scene"), ("grasps", "num_grasps"))
                },
            }
            for k in reader.split_shards(split).tolist()
        ],
    }


def summarise(row: dict, split_bytes: int) -> dict:
    """A row's totals: epoch seconds, scenes/s and grasps/s over every epoch, downloads over the split's bytes."""
    epochs = row["epochs"]
    seconds = sum(e["seconds"] for e in epochs)
    later = epochs[1:]
    return {
        **row,
        "split_bytes": split_bytes,
        "first_epoch_s": epochs[0]["seconds"],
        "later_epoch_s": float(np.mean([e["seconds"] for e in later])) if later else None,
        "scenes_per_s": sum(e["scenes"] for e in epochs) / seconds,
        "grasps_per_s": sum(e["grasps"] for e in epochs) / seconds,
        "later_grasps_per_s": sum(e["grasps"] for e in later) / sum(e["seconds"] for e in later) if later else None,
        "downloaded_per_split": [e["bytes"] / split_bytes for e in epochs],
        "downloaded_per_epoch_per_split": sum(e["bytes"] for e in epochs) / len(epochs) / split_bytes,
    }


def fastest(tries: list[dict], split_bytes: int) -> dict:
    """The try with the most grasps/s, summarised, with the number of tries (a busy machine only slows a try)."""
    best = max((summarise(t, split_bytes) for t in tries), key=lambda r: r["grasps_per_s"])
    return {**best, "tries": len(tries)}


def _label(limit: float | None) -> str:
    return "local" if limit is None else f"{limit:.0%}"


def _reader(loader: str) -> str:
    return "Streaming" if loader == "streaming" else f"gq {loader}"


def _ratio(row: dict, base: dict | None, key: str) -> str:
    """row[key] / base[key] as text; "-" without a base (or a value) to compare with."""
    return f"{row[key] / base[key]:.2f}" if base is not None and row[key] and base[key] else "-"


def report(rows: list[dict]) -> list[str]:
    """The table, then the figures the issue targets as ratios measured in this run."""
    local = {r["loader"]: r for r in rows if r["limit"] is None}
    columns = [
        ("reader", "<10"), ("cache", ">6"), ("limit", ">9"), ("held at end", ">11"), ("epoch 1", ">8"),
        ("later epochs", ">12"), ("scenes/s", ">9,.0f"), ("grasps/s", ">10,.0f"), ("x local", ">7"),
        ("later x local", ">13"), ("downloaded / split, per epoch", "<29"),
    ]  # fmt: skip
    table = []
    for r in rows:
        base = None if r["limit"] is None else local.get(r["loader"])
        table.append(
            (
                _reader(r["loader"]),
                _label(r["limit"]),
                "-" if r["limit_bytes"] is None else f"{r['limit_bytes'] / 1e6:.2f}MB",
                "-" if r["limit_bytes"] is None else f"{r['cache_bytes_at_end'] / 1e6:.2f}MB",
                f"{r['first_epoch_s']:.2f} s",
                "-" if r["later_epoch_s"] is None else f"{r['later_epoch_s']:.2f} s",
                r["scenes_per_s"],
                r["grasps_per_s"],
                _ratio(r, base, "grasps_per_s"),
                _ratio(r, base, "later_grasps_per_s"),
                " ".join(f"{x:.2f}" for x in r["downloaded_per_split"])
                + f" (mean {r['downloaded_per_epoch_per_split']:.2f})",
            )
        )
    lines = format_table(columns, table)
    quarter = {r["loader"]: r for r in rows if r["limit"] == min(LIMITS)}
    streaming = quarter.pop("streaming", None)
    for loader, r in quarter.items():
        lines.append(
            f"  {_reader(loader)} at a {_label(r['limit'])} cache: downloaded per epoch / split "
            f"{r['downloaded_per_epoch_per_split']:.2f} (target <= 1.05); grasps/s "
            f"{_ratio(r, local.get(loader), 'grasps_per_s')} x local, "
            f"{_ratio(r, local.get(loader), 'later_grasps_per_s')} x in the later epochs (target >= 0.8)"
        )
    if streaming:
        ours = ", ".join(f"{_reader(k)} {_ratio(r, streaming, 'grasps_per_s')} x" for k, r in quarter.items())
        lines.append(
            f"  Streaming at a {_label(streaming['limit'])} cache: downloaded per epoch / split "
            f"{streaming['downloaded_per_epoch_per_split']:.2f}; grasps/s against Streaming's: {ours}"
        )
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--scenes", default=320, show_default=True, help="Generated scenes (80 % of them in train).")
@click.option("--grid", default=32, show_default=True, help="SDF grid size D.")
@click.option("--grasps", default=128, show_default=True, help="Grasps per scene.")
@click.option("--records-per-shard", default=4, show_default=True, help="Scenes per shard file.")
@click.option("--split", default="train", show_default=True)
@click.option("--epochs", default=3, show_default=True, help="Whole epochs per row.")
@click.option("-S", "--scenes-per-batch", default=8, show_default=True, help="Scenes per batch (Streaming's too).")
@click.option("-G", "--grasps-per-sdf", default=DEFAULT_GRASPS_PER_SDF, show_default=True, help="gq: grasps per SDF.")
@click.option("--shuffle-window", default=str(DEFAULT_WINDOW), show_default=True, help="Shards, or 'all'.")
@click.option("--loaders", default=",".join(MODES), show_default=True, help="gq loaders to time (comma-separated).")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option(
    "--streaming-python",
    type=click.Path(exists=True, dir_okay=False),
    help="A Python with mosaicml-streaming and boto3 installed, for the Streaming rows [default: none, no such rows].",
)
@click.option("--streaming-workers", default=2, show_default=True, help="DataLoader workers of the Streaming rows.")
@click.option(
    "--repeat",
    default=1,
    show_default=True,
    help="Run each row this many times, each in a fresh process with an empty cache, and keep the fastest.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the settings and rows here.")
@one_line_errors()  # a limit too small for the loader, a failed download: one line, as from the loaders' commands
def main(
    scenes: int,
    grid: int,
    grasps: int,
    records_per_shard: int,
    split: str,
    epochs: int,
    scenes_per_batch: int,
    grasps_per_sdf: int,
    shuffle_window: str,
    loaders: str,
    device: str,
    streaming_python: str | None,
    streaming_workers: int,
    repeat: int,
    json_path: Path | None,
) -> None:
    """Epochs from a local S3 server through the shard cache at 100 % and 25 %: local dataset, MosaicML Streaming.

    Generates the scenes, builds and publishes the dataset, and starts the server itself (nothing is left
    behind); the Streaming rows need --streaming-python. The split's scenes/s and grasps/s count every epoch,
    its first included, from opening the dataset on; "downloaded / split" is each epoch's bytes served by the
    server over the split's bytes (gq's shard files; for Streaming, its MDS shards).
    """
    logging.basicConfig(level=logging.WARNING)
    window, modes = window_and_modes(shuffle_window, loaders)
    for value, name in ((epochs, "--epochs"), (repeat, "--repeat")):
        if value < 1:
            raise click.BadParameter(f"{value}: at least 1", param_hint=name)
    # The server is moto's (the dev extra) and the client s3fs (the s3 extra): said before any work.
    missing = missing_extra("moto", "dev") or missing_extra("flask", "dev") or missing_extra("s3fs", "s3")
    if missing:
        raise click.UsageError(missing)
    settings = {
        "scenes": scenes, "grid": grid, "grasps_per_scene": grasps, "records_per_shard": records_per_shard,
        "split": split, "epochs": epochs, "scenes_per_batch": scenes_per_batch, "grasps_per_sdf": grasps_per_sdf,
        "shuffle_window": shuffle_window, "device": device, "streaming_workers": streaming_workers,
        "repeat": repeat,
    }  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_remote_") as tmp_name:
        tmp = Path(tmp_name)
        write_scenes(tmp / "scenes", scenes, grasps_per_scene=grasps, grid=grid, seed=0, progress=False,
                     compress=False)  # fmt: skip
        shards = tmp / "shards"
        build_shards(tmp / "scenes", shards, BuildOptions(grid=grid, max_grasps=grasps,
                     records_per_shard=records_per_shard), progress=False)  # fmt: skip
        split_bytes = split_file_bytes(shards, split)
        split_shards = len(ShardReader(shards).split_shards(split))
        with s3_server() as server:
            RemoteStore(f"s3://{BUCKET}").fs.mkdir(BUCKET)
            url = f"s3://{BUCKET}/ds"
            upload(shards, url)
            stats_url = f"{server.endpoint_url}{CONTROL}stats"
            plan = [(None, mode) for mode in modes] + [(limit, mode) for limit in LIMITS for mode in modes]
            for n, (limit, mode) in enumerate(plan):
                click.echo(f"bench_remote: {mode} loader, {_label(limit)} ({n + 1}/{len(plan)})", err=True)
                limit_bytes = None if limit is None else int(limit * split_bytes)
                tries = []
                for t in range(repeat):  # each try a fresh process with an empty cache folder
                    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                        tries.append(pool.submit(
                            measure_gq, str(shards) if limit is None else url, loader=mode, split=split,
                            s=scenes_per_batch, g=grasps_per_sdf, window=window, device=device, epochs=epochs,
                            cache_dir=None if limit is None else tmp / f"cache-{n}-{t}", cache_limit=limit_bytes,
                            stats_url=stats_url,
                        ).result())  # fmt: skip
                rows.append({"loader": mode, "limit": limit, "limit_bytes": limit_bytes,
                             **fastest(tries, split_bytes)})  # fmt: skip
            if streaming_python:
                rows += streaming_rows(streaming_python, shards, split, tmp, server.endpoint_url, stats_url,
                                       settings, window, repeat)  # fmt: skip
    settings["split_bytes"], settings["split_shards"] = split_bytes, split_shards
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    machine = f"{os.cpu_count()}-core {platform.machine()}, {gpu}, Python {platform.python_version()}"
    click.echo(
        f"bench_remote on {machine}: split {split} of {scenes} generated scenes ({grid}^3, {grasps} grasps), "
        f"{split_shards} shards of {records_per_shard}, {split_bytes / 1e6:.1f} MB; {epochs} epochs per row, "
        f"S={scenes_per_batch} G={grasps_per_sdf}, shuffle window {shuffle_window}; from s3:// on 127.0.0.1 (moto)"
        + (f"; each row the fastest of {repeat} tries" if repeat > 1 else "")
    )
    for line in report(rows):
        click.echo(line)
    if not streaming_python:
        click.echo(f"  no Streaming rows: give --streaming-python ENV/bin/python, made by: {STREAMING_ENV}")
    if json_path:
        write_atomically(json_path, json.dumps({"machine": machine, **settings, "rows": rows}, indent=2) + "\n")


def streaming_rows(
    python: str, shards: Path, split: str, tmp: Path, endpoint: str, stats_url: str, settings: dict,
    window: int | None, repeat: int,
) -> list[dict]:  # fmt: skip
    """MosaicML Streaming's rows: the split written as MDS (shards of gq's shard size), uploaded, read per limit."""
    records = tmp / "records.json"
    write_atomically(records, json.dumps(split_records(shards, split)))
    reader = ShardReader(shards)
    shard_bytes = reader.sdf_path(0).stat().st_size + reader.labels_path(0).stat().st_size
    click.echo("bench_remote: writing the MDS copy with Streaming's MDSWriter", err=True)
    mds = run_streaming(python, "write", records, tmp / "mds", f"s3://{BUCKET}/mds", "--size-limit", shard_bytes,
                        endpoint=endpoint)  # fmt: skip
    rps = settings["records_per_shard"]
    block = mds["scenes"] if window is None else window * rps  # gq's shuffle window, in samples
    rows = []
    for n, limit in enumerate(LIMITS):
        click.echo(f"bench_remote: Streaming, {_label(limit)}", err=True)
        limit_bytes = int(limit * mds["bytes"])
        tries = []
        for t in range(repeat):  # each try a fresh process with an empty local folder
            local = tmp / f"streaming-{n}-{t}"
            tries.append(run_streaming(
                python, "read", "--remote", f"s3://{BUCKET}/mds", "--local", local,
                "--cache-limit", limit_bytes, "--batch-size", settings["scenes_per_batch"],
                "--shuffle-block-size", block, "--epochs", settings["epochs"],
                "--workers", settings["streaming_workers"], "--stats-url", stats_url, endpoint=endpoint,
            ))  # fmt: skip
            tries[-1]["cache_bytes_at_end"] = folder_bytes(local)
        rows.append({"loader": "streaming", "limit": limit, "limit_bytes": limit_bytes, "mds_shards": mds["shards"],
                     **fastest(tries, mds["bytes"])})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
