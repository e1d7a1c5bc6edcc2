"""Grasp sampling around an object's surface, in the seed's 19-value layout.

Like a grasp planner's raw proposals: the palm is put at a random standoff outside a random
surface point, facing roughly along the inward normal with a random roll; then half of the
hands close each finger until its tip meets the surface (plus a little noise) and the others
close by a random amount (one synergy plus per-finger noise). Short standoffs collide, good ones
touch, far or open ones miss, as in real grasp datasets. Palms below TABLE_Z are rejected (the
object rests on a table), which keeps palm z in the seed's range.
"""

from __future__ import annotations

import numpy as np

from gq.common.grasps import GRASP_DIM
from gq.common.rotations import matrix_to_quaternion

from .hand import JOINT_LIMITS, TIPS, forward_kinematics
from .primitives import grid_axis
from .score import interpolate, normals

TABLE_Z = -0.3
STANDOFF = (-0.1, 0.6)  # palm distance from the surface for most grasps
FAR_STANDOFF = (0.6, 1.3)  # for FAR_FRACTION of them: hands that clearly miss
FAR_FRACTION = 0.15
POSITION_JITTER = 0.05
APPROACH_JITTER = 0.3  # std of the Gaussian added to the unit inward normal
CLOSURE_JITTER = (0.1, 0.15)  # per-finger std around the hand's closure: proximal, distal
PLANNED_FRACTION = 0.5  # grasps whose fingers are closed onto the surface; the rest at random
CLOSURE_STEPS = 12
CONTACT_JITTER = 0.02
ABDUCTION_STD = 0.2
MAX_ROUNDS = 50


def _palm_poses(sdf: np.ndarray, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` candidate palm positions (count, 3) and quaternions (count, 4), before the table cut."""
    grid = sdf.shape[0]
    band = np.flatnonzero(np.abs(sdf) < 2.0 / grid)  # voxels within one spacing of the surface
    ijk = np.stack(np.unravel_index(rng.choice(band, count), sdf.shape), -1)
    cells = grid_axis(grid)[ijk].astype(np.float64)
    outward = normals(sdf, cells)
    surface = cells - interpolate(sdf, cells)[:, None] * outward
    far = rng.random(count) < FAR_FRACTION
    standoff = np.where(far, rng.uniform(*FAR_STANDOFF, count), rng.uniform(*STANDOFF, count))
    position = surface + standoff[:, None] * outward + rng.normal(0, POSITION_JITTER, (count, 3))

    # Palm frame: +z (approach) roughly inward, x from a random vector (uniform roll about z).
    approach = -outward + rng.normal(0, APPROACH_JITTER, (count, 3))
    approach /= np.linalg.norm(approach, axis=1, keepdims=True)
    x = rng.normal(size=(count, 3))
    x -= np.sum(x * approach, axis=1, keepdims=True) * approach
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    frame = np.stack([x, np.cross(approach, x), approach], axis=-1)  # columns x, y, z
    return position, matrix_to_quaternion(frame)


def _random_flexion(rng: np.random.Generator, count: int) -> np.ndarray:
    """Per-finger flexion in [0, 1] (count, 4, 2): one closure for the hand plus finger noise."""
    closure = rng.uniform(0, 1, (count, 1, 1))
    return np.clip(closure + rng.normal(0, CLOSURE_JITTER, (count, 4, 2)), 0, 1)


def _contact_flexion(sdf: np.ndarray, grasps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-finger flexion (count, 4, 2) that closes each finger until its tip meets the surface.

    What a planner does: try CLOSURE_STEPS closures per finger, take the first whose tip is
    inside (the largest if none is), refine it to the surface crossing by linear interpolation,
    then add CONTACT_JITTER so that contacts are near, not exact.
    """
    steps = np.linspace(0, 1, CLOSURE_STEPS)
    lo, hi = JOINT_LIMITS[1:, 0], JOINT_LIMITS[1:, 1]
    trial = np.repeat(grasps[:, None, :], CLOSURE_STEPS, axis=1)  # (count, steps, 19)
    joints = trial[..., 7:].reshape(len(grasps), CLOSURE_STEPS, 4, 3)
    joints[..., 1:] = (lo + steps[:, None] * (hi - lo))[:, None, :]
    trial[..., 7:] = joints.reshape(len(grasps), CLOSURE_STEPS, 12)
    tips = forward_kinematics(trial.reshape(-1, GRASP_DIM))[:, TIPS]
    d = interpolate(sdf, tips).reshape(len(grasps), CLOSURE_STEPS, 4)
    inside = d <= 0
    k = np.where(inside.any(1), inside.argmax(1), CLOSURE_STEPS - 1)  # (count, 4)
    before = np.maximum(k - 1, 0)
    d_before = np.take_along_axis(d, before[:, None], 1)[:, 0]
    d_at = np.take_along_axis(d, k[:, None], 1)[:, 0]
    crossing = (k > 0) & (d_at <= 0) & (d_before > 0)
    fraction = np.where(crossing, d_before / np.where(crossing, d_before - d_at, 1.0), 1.0)
    chosen = steps[before] + fraction * (steps[k] - steps[before])
    chosen = chosen[..., None] + rng.normal(0, CONTACT_JITTER, (len(grasps), 4, 2))
    return np.clip(chosen, 0, 1)


def sample_grasps(sdf: np.ndarray, rng: np.random.Generator, num: int) -> np.ndarray:
    """`num` grasps (num, 19) float64 around the object of grid SDF `sdf`."""
    positions, quaternions = [], []
    kept = 0
    for _ in range(MAX_ROUNDS):
        position, quaternion = _palm_poses(sdf, rng, 2 * num)
        above = position[:, 2] >= TABLE_Z
        positions.append(position[above])
        quaternions.append(quaternion[above])
        kept += int(above.sum())
        if kept >= num:
            break
    else:
        raise RuntimeError(f"could not place {num} palms above the table at z={TABLE_Z}")
    grasps = np.empty((num, GRASP_DIM))
    grasps[:, :3] = np.concatenate(positions)[:num]
    grasps[:, 3:7] = np.concatenate(quaternions)[:num]
    lo, hi = JOINT_LIMITS[:, 0], JOINT_LIMITS[:, 1]
    joints = np.zeros((num, 4, 3))
    joints[..., 0] = np.clip(rng.normal(0, ABDUCTION_STD, (num, 4)), lo[0], hi[0])
    grasps[:, 7:] = joints.reshape(num, 12)  # abduction is needed by the contact search
    planned = rng.random(num) < PLANNED_FRACTION
    flex = _random_flexion(rng, num)
    flex[planned] = _contact_flexion(sdf, grasps[planned], rng)
    joints[..., 1:] = lo[1:] + flex * (hi[1:] - lo[1:])
    grasps[:, 7:] = joints.reshape(num, 12)
    return grasps
