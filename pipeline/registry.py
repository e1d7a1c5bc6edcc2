"""The loader modes by name, and `open_loader`, which checks the settings and opens one."""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .base import Loader, LoaderError
from .dataset import ShardDataset, open_dataset
from .device import resolve_device
from .plan import DEFAULT_GRASPS_PER_SDF, DEFAULT_WINDOW, PlanSpec, SplitRecords, num_batches


@dataclass(frozen=True)
class LoaderMode:
    """Where a mode's loader class lives and which of `open_loader`'s mode options it takes.

    The module is imported when the mode is first opened, so `import pipeline` never imports DALI.
    """

    module: str  # relative to this package
    cls: str
    options: tuple[str, ...]

    def loader_class(self) -> type[Loader]:
        return getattr(importlib.import_module(self.module, __package__), self.cls)


LOADER_MODES: dict[str, LoaderMode] = {
    "cache": LoaderMode(".cache", "CacheLoader", ("memory_budget", "progress")),
    "dali": LoaderMode(".dali_loader", "DaliLoader", ("prefetch", "num_threads")),
}
MODES = tuple(LOADER_MODES)


def _what_would_give_batches(records: SplitRecords, spec: PlanSpec) -> str:
    """Which change of S, G or the number of ranks would give batches (ranks share shards, so shards do not matter)."""

    def fits(**change) -> bool:
        return num_batches(records, replace(spec, rank=0, **change), all_ranks=True) > 0

    s = next((s for s in range(spec.scenes_per_batch - 1, 0, -1) if fits(scenes_per_batch=s)), None)
    g = next((g for g in range(spec.grasps_per_sdf - 1, 0, -1) if fits(grasps_per_sdf=g)), None)
    w = next(
        (w for w in range(spec.world_size - 1, 0, -1) if fits(world_size=w, drop_last=spec.drop_last and w > 1)), None
    )
    ways = [f"-S {s}" if s else "", f"-G {g}" if g else "", f"{w} rank{'s' if w > 1 else ''}" if w else ""]
    ways = [x for x in ways if x]
    if not ways:
        return "no setting gives a batch: add scenes to the split (gq shards build; for val, a larger --val-fraction)"
    return f"{' or '.join(ways)} would give some, as would more scenes in the split"


def open_loader(
    dataset: str | Path | ShardDataset,
    *,
    mode: str = "cache",
    split: str = "train",
    scenes_per_batch: int = 8,
    grasps_per_sdf: int = DEFAULT_GRASPS_PER_SDF,
    seed: int = 0,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    shuffle_window: int | None = DEFAULT_WINDOW,
    memory_budget: int | None = None,
    prefetch: int | None = None,
    num_threads: int | None = None,
    progress: bool = True,
    grasps_per_scene: int | None = None,
    cache_dir: str | Path | None = None,
    cache_limit: int | str | None = None,
) -> Loader:
    """Open a loader of `Batch`es over one split of a shard dataset, for one rank.

    Both modes follow the same epoch plan and yield bit-identical batches for the same settings; every
    record is checked against its checksum before a batch uses it. Iterating the loader yields one
    epoch; the next pass is the next epoch. Use it as a context manager (or call `close()`).

    Args:
        dataset: A dataset directory or URL (s3://, gs://, https://), or a `ShardDataset` from `open_dataset`
            that several loaders share.
        mode: "cache" reads this rank's shards of the split once into one device tensor; "dali" streams
            them with DALI, whole shards at a time, a window ahead.
        split: "train", "val" or "test".
        scenes_per_batch: S, the SDFs per batch.
        grasps_per_sdf: G, the grasps of each SDF per batch (1: the seed's independent grasps).
        seed: Seed of the epoch plan (shard order, grasp shuffles).
        device: Where batches are delivered ("cpu", "cuda", "cuda:1", or a torch.device).
        rank: This process's rank among `world_size`; it reads only its own shards.
        world_size: Number of ranks sharing the split.
        drop_last: Give every rank the same number of full batches (what DDP needs).
        shuffle_window: Shards per shuffle window; None shuffles all of the rank's shards.
        memory_budget: cache: bytes it may use at most [default: the free device memory].
        prefetch: dali: shards read ahead [default: one window].
        num_threads: dali: DALI's CPU threads.
        progress: Show a progress bar while the cache loads.
        grasps_per_scene: The old name of `grasps_per_sdf` (deprecated: a DeprecationWarning says so).
        cache_dir: A URL's local shard cache (`open_dataset`) [default: $XDG_CACHE_HOME/gq or ~/.cache/gq].
        cache_limit: The most bytes that cache holds, in bytes or as text ("20GB") [default: the disk's space].

    Returns:
        A `Loader`: iterable over `Batch`es, with `len()` (batches per epoch), `set_epoch`,
        `state_dict` / `load_state_dict` (resume mid-epoch), `score_stats` (the train split's score statistics
        from the manifest, whatever the split served: what scores are standardised with) and `resident_bytes`.

    Raises:
        LoaderError: An unknown mode, settings that cannot work (S = 0, G above the dataset's grasp
            slots, a split with no scenes or no batches), or a cache that does not fit in memory.
        DatasetError: The directory is not a usable dataset, or a record fails its checksum.
        CacheError: A URL's cache cannot hold the shards the loader needs at once (the smallest limit that
            works is in the message), or its disk is full.

    Example:
        ```python
        from gq.pipeline import open_loader

        with open_loader("data/shards", mode="cache", split="train", scenes_per_batch=8,
                         grasps_per_sdf=64, device="cuda") as loader:
            for batch in loader:  # one epoch
                features = model.encode_sdf(batch.sdf)  # [S, ...]: each SDF encoded once
                ...  # batch.grasps [S*G, 19], batch.scores [S*G], batch.scene_of_grasp [S*G]
        ```
    """
    if grasps_per_scene is not None:
        if grasps_per_sdf != DEFAULT_GRASPS_PER_SDF and grasps_per_sdf != grasps_per_scene:
            raise LoaderError(
                f"grasps_per_scene {grasps_per_scene} and grasps_per_sdf {grasps_per_sdf}: one option by two names "
                "(grasps_per_scene is its old name); give grasps_per_sdf only"
            )
        warnings.warn(
            "open_loader(grasps_per_scene=...) is deprecated: it is grasps_per_sdf, the grasps of each SDF per batch",
            DeprecationWarning,
            stacklevel=2,
        )
        grasps_per_sdf = grasps_per_scene
    if mode not in LOADER_MODES:
        raise LoaderError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    spec = PlanSpec(scenes_per_batch, grasps_per_sdf, seed, rank, world_size, drop_last, shuffle_window)
    try:
        spec.check()
    except ValueError as err:
        raise LoaderError(str(err)) from None
    data = (
        dataset
        if isinstance(dataset, ShardDataset)
        else open_dataset(dataset, cache_dir=cache_dir, cache_limit=cache_limit)
    )
    root, max_grasps = data.source, data.reader.layout.max_grasps
    if grasps_per_sdf > max_grasps:
        raise LoaderError(
            f"grasps_per_sdf {grasps_per_sdf}: more than the {max_grasps} grasp slots per scene of {root}"
        )
    records, _ = data.split(split)
    if len(records.scene) == 0:
        raise LoaderError(f"split {split!r} of {root} has no scenes")
    # A rank may get no batch (a small split, many ranks, no drop_last); the split as a whole must.
    if num_batches(records, spec, all_ranks=True) == 0:
        raise LoaderError(
            f"split {split!r} of {root} ({len(records.scene)} scenes in {len(records.shards())} shards) gives no "
            f"batches with scenes_per_batch (-S) {scenes_per_batch}, grasps_per_sdf (-G) {grasps_per_sdf} on "
            f"{world_size} rank{'s' if world_size > 1 else ''}{' (each needs a full batch)' if drop_last else ''}; "
            f"{_what_would_give_batches(records, spec)}"
        )
    dev = resolve_device(device)
    options = {"memory_budget": memory_budget, "progress": progress, "prefetch": prefetch, "num_threads": num_threads}
    chosen = LOADER_MODES[mode]
    return chosen.loader_class()(
        data, split=split, spec=spec, device=dev, **{name: options[name] for name in chosen.options}
    )
