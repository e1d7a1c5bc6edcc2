"""A four-finger hand in the seed's 19-value layout, and its forward kinematics.

Grasp vector: `x y z qx qy qz qw` (palm position, palm orientation as a quaternion xyzw), then
(abduction, proximal flexion, distal flexion) for ring, middle, fore and thumb.

Hand frame (palm centre at the origin): the palm is a plate in the local xy plane and faces
local +z, the approach direction. Ring, middle and fore fingers are rooted on the palm's +y edge
and point along +y at rest; the thumb is rooted on the -y edge and points along -y, so flexing
closes the fingers and the thumb toward each other in front of the palm (a wrap grasp).
Abduction turns a finger about the palm normal (right-handed about +z); flexion bends it toward
+z, the distal flexion adding to the proximal. Lengths are in the normalised [-1, 1] cube: the
open hand spans 2.3 (an object's largest extent is 1.8) and the half-closed hand holds its
fingertips about 1.6 apart, 0.6 in front of the palm.

Rest shape (identity orientation, zero joints, palm at the origin): a flat hand in the z=0
plane; finger f has its base at BASES[f], its link end at BASES[f] + PROXIMAL * DIRECTIONS[f]
and its tip at BASES[f] + (PROXIMAL + DISTAL) * DIRECTIONS[f], e.g. middle tip (0, 1.15, 0),
thumb tip (0, -1.15, 0).
"""

from __future__ import annotations

import numpy as np

from gq.common.rotations import quaternion_to_matrix

FINGERS = ("ring", "middle", "fore", "thumb")

# Joint limits (radians) of the seed data, per joint kind: rows abduction, proximal, distal.
JOINT_LIMITS = np.array([[-0.52, 0.52], [-0.35, 1.50], [-0.20, 1.83]])

BASES = np.array([[-0.22, 0.35, 0.0], [0.0, 0.35, 0.0], [0.22, 0.35, 0.0], [0.0, -0.35, 0.0]])
DIRECTIONS = np.array([[0.0, 1.0, 0.0]] * 3 + [[0.0, -1.0, 0.0]])
PROXIMAL, DISTAL = 0.45, 0.35  # link lengths, the same for every finger

# Control points returned by forward_kinematics, by index along axis 1.
PALM = 0
FINGER_BASES = slice(1, 5)
LINK_ENDS = slice(5, 9)
TIPS = slice(9, 13)
NUM_POINTS = 13


def forward_kinematics(grasps: np.ndarray) -> np.ndarray:
    """Control points (N, 13, 3) of grasps (N, 19): palm, 4 finger bases, 4 link ends, 4 tips.

    Fingers are in FINGERS order within each group (indices PALM, FINGER_BASES, LINK_ENDS, TIPS).
    """
    grasps = np.asarray(grasps, dtype=np.float64)
    position, rotation = grasps[:, :3], quaternion_to_matrix(grasps[:, 3:7])
    abduction, proximal, distal = np.moveaxis(grasps[:, 7:].reshape(-1, 4, 3), -1, 0)  # (N, 4) each

    # Finger direction after abduction: rotate DIRECTIONS about +z; its in-plane normal is z x dir.
    side = np.cross([0.0, 0.0, 1.0], DIRECTIONS)
    pointing = np.cos(abduction)[..., None] * DIRECTIONS + np.sin(abduction)[..., None] * side
    normal = np.array([0.0, 0.0, 1.0])

    def link(angle: np.ndarray) -> np.ndarray:  # unit vector of a link flexed by `angle`
        return np.cos(angle)[..., None] * pointing + np.sin(angle)[..., None] * normal

    link_ends = BASES + PROXIMAL * link(proximal)
    tips = link_ends + DISTAL * link(proximal + distal)
    local = np.concatenate(
        [np.zeros((len(grasps), 1, 3)), np.broadcast_to(BASES, link_ends.shape), link_ends, tips], axis=1
    )
    # rotation @ local per point, spelled out: much faster than einsum/matmul on 3x3 blocks.
    return position[:, None, :] + sum(local[..., j, None] * rotation[:, None, :, j] for j in range(3))
