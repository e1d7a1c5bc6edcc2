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
import re
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from helpers import FIXTURES

from gq.models import CheckpointError
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
def trained(shared_dataset, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(scenes, shards, last.pt of a 2-step run on them): the scenes a copy the tests damage copies of beside it."""
    root = tmp_path_factory.mktemp("untrusted")
    shards = shared_dataset(16, grid=GRID, grasps=GRASPS, seed=3, records_per_shard=4, val_fraction=0.25)
    scenes = shutil.copytree(shards.parent / "scenes", root / "scenes")
    result = invoke("fit", "--shards", shards, "--out", root / "run", "--max-steps", 2, *TINY)
    assert result.exit_code == 0, result.stderr
    return scenes, shards, root / "run" / "last.pt"


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


# -- issue 22, item 2: a checkpoint with one flipped bit, or with non-finite values, is never used -----------------


def _entry_holding(path: Path, tensor: torch.Tensor) -> zipfile.ZipInfo:
    """The entry of torch.save's archive `path` that stores `tensor`'s data (torch writes one per storage)."""
    data = tensor.contiguous().numpy().tobytes()
    with zipfile.ZipFile(path) as archive:
        return next(i for i in archive.infolist() if i.file_size == len(data) and archive.read(i) == data)


def _flip_exponent(path: Path, tensor: torch.Tensor, out: Path) -> Path:
    """A copy of checkpoint `path` at `out` with one bit flipped in `tensor`'s stored data: the top exponent bit of
    its first element of magnitude in (0, 1), which makes that value finite and ~1e38 times larger."""
    entry = _entry_holding(path, tensor)
    values = tensor.flatten().numpy()
    element = int(np.flatnonzero((values != 0) & (np.abs(values) < 1))[0])
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    start = entry.header_offset + 30 + name_length + extra_length  # the local header's length: the data follows
    data[start + 4 * element + 3] ^= 0x40  # little-endian float32: byte 3 holds the sign and the top exponent bits
    out.write_bytes(bytes(data))
    return out


def _flipped_best(trained, tmp_path: Path) -> Path:
    """best.pt of the trained run with an exponent bit flipped in a model weight, a file torch loads (finite values)."""
    best = trained[2].parent / "best.pt"
    weight = torch.load(best, weights_only=True)["model"]["conv_block.0.weight"]
    flipped = _flip_exponent(best, weight, tmp_path / "best.pt")
    loaded = torch.load(flipped, weights_only=True)["model"]["conv_block.0.weight"]  # torch takes it as it is
    assert torch.isfinite(loaded).all() and loaded.abs().max() > 1e30
    return flipped


def _refusal(result: Result, path: Path, problem: str) -> None:
    line = one_line(result, 2)
    assert f"{path}: " in line and problem in line, line


CRC = "fails its CRC-32 check"


def test_resume_refuses_a_last_pt_with_a_flipped_bit_in_its_optimizer_state(trained, tmp_path: Path) -> None:
    run = shutil.copytree(trained[2].parent, tmp_path / "run", symlinks=True)
    exp_avg = torch.load(run / "last.pt", weights_only=True)["optimizer"]["state"][0]["exp_avg"]
    damaged = _flip_exponent(run / "last.pt", exp_avg, tmp_path / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(damaged)
    _refusal(invoke("fit", "--out", run, "--resume", "--max-steps", 4), run / "last.pt", CRC)
    assert (run / "last.pt").read_bytes() == damaged  # kept as it was, for the user to judge


def test_resume_refuses_non_finite_optimizer_state(trained, tmp_path: Path) -> None:
    run = shutil.copytree(trained[2].parent, tmp_path / "run", symlinks=True)
    payload = torch.load(run / "last.pt", weights_only=True)
    payload["optimizer"]["state"][1]["exp_avg_sq"].view(-1)[0] = math.inf
    torch.save(payload, run / "last.pt")
    line = one_line(invoke("fit", "--out", run, "--resume", "--max-steps", 4), 2)
    assert f"{run / 'last.pt'}: non-finite value (NaN or inf) in optimizer.state.1.exp_avg_sq" in line


@pytest.mark.parametrize("finished", ["done", 7], ids=["unknown-reason", "a-number"])
def test_resume_refuses_an_edited_stop_reason_in_one_line(trained, tmp_path: Path, finished: object) -> None:
    run = shutil.copytree(trained[2].parent, tmp_path / "run", symlinks=True)
    payload = torch.load(run / "last.pt", weights_only=True)
    payload["state"]["finished"] = finished
    torch.save(payload, run / "last.pt")
    line = one_line(invoke("fit", "--out", run, "--resume", "--max-steps", 4), 2)
    assert f"{run / 'last.pt'}: no valid state" in line


def _use(command: str, ckpt: Path, trained: tuple[Path, Path, Path], tmp_path: Path) -> Result:
    """`ckpt` given to eval, predict or fit --init-from, as a user would."""
    scenes, shards, _ = trained
    if command == "eval":
        return invoke("eval", ckpt, "--shards", shards, "--device", "cpu")
    if command == "predict":
        return invoke("predict", ckpt, "--scenes", scenes, "--out", tmp_path / "p.parquet")
    return invoke("fit", "--shards", shards, "--out", tmp_path / "run", "--init-from", ckpt, *TINY)


@pytest.mark.parametrize("command", ["eval", "predict", "init-from"])
def test_a_checkpoint_with_a_flipped_exponent_bit_is_refused(
    trained, tmp_path: Path, no_scoring: list, command: str
) -> None:
    flipped = _flipped_best(trained, tmp_path)
    _refusal(_use(command, flipped, trained, tmp_path), flipped, CRC)
    assert no_scoring == [] and not (tmp_path / "p.parquet").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_estimator_load_refuses_a_flipped_bit_in_ours_and_in_a_seed_file(trained, tmp_path: Path) -> None:
    flipped = _flipped_best(trained, tmp_path)
    seed = FIXTURES / "seed_gqestimator_c4_fc32-16.pth"
    flipped_seed = _flip_exponent(seed, torch.load(seed, weights_only=True)["gq_head.0.weight"], tmp_path / "s.pth")
    for path in (flipped, flipped_seed):
        with pytest.raises(CheckpointError) as err:
            Estimator.load(path)
        assert str(err.value).startswith(f"{path}: ") and CRC in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("command", ["eval", "predict", "init-from", "Estimator.load"])
def test_non_finite_weights_are_refused(trained, tmp_path: Path, no_scoring: list, command: str) -> None:
    payload = torch.load(trained[2].parent / "best.pt", weights_only=True)
    payload["model"]["gq_head.0.weight"][0, 1] = math.nan
    torch.save(payload, ckpt := tmp_path / "nan.pt")
    problem = "non-finite value (NaN or inf) in model.gq_head.0.weight"
    if command == "Estimator.load":
        with pytest.raises(CheckpointError, match=re.escape(f"{ckpt}: {problem}")):
            Estimator.load(ckpt)
        return
    _refusal(_use(command, ckpt, trained, tmp_path), ckpt, problem)
    assert no_scoring == [] and not (tmp_path / "p.parquet").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_a_checkpoint_saved_without_crcs_still_loads(tmp_path: Path) -> None:
    """torch.save can be told to write no CRC-32s (all zero): such a file has nothing to check, it is not damaged."""
    state_dict = torch.load(FIXTURES / "seed_gqestimator_c4_fc32-16.pth", weights_only=True)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state_dict, tmp_path / "no-crc.pth")
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(tmp_path / "no-crc.pth") as archive:
        assert {i.CRC for i in archive.infolist()} == {0}
    assert Estimator.load(tmp_path / "no-crc.pth").model.config["base_channels"] == 4


# -- issue 22: a model too large to build is refused by its size, before anything is allocated -----------------


def test_fit_refuses_a_model_too_large_to_build(trained, tmp_path: Path) -> None:
    _, shards, _ = trained
    line = one_line(invoke("fit", "--shards", shards, "--out", tmp_path / "run", "-G", 4, "--base-channels", 100000), 2)
    assert "--base-channels 100000: " in line and "parameters" in line and "GiB" in line
    (tmp_path / "big.yaml").write_text("fc_dims: [100000000000]\n")
    config = ["--config", tmp_path / "big.yaml"]
    line = one_line(invoke("fit", "--shards", shards, "--out", tmp_path / "run", "-G", 4, *config), 2)
    assert f"--config {tmp_path / 'big.yaml'}: fc_dims 100000000000: " in line and "parameters" in line


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
