"""Training: `fit` (one readable loop), `evaluate`, loader comparison, checkpoints that survive a kill."""

from .config import ConfigError, FitConfig
from .loop import TrainError, evaluate, fit

__all__ = ["ConfigError", "FitConfig", "TrainError", "evaluate", "fit"]
