"""`--ray` of gq shards build and gq import-meshes (common/executor.py) on a real Ray cluster the tests start.

One cluster for the module: a head and a second node, one CPU and a 100 MB object store each, both on
127.0.0.1. Each build runs as its own `gq` process connected to it, as a user's would; its bytes are compared
with the local build's. Without the ray extra only the test that blocks it runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, make_source, random_scene, tree_bytes, write_scene

GQ = [sys.executable, "-m", "gq.tools.cli"]
# Ray resolves 127.0.0.1 in an address to the machine's outward address unless it is told it runs no
# multi-machine cluster: with this, every node, driver and worker talks over 127.0.0.1 only.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "node_ip_address": "127.0.0.1"}


def gq(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*GQ, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator:
    """A Ray cluster of two one-CPU nodes on 127.0.0.1 (its `.address` for --ray), shut down after the module."""
    pytest.importorskip("ray", reason="ray is not installed (the ray extra: pip install -e .[ray])")
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in LOOPBACK}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    os.environ.update(LOOPBACK)  # the nodes' processes inherit it, and so do the gq processes
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        for sig, handler in handlers.items():  # Ray's node leaves its SIGTERM handler in this process after shutdown
            signal.signal(sig, handler)


def _raylets(cluster) -> set[int]:
    return {node.all_processes["raylet"][0].process.pid for node in cluster.list_all_nodes()}


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def _running_task(raylets: set[int]) -> int | None:
    """A worker process of this cluster (a raylet's child) that is running one of the build's tasks."""
    for entry in Path("/proc").iterdir():
        try:
            task = entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::_run_chunk")
            if task and _parent(int(entry.name)) in raylets:
                return int(entry.name)
        except OSError:  # a process that ended while being looked at
            continue
    return None


def _run_killing_a_worker(cluster, args: list) -> tuple[subprocess.CompletedProcess, int | None]:
    """Run `gq ARGS` and SIGKILL the first Ray worker seen running one of its tasks; (result, killed pid)."""
    raylets, killed = _raylets(cluster), []
    process = subprocess.Popen([*GQ, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def hunt() -> None:
        while process.poll() is None and not killed:
            pid = _running_task(raylets)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    hunter = threading.Thread(target=hunt)
    hunter.start()
    stdout, stderr = process.communicate(timeout=300)
    hunter.join()
    result = subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())
    return result, killed[0] if killed else None


def _raw_meshes(raw: Path, bad: bool = False) -> Path:
    """RAW/obj_i/mesh.obj: boxes and a sphere (labelled by our hand model); `bad` adds an unreadable mesh."""
    import trimesh

    for i, extents in enumerate([(1.0, 0.5, 0.7), (0.4, 0.4, 1.2), 0.4, (0.3, 0.8, 0.3), (0.6, 0.6, 0.2)]):
        (raw / f"obj_{i}").mkdir(parents=True)
        mesh = trimesh.creation.icosphere(3, extents) if isinstance(extents, float) else trimesh.creation.box(extents)
        mesh.export(raw / f"obj_{i}" / "mesh.obj")
    if bad:
        (raw / "obj_bad").mkdir()
        (raw / "obj_bad" / "mesh.obj").write_text("this is not a mesh\n")
    return raw


IMPORT = ["--grid", 32, "--label", "synth", "--grasps-per-scene", 40, "--quiet"]
BUILD = ["--grid", 16, "--records-per-shard", 8, "--quiet"]


@pytest.mark.slow  # the cluster's start (~15 s) and a few gq processes connecting to it
def test_shards_build_on_ray_writes_the_local_bytes(cluster, tmp_path: Path):
    source = make_source(tmp_path / "src", 40, grid=16)
    local = gq("shards", "build", source, "--out", tmp_path / "local", *BUILD, "--workers", 2)
    assert local.returncode == 0, local.stderr
    remote = gq("shards", "build", source, "--out", tmp_path / "ray", *BUILD, "--ray", cluster.address)
    assert remote.returncode == 0, remote.stderr
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "local")


@pytest.mark.slow
def test_import_meshes_on_ray_writes_the_local_bytes(cluster, tmp_path: Path):
    pytest.importorskip("mesh2sdf", reason="the meshes extra is not installed")
    raw = _raw_meshes(tmp_path / "raw")
    local = gq("import-meshes", raw, "--out", tmp_path / "local", *IMPORT, "--workers", 1)
    assert local.returncode == 0, local.stderr
    remote = gq("import-meshes", raw, "--out", tmp_path / "ray", *IMPORT, "--ray", cluster.address)
    assert remote.returncode == 0, remote.stderr
    assert "imported 5 of 5 scenes" in remote.stdout and "with 2 worker(s)" in remote.stdout  # the cluster's CPUs
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "local")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["shards", "meshes"])
def test_a_worker_killed_mid_build_changes_nothing(cluster, tmp_path: Path, command: str):
    """SIGKILL of a Ray worker while it runs a task: Ray reruns the task and the bytes are the local build's."""
    if command == "shards":  # enough scenes that tasks run for a while: 320 scenes of 32^3, 8 per task
        source = make_source(tmp_path / "src", 320, grid=32)
        args = ["shards", "build", source, *BUILD[:-1], "--grid", 32]
    else:
        pytest.importorskip("mesh2sdf", reason="the meshes extra is not installed")
        source = _raw_meshes(tmp_path / "raw")
        args = ["import-meshes", source, *IMPORT[:-1], "--grid", 64]
    local = gq(*args, "--out", tmp_path / "local", "--quiet", "--workers", 2)
    assert local.returncode == 0, local.stderr
    result, killed = _run_killing_a_worker(
        cluster, [*args, "--out", tmp_path / "ray", "--quiet", "--ray", cluster.address]
    )
    assert killed is not None, "no Ray worker was seen running a task"
    assert result.returncode == 0, result.stderr
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "local")


@pytest.mark.slow
def test_bad_input_on_ray_is_the_local_one_line_or_skipped(cluster, tmp_path: Path):
    source = make_source(tmp_path / "src", 12, grid=16)
    scene = random_scene(np.random.default_rng(1), 16, 5)
    scene["sdf"][3, 4, 5] = np.nan
    write_scene(source, "scene_bad", **scene)
    runs = [(tmp_path / "src", "shards", "build", source)]
    if _has("mesh2sdf"):
        runs.append((tmp_path / "raw", "import-meshes", _raw_meshes(tmp_path / "raw", bad=True)))
    for _, *command in runs:
        flags = BUILD if command[0] == "shards" else IMPORT
        local = gq(*command, "--out", tmp_path / "local", *flags, "--workers", 1)
        remote = gq(*command, "--out", tmp_path / "ray", *flags, "--ray", cluster.address)
        assert local.returncode == remote.returncode == 2, (local.stderr, remote.stderr)
        lines = remote.stderr.strip().splitlines()
        assert len(lines) == 1 and lines == local.stderr.strip().splitlines(), remote.stderr
        assert "bad" in lines[0]
        assert not (tmp_path / "ray").exists() and not (tmp_path / "local").exists()  # nothing half-written
        local = gq(*command, "--out", tmp_path / "local", *flags, "--workers", 1, "--skip-bad")
        remote = gq(*command, "--out", tmp_path / "ray", *flags, "--ray", cluster.address, "--skip-bad")
        assert local.returncode == remote.returncode == 0, (local.stderr, remote.stderr)
        assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "local")
        assert "bad" in (tmp_path / "ray" / "skipped.jsonl").read_text()
        for out in ("local", "ray"):
            subprocess.run(["rm", "-r", tmp_path / out], check=True)


@pytest.mark.slow  # starts its own cluster: ~30 s
def test_bench_cluster_times_every_row_and_checks_the_bytes(tmp_path: Path):
    pytest.importorskip("ray", reason="ray is not installed (the ray extra: pip install -e .[ray])")
    pytest.importorskip("mesh2sdf", reason="the meshes extra is not installed")
    result = gq("bench", "cluster", "--scenes", 8, "--meshes", 2, "--grid", 16, "--json", tmp_path / "b.json")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    builds = ["shards build", *(f"import ({b})" for b in ("mesh2sdf", "warp") if b != "warp" or find_spec("warp"))]
    combos = {(b, e, k) for b in builds for e in ("local", "ray") for k in (1, 2)} | {
        ("shards build", "4 parts + merge", 2)
    }
    assert {(r["build"], r["engine"], r["workers"]) for r in rows} == combos and len(rows) == len(combos)
    assert all(r["wall_s"] > 0 and r["ratio"] > 0 for r in rows)
    assert "every Ray build's bytes" in result.stdout


def test_an_address_where_no_cluster_answers_is_one_line(tmp_path: Path):
    pytest.importorskip("ray", reason="ray is not installed (the ray extra: pip install -e .[ray])")
    source = make_source(tmp_path / "src", 3, grid=16)
    with socket.socket() as closed:  # a port of 127.0.0.1 that nothing listens on
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    result = gq("shards", "build", source, "--out", tmp_path / "out", "--grid", 16, "--quiet", "--ray", address)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"--ray {address}: no Ray cluster answers there" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- without the ray extra: --help works, --ray is one line naming the pip command, nothing is written ----------

WITHOUT_RAY = """
import runpy, sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "ray":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_ray_option_without_the_extra_names_the_pip_command(tmp_path: Path):
    def without_ray(*args) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", WITHOUT_RAY, "gq.tools.cli", *map(str, args)]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)

    for command in (["shards", "build"], ["import-meshes"]):
        result = without_ray(*command, "--help")
        assert result.returncode == 0 and "--ray [ADDRESS]" in result.stdout, result.stderr
    source = make_source(tmp_path / "src", 3, grid=16)
    commands = [["shards", "build", source, "--grid", 16]]
    if _has("mesh2sdf"):
        commands.append(["import-meshes", _raw_meshes(tmp_path / "raw"), "--label", "synth"])
    for command in commands:
        result = without_ray(*command, "--out", tmp_path / "out", "--quiet", "--ray")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert ": error: ray is not installed" in lines[0] and "pip install 'gq-pipeline[ray]'" in lines[0], lines
        assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
