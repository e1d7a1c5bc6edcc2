"""Loaders that turn a shard dataset into `Batch`es on the training device.

`open_loader(..., mode="cache")` holds this rank's shards of the split in one device tensor;
`mode="dali"` streams them with DALI, whole shards a window ahead. Both follow the same epoch plan
and yield bit-identical batches. `open_dataset` opens and quick-verifies a dataset once, for
several loaders to share; `open_mixture` opens several datasets as one, each with its share of an
epoch (a list of datasets given to `open_loader` does the same). DALI is imported only when a "dali" loader is opened.
"""

from .augment import AUGMENTS
from .base import EpochIndex, Loader, LoaderError
from .batch import Batch
from .dataset import ShardDataset, open_dataset
from .device import resolve_device
from .host_memory import keep_freed_host_memory
from .mixture import MixedDataset, open_mixture
from .plan import (
    DEFAULT_GRASPS_PER_SDF,
    DEFAULT_WINDOW,
    EpochPlan,
    PlanSpec,
    SplitRecords,
    make_plan,
    num_batches,
    parse_window,
)
from .registry import LOADER_MODES, MODES, LoaderMode, open_loader

__all__ = [
    "AUGMENTS",
    "Batch",
    "keep_freed_host_memory",
    "MODES",
    "LOADER_MODES",
    "LoaderMode",
    "Loader",
    "LoaderError",
    "EpochIndex",
    "ShardDataset",
    "open_dataset",
    "MixedDataset",
    "open_mixture",
    "open_loader",
    "resolve_device",
    "DEFAULT_GRASPS_PER_SDF",
    "DEFAULT_WINDOW",
    "EpochPlan",
    "PlanSpec",
    "SplitRecords",
    "make_plan",
    "num_batches",
    "parse_window",
]
