#!/usr/bin/env python
"""Benchmark data at scale: gq shards build locally, in 4 parts then merged, and as Ray tasks; gq import-meshes
with mesh2sdf and Warp (CPU), locally and as Ray tasks (the ray and meshes extras; warp for its rows).

On one dataset of generated scenes (gq.synth) and one raw folder of meshes (trimesh boxes and spheres,
labelled by our hand model), each build runs locally with 1 and 2 worker processes, the shards build also as
4 parts (`--part I/4`, one after another, 2 workers each) and their merge, then every build as Ray tasks on a
cluster this benchmark starts on 127.0.0.1 with one one-CPU node (1 Ray worker) and then a second (2
workers). A Ray row's wall time counts connecting to the cluster (ray.init) and shipping the work, as a
user's build would; its ratio is against the local build with as many processes, measured in the same run;
the parts row's is against the local build with 2 workers. Every Ray build's bytes, and the merged parts',
are checked against the local build's. On one machine the nodes share its cores:
the figures show what Ray costs over local processes, not what more machines would give.

    python benchmarks/bench_cluster.py --scenes 400 --meshes 16 --json bench_cluster.json
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import click

from gq.common.extras import import_extra
from gq.common.files import write_atomically
from gq.common.table import format_table
from gq.meshes import ImportOptions, import_meshes
from gq.shards import BuildOptions, build_shards, merge_parts
from gq.synth import write_scenes

# Ray resolves 127.0.0.1 in an address to the machine's outward address unless told it runs no multi-machine
# cluster; with this every node and driver of the benchmark's cluster talks over 127.0.0.1 only.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "node_ip_address": "127.0.0.1"}


def _raw_meshes(raw: Path, count: int) -> None:
    """RAW/obj_i/mesh.obj: boxes and icospheres of varied sizes (no recording: synthetic labels)."""
    trimesh = import_extra("trimesh", "meshes")
    for i in range(count):
        (raw / f"obj_{i:03d}").mkdir(parents=True)
        size = 0.3 + 0.05 * (i % 7)
        if i % 2:
            mesh = trimesh.creation.icosphere(subdivisions=4, radius=size)
        else:
            mesh = trimesh.creation.box(extents=(size * 2, size, size * 1.5))
        mesh.export(raw / f"obj_{i:03d}" / "mesh.obj")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _parts_then_merge(build: Callable[..., object], out: Path, count: int) -> None:
    """`build` in `count` parts beside `out` (as an array job's tasks would, here one after another), merged into
    `out`; the parts are removed after."""
    parts = [out.parent / f"{out.name}.part{i}" for i in range(count)]
    for i, part in enumerate(parts):
        build(part, workers=2, part=(i, count))
    merge_parts(parts, out)
    for part in parts:
        shutil.rmtree(part)


def _timed(build: Callable[[Path], object], out: Path) -> float:
    start = time.perf_counter()
    build(out)
    return time.perf_counter() - start


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--scenes", default=400, show_default=True, help="Generated scenes for the shards build.")
@click.option("--grid", default=48, show_default=True, help="SDF grid of the scenes and of the imported meshes.")
@click.option("--meshes", default=16, show_default=True, help="Meshes for the import.")
@click.option("--parts", default=4, show_default=True, help="Parts of the shards build's parts-and-merge row.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="Write the figures here.")
def main(scenes: int, grid: int, meshes: int, parts: int, json_path: Path | None) -> None:
    """Time gq shards build (local, parts + merge, Ray) and gq import-meshes (mesh2sdf and Warp; local, Ray)."""
    os.environ.update(LOOPBACK)  # before Ray starts anything: its processes inherit it
    cluster_utils = import_extra("ray.cluster_utils", "ray")
    import_extra("mesh2sdf", "meshes")
    backends = ["mesh2sdf", *(["warp"] if find_spec("warp") else [])]  # Warp's rows where its extra is installed
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as tmp:
        tmp = Path(tmp)
        write_scenes(tmp / "scenes", scenes, grid=grid, seed=0, progress=False)
        _raw_meshes(tmp / "raw", meshes)
        builds = {
            "shards build": lambda out, **engine: build_shards(
                tmp / "scenes", out, BuildOptions(grid=grid), progress=False, **engine
            ),
            **{
                f"import ({backend})": lambda out, backend=backend, **engine: import_meshes(
                    tmp / "raw",
                    out,
                    ImportOptions(grid=grid, label="synth", sdf_backend=backend),
                    progress=False,
                    **engine,
                )
                for backend in backends
            },
        }
        local = {}
        for what, build in builds.items():
            for k in (1, 2):
                out = tmp / f"{what}-local-{k}".replace(" ", "_")
                local[what, k] = _timed(lambda o, b=build, k=k: b(o, workers=k), out)
                rows.append({"build": what, "engine": "local", "workers": k, "wall_s": local[what, k], "ratio": 1.0})
        shards = builds["shards build"]
        merged = tmp / "shards-parts"
        wall = _timed(lambda o: _parts_then_merge(shards, o, parts), merged)
        if _tree(merged) != _tree(tmp / "shards_build-local-1"):
            raise click.ClickException(f"{parts} parts merged wrote other bytes than the local build")
        rows.append({"build": "shards build", "engine": f"{parts} parts + merge", "workers": 2, "wall_s": wall,
                     "ratio": wall / local["shards build", 2]})  # fmt: skip
        cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        try:
            for k in (1, 2):
                if k == 2:
                    cluster.add_node(**NODE)
                cluster.wait_for_nodes()
                for what, build in builds.items():
                    out = tmp / f"{what}-ray-{k}".replace(" ", "_")
                    wall = _timed(lambda o, b=build: b(o, ray=cluster.address), out)
                    reference = tmp / f"{what}-local-1".replace(" ", "_")
                    if _tree(out) != _tree(reference):
                        raise click.ClickException(
                            f"{what} on {k} Ray worker(s) wrote other bytes than the local build"
                        )
                    ratio = wall / local[what, k]
                    rows.append({"build": what, "engine": "ray", "workers": k, "wall_s": wall, "ratio": ratio})
        finally:
            cluster.shutdown()

    click.echo(
        f"bench_cluster: {scenes} scenes of {grid}^3 (shards build), {meshes} meshes to {grid}^3 SDFs with "
        f"synthetic labels (import-meshes); {len(os.sched_getaffinity(0))} CPUs, {platform.machine()}"
    )
    columns = [("build", "<17"), ("engine", "<16"), ("workers", ">7"), ("wall s", ">8.2f"), ("x local", ">8.2f")]
    for line in format_table(columns, [(r["build"], r["engine"], r["workers"], r["wall_s"], r["ratio"]) for r in rows]):
        click.echo(line)
    click.echo("  x local: wall time over the local build's with as many worker processes; every Ray build's bytes")
    click.echo("  and the merged parts' equal the local build's")
    if json_path:
        result = {"scenes": scenes, "grid": grid, "meshes": meshes, "parts": parts, "rows": rows}
        write_atomically(json_path, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
