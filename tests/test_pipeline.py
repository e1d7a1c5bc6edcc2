"""The epoch plan and both loaders: coverage, determinism, identical batches, alignment, misuse."""
from __future__ import annotations

import gc
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_source
from pipeline import LoaderError, PlanSpec, make_plan, num_batches, open_loader
from shards import BuildOptions, DatasetError, ShardReader, build_shards

GRID = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(source dir, shards dir): 13 scenes of 3..24 grasps, 4 records per shard, hash splits."""
    root = tmp_path_factory.mktemp("pipeline")
    src = make_source(root / "src", scenes=13, grid=GRID, grasps=(3, 24), seed=3)
    out = root / "shards"
    build_shards(src, out, BuildOptions(grid=GRID, records_per_shard=4, max_grasps=24, val_fraction=0.2,
                                        test_fraction=0.0), workers=1, progress=False)
    return src, out


def _grasp_counts(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 481, 40)
    counts[:4] = [480, 479, 476, 3]  # full scenes, the seed's short ones, one with fewer than G
    return counts


@pytest.mark.parametrize("g", [1, 7, 480])
@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_plan_visits_every_grasp_once(g: int, world_size: int, drop_last: bool) -> None:
    counts = _grasp_counts()
    ids = np.arange(100, 140)
    s = 5
    seen, per_rank = [], []
    for rank in range(world_size):
        spec = PlanSpec(s, g, seed=7, rank=rank, world_size=world_size, drop_last=drop_last)
        plan = make_plan(ids, counts, spec, epoch=2)
        assert len(plan) == num_batches(counts, spec)
        per_rank.append(len(plan))
        for b in range(len(plan)):
            scene_ids, slots, scene_of_grasp = plan.batch(b)
            assert len(scene_ids) <= s and (not drop_last or len(scene_ids) == s)
            assert np.bincount(scene_of_grasp, minlength=len(scene_ids)).max() <= g
            seen += list(zip(scene_ids[scene_of_grasp].tolist(), slots.tolist()))
    assert len(seen) == len(set(seen))  # never twice, across ranks too
    everything = {(int(i), k) for i, n in zip(ids, counts) for k in range(n)}
    assert set(seen) <= everything
    groups = int((-(-counts // g)).sum())
    if drop_last:
        assert len(set(per_rank)) == 1  # equal batch counts on every rank
        assert groups - len(per_rank) * per_rank[0] * s < s * world_size + s
    else:
        assert set(seen) == everything


def test_plan_is_deterministic_and_changes_with_epoch_and_seed() -> None:
    counts, ids = _grasp_counts(), np.arange(40)
    spec = PlanSpec(4, 16, seed=3)
    a, b = make_plan(ids, counts, spec, 0), make_plan(ids, counts, spec, 0)
    assert np.array_equal(a.group_scene, b.group_scene) and np.array_equal(a.slots, b.slots)
    c = make_plan(ids, counts, spec, 1)
    d = make_plan(ids, counts, PlanSpec(4, 16, seed=4), 0)
    assert not np.array_equal(a.slots, c.slots) and not np.array_equal(a.slots, d.slots)
    # the same grasps in another order: coverage does not depend on the epoch
    assert len(a.slots) == len(c.slots) == counts.sum()


def test_scene_shorter_than_g_gets_a_short_group() -> None:
    counts = np.array([3, 20])
    plan = make_plan(np.array([0, 1]), counts, PlanSpec(1, 8, seed=0), 0)
    lengths = sorted(np.diff(plan.group_start).tolist())
    assert lengths == [3, 4, 8, 8]  # scene 0: one group of 3; scene 1: 8, 8 and the rest, 4


def _epoch(loader) -> list:
    return [b for b in loader]


def _same(x, y) -> bool:
    return all(torch.equal(getattr(x, f), getattr(y, f)) for f in
               ("sdf", "grasps", "scores", "scene_of_grasp", "scene_ids"))


@pytest.mark.parametrize("s,g", [(3, 5), (4, 1), (2, 24)])
def test_cache_and_dali_give_identical_batches(dataset, s: int, g: int) -> None:
    _, shards = dataset
    with open_loader(shards, "cache", scenes_per_batch=s, grasps_per_scene=g, seed=5, progress=False) as cache, \
            open_loader(shards, "dali", scenes_per_batch=s, grasps_per_scene=g, seed=5) as dali:
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
    with open_loader(shards, mode, scenes_per_batch=3, grasps_per_scene=4, seed=1, progress=False) as loader:
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
    kwargs = dict(scenes_per_batch=2, grasps_per_scene=3, seed=9, progress=False)
    with open_loader(shards, mode, **kwargs) as loader:
        loader.set_epoch(4)
        full = _epoch(loader)
        loader.set_epoch(4)
        it = iter(loader)
        for _ in range(3):
            next(it)
        state = loader.state_dict()
    assert state == {"seed": 9, "epoch": 4, "position": 3}
    with open_loader(shards, mode, **kwargs) as again:
        again.load_state_dict(json.loads(json.dumps(state)))
        rest = _epoch(again)
    assert len(rest) == len(full) - 3 and all(_same(x, y) for x, y in zip(rest, full[3:]))


def test_ranks_split_the_epoch(dataset) -> None:
    _, shards = dataset
    seen = []
    for rank in range(3):
        with open_loader(shards, "cache", scenes_per_batch=2, grasps_per_scene=5, seed=2, rank=rank,
                         world_size=3, progress=False) as loader:
            for b in loader:
                seen += list(zip(b.scene_ids[b.scene_of_grasp].tolist(), b.grasps[:, 0].tolist()))
    reader = ShardReader(shards)
    assert len(seen) == len(set(seen)) == int(reader.column("num_grasps", reader.split_scenes("train")).sum())


def test_memory_check_names_both_numbers_and_suggests_dali(dataset) -> None:
    _, shards = dataset
    with pytest.raises(LoaderError) as err:
        open_loader(shards, "cache", memory_budget=10_000, progress=False)
    message = str(err.value)
    assert re.search(r"needs 0\.\d{3} GB on cpu, but only 0\.000 GB are free", message), message
    assert "mode='dali'" in message
    n = len(ShardReader(shards).split_scenes("train"))
    needed = n * (GRID ** 3 * 2 + 24 * 20 * 4)
    with open_loader(shards, "cache", memory_budget=needed, progress=False) as loader:
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
    loader = open_loader(shards, "dali", scenes_per_batch=2, grasps_per_scene=4, num_threads=3)
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
    manifest["version"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="format version 2"):
        open_loader(copy, "dali")


@pytest.mark.parametrize("kwargs,message", [
    ({"scenes_per_batch": 0}, "scenes_per_batch 0"),
    ({"grasps_per_scene": 25}, "more than the 24 grasp slots"),
    ({"grasps_per_scene": 0}, "grasps_per_scene 0"),
    ({"mode": "stream"}, "mode 'stream'"),
    ({"split": "test"}, "split 'test' of .* has no scenes"),
    ({"rank": 3, "world_size": 3}, "rank 3 of world size 3"),
    ({"scenes_per_batch": 1000, "drop_last": True}, "gives no batches"),
])
def test_settings_that_cannot_work_are_refused(dataset, kwargs: dict, message: str) -> None:
    _, shards = dataset
    with pytest.raises(LoaderError, match=message):
        open_loader(shards, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_request_without_cuda_is_refused(dataset) -> None:
    with pytest.raises(LoaderError, match="CUDA is not available"):
        open_loader(dataset[1], device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_cuda_batches_equal_cpu_batches(dataset, mode: str) -> None:
    _, shards = dataset
    with open_loader(shards, "cache", scenes_per_batch=3, grasps_per_scene=5, progress=False) as cpu, \
            open_loader(shards, mode, scenes_per_batch=3, grasps_per_scene=5, device="cuda", progress=False) as gpu:
        for x, y in zip(cpu, gpu):
            assert y.sdf.is_cuda and _same(x, type(x)(**{k: v.cpu() for k, v in vars(y).items()}))
