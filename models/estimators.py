"""Grasp-quality estimators: a 3D CNN encodes an SDF grid, an MLP scores (SDF features, grasp).

Layer order and attribute names follow the seed exactly, so the seed's state_dicts load unchanged
(`conv_block.<i>.*`, `gq_head.<i>.*`). Lower predicted scores mean better grasps, as in the seed.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from gq.common.errors import UsageError
from gq.common.grasps import GRASP_DIM

NUM_STAGES = 4  # conv stages, each halving the grid: a D^3 SDF leaves as (D/16)^3
GRID_DIVISOR = 2**NUM_STAGES


@dataclass(frozen=True)
class Layout:
    """What distinguishes one estimator kind's layers from another's (sizes are set per model)."""

    kind: str
    convs_per_stage: int
    batch_norm: bool
    dropout: float


def conv_block(base_channels: int, layout: Layout) -> nn.Sequential:
    """The SDF encoder: 4 stages of [Conv3d, (BatchNorm3d), ReLU] x n, MaxPool3d(2); c..8c."""
    layers: list[nn.Module] = []
    in_channels = 1
    for stage in range(NUM_STAGES):
        out_channels = base_channels * 2**stage
        for _ in range(layout.convs_per_stage):
            # Conv bias stays on even before BatchNorm: the seed had it (it is in the 7,230,369).
            layers.append(nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1))
            if layout.batch_norm:
                layers.append(nn.BatchNorm3d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            in_channels = out_channels
        layers.append(nn.MaxPool3d(2))
    return nn.Sequential(*layers)


def gq_head(in_features: int, fc_dims: Sequence[int], layout: Layout) -> nn.Sequential:
    """The scorer: [Linear, (BatchNorm1d), ReLU, (Dropout)] per fc dim, then Linear(->1)."""
    layers: list[nn.Module] = []
    for dim in fc_dims:
        layers.append(nn.Linear(in_features, dim))
        if layout.batch_norm:
            layers.append(nn.BatchNorm1d(dim))
        layers.append(nn.ReLU(inplace=True))
        if layout.dropout:
            layers.append(nn.Dropout(layout.dropout))
        in_features = dim
    layers.append(nn.Linear(in_features, 1))
    return nn.Sequential(*layers)


# Far above any model worth training here (the seed's large one has 7.2M), and what a GPU can hold with the
# optimizer's state: 2**30 parameters are 4 GiB of float32 weights, 16 GiB with gradients and Adam's two moments.
MAX_PARAMETERS = 2**30


class ModelSizeError(UsageError, ValueError):
    """Sizes that would build a model above MAX_PARAMETERS; `option` is the size to blame ("base_channels" or
    "fc_dims") and `str()` says how many parameters it would have."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def parameter_count(kind: str, input_size: int, base_channels: int, fc_dims: Sequence[int]) -> int:
    """The parameters a `kind` model of these sizes has (computed, nothing allocated)."""
    layout = MODEL_KINDS[kind].layout
    count, in_channels = 0, 1
    for stage in range(NUM_STAGES):
        out_channels = base_channels * 2**stage
        for _ in range(layout.convs_per_stage):  # Conv3d weight and bias, BatchNorm3d weight and bias
            count += in_channels * out_channels * 27 + out_channels + 2 * out_channels * layout.batch_norm
            in_channels = out_channels
    in_features = in_channels * (input_size // GRID_DIVISOR) ** 3 + GRASP_DIM
    for dim in fc_dims:  # Linear weight and bias, BatchNorm1d weight and bias
        count += in_features * dim + dim + 2 * dim * layout.batch_norm
        in_features = dim
    return count + in_features + 1  # the output Linear


def check_model_size(
    kind: str, *, input_size: int, base_channels: int | None = None, fc_dims: Sequence[int] | None = None
) -> None:
    """ModelSizeError unless a `kind` model of these sizes (None: the kind's default, as in `build_model`) has at
    most MAX_PARAMETERS parameters: checked before anything is allocated."""
    defaults = inspect.signature(MODEL_KINDS[kind]).parameters
    base_channels = base_channels or defaults["base_channels"].default
    fc_dims = tuple(defaults["fc_dims"].default if fc_dims is None else fc_dims)
    count = parameter_count(kind, input_size, base_channels, fc_dims)
    if count <= MAX_PARAMETERS:
        return
    # The encoder's size depends on base_channels alone: blame it when the encoder is too large by itself.
    encoder_alone = parameter_count(kind, GRID_DIVISOR, base_channels, ())
    option = "base_channels" if encoder_alone > MAX_PARAMETERS else "fc_dims"
    raise ModelSizeError(
        option,
        f"a {kind} model of base_channels {base_channels}, fc_dims {tuple(fc_dims)} on a {input_size}^3 grid would "
        f"have {count:,} parameters ({count * 4 / 2**30:,.1f} GiB of float32 weights), above the limit of "
        f"{MAX_PARAMETERS:,} (4 GiB); choose smaller sizes",
    )


def _check_config(kind: str, input_size: int, base_channels: int, fc_dims: Sequence[int]) -> None:
    """Refuse sizes that would otherwise surface later as an opaque shape or allocator error."""
    if not isinstance(input_size, int) or input_size < GRID_DIVISOR or input_size % GRID_DIVISOR:
        raise ValueError(
            f"input_size must be a positive multiple of {GRID_DIVISOR} (the encoder halves the "
            f"grid {NUM_STAGES} times), got {input_size!r}; resample the SDFs to e.g. 32, 48 or 64"
        )
    if not isinstance(base_channels, int) or base_channels < 1:
        raise ValueError(f"base_channels must be a positive int, got {base_channels!r}")
    if not all(isinstance(dim, int) and dim >= 1 for dim in fc_dims):
        raise ValueError(f"fc_dims must be positive ints, got {tuple(fc_dims)!r}")
    check_model_size(kind, input_size=input_size, base_channels=base_channels, fc_dims=fc_dims)


class GQEstimatorBase(nn.Module):
    """Shared forward logic; subclasses fix the layout and the seed's default sizes."""

    layout: ClassVar[Layout]

    def __init__(self, input_size: int, base_channels: int, fc_dims: Sequence[int]) -> None:
        super().__init__()
        fc_dims = tuple(fc_dims)
        _check_config(self.layout.kind, input_size, base_channels, fc_dims)
        self.input_size = input_size
        self.base_channels = base_channels
        self.fc_dims = fc_dims
        self.conv_block = conv_block(base_channels, self.layout)
        self.gq_head = gq_head(self.feature_dim + GRASP_DIM, fc_dims, self.layout)

    @property
    def feature_dim(self) -> int:
        """Length F of one encoded SDF: 8c channels on a (D/16)^3 grid."""
        return self.base_channels * 2 ** (NUM_STAGES - 1) * (self.input_size // GRID_DIVISOR) ** 3

    @property
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this model: `build_model(**model.config)`."""
        return {
            "kind": self.layout.kind,
            "input_size": self.input_size,
            "base_channels": self.base_channels,
            "fc_dims": self.fc_dims,
        }

    def encode_sdf(self, sdf: torch.Tensor) -> torch.Tensor:
        """SDFs [S,1,D,D,D] or [S,D,D,D] -> features [S,F]."""
        if sdf.dim() == 4:
            sdf = sdf.unsqueeze(1)
        d = self.input_size
        if sdf.dim() != 5 or tuple(sdf.shape[1:]) != (1, d, d, d):
            raise ValueError(f"sdf must have shape [S,1,{d},{d},{d}] or [S,{d},{d},{d}], got {tuple(sdf.shape)}")
        # flatten (a reshape) rather than view: channels_last_3d outputs are not contiguous.
        return self.conv_block(sdf).flatten(1)

    def score_features(self, features: torch.Tensor, grasps: torch.Tensor) -> torch.Tensor:
        """Per-grasp SDF features [N,F] and grasps [N,19] -> predicted scores [N]."""
        expected = (features.shape[0], GRASP_DIM)
        if tuple(grasps.shape) != expected:
            raise ValueError(f"grasps must have shape [{expected[0]},{GRASP_DIM}], got {tuple(grasps.shape)}")
        # Under autocast the features are bf16/fp16; match them so cat never mixes dtypes.
        x = torch.cat([features, grasps.to(features.dtype)], dim=1)
        return self.gq_head(x).squeeze(1)

    def forward(self, sdf: torch.Tensor, grasps: torch.Tensor, scene_of_grasp: torch.Tensor) -> torch.Tensor:
        """Scores [N] for grasps [N,19] on SDFs [S,1,D,D,D]; scene_of_grasp [N] indexes the S.

        Each SDF is encoded once, however many grasps share it; that is the point of grouping.
        """
        if scene_of_grasp.shape != grasps.shape[:1]:
            raise ValueError(
                f"scene_of_grasp must have shape [{grasps.shape[0]}] (one scene index per grasp), "
                f"got {tuple(scene_of_grasp.shape)}"
            )
        features = self.encode_sdf(sdf).index_select(0, scene_of_grasp)
        return self.score_features(features, grasps)

    def forward_with_sdf(self, sdf: torch.Tensor, grasps: torch.Tensor) -> torch.Tensor:
        """The seed's call, one SDF per grasp: sdf [B,(1,)D,D,D], grasps [B,19] -> scores [B]."""
        return self.score_features(self.encode_sdf(sdf), grasps)


class GQEstimator(GQEstimatorBase):
    """The seed's standard model: one conv per stage, no BatchNorm or dropout; 1,222,049 params."""

    layout = Layout(kind="small", convs_per_stage=1, batch_norm=False, dropout=0.0)

    def __init__(
        self,
        input_size: int = 48,
        base_channels: int = 16,
        fc_dims: Sequence[int] = (256, 128, 64),
    ) -> None:
        super().__init__(input_size, base_channels, fc_dims)


class GQEstimatorLarge(GQEstimatorBase):
    """The seed's large model: two convs per stage, BatchNorm, dropout 0.1; 7,230,369 params."""

    layout = Layout(kind="large", convs_per_stage=2, batch_norm=True, dropout=0.1)

    def __init__(
        self,
        input_size: int = 48,
        base_channels: int = 32,
        fc_dims: Sequence[int] = (512, 256, 128),
    ) -> None:
        super().__init__(input_size, base_channels, fc_dims)


MODEL_KINDS: dict[str, type[GQEstimatorBase]] = {cls.layout.kind: cls for cls in (GQEstimator, GQEstimatorLarge)}


def build_model(
    kind: str,
    *,
    input_size: int = 48,
    base_channels: int | None = None,
    fc_dims: Sequence[int] | None = None,
) -> GQEstimatorBase:
    """A "small" (GQEstimator) or "large" (GQEstimatorLarge) model; None = the kind's default."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")
    # Only pass what was given, so each class's signature stays the one place defaults live.
    sizes = {"base_channels": base_channels, "fc_dims": fc_dims}
    given = {name: value for name, value in sizes.items() if value is not None}
    return MODEL_KINDS[kind](input_size=input_size, **given)
