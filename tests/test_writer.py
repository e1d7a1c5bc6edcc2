"""`ShardWriter`, the push-style writer (issue 23): the bytes of `gq shards build` whatever the order of `add`,
one line naming the scene on bad input, and nothing left behind by an exception inside the block."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import make_source, random_scene, tree_bytes, write_scene

from gq.shards import BuildOptions, SceneError, ShardWriter, build_shards, verify
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
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 scenes, one of them with a NaN score (skipped with skip_bad), and a splits file naming them."""
    src = make_source(tmp_path_factory.mktemp("writer") / "src", scenes=30)
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
