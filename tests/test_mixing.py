"""Several datasets in one run: each one's share of an epoch, no grasp twice in a batch, exact resume and
cache == dali on a mixture, the mixture's score statistics, and datasets that cannot be mixed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import fit_process

from gq.pipeline import LoaderError, MixedDataset, PlanSpec, make_plan, open_dataset, open_loader, open_mixture
from gq.pipeline.mixing import apportion, separate_copies
from gq.pipeline.plan import Segment
from gq.shards import DatasetError, ShardReader
from gq.shards.publish import upload
from gq.tools.training import cli
from gq.train.checkpoint import load_checkpoint
from gq.train.logs import validation_line
from gq.train.tracking import scalars

GRID = 16
# G at least every scene's grasps: each copy of a scene is one group, so scene counts are group counts.
WHOLE = dict(scenes_per_batch=3, grasps_per_sdf=24, seed=5, progress=False)


@pytest.fixture(scope="module")
def pair(shared_dataset) -> tuple[Path, Path]:
    """Two datasets of one layout: 26 and 12 scenes of 3..24 grasps, 4 records per shard."""
    common = dict(grid=GRID, grasps=(3, 24), records_per_shard=4, val_fraction=0.2, test_fraction=0.0)
    return shared_dataset(26, seed=3, **common), shared_dataset(12, seed=4, **common)


def _scenes(loader) -> list[np.ndarray]:
    """Each batch's scene ids, for one epoch."""
    return [b.scene_ids.numpy().copy() for b in loader]


def _member(data: MixedDataset, scene: np.ndarray) -> np.ndarray:
    return np.searchsorted(data.reader.scene_offset, scene, side="right") - 1


def test_weights_and_repeats_give_each_dataset_its_scenes_per_epoch(pair) -> None:
    a, b = map(open_dataset, pair)
    sizes = [int((a.split("train")[0].num_grasps > 0).sum()), int((b.split("train")[0].num_grasps > 0).sum())]
    total = sum(sizes)
    cases = {  # weights or repeats -> scenes per epoch of (a, b)
        "down": (dict(weights=[0.9, 0.1]), tuple(apportion(total, np.array([0.9, 0.1])))),
        "up": (dict(repeats=[1, 2.5]), (sizes[0], int(np.floor(2.5 * sizes[1] + 0.5)))),
        "1:1": (dict(weights=sizes), tuple(sizes)),
    }
    assert cases["down"][1][1] < sizes[1] and cases["up"][1][1] > 2 * sizes[1]
    for name, (share, counts) in cases.items():
        data = open_mixture([a, b], **share)
        assert data.counts == counts, name
        with open_loader(data, **WHOLE) as loader:
            drawn = []
            for epoch in (0, 1):
                loader.set_epoch(epoch)
                ids = np.concatenate(_scenes(loader))
                member = _member(data, ids)
                assert tuple(np.bincount(member, minlength=2)) == counts, (name, epoch)
                per_scene = Counter(ids[member == 1].tolist())
                # whole passes first, then the rest without replacement: every scene k or k + 1 times
                k = counts[1] // sizes[1]
                assert set(per_scene.values()) <= {k, k + 1} and len(per_scene) == (sizes[1] if k else counts[1])
                drawn.append(sorted(per_scene.items()))
        if name == "1:1":
            assert data.split("train")[0].mix is None  # the plain union: planned as one dataset
        else:
            assert drawn[0] != drawn[1]  # another draw each epoch, from the seed and the epoch


def test_a_list_of_datasets_is_their_union_and_one_is_the_dataset(pair) -> None:
    with open_loader(list(pair), **WHOLE) as union:
        ids = np.concatenate(_scenes(union))
        data = union.dataset
        assert sorted(np.bincount(_member(data, ids))) == sorted(data.sizes)
        assert len(ids) == len(set(ids.tolist()))  # each scene once
    with open_loader([pair[0]], **WHOLE) as one, open_loader(pair[0], **WHOLE) as plain:
        assert isinstance(one.dataset, type(plain.dataset))
        assert all(np.array_equal(x, y) for x, y in zip(_scenes(one), _scenes(plain)))


@pytest.mark.parametrize("window", [1, None])
def test_no_grasp_is_twice_in_a_batch(pair, window) -> None:
    data = open_mixture(list(pair), repeats=[1, 4])
    for g in (24, 5):
        with open_loader(data, scenes_per_batch=4, grasps_per_sdf=g, seed=2, shuffle_window=window,
                         progress=False) as loader:  # fmt: skip
            for epoch in range(3):
                loader.set_epoch(epoch)
                for batch in loader:
                    scene = batch.scene_ids[batch.scene_of_grasp]
                    rows = torch.cat([scene[:, None].double(), batch.grasps.double()], 1)
                    assert len(torch.unique(rows, dim=0)) == len(rows)


def test_copies_that_share_a_batch_are_swapped_apart_within_their_window() -> None:
    # groups of scenes 7, 7 (the same grasps), 8, 9 in batches of 2, all in one window
    scene = np.array([7, 7, 8, 9])
    start = np.array([0, 2, 4, 6, 8])
    slots = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    order = separate_copies(scene, start, slots, batch=np.array([0, 0, 1, 1]), window=np.zeros(4, np.int64))
    assert sorted(order) == [0, 1, 2, 3] and set(scene[order[:2]]) != {7}
    assert set(scene[order[2:]]) != {7}
    # a window with nothing to swap with is refused, not served with a duplicate
    with pytest.raises(ValueError, match="scene 7"):
        separate_copies(scene[:2], start[:3], slots[:4], batch=np.zeros(2, np.int64), window=np.zeros(2, np.int64))


@pytest.mark.parametrize("share", [dict(weights=[0.3, 0.7]), dict(repeats=[0.5, 4])])
@pytest.mark.parametrize("window", [1, 2, None])
def test_cache_and_dali_give_identical_batches_on_a_mixture(pair, share, window) -> None:
    data = open_mixture(list(pair), **share)
    kwargs = dict(scenes_per_batch=3, grasps_per_sdf=5, seed=5, shuffle_window=window)
    with (
        open_loader(data, mode="cache", progress=False, **kwargs) as cache,
        open_loader(data, mode="dali", **kwargs) as dali,
    ):
        for epoch in (0, 1):
            cache.set_epoch(epoch)
            dali.set_epoch(epoch)
            a, b = list(cache), list(dali)
            assert len(a) == len(b) == cache.epoch_batches(epoch) > 0
            for x, y in zip(a, b):
                assert all(
                    torch.equal(getattr(x, f), getattr(y, f))
                    for f in ("sdf", "grasps", "scores", "scene_of_grasp", "scene_ids")
                )


def test_batches_of_a_mixture_hold_their_own_datasets_records(pair) -> None:
    data = open_mixture(list(pair), repeats=[1, 2])
    readers = [ShardReader(p) for p in pair]
    with open_loader(data, scenes_per_batch=2, grasps_per_sdf=4, seed=1, progress=False) as loader:
        for batch in loader:
            for i, scene in enumerate(batch.scene_ids.tolist()):
                d = int(_member(data, np.array([scene]))[0])
                own = scene - int(data.reader.scene_offset[d])
                assert torch.equal(batch.sdf[i, 0], torch.from_numpy(readers[d].sdf(own).astype(np.float32)))
                labels = {tuple(r) for r in readers[d].labels(own)[:, :19].tolist()}
                assert all(tuple(r) in labels for r in batch.grasps[batch.scene_of_grasp == i].tolist())


def _grasps(batches) -> Counter:
    """Every (scene, grasp values) trained, with its count."""
    out = Counter()
    for b in batches:
        scene = b.scene_ids[b.scene_of_grasp]
        out.update(zip(scene.tolist(), map(tuple, b.grasps.tolist())))
    return out


@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_a_two_rank_state_on_a_mixture_resumes_on_one_rank_exactly(pair, mode: str) -> None:
    data = open_mixture(list(pair), weights=[0.4, 0.6])
    common = dict(scenes_per_batch=2, grasps_per_sdf=6, seed=3, shuffle_window=2, progress=False)
    trained, whole = [], []
    for rank in (0, 1):
        with open_loader(data, mode=mode, rank=rank, world_size=2, drop_last=True, **common) as loader:
            loader.set_epoch(1)
            batches = list(loader)
            whole += batches
            trained += batches[:3]
            loader.set_epoch(1)
            it = iter(loader)
            for _ in range(3):
                next(it)
            state = json.loads(json.dumps(loader.state_dict()))
    with open_loader(data, mode=mode, **common) as one, open_loader(data, mode="cache", **common) as cache:
        one.load_state_dict(state)
        cache.load_state_dict(state)
        rest, again = list(one), list(cache)
        assert len(rest) == len(again) > 0
        assert all(torch.equal(x.sdf, y.sdf) and torch.equal(x.grasps, y.grasps) for x, y in zip(rest, again))
        assert one.state_dict()["epoch"] == 2 and one.state_dict()["past"] == []
    # every grasp of the epoch (each copy of a scene) trained once: before the stop on two ranks, or after on one
    assert _grasps(trained) + _grasps(rest) == _grasps(whole)
    for b in rest:
        scene = b.scene_ids[b.scene_of_grasp]
        rows = torch.cat([scene[:, None].double(), b.grasps.double()], 1)
        assert len(torch.unique(rows, dim=0)) == len(rows)


def test_the_mixture_standardises_with_its_members_combined_statistics(pair) -> None:
    union = open_mixture(list(pair), repeats=[1, 1])
    every = []
    for p in pair:
        reader = ShardReader(p)
        for scene in reader.split_scenes("train"):
            every.append(reader.scores(int(scene)))
    every = np.concatenate(every).astype(np.float64)
    stats = union.score_stats
    assert stats.count == len(every)
    assert stats.mean == pytest.approx(every.mean(), rel=1e-5) and stats.std == pytest.approx(every.std(), rel=1e-4)
    assert (stats.min, stats.max) == pytest.approx((every.min(), every.max()))
    # b counted twice per epoch: its scores weigh twice
    twice = open_mixture(list(pair), repeats=[1, 2]).score_stats
    b = np.concatenate([ShardReader(pair[1]).scores(int(s)) for s in ShardReader(pair[1]).split_scenes("train")])
    a = every[: len(every) - len(b)]
    assert twice.mean == pytest.approx(np.concatenate([a, b, b]).mean(), rel=1e-5)


def test_a_mixture_records_every_dataset_and_its_share(pair) -> None:
    prints = {open_mixture(list(pair), **share).fingerprint for share in
              (dict(weights=[1, 1]), dict(weights=[1, 2]), dict(repeats=[1, 2]))}  # fmt: skip
    assert len(prints) == 3
    assert open_mixture(list(pair), weights=[1, 2]).fingerprint == open_mixture(list(pair), weights=[1, 2]).fingerprint
    assert open_mixture(list(pair[::-1]), weights=[2, 1]).fingerprint not in prints


def test_datasets_of_another_layout_are_refused_in_one_line(pair, shared_dataset) -> None:
    other = shared_dataset(12, grid=GRID, grasps=(3, 24), seed=4, records_per_shard=8, val_fraction=0.2,
                           test_fraction=0.0)  # fmt: skip
    with pytest.raises(DatasetError) as err:
        open_mixture([pair[0], other])
    message = str(err.value)
    assert str(pair[0]) in message and str(other) in message and "records per shard 4" in message
    assert "\n" not in message
    with pytest.raises(LoaderError, match="3 weights for 2 datasets"):
        open_loader(list(pair), weights=[1, 2, 3])
    with pytest.raises(LoaderError, match="weights or repeats, not both"):
        open_loader(list(pair), weights=[1, 2], repeats=[1, 1])
    with pytest.raises(LoaderError, match="go with a list of datasets"):
        open_loader(open_dataset(pair[0]), weights=[1])


# -- gq fit on a mixture ------------------------------------------------------------------------------------
FIT = ["--base-channels", "2", "--fc-dims", "8", "--threads", "1", "--quiet", "-S", "2", "-G", "4", "--max-steps", "3"]


def _fit(*args: str):
    return CliRunner().invoke(cli, ["fit", *args], catch_exceptions=False)


def test_fit_on_two_datasets_reports_each_ones_validation_and_the_mixtures(
    pair, shared_dataset, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shards = ["--shards", str(pair[0]), "--shards", str(pair[1])]
    done = _fit(*shards, "--weights", "0.4,0.6", "--out", str(out), *FIT)
    assert done.exit_code == 0, done.output
    summary = json.loads((out / "summary.json").read_text())
    names = list(summary["datasets"])
    assert len(names) == 2 and [d["weight"] for d in summary["datasets"].values()] == [0.4, 0.6]
    val = [ShardReader(p) for p in pair]
    for name, reader in zip(names, val):
        grasps = int(reader.index["num_grasps"][reader.index["split"] == "val"].sum())
        assert summary[f"val_{name}_grasps"] == grasps
    # the mixture's val is the union of the datasets' val splits: its MSE their grasp-weighted mean
    n = [summary[f"val_{name}_grasps"] for name in names]
    assert summary["val_grasps"] == sum(n)
    mixed = sum(k * summary[f"val_{name}_mse"] for k, name in zip(n, names)) / sum(n)
    assert summary["val_mse"] == pytest.approx(mixed, rel=1e-9)
    assert scalars({"val_mse": 1.0, f"val_{names[0]}_mse": 2.0, f"val_{names[0]}_grasps": 3}) == {
        "val/mse": 1.0, f"val/{names[0]}_mse": 2.0,
    }  # fmt: skip
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_mse" in line][-1]
    assert all(f"; {name}: MSE {row[f'val_{name}_mse']:.4f}" in validation_line(row) for name in names)
    recorded = load_checkpoint(out / "last.pt")["dataset"]
    assert [m["fingerprint"] for m in recorded["members"]] == [open_dataset(p).fingerprint for p in pair]
    assert json.loads((out / "config.json").read_text())["options"]["shards"] == [str(p) for p in pair]

    # a resume on other weights, or other datasets, is refused in one line; on the same ones it continues
    for other in (["--weights", "0.5,0.5"], ["--repeats", "1,2"]):
        refused = CliRunner().invoke(cli, ["fit", *shards, *other, "--out", str(out), "--resume", "--max-steps", "4"])
        assert refused.exit_code != 0 and len(refused.output.strip().splitlines()) == 1, refused.output
    refused = _fit("--shards", str(pair[0]), "--out", str(out), "--resume", "--max-steps", "4")
    assert refused.exit_code != 0 and len(refused.output.strip().splitlines()) == 1, refused.output
    third = shared_dataset(12, grid=GRID, grasps=(3, 24), seed=6, records_per_shard=4, val_fraction=0.2,
                           test_fraction=0.0)  # fmt: skip
    refused = CliRunner().invoke(cli, ["fit", "--shards", str(pair[0]), "--shards", str(third), "--weights", "0.4,0.6",
                                       "--out", str(out), "--resume", "--max-steps", "4"])  # fmt: skip
    assert refused.exit_code != 0 and "was trained on dataset" in refused.output
    assert f"--shards {pair[0]} --shards {third} --weights 0.4,0.6 is dataset" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    resumed = _fit("--out", str(out), "--resume", "--max-steps", "4")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_a_config_file_lists_datasets_with_their_weights_or_repeats(pair, tmp_path: Path) -> None:
    flags = _fit("--shards", str(pair[0]), "--shards", str(pair[1]), "--repeats", "1,2.5", "--out", "x",
                 "--print-config")  # fmt: skip
    config = tmp_path / "mix.yaml"
    config.write_text(f"shards:\n  - {{path: {pair[0]}, repeat: 1}}\n  - {{path: {pair[1]}, repeat: 2.5}}\nout: x\n")
    from_file = _fit("--config", str(config), "--print-config")
    assert flags.exit_code == from_file.exit_code == 0, flags.output + from_file.output
    assert json.loads(flags.output) == json.loads(from_file.output)
    assert json.loads(flags.output)["repeats"] == [1.0, 2.5]
    config.write_text(f"shards:\n  - {{path: {pair[0]}, weight: 1}}\n  - {{path: {pair[1]}}}\nout: x\n")
    half = CliRunner().invoke(cli, ["fit", "--config", str(config), "--print-config"])
    assert half.exit_code != 0 and "every dataset a weight" in half.output
    wrong = CliRunner().invoke(cli, ["fit", "--shards", str(pair[0]), "--weights", "1,2", "--out", "x"])
    assert wrong.exit_code != 0 and "--weights 1.0,2.0: 2 values for 1 datasets" in wrong.output


@pytest.mark.slow  # a torchrun job of two ranks, then one process
def test_a_mixture_run_on_two_ranks_resumes_on_one_with_the_rest_of_its_epoch(pair, tmp_path: Path) -> None:
    out, small = tmp_path / "run", ["--base-channels", "2", "--fc-dims", "8", "--threads", "1", "--quiet"]
    mix = ["--shards", str(pair[1]), "--weights", "0.3,0.7", "-S", "2", "-G", "6", "--epochs", "1", *small]
    first = fit_process(pair[0], out, *mix, "--max-steps", "4", ranks=2, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert load_checkpoint(out / "last.pt")["loader"]["world_size"] == 2
    records, _ = open_mixture(list(pair), weights=[0.3, 0.7]).split("train")
    left = len(make_plan(records, PlanSpec(2, 6, window=4), 0, (Segment(2, True, 4),)))
    again = fit_process(pair[0], out, *mix, "--max-steps", str(4 + left), "--resume", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    final = load_checkpoint(out / "last.pt")["loader"]
    assert (final["epoch"], final["position"], final["past"], final["world_size"]) == (1, 0, [], 1)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4 + left


def test_on_several_ranks_each_dataset_still_gives_its_count_and_each_scene_k_or_k_plus_1_times(pair) -> None:
    data = open_mixture(list(pair), weights=[0.2, 0.8])
    records, _ = data.split("train")
    for world in (2, 3):
        for epoch in (0, 1):
            ids = np.concatenate([make_plan(records, PlanSpec(2, 24, seed=4, rank=r, world_size=world), epoch)
                                  .group_scene for r in range(world)])  # fmt: skip
            member = _member(data, ids)
            assert tuple(np.bincount(member, minlength=2)) == data.counts
            for d in (0, 1):
                k = data.counts[d] // data.sizes[d]
                assert set(Counter(ids[member == d].tolist()).values()) <= {k, k + 1}


@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_a_mixture_with_a_dataset_on_object_storage_gives_the_batches_of_the_local_one(
    pair, s3, s3_bucket: str, tmp_path: Path, mode: str
) -> None:
    url = f"{s3_bucket}/b"
    upload(pair[1], url)
    settings = dict(mode=mode, weights=[0.3, 0.7], scenes_per_batch=3, grasps_per_sdf=5, seed=2, progress=False)
    with open_loader(list(pair), **settings) as local:
        want = [[(b.sdf, b.grasps, b.scene_ids) for b in local] for _ in range(2)]
    with open_loader([pair[0], url], cache_dir=tmp_path / "cache", **settings) as remote:
        got = [[(b.sdf, b.grasps, b.scene_ids) for b in remote] for _ in range(2)]
        assert remote.dataset.source == f"{pair[0]} + {url}" and remote.dataset.names[1] == "b"
    for a, b in zip(want, got):
        assert len(a) == len(b) > 0
        assert all(torch.equal(s, t) for x, y in zip(a, b) for s, t in zip(x, y))
