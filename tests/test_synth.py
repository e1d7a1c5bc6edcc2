"""Tests of the synthetic scene generator (synth) and its CLI, tools/make_scenes.py."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import load_tool

import gq.synth as synth
from gq.common.ownership import RECORD
from gq.common.rotations import matrix_to_quaternion, quaternion_to_matrix
from gq.synth import hand, primitives, score, writer
from gq.synth.objects import MARGIN, normalise, random_object
from gq.synth.primitives import KINDS, Primitive, grid_axis, sample_grid, union_sdf
from gq.synth.rotations import random_rotations

KEYS = {"sdf", "grasps", "scores", "translation", "global_scale"}

# One example of each family, sized to fit the cube: (kind, params).
EXAMPLES = [
    ("sphere", (0.55,)),
    ("box", (0.5, 0.3, 0.2)),
    ("cylinder", (0.35, 0.5)),
    ("capsule", (0.25, 0.45)),
    ("torus", (0.5, 0.15)),
    ("cone", (0.5, 0.15, 0.45)),
    ("cone", (0.45, 0.0, 0.5)),
]


def _placed(kind: str, params: tuple, seed: int) -> Primitive:
    rng = np.random.default_rng(seed)
    return Primitive(kind, rng.uniform(-0.1, 0.1, 3), random_rotations(rng, 1)[0], params)


# Reference distances, written independently of synth.primitives: clamping for the box,
# nearest points for sphere/capsule/torus, and exact distance to a convex polygon in the
# (radius, height) plane for the solids of revolution with flat caps.
def _convex_polygon_sdf(u: np.ndarray, v: np.ndarray, corners: list) -> np.ndarray:
    points = np.stack([u, v], -1)
    dist, inside = np.inf, True
    for a, b in zip(corners, corners[1:] + corners[:1]):
        a, b = np.asarray(a, float), np.asarray(b, float)
        t = np.clip(((points - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
        dist = np.minimum(dist, np.linalg.norm(points - (a + t[..., None] * (b - a)), axis=-1))
        edge, rel = b - a, points - a
        inside = inside & (edge[0] * rel[..., 1] - edge[1] * rel[..., 0] >= 0)  # left of a->b
    return np.where(inside, -dist, dist)


def _reference_sdf(prim: Primitive, points: np.ndarray) -> np.ndarray:
    q = (points - prim.centre) @ prim.rotation  # local coordinates
    p = prim.params
    rho = np.linalg.norm(q[:, :2], axis=1)
    if prim.kind == "sphere":
        return np.linalg.norm(q, axis=1) - p[0]
    if prim.kind == "box":
        half = np.asarray(p)
        outside = np.linalg.norm(q - np.clip(q, -half, half), axis=1)
        return np.where(outside > 0, outside, -np.min(half - np.abs(q), axis=1))
    if prim.kind == "capsule":
        nearest = np.zeros_like(q)
        nearest[:, 2] = np.clip(q[:, 2], -p[1], p[1])
        return np.linalg.norm(q - nearest, axis=1) - p[0]
    if prim.kind == "torus":
        ring = np.zeros_like(q)
        ring[:, :2] = q[:, :2] / rho[:, None] * p[0]
        return np.linalg.norm(q - ring, axis=1) - p[1]
    r1, r2, h = (p[0], p[0], p[1]) if prim.kind == "cylinder" else p
    # Counter-clockwise section through the axis: the solid is symmetric in the radius.
    top = [(r2, h), (-r2, h)] if r2 > 0 else [(0, h)]
    return _convex_polygon_sdf(rho, q[:, 2], [(-r1, -h), (r1, -h)] + top)


def _grid_points(grid: int) -> np.ndarray:
    c = grid_axis(grid).astype(np.float64)
    return np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)


EXAMPLE_IDS = ["sphere", "box", "cylinder", "capsule", "torus", "cone", "cone-pointed"]


@pytest.mark.parametrize("kind,params", EXAMPLES, ids=EXAMPLE_IDS)
def test_primitive_grid_matches_analytic_distance(kind, params):
    prim = _placed(kind, params, seed=len(kind))
    grid = sample_grid([prim], 32)
    assert grid.dtype == np.float32 and grid.shape == (32, 32, 32)
    expected = _reference_sdf(prim, _grid_points(32)).reshape(grid.shape)
    assert np.abs(grid - expected).max() < 1e-4
    assert (grid < 0).any() and (grid > 0).any()


@pytest.mark.parametrize("kind,params", EXAMPLES, ids=EXAMPLE_IDS)
def test_primitive_gradient_has_unit_norm(kind, params):
    # An exact SDF has |grad| = 1 everywhere but on its medial axis, which random points miss.
    prim = _placed(kind, params, seed=7)
    pts = np.random.default_rng(1).uniform(-1, 1, (2000, 3))
    eps = 1e-6
    grad = np.stack([(prim.sdf(*(pts + eps * e).T) - prim.sdf(*(pts - eps * e).T)) / (2 * eps) for e in np.eye(3)], -1)
    close = np.abs(np.linalg.norm(grad, axis=1) - 1) < 1e-4
    assert close.mean() > 0.99


def test_union_is_pointwise_min_and_bounds_are_tight():
    prims = [_placed(kind, params, seed=i) for i, (kind, params) in enumerate(EXAMPLES[:3])]
    x, y, z = np.random.default_rng(2).uniform(-1, 1, (3, 500))
    expected = np.min([p.sdf(x, y, z) for p in prims], axis=0)
    np.testing.assert_array_equal(union_sdf(prims, x, y, z), expected)
    np.testing.assert_array_equal(sample_grid(prims, 16), np.minimum.reduce([sample_grid([p], 16) for p in prims]))
    for kind, params in EXAMPLES:  # the shape touches every face of its bounding box
        prim = _placed(kind, params, seed=3)
        lo, hi = prim.bounds()
        for axis in range(3):
            for face in (lo, hi):
                probe = np.random.default_rng(4).uniform(lo, hi, (20000, 3))
                probe[:, axis] = face[axis]
                assert _reference_sdf(prim, probe).min() < 0.02


def test_objects_are_centred_and_scaled_with_margin():
    for index in range(20):
        rng = np.random.default_rng([5, index])
        world = random_object(rng)
        assert 1 <= len(world) <= 3 and {p.kind for p in world} <= set(KINDS)
        prims, translation, scale = normalise(world)
        lo, hi = primitives.union_bounds(prims)
        np.testing.assert_allclose((lo + hi) / 2, 0, atol=1e-9)
        assert np.isclose(np.max(hi - lo) / 2, 1 - MARGIN)
        # The normalised shape is the world shape moved and scaled: SDFs scale with it.
        p = np.random.default_rng(6).uniform(-1, 1, (100, 3))
        np.testing.assert_allclose(
            union_sdf(prims, *p.T), scale * union_sdf(world, *(p / scale + translation).T), atol=1e-9
        )
        sdf = sample_grid(prims, 32)
        faces = np.concatenate([sdf[[0, -1]].ravel(), sdf[:, [0, -1]].ravel(), sdf[..., [0, -1]].ravel()])
        assert faces.min() > 0  # the object never touches the cube's walls


def test_forward_kinematics_rest_shape():
    rest = np.zeros((1, 19))
    rest[0, 6] = 1.0  # identity quaternion (xyzw)
    points = hand.forward_kinematics(rest)[0]
    assert points.shape == (hand.NUM_POINTS, 3)
    np.testing.assert_allclose(points[hand.PALM], [0, 0, 0])
    np.testing.assert_allclose(
        points[hand.TIPS], [[-0.22, 1.15, 0], [0, 1.15, 0], [0.22, 1.15, 0], [0, -1.15, 0]], atol=1e-12
    )
    np.testing.assert_allclose(
        points[hand.LINK_ENDS], [[-0.22, 0.8, 0], [0, 0.8, 0], [0.22, 0.8, 0], [0, -0.8, 0]], atol=1e-12
    )
    np.testing.assert_allclose(points[hand.FINGER_BASES], hand.BASES)


def test_forward_kinematics_hand_computed_poses():
    g = np.zeros((2, 19))
    g[:, 6] = 1.0
    # Middle finger: proximal 0.5, distal 1.0 bend toward +z; ring abducted by 0.3 (about +z).
    g[0, 7 + 3 + 1], g[0, 7 + 3 + 2] = 0.5, 1.0
    g[0, 7 + 0] = 0.3
    # Second grasp: palm at (1, 2, 3), turned 90 degrees about z (x -> y, y -> -x), joints zero;
    # the quaternion is deliberately not unit length.
    g[1, :7] = [1, 2, 3, 0, 0, 2 * np.sin(np.pi / 4), 2 * np.cos(np.pi / 4)]
    points = hand.forward_kinematics(g)
    base = np.array([0, 0.35, 0])
    link_end = base + 0.45 * np.array([0, np.cos(0.5), np.sin(0.5)])
    np.testing.assert_allclose(points[0, 5 + 1], link_end, atol=1e-12)
    np.testing.assert_allclose(points[0, 9 + 1], link_end + 0.35 * np.array([0, np.cos(1.5), np.sin(1.5)]), atol=1e-12)
    np.testing.assert_allclose(points[0, 9 + 0], [-0.22 - 0.8 * np.sin(0.3), 0.35 + 0.8 * np.cos(0.3), 0], atol=1e-12)
    np.testing.assert_allclose(points[1, 9 + 1], [1 - 1.15, 2, 3], atol=1e-12)
    np.testing.assert_allclose(points[1, 9 + 3], [1 + 1.15, 2, 3], atol=1e-12)


def test_quaternion_round_trip():
    rotations = random_rotations(np.random.default_rng(8), 200)
    q = matrix_to_quaternion(rotations)
    assert (q[:, 3] >= 0).all()
    np.testing.assert_allclose(quaternion_to_matrix(q), rotations, atol=1e-12)


@pytest.fixture(scope="module")
def scenes():
    return [synth.make_scene(0, i, grid=32, num_grasps=96) for i in range(12)]


def test_scene_arrays_and_ranges(scenes):
    for s in scenes:
        assert set(s) == KEYS
        assert all(v.dtype == np.float32 for v in s.values())
        assert s["sdf"].shape == (32, 32, 32) and s["grasps"].shape == (96, 19)
        assert s["scores"].shape == (96,) and s["translation"].shape == (3,)
        assert s["global_scale"].shape == () and s["global_scale"] > 0
        g = s["grasps"]
        assert (np.abs(g[:, :2]) < 2.5).all() and (g[:, 2] >= -0.3).all() and (g[:, 2] < 2.5).all()
        joints = g[:, 7:].reshape(-1, 4, 3)
        assert (joints >= hand.JOINT_LIMITS[:, 0] - 1e-6).all()
        assert (joints <= hand.JOINT_LIMITS[:, 1] + 1e-6).all()
        # Labels are the documented function of the stored arrays.
        np.testing.assert_array_equal(synth.score_grasps(s["sdf"], s["grasps"]), s["scores"])
    a, b = synth.make_scene(0, 3, grid=32, num_grasps=96), scenes[3]
    assert all(np.array_equal(a[k], b[k]) for k in KEYS)


def test_score_distribution_is_seed_like(scenes):
    scores = np.concatenate([s["scores"] for s in scenes])
    assert 2.5 < scores.mean() < 8 and 3 < scores.std() < 11
    assert -2.5 < scores.min() < 0 and 20 < scores.max() < 60
    assert np.median(scores) < scores.mean()  # long right tail
    terms = score.score_terms(scenes[0]["sdf"], scenes[0]["grasps"])
    np.testing.assert_allclose(sum(terms.values()), scenes[0]["scores"], rtol=1e-6, atol=1e-5)


def test_same_grasps_score_differently_on_another_object(scenes):
    own = scenes[0]["scores"]
    other = synth.score_grasps(scenes[1]["sdf"], scenes[0]["grasps"])
    assert np.mean(np.abs(own - other)) > 1.0
    assert np.corrcoef(own, other)[0, 1] < 0.5


def test_moving_a_touching_grasp_away_or_into_the_object_raises_its_score(scenes):
    for s in scenes[:6]:
        best = s["grasps"][np.argmin(s["scores"])].astype(np.float64)
        palm = best[None, :3]
        outward = score.normals(s["sdf"], palm)[0]  # from the palm to its nearest surface point
        clearance = score.interpolate(s["sdf"], palm)[0]
        moved = np.repeat(best[None], 3, axis=0)
        moved[1, :3] += 0.3 * outward  # pulled away
        moved[2, :3] -= (clearance + 0.1) * outward  # pushed in until the palm is ~0.1 inside
        base, away, into = synth.score_grasps(s["sdf"], moved)
        assert base < 1 and away > base + 0.5 and into > base + 1  # 0.5: the draws change with the grid


def _run_cli(*args):
    return CliRunner().invoke(load_tool("make_scenes.py").main, [str(a) for a in args])


def test_cli_writes_seed_layout_identically_for_any_worker_count(tmp_path):
    common = ["--scenes", 5, "--grid", 16, "--grasps-per-scene", 24, "--seed", 3]
    one = _run_cli(*common, "--out", tmp_path / "one", "--workers", 1)
    two = _run_cli(*common, "--out", tmp_path / "two", "--workers", 2)
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert "scenes/s" in one.stdout and "mean" in one.stdout
    names = sorted(p.name for p in (tmp_path / "one").iterdir() if p.name != RECORD)
    assert names == [synth.scene_name(i) for i in range(5)] == [f"scene_{i:06d}" for i in range(5)]
    for name in names:
        first = (tmp_path / "one" / name / "scene.npz").read_bytes()
        assert first == (tmp_path / "two" / name / "scene.npz").read_bytes()
        with np.load(tmp_path / "one" / name / "scene.npz") as data:
            assert set(data.files) == KEYS
            assert data["sdf"].shape == (16, 16, 16) and data["grasps"].shape == (24, 19)
            assert all(data[k].dtype == np.float32 for k in KEYS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no temporary leftovers


def test_cli_writes_the_seeds_compressed_npz_unless_uncompressed(tmp_path):
    common = ["--scenes", 2, "--grid", 16, "--grasps-per-scene", 24, "--workers", 1]
    assert _run_cli(*common, "--out", tmp_path / "z").exit_code == 0
    assert _run_cli(*common, "--out", tmp_path / "raw", "--uncompressed").exit_code == 0
    for kind, method in (("z", zipfile.ZIP_DEFLATED), ("raw", zipfile.ZIP_STORED)):
        path = tmp_path / kind / synth.scene_name(1) / "scene.npz"
        with zipfile.ZipFile(path) as archive:
            assert {i.compress_type for i in archive.infolist()} == {method}
    with (
        np.load(tmp_path / "z" / synth.scene_name(1) / "scene.npz") as z,
        np.load(tmp_path / "raw" / synth.scene_name(1) / "scene.npz") as raw,
    ):
        assert all(np.array_equal(z[k], raw[k]) for k in KEYS)
    assert (tmp_path / "z" / synth.scene_name(1) / "scene.npz").stat().st_size < (
        tmp_path / "raw" / synth.scene_name(1) / "scene.npz"
    ).stat().st_size


def test_grid_is_the_seeds_and_interpolation_is_exact_at_voxels():
    # Voxel i sits at -1 + 2i/n (mesh2sdf's grid), indexed sdf[x, y, z].
    np.testing.assert_allclose(grid_axis(48), -1 + 2 * np.arange(48) / 48, atol=1e-7)
    prim = Primitive("sphere", np.array([0.3, -0.2, 0.1]), np.eye(3), (0.4,))
    sdf = sample_grid([prim], 16)
    a = grid_axis(16).astype(np.float64)
    i, j, k = np.meshgrid(np.arange(16), np.arange(16), np.arange(16), indexing="ij")
    points = np.stack([a[i], a[j], a[k]], -1)
    np.testing.assert_allclose(score.interpolate(sdf, points), sdf, atol=1e-6)
    expected = np.linalg.norm(points - [0.3, -0.2, 0.1], axis=-1) - 0.4
    np.testing.assert_allclose(sdf, expected, atol=1e-6)
    # Between voxels the interpolant stays within a quarter spacing of the true distance (the kink at
    # the centre costs most); a half-spacing shift of the grid would break this.
    pts = np.random.default_rng(0).uniform(-1, 1 - 2 / 16, (500, 3))
    err = score.interpolate(sdf, pts) - (np.linalg.norm(pts - [0.3, -0.2, 0.1], axis=-1) - 0.4)
    assert np.abs(err).max() < 0.25 * 2 / 16


@pytest.mark.parametrize(
    "args,message",
    [
        (["--scenes", 0], "scenes must be an integer >= 1"),
        (["--scenes", 2, "--grid", 40], "multiple of 16"),
        (["--scenes", 2, "--grasps-per-scene", -1], "grasps_per_scene"),
        (["--scenes", 2, "--workers", 0], "workers"),
    ],
    ids=["scenes-0", "grid-40", "grasps-negative", "workers-0"],
)
def test_cli_rejects_bad_arguments(tmp_path, args, message):
    result = _run_cli(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not any(tmp_path.iterdir())


def test_cli_rejects_unwritable_and_non_empty_outputs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = _run_cli("--scenes", 1, "--grid", 16, "--out", blocker / "sub" / "out")
    assert result.exit_code == 2 and "is not a directory" in result.stderr
    assert not (blocker.parent / "sub").exists()

    out = tmp_path / "out"
    assert _run_cli("--scenes", 2, "--grid", 16, "--grasps-per-scene", 8, "--out", out).exit_code == 0
    again = _run_cli("--scenes", 1, "--grid", 16, "--grasps-per-scene", 8, "--out", out)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    replaced = _run_cli("--scenes", 1, "--grid", 16, "--grasps-per-scene", 8, "--out", out, "--overwrite")
    assert replaced.exit_code == 0 and sorted(p.name for p in out.iterdir()) == [RECORD, "scene_000000"]

    (out / "notes.txt").write_text("mine")
    refused = _run_cli("--scenes", 1, "--grid", 16, "--out", out, "--overwrite")
    assert refused.exit_code == 2 and "notes.txt" in refused.stderr and (out / "notes.txt").exists()


def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    real = writer.make_scene

    def failing(seed, index, grid, num_grasps):
        if index == 2:
            raise RuntimeError("boom")
        return real(seed, index, grid, num_grasps)

    monkeypatch.setattr(writer, "make_scene", failing)
    with pytest.raises(RuntimeError, match="boom"):
        synth.write_scenes(tmp_path / "new" / "out", 4, grasps_per_scene=8, grid=16, workers=1, progress=False)
    assert not any(tmp_path.iterdir())


def test_cli_help():
    result = _run_cli("--help")
    assert result.exit_code == 0 and "--grasps-per-scene" in result.output and "--overwrite" in result.output
