"""The Batch contract every loader yields and every model consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """S SDFs and the grasps that belong to them, on the training device.

    `scene_of_grasp[i]` indexes `sdf`'s first dimension, so a model encodes each SDF once and
    gathers its features for every grasp of that scene.
    """

    sdf: torch.Tensor  # float32 [S, 1, D, D, D]
    grasps: torch.Tensor  # float32 [N, 19]
    scores: torch.Tensor  # float32 [N]  (lower is better)
    scene_of_grasp: torch.Tensor  # int64 [N], values in [0, S)
    scene_ids: torch.Tensor  # int64 [S], global scene ids (see scenes.parquet)

    @property
    def num_grasps(self) -> int:
        return int(self.grasps.shape[0])

    @property
    def num_scenes(self) -> int:
        return int(self.sdf.shape[0])
