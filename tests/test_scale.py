"""Scale-out: ranks sharing shards, resuming on another number of ranks, several nodes, restarts after a failure."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    REPO,
    fit_command,
    fit_process,
    run_tool,
    torchrun,
)

from gq.pipeline import LoaderError, PlanSpec, SplitRecords, make_plan, num_batches, open_dataset, open_loader
from gq.pipeline.plan import Segment, left_after
from gq.train.checkpoint import load_checkpoint

GRID = 16


def _records(shards: int, per_shard: int = 6, seed: int = 0) -> SplitRecords:
    """A split of `shards` shards (numbered from 2) of scenes with 1..60 grasps; the last shard is padded."""
    rng = np.random.default_rng(seed)
    n = shards * per_shard - 1
    position = np.arange(n)
    return SplitRecords(
        scene=rng.permutation(10_000)[:n].astype(np.int64),
        shard=2 + position // per_shard,
        slot=position % per_shard,
        num_grasps=rng.integers(1, 61, n).astype(np.int64),
    )


def _spec(world_size: int, rank: int = 0, *, s: int = 3, g: int = 5, window: int | None = 1, **kw) -> PlanSpec:
    return PlanSpec(s, g, seed=4, rank=rank, world_size=world_size, window=window, **kw)


def _grasps(plan) -> list[tuple[int, int]]:
    """(scene, slot) of every grasp of a plan."""
    return list(zip(np.repeat(plan.group_scene, np.diff(plan.group_start)).tolist(), plan.slots.tolist()))


def _groups(plan, first_batch: int = 0, last_batch: int | None = None) -> list[tuple[int, frozenset]]:
    """The groups of batches [first_batch, last_batch) of a plan: (scene, its grasp slots)."""
    b1 = len(plan) if last_batch is None else last_batch
    g0, g1 = int(plan.batch_start[first_batch]), int(plan.batch_start[b1])
    return [
        (int(plan.group_scene[k]), frozenset(plan.slots[plan.group_start[k] : plan.group_start[k + 1]].tolist()))
        for k in range(g0, g1)
    ]


@pytest.mark.parametrize("shards, world_size", [(1, 2), (1, 3), (2, 3), (2, 6), (3, 9), (3, 4), (4, 5)])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("window", [1, None])
def test_ranks_outnumbering_shards_share_them(shards: int, world_size: int, drop_last: bool, window) -> None:
    records = _records(shards)
    owner = records.owner(world_size)
    everything = {(int(i), k) for i, n in zip(records.scene, records.num_grasps) for k in range(n)}
    seen, lengths = [], []
    for rank in range(world_size):
        spec = _spec(world_size, rank, drop_last=drop_last, window=window)
        plan = make_plan(records, spec, epoch=1)
        assert len(plan) == num_batches(records, spec) and len(plan) > 0
        lengths.append(len(plan))
        mine = set(zip(records.shard[owner == rank].tolist(), records.slot[owner == rank].tolist()))
        assert set(zip(plan.group_shard.tolist(), plan.group_slot.tolist())) <= mine  # only its own part of a shard
        assert sorted(plan.shard_order.tolist()) == records.rank_shards(rank, world_size).tolist()
        if world_size % shards == 0:  # every part lies within one shard
            assert len(plan.shard_order) == 1
        for b in range(len(plan)):
            g0, g1 = plan.groups(b)
            assert g1 - g0 <= spec.scenes_per_batch and (not drop_last or g1 - g0 == spec.scenes_per_batch)
        seen += _grasps(plan)
    assert len(seen) == len(set(seen)) and set(seen) <= everything  # ranks disjoint, nothing twice
    # parts are balanced by grasps: no rank holds more than a record's worth beyond its share
    share = records.num_grasps.sum() / world_size
    held = np.bincount(owner, weights=records.num_grasps, minlength=world_size)
    assert (np.abs(held - share) <= 2 * records.num_grasps.max() + share * 0.2).all()
    if drop_last:
        assert len(set(lengths)) == 1  # the same number of steps on every rank
    else:
        assert set(seen) == everything  # every grasp once per epoch across ranks


@pytest.mark.parametrize(
    "worlds",
    [[(2, 3), 1], [(1, 7), 2], [(2, 2), 3], [(3, 2), 2], [(2, 1), (1, 4), 3], [(2, 0), 1]],
    ids=["2to1", "1to2", "2to3", "3to2", "2to1to3", "2to1-at-start"],
)
@pytest.mark.parametrize("shards", [2, 5])
def test_the_rest_of_an_epoch_on_another_world_size_trains_each_untrained_group_once(worlds, shards: int) -> None:
    records = _records(shards, per_shard=8)
    *segments, now = worlds
    past: tuple[Segment, ...] = ()
    trained = []
    for world, done in segments:  # what the earlier worlds trained: the first `done` batches of every rank
        for rank in range(world):
            plan = make_plan(records, _spec(world, rank, drop_last=world > 1), 3, past)
            trained += _groups(plan, 0, done)
        past += (Segment(world, world > 1, done),)
    rest, lengths = [], []
    for rank in range(now):
        plan = make_plan(records, _spec(now, rank, drop_last=now > 1), 3, past)
        lengths.append(len(plan))
        sizes = np.diff(plan.batch_start)
        assert (sizes >= 1).all() and (sizes <= 3).all()
        for b in range(len(plan)):  # what a loader keeps resident covers every batch
            first, last = plan.shard_span(b)
            g0, g1 = plan.groups(b)
            assert (plan.group_pos[g0:g1] >= first).all() and (plan.group_pos[g0:g1] <= last).all()
        rest += _groups(plan)
    assert len(set(lengths)) == 1  # the same number of steps on every new rank
    # the epoch as the first world planned it: every one of its groups trained exactly once, no other
    first_world = segments[0][0]
    epoch = [
        g
        for r in range(first_world)
        for g in _groups(make_plan(records, _spec(first_world, r, drop_last=first_world > 1), 3))
    ]
    assert sorted(trained + rest, key=repr) == sorted(epoch, key=repr)
    assert len(set(trained + rest)) == len(trained + rest)
    # what is left is a function of the past alone, the same whichever rank computes it
    assert len(left_after(records, _spec(now, now - 1), 3, past)) == len(rest)


def test_too_few_groups_left_for_the_ranks_is_refused() -> None:
    records = _records(1, per_shard=4)  # 3 scenes of at most 60 grasps: one group of G = 60 each
    left = left_after(records, _spec(5, s=1, g=60), 0, (Segment(2, True, 0),))
    assert len(left) == 2  # the two ranks' one batch each (the third scene was dropped by drop_last)
    with pytest.raises(ValueError, match="resume on at most 2 ranks"):
        make_plan(records, _spec(5, s=1, g=60), 0, (Segment(2, True, 0),))


@pytest.fixture(scope="module")
def one_shard(shared_dataset) -> Path:
    """A dataset whose train split is one shard: 30 scenes, 64 records per shard."""
    return shared_dataset(
        30, grid=GRID, grasps=(3, 24), seed=5, records_per_shard=64, val_fraction=0.2, test_fraction=0.0
    )


def _batches(loader) -> list[tuple]:
    return [
        (b.scene_ids.clone(), b.sdf.clone(), b.grasps.clone(), b.scores.clone(), b.scene_of_grasp.clone())
        for b in loader
    ]


def _same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_two_ranks_share_one_shard_and_the_loaders_agree(one_shard: Path, mode: str) -> None:
    kwargs = dict(scenes_per_batch=2, grasps_per_sdf=4, seed=1, world_size=2, drop_last=True, progress=False)
    seen, resident = [], []
    for rank in range(2):
        with (
            open_loader(one_shard, mode=mode, rank=rank, **kwargs) as loader,
            open_loader(one_shard, mode="cache", rank=rank, **kwargs) as cache,
        ):
            assert len(loader.shards) == 1 and len(loader) > 0
            got = _batches(loader)
            assert len(got) == len(cache) and all(_same(x, y) for x, y in zip(got, _batches(cache)))
            resident.append(cache.resident_bytes)
            seen += [(s, tuple(g)) for b in got for s, g in zip(b[0][b[4]].tolist(), b[2].tolist())]
    assert len(seen) == len(set(seen))
    with open_loader(one_shard, mode="cache", scenes_per_batch=2, grasps_per_sdf=4, progress=False) as whole:
        assert sum(resident) == whole.resident_bytes and max(resident) < 0.65 * whole.resident_bytes


@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_a_two_rank_state_resumes_on_one_rank_with_the_rest_of_its_epoch(one_shard: Path, mode: str) -> None:
    common = dict(scenes_per_batch=2, grasps_per_sdf=4, seed=1, shuffle_window=1, progress=False)
    with open_loader(one_shard, mode=mode, world_size=2, drop_last=True, **common) as rank0:
        rank0.set_epoch(2)
        it = iter(rank0)
        for _ in range(3):
            next(it)
        state = json.loads(json.dumps(rank0.state_dict()))
    assert state["world_size"] == 2 and state["position"] == 3
    with open_loader(one_shard, mode=mode, **common) as one, open_loader(one_shard, mode="cache", **common) as cache:
        one.load_state_dict(state)
        cache.load_state_dict(state)
        assert one.state_dict()["past"] == [[2, True, 3]] and one.state_dict()["position"] == 0
        plan = one.plan()  # the groups left are checked at the plan level; here: both loaders cut the same batches
        rest = _batches(one)
        assert len(rest) == len(plan) and all(_same(x, y) for x, y in zip(rest, _batches(cache)))
        own = one.resident_bytes
        nxt = _batches(one)  # the next epoch follows the one-rank plan, from this rank's own records only
        assert one.state_dict()["past"] == [] and len(nxt) == len(one)
        if mode == "cache":
            assert one.resident_bytes <= own
    with open_loader(one_shard, mode=mode, **common) as fresh:
        fresh.set_epoch(3)
        assert all(_same(x, y) for x, y in zip(nxt, _batches(fresh)))


def test_no_batches_names_what_would_give_some(one_shard: Path) -> None:
    with pytest.raises(LoaderError) as err:
        open_loader(one_shard, scenes_per_batch=500, grasps_per_sdf=4, world_size=2, drop_last=True, progress=False)
    message = str(err.value)
    assert "gives no batches" in message and "-S " in message and "1 rank would give some" in message
    assert "\n" not in message


# -- end to end, under torchrun (slow) ------------------------------------------------------------------------
SMALL = ["--base-channels", "4", "--fc-dims", "32,16", "--threads", "1", "--quiet", "-S", "2", "-G", "8"]


@pytest.fixture(scope="module")
def tiny(shared_dataset) -> Path:
    """40 scenes built with the default 256 records per shard: every split is one shard."""
    return shared_dataset(40, grid=GRID, grasps=32, seed=2, val_fraction=0.2, test_fraction=0.1)


def _fit(
    shards: Path, out: Path, *flags, ranks: int = 1, launcher: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    result = fit_process(shards, out, *flags, ranks=ranks, launcher=launcher, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a / "last.pt")["model"], load_checkpoint(b / "last.pt")["model"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow  # two torchrun jobs of two ranks
@pytest.mark.parametrize("loader", ["cache", "dali"])
def test_two_ranks_train_on_a_one_shard_split(tiny: Path, tmp_path: Path, loader: str) -> None:
    out = tmp_path / loader
    _fit(tiny, out, "--max-steps", 6, "--loader", loader, *SMALL, "--overwrite", ranks=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    if loader == "cache":  # rank 0 holds its half of the one shard
        with open_loader(tiny, scenes_per_batch=2, grasps_per_sdf=8, progress=False) as whole:
            assert 0.3 * whole.resident_bytes <= summary["resident_bytes"] <= 0.7 * whole.resident_bytes


@pytest.mark.slow  # a torchrun job of two ranks
def test_ranks_stop_on_the_time_budget_at_the_same_step(tiny: Path, tmp_path: Path) -> None:
    # Each rank's clock is its own: unless they agree, one leaves the loop while the other waits in a collective.
    out = tmp_path / "timed"
    flags = ["--max-time", 2, "--epochs", 1000, "--val-every", 5, "--early-stopping", 0]
    _fit(tiny, out, *flags, *SMALL, "--overwrite", ranks=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "max_time" and summary["world_size"] == 2 and summary["steps"] >= 1


def _steps_left(shards: Path, world: int, *, was: int, done: int) -> int:
    """Steps of the rest of epoch 0 on `world` ranks after `done` steps on `was`, from the plan."""
    records, _ = open_dataset(shards).split("train")
    spec = PlanSpec(2, 8, seed=0, rank=0, world_size=world, drop_last=world > 1, window=4)
    return len(make_plan(records, spec, 0, (Segment(was, was > 1, done),)))


@pytest.mark.slow  # torchrun jobs of two and three ranks
@pytest.mark.parametrize("was, now", [(2, 1), (1, 2), (2, 3)])
def test_a_run_resumes_on_another_number_of_ranks(tiny: Path, tmp_path: Path, was: int, now: int) -> None:
    out = tmp_path / "run"
    _fit(tiny, out, "--epochs", 1, "--max-steps", 5, *SMALL, "--overwrite", ranks=was)
    saved = load_checkpoint(out / "last.pt")["loader"]
    assert (saved["epoch"], saved["position"], saved["world_size"]) == (0, 5, was)
    # The first run ended at its --max-steps, which a resume keeps unless given another: the rest of the epoch
    left = _steps_left(tiny, now, was=was, done=5)
    result = _fit(tiny, out, "--max-steps", 5 + left, *SMALL, "--resume", ranks=now)
    assert f"resuming a run saved on {was} ranks on {now}" in result.stderr
    assert "the rest of epoch 0 trains the groups no rank had trained yet" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 + left and summary["world_size"] == now
    # the plan's rest of the epoch (the groups the first world had left, dealt to the new one) ends exactly
    # there: the loader has rolled over to epoch 1 with nothing of epoch 0 left over
    final = load_checkpoint(out / "last.pt")["loader"]
    assert (final["epoch"], final["position"], final["past"], final["world_size"]) == (1, 0, [], now)


def _start(cmd: list[str]) -> subprocess.Popen:
    """A torchrun launcher in a process group of its own (setsid), so that `_finish` can end it with its workers."""
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait for a launcher; past `timeout`, kill it and its workers and fail."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{proc.args} did not end within {timeout} s") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three torchrun launchers
def test_two_nodes_train_as_one_node_of_two_ranks(tiny: Path, tmp_path: Path) -> None:
    flags = ["--max-steps", 8, "--log-every", 1, "--loader", "dali", *SMALL, "--overwrite"]
    _fit(tiny, tmp_path / "one", *flags, ranks=2)

    def two_nodes() -> list[subprocess.CompletedProcess]:
        rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "gq-2"]
        fit = fit_command(tiny, tmp_path / "two", *flags)
        nodes = [torchrun(1, "--nnodes", "2", "--node-rank", str(node), *rendezvous) for node in (0, 1)]
        return [_finish(p) for p in [_start([sys.executable, *node, *fit]) for node in nodes]]

    for result in two_nodes():
        assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert _losses(tmp_path / "two") == _losses(tmp_path / "one") and len(_losses(tmp_path / "one")) == 8
    assert _same_weights(tmp_path / "two", tmp_path / "one")


def _worker(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker of global rank `rank` started by the launcher process `launcher`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.slow  # two torchrun jobs, one of them restarted
def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_uninterrupted(tiny: Path, tmp_path: Path) -> None:
    flags = ["--max-steps", 60, "--ckpt-every", 5, "--val-every", 25, "--log-every", 5, *SMALL, "--overwrite"]
    _fit(tiny, tmp_path / "whole", *flags, ranks=2)
    out = tmp_path / "killed"

    def killed_once() -> list[subprocess.CompletedProcess]:
        cmd = [sys.executable, *torchrun(2, "--max-restarts", "1"), *fit_command(tiny, out, *flags)]
        proc = _start(cmd)
        deadline, victim = time.time() + 300, None
        while time.time() < deadline and proc.poll() is None and victim is None:
            steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] if (
                out / "metrics.jsonl"
            ).exists() else []  # fmt: skip
            if (out / "last.pt").exists() and steps and max(steps) >= 10:
                victim = _worker(proc.pid, 1)
            time.sleep(0.01)
        if victim is None:
            _finish(proc, timeout=0.1)  # ends it, failing: the run should still be going when last.pt exists
        os.kill(victim, signal.SIGKILL)  # a real worker dies, as on a failed machine
        return [_finish(proc)]

    (result,) = killed_once()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "restart 1 of the job's workers: resuming from" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and 0 < summary["steps_this_process"] < 60  # the restart continued the run
    assert _same_weights(out, tmp_path / "whole")
    assert _losses(out) == _losses(tmp_path / "whole")


# A frame of the project's own code in a traceback (torchrun's own report of a failed job has frames of torch's).
OUR_FRAME = re.compile(r'File "[^"]*/(train|tools|pipeline|common|models|shards)/[^"]*\.py"')


def _errors(stderr: str) -> list[str]:
    """The one-line errors the workers printed."""
    return [line for line in stderr.splitlines() if "fit: error: " in line]


@pytest.mark.slow  # a fit, and a torchrun job of two ranks started three times beside it
def test_a_restart_refused_by_the_lock_is_refused_again_and_never_resumes_that_run(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder_flags = ["--max-time", 20, "--epochs", 1000, "--early-stopping", 0, "--ckpt-every", 5, *SMALL]
    holder = _start([sys.executable, *fit_command(tiny, out, *holder_flags)])
    deadline = time.time() + 120
    while time.time() < deadline and holder.poll() is None and not (out / "last.pt").exists():
        time.sleep(0.05)
    assert (out / "last.pt").exists(), "the first run should be training by now"
    started = time.time()
    cmd = [sys.executable, *torchrun(2, "--max-restarts", "2"), *fit_command(tiny, out, "--max-steps", 3, *SMALL)]
    second = _finish(_start(cmd), timeout=300)
    took = time.time() - started
    first = _finish(holder)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "max_time" and summary["steps_this_process"] == summary["steps"] > 3, "its own"
    assert second.returncode != 0, second.stderr[-3000:]
    errors = _errors(second.stderr)
    assert any("in use by another fit" in line for line in errors), second.stderr[-3000:]
    assert any("the run there is not this job's" in line for line in errors), second.stderr[-3000:]
    assert len(errors) <= 2 * 3 and not OUR_FRAME.search(second.stderr), second.stderr[-3000:]
    # every rank ends at once when torchrun stops an attempt (not torchrun's 30 s wait for SIGKILL, each time)
    assert took < 100, f"three attempts took {took:.0f} s"  # a 30 s wait each would take 90 s plus start-ups
    # the same job once the run has ended: refused (it holds a run), and its restart never "resumes" that run
    kept = {name: (out / name).read_bytes() for name in ("summary.json", "curves.png", "last.pt", "metrics.jsonl")}
    again = _finish(_start(cmd), timeout=300)
    assert again.returncode != 0 and any("the run there is not this job's" in x for x in _errors(again.stderr))
    assert {name: (out / name).read_bytes() for name in kept} == kept


@pytest.mark.slow  # a torchrun job of two ranks
def test_when_rank_0_fails_the_other_ranks_say_one_line_each(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, *torchrun(2), *fit_command(tiny, out, "--max-steps", 100000, "--log-every", 1, *SMALL)]
    proc = _start(cmd)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.05)
    metrics.rename(out / "moved.jsonl")
    metrics.mkdir()  # rank 0's next row cannot be written: it ends, and rank 1 loses its peer
    result = _finish(proc, timeout=120)
    assert result.returncode != 0
    errors = _errors(result.stderr)
    assert any(f"{metrics}: could not be written" in line for line in errors), result.stderr[-3000:]
    assert len(errors) <= 2 and not OUR_FRAME.search(result.stderr), result.stderr[-3000:]


@pytest.mark.slow  # gq fit starting its own torchrun job of two ranks
def test_fit_nproc_per_node_starts_torchrun_itself(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gq.tools.cli", *fit_command(tiny, out, "--max-steps", 4, *SMALL)[1:]]
    result = subprocess.run([*cmd, "--nproc-per-node", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert result.stdout.count("fit: 4 steps") == 1  # rank 0 speaks for the job


def test_scaling_efficiency_is_per_rank_samples_against_one_rank() -> None:
    from gq.benchmarks.bench_scale import scaling

    rows = scaling(
        [
            {"loader": "cache", "ranks": 1, "samples_per_s": 100.0},
            {"loader": "cache", "ranks": 4, "samples_per_s": 300.0},
            {"loader": "dali", "ranks": 2, "samples_per_s": 50.0},  # no one-rank row: no efficiency
        ]
    )
    assert [r["samples_per_s_per_rank"] for r in rows] == [100.0, 75.0, 25.0]
    assert [r["efficiency"] for r in rows] == [1.0, 0.75, None]


@pytest.mark.slow  # four torchrun jobs
def test_bench_scale_reports_both_loaders_on_each_number_of_ranks(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    result = run_tool("bench_scale.py", "--shards", tiny, "--ranks", "1,2", "--steps", 3, "-S", 2, "-G", 8,
                      "--base-channels", 4, "--fc-dims", "16", "--json", out, subprocess=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert [(r["loader"], r["ranks"]) for r in figures["rows"]] == [
        ("cache", 1),
        ("cache", 2),
        ("dali", 1),
        ("dali", 2),
    ]
    assert all(r["samples_per_s"] > 0 and r["steps"] == 3 for r in figures["rows"])
    assert [r["efficiency"] for r in figures["rows"] if r["ranks"] == 1] == [1.0, 1.0]
    assert "efficiency" in result.stdout and result.stdout.count("cache ") >= 2
    bad = run_tool("bench_scale.py", "--shards", tiny, "--ranks", "2,4", subprocess=True)
    assert bad.returncode == 2 and "start with 1" in bad.stderr
