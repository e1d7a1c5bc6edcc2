"""Rotation augmentation: the 24 rotations form a group, turn SDFs and grasps exactly, keep labels, and the loaders
apply them identically (and not at all when off)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gq.common.rotations import quaternion_to_matrix
from gq.pipeline import LoaderError, open_loader
from gq.pipeline.augment import QUATERNIONS, ROTATIONS, draw_rotations, turn_grasps
from gq.shards import GRASP_DIM, SCORE_COLUMN, ShardReader
from gq.synth import forward_kinematics, make_scene, score_grasps
from gq.train import FitConfig, fit
from gq.train.checkpoint import load_checkpoint
from gq.train.config import ConfigError

GRID = 16
MATRICES = np.stack([r.matrix for r in ROTATIONS])


def _index(matrix: np.ndarray) -> int:
    (found,) = [k for k, m in enumerate(MATRICES) if np.array_equal(m, matrix)]
    return found


def _turn(grid: np.ndarray, k: int) -> np.ndarray:
    return ROTATIONS[k].turn_grid(torch.from_numpy(grid)).numpy()


def test_the_24_rotations_are_the_proper_rotations_of_the_cube_and_form_a_group() -> None:
    assert len(ROTATIONS) == 24 and len({m.tobytes() for m in MATRICES}) == 24
    assert all(round(np.linalg.det(m)) == 1 for m in MATRICES) and np.array_equal(MATRICES[0], np.eye(3))
    offsets = np.stack([r.offset(GRID) for r in ROTATIONS])
    grid = np.random.default_rng(0).normal(size=(GRID,) * 3)
    for k1 in range(24):
        inverse = _index(MATRICES[k1].T)  # every element's inverse is in the set
        assert np.array_equal(_turn(_turn(grid, k1), inverse), grid)
        for k2 in range(24):
            k = _index(MATRICES[k2] @ MATRICES[k1])  # closed under composition ...
            # ... as maps of points about the grid's own centre (offsets included) and as maps of grids
            np.testing.assert_allclose(MATRICES[k2] @ offsets[k1] + offsets[k2], offsets[k], atol=1e-15)
            assert np.array_equal(_turn(_turn(grid, k1), k2), _turn(grid, k))
    np.testing.assert_allclose(quaternion_to_matrix(QUATERNIONS), MATRICES, atol=1e-15)


def _sphere(centre: np.ndarray, radius: float = 0.4) -> np.ndarray:
    """The exact SDF of a sphere sampled at the grid's voxel positions (voxel i at -1 + 2i/N)."""
    axis = -1 + 2 * np.arange(GRID) / GRID
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)
    return np.linalg.norm(points - centre, axis=-1) - radius


def test_a_turned_sphere_grid_is_the_grid_of_the_turned_sphere() -> None:
    centre = np.array([0.3, -0.2, 0.45])  # off the centre, so every axis's flip and swap shows
    sdf = _sphere(centre)
    for rotation in ROTATIONS:
        turned = rotation.turn_grid(torch.from_numpy(sdf)).numpy()
        np.testing.assert_allclose(turned, _sphere(rotation.matrix @ centre + rotation.offset(GRID)), atol=1e-12)
        if rotation.flipped:  # about 0 (voxel centres' symmetry) instead of the grid's own centre: a voxel off
            assert not np.allclose(turned, _sphere(rotation.matrix @ centre), atol=1e-3)


def test_turned_grasps_put_every_control_point_where_the_grid_moved_it() -> None:
    scene = make_scene(1, 0, grid=GRID, num_grasps=32)
    grasps = torch.from_numpy(scene["grasps"])
    points = forward_kinematics(scene["grasps"])
    for k, rotation in enumerate(ROTATIONS):
        turned = turn_grasps(grasps, torch.full((len(grasps),), k), GRID).numpy()
        assert turned.dtype == np.float32 and np.array_equal(turned[:, 7:], scene["grasps"][:, 7:])
        assert (turned[:, 6] >= 0).all()  # the w >= 0 hemisphere of the generated grasps
        expected = points @ rotation.matrix.T + rotation.offset(GRID)
        np.testing.assert_allclose(forward_kinematics(turned), expected, atol=2e-6)


@pytest.mark.parametrize("index", [0, 1])
def test_the_labeller_gives_the_same_scores_for_all_24_rotations(index: int) -> None:
    scene = make_scene(2, index, grid=GRID, num_grasps=96)
    sdf, grasps = scene["sdf"], torch.from_numpy(scene["grasps"])
    assert np.array_equal(score_grasps(sdf, scene["grasps"]), scene["scores"])
    for k in range(24):
        turned = turn_grasps(grasps, torch.full((len(grasps),), k), GRID).numpy()
        scores = score_grasps(np.ascontiguousarray(_turn(sdf, k)), turned)
        np.testing.assert_allclose(scores, scene["scores"], rtol=1e-5, atol=1e-5)


def test_rotations_are_drawn_evenly_and_from_every_key() -> None:
    scenes, slots = np.arange(48_000) // 4, np.arange(48_000) % 4 * 7
    drawn = draw_rotations(3, 1, scenes, slots)
    assert np.array_equal(drawn, draw_rotations(3, 1, scenes, slots))  # no state: the same keys, the same draws
    assert np.bincount(drawn, minlength=24).min() > 1_800  # 2,000 expected each
    for other in (draw_rotations(4, 1, scenes, slots), draw_rotations(3, 2, scenes, slots),
                  draw_rotations(3, 1, scenes + 1, slots), draw_rotations(3, 1, scenes, slots + 1)):  # fmt: skip
        assert (other != drawn).mean() > 0.9


@pytest.fixture(scope="module")
def dataset(shared_dataset) -> Path:
    """test_pipeline's dataset: 26 scenes of 3..24 grasps on a 16^3 grid, 4 records per shard."""
    return shared_dataset(26, grid=GRID, grasps=(3, 24), seed=3, records_per_shard=4, val_fraction=0.2, test_fraction=0)


def _expected_batches(loader) -> list[dict[str, np.ndarray]]:
    """The loader's epoch rebuilt from its plan and the shard files with numpy, turned as the plan's rotations say:
    the SDFs by numpy's transpose and flips, the grasps by the formulas of pipeline/augment.py in float64."""
    reader, plan = ShardReader(loader.dataset.root), loader.plan()
    sdf = {k: np.load(reader.sdf_path(k), mmap_mode="r") for k in np.unique(plan.group_shard)}
    labels = {k: np.load(reader.labels_path(k), mmap_mode="r") for k in np.unique(plan.group_shard)}
    turns = np.zeros(len(plan.group_scene), dtype=np.int64)
    if loader.spec.augment == "rot24":
        turns = draw_rotations(loader.spec.seed, plan.epoch, plan.group_scene, plan.slots[plan.group_start[:-1]])
    batches = []
    for b in range(len(plan)):
        grids, rows, scene_of_grasp = [], [], []
        for i, g in enumerate(range(*plan.groups(b))):
            r = ROTATIONS[turns[g]]
            grid = np.transpose(sdf[plan.group_shard[g]][plan.group_slot[g]], r.perm)
            grids.append(np.flip(grid, r.flipped).astype(np.float32))
            lab = labels[plan.group_shard[g]][plan.group_slot[g]][
                plan.slots[plan.group_start[g] : plan.group_start[g + 1]]
            ]
            grasps = lab[:, :GRASP_DIM].astype(np.float64)
            if turns[g]:
                grasps[:, :3] = grasps[:, :3] @ r.matrix.T + r.offset(GRID)
                grasps[:, 3:7] = _times(QUATERNIONS[turns[g]], grasps[:, 3:7])
            rows.append(np.concatenate([grasps, lab[:, SCORE_COLUMN : SCORE_COLUMN + 1]], 1))
            scene_of_grasp += [i] * len(lab)
        lab = np.concatenate(rows)
        scenes = plan.group_scene[slice(*plan.groups(b))]
        batches.append({"sdf": np.stack(grids)[:, None], "grasps": lab[:, :GRASP_DIM], "scores": lab[:, -1],
                        "scene_of_grasp": np.array(scene_of_grasp), "scene_ids": scenes})  # fmt: skip
    return batches


def _times(r: np.ndarray, q: np.ndarray) -> np.ndarray:
    """r * q (xyzw) as a 4x4 matrix product (r's left-multiplication matrix), in the hemisphere of q's w."""
    x, y, z, w = r
    left = np.array([[w, -z, y, x], [z, w, -x, y], [-y, x, w, z], [-x, -y, -z, w]])
    out = q @ left.T
    return np.where((out[:, 3:] < 0) != (q[:, 3:] < 0), -out, out)


@pytest.mark.parametrize("augment", ["off", "rot24"])
def test_batches_are_the_stored_records_turned_as_drawn(dataset: Path, augment: str) -> None:
    with open_loader(dataset, scenes_per_batch=3, grasps_per_sdf=5, seed=4, augment=augment, progress=False) as loader:
        loader.set_epoch(2)
        expected = _expected_batches(loader)
        got = list(loader)
    assert len(got) == len(expected)
    for batch, want in zip(got, expected):
        # off: every field bit for bit as stored (the batches of the loader before augmentation existed);
        # rot24: the SDFs still bit for bit (re-indexed), the grasps to float32 rounding
        assert np.array_equal(batch.sdf.numpy(), want["sdf"])
        for key in ("scores", "scene_of_grasp", "scene_ids"):
            assert np.array_equal(getattr(batch, key).numpy(), want[key])
        if augment == "off":
            assert np.array_equal(batch.grasps.numpy(), want["grasps"].astype(np.float32))
        else:
            np.testing.assert_allclose(batch.grasps.numpy(), want["grasps"], atol=1e-6)


def _same(x, y) -> bool:
    return all(
        torch.equal(getattr(x, f), getattr(y, f)) for f in ("sdf", "grasps", "scores", "scene_of_grasp", "scene_ids")
    )


def test_cache_and_dali_turn_every_batch_identically_and_resume_exactly(dataset: Path) -> None:
    kwargs = dict(scenes_per_batch=4, grasps_per_sdf=3, seed=5, shuffle_window=2, augment="rot24")
    with (
        open_loader(dataset, mode="cache", progress=False, **kwargs) as cache,
        open_loader(dataset, mode="dali", **kwargs) as dali,
        open_loader(dataset, mode="cache", progress=False, **{**kwargs, "augment": "off"}) as plain,
    ):
        for epoch in (0, 1):
            for loader in (cache, dali, plain):
                loader.set_epoch(epoch)
            a, b, c = list(cache), list(dali), list(plain)
            assert len(a) == len(b) == len(c) and all(_same(x, y) for x, y in zip(a, b))
            turned = [not torch.equal(x.sdf, y.sdf) for x, y in zip(a, c)]
            assert sum(turned) >= len(turned) // 2  # most batches hold a turned scene (1 in 24 is the identity)
        cache.set_epoch(1)
        it = iter(cache)
        for _ in range(3):
            next(it)
        state = json.loads(json.dumps(cache.state_dict()))
    with open_loader(dataset, mode="dali", **kwargs) as again:
        again.load_state_dict(state)
        assert all(_same(x, y) for x, y in zip(list(again), a[3:], strict=True))


def test_an_unknown_augmentation_is_refused(dataset: Path) -> None:
    with pytest.raises(LoaderError, match="augment 'rot90': choose one of off, rot24"):
        open_loader(dataset, augment="rot90")


def _fit(dataset: Path, out: Path, **options) -> dict:
    small = dict(base_channels=4, fc_dims=(32, 16), threads=1, progress=False, scenes_per_batch=3, grasps_per_sdf=4)
    return fit(FitConfig(shards=str(dataset), out=str(out), **{**small, "augment": "rot24", **options}))


def test_fit_with_rot24_resumes_to_the_same_weights_and_refuses_another_augmentation(dataset: Path, tmp_path) -> None:
    straight = _fit(dataset, tmp_path / "straight", max_steps=8, ckpt_every=4)
    options = json.loads((tmp_path / "straight" / "config.json").read_text())["options"]
    assert straight["augment"] == options["augment"] == "rot24"
    _fit(dataset, tmp_path / "halves", max_steps=4)
    with pytest.raises(ConfigError, match=r"--augment off \(the run: rot24\)"):
        _fit(dataset, tmp_path / "halves", max_steps=8, resume=True, augment="off")
    _fit(dataset, tmp_path / "halves", max_steps=8, resume=True)
    a, b = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("straight", "halves"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_rest_of_an_epoch_on_another_world_size_turns_each_group_as_drawn(dataset: Path) -> None:
    kwargs = dict(scenes_per_batch=2, grasps_per_sdf=5, seed=6, augment="rot24", progress=False)
    with open_loader(dataset, rank=0, world_size=2, drop_last=True, **kwargs) as first:
        it = iter(first)
        for _ in range(2):
            next(it)
        state = first.state_dict()
    with open_loader(dataset, **kwargs) as rest:
        rest.load_state_dict(state)
        assert rest.past  # the rest of the epoch begun on two ranks
        expected = _expected_batches(rest)  # from its plan's groups: their scenes and first grasp slots
        got = list(rest)
    assert len(got) == len(expected) > 0
    for batch, want in zip(got, expected):
        assert np.array_equal(batch.sdf.numpy(), want["sdf"])
        np.testing.assert_allclose(batch.grasps.numpy(), want["grasps"], atol=1e-6)
