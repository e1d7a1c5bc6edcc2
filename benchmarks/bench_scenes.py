"""Benchmark synthetic scene generation: scenes per second per worker, written to disk.

Example: python benchmarks/bench_scenes.py --scenes 100 --workers 1 --json bench.json
Target: >= 20 scenes/s per worker at grid 48 with 480 grasps (a seed-sized dataset of
15,547 scenes in under 7 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import click
import numpy as np

from gq.common.files import write_atomically
from gq.synth import write_scenes

SEED_SCENES = 15_547
TARGET_PER_WORKER = 20.0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--scenes", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--grid", type=int, default=48, show_default=True)
@click.option("--grasps-per-scene", type=click.IntRange(min=1), default=480, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the result as JSON to this file.",
)
def main(scenes: int, workers: int, grid: int, grasps_per_scene: int, seed: int, json_path: Path | None) -> None:
    """Time writing SCENES scenes with WORKERS processes into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="bench_scenes.") as tmp:
        summary = write_scenes(
            Path(tmp) / "scenes",
            scenes,
            grasps_per_scene=grasps_per_scene,
            grid=grid,
            seed=seed,
            workers=workers,
            progress=False,
        )
    per_worker = summary["scenes_per_s"] / summary["workers"]
    result = {
        "scenes": scenes,
        "workers": summary["workers"],
        "grid": grid,
        "grasps_per_scene": grasps_per_scene,
        "wall_s": summary["wall_s"],
        "scenes_per_s": summary["scenes_per_s"],
        "scenes_per_s_per_worker": per_worker,
        "target_per_worker": TARGET_PER_WORKER,
        "meets_target": per_worker >= TARGET_PER_WORKER,
        "seed_sized_minutes": SEED_SCENES / summary["scenes_per_s"] / 60,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    click.echo(
        f"{scenes} scenes, grid {grid}, {grasps_per_scene} grasps, {result['workers']} "
        f"worker(s): {summary['scenes_per_s']:.1f} scenes/s = {per_worker:.1f} scenes/s "
        f"per worker (target {TARGET_PER_WORKER:.0f}); {SEED_SCENES} scenes would take "
        f"{result['seed_sized_minutes']:.1f} min at this rate"
    )
    if json_path is not None:
        write_atomically(json_path, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
