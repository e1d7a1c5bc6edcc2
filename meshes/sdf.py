"""Meshes to SDF grids with the seed's conventions (mesh2sdf), and a sign for meshes that are not closed.

mesh2sdf samples voxel i at -1 + 2i/n, indexed sdf[x, y, z] (the grid `synth` uses too), and takes the
sign from ray crossings along x, so it needs a closed mesh. For an open mesh its signs cannot be trusted
(an open box still gets some negative voxels), so such meshes are refused unless `open_meshes` picks a way
to sign them: "winding" keeps mesh2sdf's unsigned distance and takes the sign from libigl's fast
generalised winding number (inside where it exceeds 1/2), "repair" is mesh2sdf's own `fix=True`
(re-mesh the grid's |d| = 2/n level set, keep the largest part, recompute).

The backend "warp" (the `warp` extra, meshes.warp_sdf) computes the SDF at the same points with NVIDIA Warp, on
CUDA when present, else on the CPU: exact distances to the mesh and the winding-number sign for every mesh, so
an open one allowed by `open_meshes="winding"` needs nothing more; "repair" is mesh2sdf's alone.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gq.common.errors import FileError
from gq.common.extras import import_extra
from gq.common.inputs import InputError, open_input

if TYPE_CHECKING:  # the meshes extra: imported where used, so `--help` works without it
    import trimesh

OPEN_MESH_MODES = ("refuse", "winding", "repair")
SDF_BACKENDS = ("mesh2sdf", "warp")
OPEN_MESH_REASON = (
    "mesh is not closed (not watertight), so its inside/outside signs cannot be trusted; "
    "repair it, or import with --open-meshes winding|repair"
)
MAX_MESH_BYTES = 1 << 31  # a mesh file: far above any object's scan, far below a machine's memory
_OBJ_VERTEX = re.compile(rb"^[ \t]*v[ \t]+(\S+)[ \t]+(\S+)[ \t]+(\S+)", re.MULTILINE)


class MeshError(FileError):
    """A mesh or recording that cannot be imported; `str()` is one line naming the file and the problem."""


def _check_obj_vertices(path: Path, data: bytes) -> None:
    """MeshError naming the first OBJ vertex whose coordinates are not finite numbers. Checked on the file's
    text because trimesh drops such a vertex (and every face using it) while loading, so the loaded mesh
    would be another object that passes every later check."""
    matches = list(_OBJ_VERTEX.finditer(data))
    try:
        coords = np.array([m.groups() for m in matches], dtype=np.bytes_).astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(coords).all(axis=1)) if len(coords) else []
    except ValueError:  # a word that is not a number: find it one vertex at a time
        bad = [i for i, m in enumerate(matches) if not _numbers(m.groups())]
    if len(bad):
        i = int(bad[0])
        line = data.count(b"\n", 0, matches[i].start()) + 1
        words = b" ".join(matches[i].groups()).decode("latin-1")
        raise MeshError(path, f"vertex {i + 1} (line {line}) has a non-finite coordinate ({words}); fix the mesh file")


def _numbers(words: tuple[bytes, ...]) -> bool:
    try:
        return all(math.isfinite(float(w)) for w in words)
    except ValueError:
        return False


def _as_utf8(data: bytes) -> bytes:
    """An OBJ's text as UTF-8: a file that is not (a Latin-1 comment, say) is re-encoded, as trimesh would need
    charset_normalizer to guess it. Latin-1 maps every byte to a character, so nothing is lost, and OBJ numbers
    and keywords are ASCII."""
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError:
        return data.decode("latin-1").encode("utf-8")


def load_mesh(path: str | Path) -> trimesh.Trimesh:
    """The mesh at `path` as the seed loads it (`trimesh.load(path, force="mesh")`); MeshError if unusable:
    not a regular file, an OBJ vertex that is not finite, no faces, or every vertex at one point."""
    trimesh = import_extra("trimesh", "meshes")
    path = Path(path)
    try:
        with open_input(path, "mesh", limit=MAX_MESH_BYTES) as f:
            data = f.read()
    except InputError as err:
        raise MeshError(path, err.reason) from None
    except OSError as err:
        raise MeshError(path, f"unreadable mesh ({err.strerror})") from None
    file_type = path.suffix.lower().lstrip(".")
    if file_type == "obj":
        _check_obj_vertices(path, data)
        data = _as_utf8(data)
    try:
        resolver = trimesh.resolvers.FilePathResolver(path)  # an OBJ's materials, a glTF's buffers
        mesh = trimesh.load(io.BytesIO(data), file_type=file_type, resolver=resolver, force="mesh")
    except Exception as err:  # trimesh raises many types for foreign or corrupt files
        raise MeshError(path, f"unreadable mesh ({type(err).__name__}: {str(err).strip()[:120]})") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise MeshError(path, "empty mesh (no faces)")
    if not np.isfinite(mesh.vertices).all():
        raise MeshError(path, "mesh has non-finite vertex coordinates")
    extent = float(mesh.extents.max())
    if not (extent > 0 and math.isfinite(2.0 / extent)):
        raise MeshError(path, f"every vertex is at one point (extent {extent:.3g}): no object to scale; fix the mesh")
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


def check_backend(backend: str, open_meshes: str) -> None:
    """ValueError unless `backend` is one of SDF_BACKENDS and can sign open meshes as `open_meshes` says."""
    if backend not in SDF_BACKENDS:
        raise ValueError(f"SDF backend {backend!r}: choose one of {', '.join(SDF_BACKENDS)}")
    if open_meshes not in OPEN_MESH_MODES:
        raise ValueError(f"open_meshes {open_meshes!r}: choose one of {', '.join(OPEN_MESH_MODES)}")
    if backend == "warp" and open_meshes == "repair":
        raise ValueError(
            "--open-meshes repair is mesh2sdf's re-meshing; the warp backend signs open meshes by their "
            "winding number: use --open-meshes winding"
        )


def mesh_sdf(
    vertices: np.ndarray,
    faces: np.ndarray,
    grid: int,
    *,
    closed: bool = True,
    open_meshes: str = "refuse",
    backend: str = "mesh2sdf",
) -> np.ndarray:
    """SDF (grid, grid, grid) float32 of a mesh already inside [-1, 1]^3, negative inside.

    backend "mesh2sdf": a closed mesh gets the seed's call, `mesh2sdf.compute(V, F, size=grid, fix=False,
    level=2/grid)`; an open one (`closed=False`) is signed as `open_meshes` says ("refuse" raises ValueError).
    backend "warp": Warp's distance and winding-number sign at the same voxels (meshes.warp_sdf), for a closed
    mesh and, with open_meshes "winding", an open one.
    """
    check_backend(backend, open_meshes)
    vertices = np.ascontiguousarray(vertices, dtype=np.float64)
    faces = np.ascontiguousarray(faces, dtype=np.int64)
    if not closed and open_meshes == "refuse":
        raise ValueError(OPEN_MESH_REASON)
    if backend == "warp":
        import_extra("warp", "warp")
        from .warp_sdf import warp_sdf  # imports warp: here, once the extra is known to be there

        sdf = warp_sdf(vertices, faces, voxel_points(grid)).reshape(grid, grid, grid)
        if np.isnan(sdf).any():
            raise ValueError("every face of the mesh is degenerate (no area): no surface to measure; fix the mesh")
        return sdf
    mesh2sdf = import_extra("mesh2sdf", "meshes")
    if closed:
        return mesh2sdf.compute(vertices, faces, size=grid, fix=False, level=2 / grid).astype(np.float32)
    if open_meshes == "repair":
        return mesh2sdf.compute(vertices, faces, size=grid, fix=True, level=2 / grid).astype(np.float32)
    igl = import_extra("igl", "meshes")  # the "winding" sign only

    distance = np.abs(mesh2sdf.compute(vertices, faces, size=grid, fix=False))
    winding = igl.fast_winding_number(vertices, faces, voxel_points(grid)).reshape(distance.shape)
    return np.where(winding > 0.5, -distance, distance).astype(np.float32)


def mesh_grid(
    path: str | Path,
    grid: int,
    *,
    mesh_max_extent: float | None = None,
    open_meshes: str = "refuse",
    backend: str = "mesh2sdf",
) -> tuple[np.ndarray, np.ndarray, float]:
    """One mesh file's SDF on the seed's grid, prepared as the seed's importer prepares an object: translation =
    the bounds' centre, scale = 2 / mesh_max_extent (default: this mesh's own largest extent; the training
    data's, from its mesh_max_extent.txt, gives its scale), the SDF by `backend` (`mesh_sdf`).

    Returns (sdf, translation, scale): a point p of the mesh's frame is at (p - translation) * scale on the grid.

    Raises:
        MeshError: The file is not a readable mesh.
        ValueError: The mesh is larger than `mesh_max_extent`, or open and `open_meshes` refuses it (naming it).
    """
    mesh = load_mesh(path)
    extent = float(mesh.extents.max()) if mesh_max_extent is None else mesh_max_extent
    if mesh.extents.max() > extent:
        raise ValueError(f"{path}: extent {mesh.extents.max():.6g} exceeds --mesh-max-extent {extent:.6g}")
    translation, scale = mesh.bounds.mean(axis=0), 2.0 / extent
    try:
        sdf = mesh_sdf((mesh.vertices - translation) * scale, mesh.faces, grid, closed=is_closed(mesh),
                       open_meshes=open_meshes, backend=backend)  # fmt: skip
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return sdf, translation, scale
