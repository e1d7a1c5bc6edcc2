"""The benchmark scripts run end to end on tiny data and write the JSON their issues specify.

These check that the benchmarks work, not how fast anything is: figures come from full runs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import run_tool

from gq.benchmarks.bench_train import row_too_large, training_memory
from gq.pipeline.cache import free_memory
from gq.train import FitConfig


@pytest.fixture(scope="module")
def tiny(shared_dataset) -> tuple[Path, Path]:
    shards = shared_dataset(60, grid=16, grasps=64, seed=2, records_per_shard=8)
    return shards.parent / "scenes", shards


def bench(script: str, out: Path, *args) -> subprocess.CompletedProcess:
    """`python tools/<script> ARGS --json OUT` in its own process; it must succeed."""
    return run_tool(script, *args, "--json", out, check=True, subprocess=True)


def test_bench_shards(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    result = bench("bench_shards.py", out, "--scenes", 8, "--grid", 16, "--grasps", 16, "--repeat", 1)
    figures = json.loads(out.read_text())
    assert figures["scenes"] == 8 and figures["workers"] >= 1
    for kind in ("compressed", "uncompressed"):  # the seed's zlib-compressed files, and np.savez's
        for key in (
            "decode_floor_s",
            "make_shards_s",
            "read_shards_s",
            "read_npz_s",
            "bytes_per_scene",
            "input_bytes_per_scene",
            "writer_from_memory_s",  # ShardWriter fed arrays, no files
            "merge_4_parts_s",
            "merge_over_copy",  # against a plain copy of the parts' files
        ):
            assert figures[kind][key] > 0
        assert figures[kind]["seed_bytes_per_scene"] == 16**3 * 4 + 16 * 20 * 4
    assert figures["compressed"]["input_bytes_per_scene"] < figures["uncompressed"]["input_bytes_per_scene"]
    assert result.stdout.count("x floor") == 2 and "compressed scene.npz inputs" in result.stdout


@pytest.mark.slow  # every row in a fresh spawned process: ~30 s
def test_bench_loaders(tiny, tmp_path: Path) -> None:
    scenes, shards = tiny
    out = tmp_path / "l.json"
    result = bench(
        "bench_loaders.py", out, "--shards", shards, "--seed-scenes", scenes, "--batches", 2, "--gather-baseline"
    )
    rows = json.loads(out.read_text())
    gathers = [r for r in rows if r["loader"] == "gather"]  # the one-pass SDF gather against the former two-pass one
    assert [(r["scenes_per_batch"], r["grasps_per_scene"]) for r in gathers] == [(128, 1), (8, 16)]
    assert all(r["ratio"] > 0 and r["write_floor_samples_per_s"] > 0 for r in gathers)
    assert result.stdout.count("one-pass / two-pass SDF gather") == 2
    rows = [r for r in rows if r["loader"] != "gather"]
    assert [r["loader"] for r in rows] == [
        "cache",
        "cache",
        "dali",
        "dali",
        "cache",
        "cache",
        "seed-npz",
        "seed-memory",
    ]
    assert [r.get("rank") for r in rows[4:6]] == [0, 1] and rows[4]["world_size"] == 2
    epoch = rows[3]
    # every byte once per epoch; at this size one shard more or less in DALI's read-ahead at either mark is ~10 %
    assert epoch["split_bytes"] > 0 and 0.75 <= epoch["bytes_read_per_epoch"] / epoch["split_bytes"] <= 1.25
    for row in rows:
        assert {
            "device",
            "scenes_per_batch",
            "grasps_per_scene",
            "first_batch_s",
            "batches_per_s",
            "samples_per_s",
            "resident_bytes",
        } <= row.keys()
        assert row["samples_per_s"] > 0


@pytest.mark.slow  # 8 throughput rows and two timed fits
def test_bench_train(tiny, tmp_path: Path) -> None:
    _, shards = tiny
    out = tmp_path / "t.json"
    steps = ["--steps", 1, "--large-steps", 1, "--budget-s", 1, "--val-every", 2]
    bench("bench_train.py", out, "--shards", shards, *steps, "--base-channels", 2, "--fc-dims", 8)
    result = json.loads(out.read_text())
    assert len(result["throughput"]) == 8
    assert {"model", "loader", "device", "scenes_per_batch", "grasps_per_scene", "samples_per_s"} <= result[
        "throughput"
    ][0].keys()
    assert {"target_val_mse", "g1_s", "g16_s"} <= result["time_to_quality"].keys()


@pytest.mark.slow  # four fits
def test_bench_train_window_study(tiny, tmp_path: Path) -> None:
    _, shards = tiny
    out = tmp_path / "w.json"
    study = ["--window-study", "1,all", "--study-steps", 2, "--study-seeds", "0,1"]
    result = bench("bench_train.py", out, "--shards", shards, *study, "--base-channels", 2, "--fc-dims", 8)
    rows = json.loads(out.read_text())["window_study"]
    assert [(r["seed"], r["shuffle_window"]) for r in rows] == [(0, "1"), (0, "all"), (1, "1"), (1, "all")]
    assert all(r["steps"] == 2 and r["val_mse"] > 0 for r in rows)
    assert [r["val_mse_vs_all"] for r in rows][1::2] == [1.0, 1.0]
    assert "window 1: val MSE / all's, mean over 2 seed(s)" in result.stdout


@pytest.mark.slow  # four fits stopped on time
def test_bench_train_time_study(tiny, tmp_path: Path) -> None:
    _, shards = tiny
    out = tmp_path / "ts.json"
    study = ["--time-study", "S2 G8,S2 G8 lr3e-3", "--study-budgets", "1,2"]
    result = bench("bench_train.py", out, "--shards", shards, *study, "--base-channels", 2, "--fc-dims", 8)
    rows = json.loads(out.read_text())["time_study"]
    assert [(r["recipe"], r["budget_s"]) for r in rows] == [
        ("S2 G8", 1.0),
        ("S2 G8 lr3e-3", 1.0),
        ("S2 G8", 2.0),
        ("S2 G8 lr3e-3", 2.0),
    ]
    for row in rows:  # each run is fit stopped by its budget, with the recipe's batch shape and lr
        assert row["scenes_per_batch"] == 2 and row["grasps_per_sdf"] == 8  # the recipe's FitConfig fields
        assert row["train_time_s"] >= row["budget_s"] and row["steps"] > 0 and row["val_mse_mean_baseline"] > 0
    assert rows[1]["lr"] == 3e-3 and "lr" not in rows[0]
    assert "1 s: best mean val R2" in result.stdout and "2 s: best mean val R2" in result.stdout


def test_bench_train_time_study_refuses_an_unknown_recipe_token(tmp_path: Path) -> None:
    result = run_tool("bench_train.py", "--shards", tmp_path, "--time-study", "S8 X3")
    assert result.returncode == 2 and "'X3' in 'S8 X3'" in result.stderr and "S<scenes> G<grasps>" in result.stderr


def test_bench_train_skips_rows_too_large_to_build_with_one_line_each(tiny, tmp_path: Path) -> None:
    """Each row is checked before it runs: a model above the size any run may build is skipped with one line,
    not left to the allocator."""
    _, shards = tiny
    out = tmp_path / "t.json"
    wide = ["--base-channels", 100000, "--fc-dims", 8]  # terabytes of weights
    result = bench("bench_train.py", out, "--shards", shards, "--device", "cpu", "--models", "large",
                   "--loaders", "cache", "--skip-quality", *wide)  # fmt: skip
    figures = json.loads(out.read_text())
    assert figures["throughput"] == []
    assert [(r["scenes_per_batch"], r["grasps_per_scene"]) for r in figures["skipped"]] == [(128, 1), (8, 16)]
    assert result.stdout.count("skipped large/cache") == 2 and "parameters" in figures["skipped"][0]["why"]


def test_the_row_that_was_killed_for_memory_is_skipped_where_it_cannot_fit() -> None:
    """GQEstimatorLarge at S=128 G=1 on 48^3 SDFs (bench train's first large row at its defaults) needs ~30 GB:
    on a machine with less free memory the row is skipped with the figures, as on a 24 GiB machine."""
    cfg = FitConfig(shards="-", out="-", model="large", scenes_per_batch=128, grasps_per_sdf=1)
    needed, free = training_memory(cfg, 48), free_memory(torch.device("cpu"))
    assert 25e9 < needed < 40e9  # the estimate: weights, gradients, Adam state and activations
    if free >= needed:
        pytest.skip(f"this machine has {free / 1e9:.0f} GB free, enough for the row")
    why = row_too_large(cfg, 48, torch.device("cpu"))
    assert why is not None and f"~{needed / 1e9:.1f} GB" in why and "GB are free" in why


def test_bench_stats(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    result = bench("bench_stats.py", out, "--scenes", 12, "--grid", 16, "--grasps", 32, "--shuffle-every", 4,
                   "--repeat", 1, "--workers", 1)  # fmt: skip
    figures = json.loads(out.read_text())
    assert figures["scenes"] == 12 and figures["shuffled"] == 3
    assert figures["stats_s"] > 0 and figures["verify_s"] > 0
    assert figures["seed_stats_s"] == pytest.approx(figures["stats_s"] * 15_547 / 12)
    assert 0 <= figures["false_positive_rate"] <= 1 and "15547 scenes: stats" in result.stdout


@pytest.mark.slow  # a moto server, and each of the 3 rows in a fresh spawned process: ~30 s
def test_bench_remote(tmp_path: Path) -> None:
    for module in ("moto", "flask", "s3fs"):
        pytest.importorskip(module, reason="the s3 and dev extras run the benchmark's S3 server")
    out = tmp_path / "r.json"
    small = ["--scenes", 160, "--grid", 16, "--grasps", 16, "--records-per-shard", 2, "--epochs", 2, "-S", 2, "-G", 8]
    result = bench("bench_remote.py", out, *small, "--shuffle-window", 1, "--loaders", "dali")
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert [(r["loader"], r["limit"]) for r in rows] == [("dali", None), ("dali", 1.0), ("dali", 0.25)]
    split = rows[0]["epochs"][0]
    assert split["grasps"] == 16 * split["scenes"] and figures["split_shards"] >= 48
    for row in rows:  # every epoch of every row delivers the whole split
        assert [(e["scenes"], e["grasps"]) for e in row["epochs"]] == [(split["scenes"], split["grasps"])] * 2
        assert row["grasps_per_s"] > 0
    local, whole, quarter = (r["downloaded_per_split"] for r in rows)
    assert local == [0, 0]  # nothing served
    # every shard once, beside the metadata (5 % of so small a split) and the next epoch's first shards
    assert 1.0 <= whole[0] <= 1.25 and 1.0 <= quarter[0] <= 1.25
    assert 0.8 <= quarter[1] <= 1.2  # a quarter cached: each shard once more in the second epoch
    assert whole[1] <= 0.25  # most of the split still cached
    assert "later x local" in result.stdout and "at a 25% cache: downloaded per epoch / split" in result.stdout
    assert "no Streaming rows: give --streaming-python" in result.stdout


def test_the_streaming_copy_lists_the_splits_scenes_and_batches_them_as_gq_does(shared_dataset) -> None:
    """What bench_remote hands Streaming's side (no Streaming here): every scene of the split, once, with its
    grasps; and its collate function gives gq's batch layout for scenes of different grasp counts."""
    from gq.benchmarks.bench_remote import split_records
    from gq.benchmarks.streaming_side import collate
    from gq.shards import ShardReader

    shards = shared_dataset(60, grid=16, grasps=64, seed=2, records_per_shard=8)
    reader, spec = ShardReader(shards), split_records(shards, "train")
    listed = [scene for shard in spec["shards"] for scene in shard["scenes"]]
    assert sorted(listed) == sorted(reader.split_scenes("train").tolist())
    assert [s["grasps"] for s in spec["shards"]][0] == reader.column("num_grasps", spec["shards"][0]["scenes"]).tolist()
    samples = [{"scene": s, "sdf": reader.sdf(s), "labels": reader.labels(s)[:n]} for s, n in zip(listed[:2], (3, 5))]
    batch = collate(samples)
    assert batch["sdf"].shape == (2, 1, 16, 16, 16) and batch["sdf"].dtype == torch.float32
    assert batch["grasps"].shape == (8, 19) and batch["scores"].shape == (8,)
    assert batch["scene_of_grasp"].tolist() == [0] * 3 + [1] * 5 and batch["scene_ids"].tolist() == listed[:2]
    assert torch.equal(batch["scores"][3:], torch.tensor(reader.scores(listed[1])[:5]))
