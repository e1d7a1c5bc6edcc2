"""Nothing a checkpoint, a scene file or an option says is used unchecked (issue 17, items 6, 8, 12, 14).

Every case is a one-line refusal with exit code 2, before any work: an edited checkpoint (wrong score
units, a model record that does not match its weights), a damaged or hostile scene.npz or .npy given to
`predict`, an --out folder that does not exist, a --mesh-max-extent or --seed that cannot work.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from helpers import make_dataset

from gq.tools.training import cli
from gq.train.predict import Estimator

GRID, GRASPS = 16, 24
PETABYTE_GRASPS = int(3.5 * 2**50) // 76  # grasps of 19 float32 values in 3.5 PiB
TINY = ["--base-channels", "2", "--fc-dims", "8", "--threads", "1", "--quiet", "-S", "2", "-G", "4"]


def invoke(*args) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="run.py")


def one_line(result: Result, code: int) -> str:
    """The single stderr line of a refused command (an exception, a traceback, would fail here)."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(scenes, shards, last.pt of a 2-step run on them)."""
    root = tmp_path_factory.mktemp("untrusted")
    shards = make_dataset(root, 16, grid=GRID, grasps=GRASPS, seed=3, records_per_shard=4, val_fraction=0.25)
    result = invoke("fit", "--shards", shards, "--out", root / "run", "--max-steps", 2, *TINY)
    assert result.exit_code == 0, result.stderr
    return root / "scenes", shards, root / "run" / "last.pt"


@pytest.fixture
def no_scoring(monkeypatch) -> list:
    """Records every call of Estimator.scores (the prediction work), so a test can say none happened."""
    calls = []
    real = Estimator.scores
    monkeypatch.setattr(Estimator, "scores", lambda self, *a: calls.append(a) or real(self, *a))
    return calls


# -- item 6: a checkpoint is checked like a manifest ----------------------------------------------------------


def _edit(payload: dict, case: str) -> None:
    if case.startswith("std"):
        payload["score_stats"]["std"] = {"std-negative": -6.0, "std-zero": 0.0, "std-nan": math.nan}[case]
    elif case == "no-model-config":
        del payload["model_config"]
    elif case == "kind-huge":
        payload["model_config"]["kind"] = "huge"
    elif case == "base-channels-0":
        payload["model_config"]["base_channels"] = 0
    elif case == "string-model-config":
        payload["model_config"] = "small"


@pytest.mark.parametrize(
    "case,message",
    [
        (
            "std-negative",
            "score_stats: train score statistics mean {mean}, std -6.0: the scores cannot be standardised",
        ),
        ("std-zero", "score_stats: train score statistics mean {mean}, std 0.0: the scores cannot be standardised"),
        ("std-nan", "score_stats: train score statistics mean {mean}, std nan: the scores cannot be standardised"),
        ("no-model-config", "no valid model_config (missing)"),
        ("kind-huge", "no valid model_config.kind ('huge', expected one of small, large)"),
        ("base-channels-0", "no valid model_config.base_channels (0, but the weights are of base_channels 2)"),
        ("string-model-config", "no valid model_config (str 'small', expected dict)"),
    ],
    ids=["std-negative", "std-zero", "std-nan", "no-model-config", "kind-huge", "base-channels-0", "str-model-config"],
)
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_an_edited_checkpoint_is_refused_naming_the_key(
    trained, tmp_path: Path, no_scoring: list, command: str, case: str, message: str
) -> None:
    _, shards, last = trained
    payload = torch.load(last, weights_only=True)
    mean = payload["score_stats"]["mean"]
    _edit(payload, case)
    ckpt = tmp_path / "edited.pt"
    torch.save(payload, ckpt)
    args = ["--out", tmp_path / "p.parquet"] if command == "predict" else []
    line = one_line(invoke(command, ckpt, "--shards", shards, "--split", "val", *args), 2)
    assert line.startswith(f"run.py {command}: error: {ckpt}: ") and message.format(mean=mean) in line
    assert "use another checkpoint" in line
    assert no_scoring == [] and not (tmp_path / "p.parquet").exists()


def test_an_edited_init_from_checkpoint_is_refused_before_training(trained, tmp_path: Path) -> None:
    _, shards, last = trained
    payload = torch.load(last, weights_only=True)
    _edit(payload, "std-negative")
    torch.save(payload, tmp_path / "edited.pt")
    result = invoke("fit", "--shards", shards, "--out", tmp_path / "run", "--init-from", tmp_path / "edited.pt", *TINY)
    assert "std -6.0: the scores cannot be standardised" in one_line(result, 2)
    assert not (tmp_path / "run" / "last.pt").exists()


# -- item 8: predict reads scenes through make_shards' checks, all before the first prediction -------------------


def _damage(scenes: Path, case: str) -> Path:
    """A copy of `scenes` whose last scene (in name order: the others would be scored first) is damaged."""
    copy = scenes.parent / f"scenes-{case}"
    if copy.exists():
        return copy
    os.makedirs(copy)
    for scene in sorted(p for p in scenes.iterdir() if p.is_dir()):  # the scenes, not make_scenes' record
        (copy / scene.name).mkdir()
        (copy / scene.name / "scene.npz").write_bytes((scene / "scene.npz").read_bytes())
    last = copy / sorted(p.name for p in copy.iterdir())[-1] / "scene.npz"
    data = last.read_bytes()
    if case == "truncated":
        last.write_bytes(data[: len(data) // 2])
    elif case == "flipped-byte":
        with zipfile.ZipFile(last) as z:  # a byte in the middle of the sdf member's data
            info = z.getinfo("sdf.npy")
        at = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2
        last.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    elif case in ("string-dtype", "petabyte-header"):
        with np.load(last) as z:
            arrays = {k: z[k] for k in z.files}
        if case == "string-dtype":
            arrays["grasps"] = arrays["grasps"].astype(str)
            np.savez(last, **arrays)
        else:  # a grasps header claiming 3.5 PiB, followed by 64 bytes (no scores: predict's are optional)
            del arrays["grasps"], arrays["scores"]
            np.savez(last, **arrays)
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": "<f4", "fortran_order": False, "shape": (PETABYTE_GRASPS, 19)}
            )
            with zipfile.ZipFile(last, "a") as z:
                z.writestr("grasps.npy", header.getvalue() + bytes(64))
    elif case == "non-utf8-name":
        os.rename(last.parent, os.path.join(os.fsencode(copy), b"scene_\xff"))
    return copy


@pytest.mark.parametrize(
    "case,message",
    [
        ("truncated", "unreadable or corrupt npz (BadZipFile"),
        ("flipped-byte", "unreadable or corrupt npz (BadZipFile: Bad CRC-32 for file 'sdf.npy')"),
        ("string-dtype", "'grasps' has dtype <U"),
        (
            "petabyte-header",
            f"'grasps' claims shape ({PETABYTE_GRASPS}, 19), {PETABYTE_GRASPS * 76:,} bytes; it holds 64",
        ),
        ("non-utf8-name", "scene folder b'scene_\\xff' is not a UTF-8 name"),
    ],
    ids=["truncated", "flipped-byte", "string-dtype", "petabyte-header", "non-utf8-name"],
)
def test_predict_scenes_refuses_a_bad_scene_before_predicting(
    trained, tmp_path: Path, no_scoring: list, case: str, message: str
) -> None:
    scenes, _, ckpt = trained
    damaged = _damage(scenes, case)
    line = one_line(invoke("predict", ckpt, "--scenes", damaged, "--out", tmp_path / "p.parquet"), 2)
    assert message in line and (case == "non-utf8-name" or str(damaged) in line)
    assert no_scoring == [] and not (tmp_path / "p.parquet").exists()


def _box(folder: Path) -> Path:
    trimesh = pytest.importorskip("trimesh")
    pytest.importorskip("mesh2sdf")
    trimesh.creation.box(extents=(0.2, 0.1, 0.3)).export(folder / "box.obj")
    return folder / "box.obj"


def test_predict_mesh_refuses_grasps_that_are_not_numbers(trained, tmp_path: Path, no_scoring: list) -> None:
    _, _, ckpt = trained
    np.save(tmp_path / "g.npy", np.full((4, 19), "0.1"))
    args = ["--mesh", _box(tmp_path), "--grasps", tmp_path / "g.npy", "--out", tmp_path / "p.parquet"]
    line = one_line(invoke("predict", ckpt, *args), 2)
    assert f"{tmp_path / 'g.npy'}: 'grasps' has dtype <U3, expected a floating-point array" in line
    assert no_scoring == [] and not (tmp_path / "p.parquet").exists()


def test_predict_out_in_a_missing_folder_is_refused_before_predicting(trained, tmp_path: Path, no_scoring) -> None:
    scenes, _, ckpt = trained
    out = tmp_path / "no" / "such" / "p.parquet"
    line = one_line(invoke("predict", ckpt, "--scenes", scenes, "--out", out), 2)
    assert f"--out {out}: no folder {out.parent} to write it in" in line
    assert no_scoring == [] and not (tmp_path / "no").exists()


# -- item 12: --mesh-max-extent must be a finite length > 0 ----------------------------------------------------


@pytest.mark.parametrize("extent", ["inf", "0", "nan", "-1"])
def test_predict_refuses_a_mesh_max_extent_that_cannot_scale(trained, tmp_path: Path, extent: str) -> None:
    _, _, ckpt = trained
    np.save(tmp_path / "g.npy", np.zeros((4, 19), np.float32))
    args = ["--mesh", _box(tmp_path), "--grasps", tmp_path / "g.npy", "--mesh-max-extent", extent]
    line = one_line(invoke("predict", ckpt, *args, "--out", tmp_path / "p.parquet"), 2)
    assert f"--mesh-max-extent {float(extent)}: must be a finite length > 0" in line
    assert not (tmp_path / "p.parquet").exists()


# -- item 14: --seed within what torch and NumPy take --------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**70, 2**63, -1])
def test_fit_refuses_a_seed_out_of_range(trained, tmp_path: Path, seed: int) -> None:
    _, shards, _ = trained
    line = one_line(invoke("fit", "--shards", shards, "--out", tmp_path / "run", f"--seed={seed}", *TINY), 2)
    assert f"--seed {seed}: must be an integer from 0 to {2**63 - 1}" in line
    assert not (tmp_path / "run").exists()


def test_fit_takes_the_largest_seed(trained, tmp_path: Path) -> None:
    _, shards, _ = trained
    result = invoke(
        "fit", "--shards", shards, "--out", tmp_path / "run", "--max-steps", 1, f"--seed={2**63 - 1}", *TINY
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1


# -- issue 22: meshes checked before trimesh loads them, configs nested too deeply ----------------------------------


@pytest.mark.parametrize("case", ["nan", "inf", "one_point"])
def test_predict_refuses_a_mesh_with_a_non_finite_vertex_or_no_extent(
    trained, tmp_path: Path, no_scoring: list, case: str
) -> None:
    """trimesh drops a vertex `v 0.1 nan 0.1` (and the faces using it) while loading, so the mesh must be checked
    as written; a mesh whose vertices are all one point has no extent to scale by."""
    _, _, ckpt = trained
    obj = _box(tmp_path)
    lines = obj.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("v "))
    if case == "one_point":
        lines = [("v 0.1 0.1 0.1" if line.startswith("v ") else line) for line in lines]
    else:
        lines[first] = f"v 0.1 {case} 0.1"
    obj.write_text("\n".join(lines) + "\n")
    np.save(tmp_path / "g.npy", np.zeros((4, 19), np.float32))
    args = ["--mesh", obj, "--grasps", tmp_path / "g.npy", "--open-meshes", "winding", "--out", tmp_path / "p.parquet"]
    line = one_line(invoke("predict", ckpt, *args), 2)
    if case == "one_point":
        assert f"{obj}: every vertex is at one point" in line
    else:
        assert f"{obj}: vertex 1 (line {first + 1}) has a non-finite coordinate (0.1 {case} 0.1)" in line
    assert not (tmp_path / "p.parquet").exists() and not no_scoring


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_config_nested_too_deeply_is_one_line(trained, tmp_path: Path, suffix: str) -> None:
    _, shards, _ = trained
    depth = 100_000 if suffix == ".json" else 20_000
    path = tmp_path / f"deep{suffix}"
    path.write_text("[" * depth + "]" * depth)
    line = one_line(invoke("fit", "--config", path, "--shards", shards, "--out", tmp_path / "run"), 2)
    assert f"--config {path}: not valid {suffix[1:].upper()}" in line and "nested too deeply" in line
    assert not (tmp_path / "run").exists()
