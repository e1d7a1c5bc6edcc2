"""Objects on a real S3 server (moto's, on 127.0.0.1) through the real client stack: `shards.remote.RemoteStore`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from gq.shards import remote
from gq.shards.remote import (
    LocalWriteError,
    RemoteError,
    RemoteMismatchError,
    RemoteNotFoundError,
    RemoteStore,
    is_remote,
)


def _store(url: str) -> RemoteStore:
    return RemoteStore(url, attempts=3, base_delay=0.01)


def _put(store: RemoteStore, name: str, data: bytes) -> dict:
    """Put `data` at `name`; the manifest's claim about it (size, CRC-32)."""
    store.put_bytes(name, data)
    return {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}


def _blob(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_is_remote() -> None:
    for url in ("s3://b/p", "gs://b", "https://host/x", "memory://x", "file:///tmp/x"):
        assert is_remote(url), url
    for path in ("data/shards", "/abs/path", "C:\\data", Path("s3://not-a-url-as-a-path"), "s3:/one-slash"):
        assert not is_remote(path), path


def test_fetch_checks_and_places_atomically(s3, s3_bucket: str, tmp_path: Path) -> None:
    store = _store(f"{s3_bucket}/ds")
    data = _blob(300_000)
    claim = _put(store, "sdf-00000.npy", data)
    s3.reset()
    assert store.fetch("sdf-00000.npy", tmp_path / "a.npy", **claim) == len(data)
    assert (tmp_path / "a.npy").read_bytes() == data
    assert _leftovers(tmp_path) == ["a.npy"]
    assert s3.gets(f"{s3_bucket[5:]}/ds/sdf-00000.npy") == 1  # one download, no second read
    assert store.list() == {"sdf-00000.npy": len(data)}
    assert store.read_small("sdf-00000.npy", limit=len(data)) == data
    with pytest.raises(RemoteError, match="300,000 bytes, more than the 1,000 such"):
        store.read_small("sdf-00000.npy", limit=1000)
    with pytest.raises(RemoteNotFoundError, match=r"ds/missing.npy: no such object"):
        store.fetch("missing.npy", tmp_path / "m.npy", size=1, crc32="00000000")
    assert _leftovers(tmp_path) == ["a.npy"]


def test_corrupted_object_is_refused_and_not_kept(s3, s3_bucket: str, tmp_path: Path) -> None:
    """An object whose bytes differ from the manifest's claim is downloaded `attempts` times, then one line;
    nothing is left where it would be used."""
    store = _store(f"{s3_bucket}/ds")
    claim = _put(store, "labels-00000.npy", _blob(50_000))
    damaged = bytearray(_blob(50_000))
    damaged[123] ^= 1
    store.put_bytes("labels-00000.npy", bytes(damaged))
    s3.reset()
    with pytest.raises(RemoteMismatchError) as err:
        store.fetch("labels-00000.npy", tmp_path / "l.npy", **claim)
    assert "\n" not in str(err.value)
    assert f"{s3_bucket}/ds/labels-00000.npy: downloaded 3 times" in str(err.value)
    assert claim["crc32"] in str(err.value)
    assert _leftovers(tmp_path) == []
    assert s3.gets(f"{s3_bucket[5:]}/ds/labels-00000.npy") == 3


@pytest.mark.parametrize("mode", ["truncate", "corrupt"])
def test_damaged_download_is_fetched_again(s3, s3_bucket: str, tmp_path: Path, mode: str) -> None:
    store = _store(f"{s3_bucket}/ds")
    data = _blob(200_000, seed=1)
    claim = _put(store, "sdf-00001.npy", data)
    key = f"{s3_bucket[5:]}/ds/sdf-00001.npy"
    s3.reset()
    s3.fault(key, mode, times=2)
    assert store.fetch("sdf-00001.npy", tmp_path / "s.npy", **claim) >= 2 * len(data)
    assert (tmp_path / "s.npy").read_bytes() == data
    assert s3.gets(key) == 3
    assert _leftovers(tmp_path) == ["s.npy"]


def test_server_errors_are_retried_then_one_line(s3, s3_bucket: str, tmp_path: Path) -> None:
    store = _store(f"{s3_bucket}/ds")
    data = _blob(10_000, seed=2)
    claim = _put(store, "x.npy", data)
    key = f"{s3_bucket[5:]}/ds/x.npy"
    s3.reset()
    s3.fault(key, "error", times=2)  # passes: the third try succeeds
    store.fetch("x.npy", tmp_path / "x.npy", **claim)
    assert (tmp_path / "x.npy").read_bytes() == data
    assert s3.gets(key) == 3
    s3.fault(key, "error", times=100)
    start = time.perf_counter()
    with pytest.raises(RemoteError) as err:
        store.fetch("x.npy", tmp_path / "y.npy", **claim)
    assert time.perf_counter() - start < 5
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{s3_bucket}/ds/x.npy: downloading failed 3 times")
    assert "AWS_ENDPOINT_URL" in line
    assert s3.gets(key) == 3 + 3  # our tries only: the client's own retries are off
    assert _leftovers(tmp_path) == ["x.npy"]


def test_unreachable_endpoint_is_one_line(s3, s3_bucket: str, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(RemoteError, match=r"s3://.*/ds/manifest.json: reading failed 2 times"):
        RemoteStore(f"{s3_bucket}/ds", attempts=2, base_delay=0.01).read_small("manifest.json")


def test_full_local_disk_names_the_folder(s3, s3_bucket: str, tmp_path: Path) -> None:
    from helpers import tmpfs

    store = _store(f"{s3_bucket}/ds")
    claim = _put(store, "big.npy", _blob(3 << 20, seed=3))
    (tmp_path / "small").mkdir()
    with tmpfs(tmp_path / "small", "size=1m", skip="needs a small tmpfs (root, or a user namespace)") as folder:
        with pytest.raises(LocalWriteError) as err:
            store.fetch("big.npy", folder / "big.npy", **claim)
        assert str(err.value).startswith(f"{folder}: cannot write {s3_bucket}/ds/big.npy there (No space left")
        assert _leftovers(folder) == []


_KILLED_FETCH = """
import sys
from pathlib import Path
from gq.shards.remote import RemoteStore
RemoteStore(sys.argv[1]).fetch("slow.npy", Path(sys.argv[2]), size=int(sys.argv[3]), crc32=sys.argv[4])
"""


def test_killed_download_leaves_nothing_used(s3, s3_bucket: str, tmp_path: Path) -> None:
    """kill -9 in the middle of a download: no file at the destination, only a temporary that a later fetch
    neither reads nor needs."""
    store = _store(f"{s3_bucket}/ds")
    data = _blob(2 << 20, seed=4)
    claim = _put(store, "slow.npy", data)
    s3.fault(f"{s3_bucket[5:]}/ds/slow.npy", "slow", delay=0.05)  # 32 pieces of 64 KiB: 1.6 s
    dest = tmp_path / "slow.npy"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_FETCH, f"{s3_bucket}/ds", str(dest), str(claim["size"]), claim["crc32"]]
    )
    deadline = time.monotonic() + 30
    while not any(p.stat().st_size for p in tmp_path.glob(".slow.npy.*.tmp")):
        assert child.poll() is None and time.monotonic() < deadline, "the download ended before it was killed"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not dest.exists()
    (partial,) = tmp_path.glob(".slow.npy.*.tmp")
    assert 0 < partial.stat().st_size < len(data)
    assert store.fetch("slow.npy", dest, **claim) == len(data)
    assert dest.read_bytes() == data
    assert _leftovers(tmp_path) == sorted([partial.name, "slow.npy"])  # the old temporary is never read


def test_module_defaults_bound_the_retries(monkeypatch) -> None:
    monkeypatch.setattr(remote, "ATTEMPTS", 2)
    monkeypatch.setattr(remote, "BASE_DELAY_S", 0.25)
    store = RemoteStore("s3://bucket/ds")
    assert (store.attempts, store.base_delay) == (2, 0.25)
    assert len(list(store._delays())) == 1
