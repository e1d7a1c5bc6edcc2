"""`evaluate_checkpoint`: a checkpoint's metrics on one split of a dataset (what `run.py eval` prints)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from gq.pipeline import open_dataset, open_loader, resolve_device

from .checkpoint import dataset_warning, load_model
from .config import ConfigError
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
    cache_dir: str | Path | None = None,
    cache_limit: int | str | None = None,
) -> dict[str, float]:
    """Metrics (score units) of CHECKPOINT (ours, or a seed state_dict) over every grasp of `split`.

    Keys are prefixed `prefix` (default: the split's name and "_"); a checkpoint trained on another
    dataset is evaluated with a warning (to `warn`), a model of another grid size is refused. The baseline
    (`<split>_mse_mean_baseline`) predicts the dataset's train mean (its manifest's score statistics), whatever
    the checkpoint's own units: a seed state_dict's are raw scores (mean 0), which is no baseline. `shards` may
    be a URL, read through the shard cache in `cache_dir` of at most `cache_limit` (`open_dataset`).
    """
    dev = resolve_device(device)
    model, trained = load_model(checkpoint)
    # Read and quick-verified once: for the checks below and the loader.
    dataset = open_dataset(shards, cache_dir=cache_dir, cache_limit=cache_limit)
    layout = dataset.reader.layout
    if model.input_size != layout.grid:
        raise ConfigError(f"{checkpoint}: model input size {model.input_size} != the dataset's grid {layout.grid}")
    if warning := dataset_warning(checkpoint, trained, dataset.fingerprint):
        warn(warning)
    with open_loader(
        dataset, mode=loader, split=split, scenes_per_batch=scenes_per_batch, grasps_per_sdf=layout.max_grasps,
        device=dev, progress=False,
    ) as data:  # fmt: skip
        return evaluate(
            model.to(dev),
            data,
            scores=Standardiser.of_checkpoint(trained),
            prefix=f"{split}_" if prefix is None else prefix,
            baseline=math.nan if (mean := dataset.score_stats.mean) is None else mean,  # None: no train scores
        )
