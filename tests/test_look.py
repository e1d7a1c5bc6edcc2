"""`gq shards stats`, `gq shards diff` and `gq show` on real datasets: known defects are flagged, the figures are
the data's, diffs list exactly what changed, and pictures hold something."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from helpers import FIXTURES, invoke

from gq.shards import BuildOptions, ShardReader, build_shards
from gq.shards.report import NO_INSIDE, NOISE_NEIGHBOURS, grasp_features, mean_difference
from gq.synth import write_scenes
from gq.tools import look

GRID, GRASPS, SCENES = 32, 480, 24  # the seed's grasps per scene: what the label-noise figure is made for
DUPLICATE, EMPTY, SHUFFLED = "scene_000003", "scene_000005", "scene_000007"
COPY = "scene_copy"  # DUPLICATE's file under another name, in another split


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _splits(names: list[str]) -> dict[str, list[str]]:
    """Every fifth scene in val, the next in test, COPY in test and DUPLICATE in train."""
    splits = {"train": [], "val": [], "test": [COPY]}
    for i, name in enumerate(names):
        splits["val" if i % 5 == 0 else "test" if i % 5 == 1 and name != DUPLICATE else "train"].append(name)
    return splits


def _build(scenes: Path, out: Path, splits_file: Path) -> Path:
    names = sorted(p.name for p in scenes.iterdir() if p.is_dir() and p.name != COPY)
    splits_file.write_text(json.dumps(_splits(names)))
    options = BuildOptions(grid=GRID, max_grasps=GRASPS, records_per_shard=8, splits=str(splits_file))
    build_shards(scenes, out, options, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def defects(tmp_path_factory) -> tuple[Path, Path]:
    """(scenes, shards) of generated scenes with three known defects: DUPLICATE's object copied to COPY (train and
    test), EMPTY's SDF with no inside voxel, SHUFFLED's scores shuffled among its grasps."""
    root = tmp_path_factory.mktemp("defects")
    scenes = root / "scenes"
    write_scenes(scenes, SCENES, grasps_per_scene=GRASPS, grid=GRID, seed=0, workers=1, progress=False)
    shutil.copytree(scenes / DUPLICATE, scenes / COPY)
    arrays = _load(scenes / EMPTY / "scene.npz")
    arrays["sdf"] = np.abs(arrays["sdf"]) + np.float32(0.05)
    np.savez(scenes / EMPTY / "scene.npz", **arrays)
    arrays = _load(scenes / SHUFFLED / "scene.npz")
    arrays["scores"] = np.random.default_rng(1).permutation(arrays["scores"])
    np.savez(scenes / SHUFFLED / "scene.npz", **arrays)
    return scenes, _build(scenes, root / "shards", root / "splits.json")


@pytest.fixture(scope="module")
def report(defects, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report") / "report"
    result = invoke(look.stats_cmd, defects[1], "--out", out, name="gq shards stats")
    assert result.returncode == 0, result.stderr
    assert (
        f"report: {out / 'report.md'}" in result.stdout
        and "flagged 4 of 25 scenes: 1 with no surface, 0 cut" in result.stdout
    )
    return out, json.loads((out / "stats.json").read_text())


def test_stats_flags_exactly_the_known_defects(report):
    out, stats = report
    assert sorted(stats["flagged"]) == sorted([DUPLICATE, COPY, EMPTY, SHUFFLED])
    flags = {r["name"]: r["flags"] for r in stats["scenes"] if r["flags"]}
    assert flags[EMPTY] == [NO_INSIDE]
    assert len(flags[SHUFFLED]) == 1 and flags[SHUFFLED][0].startswith("label noise")
    assert flags[DUPLICATE] == [f"same SDF bytes as {COPY} (test)", f"same grasp set as {COPY} (test)"]
    assert [(g["kind"], g["scenes"], g["across_splits"]) for g in stats["leakage"]] == [
        ("sdf", [DUPLICATE, COPY], True),
        ("grasps", [DUPLICATE, COPY], True),
    ]
    text = (out / "report.md").read_text()
    assert all(f"| {name} |" in text for name in stats["flagged"])
    assert text.count("| scene_") == 4  # the flagged scenes only, by name
    for name in ("grasps_per_scene.png", "scores.png", "label_noise.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[1] >= 400 and image[..., :3].std() > 0.05


def _noise(grasps: np.ndarray, scores: np.ndarray) -> float:
    """The label-noise figure by brute force: every pairwise distance, no KD-tree."""
    f = grasp_features(grasps)
    d = ((f[:, None] - f[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    near = np.argsort(d, axis=1)[:, :NOISE_NEIGHBOURS]
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable").astype(np.float64)
    return np.abs(ranks[:, None] - ranks[near]).mean() / mean_difference(ranks)


def test_stats_figures_are_a_direct_computation(defects, report):
    scenes, shards = defects
    stats = report[1]
    split = {r["name"]: r["split"] for r in stats["scenes"]}
    scores = {s: [] for s in ("train", "val", "test")}
    for row in stats["scenes"]:
        arrays = _load(scenes / row["name"] / "scene.npz")
        stored = arrays["sdf"].astype(np.float16)  # the dataset's dtype
        assert row["num_grasps"] == len(arrays["grasps"])
        assert row["inside_fraction"] == np.mean(stored < 0)
        assert (row["sdf_min"], row["sdf_max"]) == (float(stored.min()), float(stored.max()))
        assert row["label_noise"] == pytest.approx(_noise(arrays["grasps"], arrays["scores"]), rel=1e-9)
        scores[split[row["name"]]].append(arrays["scores"])
    for name, figures in stats["splits"].items():
        s = np.concatenate(scores[name]).astype(np.float64)
        assert figures["grasps"] == len(s) and figures["scenes"] == len(scores[name])
        assert figures["scores"]["mean"] == pytest.approx(s.mean(), rel=1e-12)
        assert figures["scores"]["std"] == pytest.approx(s.std(), rel=1e-12)
        assert figures["scores"]["quantiles"]["50"] == pytest.approx(np.median(s), rel=1e-12)
        assert sum(figures["scores"]["histogram"]["counts"]) == len(s)
    assert stats["standardisation"]["match"]
    assert stats["standardisation"]["manifest"] == ShardReader(shards).manifest.score_stats.to_dict()


def test_stats_errors_are_one_line(tmp_path: Path, report):
    result = invoke(look.stats_cmd, tmp_path / "nothing", "--out", tmp_path / "r", name="gq shards stats")
    assert result.returncode == 2 and "no such dataset directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    out = report[0]
    result = invoke(look.stats_cmd, tmp_path / "nothing", "--out", out, name="gq shards stats")
    assert result.returncode == 2 and "--overwrite" in result.stderr  # the earlier report is kept


def test_diff_lists_exactly_what_changed(tmp_path: Path):
    scenes, splits_file = tmp_path / "scenes", tmp_path / "splits.json"
    write_scenes(scenes, 12, grasps_per_scene=8, grid=16, seed=2, workers=1, progress=False)
    names = sorted(p.name for p in scenes.iterdir() if p.is_dir())
    splits = {"train": names[:8], "val": names[8:10], "test": names[10:]}
    options = BuildOptions(grid=16, max_grasps=8, records_per_shard=4, splits=str(splits_file))
    splits_file.write_text(json.dumps(splits))
    build_shards(scenes, tmp_path / "a", options, workers=1, progress=False)
    same = invoke(look.diff_cmd, tmp_path / "a", tmp_path / "a", name="gq shards diff")
    assert same.returncode == 0 and "the same scenes" in same.stdout
    # B: one scene's scores changed, one scene added, one moved from val to train
    arrays = _load(scenes / names[1] / "scene.npz")
    arrays["scores"] = arrays["scores"] + np.float32(1)
    np.savez(scenes / names[1] / "scene.npz", **arrays)
    shutil.copytree(scenes / names[2], scenes / "scene_new")
    splits["train"] += ["scene_new", names[8]]
    splits["val"].remove(names[8])
    splits_file.write_text(json.dumps(splits))
    build_shards(scenes, tmp_path / "b", options, workers=1, progress=False)
    result = invoke(look.diff_cmd, tmp_path / "a", tmp_path / "b", "--json", name="gq shards diff")
    assert result.returncode == 1
    diff = json.loads(result.stdout)
    assert (diff["added"], diff["removed"], diff["changed"]) == (["scene_new"], [], [names[1]])
    assert diff["moved"] == [{"scene": names[8], "from": "val", "to": "train"}]
    assert diff["options"] == {} and not diff["identical"]
    text = invoke(look.diff_cmd, tmp_path / "a", tmp_path / "b", name="gq shards diff")
    assert text.returncode == 1 and text.stdout.splitlines()[:3] == [
        "+ scene_new (added)",
        f"~ {names[1]} (changed: record checksum differs)",
        f"> {names[8]} (moved: val -> train)",
    ]
    options = BuildOptions(grid=16, max_grasps=12, records_per_shard=4, splits=str(splits_file))
    build_shards(scenes, tmp_path / "c", options, workers=1, progress=False)
    wider = json.loads(invoke(look.diff_cmd, tmp_path / "b", tmp_path / "c", "--json", name="gq shards diff").stdout)
    assert wider["options"] == {"max_grasps": [8, 12]} and len(wider["changed"]) == 13  # every record's slots
    bad = invoke(look.diff_cmd, tmp_path / "a", tmp_path / "nothing", name="gq shards diff")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def _picture(path: Path, width: int) -> None:
    image = matplotlib.image.imread(path)
    assert image.shape[1] >= width and image.shape[0] >= 300
    assert image[..., :3].std() > 0.1  # not blank


def test_show_a_dataset_scene_a_mesh_and_a_model(shared_dataset, tmp_path: Path):
    shards = shared_dataset(3, grid=48, grasps=64, seed=0)
    name = str(ShardReader(shards).index["name"][0])
    scene_id = str(ShardReader(shards).index["scene"][0])
    result = invoke(look.show_cmd, shards, name, "--out", tmp_path / "a.png", name="gq show")
    assert result.returncode == 0, result.stderr
    _picture(tmp_path / "a.png", 1400)
    by_id = invoke(look.show_cmd, shards, scene_id, "--out", tmp_path / "b.png", name="gq show")
    assert by_id.returncode == 0 and (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    model = FIXTURES / "seed_gqestimator_c4_fc32-16.pth"
    result = invoke(look.show_cmd, shards, name, "--model", model, "--out", tmp_path / "m.png", name="gq show")
    assert result.returncode == 0, result.stderr
    _picture(tmp_path / "m.png", 1800)  # a fifth panel: predicted against true scores
    scenes = invoke(look.show_cmd, "--scenes", shards.parent / "scenes", name, "--out", tmp_path / "s.png",
                    name="gq show")  # fmt: skip
    assert scenes.returncode == 0, scenes.stderr
    trimesh = pytest.importorskip("trimesh")
    pytest.importorskip("mesh2sdf")
    trimesh.creation.capsule(height=0.5, radius=0.3).export(tmp_path / "capsule.obj")
    result = invoke(look.show_cmd, "--mesh", tmp_path / "capsule.obj", "--grid", 32, "--out", tmp_path / "c.png",
                    name="gq show")  # fmt: skip
    assert result.returncode == 0, result.stderr
    _picture(tmp_path / "c.png", 1400)


def test_show_refuses_bad_input_in_one_line(shared_dataset, tmp_path: Path):
    shards = shared_dataset(3, grid=48, grasps=64, seed=0)
    for args, words in (
        ((shards, "no_such_scene"), "no scene named or numbered 'no_such_scene'"),
        ((tmp_path, "scene_000000"), "not a finished dataset"),
        ((shards,), "expected DATASET SCENE"),
        (("--mesh", tmp_path / "none.obj", "x"), "expected --mesh FILE and no SCENE"),
    ):
        result = invoke(look.show_cmd, *args, "--out", tmp_path / "x.png", name="gq show")
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
    (tmp_path / "mine.png").write_bytes(b"not ours")
    result = invoke(look.show_cmd, shards, "0", "--out", tmp_path / "mine.png", "--overwrite", name="gq show")
    assert result.returncode == 2 and (tmp_path / "mine.png").read_bytes() == b"not ours"


def test_show_without_scikit_image_is_one_line_naming_the_extra(shared_dataset, tmp_path: Path, monkeypatch) -> None:
    shards = shared_dataset(3, grid=48, grasps=64, seed=0)
    monkeypatch.setitem(sys.modules, "skimage.measure", None)  # as on an install without the look extra
    result = invoke(look.show_cmd, shards, "0", "--out", tmp_path / "x.png", name="gq show")
    assert result.returncode == 2 and "pip install 'gq-pipeline[look]'" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
