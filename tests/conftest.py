"""Shared test helpers: small scene directories in the seed's layout, and running the tools."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


def write_scene(root: Path, name: str, **arrays) -> Path:
    """Write `root/name/scene.npz` the way the seed does (np.savez, uncompressed)."""
    (root / name).mkdir(parents=True, exist_ok=True)
    path = root / name / "scene.npz"
    np.savez(path, **arrays)
    return path


def random_scene(rng: np.random.Generator, grid: int, num_grasps: int) -> dict:
    """A smooth SDF (a sphere at a random centre) with random grasps and scores in seed ranges."""
    axis = np.float32(-1) + np.arange(grid, dtype=np.float32) * np.float32(2 / grid)  # the seed's grid
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    c = rng.uniform(-0.3, 0.3, 3)
    sdf = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) - rng.uniform(0.3, 0.6)
    grasps = rng.uniform(-1, 1, (num_grasps, 19)).astype(np.float32)
    scores = rng.gamma(1.0, 5.0, num_grasps).astype(np.float32) - 1.0
    return {
        "sdf": sdf.astype(np.float32),
        "grasps": grasps,
        "scores": scores,
        "translation": rng.normal(size=3).astype(np.float32),
        "global_scale": np.float32(rng.uniform(0.5, 2)),
    }


def make_source(root: Path, scenes: int, grid: int = 16, grasps: tuple[int, int] = (3, 24), seed: int = 0) -> Path:
    """A processed directory with `scenes` random scenes named scene_000, scene_001, ..."""
    rng = np.random.default_rng(seed)
    for i in range(scenes):
        write_scene(root, f"scene_{i:03d}", **random_scene(rng, grid, int(rng.integers(grasps[0], grasps[1] + 1))))
    return root


def run_tool(script: str, *args, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run `python tools/<script> args...` from the repository root, capturing text output."""
    cmd = [sys.executable, str(REPO / "tools" / script), *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root (relative name -> bytes), for byte-identity checks."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def small_source(tmp_path: Path) -> Path:
    return make_source(tmp_path / "src", scenes=11)
