"""The ownership rule (gq.common.ownership): every writing command records what it wrote, and --overwrite
removes only that, refusing in one line, untouched, a folder holding anything else (issue 17, items 2-4, 15).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import REPO, load_tool, tree_bytes

from gq.common.ownership import RECORD, Owned, OwnershipError, check_replaceable, remove_owned, write_record
from gq.tools.training import cli

trimesh = pytest.importorskip("trimesh")
pytest.importorskip("mesh2sdf")

GRID = 16
TINY = ["--base-channels", "2", "--fc-dims", "8", "--threads", "1", "--quiet", "-S", "2", "-G", "4"]


def one_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _raw(root: Path, scenes: int = 2) -> Path:
    """RAW/<scene>/{mesh.obj, recording.npz}: boxes with a few recorded grasps."""
    rng = np.random.default_rng(0)
    for i in range(scenes):
        folder = root / f"obj_{i}"
        folder.mkdir(parents=True)
        trimesh.creation.box(extents=(1.0, 0.6 + 0.1 * i, 0.8)).export(folder / "mesh.obj")
        np.savez(folder / "recording.npz", grasps=rng.uniform(-1, 1, (6, 19)), scores=rng.uniform(0, 5, 6))
    return root


def import_meshes(raw: Path, out: Path, *flags):
    return CliRunner().invoke(
        load_tool("import_meshes.py").main, [str(raw), "--out", str(out), "--grid", str(GRID), "--quiet", *flags]
    )


# --- the mechanism ------------------------------------------------------------------------------


def test_overwrite_removes_only_recorded_entries_and_never_follows_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("mine")
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "a.log").write_text("log")
    (out / "data" / "scenes").mkdir(parents=True)
    write_record(out / "data" / "scenes", tool="make_scenes", entries=["s/scene.npz"])
    (out / "data" / "scenes" / "s").mkdir()
    (out / "data" / "scenes" / "s" / "scene.npz").write_bytes(b"npz")
    (out / "summary.json").write_text("{}")
    (out / ".summary.json.x1y2.tmp").write_text("{")  # a temporary of a recorded file: ours too
    owned = write_record(out, tool="check", entries=["summary.json", "logs/", "data/scenes", "compare"])
    assert check_replaceable(out, tool="check", overwrite=True) == owned
    (out / "compare").symlink_to(outside)
    with pytest.raises(OwnershipError, match=r"holds 'compare', which check did not write"):
        check_replaceable(out, tool="check", overwrite=True)
    (out / "compare").unlink()
    (out / "data" / "scenes" / "s" / "notes.txt").write_text("mine")  # inside a nested record's folder
    with pytest.raises(OwnershipError, match=r"holds 'data/scenes/s/notes.txt'"):
        check_replaceable(out, tool="check", overwrite=True)
    with pytest.raises(OwnershipError, match="written by check, not fit"):
        check_replaceable(out, tool="fit", overwrite=True)
    (out / "data" / "scenes" / "s" / "notes.txt").unlink()
    (out / "logs" / "link").symlink_to(outside)  # inside a folder owned whole: unlinked, never followed
    with pytest.raises(OwnershipError, match="pass --overwrite"):
        check_replaceable(out, tool="check", overwrite=False)
    remove_owned(out, owned)
    assert not out.exists() and (outside / "precious.txt").read_text() == "mine"


def test_a_folder_without_a_record_is_refused_unless_its_old_layout_is_recognised(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("x")
    with pytest.raises(OwnershipError, match=rf"holds 'a.txt', which tool did not write \(no {RECORD}"):
        check_replaceable(out, tool="tool", overwrite=True)
    legacy = check_replaceable(out, tool="tool", overwrite=True, legacy=lambda p: Owned("tool", frozenset(["a.txt"])))
    assert legacy.entries == {"a.txt"}
    assert check_replaceable(tmp_path / "absent", tool="tool", overwrite=False) is None


# --- item 2: import_meshes --overwrite --------------------------------------------------------------


def test_import_meshes_overwrite_keeps_what_it_did_not_write(tmp_path: Path) -> None:
    raw, out = _raw(tmp_path / "raw"), tmp_path / "out"
    assert import_meshes(raw, out).exit_code == 0
    assert json.loads((out / RECORD).read_text())["tool"] == "import_meshes"
    make_dataset_inside = out / "shards"
    (make_dataset_inside).mkdir()
    (make_dataset_inside / "manifest.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = tree_bytes(out)
    line = one_line(import_meshes(raw, out, "--overwrite"))
    assert f"--out {out}: holds 'notes.txt', which import_meshes did not write" in line
    assert tree_bytes(out) == before
    (out / "notes.txt").unlink()
    (make_dataset_inside / "manifest.json").unlink()
    make_dataset_inside.rmdir()
    assert import_meshes(raw, out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [RECORD, "mesh_max_extent.txt", "obj_0", "obj_1"]


def test_import_meshes_overwrite_of_an_import_made_before_records(tmp_path: Path) -> None:
    """An older import (no record) is recognised only by its exact layout; anything more is refused."""
    raw, out = _raw(tmp_path / "raw"), tmp_path / "out"
    assert import_meshes(raw, out).exit_code == 0
    (out / RECORD).unlink()
    (out / "obj_0" / "notes.txt").write_text("mine")
    line = one_line(import_meshes(raw, out, "--overwrite"))
    assert "holds 'mesh_max_extent.txt', which import_meshes did not write" in line
    (out / "obj_0" / "notes.txt").unlink()
    assert import_meshes(raw, out, "--overwrite").exit_code == 0


# --- item 15: a killed import_meshes leaves a temporary folder; the next run removes it, and only it ----


def test_a_killed_import_leaves_a_temporary_that_the_next_run_removes(tmp_path: Path) -> None:
    raw, out = _raw(tmp_path / "raw", scenes=3), tmp_path / "out"
    kill = (
        "import os, signal, sys\n"
        "import gq.meshes.raw as r\n"
        "real = r._convert\n"
        "def convert(task):\n"
        "    if task[2]['name'] == 'obj_1':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(task)\n"
        "r._convert = convert\n"
        "r.import_meshes(sys.argv[1], sys.argv[2], r.ImportOptions(grid=16), workers=1, progress=False)\n"
    )
    killed = subprocess.run([sys.executable, "-c", kill, str(raw), str(out)], cwd=REPO, capture_output=True)
    assert killed.returncode == -9, killed.stderr
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name.endswith(".tmp")]
    assert len(left) == 1 and (left[0] / "obj_0" / "scene.npz").exists() and (left[0] / RECORD).exists()
    theirs = tmp_path / ".out.mine.tmp"  # same shape of name, no record: not provably ours, it stays
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert import_meshes(raw, out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.mine.tmp", "out", "raw"]
    assert (theirs / "notes.txt").read_text() == "mine"


# --- item 3: the GPU check's --overwrite ------------------------------------------------------------


@pytest.mark.parametrize("case", ["user_file_in_data", "compare_symlink"])
def test_gpu_check_overwrite_refuses_what_it_did_not_write(case: str, tmp_path: Path) -> None:
    from gq.benchmarks.gpu_check import ENTRIES, TOOL

    out = tmp_path / "check"
    (out / "data" / "scenes").mkdir(parents=True)
    (out / "logs").mkdir()
    (out / "logs" / "make_scenes.log").write_text("log")
    write_record(out, tool=TOOL, entries=ENTRIES)  # as an earlier check leaves it
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "results.json").write_text("mine")
    if case == "user_file_in_data":
        (out / "data" / "notes.txt").write_text("mine")
        named = "data/notes.txt"
    else:
        (out / "compare").symlink_to(outside)
        named = "compare"
    before = tree_bytes(out)
    script = REPO / "benchmarks" / "gpu_check.py"
    result = subprocess.run(
        [sys.executable, str(script), str(out), "--device", "cpu", "--quick", "--overwrite"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and f"holds '{named}', which gpu_check did not write" in result.stderr
    assert "Traceback" not in result.stderr
    assert tree_bytes(out) == before and (outside / "results.json").read_text() == "mine"


# --- item 4: fit --overwrite ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(shared_dataset) -> Path:
    return shared_dataset(24, grid=GRID, grasps=16, seed=1, records_per_shard=8)


def fit(shards: Path, out: Path, *flags):
    args = ["fit", "--shards", str(shards), "--out", str(out), *TINY, *map(str, flags)]
    return CliRunner().invoke(cli, args, prog_name="run.py")


def test_fit_overwrite_refuses_another_tools_config_and_tensorboard(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "theirs"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"their curves")
    (out / "config.json").write_text(json.dumps({"model": "theirs", "lr": 0.1}))
    before = tree_bytes(out)
    line = one_line(fit(shards, out, "--max-steps", 1, "--overwrite"))
    assert f"--out {out}: holds " in line and "which fit did not write" in line
    assert tree_bytes(out) == before


def test_fit_overwrite_removes_its_run_and_nothing_else(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert fit(shards, out, "--max-steps", 1).exit_code == 0
    assert json.loads((out / RECORD).read_text())["tool"] == "fit"
    (out / "notes.txt").write_text("mine")
    line = one_line(fit(shards, out, "--max-steps", 1, "--overwrite"))
    assert "holds 'notes.txt', which fit did not write" in line and (out / "notes.txt").exists()
    os.unlink(out / "notes.txt")
    assert fit(shards, out, "--max-steps", 1, "--overwrite").exit_code == 0
    assert (out / "last.pt").exists() and (out / "config.json").exists()


def test_make_scenes_overwrite_of_scenes_made_before_records(tmp_path: Path) -> None:
    """Scenes without a record are recognised only as make_scenes' exact layout (scene_NNNNNN/scene.npz)."""
    out = tmp_path / "scenes"
    scenes = load_tool("make_scenes.py").main
    args = ["--scenes", "2", "--grid", "16", "--grasps-per-scene", "8", "--out", str(out), "--workers", "1"]
    assert CliRunner().invoke(scenes, args).exit_code == 0
    (out / RECORD).unlink()
    (out / "scene_000001" / "notes.txt").write_text("mine")
    before = tree_bytes(out)
    line = one_line(CliRunner().invoke(scenes, [*args, "--overwrite"]))
    assert "holds 'scene_000000', which make_scenes did not write" in line and tree_bytes(out) == before
    (out / "scene_000001" / "notes.txt").unlink()
    assert CliRunner().invoke(scenes, [*args, "--overwrite"]).exit_code == 0
    assert json.loads((out / RECORD).read_text())["entries"] == ["scene_000000/scene.npz", "scene_000001/scene.npz"]


def test_a_second_import_into_one_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    from gq.common.ownership import Lock

    raw, out = _raw(tmp_path / "raw"), tmp_path / "out"
    with Lock(out, tool="import_meshes"):  # as a running import holds it
        line = one_line(import_meshes(raw, out))
    assert f"--out {out}: another import_meshes is writing it (pid {os.getpid()} on " in line
    assert not out.exists()
    assert import_meshes(raw, out).exit_code == 0  # released: free again


def test_predict_replaces_only_a_predictions_file(tmp_path: Path) -> None:
    """predict's record is inside its one file (Parquet metadata): another tool's Parquet file is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gq.train.predict import Predictions, check_out, write_parquet

    ours, theirs = tmp_path / "ours.parquet", tmp_path / "theirs.parquet"
    one = np.ones(2, np.float32)
    write_parquet(Predictions(np.array(["a", "b"], object), np.arange(2, dtype=np.int32), one, one), ours)
    check_out(ours, overwrite=True)
    with pytest.raises(OwnershipError, match="exists; pass --overwrite"):
        check_out(ours, overwrite=False)
    pq.write_table(pa.table({"scene": ["a"], "loss": [1.0]}), theirs)
    with pytest.raises(OwnershipError, match="is not a Parquet file that predict wrote"):
        check_out(theirs, overwrite=True)
    (tmp_path / "link.parquet").symlink_to(ours)
    with pytest.raises(OwnershipError, match="not a plain file"):
        check_out(tmp_path / "link.parquet", overwrite=True)
