"""Fixtures shared by the tests; helper functions live in tests/helpers.py."""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import make_dataset, make_source

from gq.shards import BuildOptions


@pytest.fixture
def small_source(tmp_path: Path) -> Path:
    return make_source(tmp_path / "src", scenes=11)


def _state(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under root: (size, modification time), so a change to any file or folder shows."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="session")
def shared_dataset(tmp_path_factory) -> Iterator[Callable[..., Path]]:
    """The session's small datasets: `shared_dataset(scenes, grid=, grasps=, seed=, **BuildOptions fields)`
    gives the shards directory of one, built once per set of arguments for the whole session; its scenes are
    beside it, in `shards.parent / "scenes"`.

    The arguments are helpers.make_dataset's (`grasps` G or a range (lo, hi)). Every dataset is shared: a test
    must not change one (it copies it first), and the session's end checks that none was changed.
    """
    built: dict[tuple, tuple[Path, dict]] = {}

    def get(scenes: int, *, grid: int, grasps: int | tuple[int, int], seed: int, **options) -> Path:
        workers = options.pop("scene_workers", 1)  # the bytes do not depend on it
        key = (scenes, grasps, seed, BuildOptions(grid=grid, **options))  # an option at its default, given or not
        if key not in built:
            root = tmp_path_factory.mktemp("dataset")
            make_dataset(root, scenes, grid=grid, grasps=grasps, seed=seed, scene_workers=workers, **options)
            built[key] = (root / "shards", _state(root))
        return built[key][0]

    yield get
    changed = [str(shards) for shards, state in built.values() if _state(shards.parent) != state]
    assert not changed, f"tests changed these shared datasets (copy one before changing it): {changed}"


_buckets = itertools.count()


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (moto's) on 127.0.0.1 for the session, with the standard client settings
    (AWS_ENDPOINT_URL, fake credentials) pointing at it: `gq.benchmarks.s3_server.S3Server` (`endpoint_url`,
    `bytes_served()`, `gets(key)`, `reset()`, `fault(key, mode, times=, delay=)`). Skips without moto or s3fs."""
    for module, package in (("moto", "moto[server]"), ("flask", "moto[server]"), ("s3fs", "s3fs")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install '{package}' (or the dev and s3 extras)")
    import s3fs

    from gq.benchmarks.s3_server import s3_server

    with s3_server() as server:
        server.client = s3fs.S3FileSystem(skip_instance_cache=True)  # one client for the fixtures' own calls
        yield server


@pytest.fixture
def s3_bucket(s3) -> str:
    """A new, empty bucket on the session's S3 server, as its URL `s3://NAME`; the server's counts and faults
    are reset."""
    name = f"gq-test-{next(_buckets)}"
    s3.client.mkdir(name)
    s3.reset()
    return f"s3://{name}"
