"""Meshes to SDF grids with the seed's conventions (mesh2sdf), and a sign for meshes that are not closed.

mesh2sdf samples voxel i at -1 + 2i/n, indexed sdf[x, y, z] (the grid `synth` uses too), and takes the
sign from ray crossings along x, so it needs a closed mesh. For an open mesh its signs cannot be trusted
(an open box still gets some negative voxels), so such meshes are refused unless `open_meshes` picks a way
to sign them: "winding" keeps mesh2sdf's unsigned distance and takes the sign from libigl's fast
generalised winding number (inside where it exceeds 1/2), "repair" is mesh2sdf's own `fix=True`
(re-mesh the grid's |d| = 2/n level set, keep the largest part, recompute).
"""

from __future__ import annotations

import io
from pathlib import Path

import mesh2sdf
import numpy as np
import trimesh

from gq.common.errors import UsageError

OPEN_MESH_MODES = ("refuse", "winding", "repair")
OPEN_MESH_REASON = (
    "mesh is not closed (not watertight), so its inside/outside signs cannot be trusted; "
    "repair it, or import with --open-meshes winding|repair"
)


class MeshError(UsageError):
    """A mesh or recording that cannot be imported; `str()` is one line naming the file and the problem."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self):  # travels back from worker processes intact
        return MeshError, (self.path, self.reason)


def _as_utf8(path: Path) -> tuple:
    """trimesh.load's arguments for `path`: the path itself, except for an OBJ that is not UTF-8 (a Latin-1
    comment, say), whose text is handed over re-encoded: trimesh would need charset_normalizer to guess it.
    Latin-1 maps every byte to a character, so nothing is lost, and OBJ numbers and keywords are ASCII."""
    if path.suffix.lower() != ".obj" or not path.is_file():
        return (path,)
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        return (path,)
    except UnicodeDecodeError:
        text = data.decode("latin-1").encode("utf-8")
    return io.BytesIO(text), "obj", trimesh.resolvers.FilePathResolver(path)


def load_mesh(path: str | Path) -> trimesh.Trimesh:
    """The mesh at `path` as the seed loads it (`trimesh.load(path, force="mesh")`); MeshError if unusable."""
    path = Path(path)
    try:
        mesh = trimesh.load(*_as_utf8(path), force="mesh")
    except Exception as err:  # trimesh raises many types for missing, foreign or corrupt files
        raise MeshError(path, f"unreadable mesh ({type(err).__name__}: {str(err).strip()[:120]})") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise MeshError(path, "empty mesh (no faces)")
    if not np.isfinite(mesh.vertices).all():
        raise MeshError(path, "mesh has non-finite vertex coordinates")
    return mesh


def is_closed(mesh: trimesh.Trimesh) -> bool:
    """Whether the surface is closed: every edge shared by exactly two faces once vertices are merged by
    position (texture seams and split normals duplicate vertices without opening the surface)."""
    merged = mesh.copy()
    merged.merge_vertices(merge_tex=True, merge_norm=True)
    return bool(merged.is_watertight)


def voxel_points(grid: int) -> np.ndarray:
    """The (grid^3, 3) voxel positions in sdf[x, y, z] order: voxel i at -1 + 2i/grid."""
    axis = -1.0 + np.arange(grid) * (2.0 / grid)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


def mesh_sdf(
    vertices: np.ndarray, faces: np.ndarray, grid: int, *, closed: bool = True, open_meshes: str = "refuse"
) -> np.ndarray:
    """SDF (grid, grid, grid) float32 of a mesh already inside [-1, 1]^3, negative inside.

    A closed mesh gets the seed's call, `mesh2sdf.compute(V, F, size=grid, fix=False, level=2/grid)`.
    An open one (`closed=False`) is signed as `open_meshes` says ("refuse" raises ValueError).
    """
    if open_meshes not in OPEN_MESH_MODES:
        raise ValueError(f"open_meshes {open_meshes!r}: choose one of {', '.join(OPEN_MESH_MODES)}")
    vertices = np.ascontiguousarray(vertices, dtype=np.float64)
    faces = np.ascontiguousarray(faces, dtype=np.int64)
    if closed:
        return mesh2sdf.compute(vertices, faces, size=grid, fix=False, level=2 / grid).astype(np.float32)
    if open_meshes == "refuse":
        raise ValueError(OPEN_MESH_REASON)
    if open_meshes == "repair":
        return mesh2sdf.compute(vertices, faces, size=grid, fix=True, level=2 / grid).astype(np.float32)
    import igl  # the "winding" sign only

    distance = np.abs(mesh2sdf.compute(vertices, faces, size=grid, fix=False))
    winding = igl.fast_winding_number(vertices, faces, voxel_points(grid)).reshape(distance.shape)
    return np.where(winding > 0.5, -distance, distance).astype(np.float32)
