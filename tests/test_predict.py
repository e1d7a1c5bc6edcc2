"""`train/run.py predict` and `eval`'s ranking metrics on a tiny trained model, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from gq.models import build_model
from gq.shards import BuildOptions, ShardReader, build_shards
from gq.synth import write_scenes
from gq.tools.training import cli
from gq.train.predict import Estimator, PredictError, best_grasps, predict_scenes

GRID, GRASPS = 16, 40


def run(*args, check: bool = True) -> subprocess.CompletedProcess:
    """`train/run.py ARGS` in this process (click's runner: the CLI's own parsing, output and exit codes)."""
    out = CliRunner().invoke(cli, [str(a) for a in args])
    if out.exception is not None and not isinstance(out.exception, SystemExit):
        raise out.exception
    result = subprocess.CompletedProcess(["run.py", *map(str, args)], out.exit_code, out.stdout, out.stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"run.py {args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(scenes, shards, checkpoint): 24 scenes, a model trained for 30 steps."""
    root = tmp_path_factory.mktemp("predict")
    write_scenes(root / "scenes", 24, grasps_per_scene=GRASPS, grid=GRID, seed=4, workers=1, progress=False)
    # scenes with fewer grasps than the others, as in the seed's data
    for name in ("scene_000003", "scene_000007"):
        with np.load(root / "scenes" / name / "scene.npz") as z:
            arrays = {k: z[k] for k in z.files}
        arrays["grasps"], arrays["scores"] = arrays["grasps"][:29], arrays["scores"][:29]
        np.savez(root / "scenes" / name / "scene.npz", **arrays)
    build_shards(
        root / "scenes",
        root / "shards",
        BuildOptions(grid=GRID, max_grasps=GRASPS, records_per_shard=8, val_fraction=0.25, test_fraction=0.25),
        workers=1,
        progress=False,
    )
    run(
        "fit",
        "--shards",
        root / "shards",
        "--out",
        root / "run",
        "--max-steps",
        30,
        "-S",
        4,
        "-G",
        8,
        "--lr",
        "1e-3",
        "--base-channels",
        4,
        "--fc-dims",
        "16,8",
        "--quiet",
    )
    return root / "scenes", root / "shards", root / "run" / "last.pt"


def test_scores_function_is_the_models_output(trained):
    scenes, _, ckpt = trained
    est = Estimator.load(ckpt)
    with np.load(scenes / "scene_000001" / "scene.npz") as z:
        sdf, grasps = z["sdf"], z["grasps"]
    ours = est.scores(sdf, grasps)
    with torch.no_grad():  # the model called directly: standardised outputs back in score units
        direct = (
            est.model.forward_with_sdf(
                torch.from_numpy(np.repeat(sdf[None, None], len(grasps), 0)), torch.from_numpy(grasps)
            ).numpy()
            * est.units.std
            + est.units.mean
        )
    np.testing.assert_allclose(ours, direct, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.argsort(ours, kind="stable"), np.argsort(direct, kind="stable"))
    with pytest.raises(PredictError, match=r"SDF of shape \(8, 8, 8\)"):
        est.scores(np.zeros((8, 8, 8), np.float32), grasps)


def test_predict_scenes_writes_parquet_and_prints_the_best(trained, tmp_path: Path):
    scenes, _, ckpt = trained
    result = run("predict", ckpt, "--scenes", scenes, "--out", tmp_path / "p.parquet", "--top-k", 3, "--device", "cpu")
    table = pq.read_table(tmp_path / "p.parquet").to_pydict()
    assert list(table) == ["scene", "grasp", "prediction", "score"]
    assert len(table["scene"]) == 22 * GRASPS + 2 * 29
    est = Estimator.load(ckpt)
    rows = {(s, g): (p, t) for s, g, p, t in zip(*table.values())}
    with np.load(scenes / "scene_000003" / "scene.npz") as z:
        expected = est.scores(z["sdf"], z["grasps"])
        for g in range(29):
            assert rows[("scene_000003", g)][0] == pytest.approx(float(expected[g]), abs=1e-5)
            assert rows[("scene_000003", g)][1] == float(z["scores"][g])
    best = int(np.argmin(expected))
    assert "scene_000003" in result.stdout and "per object: spearman" in result.stdout
    line = [x for x in result.stdout.splitlines() if x.startswith("scene_000003") and x.split()[1] == "1"][0]
    assert int(line.split()[2]) == best
    assert result.stdout.count("\nscene_") == 24 * 3


def test_predict_shards_lines_up_with_the_stored_grasps(trained, tmp_path: Path):
    _, shards, ckpt = trained
    run("predict", ckpt, "--shards", shards, "--split", "val", "--out", tmp_path / "v.parquet", "--device", "cpu")
    cols = pq.read_table(tmp_path / "v.parquet").to_pydict()
    reader, est = ShardReader(shards), Estimator.load(ckpt)
    val = reader.split_scenes("val")
    names = reader.column("name", val)
    assert sorted(set(cols["scene"])) == sorted(names.tolist())
    for scene, name in zip(val, names):
        labels = np.asarray(reader.labels(scene))
        sdf = np.asarray(reader.sdf(scene), dtype=np.float32)
        expected = est.scores(sdf, labels[:, :19])  # the stored order, scored directly
        mine = [i for i, s in enumerate(cols["scene"]) if s == name]
        assert [cols["grasp"][i] for i in mine] == list(range(len(labels)))
        np.testing.assert_allclose([cols["prediction"][i] for i in mine], expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal([cols["score"][i] for i in mine], labels[:, 19])


def test_predict_mesh_and_bad_input(trained, tmp_path: Path):
    trimesh = pytest.importorskip("trimesh")
    pytest.importorskip("mesh2sdf")
    _, _, ckpt = trained
    box = trimesh.creation.box(extents=(0.2, 0.1, 0.3))
    box.apply_translation((1.0, 2.0, 3.0))
    box.export(tmp_path / "box.obj")
    grasps = np.zeros((6, 19), np.float32)
    grasps[:, :3] = [1.0, 2.0, 3.3]
    grasps[:, 6] = 1.0
    grasps[:, 2] += np.arange(6) * 0.05
    np.save(tmp_path / "g.npy", grasps)
    result = run(
        "predict",
        ckpt,
        "--mesh",
        tmp_path / "box.obj",
        "--grasps",
        tmp_path / "g.npy",
        "--out",
        tmp_path / "m.parquet",
        "--device",
        "cpu",
    )
    cols = pq.read_table(tmp_path / "m.parquet").to_pydict()
    assert list(cols) == ["scene", "grasp", "prediction"] and cols["grasp"] == list(range(6))
    assert "box" in result.stdout
    bad = run(
        "predict",
        ckpt,
        "--mesh",
        tmp_path / "box.obj",
        "--grasps",
        tmp_path / "box.obj",
        "--out",
        tmp_path / "x.parquet",
        check=False,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "box.obj" in bad.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_predict_refuses_bad_arguments(trained, tmp_path: Path):
    scenes, shards, ckpt = trained
    for args, message in (
        (["--scenes", scenes, "--shards", shards], "exactly one of"),
        (["--mesh", tmp_path / "a.obj"], "go together"),
        (["--scenes", tmp_path / "none"], "not a directory"),
    ):
        result = run("predict", ckpt, *args, "--out", tmp_path / "o.parquet", check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "o.parquet").exists()
    assert "Usage" in run("predict", "--help").stdout


def test_eval_reports_the_ranking_metrics(trained):
    _, shards, ckpt = trained
    out = json.loads(run("eval", ckpt, "--shards", shards, "--split", "test", "--device", "cpu").stdout)
    for key in ("test_top1_regret", "test_kendall_tau", *(f"test_top{k}_overlap" for k in (1, 5, 10, 50))):
        assert np.isfinite(out[key]), key
    assert out["test_top1_regret"] >= 0 and 0 <= out["test_top5_overlap"] <= 1
    assert out["test_top50_overlap"] == 1.0  # every test scene has <= 50 grasps: k = all of them


def test_best_grasps_orders_by_prediction(trained):
    scenes, _, ckpt = trained
    preds = predict_scenes(Estimator.load(ckpt), scenes)
    rows = best_grasps(preds, 2)
    assert len(rows) == 48 and [r[1] for r in rows[:2]] == [1, 2] and rows[0][3] <= rows[1][3]


def test_eval_baseline_is_the_train_mean_whatever_the_checkpoint(trained, tmp_path: Path):
    """The baseline is the MSE of predicting the train split's mean (the manifest's), for a seed state_dict (which
    records no score statistics) as for ours: not the MSE of predicting 0."""
    _, shards, ckpt = trained
    seed = tmp_path / "seed.pth"
    torch.save(build_model("small", input_size=GRID, base_channels=2, fc_dims=(8,)).state_dict(), seed)
    reader = ShardReader(shards)
    test = np.concatenate([np.asarray(reader.labels(s))[:, 19] for s in reader.split_scenes("test")]).astype(float)
    train_mean = reader.manifest.score_stats.mean
    expected = float(np.mean((test - train_mean) ** 2))
    assert abs(expected - float(np.mean(test**2))) > 0.1 * expected  # predicting 0 would be far from it
    for checkpoint in (ckpt, seed):
        out = json.loads(run("eval", checkpoint, "--shards", shards, "--device", "cpu").stdout)
        assert out["test_mse_mean_baseline"] == pytest.approx(expected, rel=1e-4), checkpoint


def test_an_estimator_in_a_planner_loads_no_plotting_parquet_or_dali(trained):
    """Importing, loading and scoring in a new interpreter, as a grasp planner does: no matplotlib, pyarrow or DALI."""
    scenes, _, ckpt = trained
    code = f"""
import sys
import numpy as np
from gq.train.predict import Estimator
est = Estimator.load({str(ckpt)!r})
with np.load({str(scenes / "scene_000001" / "scene.npz")!r}) as z:
    assert est.scores(z["sdf"], z["grasps"]).shape == (len(z["grasps"]),)
print([name for name in ("matplotlib", "pyarrow", "nvidia.dali") if name in sys.modules])  # or any submodule
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_scores_of_no_candidates_is_empty_and_a_nan_names_its_row(trained):
    scenes, _, ckpt = trained
    est = Estimator.load(ckpt)
    with np.load(scenes / "scene_000001" / "scene.npz") as z:
        sdf, grasps = z["sdf"], z["grasps"].copy()
    none = est.scores(sdf, np.empty((0, 19), np.float32))
    assert none.shape == (0,) and none.dtype == np.float32
    grasps[7, 4] = np.nan
    with pytest.raises(PredictError, match=r"^scores\(\): grasps row 7 holds NaN or inf"):
        est.scores(sdf, grasps)
    with pytest.raises(PredictError, match=r"SDF of shape \(8, 8, 8\)"):  # an empty set is still checked
        est.scores(np.zeros((8, 8, 8), np.float32), np.empty((0, 19), np.float32))


def test_eval_on_the_train_split_is_refused_in_one_line(trained):
    _, shards, ckpt = trained
    result = run("eval", ckpt, "--shards", shards, "--split", "train", check=False)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.endswith(
        " eval: error: --split train: the model was fitted on the train split, so it does not measure it; "
        "use --split test (held out) or --split val"
    )
