#!/usr/bin/env python
"""Benchmark the mesh import: SDF rate per core for each sign method, their accuracy on holed meshes,
and the end-to-end import rate, on pybullet's random_urdfs objects (the `meshes` extra).

(a) SDF time per scene in one process at --grid for: the seed's mesh2sdf call (closed meshes), the
    winding-number sign and mesh2sdf's repair (fix=True), all on the same closed meshes;
(b) accuracy on holed meshes: each closed mesh loses the faces near a random surface point
    (--hole of its extent); each method's SDF of the holed mesh is compared with mesh2sdf's SDF of
    the intact one (share of voxels with the right sign, of inside voxels found inside, mean |error|);
    the seed's plain mesh2sdf call on the holed mesh is the baseline;
(c) tools/import_meshes end to end (--label synth) with 1 and with --workers processes.

    python benchmarks/bench_import.py --objects 100 --json bench_import.json
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from gq.common.files import write_atomically
from gq.common.table import format_table
from gq.meshes import ImportOptions, MeshError, import_meshes, is_closed, load_mesh, mesh_sdf
from gq.meshes.pybullet import write_raw

METHODS = {"mesh2sdf": (True, "refuse"), "winding": (False, "winding"), "repair": (False, "repair")}


def _normalised(mesh) -> tuple[np.ndarray, np.ndarray]:
    """The mesh centred and scaled so its largest extent spans the cube (as one mesh alone would be)."""
    return (mesh.vertices - mesh.bounds.mean(axis=0)) * (2.0 / mesh.extents.max()), mesh.faces


def _holed(vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator, size: float) -> np.ndarray:
    """faces minus those whose centroid lies within `size` (a share of the extent 2) of a random vertex."""
    centre = vertices[rng.integers(len(vertices))]
    near = np.linalg.norm(vertices[faces].mean(axis=1) - centre, axis=1) < size * 2.0
    return faces[~near]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--objects", default=100, show_default=True, help="pybullet random_urdfs objects to use.")
@click.option("--grid", default=48, show_default=True)
@click.option("--hole", default=0.1, show_default=True, help="Hole radius as a share of the object's extent.")
@click.option(
    "--workers",
    default=len(os.sched_getaffinity(0)),
    show_default=True,
    help="Processes for the end-to-end import (c).",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="Write the figures here.")
def main(objects: int, grid: int, hole: float, workers: int, seed: int, json_path: Path | None) -> None:
    """Time and check mesh2sdf and the open-mesh options on pybullet objects."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="bench_import_") as tmp:
        raw = Path(tmp) / "raw"
        names = write_raw(raw, "random", objects)
        meshes = []
        for name in names:
            try:
                mesh = load_mesh(raw / name / "mesh.obj")
            except MeshError:
                continue  # e.g. random_168, an empty mesh
            if is_closed(mesh):
                meshes.append(mesh)
        times = dict.fromkeys(METHODS, 0.0)
        accuracy = {m: {"sign": [], "inside": [], "error": []} for m in METHODS}
        for mesh in meshes:
            vertices, faces = _normalised(mesh)
            for method, (closed, mode) in METHODS.items():  # (a) on the intact closed mesh
                start = time.perf_counter()
                sdf = mesh_sdf(vertices, faces, grid, closed=closed, open_meshes=mode)
                times[method] += time.perf_counter() - start
                if method == "mesh2sdf":
                    truth = sdf
            holed = _holed(vertices, faces, rng, hole)
            for method, (_, mode) in METHODS.items():  # (b) the holed mesh, every method told it is open
                sdf = mesh_sdf(vertices, holed, grid, closed=method == "mesh2sdf", open_meshes=mode)
                inside = truth < 0
                accuracy[method]["sign"].append(np.mean((sdf < 0) == inside))
                accuracy[method]["inside"].append(np.mean(sdf[inside] < 0) if inside.any() else 1.0)
                accuracy[method]["error"].append(np.mean(np.abs(sdf - truth)))
        end_to_end = {}
        for k in sorted({1, workers}):  # (c)
            summary = import_meshes(
                raw,
                Path(tmp) / f"out{k}",
                ImportOptions(grid=grid, label="synth", skip_bad=True),
                workers=k,
                progress=False,
            )
            end_to_end[k] = {
                "scenes_per_s": summary["scenes_per_s"],
                "per_core": summary["scenes_per_s"] / k,
                "imported": summary["imported"],
                "refused": summary["refused"],
            }

    n = len(meshes)
    result = {
        "objects": objects,
        "closed_meshes": n,
        "grid": grid,
        "hole": hole,
        "sdf_s_per_scene": {m: t / n for m, t in times.items()},
        "sdf_scenes_per_s_per_core": {m: n / t for m, t in times.items()},
        "holed": {m: {k: float(np.mean(v)) for k, v in a.items()} for m, a in accuracy.items()},
        "import": end_to_end,
    }
    click.echo(f"bench_import: {n} closed pybullet random_urdfs meshes, grid {grid}^3")
    click.echo(f"  holed meshes: a hole of {hole:.0%} of the extent, compared with mesh2sdf on the intact mesh")
    columns = [
        ("method", "<10"),
        ("s/scene", ">8.3f"),
        ("scenes/s/core", ">14.2f"),
        ("holed: right sign", ">18.4f"),
        ("inside found", ">13.4f"),
        ("mean |err|", ">11.4f"),
    ]
    table = [
        (
            m,
            result["sdf_s_per_scene"][m],
            result["sdf_scenes_per_s_per_core"][m],
            result["holed"][m]["sign"],
            result["holed"][m]["inside"],
            result["holed"][m]["error"],
        )
        for m in METHODS
    ]
    for line in format_table(columns, table):
        click.echo(line)
    for k, r in end_to_end.items():
        click.echo(
            f"  import_meshes --label synth, {k} worker(s): {r['scenes_per_s']:.2f} scenes/s "
            f"({r['per_core']:.2f} per core), {r['imported']} imported, refused {r['refused'] or 'none'}"
        )
    if json_path:
        write_atomically(json_path, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
