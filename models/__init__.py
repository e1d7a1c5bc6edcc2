"""Grasp-quality estimators (the seed's layouts) and seed checkpoint loading; torch only."""

from .checkpoints import CheckpointError, from_seed_checkpoint, infer_config, load_torch_file, strip_compile_prefix
from .estimators import (
    GRASP_DIM,
    MODEL_KINDS,
    GQEstimator,
    GQEstimatorBase,
    GQEstimatorLarge,
    build_model,
)

__all__ = [
    "GRASP_DIM",
    "MODEL_KINDS",
    "CheckpointError",
    "GQEstimator",
    "GQEstimatorBase",
    "GQEstimatorLarge",
    "build_model",
    "from_seed_checkpoint",
    "infer_config",
    "load_torch_file",
    "strip_compile_prefix",
]
