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

from gq.common.files import write_atomically
from gq.common.table import format_table
from gq.pipeline import (
    AUGMENTS,
    DEFAULT_WINDOW,
    MODES,
    EpochIndex,
    PlanSpec,
    keep_freed_host_memory,
    open_dataset,
    open_loader,
    parse_window,
    resolve_device,
)
from gq.pipeline.cache import CacheLoader
from gq.shards import ShardReader

CONFIGS = [(128, 1), (8, 16)]  # (scenes per batch, grasps per scene): 128 grasps per batch each
SEED_BATCH = 128
GATHER_BLOCKS = 10  # the gather comparison alternates the two gathers in this many blocks of batches each


class TwoPassCacheLoader(CacheLoader):
    """The cache loader gathering SDFs as it did before: an index_select in the shard dtype, then `.float()`.

    Kept here only, as the baseline the one-pass gather (pipeline/base.py `_gather_sdf`) is measured against.
    """

    def _gather_sdf(self, idx: EpochIndex, g0: int, g1: int) -> torch.Tensor:
        return self.sdf.index_select(0, idx.rows[g0:g1]).unsqueeze(1).float()


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
            return {
                "sdf": torch.from_numpy(z["sdf"]),
                "grasp": torch.from_numpy(z["grasps"][g]),
                "score": torch.tensor(z["scores"][g]),
            }


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
        raise click.UsageError(
            f"an epoch has {len(source)} batches, fewer than the {1 + WARMUP + batches} timed; "
            "use a larger dataset or fewer --batches"
        )
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
    return {
        "source": source,
        "iterator": it,
        "first_batch_s": first,
        "batches_per_s": batches / elapsed,
        "samples_per_s": samples / elapsed,
    }


def measure_gather(shards_dir: Path, split: str, s: int, g: int, device: str, batches: int, window: int | None) -> dict:
    """The cache loader's one-pass SDF gather against its former two-pass one, in one process over the same plan.

    The two loaders yield the same batches; they take turns, `batches / GATHER_BLOCKS` batches at a time, so
    whatever else runs on the machine slows both alike. Each one's figure is its fastest block (a noisy machine
    only slows); the median of the per-block ratios is given too. A third turn only writes zeros to a fresh
    float32 batch of the same shape: the floor of any gather that hands out float32 SDFs (`write_floor`).
    """
    keep_freed_host_memory()
    dev = resolve_device(device)
    dataset = open_dataset(shards_dir)
    spec = PlanSpec(s, g, window=window)
    loaders = {
        "one_pass": CacheLoader(dataset, split=split, spec=spec, device=dev, progress=False),
        "two_pass": TwoPassCacheLoader(dataset, split=split, spec=spec, device=dev, progress=False),
    }
    per_block = max(1, batches // GATHER_BLOCKS)
    if len(loaders["one_pass"]) < WARMUP + GATHER_BLOCKS * per_block:
        raise click.UsageError(f"an epoch has {len(loaders['one_pass'])} batches, too few for the gather comparison")
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    batches_of = {name: iter(loader) for name, loader in loaders.items()}
    for it in batches_of.values():
        for _ in range(WARMUP):
            next(it)
    shape = (s, 1) + (loaders["one_pass"].grid,) * 3
    batches_of["write_floor"] = iter(lambda: torch.zeros(shape, device=dev), None)
    times: dict[str, list[float]] = {name: [] for name in batches_of}
    samples = []
    for _ in range(GATHER_BLOCKS):
        count = 0
        for name, it in batches_of.items():
            sync()
            start = time.perf_counter()
            for _ in range(per_block):
                batch = next(it)
                count += batch.num_grasps if name == "one_pass" else 0
            sync()
            times[name].append(time.perf_counter() - start)
        samples.append(count)  # the same batches for both loaders
    for loader in loaders.values():
        loader.close()
    best = {name: max(n / t for n, t in zip(samples, ts)) for name, ts in times.items()}
    return {
        "loader": "gather",
        "device": str(dev),
        "scenes_per_batch": s,
        "grasps_per_scene": g,
        "one_pass_samples_per_s": best["one_pass"],
        "two_pass_samples_per_s": best["two_pass"],
        "write_floor_samples_per_s": best["write_floor"],
        "ratio": best["one_pass"] / best["two_pass"],
        "median_block_ratio": float(np.median(np.array(times["two_pass"]) / np.array(times["one_pass"]))),
        "blocks": GATHER_BLOCKS,
        "batches_per_block": per_block,
        "threads": torch.get_num_threads(),
    }


def _seed_batch_to(device: torch.device):
    return lambda b: {k: v.to(device, non_blocking=True) for k, v in b.items()}


def _bytes_read() -> int:
    """Bytes this process has passed through read() so far (page-cache hits included): /proc/self/io rchar."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def window_and_modes(shuffle_window: str, loaders: str) -> tuple[int | None, list[str]]:
    """--shuffle-window and --loaders (comma-separated modes) of a loader benchmark, checked as click options."""
    try:
        window = parse_window(shuffle_window)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--shuffle-window") from None
    modes = loaders.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise click.BadParameter(f"{unknown[0]}: choose among {', '.join(MODES)}", param_hint="--loaders")
    return window, modes


def split_file_bytes(shards_dir: Path, split: str) -> int:
    """Bytes of the split's shard files on disk (SDF and labels files, headers and padding included)."""
    reader = ShardReader(shards_dir)
    return sum(
        reader.sdf_path(k).stat().st_size + reader.labels_path(k).stat().st_size for k in reader.split_shards(split)
    )


def _epoch_bytes(source, it, epochs: int = 4) -> dict:
    """Finish the timed epoch, then count the bytes read per epoch in the steady state: from the first
    batch of epoch 1 to the first batch of epoch 1 + `epochs`, over `epochs` (a streaming reader's
    read-ahead then counts once at each end, as it should)."""
    for _ in it:
        pass
    marks = []
    for epoch in range(1, epochs + 2):
        source.set_epoch(epoch)
        batches = iter(source)
        next(batches)
        marks.append(_bytes_read())
        if epoch <= epochs:
            for _ in batches:
                pass
    return {"bytes_read_per_epoch": (marks[-1] - marks[0]) / epochs, "epochs_counted": epochs}


def measure(
    loader: str,
    shards_dir: Path,
    paths: list[Path],
    split: str,
    s: int,
    g: int,
    device: str,
    batches: int,
    workers: int,
    window: int | None,
    rank: int = 0,
    world_size: int = 1,
    whole_epoch: bool = False,
    augment: str = "off",
) -> dict:
    """One row, timed in the calling process (main runs each row in a fresh one).

    `whole_epoch`: then read whole epochs and count the bytes read per epoch (`bytes_read_per_epoch`,
    against the split's shard files: `split_bytes`).
    """
    keep_freed_host_memory()  # the same process setting for every row, seed baselines included
    dev = resolve_device(device)
    extra = {}
    if loader in MODES:
        make = lambda: open_loader(  # noqa: E731
            shards_dir,
            mode=loader,
            split=split,
            scenes_per_batch=s,
            grasps_per_sdf=g,
            seed=0,
            device=dev,
            rank=rank,
            world_size=world_size,
            shuffle_window=window,
            progress=False,
            augment=augment,
        )
        r = _time(
            make,
            lambda b: b,
            lambda b: b.num_grasps,
            dev,
            batches,
        )
        source = r.pop("source")
        it = r.pop("iterator")
        if whole_epoch:
            extra = {**_epoch_bytes(source, it), "split_bytes": split_file_bytes(shards_dir, split)}
        resident = source.resident_bytes
        extra.update(
            load_s=getattr(source, "load_s", None),
            check_s=getattr(source, "check_s", None),
            rank=rank,
            world_size=world_size,
            shuffle_window=window or "all",
            augment=augment,
        )
        source.close()
    else:
        gen = torch.Generator().manual_seed(0)
        if loader == "seed-npz":
            make = lambda: DataLoader(
                SeedNpzDataset(paths),
                batch_size=s,
                shuffle=True,
                generator=gen,  # noqa: E731
                num_workers=workers,
            )
        else:
            make = lambda: DataLoader(
                SeedMemoryDataset(paths, dev),
                batch_size=s,
                shuffle=True,  # noqa: E731
                generator=gen,
                num_workers=0,
            )
        r = _time(make, _seed_batch_to(dev), lambda b: len(b["score"]), dev, batches)
        source = r.pop("source")
        r.pop("iterator")
        resident = source.dataset.resident_bytes if loader == "seed-memory" else 0
    return {
        "loader": loader,
        "device": str(dev),
        "scenes_per_batch": s,
        "grasps_per_scene": g,
        "resident_bytes": resident,
        **r,
        **extra,
    }


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _summary(rows: list[dict]) -> list[str]:
    """The figures the streaming issue targets, each as a ratio measured in this run."""
    pick = {
        (r["loader"], r["scenes_per_batch"], r["grasps_per_scene"], r.get("world_size", 1), r.get("rank", 0)): r
        for r in rows
    }
    lines = []
    for s, g in CONFIGS:
        cache, dali = pick.get(("cache", s, g, 1, 0)), pick.get(("dali", s, g, 1, 0))
        if cache and dali:
            lines.append(
                f"dali / cache samples/s at S={s} G={g}: {_ratio(dali['samples_per_s'], cache['samples_per_s'])} "
                "(target >= 0.8)"
            )
    epoch = next((r for r in rows if "bytes_read_per_epoch" in r), None)
    if epoch:
        read = epoch["bytes_read_per_epoch"]
        lines.append(
            f"dali bytes read per epoch / the split's shard files: {_ratio(read, epoch['split_bytes'])} "
            f"({read / 1e6:,.1f} MB of {epoch['split_bytes'] / 1e6:,.1f} MB, mean of "
            f"{epoch['epochs_counted']} epochs; target <= 1.05)"
        )
    for row in rows:
        if row["loader"] == "gather":
            target = ">= 2" if row["scenes_per_batch"] == 128 else ">= 1, no loss"
            floor = row["write_floor_samples_per_s"] / row["two_pass_samples_per_s"]
            lines.append(
                f"cache one-pass / two-pass SDF gather samples/s at S={row['scenes_per_batch']} "
                f"G={row['grasps_per_scene']}: {row['ratio']:.2f} (median of {row['blocks']} alternating blocks "
                f"{row['median_block_ratio']:.2f}; {row['one_pass_samples_per_s']:,.0f} against "
                f"{row['two_pass_samples_per_s']:,.0f}, {row['threads']} torch thread(s); target {target}); "
                f"writing the float32 batch alone: {floor:.2f} x two-pass"
            )
    cache = pick.get(("cache", 8, 16, 1, 0))
    if cache and cache.get("load_s"):
        lines.append(
            f"cache record checks: {cache['check_s']:.3f} s of CPU beside a {cache['load_s']:.3f} s load = "
            f"{_ratio(cache['check_s'], cache['load_s'])} (target <= 0.15)"
        )
    seed = pick.get(("seed-memory", SEED_BATCH, 1, 1, 0))
    if cache and seed:
        lines.append(
            f"cache time to first batch (checks included) vs seed-memory start-up: "
            f"{_ratio(seed['first_batch_s'], cache['first_batch_s'])} x faster (target >= 5)"
        )
    ranks = [r for r in rows if r.get("world_size", 1) > 1]
    if cache and ranks:
        worst = max(r["resident_bytes"] for r in ranks)
        lines.append(
            f"cache resident per rank with {ranks[0]['world_size']} ranks / one rank: "
            f"{_ratio(worst, cache['resident_bytes'])} (largest rank; target <= 0.55)"
        )
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--shards", "shards_dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--seed-scenes",
    type=click.Path(path_type=Path, file_okay=False),
    help="The scene.npz directory the shards were built from (for the seed baselines).",
)
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--batches", default=100, show_default=True, help="Steady-state batches timed per row.")
@click.option(
    "--repeat",
    default=1,
    show_default=True,
    help="Time each row this many times, each in a fresh process, round the rows, and keep the best (noisy machines).",
)
@click.option("--split", default="train", show_default=True)
@click.option(
    "--shuffle-window",
    default=str(DEFAULT_WINDOW),
    show_default=True,
    help="Shards per shuffle window, or 'all' (both loaders).",
)
@click.option(
    "--loaders",
    default=",".join(MODES),
    show_default=True,
    help="Our loaders to time (comma-separated); 'cache' alone where DALI is not installed.",
)
@click.option(
    "--ranks",
    default=2,
    show_default=True,
    help="Also time the cache as each rank of this many (its resident share); 1: skip.",
)
@click.option(
    "--gather-baseline",
    is_flag=True,
    help="Also compare the cache's one-pass SDF gather with its former two-pass one (index_select, then .float()), "
    "in one process per S, G, taking turns.",
)
@click.option(
    "--augment",
    type=click.Choice(AUGMENTS),
    default="off",
    show_default=True,
    help="Our loaders' augmentation (the baseline rows never augment).",
)
@click.option("--workers", default=os.cpu_count(), show_default=True, help="DataLoader workers of the seed's npz path.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the rows here as JSON.")
def main(
    shards_dir: Path,
    seed_scenes: Path | None,
    device: str,
    batches: int,
    repeat: int,
    split: str,
    shuffle_window: str,
    loaders: str,
    ranks: int,
    gather_baseline: bool,
    augment: str,
    workers: int,
    json_path: Path | None,
) -> None:
    """Time cache and dali loaders at (S=128,G=1) and (S=8,G=16) against the seed's DataLoaders.

    Every row runs in a fresh process, so each time to first batch is a cold start of that loader
    (with the files in the page cache) and no row inherits another's memory state. The dali row at
    S=8 G=16 then reads whole epochs, counting the bytes read per epoch (/proc/self/io rchar; DALI's
    CPU reader uses plain reads, so every byte it reads is counted).
    """
    logging.basicConfig(level=logging.WARNING)
    window, modes = window_and_modes(shuffle_window, loaders)
    plan = [
        dict(loader=mode, s=s, g=g, whole_epoch=(mode, s) == ("dali", 8), augment=augment)
        for mode in modes
        for s, g in CONFIGS
    ]
    split_shards = len(ShardReader(shards_dir).split_shards(split))
    if "cache" in modes and 1 < ranks <= split_shards:
        plan += [dict(loader="cache", s=8, g=16, rank=r, world_size=ranks) for r in range(ranks)]
    elif ranks > split_shards:
        click.echo(
            f"bench_loaders: no per-rank rows: split {split} has {split_shards} shard(s), fewer than --ranks {ranks}"
        )
    paths: list[Path] = []
    if seed_scenes:
        reader = ShardReader(shards_dir)
        paths = [seed_scenes / n / "scene.npz" for n in reader.column("name", reader.split_scenes(split))]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise click.UsageError(
                f"--seed-scenes {seed_scenes}: {missing[0]} is missing; point it at the "
                "directory the shards were built from"
            )
        plan += [dict(loader="seed-npz", s=SEED_BATCH, g=1), dict(loader="seed-memory", s=SEED_BATCH, g=1)]
    # Each try of each row in a fresh process; the tries go round the rows (row 1, row 2, ..., row 1, ...), so a
    # load that comes and goes on a shared machine touches every row alike, and the best try is each row's figure
    # (a noisy machine only slows).
    tries: list[list[dict]] = [[] for _ in plan]
    for _ in range(repeat):
        for row, found in zip(plan, tries):
            options = {k: v for k, v in row.items() if k not in ("loader", "s", "g")}
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                found.append(
                    pool.submit(
                        measure, row["loader"], shards_dir, paths, split, row["s"], row["g"], device, batches,
                        workers, window, **options,
                    ).result()
                )  # fmt: skip
    rows = [
        {**max(found, key=lambda r: r["samples_per_s"]), "first_batch_s": min(r["first_batch_s"] for r in found),
         "tries": len(found)}
        for found in tries
    ]  # fmt: skip
    gathers = []
    for s, g in CONFIGS if gather_baseline else ():
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            gathers.append(pool.submit(measure_gather, shards_dir, split, s, g, device, batches, window).result())
    dev = rows[0]["device"]

    base = {row["loader"]: row for row in rows if row["loader"].startswith("seed")}
    click.echo(
        f"bench_loaders: {shards_dir} split {split}, device {dev}, shuffle window {shuffle_window}, "
        f"{batches} steady-state batches per row, each row in a fresh process, best of {repeat}"
    )
    columns = [
        ("loader", "<12"),
        ("rank", ">5"),
        ("S", ">4"),
        ("G", ">3"),
        ("first batch", ">12"),
        ("batches/s", ">10.1f"),
        ("samples/s", ">10,.0f"),
        ("resident", ">10"),
        ("samples/s x seed-memory", ">24"),
        ("x seed-npz", ">10"),
        ("first batch x seed-memory", ">25"),
    ]
    table = []
    for row in rows:
        ratio = {
            k: (f"{row['samples_per_s'] / base[k]['samples_per_s']:.1f}" if k in base else "-")
            for k in ("seed-memory", "seed-npz")
        }
        first = f"{base['seed-memory']['first_batch_s'] / row['first_batch_s']:.1f}" if "seed-memory" in base else "-"
        rank = f"{row['rank']}/{row['world_size']}" if row.get("world_size", 1) > 1 else "-"
        table.append(
            (
                row["loader"],
                rank,
                row["scenes_per_batch"],
                row["grasps_per_scene"],
                f"{row['first_batch_s']:.3f} s",
                row["batches_per_s"],
                row["samples_per_s"],
                f"{row['resident_bytes'] / 1e6:.1f}MB",
                ratio["seed-memory"],
                ratio["seed-npz"],
                first,
            )
        )
    for line in format_table(columns, table):
        click.echo(line)
    for line in _summary(rows + gathers):
        click.echo(f"  {line}")
    if json_path:
        write_atomically(json_path, json.dumps(rows + gathers, indent=2) + "\n")


if __name__ == "__main__":
    main()
