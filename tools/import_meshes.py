#!/usr/bin/env python
"""Import meshes in the seed's raw layout into its processed layout (logic in `meshes`).

    python tools/import_meshes.py RAW --out PROCESSED [--label synth] [--workers K]

RAW/<scene>/mesh.obj (+ recording.npz) -> PROCESSED/<scene>/scene.npz with the seed's scale, translation,
grid (mesh2sdf) and grasp transform; PROCESSED/mesh_max_extent.txt records the dataset's scale.
"""

from __future__ import annotations

from pathlib import Path

import click

from gq.common.grasps import SEED_MAX_GRASPS
from gq.common.options import one_line_errors, ray_option
from gq.meshes import LABELS, OPEN_MESH_MODES, SDF_BACKENDS, ImportOptions, MeshError, format_summary, import_meshes


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("raw", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Processed directory to write.")
@click.option("--grid", default=48, show_default=True, help="SDF grid size per axis (a multiple of 16).")
@click.option(
    "--mesh-max-extent",
    type=float,
    default=None,
    help="Length that maps to the cube's width 2 [default: the largest extent of RAW's meshes].",
)
@click.option(
    "--label",
    type=click.Choice(LABELS),
    default="recording",
    show_default=True,
    help="recording: every scene needs recording.npz; synth: scenes without one get grasps "
    "sampled and scored by our hand model.",
)
@click.option(
    "--grasps-per-scene", default=SEED_MAX_GRASPS, show_default=True, help="Synthetic grasps per scene (--label synth)."
)
@click.option("--seed", default=0, show_default=True, help="Seed of the synthetic labels.")
@click.option(
    "--open-meshes",
    type=click.Choice(OPEN_MESH_MODES),
    default="refuse",
    show_default=True,
    help="Meshes that are not closed: refuse them, sign them by libigl's generalised winding number, "
    "or repair them with mesh2sdf's fix=True.",
)
@click.option(
    "--sdf-backend",
    type=click.Choice(SDF_BACKENDS),
    default="mesh2sdf",
    show_default=True,
    help="mesh2sdf (the seed's), or NVIDIA Warp on CUDA when present, else on the CPU (the warp extra: "
    "same grid, exact distances, winding-number signs).",
)
@click.option("--workers", type=int, default=None, help="Processes [default: all CPUs].")
@ray_option("the per-scene work (mesh to SDF, labels)")
@click.option(
    "--skip-bad", is_flag=True, help="Leave bad scenes out (listed in OUT/skipped.jsonl) instead of stopping."
)
@click.option("--overwrite", is_flag=True, help="Replace an earlier import in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(
    raw: Path,
    out: Path,
    grid: int,
    mesh_max_extent: float | None,
    label: str,
    grasps_per_scene: int,
    seed: int,
    open_meshes: str,
    sdf_backend: str,
    workers: int | None,
    ray: str | None,
    skip_bad: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Convert RAW/<scene>/{mesh.obj, recording.npz} into --out/<scene>/scene.npz.

    Stops at the first bad scene (exit 2, nothing written) unless --skip-bad.
    """
    if workers is not None and workers < 1:
        raise click.BadParameter(f"{workers}: must be at least 1", param_hint="--workers")
    opts = ImportOptions(
        grid=grid,
        mesh_max_extent=mesh_max_extent,
        label=label,
        grasps_per_scene=grasps_per_scene,
        seed=seed,
        open_meshes=open_meshes,
        skip_bad=skip_bad,
        sdf_backend=sdf_backend,
    )
    with one_line_errors(((MeshError, ValueError), 2), interrupted="nothing was written"):
        summary = import_meshes(raw, out, opts, workers=workers, ray=ray, overwrite=overwrite, progress=not quiet)
    click.echo(format_summary(summary))


if __name__ == "__main__":
    main()
