"""Random rotations for the object model; the quaternion conventions are common/rotations.py's (xyzw)."""

from __future__ import annotations

import numpy as np

from gq.common.rotations import quaternion_to_matrix


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """n rotation matrices (n, 3, 3) drawn uniformly (a normalised 4-D Gaussian is uniform on S^3)."""
    return quaternion_to_matrix(rng.normal(size=(n, 4)))
