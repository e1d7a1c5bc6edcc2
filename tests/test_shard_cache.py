"""Remote datasets read through the local shard cache, against a real S3 server (moto's, on 127.0.0.1).

Both loaders over a URL give the batches of the local copy; the cache limit holds at every moment (sampled on
disk); a shard held by a loader is never evicted; processes sharing a cache download each shard once; a damaged
object is refused and never cached; a limit too small for what the loaders hold at once is one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke, tmpfs

from gq.common.sizes import SizeError, format_size, parse_size
from gq.pipeline import open_dataset, open_loader
from gq.pipeline.shard_cache import CacheError, ShardCache
from gq.shards import DatasetError, read_manifest, remote
from gq.shards.format import labels_name, sdf_name
from gq.shards.publish import upload
from gq.shards.remote import LocalWriteError, RemoteStore
from gq.tools.training import cli
from gq.train.checkpoint import load_checkpoint

# Many small shards, so a quarter of the split is a few of them.
RECORDS = 2
SCENES = 120


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch) -> None:
    """Retries of a damaged download a few milliseconds apart rather than seconds (their number unchanged)."""
    monkeypatch.setattr(remote, "BASE_DELAY_S", 0.01)


@pytest.fixture
def local(shared_dataset) -> Path:
    return shared_dataset(SCENES, grid=16, grasps=(3, 12), seed=5, records_per_shard=RECORDS)


@pytest.fixture
def url(local: Path, s3, s3_bucket: str) -> str:
    url = f"{s3_bucket}/ds"
    upload(local, url)
    s3.reset()
    return url


def _batches_iter(loader):
    return ((b.sdf, b.grasps, b.scores, b.scene_of_grasp, b.scene_ids) for b in loader)


def _batches(loader) -> list[tuple[torch.Tensor, ...]]:
    return list(_batches_iter(loader))


def _same(a: list, b: list) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            assert torch.equal(s, t)


def _split_bytes(local: Path, split: str = "train") -> int:
    m = read_manifest(local)
    sizes = {f.name: f.bytes for f in m.files}
    first, count = m.splits[split].first_shard, m.splits[split].num_shards
    return sum(sizes[sdf_name(k)] + sizes[labels_name(k)] for k in range(first, first + count))


def _disk_bytes(root: Path) -> int:
    """Every regular file under the cache folder, as the disk holds it now."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # removed between the listing and the stat
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


class DiskPeak:
    """A thread sampling the cache folder's bytes on disk as fast as it can, keeping the largest."""

    def __init__(self, root: Path):
        self.root, self.peak, self.samples = root, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _disk_bytes(self.root))
            self.samples += 1

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_parse_size() -> None:
    assert parse_size("800KB") == 800_000
    assert parse_size("20GB") == 20 * 10**9
    assert parse_size("1.5TiB") == int(1.5 * 2**40)
    assert parse_size("4096B") == parse_size("4kib") == parse_size(" 4 KiB ") == 4096
    assert parse_size("0.5MB") == 500_000
    for bad in ("20", "20G", "GB", "1e3KB", "-1MB", "1.5 TB x", ""):
        with pytest.raises(SizeError, match="not a size"):
            parse_size(bad, what="--cache-limit")
    assert format_size(3_276_800) == "3.28 MB" and format_size(999) == "999 B"


@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_url_gives_the_batches_of_the_local_copy(local: Path, url: str, tmp_path: Path, mode: str) -> None:
    settings = dict(mode=mode, scenes_per_batch=3, grasps_per_sdf=2, seed=1, progress=False)
    with open_loader(local, **settings) as loader:
        want = [_batches(loader) for _ in range(2)]
    with open_loader(url, cache_dir=tmp_path / "cache", **settings) as loader:
        got = [_batches(loader) for _ in range(2)]
    for a, b in zip(want, got):
        _same(a, b)
    assert not list(local.parent.rglob("*.tmp"))


@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_limit_holds_at_every_moment_with_a_quarter_of_the_split(
    local: Path, url: str, tmp_path: Path, s3, mode: str
) -> None:
    cache_dir = tmp_path / "cache"
    dataset = open_dataset(url, cache_dir=cache_dir, cache_limit=1 << 40)  # the metadata, to measure it
    meta = _disk_bytes(cache_dir)
    limit = meta + _split_bytes(local) // 4
    settings = dict(mode=mode, scenes_per_batch=2, grasps_per_sdf=2, seed=2, shuffle_window=1, progress=False)
    if mode == "dali":
        settings["prefetch"] = 1
    with open_loader(local, **settings) as loader:
        want = [_batches(loader) for _ in range(3)]
    cache_dir2 = tmp_path / "cache2"
    s3.reset()
    with DiskPeak(cache_dir2) as disk, open_loader(url, cache_dir=cache_dir2, cache_limit=limit, **settings) as loader:
        got = [_batches(loader) for _ in range(3)]
        cache = loader.dataset.remote.cache
    for a, b in zip(want, got):
        _same(a, b)
    assert disk.samples > 10
    assert 0 < disk.peak <= limit, (disk.peak, limit)
    assert 0 < cache.peak <= limit, (cache.peak, limit)
    served = s3.bytes_served()
    split = _split_bytes(local)
    epochs = 1 if mode == "cache" else 3  # the cache loader downloads its part once
    assert split * epochs <= served <= split * epochs * 1.05 + 3 * meta, (served, split)
    assert dataset.remote.cache is not cache  # another folder, another cache


def test_too_small_a_limit_is_one_line(local: Path, url: str, tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"the smallest limit that works is .* \((\d[\d,]*) bytes\)") as err:
        open_loader(
            url, mode="dali", grasps_per_sdf=2, cache_dir=tmp_path / "cache", cache_limit="60KB", progress=False
        )
    assert "\n" not in str(err.value)
    smallest = int(str(err.value).split("give --cache-limit ")[1].split("B")[0])
    with open_loader(
        url, mode="dali", grasps_per_sdf=2, cache_dir=tmp_path / "cache", cache_limit=smallest, progress=False
    ) as loader:
        assert len(_batches(loader)) == len(loader)


def test_a_held_shard_is_never_evicted(local: Path, url: str, tmp_path: Path) -> None:
    dataset = open_dataset(url, cache_dir=tmp_path / "cache", cache_limit="1TB")
    remote = dataset.remote
    one = sum(e.bytes for e in remote.files(0))
    cache = ShardCache(tmp_path / "small", limit=_disk_bytes(remote.folder) + 2 * one + 1024)
    # The same dataset in a small cache: its shards 0 and 1 fill it; 0 is held, 1 is not.
    small = cache.folder(remote.key)
    for name in ("manifest.json", "scenes.parquet"):
        (small / name).write_bytes((remote.folder / name).read_bytes())
    cache.hold(remote.store, remote.key, "0", remote.files(0))
    cache.hold(remote.store, remote.key, "1", remote.files(1))
    cache.release(remote.key, "1")
    os.utime(small / sdf_name(1), (1, 1))  # and 0 is the least recently used
    os.utime(small / sdf_name(0), (0, 0))
    cache.hold(remote.store, remote.key, "2", remote.files(2))  # must evict one: 1, not the held 0
    assert (small / sdf_name(0)).exists() and (small / labels_name(0)).exists()
    assert not (small / sdf_name(1)).exists()
    assert (small / sdf_name(2)).exists()
    assert cache.peak <= cache.limit
    # A hold by another process counts as well: its shared lock keeps 2 from eviction.
    fd = os.open(small / ".locks" / "2.pin", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        cache.release(remote.key, "2")
        cache.release(remote.key, "0")
        cache.hold(remote.store, remote.key, "3", remote.files(3))
        assert (small / sdf_name(2)).exists() and not (small / sdf_name(0)).exists()
    finally:
        os.close(fd)


def _read_all(url: str, cache_dir: str, start: multiprocessing.Event) -> None:
    start.wait()
    with open_loader(url, mode="dali", cache_dir=cache_dir, grasps_per_sdf=2, progress=False) as loader:
        for _ in loader:
            pass


@pytest.mark.slow
def test_processes_sharing_a_cache_download_each_shard_once(local: Path, url: str, tmp_path: Path, s3) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_read_all, args=(url, str(tmp_path / "cache"), start)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    bucket_path = url[len("s3://") :]
    m = read_manifest(local)
    train = m.splits["train"]
    for k in range(train.first_shard, train.first_shard + train.num_shards):
        for name in (sdf_name(k), labels_name(k)):
            assert s3.gets(f"{bucket_path}/{name}") == 1, name


@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_a_damaged_object_is_refused_and_not_cached(local: Path, url: str, tmp_path: Path, s3, mode: str) -> None:
    m = read_manifest(local)
    k = m.splits["train"].first_shard + 1
    s3.fault(f"{url[len('s3://') :]}/{sdf_name(k)}", "corrupt", times=100)
    cache_dir = tmp_path / "cache"
    with (
        pytest.raises(DatasetError, match=f"{sdf_name(k)}.*CRC-32") as err,
        open_loader(url, mode=mode, cache_dir=cache_dir, grasps_per_sdf=2, progress=False) as loader,
    ):
        _batches(loader)
    assert "\n" not in str(err.value)
    assert not list(cache_dir.rglob(sdf_name(k))) and not list(cache_dir.rglob("*.tmp"))


def test_a_cache_folder_of_someone_elses_is_refused(url: str, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CacheError, match="not a shard cache"):
        open_dataset(url, cache_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_local_dataset_is_never_under_the_cache(local: Path, tmp_path: Path) -> None:
    dataset = open_dataset(local, cache_dir=tmp_path / "cache", cache_limit=1)
    assert dataset.remote is None and not (tmp_path / "cache").exists()
    assert np.array_equal(dataset.reader.index["scene"], open_dataset(local).reader.index["scene"])


@pytest.mark.slow  # two fits, four evaluations and two predictions, ~30 s on 2 cores
def test_fit_eval_and_predict_on_a_url_equal_them_on_the_local_copy(local: Path, url: str, tmp_path: Path) -> None:
    common = ["--max-steps", 12, "-S", 2, "-G", 4, "--log-every", 2, "--val-every", 6, "--loader", "dali"]
    common += ["--base-channels", 4, "--fc-dims", "32,16", "--threads", 1, "--quiet"]
    cache = ["--cache-dir", tmp_path / "cache", "--cache-limit", "1MB"]
    for name, shards, more in (("local", local, []), ("url", url, cache)):
        result = invoke(cli, "fit", "--shards", shards, "--out", tmp_path / name, *common, *more, name="gq fit")
        assert result.returncode == 0, result.stderr
    a, b = (load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("local", "url"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("local", "url")]
    assert summaries[0]["val_mse"] == summaries[1]["val_mse"]
    evals = [
        json.loads(invoke(cli, "eval", tmp_path / "url" / "last.pt", "--shards", shards, *more, name="gq eval").stdout)
        for shards, more in ((local, []), (url, cache))
    ]
    assert evals[0] == evals[1] and evals[0]["test_grasps"] > 0
    ckpt = tmp_path / "url" / "last.pt"
    for name, shards, more in (("local", local, []), ("url", url, cache)):
        out = tmp_path / f"{name}.parquet"
        result = invoke(cli, "predict", ckpt, "--shards", shards, *more, "--out", out, name="gq predict")
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "local.parquet").read_bytes() == (tmp_path / "url.parquet").read_bytes()


_HOLD_ONE = """
import sys
from gq.pipeline import open_dataset
dataset = open_dataset(sys.argv[1], cache_dir=sys.argv[2])
dataset.lease(1).acquire([int(sys.argv[3])])
"""


def test_a_download_killed_midway_leaves_nothing_that_is_used(
    shared_dataset, s3, s3_bucket: str, tmp_path: Path
) -> None:
    local = shared_dataset(24, grid=32, grasps=(3, 12), seed=6, records_per_shard=8)  # 0.5 MB SDF files
    url = f"{s3_bucket}/big"
    upload(local, url)
    k = read_manifest(local).splits["train"].first_shard
    s3.fault(f"{url[len('s3://') :]}/{sdf_name(k)}", "slow", delay=1.0)  # 64 KiB a second
    cache_dir = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", _HOLD_ONE, url, str(cache_dir), str(k)])
    try:
        deadline = time.monotonic() + 60
        while not [p for p in cache_dir.rglob(f".{sdf_name(k)}.*.tmp") if p.stat().st_size > 0]:
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.05)
        assert list((cache_dir / ".reserved").iterdir())  # its bytes reserved while it ran
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    cache = ShardCache(cache_dir, limit=None)
    used = cache.usage()  # the accounting drops the dead download's reservation and its temporary
    assert not list(cache_dir.rglob("*.tmp")) and not list((cache_dir / ".reserved").iterdir())
    assert used == _disk_bytes(cache_dir)
    settings = dict(scenes_per_batch=2, grasps_per_sdf=2, seed=3, progress=False)
    with open_loader(local, **settings) as a, open_loader(url, cache_dir=cache_dir, **settings) as b:
        _same(_batches(a), _batches(b))


def test_open_runs_the_quick_verify_on_the_remote_sizes(local: Path, url: str, tmp_path: Path) -> None:
    RemoteStore(url).put_bytes(sdf_name(3), b"not a shard")
    with pytest.raises(DatasetError, match=rf"{url}: not a usable dataset: {sdf_name(3)}: 11 bytes, manifest says"):
        open_dataset(url, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_resume_mid_epoch_on_a_url_continues_as_the_local_copy(
    local: Path, url: str, tmp_path: Path, mode: str
) -> None:
    settings = dict(mode=mode, scenes_per_batch=2, grasps_per_sdf=2, seed=4, shuffle_window=2, progress=False)
    with open_loader(local, **settings) as loader:
        want = _batches(loader)
    remote = dict(cache_dir=tmp_path / "cache", cache_limit=_split_bytes(local) // 2, **settings)
    with open_loader(url, **remote) as loader:
        first = [b for _, b in zip(range(5), _batches_iter(loader))]
        state = loader.state_dict()
    with open_loader(url, **remote) as loader:
        loader.load_state_dict(state)
        rest = _batches(loader)
    _same(want, first + rest)


@pytest.mark.parametrize("mode", ["cache", "dali"])
def test_a_full_cache_disk_is_one_line(local: Path, url: str, tmp_path: Path, mode: str) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    with tmpfs(disk, "size=200k", skip="cannot mount a tmpfs here"):  # the metadata and a few shards
        with (
            pytest.raises(LocalWriteError, match=f"{disk}/.*No space left on device") as err,
            open_loader(url, mode=mode, cache_dir=disk, grasps_per_sdf=2, progress=False) as loader,
        ):
            _batches(loader)
        assert "\n" not in str(err.value)
        assert not list(disk.rglob("*.tmp"))


def test_the_metadata_of_a_dataset_nobody_has_open_is_evicted_last_used_first(url: str, tmp_path: Path) -> None:
    remote = open_dataset(url, cache_dir=tmp_path / "cache").remote
    manifest, index = (remote.folder / "manifest.json").read_bytes(), remote.entries["scenes.parquet"]
    meta, shard = len(manifest) + index.bytes, sum(e.bytes for e in remote.files(0))
    cache = ShardCache(tmp_path / "small", limit=2 * meta + shard)  # the shard fits only without a's metadata
    a, b = "a" * 16 + "-00000000", "b" * 16 + "-00000000"  # two datasets in one cache
    for key in (a, b):
        cache.folder(key)
        cache.hold_meta(remote.store, key, manifest, index)
    cache.release(a, "meta")  # a is closed: its metadata may go; b's is held
    cache.hold(remote.store, b, "0", remote.files(0))
    assert not (tmp_path / "small" / a / "scenes.parquet").exists()
    assert (tmp_path / "small" / b / "scenes.parquet").exists() and (tmp_path / "small" / b / sdf_name(0)).exists()
    assert _disk_bytes(tmp_path / "small") <= cache.limit
