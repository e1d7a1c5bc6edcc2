"""The ownership rule (gq.common.ownership): every writing command records what it wrote, and --overwrite
removes only that, refusing in one line, untouched, a folder holding anything else (issue 17, items 2-4, 15);
no record: never removed; temporaries found by the id the lock records; nested records; changed files kept
(issue 22, items 1, 3, 9, 11, 12).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import REPO, load_tool, tree_bytes

from gq.common.ownership import (
    RECORD,
    OwnershipError,
    check_replaceable,
    lock_path,
    noted_temporary,
    remove_owned,
    write_record,
)
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


def test_a_folder_without_a_record_is_never_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(OwnershipError, match=rf"holds 'a.txt' and no {RECORD} says tool wrote it") as refused:
            check_replaceable(out, tool="tool", overwrite=overwrite)
        assert f"delete it by hand (rm -r {out}) if you no longer need it" in str(refused.value)
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


def test_import_meshes_overwrite_refuses_the_seeds_processed_folder(tmp_path: Path) -> None:
    """Issue 22 item 1: object folders with scene.npz and a mesh_max_extent.txt, no record (the seed's own
    processed layout, which an import made before records also had): never removed, one line how to by hand."""
    raw, seedproc = _raw(tmp_path / "raw"), tmp_path / "seedproc"
    assert import_meshes(raw, seedproc).exit_code == 0
    (seedproc / RECORD).unlink()
    assert sorted(p.name for p in seedproc.iterdir()) == ["mesh_max_extent.txt", "obj_0", "obj_1"]
    before = tree_bytes(seedproc)
    line = one_line(import_meshes(raw, seedproc, "--overwrite"))
    assert f"--out {seedproc}: holds 'mesh_max_extent.txt' and no {RECORD} says import_meshes wrote it" in line
    assert f"rm -r {seedproc}) if you no longer need it" in line
    assert tree_bytes(seedproc) == before and sorted(p.name for p in tmp_path.iterdir()) == ["raw", "seedproc"]


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
    assert noted_temporary(out) == left[0]  # its id is in the lock file that the killed run left
    theirs = tmp_path / ".out.mine.tmp"  # same shape of name, no record: not provably ours, it stays
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert import_meshes(raw, out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.mine.tmp", "out", "raw"]
    assert (theirs / "notes.txt").read_text() == "mine"


def make_scenes(out: Path, *flags, scenes: int = 2):
    args = ["--scenes", str(scenes), "--grid", "16", "--grasps-per-scene", "8", "--out", str(out), "--workers", "1"]
    return CliRunner().invoke(load_tool("make_scenes.py").main, [*args, *flags])


def test_a_copy_of_an_owned_folder_named_like_a_temporary_is_kept(tmp_path: Path) -> None:
    """Issue 22 item 3: `cp -r scenes .ksb.backup.tmp` carries the record and has a temporary's shape of
    name; only the temporary whose id the lock records is ever removed, so the copy stays."""
    assert make_scenes(tmp_path / "scenes").exit_code == 0
    backup = tmp_path / ".ksb.backup.tmp"
    shutil.copytree(tmp_path / "scenes", backup)
    before = tree_bytes(backup)
    assert make_scenes(tmp_path / "ksb", scenes=4).exit_code == 0
    assert tree_bytes(backup) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ksb.backup.tmp", "ksb", "scenes"]


# --- issue 22 item 9: what a user writes into the output during a rebuild ---------------------------------


def _writing_during_the_build(monkeypatch: pytest.MonkeyPatch, write) -> None:
    """Run `write` while make_scenes generates its scenes (the old output is still in place then)."""
    import gq.synth.writer as writer

    real = writer._generate

    def generate(*args, **kwargs):
        write()
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "_generate", generate)


def test_a_file_written_into_the_output_during_a_rebuild_is_kept_in_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "rc1"
    assert make_scenes(out).exit_code == 0
    _writing_during_the_build(monkeypatch, lambda: (out / "notes.txt").write_text("mine"))
    assert make_scenes(out, "--overwrite", scenes=3).exit_code == 0
    assert (out / "notes.txt").read_text() == "mine"  # moved into the new output, not hidden in a temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rc1"]
    assert json.loads((out / RECORD).read_text())["entries"] == [f"scene_00000{i}/scene.npz" for i in range(3)]


def test_a_recorded_file_changed_during_a_rebuild_refuses_the_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "rc1"
    assert make_scenes(out).exit_code == 0
    mine = out / "scene_000000" / "scene.npz"
    _writing_during_the_build(monkeypatch, lambda: mine.write_bytes(b"my edit"))
    line = one_line(make_scenes(out, "--overwrite"))
    assert f"--out {out}: 'scene_000000/scene.npz' was written there during the build" in line
    assert mine.read_bytes() == b"my edit" and sorted(p.name for p in tmp_path.iterdir()) == ["rc1"]


# --- issue 22 item 12: a record is a claim -----------------------------------------------------------------


def test_overwrite_keeps_a_file_changed_since_it_was_recorded(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert make_scenes(a).exit_code == 0 and make_scenes(b).exit_code == 0
    record = (a / RECORD).read_bytes()
    assert record == (b / RECORD).read_bytes()  # deterministic: no time, no pid
    files = json.loads(record)["files"]
    npz = a / "scene_000001" / "scene.npz"
    assert sorted(files) == ["scene_000000/scene.npz", "scene_000001/scene.npz"]
    assert files["scene_000001/scene.npz"].startswith(f"{npz.stat().st_size}:")
    data = bytearray(npz.read_bytes())
    data[-1] ^= 1  # same size, other content
    npz.write_bytes(bytes(data))
    before = tree_bytes(a)
    line = one_line(make_scenes(a, "--overwrite"))
    assert f"--out {a}: holds 'scene_000001/scene.npz', changed since make_scenes wrote it (1 such entry)" in line
    assert tree_bytes(a) == before


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
    assert f"--out {out}: holds 'config.json' and no {RECORD} says fit wrote it" in line
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


def test_fit_overwrite_honours_a_record_nested_in_its_run(shards: Path, tmp_path: Path) -> None:
    """Issue 22 item 11: tensorboard/ is fit's whole, but a scenes folder with its own record put inside it is
    not: --overwrite refuses in one line naming it, and removes nothing."""
    run = tmp_path / "run"
    assert fit(shards, run, "--max-steps", 1).exit_code == 0
    scenes = run / "tensorboard" / "scenes"
    assert make_scenes(scenes).exit_code == 0
    before = tree_bytes(run)
    line = one_line(fit(shards, run, "--max-steps", 1, "--overwrite"))
    assert f"--out {run}: holds 'tensorboard/scenes', which fit did not write" in line
    assert tree_bytes(run) == before


def test_a_finished_run_claims_its_files_and_overwrite_keeps_a_changed_one(shards: Path, tmp_path: Path) -> None:
    """Issue 22 items 1 and 12 for fit: a run folder without a record is never removed; a finished run's
    record holds each file's size and hash, and a file changed since is kept."""
    run = tmp_path / "run"
    assert fit(shards, run, "--max-steps", 1).exit_code == 0
    files = json.loads((run / RECORD).read_text())["files"]
    assert {"config.json", "metrics.jsonl", "last.pt", "summary.json"} <= set(files)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "note": "mine"}\n')
    before = tree_bytes(run)
    line = one_line(fit(shards, run, "--max-steps", 1, "--overwrite"))
    assert "holds 'metrics.jsonl', changed since fit wrote it" in line and tree_bytes(run) == before
    (run / RECORD).unlink()  # an older run's folder, or a user's that looks like one
    before = tree_bytes(run)
    line = one_line(fit(shards, run, "--max-steps", 1, "--overwrite"))
    assert f"no {RECORD} says fit wrote it" in line and f"rm -r {run})" in line and tree_bytes(run) == before


def test_make_scenes_overwrite_refuses_scenes_without_a_record(tmp_path: Path) -> None:
    out = tmp_path / "scenes"
    assert make_scenes(out).exit_code == 0
    (out / RECORD).unlink()
    before = tree_bytes(out)
    line = one_line(make_scenes(out, "--overwrite"))
    assert f"holds 'scene_000000' and no {RECORD} says make_scenes wrote it" in line and tree_bytes(out) == before


def test_the_lock_holder_text_left_by_a_killed_run_is_replaced_whole(tmp_path: Path) -> None:
    """A killed holder leaves its (long) text in the lock file; the next holder's text replaces it, no tail."""
    from gq.train.rundir import run_lock

    out = tmp_path / "run"
    hold_and_die = (
        "import os, signal, sys\n"
        "from gq.train.rundir import run_lock\n"
        "held = run_lock(sys.argv[1])\n"
        "held.__enter__()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", hold_and_die, str(out), "x" * 4000], cwd=REPO)
    assert killed.returncode == -9
    with run_lock(out):
        texts = [p.read_text() for p in (lock_path(out), out / ".run.lock") if p.exists()]
    assert len(texts) == 1 and "xxxx" not in texts[0] and str(os.getpid()) in texts[0], texts
    assert len(texts[0].strip().splitlines()) == 1


def test_a_second_import_into_one_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    from gq.common.ownership import Lock

    raw, out = _raw(tmp_path / "raw"), tmp_path / "out"
    with Lock(out, tool="import_meshes"):  # as a running import holds it
        line = one_line(import_meshes(raw, out))
    assert f"--out {out}: in use by another import_meshes (pid {os.getpid()} on " in line
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
    pq.write_table(pq.read_table(ours).replace_schema_metadata(None), theirs)  # predict's columns, no record
    with pytest.raises(OwnershipError, match="is not a Parquet file that predict wrote"):
        check_out(theirs, overwrite=True)
    (tmp_path / "link.parquet").symlink_to(ours)
    with pytest.raises(OwnershipError, match="not a plain file"):
        check_out(tmp_path / "link.parquet", overwrite=True)
