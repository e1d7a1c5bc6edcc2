"""Training: `fit` (a recipe: setup, train_step, validate, save_checkpoint, cleanup), `evaluate`, loader
comparison, checkpoints that survive a kill."""

from .config import ConfigError, FitConfig, read_config_file, resolve_config
from .eval_checkpoint import evaluate_checkpoint
from .recipe import FitRecipe, Progress, fit
from .scores import Standardiser
from .step import Forward, TrainError, evaluate, train_step

__all__ = [
    "ConfigError",
    "FitConfig",
    "FitRecipe",
    "Forward",
    "Progress",
    "Standardiser",
    "TrainError",
    "evaluate",
    "evaluate_checkpoint",
    "fit",
    "read_config_file",
    "resolve_config",
    "train_step",
]
