"""Every file gq reads is a regular file of a bounded size: a FIFO (which would hang the reader waiting for a
writer) or a device such as /dev/zero (which never ends) given in its place is refused in one line.

Each case runs `gq` as its own process with a timeout, so a hang fails the test instead of stopping the suite,
and with its address space bounded, so an endless read fails it instead of exhausting the machine's memory.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import FIXTURES, REPO, make_source

SEED_CHECKPOINT = FIXTURES / "seed_gqestimator_c4_fc32-16.pth"


def _bounded() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def gq(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    """`gq ARGS` as a process of its own, in at most 8 GiB of address space and `timeout` seconds."""
    cmd = [sys.executable, "-m", "gq.tools.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, preexec_fn=_bounded)


def refused(result: subprocess.CompletedProcess, path: Path, kind: str) -> str:
    """The one stderr line of a command that refused `path` as `kind` (a FIFO, a character device)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], result.stderr
    named = str(path) in lines[0] or str(path.resolve()) in lines[0]  # a link to /dev/zero may be named by its target
    assert named and kind in lines[0] and "not a regular file" in lines[0], lines[0]
    return lines[0]


def special(path: Path, kind: str) -> tuple[Path, str]:
    """`path` made a FIFO, or a link to /dev/zero; returns it and the word the refusal uses for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
        return path, "FIFO"
    path.symlink_to("/dev/zero")
    return path, "character device"


KINDS = ["fifo", "devzero"]


@pytest.fixture(scope="module")
def dataset(shared_dataset) -> Path:
    return shared_dataset(6, grid=16, grasps=8, seed=1, records_per_shard=2)  # read only: tests link to its files


@pytest.mark.parametrize("kind", KINDS)
def test_a_scene_npz_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    source = make_source(tmp_path / "src", scenes=3)
    path, word = special(source / "scene_001" / "scene.npz", kind)
    refused(gq("shards", "build", source, "--out", tmp_path / "ds", "--grid", 16, "--quiet"), path, word)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_splits_file_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    source = make_source(tmp_path / "src", scenes=3)
    path, word = special(tmp_path / "splits.json", kind)
    args = ("shards", "build", source, "--out", tmp_path / "ds", "--grid", 16, "--splits", path, "--quiet")
    line = refused(gq(*args), path, word)
    assert "--splits" in line and not (tmp_path / "ds").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_config_file_that_is_not_a_regular_file_is_refused(dataset: Path, tmp_path: Path, kind: str) -> None:
    path, word = special(tmp_path / "fit.yaml", kind)
    line = refused(gq("fit", "--config", path, "--shards", dataset, "--out", tmp_path / "run"), path, word)
    assert "--config" in line and not (tmp_path / "run").exists()


def test_a_config_file_too_large_to_be_one_is_refused(dataset: Path, tmp_path: Path) -> None:
    path = tmp_path / "fit.yaml"
    with open(path, "wb") as f:
        f.truncate(65 << 20)  # sparse: 65 MiB of nothing
    result = gq("fit", "--config", path, "--shards", dataset, "--out", tmp_path / "run")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "68,157,440 bytes, more than the 67,108,864" in result.stderr


@pytest.mark.parametrize("name", ["manifest.json", "scenes.parquet"])
def test_a_dataset_file_that_is_not_a_regular_file_is_refused(dataset: Path, tmp_path: Path, name: str) -> None:
    copy = tmp_path / "ds"
    copy.mkdir()
    for f in dataset.iterdir():
        (copy / f.name).symlink_to(f)
    path, word = special(copy / name, "fifo")
    result = gq("shards", "verify", copy)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert f"{path}: is a FIFO (named pipe), not a regular file" in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["mesh.obj", "recording.npz"])
def test_import_meshes_refuses_a_mesh_or_recording_that_is_not_a_regular_file(tmp_path: Path, name: str) -> None:
    trimesh = pytest.importorskip("trimesh")
    pytest.importorskip("mesh2sdf")
    raw = tmp_path / "raw" / "box"
    raw.mkdir(parents=True)
    trimesh.creation.box(extents=(1, 1, 1)).export(raw / "mesh.obj")
    np.savez(raw / "recording.npz", grasps=np.zeros((4, 19), np.float32), scores=np.zeros(4, np.float32))
    path, word = special(raw / name, "fifo")
    refused(gq("import-meshes", tmp_path / "raw", "--out", tmp_path / "out", "--grid", 16, "--quiet"), path, word)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["--grasps", "--mesh"])
def test_predict_refuses_a_mesh_or_grasps_file_that_is_not_a_regular_file(tmp_path: Path, which: str) -> None:
    trimesh = pytest.importorskip("trimesh")
    pytest.importorskip("mesh2sdf")
    trimesh.creation.box(extents=(1, 1, 1)).export(tmp_path / "box.obj")
    np.save(tmp_path / "g.npy", np.zeros((4, 19), np.float32))
    files = {"--mesh": tmp_path / "box.obj", "--grasps": tmp_path / "g.npy"}
    path, word = special(files[which], "fifo")
    args = ["--mesh", files["--mesh"], "--grasps", files["--grasps"], "--out", tmp_path / "p.parquet"]
    refused(gq("predict", SEED_CHECKPOINT, *args, "--device", "cpu"), path, word)
    assert not (tmp_path / "p.parquet").exists()


def test_an_output_folder_holding_a_fifo_manifest_is_refused_not_waited_on(tmp_path: Path) -> None:
    source = make_source(tmp_path / "src", scenes=3)
    (tmp_path / "ds").mkdir()
    special(tmp_path / "ds" / "manifest.json", "fifo")
    result = gq("shards", "build", source, "--out", tmp_path / "ds", "--grid", 16, "--quiet", "--overwrite", timeout=30)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (tmp_path / "ds" / "manifest.json").exists()
