"""One synthetic scene from (seed, index): a random object, its SDF grid, grasps and their scores.

Each scene draws from its own generator `np.random.default_rng([seed, index])`, so a scene's
content does not depend on which worker makes it or in which order.
"""

from __future__ import annotations

import numpy as np

from gq.common.grasps import SEED_MAX_GRASPS
from gq.common.memory import available_memory

from .grasps import sample_grasps
from .objects import normalise, random_object
from .primitives import sample_grid
from .score import score_grasps

GRID_MULTIPLE = 16  # the seed's CNN halves the grid four times
# Peak memory of making one scene, per voxel: some 13 float32 grids of temporaries at 64^3 and up (measured with
# tracemalloc), rounded up; mesh2sdf and the winding number of an import stay within it too.
BYTES_PER_VOXEL = 64


def check_grid(grid: int) -> None:
    """Raise ValueError unless `grid` is a positive multiple of GRID_MULTIPLE."""
    if not (isinstance(grid, (int, np.integer)) and grid > 0 and grid % GRID_MULTIPLE == 0):
        raise ValueError(
            f"grid must be a positive multiple of {GRID_MULTIPLE} (the CNN pools it "
            f"4 times), got {grid!r}; use e.g. 32, 48 or 64"
        )


def check_grid_memory(grid: int, workers: int) -> None:
    """Raise ValueError, naming --grid and the bytes, when `workers` processes making scenes of `grid`^3 voxels
    at once would need more memory than the machine has available (checked before any is allocated)."""
    needed, available = grid**3 * BYTES_PER_VOXEL * workers, available_memory()
    if needed > available:
        raise ValueError(
            f"--grid {grid}: {workers} worker(s) making scenes of {grid}^3 voxels need about {needed:,} bytes of "
            f"memory, more than the {available:,} available; choose a smaller --grid or fewer --workers"
        )


def check_int(name: str, value: int, minimum: int) -> None:
    """Raise ValueError unless `value` is an integer >= `minimum`."""
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def make_scene(seed: int, index: int, grid: int = 48, num_grasps: int = SEED_MAX_GRASPS) -> dict[str, np.ndarray]:
    """The scene `index` of the dataset `seed`, as the seed's scene.npz arrays (all float32).

    Keys: `sdf` (grid, grid, grid), `grasps` (num_grasps, 19), `scores` (num_grasps,),
    `translation` (3,), `global_scale` () (see synth.objects for the normalisation).
    Scores are computed from the float32 grasps and grid that are returned, so re-scoring the
    stored arrays with synth.score.score_grasps gives the stored scores.
    """
    check_grid(grid)
    check_int("num_grasps", num_grasps, 1)
    check_int("seed", seed, 0)
    check_int("index", index, 0)
    rng = np.random.default_rng([seed, index])
    prims, translation, global_scale = normalise(random_object(rng))
    sdf = sample_grid(prims, grid)
    grasps = sample_grasps(sdf, rng, num_grasps).astype(np.float32)
    return {
        "sdf": sdf,
        "grasps": grasps,
        "scores": score_grasps(sdf, grasps),
        "translation": translation.astype(np.float32),
        "global_scale": np.float32(global_scale).reshape(()),
    }
