"""The seed's raw layout to its processed layout: `RAW/<scene>/{mesh.obj, recording.npz}` -> `OUT/<scene>/scene.npz`.

Exactly the seed's preprocessing (`scripts/data_processing/preprocess.py`): one scale for the whole
dataset, `global_scale = 2 / max(mesh.extents.max())` over its meshes (written to OUT/mesh_max_extent.txt,
or given), per mesh `translation = mesh.bounds.mean(axis=0)`, the mesh moved by -translation and scaled,
its SDF by mesh2sdf or Warp (meshes.sdf), grasp positions `(p - translation) * global_scale` (quaternions and joints
unchanged), saved with np.savez_compressed's format. A scene without a recording can be labelled by our
hand model instead (`label="synth"`: grasps sampled and scored on its SDF by `synth`).

Two passes: the first loads and checks every mesh and recording (and finds the largest extent); the
second computes SDFs and labels in worker processes (or Ray tasks) and writes into a temporary sibling of OUT that is
renamed into place at the end, so a bad scene or a crash leaves nothing half-written. OUT records what it
holds (`gq.common.ownership`): `--overwrite` removes only that, and a later run removes the temporary
folder a killed run left (it carries the same record). Every scene depends
only on its own files and the options, so any worker count, local or on Ray, gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gq.common.executor import Executor, open_executor
from gq.common.extras import import_extra
from gq.common.files import write_atomically
from gq.common.grasps import GRASP_DIM, SEED_MAX_GRASPS
from gq.common.ownership import BesideBuild
from gq.shards.source import SceneError, finite, read_npz
from gq.synth.grasps import sample_grasps
from gq.synth.scenes import check_grid, check_grid_memory
from gq.synth.score import score_grasps
from gq.synth.writer import save_npz, scene_files

from .sdf import OPEN_MESH_REASON, MeshError, check_backend, is_closed, load_mesh, mesh_sdf

MESH_FILE = "mesh.obj"
RECORDING_FILE = "recording.npz"
SCENE_FILE = "scene.npz"
EXTENT_FILE = "mesh_max_extent.txt"
SKIPPED_FILE = "skipped.jsonl"
LABELS = ("recording", "synth")


@dataclass(frozen=True)
class ImportOptions:
    """How to import: see gq import-meshes --help for each option."""

    grid: int = 48
    mesh_max_extent: float | None = None  # None: the largest extent of the dataset's accepted meshes
    label: str = "recording"  # recording: every scene needs one; synth: scenes without one get synth labels
    grasps_per_scene: int = SEED_MAX_GRASPS  # synth labels only
    seed: int = 0  # synth labels only
    open_meshes: str = "refuse"
    skip_bad: bool = False
    sdf_backend: str = "mesh2sdf"  # or "warp" (the warp extra)

    def check(self) -> None:
        check_grid(self.grid)
        if self.label not in LABELS:
            raise ValueError(f"label {self.label!r}: choose one of {', '.join(LABELS)}")
        check_backend(self.sdf_backend, self.open_meshes)
        if self.mesh_max_extent is not None and not (np.isfinite(self.mesh_max_extent) and self.mesh_max_extent > 0):
            raise ValueError(f"mesh_max_extent {self.mesh_max_extent}: must be a positive length")
        if self.grasps_per_scene < 1 or self.seed < 0:
            raise ValueError("grasps_per_scene must be >= 1 and seed >= 0")


def _check_recording(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A recording's shapes, from its headers alone (before any data is read): SceneError if wrong."""
    grasps = shapes["grasps"]
    if len(grasps) != 2 or grasps[1] != GRASP_DIM:
        raise SceneError(path, f"'grasps' has shape {grasps}, expected (N, {GRASP_DIM})")
    if grasps[0] == 0:
        raise SceneError(path, "no grasps (N = 0)")
    if shapes["scores"] != (grasps[0],):
        raise SceneError(path, f"'scores' has shape {shapes['scores']}, expected ({grasps[0]},)")


def read_recording(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(grasps (N,19), scores (N,)) of a recording.npz as float32, checked as make_shards checks a scene
    (shards.source): headers first, then every value finite as read and as stored. MeshError names the file.

    Extra keys (e.g. the optimiser's `fk_loss`) are ignored.
    """
    try:
        arrays = read_npz(path, ("grasps", "scores"), (), partial(_check_recording, path))
        return tuple(finite(path, k, arrays[k].astype(np.float32), as_stored=True) for k in ("grasps", "scores"))
    except SceneError as err:
        raise MeshError(path, f"bad recording: {err.reason}") from None


def _extras_used(opts: ImportOptions) -> list[tuple[str, str]]:
    """(module, extra) of each optional package an import with `opts` uses."""
    if opts.sdf_backend == "warp":
        return [("trimesh", "meshes"), ("warp", "warp")]
    return [
        ("trimesh", "meshes"),
        ("mesh2sdf", "meshes"),
        *([("igl", "meshes")] if opts.open_meshes == "winding" else []),
    ]


def _survey(task: tuple[Path, str, str]) -> dict:
    """Pass 1 for one scene: load and check its mesh (and recording); its extent and translation."""
    raw, name, label = task
    folder = raw / name
    if not os.path.lexists(folder / MESH_FILE):
        raise MeshError(folder, f"missing {MESH_FILE}")
    mesh = load_mesh(folder / MESH_FILE)
    recording = folder / RECORDING_FILE
    if os.path.lexists(recording):
        read_recording(recording)
    elif label == "recording":
        raise MeshError(folder, f"missing {RECORDING_FILE}; pass --label synth to label it with our hand model")
    return {
        "name": name,
        "extent": float(mesh.extents.max()),
        "translation": mesh.bounds.mean(axis=0),
        "closed": is_closed(mesh),
        "recording": os.path.lexists(recording),
    }


def _scene_seed(seed: int, name: str) -> list[int]:
    """The synthetic-label generator's seed for a scene: its name's, not its position's."""
    return [seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")]


def convert_scene(raw: Path, scene: dict, global_scale: float, opts: ImportOptions) -> dict[str, np.ndarray]:
    """The processed scene's arrays (the seed's scene.npz keys) from a surveyed raw scene."""
    folder = raw / scene["name"]
    mesh = load_mesh(folder / MESH_FILE)
    translation = scene["translation"]
    vertices = (mesh.vertices - translation) * global_scale
    if np.abs(vertices).max() > 1.0 + 1e-6:
        raise MeshError(
            folder / MESH_FILE,
            f"mesh extent {scene['extent']:.6g} exceeds the mesh max extent "
            f"{2.0 / global_scale:.6g}; raise --mesh-max-extent",
        )
    try:
        sdf = mesh_sdf(
            vertices,
            mesh.faces,
            opts.grid,
            closed=scene["closed"],
            open_meshes=opts.open_meshes,
            backend=opts.sdf_backend,
        )
    except ValueError as err:
        raise MeshError(folder / MESH_FILE, str(err)) from None
    if scene["recording"]:
        grasps, scores = read_recording(folder / RECORDING_FILE)
        grasps = grasps.astype(np.float32)  # a copy: positions move into the SDF's frame as the seed does
        grasps[:, :3] = (grasps[:, :3] - translation) * global_scale
        scores = scores.astype(np.float32)
    else:
        if not (np.abs(sdf) < 2.0 / opts.grid).any():
            raise MeshError(folder / MESH_FILE, "object too small for the grid: no voxel near its surface")
        rng = np.random.default_rng(_scene_seed(opts.seed, scene["name"]))
        grasps = sample_grasps(sdf, rng, opts.grasps_per_scene).astype(np.float32)
        scores = score_grasps(sdf, grasps)
    return {
        "sdf": sdf,
        "grasps": grasps,
        "scores": scores,
        "translation": np.asarray(translation, np.float64),
        "global_scale": np.float64(global_scale),
    }


def _convert(task: tuple[Path, Path, dict, float, ImportOptions]) -> tuple[str, float, MeshError | None]:
    """Pass 2 for one scene, in a worker: write tmp/<name>/scene.npz; (name, seconds, error or None)."""
    raw, tmp, scene, global_scale, opts = task
    start = time.perf_counter()
    try:
        arrays = convert_scene(raw, scene, global_scale, opts)
    except MeshError as err:
        return scene["name"], time.perf_counter() - start, err
    # A rerun of this task (its Ray worker was killed mid-write) starts afresh: no stray temporary file stays.
    shutil.rmtree(tmp / scene["name"], ignore_errors=True)
    (tmp / scene["name"]).mkdir()
    save_npz(tmp / scene["name"] / SCENE_FILE, arrays, compress=True)
    return scene["name"], time.perf_counter() - start, None


def list_raw(raw: Path) -> list[str]:
    """Scene names of a raw directory (its subdirectories, sorted); ValueError if there are none."""
    if not raw.is_dir():
        raise ValueError(f"RAW {raw}: not a directory")
    names = sorted(p.name for p in raw.iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"RAW {raw}: no scene directories (expected RAW/<scene>/{MESH_FILE})")
    return names


def _map(fn, tasks: list, engine: Executor, progress: bool, desc: str):
    """fn over tasks in order, run by `engine` (local processes or Ray tasks), with a progress bar."""
    with tqdm(
        total=len(tasks), unit="scene", desc=desc, file=sys.stderr, disable=(not progress) or None, dynamic_ncols=True
    ) as bar:
        for result in engine.imap(fn, tasks, chunksize=max(1, min(8, len(tasks) // (8 * engine.workers)))):
            bar.update()
            yield result


def _survey_or_error(task: tuple[Path, str, str]) -> dict:
    try:
        return _survey(task)
    except MeshError as err:
        return {"name": task[1], "error": err}


def _kind(reason: str) -> str:
    """A short category of a refusal, for the summary's counts."""
    for key, kind in (
        ("empty mesh", "empty mesh"),
        ("unreadable mesh", "unreadable mesh"),
        ("not closed", "not closed"),
        ("recording", "bad recording"),
        ("extent", "too large"),
        ("too small", "too small"),
        (f"missing {MESH_FILE}", "no mesh"),
    ):
        if key in reason:
            return kind
    return "other"


def import_meshes(
    raw: str | Path,
    out: str | Path,
    opts: ImportOptions = ImportOptions(),
    *,
    workers: int | None = None,
    ray: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Import every scene of RAW into OUT (see the module docstring); returns a summary dict.

    A bad scene raises MeshError (one line naming it) before anything is written, unless
    `opts.skip_bad`: then it is left out and listed with its reason in OUT/skipped.jsonl. `ray` runs the
    per-scene work as Ray tasks on the cluster at that address (`common.executor`) instead of `workers`
    local processes; RAW and OUT's folder must then be on a file system every node sees.
    Summary keys: out, scenes, imported, skipped, refused (reason kind -> count), open_signed,
    mesh_max_extent, global_scale, workers, wall_s, convert_s (summed over workers), scenes_per_s.
    """
    opts.check()
    raw, out = Path(raw), Path(out).absolute()
    names = list_raw(raw)
    for module, extra in _extras_used(opts):
        import_extra(module, extra)  # before any work: a missing extra is one line naming it
    build = BesideBuild(out, tool="import_meshes", overwrite=overwrite)
    with open_executor(workers, len(names), ray) as engine:
        if ray is None:  # a Ray node's memory is its own
            check_grid_memory(opts.grid, engine.workers)
        return _import(raw, out, names, opts, build, engine, progress)


def _import(
    raw: Path, out: Path, names: list[str], opts: ImportOptions, build: BesideBuild, engine: Executor, progress: bool
) -> dict:
    """import_meshes' two passes, their work run by `engine`."""
    start = time.perf_counter()

    surveyed, refused = [], {}
    for item in _map(_survey_or_error, [(raw, n, opts.label) for n in names], engine, progress, "check"):
        if "error" in item:
            if not opts.skip_bad:
                raise item["error"]
            refused[item["name"]] = str(item["error"])
        elif not item["closed"] and opts.open_meshes == "refuse":
            error = MeshError(raw / item["name"] / MESH_FILE, OPEN_MESH_REASON)
            if not opts.skip_bad:
                raise error
            refused[item["name"]] = str(error)
        else:
            surveyed.append(item)
    if not surveyed:
        raise ValueError(f"RAW {raw}: no importable scene ({len(refused)} refused)")
    max_extent = opts.mesh_max_extent or max(s["extent"] for s in surveyed)
    global_scale = 2.0 / max_extent

    with build:
        tmp = build.create([EXTENT_FILE, SKIPPED_FILE, *scene_files([s["name"] for s in surveyed])])
        convert_s, imported = 0.0, 0
        tasks = [(raw, tmp, s, global_scale, opts) for s in surveyed]
        for name, seconds, error in _map(_convert, tasks, engine, progress, "import"):
            convert_s += seconds
            if error is None:
                imported += 1
            elif opts.skip_bad:
                refused[name] = str(error)
            else:
                raise error
        if not imported:
            raise ValueError(f"RAW {raw}: no importable scene ({len(refused)} refused)")
        write_atomically(tmp / EXTENT_FILE, f"{max_extent!r}\n")
        if refused:
            lines = [json.dumps({"name": n, "kind": _kind(r), "reason": r}) for n, r in sorted(refused.items())]
            write_atomically(tmp / SKIPPED_FILE, "\n".join(lines) + "\n")
        build.commit()
    wall = time.perf_counter() - start
    return {
        "out": str(out),
        "scenes": len(names),
        "imported": imported,
        "skipped": len(refused),
        "refused": dict(Counter(_kind(r) for r in refused.values()).most_common()),
        "open_signed": sum(not s["closed"] for s in surveyed) if opts.open_meshes != "refuse" else 0,
        "mesh_max_extent": max_extent,
        "global_scale": global_scale,
        "workers": engine.workers,
        "wall_s": wall,
        "convert_s": convert_s,
        "scenes_per_s": imported / wall,
        "options": asdict(opts),
    }


def format_summary(summary: dict) -> str:
    """A few human-readable lines describing an import_meshes summary."""
    lines = [
        f"imported {summary['imported']} of {summary['scenes']} scenes into {summary['out']} "
        f"(grid {summary['options']['grid']}, SDF by {summary['options']['sdf_backend']}, "
        f"labels: {summary['options']['label']})",
        f"mesh max extent {summary['mesh_max_extent']:.6g}, global scale {summary['global_scale']:.6g}",
    ]
    if summary["skipped"]:
        why = ", ".join(f"{k}: {v}" for k, v in summary["refused"].items())
        lines.append(f"skipped {summary['skipped']} ({why}); see {SKIPPED_FILE}")
    if summary["open_signed"]:
        mode = summary["options"]["open_meshes"]
        lines.append(f"{summary['open_signed']} open meshes signed by --open-meshes {mode}")
    lines.append(
        f"time: {summary['wall_s']:.1f} s, {summary['scenes_per_s']:.2f} scenes/s with "
        f"{summary['workers']} worker(s); {summary['convert_s'] / max(summary['imported'], 1):.3f} s "
        "per scene in SDF + labels"
    )
    return "\n".join(lines)
