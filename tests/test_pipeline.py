"""The epoch plan and both loaders: coverage, determinism, identical batches, alignment, misuse."""

from __future__ import annotations

import gc
import inspect
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO

from gq.pipeline import (
    DEFAULT_GRASPS_PER_SDF,
    EpochIndex,
    LoaderError,
    PlanSpec,
    SplitRecords,
    make_plan,
    num_batches,
    open_dataset,
    open_loader,
)
from gq.shards import BuildOptions, DatasetError, ShardReader, build_shards
from gq.train.config import FitConfig

GRID = 16
ONE_RANK = {"world_size": 1, "drop_last": False, "past": []}  # a loader state's world: one rank, no earlier ones


@pytest.fixture(scope="module")
def dataset(shared_dataset) -> tuple[Path, Path]:
    """(source dir, shards dir): 26 scenes of 3..24 grasps, 4 records per shard, hash splits."""
    shards = shared_dataset(
        26, grid=GRID, grasps=(3, 24), seed=3, records_per_shard=4, val_fraction=0.2, test_fraction=0.0
    )
    return shards.parent / "scenes", shards


def _records(shards: int = 10, per_shard: int = 4, seed: int = 0) -> SplitRecords:
    """A split of `shards` shards (numbered from 3, as a val split would be) with short and full scenes."""
    rng = np.random.default_rng(seed)
    n = shards * per_shard - 2  # the last shard is padded
    counts = rng.integers(1, 481, n)
    counts[:4] = [480, 479, 476, 3]  # full scenes, the seed's short ones, one with fewer than G
    position = np.arange(n)
    return SplitRecords(
        scene=rng.permutation(1000)[:n].astype(np.int64),
        shard=3 + position // per_shard,
        slot=position % per_shard,
        num_grasps=counts.astype(np.int64),
    )


@pytest.mark.parametrize("g", [1, 7, 480])
@pytest.mark.parametrize("window", [1, 3, None])
@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_plan_visits_every_grasp_once(g: int, window: int | None, world_size: int, drop_last: bool) -> None:
    records = _records()
    s = 5
    seen, per_rank, owned = [], [], []
    for rank in range(world_size):
        spec = PlanSpec(s, g, seed=7, rank=rank, world_size=world_size, drop_last=drop_last, window=window)
        plan = make_plan(records, spec, epoch=2)
        assert len(plan) == num_batches(records, spec)
        per_rank.append(len(plan))
        mine = set(records.rank_shards(rank, world_size).tolist())
        owned.append(mine)
        assert set(plan.group_shard.tolist()) <= mine and sorted(plan.shard_order.tolist()) == sorted(mine)
        for b in range(len(plan)):
            scene_ids, slots, scene_of_grasp = plan.batch(b)
            assert len(scene_ids) <= s and (not drop_last or len(scene_ids) == s)
            assert np.bincount(scene_of_grasp, minlength=len(scene_ids)).max() <= g
            # a batch only uses the windows it spans, and those are what a loader holds resident
            first, last = plan.shard_span(b)
            g0, g1 = plan.groups(b)
            assert (plan.group_pos[g0:g1] >= first).all() and (plan.group_pos[g0:g1] <= last).all()
            assert last - first + 1 <= plan.resident_shards()
            seen += list(zip(scene_ids[scene_of_grasp].tolist(), slots.tolist()))
    # ranks own disjoint shard sets that cover the split, the same ones every epoch
    assert set().union(*owned) == set(records.shards().tolist()) and sum(map(len, owned)) == 10
    assert len(seen) == len(set(seen))  # never twice, across ranks too
    everything = {(int(i), k) for i, n in zip(records.scene, records.num_grasps) for k in range(n)}
    assert set(seen) <= everything
    if drop_last:
        assert len(set(per_rank)) == 1  # equal batch counts on every rank
        groups = -(-records.num_grasps // g)
        owner = (records.shard - 3) % world_size
        smallest = min(int(groups[owner == r].sum()) for r in range(world_size))
        assert per_rank[0] == smallest // s
    else:
        assert set(seen) == everything


def test_plan_window_keeps_groups_within_their_window() -> None:
    records = _records(shards=8)
    plan = make_plan(records, PlanSpec(3, 16, seed=1, window=2), epoch=0)
    assert plan.window == 2
    window_of_group = plan.group_pos // 2
    assert (np.diff(window_of_group) >= 0).all()  # windows follow each other, groups shuffled inside
    assert len(np.unique(window_of_group)) == 4
    # within a window the groups of its two shards are interleaved, not shard after shard
    first = plan.group_shard[window_of_group == 0]
    assert (np.diff(first) != 0).sum() > 2
    full = make_plan(records, PlanSpec(3, 16, seed=1, window=None), epoch=0)
    assert full.window == 8 and full.resident_shards() == 8
    assert make_plan(records, PlanSpec(3, 16, seed=1, window=100), epoch=0).window == 8


def test_plan_is_deterministic_and_changes_with_epoch_and_seed() -> None:
    records = _records()
    spec = PlanSpec(4, 16, seed=3, window=2)
    a, b = make_plan(records, spec, 0), make_plan(records, spec, 0)
    assert np.array_equal(a.group_scene, b.group_scene) and np.array_equal(a.slots, b.slots)
    c = make_plan(records, spec, 1)
    d = make_plan(records, PlanSpec(4, 16, seed=4, window=2), 0)
    assert not np.array_equal(a.slots, c.slots) and not np.array_equal(a.slots, d.slots)
    assert not np.array_equal(a.shard_order, c.shard_order) or not np.array_equal(a.group_scene, c.group_scene)
    # the same grasps in another order: coverage does not depend on the epoch
    assert len(a.slots) == len(c.slots) == records.num_grasps.sum()


def test_scene_shorter_than_g_gets_a_short_group() -> None:
    records = SplitRecords(
        scene=np.array([0, 1]), shard=np.array([0, 0]), slot=np.array([0, 1]), num_grasps=np.array([3, 20])
    )
    plan = make_plan(records, PlanSpec(1, 8, seed=0), 0)
    lengths = sorted(np.diff(plan.group_start).tolist())
    assert lengths == [3, 4, 8, 8]  # scene 0: one group of 3; scene 1: 8, 8 and the rest, 4


def _epoch(loader) -> list:
    return list(loader)


def _same(x, y) -> bool:
    return all(
        torch.equal(getattr(x, f), getattr(y, f)) for f in ("sdf", "grasps", "scores", "scene_of_grasp", "scene_ids")
    )


@pytest.mark.parametrize("s,g,window", [(3, 5, 2), (4, 1, 2), (2, 24, 2), (3, 5, None), (4, 1, 1)])
def test_cache_and_dali_give_identical_batches(dataset, s: int, g: int, window: int | None) -> None:
    _, shards = dataset
    kwargs = dict(scenes_per_batch=s, grasps_per_sdf=g, seed=5, shuffle_window=window)
    with (
        open_loader(shards, mode="cache", progress=False, **kwargs) as cache,
        open_loader(shards, mode="dali", **kwargs) as dali,
    ):
        assert len(cache) == len(dali)
        for epoch in (0, 1):
            cache.set_epoch(epoch)
            dali.set_epoch(epoch)
            a, b = _epoch(cache), _epoch(dali)
            assert len(a) == len(b) == len(cache)
            assert all(_same(x, y) for x, y in zip(a, b))
        total = sum(bt.num_grasps for bt in a)
        assert total == int(ShardReader(shards).column("num_grasps", cache.scene_ids).sum())


@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_batches_match_the_source_scene_files(dataset, mode: str) -> None:
    src, shards = dataset
    reader = ShardReader(shards)
    with open_loader(shards, mode=mode, scenes_per_batch=3, grasps_per_sdf=4, seed=1, progress=False) as loader:
        for batch in loader:
            assert batch.sdf.dtype == torch.float32 and batch.sdf.shape[1:] == (1, GRID, GRID, GRID)
            assert batch.grasps.shape == (batch.num_grasps, 19) and batch.scores.shape == (batch.num_grasps,)
            for i, scene in enumerate(batch.scene_ids.tolist()):
                with np.load(src / reader.column("name", [scene])[0] / "scene.npz") as z:
                    assert torch.equal(batch.sdf[i, 0], torch.from_numpy(z["sdf"].astype(np.float16)).float())
                    mine = batch.scene_of_grasp == i
                    # every grasp of this group is a row of this scene's file, with its own score
                    rows = {tuple(r) for r in np.concatenate([z["grasps"], z["scores"][:, None]], 1).tolist()}
                    got = torch.cat([batch.grasps[mine], batch.scores[mine, None]], 1).tolist()
                    assert all(tuple(r) in rows for r in got) and 1 <= len(got) <= 4


@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_resume_mid_epoch_continues_with_the_same_batches(dataset, mode: str) -> None:
    _, shards = dataset
    kwargs = dict(scenes_per_batch=2, grasps_per_sdf=3, seed=9, progress=False)
    with open_loader(shards, mode=mode, **kwargs) as loader:
        loader.set_epoch(4)
        full = _epoch(loader)
        loader.set_epoch(4)
        it = iter(loader)
        for _ in range(3):
            next(it)
        state = loader.state_dict()
    assert state == {"seed": 9, "epoch": 4, "position": 3, **ONE_RANK}
    with open_loader(shards, mode=mode, **kwargs) as again:
        again.load_state_dict(json.loads(json.dumps(state)))
        rest = _epoch(again)
    assert len(rest) == len(full) - 3 and all(_same(x, y) for x, y in zip(rest, full[3:]))


@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_the_loader_rolls_on_to_the_next_epoch(dataset, mode: str) -> None:
    _, shards = dataset
    kwargs = dict(scenes_per_batch=2, grasps_per_sdf=3, seed=9, shuffle_window=2, progress=False)
    with open_loader(shards, mode=mode, **kwargs) as reference:
        expected = []
        for epoch in (2, 3):
            reference.set_epoch(epoch)
            expected.append(_epoch(reference))
    with open_loader(shards, mode=mode, **kwargs) as loader:
        loader.set_epoch(2)
        states = [loader.state_dict() for _ in loader]  # the state while each batch is in the caller's hands
        assert states[-2] == {"seed": 9, "epoch": 2, "position": len(loader) - 1, **ONE_RANK}
        assert states[-1] == {
            "seed": 9,
            "epoch": 3,
            "position": 0,
            **ONE_RANK,
        }  # a checkpoint here resumes at epoch 3's start
        pipe = getattr(loader, "_pipe", None)
        rolled = _epoch(loader)
        assert getattr(loader, "_pipe", None) is pipe  # DALI's pipeline lists the next epochs: not rebuilt
        assert loader.state_dict()["epoch"] == 4
    assert len(rolled) == len(expected[1]) and all(_same(x, y) for x, y in zip(rolled, expected[1]))


def test_loaders_share_one_opened_dataset(dataset) -> None:
    _, shards = dataset
    data = open_dataset(shards)
    assert data.fingerprint == json.loads((shards / "manifest.json").read_text())["fingerprint"]
    kwargs = dict(scenes_per_batch=2, grasps_per_sdf=3, progress=False)
    with (
        open_loader(data, split="train", **kwargs) as train,
        open_loader(data, split="val", **kwargs) as val,
        open_loader(shards, split="train", **kwargs) as own,
    ):
        assert train.reader is val.reader is data.reader and own.reader is not data.reader
        assert train.score_stats == val.score_stats == ShardReader(shards).manifest.score_stats
        assert all(_same(x, y) for x, y in zip(train, own))
        assert isinstance(train._epoch_index(train.plan()), EpochIndex)
    with pytest.raises(TypeError):
        open_loader(shards, "cache")  # everything after the dataset is keyword-only


def test_import_pipeline_does_not_import_dali() -> None:
    code = "import sys, pipeline; print(any(m.startswith('nvidia.dali') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ranks_split_the_epoch(dataset) -> None:
    _, shards = dataset
    seen = []
    for rank in range(3):
        with open_loader(
            shards,
            mode="cache",
            scenes_per_batch=2,
            grasps_per_sdf=5,
            seed=2,
            rank=rank,
            world_size=3,
            progress=False,
        ) as loader:
            for b in loader:
                seen += list(zip(b.scene_ids[b.scene_of_grasp].tolist(), b.grasps[:, 0].tolist()))
    reader = ShardReader(shards)
    assert len(seen) == len(set(seen)) == int(reader.column("num_grasps", reader.split_scenes("train")).sum())


def test_memory_check_names_both_numbers_and_suggests_dali(dataset) -> None:
    _, shards = dataset
    with pytest.raises(LoaderError) as err:
        open_loader(shards, mode="cache", grasps_per_sdf=8, memory_budget=10_000, progress=False)
    message = str(err.value)
    assert re.search(r"needs 0\.\d{3} GB on cpu, but only 0\.000 GB are free", message), message
    assert "mode='dali'" in message
    n = len(ShardReader(shards).split_scenes("train"))
    needed = n * (GRID**3 * 2 + 24 * 20 * 4)  # the records, not the shards' padding
    with open_loader(shards, mode="cache", grasps_per_sdf=8, memory_budget=needed, progress=False) as loader:
        assert loader.resident_bytes == needed


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _children() -> list[int]:
    me, kids = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            kids.append(int(pid))
    return kids


def test_dali_teardown_leaves_no_threads_or_processes(dataset) -> None:
    _, shards = dataset
    gc.collect()
    threads, children = _threads(), _children()
    loader = open_loader(shards, mode="dali", scenes_per_batch=2, grasps_per_sdf=4, num_threads=3)
    it = iter(loader)
    next(it)
    assert _threads() > threads  # DALI's workers are running
    del it
    loader.close()
    deadline = time.time() + 5
    while _threads() > threads and time.time() < deadline:
        time.sleep(0.05)
    assert _threads() == threads and _children() == children


def test_bad_directories_fail_before_any_work(dataset, tmp_path: Path) -> None:
    _, shards = dataset
    with pytest.raises(DatasetError, match="no such dataset directory"):
        open_loader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="manifest.json: missing"):
        open_loader(tmp_path / "empty")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in shards.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "labels-00001.npy").write_bytes((copy / "labels-00001.npy").read_bytes()[:-4])
    with pytest.raises(DatasetError, match="labels-00001.npy: .* bytes, manifest says"):
        open_loader(copy)
    manifest["version"] = 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="format version 1, .* rebuild the dataset with gq shards build"):
        open_loader(copy, mode="dali")


def test_the_old_grasps_per_scene_keyword_gives_the_same_batches_with_a_deprecation_warning(dataset) -> None:
    _, shards = dataset
    kwargs = dict(scenes_per_batch=3, seed=2, progress=False)
    with open_loader(shards, grasps_per_sdf=5, **kwargs) as new:
        expected = _epoch(new)
    with pytest.warns(
        DeprecationWarning, match=r"grasps_per_scene=...\) is deprecated: it is grasps_per_sdf"
    ) as caught:
        old = open_loader(shards, grasps_per_scene=5, **kwargs)
    with old:
        got = _epoch(old)
    assert len(caught) == 1 and caught[0].filename == __file__  # one warning, pointing at the caller's line
    assert len(got) == len(expected) and all(_same(x, y) for x, y in zip(got, expected))
    with pytest.raises(LoaderError, match="one option by two names"):
        open_loader(shards, grasps_per_sdf=4, grasps_per_scene=5, **kwargs)


def test_score_stats_are_the_train_splits_as_docs_loading_says_for_every_split(dataset) -> None:
    _, shards = dataset
    reader = ShardReader(shards)
    scores = np.concatenate([reader.labels(s)[:, 19] for s in reader.split_scenes("train")]).astype(np.float64)
    for split in ("train", "val"):
        with open_loader(shards, split=split, grasps_per_sdf=8, progress=False) as loader:
            stats = loader.score_stats
        assert stats.split == "train" and stats.count == len(scores)
        assert stats.min == scores.min() and stats.max == scores.max()
        np.testing.assert_allclose([stats.mean, stats.std], [scores.mean(), scores.std(ddof=0)], rtol=1e-12)


def test_fit_and_open_loader_share_one_default_g() -> None:
    default = inspect.signature(open_loader).parameters["grasps_per_sdf"].default
    assert default == FitConfig.grasps_per_sdf == DEFAULT_GRASPS_PER_SDF


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"scenes_per_batch": 0}, "scenes_per_batch 0"),
        ({"grasps_per_sdf": 25}, "more than the 24 grasp slots"),
        ({"grasps_per_sdf": 0}, r"grasps per SDF \(G\) 0"),
        ({"mode": "stream"}, "mode 'stream'"),
        ({"split": "test"}, "split 'test' of .* has no scenes"),
        ({"rank": 3, "world_size": 3}, "rank 3 of world size 3"),
        ({"scenes_per_batch": 1000, "drop_last": True}, "gives no batches"),
    ],
)
def test_settings_that_cannot_work_are_refused(dataset, kwargs: dict, message: str) -> None:
    _, shards = dataset
    with pytest.raises(LoaderError, match=message):
        open_loader(shards, **{"grasps_per_sdf": 8, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_request_without_cuda_is_refused(dataset) -> None:
    with pytest.raises(LoaderError, match="CUDA is not available"):
        open_loader(dataset[1], grasps_per_sdf=8, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_cuda_batches_equal_cpu_batches(dataset, mode: str) -> None:
    _, shards = dataset
    with (
        open_loader(shards, mode="cache", scenes_per_batch=3, grasps_per_sdf=5, progress=False) as cpu,
        open_loader(shards, mode=mode, scenes_per_batch=3, grasps_per_sdf=5, device="cuda", progress=False) as gpu,
    ):
        for x, y in zip(cpu, gpu):
            assert y.sdf.is_cuda and _same(x, type(x)(**{k: v.cpu() for k, v in vars(y).items()}))


def _copy_dataset(shards: Path, to: Path) -> Path:
    to.mkdir()
    for f in shards.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["sdf", "labels"])
def test_a_flipped_byte_is_refused_before_any_batch_uses_it(dataset, tmp_path: Path, kind: str) -> None:
    from gq.shards.format import HEADER_BYTES

    _, shards = dataset
    copy = _copy_dataset(shards, tmp_path / "copy")
    reader = ShardReader(copy)
    train = reader.split_shards("train")
    shard = int(train[-2])  # a full shard that is not the first
    rows = np.flatnonzero(reader.index["shard"] == shard)
    row = int(rows[2])
    scene, slot, name = int(reader.index["scene"][row]), int(reader.index["slot"][row]), reader.index["name"][row]
    record = reader.layout.sdf_record_bytes if kind == "sdf" else reader.layout.labels_record_bytes
    path = reader.sdf_path(shard) if kind == "sdf" else reader.labels_path(shard)
    _flip(path, HEADER_BYTES + slot * record + record // 2)
    expected = rf"shard {shard} slot {slot} scene {scene} \({name}\): record checksum"
    with pytest.raises(DatasetError, match=expected):  # the cache checks every record as it loads
        open_loader(copy, mode="cache", scenes_per_batch=2, grasps_per_sdf=4, progress=False)
    for window in (1, None):
        with open_loader(copy, mode="dali", scenes_per_batch=2, grasps_per_sdf=4, shuffle_window=window) as loader:
            served = []
            with pytest.raises(DatasetError, match=expected):
                for batch in loader:
                    served += batch.scene_ids.tolist()
            assert scene not in served  # refused before the batch that would have used it


def test_swapped_shards_and_a_foreign_index_are_caught(dataset, tmp_path: Path) -> None:
    src, shards = dataset
    swapped = _copy_dataset(shards, tmp_path / "swapped")
    a, b = (swapped / f"sdf-{k:05d}.npy" for k in ShardReader(swapped).split_shards("train")[:2])
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    for mode in ("cache", "dali"):
        match = "record checksum .* the data on disk is corrupt or not this dataset's"
        with (
            pytest.raises(DatasetError, match=match),
            open_loader(swapped, mode=mode, grasps_per_sdf=8, progress=False) as loader,
        ):
            next(iter(loader))
    # an index from another build of the same scenes (another shuffle seed: other records) is refused up front
    other = tmp_path / "other"
    build_shards(
        src,
        other,
        BuildOptions(
            grid=GRID, records_per_shard=4, max_grasps=24, val_fraction=0.2, test_fraction=0.0, shuffle_seed=1
        ),
        workers=1,
        progress=False,
    )
    foreign = _copy_dataset(shards, tmp_path / "foreign")
    (foreign / "scenes.parquet").write_bytes((other / "scenes.parquet").read_bytes())
    with pytest.raises(DatasetError, match="scenes.parquet: "):
        open_loader(foreign, grasps_per_sdf=8)
    # the same index with a train and a val scene's splits exchanged: same size, other checksum
    import pyarrow.parquet as pq

    from gq.shards.index import write_index

    moved = _copy_dataset(shards, tmp_path / "moved")
    rows = pq.read_table(moved / "scenes.parquet").to_pylist()
    i = next(k for k, r in enumerate(rows) if r["split"] == "train")
    j = next(k for k, r in enumerate(rows) if r["split"] == "val")
    rows[i]["split"], rows[j]["split"] = "val", "train"
    write_index(moved / "scenes.parquet", rows)
    with pytest.raises(DatasetError, match="scenes.parquet: "):
        open_loader(moved, grasps_per_sdf=8)


def test_each_rank_caches_only_its_own_shards(dataset) -> None:
    _, shards = dataset
    reader = ShardReader(shards)
    kwargs = dict(scenes_per_batch=2, grasps_per_sdf=5, seed=2, progress=False)
    with open_loader(shards, mode="cache", **kwargs) as whole:
        single = whole.resident_bytes
    seen, resident = [], []
    for rank in range(2):
        with open_loader(shards, mode="cache", rank=rank, world_size=2, **kwargs) as loader:
            mine = set(loader.shards.tolist())
            assert set(reader.column("shard", loader.scene_ids[np.isin(loader.records.shard, loader.shards)])) == mine
            resident.append(loader.resident_bytes)
            for b in loader:
                assert set(reader.column("shard", b.scene_ids.tolist())) <= mine
                seen += list(zip(b.scene_ids[b.scene_of_grasp].tolist(), b.grasps[:, 0].tolist()))
    assert sum(resident) == single and max(resident) <= 0.65 * single
    assert len(seen) == len(set(seen)) == int(reader.column("num_grasps", reader.split_scenes("train")).sum())


def test_device_checksum_in_torch_equals_the_builders(dataset) -> None:
    """The GPU check's arithmetic (int64 words times keys, wrapping) run here on CPU tensors."""
    from gq.pipeline.checks import _device_sums

    _, shards = dataset
    reader = ShardReader(shards)
    shard = int(reader.split_shards("train")[0])
    rows = np.flatnonzero(reader.index["shard"] == shard)
    slots = reader.index["slot"][rows]
    sdf = torch.from_numpy(np.ascontiguousarray(reader.sdf_shard(shard)[slots]))
    labels = torch.from_numpy(np.ascontiguousarray(reader.labels_shard(shard)[slots]))
    assert np.array_equal(_device_sums(sdf, labels), reader.index["device_checksum"][rows])
    sdf.view(torch.int16)[1, 0, 0, 0] ^= 1
    assert (_device_sums(sdf, labels) != reader.index["device_checksum"][rows]).tolist() == [
        i == 1 for i in range(len(rows))
    ]
