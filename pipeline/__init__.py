"""Loaders that turn a shard dataset into `Batch`es on the training device.

`open_loader(..., mode="cache")` holds this rank's shards of the split in one device tensor;
`mode="dali"` streams them with DALI, whole shards a window ahead. Both follow the same epoch plan
and yield bit-identical batches.
"""

from .batch import Batch
from .host_memory import keep_freed_host_memory
from .loader import MODES, Loader, LoaderError, open_loader, resolve_device
from .plan import DEFAULT_WINDOW, EpochPlan, PlanSpec, SplitRecords, make_plan, num_batches, parse_window

__all__ = [
    "Batch",
    "keep_freed_host_memory",
    "MODES",
    "Loader",
    "LoaderError",
    "open_loader",
    "resolve_device",
    "DEFAULT_WINDOW",
    "EpochPlan",
    "PlanSpec",
    "SplitRecords",
    "make_plan",
    "num_batches",
    "parse_window",
]
