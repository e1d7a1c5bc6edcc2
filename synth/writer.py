"""Writing a dataset directory of synthetic scenes in parallel, all or nothing.

Layout (the seed's processed layout): `<out>/scene_000000/scene.npz`, ... The dataset is built
in a hidden temporary sibling of `<out>` and renamed into place only when every scene is
written, so a failure or Ctrl-C leaves no partial output behind. The dataset records what it holds
(`gq.common.ownership`): `--overwrite` removes only that.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from gq.common.files import write_atomically
from gq.common.grasps import SEED_MAX_GRASPS
from gq.common.ownership import BesideBuild
from gq.common.workers import worker_count, worker_pool

from .scenes import check_grid, check_grid_memory, check_int, make_scene

QUANTILES = (1, 5, 25, 50, 75, 95, 99)
SCENE_PREFIX = "scene_"
SCENE_FILE = "scene.npz"


def scene_name(index: int) -> str:
    """Directory name of scene `index`; zero-padded so name order is index order."""
    return f"{SCENE_PREFIX}{index:06d}"


def save_npz(path: Path, arrays: dict[str, np.ndarray], compress: bool = True) -> None:
    """Write `arrays` as .npz, atomically and reproducibly; zlib-compressed like the seed's files.

    `compress` gives np.savez_compressed's format (what the seed's preprocessing writes), else
    np.savez's. Both stamp the current time into each zip entry, so two runs would differ in
    bytes; here every entry gets a fixed timestamp. Written atomically (`shards.write_atomically`).
    """
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED

    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", method) as archive:
            for key, value in arrays.items():
                entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                entry.compress_type = method  # a ZipInfo does not take the archive's method
                with archive.open(entry, "w", force_zip64=True) as stream:
                    np.lib.format.write_array(stream, np.asanyarray(value), allow_pickle=False)

    write_atomically(path, write)


def _write_scene(task: tuple[Path, int, int, int, int, bool]) -> tuple[int, np.ndarray]:
    """Make and save one scene; returns its index and scores (for the summary)."""
    root, seed, index, grid, num_grasps, compress = task
    scene = make_scene(seed, index, grid, num_grasps)
    folder = root / scene_name(index)
    folder.mkdir()
    save_npz(folder / SCENE_FILE, scene, compress)
    return index, scene["scores"]


def scene_files(names: list[str]) -> list[str]:
    """The entries a scene dataset's record lists: `<name>/scene.npz` per scene."""
    return [f"{name}/{SCENE_FILE}" for name in names]


def _generate(
    tmp: Path, scenes: int, grid: int, num_grasps: int, seed: int, workers: int, progress: bool, compress: bool
) -> np.ndarray:
    """Write every scene into `tmp`; returns all scores in scene order."""
    tasks = [(tmp, seed, i, grid, num_grasps, compress) for i in range(scenes)]
    scores: list[np.ndarray | None] = [None] * scenes
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(
            tqdm(
                total=scenes,
                unit="scene",
                desc="scenes",
                file=sys.stderr,
                disable=(not progress) or None,
                dynamic_ncols=True,
            )
        )
        if workers == 1:  # in-process: no pool start-up, and what the benchmark measures per worker
            results = map(_write_scene, tasks)
        else:
            pool = stack.enter_context(worker_pool(workers))  # Ctrl-C: the parent removes the temporary output
            chunk = max(1, min(16, scenes // (8 * workers)))  # few round trips, balanced tail
            results = pool.imap_unordered(_write_scene, tasks, chunksize=chunk)
        for index, s in results:
            scores[index] = s
            bar.update()
    return np.concatenate(scores)


def write_scenes(
    out_dir: str | os.PathLike,
    scenes: int,
    *,
    grasps_per_scene: int = SEED_MAX_GRASPS,
    grid: int = 48,
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    compress: bool = True,
) -> dict:
    """Write scenes 0..scenes-1 of dataset `seed` to `out_dir`; returns a summary dict.

    Scene files are zlib-compressed npz like the seed's (`compress=False`: np.savez's format).
    `workers` processes (default: the CPUs available) share the work; the bytes written do not
    depend on it. An existing non-empty `out_dir` is replaced only with `overwrite`, and only if
    it holds nothing but what an earlier make_scenes wrote, as its record says. Bad
    arguments raise ValueError before anything is written. Summary keys: out, scenes, grasps, grid,
    seed, workers, wall_s, scenes_per_s, score (mean, std, min, max, quantiles {percent: value}).
    """
    check_int("scenes", scenes, 1)
    check_int("grasps_per_scene", grasps_per_scene, 1)
    check_grid(grid)
    check_int("seed", seed, 0)
    if workers is not None:
        check_int("workers", workers, 1)
    workers = worker_count(workers, scenes)
    check_grid_memory(grid, workers)
    build = BesideBuild(Path(out_dir), tool="make_scenes", overwrite=overwrite)
    out = build.out

    start = time.perf_counter()
    with build:
        tmp = build.create(scene_files([scene_name(i) for i in range(scenes)]))
        scores = _generate(tmp, scenes, grid, grasps_per_scene, seed, workers, progress, compress)
        build.commit()
    wall = time.perf_counter() - start
    return {
        "out": str(out),
        "scenes": scenes,
        "grasps": int(scores.size),
        "grid": grid,
        "seed": seed,
        "workers": workers,
        "wall_s": wall,
        "scenes_per_s": scenes / wall,
        "score": {
            "mean": float(scores.mean()),
            "std": float(scores.std()),
            "min": float(scores.min()),
            "max": float(scores.max()),
            "quantiles": {q: float(v) for q, v in zip(QUANTILES, np.percentile(scores, QUANTILES))},
        },
    }


def format_summary(summary: dict) -> str:
    """A few human-readable lines describing a write_scenes summary."""
    s = summary["score"]
    quantiles = "  ".join(f"p{q}={v:.2f}" for q, v in s["quantiles"].items())
    return "\n".join(
        [
            f"wrote {summary['scenes']} scenes ({summary['grasps']} grasps, grid {summary['grid']}) "
            f"to {summary['out']}",
            f"scores: mean {s['mean']:.2f}  std {s['std']:.2f}  min {s['min']:.2f}  max {s['max']:.2f}",
            f"quantiles: {quantiles}",
            f"time: {summary['wall_s']:.1f} s, {summary['scenes_per_s']:.1f} scenes/s "
            f"with {summary['workers']} worker(s)",
        ]
    )
