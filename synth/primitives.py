"""Exact signed distance functions of solid primitives, their unions, and sampling on a voxel grid.

Every primitive is a canonical shape in its own local frame (axis of symmetry = local z) placed
by a centre and a rotation. Distances are exact (not bounds), negative inside, so the sampled
grid is a true SDF and its gradient has unit norm away from the medial axis. A union is the
pointwise minimum, which is exact outside and a (standard) approximation inside.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

KINDS = ("sphere", "box", "cylinder", "capsule", "torus", "cone")


def _sphere(x, y, z, r):
    return np.sqrt(x * x + y * y + z * z) - r


def _box(x, y, z, a, b, c):
    # Distance to the box's surface: Euclidean outside, largest (negative) face gap inside.
    qx, qy, qz = np.abs(x) - a, np.abs(y) - b, np.abs(z) - c
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2 + np.maximum(qz, 0) ** 2)
    return outside + np.minimum(np.maximum(np.maximum(qx, qy), qz), 0)


def _cylinder(x, y, z, r, h):
    # A capped cylinder is a box in the (radius, height) half-plane.
    dr, dz = np.sqrt(x * x + y * y) - r, np.abs(z) - h
    return np.minimum(np.maximum(dr, dz), 0) + np.sqrt(np.maximum(dr, 0) ** 2 + np.maximum(dz, 0) ** 2)


def _capsule(x, y, z, r, h):
    dz = z - np.clip(z, -h, h)
    return np.sqrt(x * x + y * y + dz * dz) - r


def _torus(x, y, z, major, minor):
    dr = np.sqrt(x * x + y * y) - major
    return np.sqrt(dr * dr + z * z) - minor


def _cone(x, y, z, r1, r2, h):
    """Capped cone (frustum) from radius r1 at z=-h to r2 at z=+h; r2=0 is a pointed cone.

    Exact 2D distance in the (radius, height) half-plane to the trapezoid profile
    (after I. Quilez's capped-cone SDF): `ca` is the nearest point on the caps, `cb` on the
    slanted side; the sign is negative when the point is below the side and between the caps.
    """
    rho = np.sqrt(x * x + y * y)
    cap_radius = np.where(z < 0, rho.dtype.type(r1), rho.dtype.type(r2))
    ca_r, ca_z = rho - np.minimum(rho, cap_radius), np.abs(z) - h
    k2r, k2z = r2 - r1, 2.0 * h
    t = np.clip(((r2 - rho) * k2r + (h - z) * k2z) / (k2r * k2r + k2z * k2z), 0, 1)
    cb_r, cb_z = rho - r2 + k2r * t, z - h + k2z * t
    dist = np.sqrt(np.minimum(ca_r * ca_r + ca_z * ca_z, cb_r * cb_r + cb_z * cb_z))
    return np.where((cb_r < 0) & (ca_z < 0), -dist, dist)


_LOCAL_SDF = {
    "sphere": _sphere,  # params: radius
    "box": _box,  # params: half sizes along local x, y, z
    "cylinder": _cylinder,  # params: radius, half height
    "capsule": _capsule,  # params: radius, half length of the axis segment
    "torus": _torus,  # params: major radius, minor (tube) radius
    "cone": _cone,  # params: bottom radius, top radius, half height
}


@dataclass(frozen=True)
class Primitive:
    """A primitive of `kind` with local frame columns `rotation` placed at `centre`.

    All `params` are lengths, so scaling the shape scales them.
    """

    kind: str
    centre: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3), columns = local x, y, z axes in the parent frame
    params: tuple[float, ...]

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Signed distance at points given as three broadcastable coordinate arrays."""
        # Python floats keep the coordinates' dtype (float32 grids stay float32).
        cx, cy, cz = (float(v) for v in self.centre)
        rot = self.rotation.tolist()
        dx, dy, dz = x - cx, y - cy, z - cz
        local = [dx * rot[0][i] + dy * rot[1][i] + dz * rot[2][i] for i in range(3)]
        return _LOCAL_SDF[self.kind](*local, *self.params)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact axis-aligned bounding box (lo, hi) in the parent frame."""
        axis = self.rotation[:, 2]
        across = np.sqrt(np.clip(1.0 - axis**2, 0.0, None))  # extent of a unit disc normal to axis
        p = self.params
        if self.kind == "sphere":
            half = np.full(3, p[0])
        elif self.kind == "box":
            half = np.abs(self.rotation) @ np.asarray(p)
        elif self.kind == "cylinder":
            half = p[1] * np.abs(axis) + p[0] * across
        elif self.kind == "capsule":
            half = p[1] * np.abs(axis) + p[0]
        elif self.kind == "torus":
            half = p[0] * across + p[1]
        else:  # cone: the hull of its two end discs
            ends = np.stack(
                [
                    -p[2] * axis - p[0] * across,
                    -p[2] * axis + p[0] * across,
                    p[2] * axis - p[1] * across,
                    p[2] * axis + p[1] * across,
                ]
            )
            return self.centre + ends.min(0), self.centre + ends.max(0)
        return self.centre - half, self.centre + half

    def normalised(self, translation: np.ndarray, scale: float) -> Primitive:
        """The same shape in the frame where p' = (p - translation) * scale."""
        return Primitive(
            self.kind, (self.centre - translation) * scale, self.rotation, tuple(float(v) * scale for v in self.params)
        )


def union_sdf(prims: list[Primitive], x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Signed distance of the union of `prims` (pointwise minimum)."""
    return functools.reduce(np.minimum, (p.sdf(x, y, z) for p in prims))


def union_bounds(prims: list[Primitive]) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounding box of a union."""
    boxes = [p.bounds() for p in prims]
    return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


GRID_ORIGIN = -1.0  # coordinate of voxel 0 along every axis: the seed's (mesh2sdf's) grid


def grid_spacing(grid: int) -> float:
    """Distance between neighbouring voxels of a `grid`^3 lattice over [-1, 1]^3: 2 / grid."""
    return 2.0 / grid


@functools.lru_cache(maxsize=8)
def grid_axis(grid: int) -> np.ndarray:
    """Coordinates of the `grid` voxels along one axis (float32): voxel i at -1 + 2i/grid.

    The seed's convention (mesh2sdf's): voxel 0 sits on the cube's face at -1 and the last one at
    1 - 2/grid, one spacing short of +1. Every SDF in this project, from primitives or from
    meshes, is sampled at these points and indexed sdf[x, y, z].
    """
    axis = GRID_ORIGIN + np.arange(grid) * grid_spacing(grid)
    axis = axis.astype(np.float32)
    axis.flags.writeable = False  # shared by every call through the cache
    return axis


def sample_grid(prims: list[Primitive], grid: int) -> np.ndarray:
    """SDF of the union at the voxels of a grid^3 lattice over [-1, 1]^3 (the seed's grid).

    `out[i, j, k]` is the distance at (a[i], a[j], a[k]) with a = grid_axis(grid), i.e. the
    first axis is x. Evaluated in float32 by broadcasting three 1-D axes, so no (grid^3, 3) point
    array is ever built.
    """
    a = grid_axis(grid)
    x, y, z = a[:, None, None], a[None, :, None], a[None, None, :]
    return np.ascontiguousarray(union_sdf(prims, x, y, z), dtype=np.float32)
