#!/usr/bin/env python
"""Benchmark the mesh import: SDF rate per core for each sign method, their accuracy on holed meshes,
and the end-to-end import rate, on pybullet's random_urdfs objects (the `meshes` extra).

(a) SDF time per scene in one process at --grid for: the seed's mesh2sdf call (closed meshes), the
    winding-number sign and mesh2sdf's repair (fix=True), all on the same closed meshes;
(b) accuracy on holed meshes: each closed mesh loses the faces near a random surface point
    (--hole of its extent); each method's SDF of the holed mesh is compared with mesh2sdf's SDF of
    the intact one (share of voxels with the right sign, of inside voxels found inside, mean |error|);
    the seed's plain mesh2sdf call on the holed mesh is the baseline;
(c) tools/import_meshes end to end (--label synth) with 1 and with --workers processes;
(d) with --backends: SDF time per mesh of each SDF backend (mesh2sdf always, as the reference) at each of
    --grids, on the same closed meshes in one process, as a ratio to mesh2sdf's time in this run, and the
    largest |backend - mesh2sdf| over the meshes; each backend's first call (Warp's kernel compile or cache
    load) is left out of the times and reported apart. --sdf-only runs (d) alone.

    python benchmarks/bench_import.py --objects 100 --json bench_import.json
    python benchmarks/bench_import.py --objects 20 --sdf-only --backends warp --grids 48,64
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
from gq.meshes import SDF_BACKENDS, ImportOptions, MeshError, import_meshes, is_closed, load_mesh, mesh_sdf
from gq.meshes.pybullet import write_raw

METHODS = {"mesh2sdf": (True, "refuse"), "winding": (False, "winding"), "repair": (False, "repair")}


def _normalised(mesh) -> tuple[np.ndarray, np.ndarray]:
    """The mesh centred and scaled so its largest extent spans the cube (as one mesh alone would be)."""
    return (mesh.vertices - mesh.bounds.mean(axis=0)) * (2.0 / mesh.extents.max()), mesh.faces


def _numbers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: comma-separated grid sizes, e.g. 48,64", param_hint="--grids") from None


def _backend_list(text: str) -> list[str]:
    """mesh2sdf first (the reference), then the backends named in `text`, each once."""
    named = [b for b in text.split(",") if b]
    unknown = [b for b in named if b not in SDF_BACKENDS]
    if unknown:
        raise click.BadParameter(
            f"{', '.join(unknown)}: choose from {', '.join(SDF_BACKENDS)}", param_hint="--backends"
        )
    return ["mesh2sdf", *(b for b in dict.fromkeys(named) if b != "mesh2sdf")]


def time_backends(meshes: list, backends: list[str], grids: list[int]) -> tuple[list[dict], dict[str, float]]:
    """(d): one row per (backend, grid): s per mesh, ratio to mesh2sdf's, largest |sdf - mesh2sdf's|; and each
    backend's untimed first call, in s. `backends` starts with mesh2sdf."""
    first = {}
    for backend in backends:  # kernel compile or cache load, and imports: once, not per mesh
        start = time.perf_counter()
        mesh_sdf(*_normalised(meshes[0]), min(grids), backend=backend)
        first[backend] = time.perf_counter() - start
    rows = []
    for grid in grids:
        seconds, gap = dict.fromkeys(backends, 0.0), dict.fromkeys(backends, 0.0)
        for mesh in meshes:
            vertices, faces = _normalised(mesh)
            reference = None
            for backend in backends:
                start = time.perf_counter()
                sdf = mesh_sdf(vertices, faces, grid, backend=backend)
                seconds[backend] += time.perf_counter() - start
                reference = sdf if reference is None else reference
                gap[backend] = max(gap[backend], float(np.abs(sdf - reference).max()))
        rows += [
            {
                "backend": b,
                "device": _device(b),
                "grid": grid,
                "s_per_mesh": seconds[b] / len(meshes),
                "ratio_to_mesh2sdf": seconds[b] / seconds["mesh2sdf"],
                "max_abs_diff_to_mesh2sdf": gap[b],
            }
            for b in backends
        ]
    return rows, first


def _device(backend: str) -> str:
    if backend == "mesh2sdf":
        return "cpu"
    from gq.meshes.warp_sdf import warp_device  # imports warp: only when it is timed

    return warp_device()


def _holed(vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator, size: float) -> np.ndarray:
    """faces minus those whose centroid lies within `size` (a share of the extent 2) of a random vertex."""
    centre = vertices[rng.integers(len(vertices))]
    near = np.linalg.norm(vertices[faces].mean(axis=1) - centre, axis=1) < size * 2.0
    return faces[~near]


def _print_methods(result: dict) -> None:
    """(a)-(c) as lines of text."""
    click.echo(
        f"  holed meshes: a hole of {result['hole']:.0%} of the extent, compared with mesh2sdf on the intact mesh"
    )
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
    for k, r in result["import"].items():
        click.echo(
            f"  import_meshes --label synth, {k} worker(s): {r['scenes_per_s']:.2f} scenes/s "
            f"({r['per_core']:.2f} per core), {r['imported']} imported, refused {r['refused'] or 'none'}"
        )


def _print_backends(rows: list[dict], first_call: dict[str, float]) -> None:
    """(d) as lines of text."""
    click.echo("  SDF backends, per mesh in one process (ratio: time / mesh2sdf's time in this run):")
    columns = [
        ("backend", "<9"),
        ("device", "<7"),
        ("grid", ">4"),
        ("s/mesh", ">7.3f"),
        ("ratio", ">6.2f"),
        ("max |sdf - mesh2sdf|", ">21.2e"),
    ]
    table = [
        (r["backend"], r["device"], r["grid"], r["s_per_mesh"], r["ratio_to_mesh2sdf"], r["max_abs_diff_to_mesh2sdf"])
        for r in rows
    ]
    for line in format_table(columns, table):
        click.echo(line)
    click.echo("  first call, not in the times: " + ", ".join(f"{b} {s:.2f} s" for b, s in first_call.items()))


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
@click.option(
    "--backends",
    default="",
    help=f"(d): SDF backends to time per mesh, comma-separated ({', '.join(SDF_BACKENDS)}); mesh2sdf is always "
    "timed as the reference.",
)
@click.option("--grids", default=None, help="(d): comma-separated grid sizes [default: --grid].")
@click.option("--sdf-only", is_flag=True, help="Run (d) alone (needs --backends).")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="Write the figures here.")
def main(
    objects: int,
    grid: int,
    hole: float,
    workers: int,
    seed: int,
    backends: str,
    grids: str | None,
    sdf_only: bool,
    json_path: Path | None,
) -> None:
    """Time and check mesh2sdf, the open-mesh options and the SDF backends on pybullet objects."""
    backend_list = _backend_list(backends) if backends else []
    grid_list = _numbers(grids) if grids else [grid]
    if sdf_only and not backend_list:
        raise click.UsageError("--sdf-only times the SDF backends: give --backends (e.g. --backends warp)")
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
        if backend_list:
            backend_rows, first_call = time_backends(meshes, backend_list, grid_list)
        times = dict.fromkeys(METHODS, 0.0)
        accuracy = {m: {"sign": [], "inside": [], "error": []} for m in METHODS}
        for mesh in [] if sdf_only else meshes:
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
        for k in [] if sdf_only else sorted({1, workers}):  # (c)
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
    grids_text = ", ".join(f"{g}^3" for g in (grid_list if sdf_only else [grid]))
    click.echo(f"bench_import: {n} closed pybullet random_urdfs meshes, grid {grids_text}")
    result = {"objects": objects, "closed_meshes": n, "grid": grid}
    if not sdf_only:
        result.update(
            {
                "hole": hole,
                "sdf_s_per_scene": {m: t / n for m, t in times.items()},
                "sdf_scenes_per_s_per_core": {m: n / t for m, t in times.items()},
                "holed": {m: {k: float(np.mean(v)) for k, v in a.items()} for m, a in accuracy.items()},
                "import": end_to_end,
            }
        )
        _print_methods(result)
    if backend_list:
        result["backends"] = {"rows": backend_rows, "first_call_s": first_call}
        _print_backends(backend_rows, first_call)
    if json_path:
        write_atomically(json_path, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
