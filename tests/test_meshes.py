"""The seed's mesh-to-SDF import (meshes, tools/import_meshes.py) on meshes the tests make (trimesh primitives)."""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

trimesh = pytest.importorskip("trimesh")
mesh2sdf = pytest.importorskip("mesh2sdf")

from helpers import REPO, run_tool, tree_bytes, without_modules  # noqa: E402

from gq.common.ownership import RECORD  # noqa: E402
from gq.meshes import ImportOptions, MeshError, import_meshes, is_closed, mesh_sdf  # noqa: E402
from gq.synth import score_grasps  # noqa: E402
from gq.synth.primitives import Primitive, sample_grid  # noqa: E402

GRID = 32


def _box(extents, centre=(0, 0, 0)) -> trimesh.Trimesh:
    return trimesh.creation.box(extents=extents, transform=trimesh.transformations.translation_matrix(centre))


def _open_box() -> trimesh.Trimesh:
    box = _box((1.0, 0.6, 0.8))
    box.update_faces(np.arange(2, len(box.faces)))  # one side removed: a hole of 1.0 x 0.8
    return box


def _raw_scene(raw: Path, name: str, mesh, grasps=None, scores=None, **extra) -> Path:
    """RAW/name/mesh.obj, and recording.npz when `grasps` (or `extra` arrays) are given."""
    (raw / name).mkdir(parents=True)
    mesh.export(raw / name / "mesh.obj")
    if grasps is not None or extra:
        arrays = {k: v for k, v in (("grasps", grasps), ("scores", scores)) if v is not None}
        np.savez(raw / name / "recording.npz", **arrays, **extra)
    return raw / name


def test_sphere_and_box_sdf_match_the_analytic_sdf_on_the_seeds_grid():
    # Tolerances: a box is represented exactly (1e-5); a sphere (icosphere, 5 subdivisions) within
    # 0.005 anywhere, an eighth of a voxel at 48^3, from its facets and mesh2sdf's distance sweep.
    centre = np.array([0.2, -0.1, 0.05])
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    sphere.apply_translation(centre)
    exact = sample_grid([Primitive("sphere", centre, np.eye(3), (0.5,))], 48)
    assert np.abs(mesh_sdf(sphere.vertices, sphere.faces, 48) - exact).max() < 0.005
    box = _box((1.0, 0.6, 0.8), centre)
    exact = sample_grid([Primitive("box", centre, np.eye(3), (0.5, 0.3, 0.4))], 48)
    assert np.abs(mesh_sdf(box.vertices, box.faces, 48) - exact).max() < 1e-5
    # Cell centres (a half-voxel shift) would be off by far more than the tolerance.
    c = -1 + (np.arange(48) + 0.5) * 2 / 48
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    centred = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) - 0.5
    assert np.abs(mesh_sdf(sphere.vertices, sphere.faces, 48) - centred).max() > 0.03


def test_closure_is_tested_not_only_signs():
    box, hole = _box((1.0, 0.6, 0.8)), _open_box()
    assert is_closed(box) and not is_closed(hole)
    assert (mesh2sdf.compute(hole.vertices, hole.faces, size=GRID) < 0).any()  # signs alone would pass it
    # Unmerged vertices (texture seams) do not open a surface.
    soup = trimesh.Trimesh(box.vertices[box.faces].reshape(-1, 3), np.arange(36).reshape(12, 3), process=False)
    assert not soup.is_watertight and is_closed(soup)
    with pytest.raises(ValueError, match="not closed"):
        mesh_sdf(hole.vertices, hole.faces, GRID, closed=False)


def test_winding_sign_recovers_the_closed_signs_of_an_open_box():
    box, hole = _box((1.0, 0.6, 0.8)), _open_box()
    closed = mesh_sdf(box.vertices, box.faces, GRID)
    sdf = mesh_sdf(hole.vertices, hole.faces, GRID, closed=False, open_meshes="winding")
    assert sdf.dtype == np.float32 and sdf.shape == (GRID,) * 3
    assert np.mean(np.sign(sdf) == np.sign(closed)) > 0.98
    # mesh2sdf's own repair (fix=True) cannot close a hole this wide: it wraps a shell through it,
    # so the box's inside comes out positive (why the measurements in docs/benchmarks.md pick "winding").
    repaired = mesh_sdf(hole.vertices, hole.faces, GRID, closed=False, open_meshes="repair")
    assert repaired.shape == (GRID,) * 3 and repaired[GRID // 2, GRID // 2, GRID // 2] > 0


def test_seed_scale_translation_and_grasp_transform(tmp_path: Path):
    raw, rng = tmp_path / "raw", np.random.default_rng(0)
    grasps = rng.uniform(-1, 1, (7, 19)).astype(np.float32)
    scores = rng.normal(size=7).astype(np.float32)
    _raw_scene(raw, "a", _box((2.0, 1.0, 1.0), (5.0, 5.0, 5.0)), grasps, scores, fk_loss=np.zeros(7))
    _raw_scene(raw, "b", _box((4.0, 2.0, 1.0), (-1.0, 0.0, 3.0)), grasps[:3], scores[:3])
    summary = import_meshes(raw, tmp_path / "out", ImportOptions(grid=GRID), workers=1, progress=False)
    assert summary["imported"] == 2 and summary["mesh_max_extent"] == 4.0 and summary["global_scale"] == 0.5
    assert float((tmp_path / "out" / "mesh_max_extent.txt").read_text()) == 4.0
    path = tmp_path / "out" / "a" / "scene.npz"
    with zipfile.ZipFile(path) as archive:  # np.savez_compressed's format, as the seed writes
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    with np.load(path) as z:
        assert sorted(z.files) == ["global_scale", "grasps", "scores", "sdf", "translation"]
        np.testing.assert_array_equal(z["translation"], [5.0, 5.0, 5.0])
        assert z["global_scale"] == 0.5 and z["sdf"].dtype == np.float32 and z["sdf"].shape == (GRID,) * 3
        np.testing.assert_allclose(z["grasps"][:, :3], (grasps[:, :3] - 5.0) * 0.5, rtol=1e-6)
        np.testing.assert_array_equal(z["grasps"][:, 3:], grasps[:, 3:])
        np.testing.assert_array_equal(z["scores"], scores)
        box = _box((2.0, 1.0, 1.0), (5.0, 5.0, 5.0))
        expected = mesh2sdf.compute((box.vertices - 5.0) * 0.5, box.faces, size=GRID, fix=False, level=2 / GRID)
        np.testing.assert_array_equal(z["sdf"], expected.astype(np.float32))
        # the half-size box (extent 2 of 4) fills half the cube: [-0.5, 0.5] x [-0.25, 0.25]^2
        exact = sample_grid([Primitive("box", np.zeros(3), np.eye(3), (0.5, 0.25, 0.25))], GRID)
        assert np.abs(z["sdf"] - exact).max() < 1e-5
    # --mesh-max-extent overrides the dataset's own scale; a mesh larger than it is refused.
    summary = import_meshes(
        raw, tmp_path / "out8", ImportOptions(grid=GRID, mesh_max_extent=8.0), workers=1, progress=False
    )
    assert summary["global_scale"] == 0.25
    with pytest.raises(MeshError, match="exceeds the mesh max extent"):
        import_meshes(raw, tmp_path / "out3", ImportOptions(grid=GRID, mesh_max_extent=3.0), workers=1, progress=False)
    assert not (tmp_path / "out3").exists()


def test_synthetic_labels_same_bytes_for_any_worker_count(tmp_path: Path):
    raw = tmp_path / "raw"
    for i, (shape, extents) in enumerate(
        [("box", (1.0, 0.5, 0.7)), ("box", (0.4, 0.4, 1.2)), ("sphere", 0.4), ("box", (0.3, 0.8, 0.3))]
    ):
        mesh = _box(extents) if shape == "box" else trimesh.creation.icosphere(subdivisions=3, radius=extents)
        _raw_scene(raw, f"obj_{i}", mesh)
    common = ["--grid", GRID, "--label", "synth", "--grasps-per-scene", 40, "--quiet"]
    one = run_tool("import_meshes.py", raw, "--out", tmp_path / "one", "--workers", 1, *common, check=True)
    run_tool("import_meshes.py", raw, "--out", tmp_path / "two", "--workers", 2, *common, check=True)
    assert "imported 4 of 4 scenes" in one.stdout
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")
    with np.load(tmp_path / "one" / "obj_2" / "scene.npz") as z:
        assert z["grasps"].shape == (40, 19)
        np.testing.assert_array_equal(score_grasps(z["sdf"], z["grasps"]), z["scores"])  # our hand model's labels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "raw", "two"]  # no temporary leftovers


def _make_bad(raw: Path, case: str) -> None:
    """Write the bad scene RAW/<case>."""
    box, grasps, scores = _box((1, 1, 1)), np.zeros((5, 19), np.float32), np.zeros(5, np.float32)
    if case in ("empty", "garbage"):
        (raw / case).mkdir(parents=True)
        mesh = b"# no faces\nv 0 0 0\n" if case == "empty" else b"\x00\xff" * 50
        (raw / case / "mesh.obj").write_bytes(mesh)
    elif case == "open":
        _raw_scene(raw, case, _open_box(), grasps, scores)
    elif case == "nokeys":
        _raw_scene(raw, case, box)
        np.savez(raw / case / "recording.npz", grasps=grasps)
    elif case == "shape":
        _raw_scene(raw, case, box, grasps[:, :18], scores)
    elif case == "zero":
        _raw_scene(raw, case, box, grasps[:0], scores[:0])
    elif case in ("grasps_1e39", "scores_1e39"):  # finite in float64, inf as stored (float32)
        big = {"grasps": grasps.astype(np.float64), "scores": scores.astype(np.float64)}
        big[case[:-5]].flat[0] = 1e39
        _raw_scene(raw, case, box, **big)
    elif case == "petabytes":  # headers claiming 3.5 PiB of grasps (and their scores), 64 bytes of data each
        _raw_scene(raw, case, box)
        n = int(3.5 * 2**50) // 76
        with zipfile.ZipFile(raw / case / "recording.npz", "w") as archive:
            for key, shape in (("grasps", (n, 19)), ("scores", (n,))):
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
                archive.writestr(f"{key}.npy", header.getvalue() + bytes(64))
    elif case in ("nan_vertex", "inf_vertex"):  # trimesh drops such a vertex (and its faces) while loading
        _raw_scene(raw, case, box, grasps, scores)
        obj = raw / case / "mesh.obj"
        text = obj.read_text()
        first = text.index("\nv ") + 1
        end = text.index("\n", first)
        obj.write_text(text[:first] + f"v 0.5 {case[:3]} 0.5" + text[end:])
    elif case == "one_point":  # every vertex at one place: no extent to scale by
        _raw_scene(raw, case, trimesh.Trimesh(np.ones((4, 3)), [[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]]))
        np.savez(raw / case / "recording.npz", grasps=grasps, scores=scores)
    else:  # "norec": a mesh without its recording
        _raw_scene(raw, case, box)


@pytest.mark.parametrize(
    "case,message",
    [
        ("empty", "empty mesh"),
        ("garbage", "mesh"),
        ("open", "not closed"),
        ("nokeys", "missing key(s) scores"),
        ("shape", "expected (N, 19)"),
        ("zero", "N = 0"),
        ("norec", "missing recording.npz"),
        ("grasps_1e39", "'grasps' has 1 values that are finite in the file but not as stored (float32"),
        ("scores_1e39", "'scores' has 1 values that are finite in the file but not as stored (float32"),
        ("petabytes", "3,940,649,673,949,144 bytes; it holds 64"),
        ("nan_vertex", "vertex 1 (line 2) has a non-finite coordinate (0.5 nan 0.5)"),
        ("inf_vertex", "vertex 1 (line 2) has a non-finite coordinate (0.5 inf 0.5)"),
        ("one_point", "every vertex is at one point"),
    ],
    ids=[
        "empty",
        "garbage",
        "open",
        "nokeys",
        "shape",
        "zero",
        "norec",
        "grasps_1e39",
        "scores_1e39",
        "petabytes",
        "nan_vertex",
        "inf_vertex",
        "one_point",
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path: Path, case: str, message: str):
    raw = tmp_path / "raw"
    _raw_scene(raw, "good", _box((1, 1, 1)), np.zeros((5, 19), np.float32), np.zeros(5, np.float32))
    _make_bad(raw, case)
    result = run_tool("import_meshes.py", raw, "--out", tmp_path / "out", "--grid", GRID, "--quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(raw / case) in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # nothing half-written
    skipped = run_tool(
        "import_meshes.py", raw, "--out", tmp_path / "out", "--grid", GRID, "--quiet", "--skip-bad", check=True
    )
    assert "imported 1 of 2 scenes" in skipped.stdout
    rows = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == [case] and message in rows[0]["reason"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        RECORD,
        "good",
        "mesh_max_extent.txt",
        "skipped.jsonl",
    ]


def test_open_meshes_option_imports_them(tmp_path: Path):
    raw = tmp_path / "raw"
    _raw_scene(raw, "open", _open_box(), np.zeros((5, 19), np.float32), np.zeros(5, np.float32))
    result = run_tool(
        "import_meshes.py",
        raw,
        "--out",
        tmp_path / "out",
        "--grid",
        GRID,
        "--quiet",
        "--open-meshes",
        "winding",
        check=True,
    )
    assert "1 open meshes signed by --open-meshes winding" in result.stdout
    with np.load(tmp_path / "out" / "open" / "scene.npz") as z:
        assert z["sdf"][GRID // 2, GRID // 2, GRID // 2] < 0  # the box's centre is inside


def test_cli_help_and_bad_options(tmp_path: Path):
    for tool in ("import_meshes.py", "pybullet_objects.py"):
        assert "Usage" in run_tool(tool, "--help", check=True).stdout
    result = run_tool("import_meshes.py", tmp_path / "missing", "--out", tmp_path / "out")
    assert result.returncode == 2 and "not a directory" in result.stderr
    result = run_tool("import_meshes.py", tmp_path, "--out", tmp_path / "out", "--grid", 40)
    assert result.returncode == 2 and "multiple of 16" in result.stderr


def test_pybullet_objects_laid_out_as_raw_scenes(tmp_path: Path):
    pytest.importorskip("pybullet_data")  # the extra's example objects; the CLI says how to install them
    from gq.meshes.pybullet import write_raw

    names = write_raw(tmp_path / "raw", "named", limit=2)
    assert names == ["bunny", "cone"] and all((tmp_path / "raw" / n / "mesh.obj").stat().st_size > 0 for n in names)
    with pytest.raises(ValueError, match="choose random or named"):
        write_raw(tmp_path / "raw", "all")


def test_an_obj_with_a_latin1_comment_loads(tmp_path: Path) -> None:
    """A valid OBJ that is not UTF-8 (a Latin-1 comment) imports; trimesh alone would want charset_normalizer."""
    raw = tmp_path / "raw"
    box = _box((1.0, 0.6, 0.8))
    _raw_scene(raw, "latin1", box, np.zeros((5, 19), np.float32), np.arange(5, dtype=np.float32))
    obj = raw / "latin1" / "mesh.obj"
    obj.write_bytes("# modelé par José, © 2019\n".encode("latin-1") + obj.read_bytes())
    summary = import_meshes(raw, tmp_path / "out", ImportOptions(grid=GRID), workers=1, progress=False)
    assert summary["imported"] == 1 and summary["mesh_max_extent"] == pytest.approx(1.0)


def test_import_caps_workers_at_what_helps(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _raw_scene(raw, "box", _box((1, 1, 1)), np.zeros((5, 19), np.float32), np.zeros(5, np.float32))
    result = run_tool("import_meshes.py", raw, "--out", tmp_path / "out", "--grid", GRID, "--quiet", "--workers", 64)
    assert result.returncode == 0, result.stderr
    assert "--workers 64: using 1, the most that helps" in result.stderr and "with 1 worker(s)" in result.stdout


# -- without the meshes extra: every --help works, a command that needs it is one line naming it ----------------

EXTRA_MODULES = ("trimesh", "mesh2sdf", "igl", "pybullet", "pybullet_data", "scipy")


def without_meshes_extra(module: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return without_modules(EXTRA_MODULES, module, *args, timeout=timeout)


def test_help_works_and_commands_name_the_extra_without_it(tmp_path: Path) -> None:
    for command in (["import-meshes"], ["pybullet-objects"], ["predict"]):
        result = without_meshes_extra("gq.tools.cli", *command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout, result.stderr
    raw = tmp_path / "raw"
    _raw_scene(raw, "box", _box((1, 1, 1)), np.zeros((5, 19), np.float32), np.zeros(5, np.float32))
    np.save(tmp_path / "g.npy", np.zeros((4, 19), np.float32))
    checkpoint = REPO / "tests" / "fixtures" / "seed_gqestimator_c4_fc32-16.pth"
    for command in (
        ["import-meshes", raw, "--out", tmp_path / "out"],
        ["pybullet-objects", "--out", tmp_path / "pb"],
        ["predict", checkpoint, "--mesh", raw / "box" / "mesh.obj", "--grasps", tmp_path / "g.npy"]
        + ["--out", tmp_path / "p.parquet", "--device", "cpu"],
    ):
        result = without_meshes_extra("gq.tools.cli", *command)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert f"{command[0]}: error: " in lines[0] and "pip install 'gq-pipeline[meshes]'" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npy", "raw"]


@pytest.mark.slow  # renders the site: ~20 s
def test_the_command_reference_builds_without_the_meshes_extra(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the docs extra: pip install -e .[docs])")
    result = without_meshes_extra("mkdocs", "build", "--site-dir", tmp_path / "site", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    page = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert 'id="gq-import-meshes"' in page and 'id="gq-pybullet-objects"' in page and "--open-meshes" in page
