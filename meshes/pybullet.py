"""Objects nobody here made: pybullet's `pybullet_data` meshes laid out as the seed's raw layout.

`random_urdfs/NNN/NNN.obj` (1,000 procedurally made objects, one unit system) become `random_NNN/mesh.obj`;
the named objects (bunny, duck, teddy, mug, ...) come in their own units, so import them as their own
dataset. Needs `pybullet` (the `meshes` extra); nothing of it goes into this repository.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from gq.common.extras import import_extra

from .raw import MESH_FILE

NAMED = {
    "bunny": "bunny.obj",
    "duck": "duck.obj",
    "teddy": "teddy2_VHACD_CHs.obj",
    "mug": "objects/mug.obj",
    "torus": "torus/torus_textured.obj",
    "sphere": "sphere_smooth.obj",
    "soccerball": "soccerball.obj",
    "cube": "cube.obj",
    "lego": "lego/lego.obj",
    "jenga": "jenga/jenga.obj",
    "domino": "domino/domino.obj",
    "cone": "racecar/meshes/cone.obj",
}


def data_path() -> Path:
    """pybullet_data's folder (it comes with pybullet); MissingExtraError naming the extra when it is missing."""
    return Path(import_extra("pybullet_data", "meshes").getDataPath())


def write_raw(out: str | Path, which: str = "random", limit: int | None = None) -> list[str]:
    """Copy pybullet objects into `out/<name>/mesh.obj`; returns the names. `which`: random or named."""
    root, out = data_path(), Path(out)
    if which == "random":
        sources = {f"random_{p.parent.name}": p for p in sorted(root.glob("random_urdfs/*/*.obj"))}
    elif which == "named":
        sources = {name: root / rel for name, rel in sorted(NAMED.items())}
    else:
        raise ValueError(f"which {which!r}: choose random or named")
    names = sorted(sources)[:limit]
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources[name], out / name / MESH_FILE)
    return names
