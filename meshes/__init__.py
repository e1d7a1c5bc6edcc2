"""Real objects from meshes: the seed's raw layout (mesh.obj + recording.npz) to its processed scene.npz.

SDFs by mesh2sdf on the seed's grid (voxel i at -1 + 2i/n, the grid `synth` uses too), one scale for
the whole dataset, labels from the recording or from our hand model (`synth`). Needs the optional
extra, `pip install 'gq-pipeline[meshes]'` (trimesh, mesh2sdf, libigl; pybullet for its example objects),
whose packages are imported only where used: this package imports, and the commands' help works, without it.
The `warp` extra (`pip install 'gq-pipeline[warp]'`) adds NVIDIA Warp as a second SDF backend (meshes.warp_sdf).
"""

from .raw import LABELS, ImportOptions, convert_scene, format_summary, import_meshes, list_raw, read_recording
from .sdf import OPEN_MESH_MODES, SDF_BACKENDS, MeshError, is_closed, load_mesh, mesh_grid, mesh_sdf, voxel_points

__all__ = [
    "LABELS",
    "ImportOptions",
    "convert_scene",
    "format_summary",
    "import_meshes",
    "list_raw",
    "read_recording",
    "OPEN_MESH_MODES",
    "SDF_BACKENDS",
    "MeshError",
    "is_closed",
    "load_mesh",
    "mesh_grid",
    "mesh_sdf",
    "voxel_points",
]
