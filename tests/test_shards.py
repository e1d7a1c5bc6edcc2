"""The shard format end to end: make_shards -> files -> reader / np.load / verify."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, make_source, random_scene, run_tool, tree_bytes, write_scene

from gq.common.ownership import RECORD, BesideBuild
from gq.shards import Manifest, ShardReader, verify
from gq.shards.format import HEADER_BYTES, DatasetError, read_npy_header
from gq.shards.outdir import dataset_entries

GRID = 16


def build(src: Path, out: Path, *args) -> subprocess.CompletedProcess:
    return run_tool("make_shards.py", src, "--out", out, "--grid", GRID, "--quiet", *args)


def source_arrays(src: Path, name: str) -> dict:
    with np.load(src / name / "scene.npz") as z:
        return {k: z[k] for k in z.files}


def test_round_trip_float32_exact(small_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    result = build(small_source, out, "--dtype", "float32", "--records-per-shard", 4)
    assert result.returncode == 0, result.stderr
    assert "scenes" in result.stdout and "max conversion error 0" in result.stdout
    reader = ShardReader(out)
    per_split = reader.manifest.splits
    assert reader.num_scenes == 11 and reader.num_shards == sum(-(-c.scenes // 4) for c in per_split.values())
    for scene, name in zip(reader.index["scene"], reader.index["name"]):
        src = source_arrays(small_source, name)
        assert name == f"scene_{scene:03d}"  # sorted by name: the scene id is the sorted position
        assert np.array_equal(reader.sdf(scene), src["sdf"])
        assert np.array_equal(reader.grasps(scene), src["grasps"])
        assert np.array_equal(reader.scores(scene), src["scores"])
        assert np.array_equal(reader.column("translation", [scene])[0], src["translation"])
        assert reader.column("global_scale", [scene])[0] == src["global_scale"]
    # a whole shard is one array; the padded tail of each split's last shard is empty
    train = per_split["train"]
    last = reader.labels_shard(train.first_shard + train.num_shards - 1)
    used = train.scenes - 4 * (train.num_shards - 1)
    assert last.shape == (4, 480, 20) and np.isnan(last[used:, :, 19]).all()


def test_round_trip_float16_within_rounding(small_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert build(small_source, out).returncode == 0
    reader = ShardReader(out)
    worst = 0.0
    for scene, name in zip(reader.index["scene"], reader.index["name"]):
        sdf = source_arrays(small_source, name)["sdf"]
        stored = reader.sdf(scene)
        assert stored.dtype == np.float16
        assert np.array_equal(stored, sdf.astype(np.float16))
        worst = max(worst, float(np.abs(stored.astype(np.float32) - sdf).max()))
    assert reader.manifest.sdf_max_conversion_error == pytest.approx(worst)
    assert 0 < worst < 1e-3


def test_layout_matches_design(small_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert build(small_source, out, "--records-per-shard", 4).returncode == 0
    manifest = Manifest.from_json(out / "manifest.json")
    assert manifest.format == "gq-shards" and manifest.version == 2
    assert manifest.num_records == 4 * manifest.num_shards and manifest.num_scenes == 11
    assert manifest.grid_origin == -1.0 and manifest.grid_spacing == 2 / GRID
    assert len(manifest.fingerprint) == 64
    for split, counts in manifest.splits.items():
        assert counts.scenes == sum(1 for s in ShardReader(out).index["split"] if s == split)
    for name in ("sdf-00000.npy", "labels-00002.npy"):
        version, shape, fortran, dtype, offset = read_npy_header(out / name)
        assert version == (1, 0) and not fortran and offset == HEADER_BYTES
    # any NumPy reads a shard with mmap; records of a 16^3 float16 grid are 4 KiB aligned
    arr = np.load(out / "sdf-00001.npy", mmap_mode="r")
    assert arr.shape == (4, GRID, GRID, GRID) and arr.dtype == np.float16 and arr.offset == HEADER_BYTES
    assert arr[0].nbytes % 4096 == 0
    shards = range(manifest.num_shards)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"sdf-{k:05d}.npy" for k in shards]
        + [f"labels-{k:05d}.npy" for k in shards]
        + ["manifest.json", "scenes.parquet", RECORD]  # RECORD: what make_shards wrote, for --overwrite
    )


def test_v2_split_pure_shards_in_seeded_order(tmp_path: Path) -> None:
    from gq.shards.placement import shuffle_key

    src = make_source(tmp_path / "src", scenes=40)
    assert build(src, tmp_path / "a", "--records-per-shard", 4).returncode == 0
    assert build(src, tmp_path / "b", "--records-per-shard", 4, "--shuffle-seed", 7).returncode == 0
    orders = {}
    for name, seed in (("a", 0), ("b", 7)):
        reader = ShardReader(tmp_path / name)
        index, manifest = reader.index, reader.manifest
        first = 0
        for split in ("train", "val", "test"):
            entry = manifest.splits[split]
            assert entry.first_shard == first and entry.num_shards == -(-entry.scenes // 4)
            first += entry.num_shards
            rows = np.flatnonzero(index["split"] == split)
            # no shard holds two splits: the split's rows are exactly its shards' records
            assert set(index["shard"][rows]) == set(reader.split_shards(split))
            # stored order: by hash(seed, name), not by name
            names = list(index["name"][rows])
            assert names == sorted(names, key=lambda n: shuffle_key(n, seed))
            positions = index["shard"][rows] * 4 + index["slot"][rows]
            assert list(positions) == list(range(entry.first_shard * 4, entry.first_shard * 4 + len(rows)))
            orders[name, split] = names
        assert first == manifest.num_shards
        # the index maps every scene to its record
        for scene, name in zip(index["scene"], index["name"]):
            shard, slot = reader.locate(scene)
            expected = source_arrays(src, name)
            assert np.array_equal(reader.sdf_shard(shard)[slot], expected["sdf"].astype(np.float16))
            assert np.array_equal(reader.scores(scene), expected["scores"])
    assert orders["a", "train"] != sorted(orders["a", "train"])
    assert orders["a", "train"] != orders["b", "train"] and sorted(orders["a", "train"]) == sorted(orders["b", "train"])


def test_version_1_dataset_is_refused_with_the_rebuild_command(small_source: Path, tmp_path: Path) -> None:
    from gq.shards import DatasetError, read_manifest

    out = tmp_path / "ds"
    assert build(small_source, out).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(
        DatasetError,
        match="format version 1, this reader reads version 2; rebuild the dataset with gq shards build",
    ):
        read_manifest(out)
    result = run_tool("verify_shards.py", out)
    assert result.returncode == 1 and len(result.stdout.splitlines()) == 1 and "gq shards build" in result.stdout


def test_two_builds_byte_identical_whatever_the_workers(small_source: Path, tmp_path: Path) -> None:
    assert build(small_source, tmp_path / "a", "--workers", 1, "--records-per-shard", 4).returncode == 0
    assert build(small_source, tmp_path / "b", "--workers", 2, "--records-per-shard", 4).returncode == 0
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def _bad(kind: str, rng: np.random.Generator) -> dict | bytes | None:
    scene = random_scene(rng, GRID, 10)
    if kind == "corrupt":
        return b"PK\x03\x04 this is not a zip archive"
    if kind == "truncated":
        return "truncate"
    if kind == "missing_key":
        del scene["scores"]
    elif kind == "sdf_shape":
        scene["sdf"] = scene["sdf"][:-1]
    elif kind == "sdf_nan":
        scene["sdf"][3, 4, 5] = np.nan
    elif kind == "grasps_inf":
        scene["grasps"][2, 7] = np.inf
    elif kind == "grasps_shape":
        scene["grasps"] = scene["grasps"][:, :18]
    elif kind == "scores_shape":
        scene["scores"] = scene["scores"][:-1]
    elif kind == "no_grasps":
        scene["grasps"], scene["scores"] = scene["grasps"][:0], scene["scores"][:0]
    elif kind == "too_many":
        scene["grasps"] = np.zeros((481, 19), np.float32)
        scene["scores"] = np.zeros(481, np.float32)
    elif kind == "float16_range":
        scene["sdf"][0, 0, 0] = 1e5
    elif kind == "int_sdf":
        scene["sdf"] = scene["sdf"].astype(np.int32)
    elif kind == "no_file":
        return None
    return scene


BAD_CASES = {
    "corrupt": "unreadable or corrupt npz",
    "truncated": "unreadable or corrupt npz",
    "missing_key": "missing key(s) scores",
    "sdf_shape": "'sdf' has shape (15, 16, 16), expected (16, 16, 16)",
    "sdf_nan": "'sdf' has 1 non-finite values",
    "grasps_inf": "'grasps' has 1 non-finite values",
    "grasps_shape": "'grasps' has shape (10, 18), expected (N, 19)",
    "scores_shape": "'scores' has shape (9,), expected (10,)",
    "no_grasps": "has no grasps (N = 0)",
    "too_many": "has 481 grasps, more than --max-grasps 480",
    "float16_range": "outside float16's finite range",
    "int_sdf": "'sdf' has dtype int32, expected a floating-point array",
    "no_file": "missing scene.npz",
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_scene_stops_with_one_line_and_leaves_nothing(kind: str, small_source: Path, tmp_path: Path) -> None:
    bad = _bad(kind, np.random.default_rng(1))
    path = small_source / "scene_005" / "scene.npz"
    if bad is None:
        path.unlink()
    elif bad == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif isinstance(bad, bytes):
        path.write_bytes(bad)
    else:
        write_scene(small_source, "scene_005", **bad)
    out = tmp_path / "ds"
    result = build(small_source, out, "--records-per-shard", 2)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and BAD_CASES[kind] in lines[0]
    assert not out.exists()  # no manifest, no shards, no temporaries


def test_bad_scene_in_existing_directory_leaves_it_empty(small_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (small_source / "scene_009" / "scene.npz").write_bytes(b"garbage")
    assert build(small_source, out, "--records-per-shard", 2).returncode == 2
    assert out.exists() and list(out.iterdir()) == []


def test_skip_bad_reports_and_never_substitutes(small_source: Path, tmp_path: Path) -> None:
    (small_source / "scene_003" / "scene.npz").write_bytes(b"garbage")
    write_scene(small_source, "scene_007", **{**random_scene(np.random.default_rng(2), 8, 4)})
    out = tmp_path / "ds"
    result = build(small_source, out, "--skip-bad", "--records-per-shard", 4)
    assert result.returncode == 0, result.stderr
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["name"] for s in skipped] == ["scene_003", "scene_007"]
    assert "corrupt npz" in skipped[0]["reason"] and "'sdf' has shape (8, 8, 8)" in skipped[1]["reason"]
    reader = ShardReader(out)
    assert reader.manifest.skipped == 2 and reader.num_scenes == 9
    assert "scene_003" not in reader.index["name"] and "scene_007" not in reader.index["name"]
    # ids stay the sorted source positions: the skipped scenes leave empty records, nothing moves up
    assert sorted(reader.index["scene"]) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    for scene, name in zip(reader.index["scene"], reader.index["name"]):
        assert name == f"scene_{scene:03d}"
        assert np.array_equal(reader.scores(scene), source_arrays(small_source, name)["scores"])
    with pytest.raises(KeyError, match="scene id 3 is not in"):
        reader.sdf(3)
    used = set(zip(reader.index["shard"].tolist(), reader.index["slot"].tolist()))
    empty = [(k, s) for k in range(reader.num_shards) for s in range(4) if (k, s) not in used]
    assert len(empty) == reader.manifest.num_records - 9
    for k, s in empty:
        assert np.isnan(reader.labels_shard(k)[s, :, 19]).all() and not reader.sdf_shard(k)[s].any()
    result = verify(out)
    assert result.problems == [] and result.summary.startswith("OK")


def test_splits_file(small_source: Path, tmp_path: Path) -> None:
    names = [f"scene_{i:03d}" for i in range(11)]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": names[:7], "val": names[7:9], "test": names[9:]}))
    assert build(small_source, tmp_path / "ds", "--splits", splits).returncode == 0
    reader = ShardReader(tmp_path / "ds")
    assert sorted(reader.split_scenes("val")) == [7, 8] and sorted(reader.split_scenes("test")) == [9, 10]
    splits.write_text(json.dumps({"train": names[:7], "val": names[7:9], "test": names[9:10]}))
    result = build(small_source, tmp_path / "ds2", "--splits", splits)
    assert result.returncode == 2 and "scene scene_010 is in no split" in result.stderr
    assert not (tmp_path / "ds2").exists()


def test_existing_dataset_needs_overwrite(small_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert build(small_source, out).returncode == 0
    again = build(small_source, out)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert build(small_source, out, "--overwrite", "--limit", 5).returncode == 0
    assert ShardReader(out).num_scenes == 5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    foreign = build(small_source, tmp_path / "other", "--overwrite")
    assert foreign.returncode == 2 and "holds 'notes.txt' and no .gq-owned.json says make_shards" in foreign.stderr
    assert (tmp_path / "other" / "notes.txt").exists()


def test_verify_catches_a_flipped_byte_and_names_the_scene(small_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert build(small_source, out, "--records-per-shard", 4).returncode == 0
    ok = run_tool("verify_shards.py", out)
    assert ok.returncode == 0 and ok.stdout.startswith("OK") and len(ok.stdout.splitlines()) == 1
    path = out / "sdf-00001.npy"
    data = bytearray(path.read_bytes())
    record = GRID**3 * 2
    data[HEADER_BYTES + 0 * record + 100] ^= 0x40  # shard 1, slot 0
    path.write_bytes(bytes(data))
    quick = run_tool("verify_shards.py", out, "--quick")
    assert quick.returncode == 0  # sizes and headers still agree
    bad = run_tool("verify_shards.py", out)
    assert bad.returncode == 1
    from gq.shards.index import read_index

    index = read_index(out / "scenes.parquet")
    row = int(np.flatnonzero((index["shard"] == 1) & (index["slot"] == 0))[0])
    assert f"shard 1 slot 0 scene {index['scene'][row]} ({index['name'][row]}): record checksum" in bad.stdout
    assert f"shard 1 slot 0 scene {index['scene'][row]} ({index['name'][row]}): record device checksum" in bad.stdout
    assert "sdf-00001.npy: shard 1: file CRC-32" in bad.stdout


def test_verify_reports_missing_manifest_and_truncated_file(small_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert build(small_source, out, "--records-per-shard", 4).returncode == 0
    path = out / "labels-00000.npy"
    path.write_bytes(path.read_bytes()[:-8])
    result = run_tool("verify_shards.py", out, "--quick")
    assert result.returncode == 1 and "labels-00000.npy:" in result.stdout and "manifest says" in result.stdout
    (out / "manifest.json").unlink()
    missing = run_tool("verify_shards.py", out)
    assert missing.returncode == 1 and "manifest.json: missing" in missing.stdout


def test_resume_with_other_options_is_refused(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", scenes=6)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), BesideBuild(out, tool="make_shards", overwrite=True, resumable=True) as b:
        work = b.create(dataset_entries(1))  # an interrupted build, its journal of other options
        (work / ".build").mkdir()
        (work / ".build" / "journal.jsonl").write_text(json.dumps({"format": "gq-shards", "version": 2, "args": {}}))
        raise KeyboardInterrupt
    result = build(src, out, "--resume")
    assert result.returncode == 2 and f"cannot resume: option --grid changed (None -> {GRID})" in result.stderr


def test_help_and_bad_flags() -> None:
    for tool in ("make_shards.py", "verify_shards.py"):
        assert run_tool(tool, "--help").returncode == 0
    result = run_tool("make_shards.py", "/nonexistent", "--out", "/tmp/x-never")
    assert result.returncode == 2 and "no such directory" in result.stderr


def test_float16_conversion_is_bit_identical_to_numpy() -> None:
    from gq.shards.half import to_float16

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 4_000_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = values[np.isfinite(values) & (np.abs(values) <= 65504)]
    ties = (np.arange(1, 2049, dtype=np.float32) + 0.5) * np.float32(2.0**-10)  # exact halfway cases
    edge = np.array([0.0, -0.0, 65504.0, -65504.0, 65519.0, 6.1e-5, 6.0e-8, 1e-9, 2.0**-24], np.float32)
    for x in (values, ties, edge, rng.standard_normal((16, 16, 16)).astype(np.float32)):
        half, error = to_float16(x)
        expected = x.astype(np.float16)
        assert half.shape == x.shape and np.array_equal(half.view(np.uint16), expected.view(np.uint16))
        assert error == float(np.abs(expected.astype(np.float64) - x).max())


def test_whole_shards_read_by_mmap_and_by_dali_equal_the_source(small_source: Path, tmp_path: Path) -> None:
    from nvidia.dali import fn, pipeline_def

    out = tmp_path / "ds"
    assert build(small_source, out, "--records-per-shard", 4).returncode == 0
    reader = ShardReader(out)
    files = [str(reader.sdf_path(k)) for k in range(reader.num_shards)]

    @pipeline_def(batch_size=len(files), num_threads=1, device_id=None)
    def shards():
        return fn.readers.numpy(files=files, device="cpu", dont_use_mmap=True)

    pipe = shards()
    pipe.build()
    (batch,) = pipe.run()
    for scene, name in zip(reader.index["scene"], reader.index["name"]):
        shard, slot = reader.locate(scene)
        expected = source_arrays(small_source, name)["sdf"].astype(np.float16)
        assert np.array_equal(np.load(out / f"sdf-{shard:05d}.npy", mmap_mode="r")[slot], expected)
        assert np.array_equal(np.array(batch[shard])[slot], expected)
    del pipe


@pytest.mark.parametrize(
    "key,value,named",
    [
        ("num_shards", "1000000000000", "num_shards (1000000000000, but the files list 5 sdf shard files)"),
        ("num_shards", "-5", "num_shards (-5, expected 1..1099511627776)"),
        ("num_shards", "1e400", "num_shards (number inf, expected int)"),
        ("num_records", "1" + "0" * 400, "num_records ("),
        (
            "records_per_shard",
            "1000000000000",
            "files[].bytes (sdf-00000.npy: 36864, expected 8192000000004096 for 1000000000000 records",
        ),
        ("splits.train.num_shards", "1000000000000", "splits.train.num_shards (1000000000000, expected 0..5)"),
        ("grid_origin", "1e400", "grid_origin (number inf, expected a finite number)"),
    ],
    ids=["num_shards_1e12", "num_shards_-5", "num_shards_1e400", "num_records_10^400", "records_1e12", "split", "inf"],
)
def test_manifest_counts_are_bounded_by_the_files_listed(
    key: str, value: str, named: str, small_source: Path, tmp_path: Path
) -> None:
    """Issue 17 item 13: a forged count, its fingerprint recomputed, is one line naming the key, at once."""
    from gq.shards.manifest import fingerprint

    out = tmp_path / "ds"
    assert build(small_source, out, "--records-per-shard", 4).returncode == 0
    data = json.loads((out / "manifest.json").read_text())
    *parents, last = key.split(".")
    target = data
    for part in parents:
        target = target[part]
    target[last] = "@VALUE@"
    data.pop("fingerprint")
    text = json.dumps(data, sort_keys=True).replace('"@VALUE@"', value)
    data = json.loads(text)
    data["fingerprint"] = fingerprint(data) if "inf" not in named else "0" * 64
    (out / "manifest.json").write_text(json.dumps(data).replace("Infinity", value))
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "verify_shards.py"), str(out)], capture_output=True, text=True, timeout=60
    )
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and f"no valid {named}" in lines[0], result.stdout + result.stderr
    with pytest.raises(DatasetError, match=f"no valid {re.escape(named)}"):
        ShardReader(out)


# -- worker processes: as many as help, and quiet when their parent is gone -------------------------------------


def test_more_workers_than_help_are_capped_with_one_line(tmp_path: Path) -> None:
    """100,000 workers asked for would fork until the machine stalls: the commands use at most one per CPU and
    one per scene, and say so."""
    source = make_source(tmp_path / "src", scenes=3)
    build = run_tool("make_shards.py", source, "--out", tmp_path / "ds", "--grid", 16, "--workers", 64, "--quiet")
    assert build.returncode == 0, build.stderr
    capped = [line for line in build.stderr.splitlines() if line.startswith("--workers 64: using ")]
    assert len(capped) == 1 and "the most that helps" in capped[0] and "3 scenes" in capped[0], build.stderr
    scenes = run_tool("make_scenes.py", "--scenes", 2, "--grid", 16, "--out", tmp_path / "sc", "--workers", 64)
    assert scenes.returncode == 0, scenes.stderr
    assert "--workers 64: using " in scenes.stderr and "2 scenes" in scenes.stderr, scenes.stderr


def test_workers_end_quietly_when_their_parent_is_killed(tmp_path: Path) -> None:
    """A killed command's workers cannot send their results: they end without a BrokenPipeError traceback."""
    cmd = [sys.executable, str(REPO / "tools" / "make_scenes.py"), "--scenes", 2000, "--grid", 32]
    cmd += ["--workers", 2, "--out", tmp_path / "sc"]
    process = subprocess.Popen(list(map(str, cmd)), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(p.is_dir() for p in tmp_path.glob(".sc.*/scene_*")) and time.monotonic() < deadline:
        time.sleep(0.1)  # until the workers are writing scenes
    process.kill()
    _, stderr = process.communicate(timeout=60)  # stderr ends when the last worker has gone
    assert "Traceback" not in stderr.decode() and "BrokenPipeError" not in stderr.decode(), stderr.decode()[-2000:]


# -- gq scenes: a grid the machine cannot hold, --quiet ---------------------------------------------------------


def test_scenes_refuses_a_grid_that_does_not_fit_in_memory(tmp_path: Path) -> None:
    result = run_tool("make_scenes.py", "--scenes", 1, "--grid", 2000, "--out", tmp_path / "sc")
    assert result.returncode == 2, (result.stderr, result.stdout)
    [line] = result.stderr.strip().splitlines()
    assert "--grid 2000: 1 worker(s) making scenes of 2000^3 voxels need about 512,000,000,000 bytes" in line
    assert not (tmp_path / "sc").exists()


def test_scenes_quiet_prints_no_progress_bar(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "tools" / "make_scenes.py"), "--scenes", 3, "--grid", 16, "--workers", 1]
    result = subprocess.run([*map(str, cmd), "--out", tmp_path / "sc", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "wrote 3 scenes" in result.stdout


def test_a_scene_name_with_a_control_character_is_refused(tmp_path: Path) -> None:
    source = make_source(tmp_path / "src", scenes=2)
    write_scene(source, "bad\nname", **random_scene(np.random.default_rng(0), 16, 4))
    result = run_tool("make_shards.py", source, "--out", tmp_path / "ds", "--grid", 16, "--quiet")
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "scene folder 'bad\\nname' has a control character ('\\n') in its name; rename it" in line
    assert not (tmp_path / "ds").exists()


def test_a_flipped_byte_in_a_labels_shard_is_blamed_on_the_labels_file(tmp_path: Path) -> None:
    """A record's checksums cover its SDF and labels bytes together; the report names the file that changed."""
    from gq.pipeline import open_loader

    out, source = tmp_path / "ds", make_source(tmp_path / "src", scenes=4)
    run_tool("make_shards.py", source, "--out", out, "--grid", 16, "--quiet", check=True)
    path = out / "labels-00000.npy"
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 5] ^= 0xFF  # a grasp value of slot 0's first grasp
    path.write_bytes(bytes(data))
    problems = verify(out).problems
    assert problems and all(p.startswith("labels-00000.npy: ") for p in problems), problems
    with pytest.raises(DatasetError) as caught:
        for _ in open_loader(out, split="train", mode="cache", device="cpu", grasps_per_sdf=2, scenes_per_batch=1):
            pass
    assert str(caught.value).startswith(f"{path}: shard 0 slot 0 scene"), caught.value
