"""make_shards never loses data and never stores wrong data (issue 9, shard side).

Each test is one case of the issue: what --overwrite / --resume may remove, the staging build that
replaces --out only when complete, the lock, values as stored, verify's recomputed statistics,
source listing and splits checks, resume's source re-check, a full disk, absurd headers and flags.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import REPO, load_tool, make_source, random_scene, run_tool, tmpfs, tree_bytes, write_scene

from gq.common.ownership import lock_path
from gq.shards import ShardReader, fingerprint, verify
from gq.shards.outdir import unfinished_build

GRID = 16


MAKE = load_tool("make_shards.py").main


def make(src: Path, out: Path, *args):
    """make_shards in-process (click's CliRunner): exit code and stderr lines."""
    result = CliRunner().invoke(
        MAKE, [str(src), "--out", str(out), "--grid", str(GRID), "--quiet", "--workers", "2", *map(str, args)]
    )
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.output)
    return lines[0]


def leftovers(out: Path) -> list[Path]:
    return [p for p in (unfinished_build(out), lock_path(out)) if p is not None and p.exists()]


def staging(out: Path) -> Path:
    """The build folder that the lock beside `out` names (a running or killed build's)."""
    work = unfinished_build(out)
    assert work is not None, "the lock beside --out should name the unfinished build"
    return work


# --- what --overwrite and --resume may remove --------------------------------------------------


def _foreign(kind: str, root: Path, src: Path) -> Path:
    out = root / kind
    if kind == "web_project_manifest":
        (out / "src").mkdir(parents=True)
        (out / "manifest.json").write_text(json.dumps({"name": "my-web-app", "start_url": "/"}))
        (out / "src" / "app.js").write_text("console.log('mine')")
    elif kind == "build_folder_and_thesis":
        (out / ".build").mkdir(parents=True)
        (out / "thesis.tex").write_text("\\chapter{mine}")
    elif kind == "dataset_plus_notes":
        assert make(src, out).exit_code == 0
        (out / "notes.txt").write_text("mine")
    elif kind == "unfinished_build_plus_notes":
        (out / ".build").mkdir(parents=True)
        (out / ".build" / "journal.jsonl").write_text(json.dumps({"format": "gq-shards", "args": {}}) + "\n")
        (out / "notes.txt").write_text("mine")
    return out


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
@pytest.mark.parametrize(
    "kind", ["web_project_manifest", "build_folder_and_thesis", "dataset_plus_notes", "unfinished_build_plus_notes"]
)
def test_only_our_datasets_are_removed_or_resumed(kind: str, flag: str, small_source: Path, tmp_path: Path) -> None:
    out = _foreign(kind, tmp_path, small_source)
    before = tree_bytes(out)
    line = one_line(make(small_source, out, flag))
    named = {
        "web_project_manifest": "manifest.json",
        "build_folder_and_thesis": ".build",
        "dataset_plus_notes": "notes.txt",
        "unfinished_build_plus_notes": ".build",  # a folder without a record: never removed, whatever it holds
    }[kind]
    assert f"--out {out}: holds '{named}'" in line
    assert "which make_shards did not write" in line or f"rm -r {out}) if you no longer need it" in line
    assert tree_bytes(out) == before and (kind != "build_folder_and_thesis" or (out / ".build").is_dir())
    assert leftovers(out) == []


@pytest.mark.parametrize("where", ["beside_source", "inside_source"])
def test_failed_rebuild_leaves_the_old_dataset(where: str, small_source: Path, tmp_path: Path) -> None:
    out = small_source / "ds" if where == "inside_source" else tmp_path / "ds"
    assert make(small_source, out, "--records-per-shard", 4).exit_code == 0
    before = tree_bytes(out)
    assert ShardReader(out).num_scenes == 11  # OUT inside SOURCE is not a scene
    bad = small_source / "scene_005" / "scene.npz"
    good = bad.read_bytes()
    bad.write_bytes(b"garbage")
    line = one_line(make(small_source, out, "--records-per-shard", 4, "--overwrite"))
    assert str(bad) in line and "corrupt npz" in line
    assert tree_bytes(out) == before and leftovers(out) == []
    bad.write_bytes(good)
    assert make(small_source, out, "--records-per-shard", 2, "--overwrite").exit_code == 0
    reader = ShardReader(out)
    assert reader.num_scenes == 11 and reader.manifest.records_per_shard == 2
    assert verify(out).problems == [] and leftovers(out) == []


def test_overwrite_where_the_file_system_cannot_exchange(
    small_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ds"
    assert make(small_source, out, "--limit", 4).exit_code == 0
    monkeypatch.setattr("gq.common.ownership._exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    assert make(small_source, out, "--overwrite").exit_code == 0
    assert ShardReader(out).num_scenes == 11 and verify(out).problems == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]


# --- killed builds, resume, the lock (real processes) -------------------------------------------


# make_shards with the read of scene_025 stalled: its worker waits for ever at that scene (a FIFO in its place,
# the way a stalled network file system would block, is refused as not a regular file).
_STALLED = """
import runpy, sys, time
import gq.shards.build as build
read = build.load_record
build.load_record = lambda source, name, *a: time.sleep(3600) if name == "scene_025" else read(source, name, *a)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _stalled_build(src: Path, out: Path, *args) -> subprocess.Popen:
    """Start make_shards with the read of scene_025 stalled, and return once shards are journalled."""
    cmd = [
        sys.executable,
        "-c",
        _STALLED,
        str(REPO / "tools" / "make_shards.py"),
        str(src),
        "--out",
        str(out),
        "--grid",
        str(GRID),
        "--records-per-shard",
        "4",
        "--workers",
        "2",
        "--quiet",
        *map(str, args),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = None
    lines, stable_since, deadline = 0, time.time(), time.time() + 60
    while time.time() < deadline and (lines < 3 or time.time() - stable_since < 1.0):
        work = unfinished_build(out)
        journal = work / ".build" / "journal.jsonl" if work is not None else None
        now = len(journal.read_text().splitlines()) if journal is not None and journal.exists() else 0
        if now != lines:
            lines, stable_since = now, time.time()
        time.sleep(0.02)
    if lines < 3:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("the build should have completed some shards (in its staging directory) before stalling")
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_rebuild_keeps_old_dataset_and_resumes_byte_identical(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", scenes=30)
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert make(src, ref, "--records-per-shard", 4).exit_code == 0
    assert make(src, out, "--records-per-shard", 4, "--limit", 5).exit_code == 0
    old = tree_bytes(out)
    _kill(_stalled_build(src, out, "--overwrite"))
    assert tree_bytes(out) == old and verify(out).problems == []  # SIGKILL mid-rebuild: the old dataset is whole
    assert (staging(out) / ".build" / "spill-sdf.bin").stat().st_size  # the spilled records, kept for --resume
    refused = one_line(make(src, out, "--records-per-shard", 4))
    assert "--resume" in refused
    resumed = make(src, out, "--records-per-shard", 4, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert tree_bytes(out) == tree_bytes(ref) and leftovers(out) == []
    assert "already a finished dataset" in one_line(make(src, ref, "--records-per-shard", 8, "--resume"))


def test_resume_refuses_a_changed_source_scene(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", scenes=30)
    out = tmp_path / "out"
    _kill(_stalled_build(src, out))
    journal = (staging(out) / ".build" / "journal.jsonl").read_text().splitlines()
    kept = json.loads(journal[1])["source"]["name"]  # the first journalled scene
    write_scene(src, kept, **random_scene(np.random.default_rng(7), GRID, 5))
    before = tree_bytes(staging(out))
    line = one_line(make(src, out, "--records-per-shard", 4, "--resume"))
    assert str(src / kept / "scene.npz") in line and "changed since" in line and "--overwrite" in line
    assert tree_bytes(staging(out)) == before  # the refused resume left the unfinished build alone
    assert make(src, out, "--records-per-shard", 4, "--overwrite").exit_code == 0
    assert ShardReader(out).num_scenes == 30 and leftovers(out) == []


def test_second_build_into_one_directory_is_refused_naming_the_holder(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", scenes=30)
    out = tmp_path / "out"
    holder = _stalled_build(src, out)
    try:
        staged = tree_bytes(staging(out))
        for flags in ([], ["--resume"], ["--overwrite"]):
            second = run_tool(
                "make_shards.py", src, "--out", out, "--grid", GRID, "--records-per-shard", 4, "--quiet", *flags
            )
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 2 and len(lines) == 1, second.stderr
            assert f"pid {holder.pid} on {socket.gethostname()}" in lines[0] and "make_shards.py" in lines[0]
            assert "started 20" in lines[0] and str(out) in lines[0]
            assert tree_bytes(staging(out)) == staged and holder.poll() is None
    finally:
        _kill(holder)
    resumed = make(src, out, "--records-per-shard", 4, "--resume")  # a killed holder's lock is free again
    assert resumed.exit_code == 0, resumed.output


# --- values and labels as stored ---------------------------------------------------------------


@pytest.mark.parametrize("case", ["score_1e39", "grasp_1e300", "sdf_1e39_float32"])
def test_values_finite_in_float64_but_not_as_stored_are_bad(case: str, small_source: Path, tmp_path: Path) -> None:
    scene = random_scene(np.random.default_rng(3), GRID, 6)
    key, value = {"score_1e39": ("scores", 1e39), "grasp_1e300": ("grasps", 1e300), "sdf_1e39_float32": ("sdf", 1e39)}[
        case
    ]
    scene[key] = scene[key].astype(np.float64)
    scene[key].flat[2] = value
    path = write_scene(small_source, "scene_004", **scene)
    dtype = ["--dtype", "float32"] if key == "sdf" else []
    line = one_line(make(small_source, tmp_path / "ds", *dtype))
    assert str(path) in line and f"'{key}' has 1 values that are finite in the file but not as stored" in line
    assert not (tmp_path / "ds").exists()
    assert make(small_source, tmp_path / "ds", "--skip-bad", *dtype).exit_code == 0
    skipped = [json.loads(x) for x in (tmp_path / "ds" / "skipped.jsonl").read_text().splitlines()]
    assert [s["name"] for s in skipped] == ["scene_004"] and verify(tmp_path / "ds").problems == []


def _edit_manifest(out: Path, refingerprint: bool, **stats) -> None:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["score_stats"].update(stats)
    if refingerprint:
        manifest["fingerprint"] = fingerprint(manifest)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("case", ["mean_1000", "std_0", "mean_1000_fingerprint_stale"])
def test_verify_recomputes_score_statistics(case: str, small_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert make(small_source, out).exit_code == 0
    edit = {"mean": 1000.0} if case.startswith("mean") else {"std": 0.0}
    _edit_manifest(out, refingerprint=not case.endswith("stale"), **edit)
    problems = verify(out).problems
    assert len(problems) == 1, problems
    expected = {
        "mean_1000": "score_stats mean is 1000.0, but the train labels give",
        "std_0": "score_stats std is 0.0: all train scores are equal",
        "mean_1000_fingerprint_stale": "fingerprint does not match its contents",
    }[case]
    assert expected in problems[0]
    if case == "std_0":
        assert expected in verify(out, quick=True).problems[0]


def test_equal_train_scores_are_refused_at_build(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", scenes=6)
    for scene in sorted(src.iterdir()):
        arrays = dict(np.load(scene / "scene.npz"))
        arrays["scores"] = np.full_like(arrays["scores"], 2.5)
        write_scene(src, scene.name, **arrays)
    line = one_line(make(src, tmp_path / "ds"))
    assert "train scores are equal (2.5)" in line and not (tmp_path / "ds").exists()


# --- SOURCE listing, splits ------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["dangling_symlink", "non_utf8_name"])
def test_source_listing_problems_name_the_scene(case: str, small_source: Path, tmp_path: Path) -> None:
    if case == "dangling_symlink":
        os.symlink(tmp_path / "gone", small_source / "scene_999")
        expected = "scene_999'" + ": a symlink to"
    else:
        os.mkdir(os.path.join(os.fsencode(small_source), b"scene_\xff"))
        expected = "scene folder b'scene_\\xff' is not a UTF-8 name; rename it"
    line = one_line(make(small_source, tmp_path / "ds"))
    assert expected in line and not (tmp_path / "ds").exists()


def test_splits_naming_absent_scenes_is_an_error_unless_allowed(small_source: Path, tmp_path: Path) -> None:
    names = [f"scene_{i:03d}" for i in range(14)]  # scene_011..013 are not in SOURCE
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": names[:10], "val": names[10:12], "test": names[12:]}))
    line = one_line(make(small_source, tmp_path / "ds", "--splits", splits))
    assert "scene scene_011 (3 of its 14 scenes in all) is not in SOURCE" in line and "--allow-missing-scenes" in line
    assert not (tmp_path / "ds").exists()
    assert make(small_source, tmp_path / "ds", "--splits", splits, "--allow-missing-scenes").exit_code == 0
    assert ShardReader(tmp_path / "ds").num_scenes == 11


# --- one line, not a traceback ---------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 120 kB tmpfs (needs root); skipped where mounting is not allowed (the simulated case still runs)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    with tmpfs(disk, "size=120k", skip="cannot mount a tmpfs here"):
        yield disk


def _full_disk_rebuild(src: Path, out: Path) -> None:
    before = tree_bytes(out)
    line = one_line(make(src, out, "--max-grasps", 24, "--records-per-shard", 2, "--overwrite"))
    assert "No space left on device" in line and "--out was left as it was" in line
    assert tree_bytes(out) == before and verify(out).problems == [] and leftovers(out) == []


def test_full_disk_on_a_real_tmpfs(small_source: Path, small_disk: Path) -> None:
    out = small_disk / "ds"
    assert make(small_source, out, "--max-grasps", 24, "--records-per-shard", 2, "--limit", 1).exit_code == 0
    _full_disk_rebuild(small_source, out)
    assert sorted(p.name for p in small_disk.iterdir()) == ["ds"]


def test_full_disk_simulated_at_the_record_write(
    small_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ds"
    assert make(small_source, out, "--max-grasps", 24, "--records-per-shard", 2, "--limit", 1).exit_code == 0
    real = os.pwrite

    def pwrite(fd: int, data, offset: int) -> int:  # record writes are >= 1920 bytes; the lock's note is shorter
        if len(data) >= 1920:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)  # the forked workers inherit it
    _full_disk_rebuild(small_source, out)


def _npz_with_header(path: Path, key: str, shape: tuple[int, ...]) -> None:
    arrays = random_scene(np.random.default_rng(4), GRID, 6)
    del arrays[key]
    np.savez(path, **arrays)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{key}.npy", header.getvalue() + bytes(64))


@pytest.mark.parametrize("key", ["sdf", "grasps"])
def test_npz_header_claiming_petabytes_is_one_line(key: str, small_source: Path, tmp_path: Path) -> None:
    shape = (1 << 17,) * 3 if key == "sdf" else (int(3.5 * 2**50) // 76, 19)  # ~4 PiB, 3.5 PiB
    path = small_source / "scene_006" / "scene.npz"
    _npz_with_header(path, key, shape)
    start = time.perf_counter()
    line = one_line(make(small_source, tmp_path / "ds"))
    expected = f"'sdf' has shape {shape}" if key == "sdf" else f"has {shape[0]} grasps, more than --max-grasps 480"
    assert str(path) in line and expected in line and time.perf_counter() - start < 30


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--max-grasps", 100_000_000], "one record would take 8,000,221,184 bytes"),
        (["--grid", 4096], "one record would take 137,438,991,872 bytes"),
        (["--records-per-shard", 10_000_000], "a shard would take 2,595,840,000,000 bytes"),
    ],
    ids=["max_grasps", "grid", "records_per_shard"],
)
def test_absurd_record_sizes_are_refused(flags: list, expected: str, small_source: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(MAKE, [str(small_source), "--out", str(tmp_path / "ds"), "--quiet", *map(str, flags)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], result.output
    assert not (tmp_path / "ds").exists()


def test_header_first_reader_reads_compressed_and_fortran_scenes(tmp_path: Path) -> None:
    """The seed's files are np.savez_compressed; the header-first reader must give the same bytes as np.load."""
    src = tmp_path / "src"
    scenes = {}
    for i in range(4):
        scene = random_scene(np.random.default_rng(i), GRID, 5 + i)
        scene["sdf"] = np.asfortranarray(scene["sdf"]) if i % 2 else scene["sdf"]
        (src / f"s{i}").mkdir(parents=True)
        np.savez_compressed(src / f"s{i}" / "scene.npz", **scene)
        scenes[f"s{i}"] = scene
    assert make(src, tmp_path / "ds", "--dtype", "float32").exit_code == 0
    reader = ShardReader(tmp_path / "ds")
    for scene_id, name in zip(reader.index["scene"], reader.index["name"]):
        assert np.array_equal(reader.sdf(scene_id), scenes[name]["sdf"])
        assert np.array_equal(reader.grasps(scene_id), scenes[name]["grasps"])
        assert np.array_equal(reader.scores(scene_id), scenes[name]["scores"])


def _splits_file(path: Path, names: list[str]) -> Path:
    path.write_text(json.dumps({"train": names[:20], "val": names[20:25], "test": names[25:]}))
    return path


@pytest.mark.parametrize("change", ["scene_added", "unread_scene_removed", "splits_file_edited"])
def test_resume_refuses_a_changed_scene_list_or_splits_file(change: str, tmp_path: Path) -> None:
    """Issue 17 item 1: an interrupted --overwrite, then a change to what decides placement, then --resume:
    one line naming the change, the old dataset and the unfinished build untouched."""
    src = make_source(tmp_path / "src", scenes=30)
    names = sorted(p.name for p in src.iterdir())
    splits = _splits_file(tmp_path / "splits.json", names)
    out = tmp_path / "out"
    flags = ("--records-per-shard", 4, "--splits", splits)
    assert make(src, out, *flags).exit_code == 0
    old = tree_bytes(out)
    _kill(_stalled_build(src, out, "--splits", splits, "--overwrite"))
    journal = (staging(out) / ".build" / "journal.jsonl").read_text().splitlines()
    read = {json.loads(line)["source"]["name"] for line in journal[1:]}
    if change == "scene_added":
        write_scene(src, "scene_030", **random_scene(np.random.default_rng(5), GRID, 4))
        splits.write_text(splits.read_text().replace('"scene_029"', '"scene_029", "scene_030"'))
        expected = "scene scene_030 was added to SOURCE"
    elif change == "unread_scene_removed":
        gone = next(n for n in reversed(names) if n not in read and n != "scene_025")
        (src / gone / "scene.npz").unlink()
        (src / gone).rmdir()
        splits.write_text(splits.read_text().replace(f', "{gone}"', "").replace(f'"{gone}", ', ""))
        expected = f"scene {gone} was removed from SOURCE"
    else:
        text = json.loads(splits.read_text())
        text["train"][0], text["test"][0] = text["test"][0], text["train"][0]  # two scenes change splits
        splits.write_text(json.dumps(text))
        expected = f"the content of the splits file {splits} changed"
    staged = tree_bytes(staging(out))
    line = one_line(make(src, out, *flags, "--resume"))
    assert expected in line and "cannot resume" in line and "--overwrite" in line, line
    assert tree_bytes(out) == old and tree_bytes(staging(out)) == staged
    assert verify(out).problems == []
    assert make(src, out, *flags, "--overwrite").exit_code == 0  # rebuilding from scratch is the way on
    assert verify(out).problems == [] and leftovers(out) == []
