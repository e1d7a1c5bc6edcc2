#!/usr/bin/env python
"""Benchmark `gq shards stats` at the seed's scale, and check its label-noise flag on the same data.

Makes N generated scenes (grid 48, 480 grasps: the seed's) in a temporary directory, shuffles the scores among
the grasps of every --shuffle-every'th scene, builds the shards, then times `gq shards verify` (every record
read and checked) and the statistics (`dataset_report`, one pass, plots left out), each the best of --repeat
runs with the shards in the page cache, and extrapolates both to the seed's 15,547 scenes. From the same
report: the share of shuffled scenes flagged for label noise (detected) and of clean scenes flagged for it
(false positives).

Example: python benchmarks/bench_stats.py --scenes 2000 --json stats.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from gq.common.files import write_atomically
from gq.common.workers import worker_count
from gq.shards import BuildOptions, ShardReader, build_shards, verify
from gq.shards.report import dataset_report
from gq.synth import write_scenes
from gq.synth.writer import SCENE_FILE, save_npz, scene_name

SEED_SCENES = 15_547


def _best(fn, repeat: int) -> tuple[float, object]:
    """The shortest of `repeat` timed calls, and the last call's result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def _shuffle(scenes: Path, every: int, count: int) -> list[str]:
    """Shuffle the scores among the grasps of every `every`th scene (a seeded permutation each); their names."""
    names = [scene_name(i) for i in range(every // 2, count, every)]
    for i, name in enumerate(names):
        path = scenes / name / SCENE_FILE
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["scores"] = np.random.default_rng([7, i]).permutation(arrays["scores"])
        save_npz(path, arrays)
    return names


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--scenes", type=click.IntRange(min=10), default=2000, show_default=True)
@click.option("--grid", type=int, default=48, show_default=True)
@click.option("--grasps", type=click.IntRange(min=16), default=480, show_default=True, help="Grasps per scene.")
@click.option("--shuffle-every", type=click.IntRange(min=2), default=50, show_default=True,
              help="Shuffle the scores of one scene in this many.")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes making the data [all CPUs].")
@click.option("--repeat", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the figures.")
def main(
    scenes: int, grid: int, grasps: int, shuffle_every: int, workers: int | None, repeat: int, json_path: Path | None
) -> None:
    """Time gq shards stats against gq shards verify on SCENES generated scenes; count its label-noise flags."""
    progress = sys.stderr.isatty()
    with tempfile.TemporaryDirectory(prefix="bench_stats.") as tmp:
        root = Path(tmp)
        write_scenes(root / "scenes", scenes, grasps_per_scene=grasps, grid=grid, workers=workers, progress=progress)
        shuffled = set(_shuffle(root / "scenes", shuffle_every, scenes))
        options = BuildOptions(grid=grid, max_grasps=grasps)
        build_shards(root / "scenes", root / "shards", options, workers=workers, progress=progress)
        verify_s, checked = _best(lambda: verify(root / "shards"), repeat)
        if not checked.ok:
            raise click.ClickException(f"the benchmark's dataset fails verify: {checked.problems[0]}")
        stats_s, report = _best(lambda: dataset_report(root / "shards"), repeat)
        pool = worker_count(workers, ShardReader(root / "shards").num_shards)
        pooled_s, _ = _best(lambda: dataset_report(root / "shards", workers=pool), repeat)
    noisy = {r["name"] for r in report["scenes"] if any(f.startswith("label noise") for f in r["flags"])}
    z = {r["name"]: r["label_noise_z"] for r in report["scenes"]}
    clean_z = np.array([z[name] for name in z if name not in shuffled])
    clean = scenes - len(shuffled)
    result = {
        "scenes": scenes,
        "grid": grid,
        "grasps_per_scene": grasps,
        "stats_s": stats_s,
        "verify_s": verify_s,
        "stats_over_verify": stats_s / verify_s,
        "stats_workers": pool,
        "stats_workers_s": pooled_s,
        "stats_workers_over_verify": pooled_s / verify_s,
        "seed_scenes": SEED_SCENES,
        "seed_stats_s": stats_s * SEED_SCENES / scenes,
        "seed_verify_s": verify_s * SEED_SCENES / scenes,
        "shuffled": len(shuffled),
        "shuffled_flagged": len(noisy & shuffled),
        "clean_flagged": len(noisy - shuffled),
        "false_positive_rate": len(noisy - shuffled) / clean,
        "noise": report["noise"],
        # the same at other thresholds: each shuffled scene's robust z-score, and the clean ones' highest
        "shuffled_z": sorted(round(z[name], 3) for name in shuffled),
        "clean_z_max": float(clean_z.max()),
        "clean_z_above": {t: int((clean_z > t).sum()) for t in (2.5, 3.0, 3.5)},
        "flagged_other": len(report["flagged"]) - len(noisy),
        "cpus": os.cpu_count(),
    }
    click.echo(
        f"{scenes} scenes ({grid}^3, {grasps} grasps): stats {stats_s:.1f} s, verify {verify_s:.1f} s "
        f"({result['stats_over_verify']:.2f}x verify; {pool} workers: {pooled_s:.1f} s, "
        f"{result['stats_workers_over_verify']:.2f}x); {SEED_SCENES} scenes: stats {result['seed_stats_s']:.0f} s, "
        f"verify {result['seed_verify_s']:.0f} s"
    )
    click.echo(
        f"label noise: {result['shuffled_flagged']} of {len(shuffled)} shuffled scenes flagged, "
        f"{result['clean_flagged']} of {clean} clean ones ({100 * result['false_positive_rate']:.2f}%)"
    )
    if json_path is not None:
        write_atomically(json_path, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
