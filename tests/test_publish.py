"""Publishing on a real S3 server (moto's, on 127.0.0.1): upload, download, build/merge --out URL, verify URL."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import shutil
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import invoke, make_source, tree_bytes, without_modules

from gq.shards import BuildOptions, build_shards, remote
from gq.shards.format import MANIFEST
from gq.shards.publish import MARKER
from gq.shards.remote import RemoteMismatchError, RemoteStore
from gq.tools import make_shards, merge_shards, remote_shards, verify_shards


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch) -> None:
    """Retries as in use, but without the waits (the commands here run in this process)."""
    monkeypatch.setattr(remote, "BASE_DELAY_S", 0.001)


@pytest.fixture
def dataset(shared_dataset) -> Path:
    return shared_dataset(24, grid=16, grasps=32, seed=3, records_per_shard=4)


def _published(root: Path) -> dict[str, bytes]:
    """What a dataset publishes: its manifest and the files the manifest lists, by name."""
    names = [f["name"] for f in json.loads((root / MANIFEST).read_text())["files"]]
    return {name: (root / name).read_bytes() for name in [*names, MANIFEST]}


def _objects(url: str) -> dict[str, bytes]:
    store = RemoteStore(url)
    return {name: store.read_small(name, limit=1 << 30) for name in store.list()}


def _upload(dataset: Path, url: str, *flags: str):
    return invoke(remote_shards.upload, dataset, url, *flags, name="gq shards upload")


def test_upload_download_round_trip(s3_bucket: str, dataset: Path, tmp_path: Path) -> None:
    url = f"{s3_bucket}/sets/ds"
    done = _upload(dataset, url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"published {url}: ")
    assert _objects(url) == _published(dataset)  # exactly the dataset: no marker, no local-only files
    got = invoke(remote_shards.download, url, tmp_path / "copy", name="gq shards download")
    assert got.returncode == 0, got.stderr
    assert _published(tmp_path / "copy") == _published(dataset)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # nothing left beside it
    # The copy is a dataset like a built one: it verifies, and a second download needs --overwrite.
    assert invoke(verify_shards.cli, tmp_path / "copy", name="gq shards verify").returncode == 0
    again = invoke(remote_shards.download, url, tmp_path / "copy", name="gq shards download")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert invoke(remote_shards.download, url, tmp_path / "copy", "--overwrite", name="d").returncode == 0


def test_upload_refuses_what_it_did_not_write(s3, s3_bucket: str, dataset: Path, shared_dataset) -> None:
    url = f"{s3_bucket}/ds"
    s3.client.pipe_file(f"{url}/notes.txt", b"a user's file")
    refused = _upload(dataset, url, "--overwrite")
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith(
        f"{url}: holds 1 objects ('notes.txt' first) and no gq dataset; gq replaces only a dataset it published: "
        "choose another URL, or delete them with your storage's own tools"
    )
    assert _objects(url) == {"notes.txt": b"a user's file"}

    url = f"{s3_bucket}/other"
    assert _upload(dataset, url).returncode == 0
    again = _upload(dataset, url)
    assert again.returncode == 2 and f"{url}: already holds a dataset; pass --overwrite" in again.stderr
    s3.client.pipe_file(f"{url}/extra/notes.txt", b"mine")
    beside = _upload(dataset, url, "--overwrite")
    assert beside.returncode == 2 and "holds 'extra/notes.txt', which the dataset there does not list" in beside.stderr
    assert _objects(url) == {**_published(dataset), "extra/notes.txt": b"mine"}


def test_replace_writes_in_order_and_removes_only_the_old_datasets_objects(
    s3, s3_bucket: str, dataset: Path, shared_dataset, tmp_path: Path
) -> None:
    url = f"{s3_bucket}/ds"
    assert _upload(dataset, url).returncode == 0
    store = RemoteStore(url, attempts=2)
    old = json.loads(store.read_small(MANIFEST))  # a reader opened the old dataset
    smaller = shared_dataset(8, grid=16, grasps=32, seed=4, records_per_shard=4)
    s3.reset()
    assert _upload(smaller, url, "--overwrite").returncode == 0
    assert _objects(url) == _published(smaller)  # the old dataset's extra shards are gone
    # The order of writes: marker, old manifest gone, the data files, the manifest last, then the old dataset's
    # objects the new one does not list, then the marker.
    key = f"{s3_bucket[5:]}/ds"
    writes = s3.writes()
    new_files = [f["name"] for f in json.loads((smaller / MANIFEST).read_text())["files"]]
    stale = sorted({f["name"] for f in old["files"]} - set(new_files))
    data = len(new_files) + 2
    assert writes[:2] == [f"PUT {key}/{MARKER}", f"DELETE {key}/{MANIFEST}"]
    assert sorted(writes[2:data]) == sorted(f"PUT {key}/{name}" for name in new_files)  # several at once
    assert writes[data:] == [
        f"PUT {key}/{MANIFEST}",
        *(f"DELETE {key}/{name}" for name in stale),
        f"DELETE {key}/{MARKER}",
    ]
    # The reader of the old dataset: a replaced object no longer matches its manifest, and is refused.
    entry = next(f for f in old["files"] if f["name"] == "sdf-00000.npy")
    with pytest.raises(RemoteMismatchError, match="sdf-00000.npy: downloaded 2 times"):
        store.fetch(entry["name"], tmp_path / "sdf.npy", size=entry["bytes"], crc32=entry["crc32"])
    assert list(tmp_path.iterdir()) == []
    # An upload killed after its marker: the next one recognises and replaces it, without --overwrite.
    store.delete([MANIFEST])
    store.put_bytes(MARKER, json.dumps({"tool": "gq shards upload", "objects": sorted(_published(dataset))}).encode())
    assert _upload(dataset, f"{url}").returncode == 0
    assert _objects(url) == _published(dataset)


def _poll(url: str, stop: threading.Event, seen: list[str], folder: Path) -> None:
    """Read the dataset at `url` until `stop`, as a reader would: the manifest, then every file it lists,
    checked; record what each poll saw."""
    store = RemoteStore(url, attempts=1)
    while True:
        last = stop.is_set()
        if not store.exists(MANIFEST):
            seen.append("nothing")
        else:
            manifest = json.loads(store.read_small(MANIFEST))
            try:
                for entry in manifest["files"]:
                    store.fetch(entry["name"], folder / entry["name"], size=entry["bytes"], crc32=entry["crc32"])
                seen.append(f"whole {zlib.crc32(json.dumps(manifest).encode())}")
            except RemoteMismatchError:
                seen.append("changed")  # read the old manifest, then a replaced object: refused, one line
        if last:
            return


def _watched(url: str, folder: Path, run) -> list[str]:
    """What a reader polling `url` saw while `run()` ran, and once after."""
    stop, seen = threading.Event(), []
    folder.mkdir()
    reader = threading.Thread(target=_poll, args=(url, stop, seen, folder))
    reader.start()
    try:
        run()
    finally:
        stop.set()
        reader.join()
    return seen


def test_build_out_url_publishes_atomically(s3_bucket: str, tmp_path: Path) -> None:
    source = make_source(tmp_path / "src", scenes=40)
    url = f"{s3_bucket}/built"
    flags = ["--grid", 16, "--max-grasps", 24, "--records-per-shard", 2, "--workers", 1, "--quiet"]

    def build(*extra) -> None:
        done = invoke(make_shards.main, source, "--out", url, *flags, *extra, name="gq shards build")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"dataset   {url}\n")

    seen = _watched(url, tmp_path / "reader", build)
    assert seen[0] == "nothing" and seen[-1].startswith("whole")
    assert set(seen) <= {"nothing", seen[-1]}  # never a part of the dataset
    local = tmp_path / "local"
    build_shards(source, local, BuildOptions(grid=16, max_grasps=24, records_per_shard=2), workers=1)
    assert _objects(url) == _published(local)  # the bytes of a local build
    assert [p.name for p in tmp_path.iterdir()] == ["src", "reader", "local"]  # the staging folder is gone

    # Replaced while read: each poll sees nothing, the old dataset whole, the new one whole, or a change
    # refused; never a mixture.
    seen = _watched(url, tmp_path / "reader2", lambda: build("--shuffle-seed", 7, "--overwrite"))
    assert seen[-1].startswith("whole") and seen[-1] != seen[0]
    assert set(seen) <= {seen[0], "nothing", "changed", seen[-1]}


def test_merge_out_url_and_stage(s3_bucket: str, tmp_path: Path) -> None:
    source = make_source(tmp_path / "src", scenes=12)
    opts = BuildOptions(grid=16, max_grasps=24, records_per_shard=2)
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        build_shards(source, part, opts, workers=1, part=(i, 2))
    url, stage = f"{s3_bucket}/merged", tmp_path / "stage"
    done = invoke(merge_shards.main, *parts, "--out", url, "--stage", stage, name="gq shards merge")
    assert done.returncode == 0, done.stderr
    assert _objects(url) == _published(stage)  # the stage is kept: a local dataset like any other
    build_shards(source, tmp_path / "single", opts, workers=1)
    assert _published(stage) == _published(tmp_path / "single")
    local = invoke(merge_shards.main, *parts, "--out", tmp_path / "x", "--stage", stage, name="gq shards merge")
    assert local.returncode == 2 and "--stage" in local.stderr and not (tmp_path / "x").exists()


def test_verify_url(s3, s3_bucket: str, dataset: Path) -> None:
    url = f"{s3_bucket}/ds"
    assert _upload(dataset, url).returncode == 0

    def verify(*flags: str):
        return invoke(verify_shards.cli, url, *flags, name="gq shards verify")

    for flags in ((), ("--quick",)):
        done = verify(*flags)
        assert done.returncode == 0 and done.stdout.startswith(f"OK {url}: 24 scenes"), done.stdout
    assert "records not read" in verify("--quick").stdout
    # One flipped byte inside a record: the full check names the shard file and the record, quick does not read it.
    name = "sdf-00001.npy"
    data = bytearray((dataset / name).read_bytes())
    data[4096 + 100] ^= 0x40
    s3.client.pipe_file(f"{url}/{name}", bytes(data))
    bad = verify()
    assert bad.returncode == 1
    assert f"{name}: shard 1 slot 0 scene" in bad.stdout and f"{name}: shard 1: file CRC-32" in bad.stdout
    assert verify("--quick").returncode == 0
    # A missing object and a missing manifest: one line each.
    s3.client.rm_file(f"{url}/labels-00002.npy")
    assert "labels-00002.npy: listed in the manifest but missing" in verify("--quick").stdout
    s3.client.rm_file(f"{url}/{MANIFEST}")
    gone = verify()
    assert gone.returncode == 1 and gone.stdout.strip() == (
        f"{url}/{MANIFEST}: missing, so {url} is no finished dataset; publish one there with "
        "gq shards upload DIR URL (or gq shards build ... --out URL)"
    )


def test_download_of_a_damaged_dataset_leaves_nothing(s3, s3_bucket: str, dataset: Path, tmp_path: Path) -> None:
    url = f"{s3_bucket}/ds"
    assert _upload(dataset, url).returncode == 0
    s3.client.pipe_file(f"{url}/labels-00001.npy", (dataset / "labels-00000.npy").read_bytes())  # same size
    got = invoke(remote_shards.download, url, tmp_path / "copy", name="gq shards download")
    assert got.returncode == 2
    assert f"{url}/labels-00001.npy: downloaded 5 times" in got.stderr and len(got.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    assert tree_bytes(dataset)  # the shared dataset is untouched (checked at the session's end too)


def test_without_the_s3_extra_help_works_and_a_url_names_the_extra(dataset: Path, tmp_path: Path) -> None:
    """On a plain install (no fsspec, no s3fs): every command's --help, and a URL is one line naming the extra."""
    missing = ("fsspec", "s3fs", "botocore", "aiobotocore")
    for command in (["build"], ["merge"], ["verify"], ["upload"], ["download"]):
        result = without_modules(missing, "gq.tools.cli", "shards", *command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout, result.stderr
    for command in (
        ["upload", dataset, "s3://bucket/ds"],
        ["download", "s3://bucket/ds", tmp_path / "copy"],
        ["verify", "s3://bucket/ds"],
    ):
        result = without_modules(missing, "gq.tools.cli", "shards", *command)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "fsspec is not installed" in lines[0] and "pip install 'gq-pipeline[s3]'" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def _web_server(folder: Path) -> Iterator[str]:
    """Python's own web server on 127.0.0.1 serving `folder` (no listings fsspec reads, no byte ranges)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_a_dataset_on_a_web_server(dataset: Path, tmp_path: Path) -> None:
    """Any fsspec URL: a dataset served by a plain web server verifies and downloads as one in a bucket."""
    pytest.importorskip("aiohttp", reason="fsspec reads http:// with aiohttp (the s3 extra)")
    with _web_server(dataset.parent) as site:
        url = f"{site}/{dataset.name}"
        for flags in ((), ("--quick",)):
            done = invoke(verify_shards.cli, url, *flags, name="gq shards verify")
            assert done.returncode == 0 and done.stdout.startswith(f"OK {url}: 24 scenes"), done.stdout
        assert invoke(remote_shards.download, url, tmp_path / "copy", name="d").returncode == 0
        missing = invoke(verify_shards.cli, f"{site}/nothing-here", name="gq shards verify")
        assert missing.returncode == 1 and "nothing-here/manifest.json: missing" in missing.stdout
    assert _published(tmp_path / "copy") == _published(dataset)


def test_a_failed_upload_leaves_no_dataset_and_the_next_one_replaces_it(
    s3_bucket: str, dataset: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    damaged = bytearray((copy / "sdf-00002.npy").read_bytes())
    damaged[-1] ^= 1  # same size: only the file's CRC-32 tells
    (copy / "sdf-00002.npy").write_bytes(bytes(damaged))
    url = f"{s3_bucket}/ds"
    failed = _upload(copy, url)
    assert failed.returncode == 2 and len(failed.stderr.splitlines()) == 1
    assert "sdf-00002.npy: its CRC-32 differs from the manifest's" in failed.stderr
    left = RemoteStore(url).list()
    assert MANIFEST not in left and MARKER in left  # no dataset for readers; the marker names what is there
    assert _upload(dataset, url).returncode == 0  # an unfinished upload is replaced without --overwrite
    assert _objects(url) == _published(dataset)
