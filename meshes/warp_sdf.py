"""Mesh to SDF with NVIDIA Warp (the `warp` extra): one code path, on CUDA when present, else on the CPU.

At the points the caller gives (mesh2sdf's grid, `sdf.voxel_points`), the distance from Warp's closest-point
query over the mesh's BVH and the sign from the mesh's generalised winding number (inside where it exceeds
1/2, as libigl's), so an open mesh is signed as the closed one would be. Imported only by `sdf.mesh_sdf` once
the extra is known to be installed: this module imports warp at its top, as its kernel needs.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import warp as wp

# Warp's own messages (its banner, each kernel's load) would mix with the commands' output.
if hasattr(wp, "LOG_WARNING"):
    wp.config.log_level = wp.LOG_WARNING
else:  # warp-lang before config.log_level
    wp.config.quiet = True


@wp.kernel
def _signed_distance(mesh: wp.uint64, points: wp.array(dtype=wp.vec3), sdf: wp.array(dtype=wp.float32)):
    i = wp.tid()
    p = points[i]
    # No bound on the distance: the points and the mesh lie in [-1, 1]^3, at most 2 sqrt(3) apart.
    query = wp.mesh_query_point_sign_winding_number(mesh, p, 1.0e6)
    if query.result:  # else every face is degenerate (Warp skips those): sdf[i] stays NaN, which callers refuse
        closest = wp.mesh_eval_position(mesh, query.face, query.u, query.v)
        sdf[i] = query.sign * wp.length(p - closest)


def warp_device() -> str:
    """Where Warp runs: the first CUDA device when there is one, else "cpu". wp.init() (a no-op once done)
    runs with stderr closed: on a machine without a CUDA driver Warp's native code prints a warning there,
    and a command's failure must stay one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        wp.init()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return "cuda:0" if wp.get_cuda_device_count() > 0 else "cpu"


def warp_sdf(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray, device: str | None = None) -> np.ndarray:
    """Signed distances (len(points),) float32 from `points` to the mesh (vertices, faces), negative inside;
    NaN where Warp finds no face (every face degenerate).

    device: a Warp device ("cpu", "cuda:0"); None: `warp_device()`. Warp compiles the kernel on first use
    (seconds) into its kernel cache in the user's cache folder, and loads it from there afterwards.
    """
    device = device or warp_device()
    with wp.ScopedDevice(device):
        mesh = wp.Mesh(
            points=wp.array(np.asarray(vertices, np.float32), dtype=wp.vec3),
            indices=wp.array(np.asarray(faces, np.int32).ravel(), dtype=wp.int32),
            support_winding_number=True,
        )
        query = wp.array(np.asarray(points, np.float32), dtype=wp.vec3)
        sdf = wp.array(np.full(len(points), np.nan, np.float32), dtype=wp.float32)
        wp.launch(_signed_distance, dim=len(points), inputs=[mesh.id, query, sdf])
        return sdf.numpy()
