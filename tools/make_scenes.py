"""Generate a synthetic grasp dataset in the seed's processed layout (logic in `synth`).

Example: python tools/make_scenes.py --scenes 200 --out demo/scenes --overwrite
"""

from __future__ import annotations

from pathlib import Path

import click

from gq.common.grasps import SEED_MAX_GRASPS
from gq.common.options import one_line_errors
from gq.synth import format_summary, write_scenes


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--scenes", type=int, required=True, help="Number of scenes (objects) to write.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output directory; gets one <scene>/scene.npz per scene.",
)
@click.option(
    "--grasps-per-scene",
    type=int,
    default=SEED_MAX_GRASPS,
    show_default=True,
    help="Grasps generated and scored per scene.",
)
@click.option("--grid", type=int, default=48, show_default=True, help="SDF grid size per axis (a multiple of 16).")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Dataset seed; scene i is the same for a given seed whatever --workers is.",
)
@click.option("--workers", type=int, default=None, help="Processes to use [default: all CPUs].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option(
    "--uncompressed",
    is_flag=True,
    help="Write np.savez files instead of the seed's zlib-compressed np.savez_compressed ones.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(
    scenes: int,
    out: Path,
    grasps_per_scene: int,
    grid: int,
    seed: int,
    workers: int | None,
    overwrite: bool,
    uncompressed: bool,
    quiet: bool,
) -> None:
    """Write SCENES synthetic scenes (SDF grid, grasps, scores) to OUT."""
    # ValueError: bad arguments or output directory; nothing was written either way
    errors = [(ValueError, 2, " (see --help)"), (OSError, 1, "; no output was written")]
    with one_line_errors(*errors, interrupted="no output was written"):
        summary = write_scenes(
            out,
            scenes,
            grasps_per_scene=grasps_per_scene,
            grid=grid,
            seed=seed,
            workers=workers,
            overwrite=overwrite,
            compress=not uncompressed,
            progress=not quiet,
        )
    click.echo(format_summary(summary))


if __name__ == "__main__":
    main()
