"""`evaluate_checkpoint`: a checkpoint's metrics on one split of a dataset (what `run.py eval` prints)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline import open_loader, resolve_device
from shards import read_manifest

from .checkpoint import dataset_warning, load_model
from .config import ConfigError
from .recipe import dataset_identity
from .scores import Standardiser
from .step import evaluate

log = logging.getLogger("train")


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    shards: str | Path,
    split: str = "val",
    loader: str = "cache",
    device: str | torch.device = "auto",
    scenes_per_batch: int = 8,
    prefix: str | None = None,
    warn: Callable[[str], None] = log.warning,
) -> dict[str, float]:
    """Metrics (score units) of CHECKPOINT (ours, or a seed state_dict) over every grasp of `split`.

    Keys are prefixed `prefix` (default: the split's name and "_"); a checkpoint trained on another
    dataset is evaluated with a warning (to `warn`), a model of another grid size is refused.
    """
    dev = resolve_device(device)
    model, trained = load_model(checkpoint)
    manifest = read_manifest(Path(shards))
    reader_grid, max_grasps = manifest.grid[0], manifest.max_grasps
    if model.input_size != reader_grid:
        raise ConfigError(f"{checkpoint}: model input size {model.input_size} != the dataset's grid {reader_grid}")
    if warning := dataset_warning(checkpoint, trained, dataset_identity(manifest)):
        warn(warning)
    scores = Standardiser() if trained is None else Standardiser(trained["mean"], trained["std"])
    with open_loader(
        shards, mode=loader, split=split, scenes_per_batch=scenes_per_batch, grasps_per_scene=max_grasps, device=dev,
        progress=False,
    ) as data:  # fmt: skip
        return evaluate(model.to(dev), data, scores=scores, prefix=f"{split}_" if prefix is None else prefix)
