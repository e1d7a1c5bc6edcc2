"""Grasp-quality estimators (the seed's layouts) and seed checkpoint loading; torch only."""

from .checkpoints import CheckpointError, from_seed_checkpoint, infer_config, load_torch_file, strip_compile_prefix
from .estimators import (
    GRASP_DIM,
    GRID_DIVISOR,
    MAX_PARAMETERS,
    MODEL_KINDS,
    GQEstimator,
    GQEstimatorBase,
    GQEstimatorLarge,
    ModelSizeError,
    build_model,
    check_model_size,
    parameter_count,
)

__all__ = [
    "GRASP_DIM",
    "GRID_DIVISOR",
    "MAX_PARAMETERS",
    "MODEL_KINDS",
    "CheckpointError",
    "GQEstimator",
    "GQEstimatorBase",
    "GQEstimatorLarge",
    "ModelSizeError",
    "build_model",
    "check_model_size",
    "from_seed_checkpoint",
    "infer_config",
    "load_torch_file",
    "parameter_count",
    "strip_compile_prefix",
]
