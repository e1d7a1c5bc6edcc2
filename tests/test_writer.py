"""`ShardWriter`, the push-style writer (issue 23): the bytes of `gq shards build` whatever the order of `add`,
one line naming the scene on bad input, and nothing left behind by an exception inside the block."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import invoke, load_tool, random_scene, tree_bytes, write_scene

from gq.shards import BuildOptions, SceneError, ShardReader, ShardWriter, build_shards, part_of, verify
from gq.shards.format import HEADER_BYTES
from gq.shards.outdir import BuildError

GRID = 16


def _scenes(src: Path) -> dict[str, dict]:
    """Every scene of a processed directory, as arrays in memory (what a simulator would hold)."""
    scenes = {}
    for path in sorted(src.glob("*/scene.npz")):
        with np.load(path) as z:
            scenes[path.parent.name] = {k: z[k] for k in z.files}
    return scenes


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != "src")


@pytest.fixture(scope="module")
def source(shared_dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared 30 scenes and one with a NaN score (skipped with skip_bad), and a splits file naming them."""
    src = tmp_path_factory.mktemp("writer") / "src"
    shutil.copytree(shared_dataset(30, grid=GRID, grasps=(3, 24), seed=0).parent / "scenes", src)
    bad = random_scene(np.random.default_rng(3), GRID, 5)
    bad["scores"][2] = np.nan
    write_scene(src, "scene_bad", **bad)
    names = sorted(p.name for p in src.iterdir())
    (src.parent / "splits.json").write_text(json.dumps({"train": names[:22], "val": names[22:27], "test": names[27:]}))
    return src


@pytest.mark.parametrize("order", ["sorted", "reversed", "shuffled_0", "shuffled_1"])
@pytest.mark.parametrize("splits", [False, True])
def test_writer_bytes_equal_build_bytes_for_any_add_order(
    order: str, splits: bool, source: Path, tmp_path: Path
) -> None:
    options = {"grid": GRID, "max_grasps": 24, "records_per_shard": 4, "skip_bad": True, "shuffle_seed": 3}
    if splits:
        options["splits"] = str(source.parent / "splits.json")
    ref = tmp_path / "ref"
    build_shards(source, ref, BuildOptions(**options), workers=2, progress=False)
    scenes = _scenes(source)
    names = sorted(scenes)
    if order == "reversed":
        names.reverse()
    elif order.startswith("shuffled"):
        np.random.default_rng(int(order[-1])).shuffle(names)
    out = tmp_path / "out"
    with ShardWriter(out=out, source=str(source.resolve()), **options) as w:
        for name in names:
            w.add(name, **scenes[name])
    assert w.summary["scenes"] == 30 and w.summary["skipped"] == 1
    assert tree_bytes(out) == tree_bytes(ref)
    assert verify(out).problems == []


BAD = {
    "sdf_shape": ({"sdf": np.zeros((8, 8, 8), np.float32)}, "'sdf' has shape (8, 8, 8), expected (16, 16, 16)"),
    "int_grasps": ({"grasps": np.zeros((4, 19), np.int64)}, "'grasps' has dtype int64, expected a floating-point"),
    "nan_sdf": ({"sdf": np.full((GRID,) * 3, np.nan, np.float32)}, "'sdf' has 4096 non-finite values"),
    "too_many_grasps": (
        {"grasps": np.zeros((30, 19), np.float32), "scores": np.zeros(30, np.float32)},
        "has 30 grasps, more than --max-grasps 24",
    ),
    "scores_shape": ({"scores": np.zeros(3, np.float32)}, "'scores' has shape (3,), expected (4,)"),
    "float16_range": ({"sdf": np.full((GRID,) * 3, 1e6, np.float32)}, "outside float16's finite range"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_naming_the_scene_and_nothing_is_written(case: str, tmp_path: Path) -> None:
    change, expected = BAD[case]
    good = random_scene(np.random.default_rng(0), GRID, 4)
    out = tmp_path / "out"
    with pytest.raises(SceneError) as raised, ShardWriter(out=out, grid=GRID, max_grasps=24) as w:
        w.add("mug_1", **good)
        w.add("mug_2", **{**good, **change})
    line = str(raised.value)
    assert line.startswith("scene 'mug_2': ") and expected in line and "\n" not in line, line
    assert _siblings(out) == []


@pytest.mark.parametrize(
    "case, expected",
    [
        ("slash", "scene name 'a/b': not a folder name"),
        ("twice", "scene 'mug_1': added twice"),
        ("split", "split 'dev': choose one of train, val, test"),
        ("option", "ShardWriter: "),
    ],
)
def test_bad_names_splits_and_options_are_one_line(case: str, expected: str, tmp_path: Path) -> None:
    good = random_scene(np.random.default_rng(0), GRID, 4)
    out = tmp_path / "out"
    with (
        pytest.raises(BuildError) as raised,
        ShardWriter(out=out, grid=GRID, max_grasps=24, **({"grids": 3} if case == "option" else {})) as w,
    ):
        w.add("mug_1", **good)
        w.add(
            {"slash": "a/b", "twice": "mug_1", "split": "mug_2"}[case],
            **good,
            split="dev" if case == "split" else None,
        )
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    assert _siblings(out) == []


def test_exception_inside_the_block_leaves_the_old_dataset_and_nothing_else(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    out = tmp_path / "out"
    with ShardWriter(out=out, grid=GRID, max_grasps=24) as w:
        for i in range(5):
            w.add(f"obj_{i}", **random_scene(rng, GRID, 6))
    old = tree_bytes(out)
    with (
        pytest.raises(RuntimeError, match="simulator crashed"),
        ShardWriter(out=out, grid=GRID, max_grasps=24, overwrite=True) as w,
    ):
        for i in range(5):
            w.add(f"new_{i}", **random_scene(rng, GRID, 6))
        raise RuntimeError("simulator crashed")
    assert tree_bytes(out) == old and _siblings(out) == ["out"]
    with (
        pytest.raises(BuildError, match="no scenes were added"),
        ShardWriter(out=tmp_path / "empty", grid=GRID, max_grasps=24),
    ):  # an empty block writes nothing either
        pass
    assert _siblings(out) == ["out"]


# --- parts and merge ------------------------------------------------------------------------------

MAKE, MERGE = load_tool("make_shards.py").main, load_tool("merge_shards.py").main
PART_FLAGS = ("--grid", GRID, "--max-grasps", 24, "--records-per-shard", 4, "--skip-bad", "--quiet")


def _build(src: Path, out: Path, *flags) -> None:
    result = invoke(MAKE, src, "--out", out, "--workers", 2, *PART_FLAGS, *flags, name="gq shards build")
    assert result.returncode == 0, result.stderr


def _merge(parts: list[Path], out: Path):
    return invoke(MERGE, *parts, "--out", out, name="gq shards merge")


@pytest.fixture(scope="module")
def single(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single build of every scene, which merged parts must equal byte for byte."""
    out = tmp_path_factory.mktemp("single") / "ds"
    _build(source, out)
    return out


@pytest.mark.parametrize("count", [1, 3, 7])
def test_parts_merged_in_any_order_equal_the_single_build(count: int, source: Path, single: Path, tmp_path: Path):
    parts = [tmp_path / f"part{i}" for i in range(count)]
    for i, part in enumerate(parts):
        _build(source, part, "--part", f"{i}/{count}")
        assert verify(part).problems == []  # each part is a complete dataset of its own
    sizes = [ShardReader(part).num_scenes for part in parts]
    assert sum(sizes) == 30 and (count == 1 or len(set(sizes)) > 1)  # uneven parts
    np.random.default_rng(count).shuffle(parts)
    result = _merge(parts, tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    assert tree_bytes(tmp_path / "merged") == tree_bytes(single)


def test_writer_parts_with_empty_ones_merge_to_the_single_build(source: Path, single: Path, tmp_path: Path) -> None:
    """40 parts of 31 scenes (one bad): some parts are empty, and are complete datasets all the same."""
    scenes, count = _scenes(source), 40
    options = {"grid": GRID, "max_grasps": 24, "records_per_shard": 4, "skip_bad": True}
    parts = [tmp_path / f"part{i}" for i in range(count)]
    for i, part in enumerate(parts):
        with ShardWriter(out=part, part=(i, count), source=str(source.resolve()), **options) as w:
            for name in [n for n in scenes if part_of(n, count) == i]:
                w.add(name, **scenes[name])
    empty = [part for part in parts if ShardReader(part).num_scenes == 0]
    assert empty and all(verify(part).problems == [] for part in empty)
    result = _merge(parts[::-1], tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    assert tree_bytes(tmp_path / "merged") == tree_bytes(single)


def _refusal(case: str, source: Path, tmp_path: Path) -> tuple[list[Path], str]:
    """Two parts of a build, one of them made wrong in the way `case` names; the words the refusal must hold."""
    a, b = tmp_path / "a", tmp_path / "b"
    _build(source, a, "--part", "0/2")
    flags = {
        "grid": ("--grid", 8),
        "dtype": ("--dtype", "float32"),
        "records_per_shard": ("--records-per-shard", 8),
        "seed": ("--shuffle-seed", 5),
    }
    if case in flags:
        result = invoke(MAKE, source, "--out", b, "--overwrite", "--workers", 2, "--part", "1/2", "--quiet",
                        *PART_FLAGS, *flags[case], name="gq shards build")  # fmt: skip
        if case == "grid":  # the source's grids are 16^3: a part of 8^3 grids holds only skipped scenes
            assert result.returncode == 0, result.stderr
        return [a, b], f"--{flags[case][0][2:]}"
    if case == "splits":
        names = sorted(p.name for p in source.iterdir())
        splits = tmp_path / "splits.json"
        splits.write_text(json.dumps({"train": names[:25], "val": names[25:], "test": []}))
        _build(source, b, "--part", "1/2", "--splits", splits)
        return [a, b], "--splits"
    if case == "scene_in_two":
        scenes = _scenes(source)
        with ShardWriter(out=b, part=(1, 2), source=str(source.resolve()), grid=GRID, max_grasps=24,
                         records_per_shard=4, skip_bad=True) as w:  # fmt: skip
            for name in scenes:
                w.add(name, **scenes[name])
        return [a, b], "a scene belongs to one part"
    _build(source, b, "--part", "1/2")
    if case == "missing":
        return [a], "part 1 of 2 is missing"
    if case == "twice":
        c = tmp_path / "c"
        _build(source, c, "--part", "1/2")
        return [a, b, c], "both part 1 of 2"
    if case == "damaged_record":  # a flipped byte in a record: found by the checksum as it is copied
        path = b / "sdf-00000.npy"
        data = bytearray(path.read_bytes())
        data[HEADER_BYTES + 100] ^= 0xFF
        path.write_bytes(bytes(data))
        return [a, b], "fails its checksum"
    if case == "damaged_index":
        (b / "scenes.parquet").write_bytes(b"not an index")
        return [a, b], "fails its checks"
    raise AssertionError(case)


REFUSALS = ["grid", "dtype", "records_per_shard", "seed", "splits", "scene_in_two", "missing", "twice",
            "damaged_record", "damaged_index"]  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_merge_refuses_in_one_line_and_writes_nothing(case: str, source: Path, tmp_path: Path) -> None:
    parts, expected = _refusal(case, source, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _merge(parts, tmp_path / "merged")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], (result.returncode, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no build folder, no lock
