"""Grasp quality labels: a deterministic kinematic contact loss read off the SDF grid.

Lower is better, as in the seed. With d(p) the SDF at point p, read from the stored grid by
trilinear interpolation on the seed's grid (voxel i at -1 + 2i/n; beyond the outermost voxels: the
clamped value plus the distance to the clamped point, an upper bound that keeps d continuous), n(p)
the unit gradient of that interpolant (central differences one spacing apart = trilinear
interpolation of the grid's gradient),
the 13 control points p_i of the hand (hand.forward_kinematics) and its 4 fingertips t_f:

    tip        = W_TIP  * sum_f |d(t_f)|                            fingertips off the surface
    penetrate  = PEN_CAP * tanh(W_PEN / PEN_CAP * sum_i max(0, -d(p_i)))   control points inside
    palm       = W_PALM * max(0, PALM_CLEARANCE - d(palm))          palm too close or inside
    c_f        = exp(-(d(t_f) / CONTACT_WIDTH)^2)                   soft contact of fingertip f
    opposition = W_OPP * |sum_f c_f n(t_f)| - W_CONTACT * sum_f c_f
    score      = tip + penetrate + palm + opposition

The opposition term rewards contacts (down to -4 * W_CONTACT) whose surface normals cancel
(thumb against fingers) and charges contacts that all push the same way. Every term is
continuous in the grasp values, so labels vary smoothly with the palm pose and the joints; the
long right tail comes from hands far from the object (tip) and deep in it (penetrate, palm).
Penetration grows like W_PEN * depth at first and saturates smoothly at PEN_CAP, so a few
hands buried in the object do not dominate a squared-error loss (the seed's maximum is ~48).
"""

from __future__ import annotations

import numpy as np

from .hand import PALM, TIPS, forward_kinematics
from .primitives import GRID_ORIGIN, grid_spacing

W_TIP = 1.5
W_PEN = 24.0
PEN_CAP = 45.0
W_PALM = 6.0
PALM_CLEARANCE = 0.1
CONTACT_WIDTH = 0.05
W_OPP = 0.5
W_CONTACT = 0.5


def interpolate(sdf: np.ndarray, points: np.ndarray) -> np.ndarray:
    """SDF values at points (..., 3) by trilinear interpolation of the grid (voxel i at -1 + 2i/n).

    Points outside the box of voxel positions [-1, 1 - 2/n]^3 get the value at the nearest box
    point plus their distance to it, which bounds the true distance from above and keeps the
    field continuous.
    """
    grid = sdf.shape[0]
    step = grid_spacing(grid)
    first, last = GRID_ORIGIN, GRID_ORIGIN + (grid - 1) * step
    clamped = np.clip(points, first, last)
    beyond = np.linalg.norm(points - clamped, axis=-1)
    u = (clamped - first) / step  # continuous voxel index in [0, grid - 1]
    i0 = np.minimum(u.astype(np.int64), grid - 2)
    f = u - i0
    flat = sdf.reshape(-1)
    base = (i0[..., 0] * grid + i0[..., 1]) * grid + i0[..., 2]
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    value = 0.0
    for dx, wx in ((0, 1 - fx), (1, fx)):
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dz, wz in ((0, 1 - fz), (1, fz)):
                value = value + wx * wy * wz * flat[base + (dx * grid + dy) * grid + dz]
    return value + beyond


def normals(sdf: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Unit gradients (..., 3) of the interpolated SDF, by central differences one spacing apart."""
    step = grid_spacing(sdf.shape[0])
    offsets = np.concatenate([np.eye(3), -np.eye(3)]) * step
    values = interpolate(sdf, points[..., None, :] + offsets)  # (..., 6)
    grad = values[..., :3] - values[..., 3:]
    return grad / np.maximum(np.linalg.norm(grad, axis=-1, keepdims=True), 1e-12)


def score_terms(sdf: np.ndarray, grasps: np.ndarray) -> dict[str, np.ndarray]:
    """The score's terms (see the module docstring) for grasps (N, 19), each (N,) float64."""
    points = forward_kinematics(grasps)
    d = interpolate(sdf, points)  # (N, 13)
    d_tips = d[:, TIPS]
    contact = np.exp(-((d_tips / CONTACT_WIDTH) ** 2))
    net_normal = np.einsum("nf,nfk->nk", contact, normals(sdf, points[:, TIPS]))
    return {
        "tip": W_TIP * np.abs(d_tips).sum(1),
        "penetrate": PEN_CAP * np.tanh(W_PEN / PEN_CAP * np.maximum(-d, 0).sum(1)),
        "palm": W_PALM * np.maximum(PALM_CLEARANCE - d[:, PALM], 0),
        "opposition": W_OPP * np.linalg.norm(net_normal, axis=1) - W_CONTACT * contact.sum(1),
    }


def score_grasps(sdf: np.ndarray, grasps: np.ndarray) -> np.ndarray:
    """Scores (N,) float32 of grasps (N, 19) on the object whose grid SDF is `sdf`."""
    return sum(score_terms(sdf, grasps).values()).astype(np.float32)
