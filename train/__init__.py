"""Training: `fit` (a recipe: setup, train_step, validate, save_checkpoint, cleanup), `evaluate`, loader
comparison, checkpoints that survive a kill."""

from typing import TYPE_CHECKING

from .config import ConfigError, FitConfig, read_config_file, resolve_config
from .eval_checkpoint import evaluate_checkpoint
from .scores import Standardiser
from .step import Forward, TrainError, evaluate, train_step

if TYPE_CHECKING:  # what type checkers and the API docs read; at run time __getattr__ imports them
    from .recipe import FitRecipe, Progress, fit

# The recipe draws its curves with matplotlib: imported on first use, so that a program that only scores grasps
# (`from gq.train.predict import Estimator`, inside a grasp planner) never loads it.
_RECIPE = ("FitRecipe", "Progress", "fit")


def __getattr__(name: str) -> object:
    if name not in _RECIPE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import recipe

    return getattr(recipe, name)


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
