#!/usr/bin/env python
"""Benchmark the shard format against the seed's scene.npz files, all in one run.

Makes N synthetic scenes in the seed's layout in a temporary directory, twice: zlib-compressed
(np.savez_compressed, as the seed's preprocessing writes them) and uncompressed (np.savez). For each
input kind it measures
(a) the decode floor: np.load of every input with K worker processes,
(b) make_shards end to end (build_shards with K workers, in this process), and ShardWriter fed the same
    scenes from memory (decoded beforehand: what a simulator pushing its results costs),
(c) reading every SDF back: from the shards (one mmap per shard) vs from the scene.npz files,
(d) gq shards merge of the same scenes built in 4 parts, against a plain copy of the parts' files.
Each timing is the best of --repeat runs; inputs are in the page cache for all of them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from gq.common.files import write_atomically
from gq.common.table import format_table
from gq.shards import BuildOptions, ShardReader, ShardWriter, build_shards, merge_parts
from gq.synth import write_scenes


def _decode(path: Path) -> int:
    with np.load(path) as z:
        return sum(z[k].nbytes for k in z.files)


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _read_shards(root: Path) -> int:
    reader, total = ShardReader(root), 0
    for k in range(reader.num_shards):
        total += np.array(np.load(reader.sdf_path(k), mmap_mode="r")).nbytes  # materialise every byte
    return total


def _read_npz(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with np.load(p) as z:
            total += z["sdf"].nbytes
    return total


INPUT_KINDS = ("compressed", "uncompressed")
PARTS = 4


def _bench(root: Path, compress: bool, scenes: int, workers: int, grid: int, grasps: int, repeat: int) -> dict:
    """Figures (a)-(c) and the sizes for one kind of input scene files, made under `root`."""
    src, out = root / "scenes", root / "shards"
    write_scenes(
        src,
        scenes,
        grasps_per_scene=grasps,
        grid=grid,
        workers=workers,
        progress=sys.stderr.isatty(),
        compress=compress,
    )
    paths = sorted(src.glob("*/scene.npz"))

    def decode_floor() -> None:
        with multiprocessing.Pool(workers) as pool:
            list(pool.imap(_decode, paths, chunksize=8))

    def make() -> None:
        shutil.rmtree(out, ignore_errors=True)
        build_shards(src, out, BuildOptions(grid=grid, max_grasps=grasps), workers=workers, progress=False)

    scenes_in_memory = []
    for path in paths:
        with np.load(path) as z:
            scenes_in_memory.append((path.parent.name, {k: z[k] for k in z.files}))

    def push() -> None:
        with ShardWriter(out=out, overwrite=True, grid=grid, max_grasps=grasps) as w:
            for name, arrays in scenes_in_memory:
                w.add(name, **arrays)

    floor_s = _best(decode_floor, repeat)
    make_s = _best(make, repeat)
    push_s = _best(push, repeat)
    scenes_in_memory.clear()  # the decoded scenes are not needed for (c)
    parts = [root / f"part{i}" for i in range(PARTS)]
    for i, part in enumerate(parts):
        build_shards(src, part, BuildOptions(grid=grid, max_grasps=grasps), workers=workers, progress=False,
                     part=(i, PARTS))  # fmt: skip

    def merge() -> None:
        merge_parts(parts, root / "merged", overwrite=True)

    def copy() -> None:
        shutil.rmtree(root / "copied", ignore_errors=True)
        for i, part in enumerate(parts):
            shutil.copytree(part, root / "copied" / str(i))

    merge_s = _best(merge, repeat)
    copy_s = _best(copy, repeat)
    read_shards_s = _best(lambda: _read_shards(out), repeat)
    read_npz_s = _best(lambda: _read_npz(paths), repeat)
    files = [p for p in out.iterdir() if p.is_file()]
    on_disk = sum(p.stat().st_blocks * 512 for p in files)
    apparent = sum(p.stat().st_size for p in files)
    seed_bytes = grid**3 * 4 + grasps * 19 * 4 + grasps * 4
    result = {
        "decode_floor_s": floor_s,
        "make_shards_s": make_s,
        "make_over_floor": make_s / floor_s,
        "writer_from_memory_s": push_s,
        "merge_4_parts_s": merge_s,
        "copy_4_parts_s": copy_s,
        "merge_over_copy": merge_s / copy_s,
        "read_shards_s": read_shards_s,
        "read_npz_s": read_npz_s,
        "read_speedup": read_npz_s / read_shards_s,
        "bytes_per_scene": on_disk / scenes,
        "apparent_bytes_per_scene": apparent / scenes,
        "seed_bytes_per_scene": seed_bytes,
        "bytes_ratio": on_disk / scenes / seed_bytes,
        "input_bytes_per_scene": sum(p.stat().st_size for p in paths) / scenes,
        "sdf_dtype": ShardReader(out).layout.dtype,
    }
    shutil.rmtree(root)
    return result


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--scenes", default=2000, show_default=True, help="Scenes to generate.")
@click.option("--workers", default=os.cpu_count(), show_default=True, help="Worker processes K for (a) and (b).")
@click.option("--grid", default=48, show_default=True)
@click.option("--grasps", default=480, show_default=True, help="Grasps per scene.")
@click.option("--repeat", default=3, show_default=True, help="Runs per timing; the best is reported.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures here as JSON.")
def main(scenes: int, workers: int, grid: int, grasps: int, repeat: int, json_path: Path | None) -> None:
    """Time make_shards and shard reads against np.load of the seed's scene.npz files."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    result = {"scenes": scenes, "workers": workers, "grid": grid, "grasps": grasps, "repeat": repeat}
    try:
        for kind in INPUT_KINDS:
            click.echo(f"generating {scenes} {kind} scenes ({grid}^3, {grasps} grasps) in {tmp} ...", err=True)
            result[kind] = _bench(tmp / kind, kind == "compressed", scenes, workers, grid, grasps, repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    click.echo(f"bench_shards: {scenes} scenes, {grid}^3, {grasps} grasps, K={workers} workers, best of {repeat}")
    for kind in INPUT_KINDS:
        r = result[kind]
        rows = [
            (
                "(a) decode floor: np.load, K workers",
                f"{r['decode_floor_s']:.3f} s",
                f"{scenes / r['decode_floor_s']:,.0f} scenes/s",
                "",
            ),
            (
                "(b) make_shards end to end",
                f"{r['make_shards_s']:.3f} s",
                f"{scenes / r['make_shards_s']:,.0f} scenes/s",
                f"{r['make_over_floor']:.2f} x floor (target <= 1.5)",
            ),
            (
                "    ShardWriter fed from memory, 1 process",
                f"{r['writer_from_memory_s']:.3f} s",
                f"{scenes / r['writer_from_memory_s']:,.0f} scenes/s",
                "",
            ),
            (
                "(c) read all SDFs from shards",
                f"{r['read_shards_s']:.3f} s",
                f"{scenes / r['read_shards_s']:,.0f} scenes/s",
                f"{r['read_speedup']:.1f} x faster than npz (target >= 20)",
            ),
            (
                "    read all SDFs from scene.npz",
                f"{r['read_npz_s']:.3f} s",
                f"{scenes / r['read_npz_s']:,.0f} scenes/s",
                "",
            ),
            (
                f"(d) gq shards merge of {PARTS} parts",
                f"{r['merge_4_parts_s']:.3f} s",
                f"{scenes / r['merge_4_parts_s']:,.0f} scenes/s",
                f"{r['merge_over_copy']:.2f} x plain copy",
            ),
            (
                "    plain copy of the parts' files",
                f"{r['copy_4_parts_s']:.3f} s",
                f"{scenes / r['copy_4_parts_s']:,.0f} scenes/s",
                "",
            ),
            (
                "bytes per scene on disk (float16)",
                f"{r['bytes_per_scene']:,.0f}",
                f"seed {r['seed_bytes_per_scene']:,}",
                f"{r['bytes_ratio']:.3f} x seed (target <= 0.55)",
            ),
            ("    scene.npz input bytes per scene", f"{r['input_bytes_per_scene']:,.0f}", "", ""),
        ]
        click.echo(f"  {kind} scene.npz inputs:")
        for line in format_table([("", "<40"), ("", ">10"), ("", ">18"), ("", "<")], rows, sep="  ", header=False):
            click.echo(line)
    if json_path:
        write_atomically(json_path, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
