"""Exact rotation augmentation (`augment="rot24"`): each SDF of a batch turned by one of the cube's 24 rotations.

A proper rotation that maps the grid's voxel positions onto themselves moves an SDF by re-indexing alone
(a transpose and flips, no interpolation), so the turned grid is the exact SDF of the turned object, and
the grasps can be turned to match exactly: the label of (turned object, turned hand) is the label of the
original wherever the labeller sees only the object and the hand (no gravity, no table): see
docs/loading.md, "Rotation augmentation".

The grid's own geometry. Voxel i sits at -1 + 2i/N (the seed's, mesh2sdf's, convention), so the voxel
positions span [-1, 1 - 2/N] on each axis: the grid's centre is c = (-1/N, -1/N, -1/N), not 0. A rotation
is a signed permutation matrix P (P[a, perm[a]] = sign[a], det P = +1) about c. On the grid it is: new
= old transposed by `perm` (new axis a reads old axis perm[a]), then flipped along each new axis whose
sign is -1. Flipping index i to N - 1 - i moves coordinate x to -1 + 2(N - 1 - i)/N = -x - 2/N, so a
point p of the object goes to P p + o with o[a] = -2/N on each flipped axis and 0 elsewhere (that is
P (p - c) + c). A grasp's palm position is such a point; its orientation quaternion (x y z w) becomes
r * q with r the quaternion of P (the hand's frame turned with the world), in the hemisphere (sign of w)
of the stored q, so a dataset whose quaternions have w >= 0, as gq.synth's, keeps them so; the 12 joint
angles are the hand's own, unchanged.

Which rotation a scene gets is a counter-based hash of (seed, epoch, scene id, first grasp slot of its
group): no generator state, and a group's rotation does not depend on the batch, rank or world size it
lands in, so both loaders, a resumed run and a run resumed on another number of ranks turn every group
the same way.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from gq.common.rotations import matrix_to_quaternion
from gq.shards import GRASP_DIM

from .plan import EpochPlan

AUGMENTS = ("off", "rot24")


@dataclass(frozen=True)
class GridRotation:
    """One of the 24: new axis a reads old axis perm[a], reversed where sign[a] is -1."""

    perm: tuple[int, int, int]
    sign: tuple[int, int, int]

    @property
    def matrix(self) -> np.ndarray:
        """P (3, 3) int: a point p (about the grid's centre) goes to P p."""
        m = np.zeros((3, 3), dtype=np.int64)
        m[np.arange(3), self.perm] = self.sign
        return m

    def offset(self, grid: int) -> np.ndarray:
        """o (3,) float64: a point p of the object goes to P p + o on a `grid`^3 grid (-2/N on flipped axes)."""
        return np.where(np.array(self.sign) < 0, -2.0 / grid, 0.0)

    @property
    def flipped(self) -> tuple[int, ...]:
        return tuple(a for a in range(3) if self.sign[a] < 0)

    def turn_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """The grid [..., D, D, D] turned: a view without flips, else a copy (torch has no negative strides)."""
        lead = grid.dim() - 3
        turned = grid.permute(*range(lead), *(lead + a for a in self.perm))
        return turned.flip([lead + a for a in self.flipped]) if self.flipped else turned


def _proper_rotations() -> tuple[GridRotation, ...]:
    """The 24 signed permutations with determinant +1, the identity first."""
    found = []
    for perm in itertools.permutations(range(3)):
        for sign in itertools.product((1, -1), repeat=3):
            rotation = GridRotation(perm, sign)
            if round(np.linalg.det(rotation.matrix)) == 1:
                found.append(rotation)
    return tuple(found)


ROTATIONS = _proper_rotations()
QUATERNIONS = matrix_to_quaternion(np.stack([r.matrix for r in ROTATIONS]).astype(np.float64))  # (24, 4) xyzw

_MASK = np.uint64(2**64 - 1)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose every output bit depends on every input bit."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def draw_rotations(seed: int, epoch: int, scenes: np.ndarray, first_slots: np.ndarray) -> np.ndarray:
    """The rotation (index into ROTATIONS) of each group, from (seed, epoch, its scene id, its first grasp slot)."""
    h = _mix(np.full(len(scenes), seed, dtype=np.uint64) ^ np.uint64(0x726F743234))  # "rot24": this stream's own
    for key in (np.uint64(epoch), np.asarray(scenes).astype(np.uint64), np.asarray(first_slots).astype(np.uint64)):
        h = _mix(h ^ key)
    return (h % np.uint64(len(ROTATIONS))).astype(np.int64)


def plan_rotations(plan: EpochPlan) -> np.ndarray:
    """The rotation of each of the plan's groups (int64 [groups])."""
    return draw_rotations(plan.spec.seed, plan.epoch, plan.group_scene, plan.slots[plan.group_start[:-1]])


@cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per rotation on `device`: the source axis of each new axis (int64 [24, 3]), its sign and the quaternion
    (float32 [24, 3], [24, 4])."""
    perm = torch.tensor([r.perm for r in ROTATIONS], dtype=torch.int64, device=device)
    sign = torch.tensor([r.sign for r in ROTATIONS], dtype=torch.float32, device=device)
    return perm, sign, torch.tensor(QUATERNIONS, dtype=torch.float32, device=device)


def quaternion_product(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Hamilton products r * q of quaternions [..., 4] in xyzw order (the rotation q first, then r)."""
    rx, ry, rz, rw = r.unbind(-1)
    qx, qy, qz, qw = q.unbind(-1)
    return torch.stack(
        [
            rw * qx + rx * qw + ry * qz - rz * qy,
            rw * qy - rx * qz + ry * qw + rz * qx,
            rw * qz + rx * qy - ry * qx + rz * qw,
            rw * qw - rx * qx - ry * qy - rz * qz,
        ],
        -1,
    )


def turn_grasps(grasps: torch.Tensor, rotations: torch.Tensor, grid: int) -> torch.Tensor:
    """Grasps [N, 19] turned by rotations [N] (indices into ROTATIONS) on a `grid`^3 grid, on their device.

    Position: P p + o (a signed permutation: exact but for the one rounding of adding o). Orientation:
    r * q, negated where that changes the sign of w (q and -q are one rotation; a dataset's hemisphere, such as
    the seed's w >= 0, is kept, and the identity leaves q as stored). Joints: unchanged.
    """
    perm, sign, quat = (t[rotations] for t in _tables(grasps.device))
    position = torch.gather(grasps[:, :3], 1, perm) * sign + torch.where(sign < 0, -2.0 / grid, 0.0)
    orientation = quaternion_product(quat, grasps[:, 3:7])
    other_half = (orientation[:, 3:] < 0) != (grasps[:, 6:7] < 0)  # q and -q are one rotation: keep w's sign
    orientation = torch.where(other_half, -orientation, orientation)
    return torch.cat([position, orientation, grasps[:, 7:GRASP_DIM]], 1)
