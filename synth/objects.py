"""Random objects: one primitive, or a union of two or three, centred and scaled like the seed's.

Objects are drawn in a world frame (metres, a few centimetres to ~25 cm across, somewhere on a
table) and then normalised as a mesh pipeline would: `normalised = (world - translation) *
global_scale`, where `translation` is the centre of the object's bounding box and `global_scale`
maps its largest half-extent to 1 - MARGIN, so the object fills the [-1, 1] cube with a margin.
"""

from __future__ import annotations

import numpy as np

from .primitives import KINDS, Primitive, union_bounds
from .rotations import random_rotations

MARGIN = 0.1
PARTS_PROBABILITIES = (0.4, 0.35, 0.25)  # one primitive, a union of two, a union of three


def _random_params(rng: np.random.Generator, kind: str) -> tuple[float, ...]:
    """Unit-scale sizes; ranges keep every family recognisable (no needles, no flat discs)."""
    u = rng.uniform
    if kind == "sphere":
        return (u(0.3, 1.0),)
    if kind == "box":
        return tuple(u(0.15, 1.0, size=3))
    if kind == "cylinder":
        return u(0.15, 0.8), u(0.15, 1.0)
    if kind == "capsule":
        return u(0.15, 0.6), u(0.1, 0.8)
    if kind == "torus":
        major = u(0.4, 0.9)
        return major, major * u(0.15, 0.45)
    bottom = u(0.3, 0.9)  # cone: half pointed cones, half frusta
    top = 0.0 if rng.random() < 0.5 else bottom * u(0.1, 0.6)
    return bottom, top, u(0.3, 1.0)


def random_object(rng: np.random.Generator) -> list[Primitive]:
    """A random object in world coordinates (metres) as a list of primitives to be unioned."""
    parts = rng.choice(len(PARTS_PROBABILITIES), p=PARTS_PROBABILITIES) + 1
    size = rng.uniform(0.03, 0.12)  # metres per unit of the unit-scale sizes
    place = np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.0, 0.1)])
    rotations = random_rotations(rng, parts)
    prims = []
    for i in range(parts):
        kind = KINDS[rng.integers(len(KINDS))]
        # Later parts are smaller and attached near the first one, so the union is one object.
        shrink = 1.0 if i == 0 else rng.uniform(0.4, 1.0)
        offset = np.zeros(3) if i == 0 else rng.normal(size=3) * 0.4
        params = tuple(shrink * size * p for p in _random_params(rng, kind))
        prims.append(Primitive(kind, place + size * offset, rotations[i], params))
    return prims


def normalise(prims: list[Primitive]) -> tuple[list[Primitive], np.ndarray, float]:
    """The object in the normalised frame, with its `translation` (3,) and `global_scale`."""
    lo, hi = union_bounds(prims)
    translation = (lo + hi) / 2
    global_scale = (1.0 - MARGIN) / float(np.max(hi - lo) / 2)
    return [p.normalised(translation, global_scale) for p in prims], translation, global_scale
