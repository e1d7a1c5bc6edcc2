#!/usr/bin/env python
"""Benchmark whole loader iterations: our cache and DALI loaders against the seed's two ways.

Every row times the same thing: from asking for a batch to having it on the device (CUDA is
synchronised), including the time to first batch from a cold start (opening, loading, building).
The seed baselines are re-created from its README: a DataLoader over per-sample reads of scene.npz
files ("traditional"), and a DataLoader over an in-memory per-sample dataset with the default collate
("GPU-cached"; its start-up loads every scene.npz into memory, as the seed does).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import keep_freed_host_memory, open_loader, resolve_device
from shards import ShardReader

CONFIGS = [(128, 1), (8, 16)]  # (scenes per batch, grasps per scene): 128 grasps per batch each
SEED_BATCH = 128


class SeedNpzDataset(Dataset):
    """The seed's traditional path: one sample per grasp, its scene.npz read on every access."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.index = []
        for s, p in enumerate(paths):
            with np.load(p) as z:
                self.index += [(s, g) for g in range(len(z["scores"]))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        s, g = self.index[i]
        with np.load(self.paths[s]) as z:
            return {"sdf": torch.from_numpy(z["sdf"]), "grasp": torch.from_numpy(z["grasps"][g]),
                    "score": torch.tensor(z["scores"][g])}


class SeedMemoryDataset(Dataset):
    """The seed's "GPU-cached" path: every scene loaded up front, batches still built per sample."""

    def __init__(self, paths: list[Path], device: torch.device):
        sdfs, grasps, scores, scene_of = [], [], [], []
        for s, p in enumerate(paths):
            with np.load(p) as z:
                sdfs.append(torch.from_numpy(z["sdf"]))
                grasps.append(torch.from_numpy(z["grasps"]))
                scores.append(torch.from_numpy(z["scores"]))
                scene_of += [s] * len(z["scores"])
        self.sdf = torch.stack(sdfs).to(device)
        self.grasps = torch.cat(grasps).to(device)
        self.scores = torch.cat(scores).to(device)
        self.scene_of = scene_of

    @property
    def resident_bytes(self) -> int:
        return self.sdf.nbytes + self.grasps.nbytes + self.scores.nbytes

    def __len__(self) -> int:
        return len(self.scene_of)

    def __getitem__(self, i: int) -> dict:
        return {"sdf": self.sdf[self.scene_of[i]], "grasp": self.grasps[i], "score": self.scores[i]}


WARMUP = 5  # batches between the first and the timed ones, so the steady state excludes start-up effects


def _time(make, to_device, count, device: torch.device, batches: int) -> dict:
    """Time to first batch (cold), then `batches` steady-state batches after a short warm-up."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    source = make()
    if len(source) < 1 + WARMUP + batches:
        raise click.UsageError(f"an epoch has {len(source)} batches, fewer than the {1 + WARMUP + batches} timed; "
                               "use a larger dataset or fewer --batches")
    it = iter(source)
    to_device(next(it))
    sync()
    first = time.perf_counter() - start
    for _ in range(WARMUP):
        to_device(next(it))
    sync()
    samples, start = 0, time.perf_counter()
    for _ in range(batches):
        samples += count(to_device(next(it)))
    sync()
    elapsed = time.perf_counter() - start
    return {"source": source, "first_batch_s": first, "batches_per_s": batches / elapsed,
            "samples_per_s": samples / elapsed}


def _seed_batch_to(device: torch.device):
    return lambda b: {k: v.to(device, non_blocking=True) for k, v in b.items()}


def measure(loader: str, shards_dir: Path, paths: list[Path], split: str, s: int, g: int, device: str,
            batches: int, workers: int) -> dict:
    """One row, timed in the calling process (main runs each row in a fresh one)."""
    keep_freed_host_memory()  # the same process setting for every row, seed baselines included
    dev = resolve_device(device)
    if loader in ("cache", "dali"):
        r = _time(lambda: open_loader(shards_dir, loader, split, s, g, seed=0, device=dev, progress=False),
                  lambda b: b, lambda b: b.num_grasps, dev, batches)
        source = r.pop("source")
        resident = source.resident_bytes
        source.close()
    else:
        gen = torch.Generator().manual_seed(0)
        if loader == "seed-npz":
            make = lambda: DataLoader(SeedNpzDataset(paths), batch_size=s, shuffle=True, generator=gen,  # noqa: E731
                                      num_workers=workers)
        else:
            make = lambda: DataLoader(SeedMemoryDataset(paths, dev), batch_size=s, shuffle=True,  # noqa: E731
                                      generator=gen, num_workers=0)
        r = _time(make, _seed_batch_to(dev), lambda b: len(b["score"]), dev, batches)
        source = r.pop("source")
        resident = source.dataset.resident_bytes if loader == "seed-memory" else 0
    return {"loader": loader, "device": str(dev), "scenes_per_batch": s, "grasps_per_scene": g,
            "resident_bytes": resident, **r}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--shards", "shards_dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--seed-scenes", type=click.Path(path_type=Path, file_okay=False),
              help="The scene.npz directory the shards were built from (for the seed baselines).")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--batches", default=100, show_default=True, help="Steady-state batches timed per row.")
@click.option("--split", default="train", show_default=True)
@click.option("--workers", default=os.cpu_count(), show_default=True, help="DataLoader workers of the seed's npz path.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the rows here as JSON.")
def main(shards_dir: Path, seed_scenes: Path | None, device: str, batches: int, split: str, workers: int,
         json_path: Path | None) -> None:
    """Time cache and dali loaders at (S=128,G=1) and (S=8,G=16) against the seed's DataLoaders.

    Every row runs in a fresh process, so each time to first batch is a cold start of that loader
    (with the files in the page cache) and no row inherits another's memory state.
    """
    logging.basicConfig(level=logging.WARNING)
    plan = [(mode, s, g) for mode in ("cache", "dali") for s, g in CONFIGS]
    paths: list[Path] = []
    if seed_scenes:
        reader = ShardReader(shards_dir)
        paths = [seed_scenes / n / "scene.npz" for n in reader.column("name", reader.split_scenes(split))]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise click.UsageError(f"--seed-scenes {seed_scenes}: {missing[0]} is missing; point it at the "
                                   "directory the shards were built from")
        plan += [("seed-npz", SEED_BATCH, 1), ("seed-memory", SEED_BATCH, 1)]
    rows = []
    for loader, s, g in plan:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(measure, loader, shards_dir, paths, split, s, g, device, batches, workers).result())
    dev = rows[0]["device"]

    base = {row["loader"]: row for row in rows if row["loader"].startswith("seed")}
    click.echo(f"bench_loaders: {shards_dir} split {split}, device {dev}, {batches} steady-state batches per row, "
               "each row in a fresh process")
    click.echo(f"  {'loader':<12} {'S':>4} {'G':>3} {'first batch':>12} {'batches/s':>10} {'samples/s':>10} "
               f"{'resident':>10}  {'samples/s x seed-memory':>23} {'x seed-npz':>10} {'first batch x seed-memory':>25}")
    for row in rows:
        ratio = {k: (f"{row['samples_per_s'] / base[k]['samples_per_s']:.1f}" if k in base else "-")
                 for k in ("seed-memory", "seed-npz")}
        first = (f"{base['seed-memory']['first_batch_s'] / row['first_batch_s']:.1f}" if "seed-memory" in base
                 else "-")
        click.echo(f"  {row['loader']:<12} {row['scenes_per_batch']:>4} {row['grasps_per_scene']:>3} "
                   f"{row['first_batch_s']:>10.3f} s {row['batches_per_s']:>10.1f} {row['samples_per_s']:>10,.0f} "
                   f"{row['resident_bytes'] / 1e6:>8.1f}MB  {ratio['seed-memory']:>23} {ratio['seed-npz']:>10} "
                   f"{first:>25}")
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
