"""Training checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint holds the model (unwrapped: no DDP `module.` or compile `_orig_mod.` prefixes), the
optimizer, scheduler and AMP scaler, the loader's epoch-plan position, the RNG states, and the
run's counters, and the identity (fingerprint) of the dataset it was trained on. It is written to a
temporary file of its own and renamed, so a kill or a full disk never leaves half a file. Loading for
evaluation also accepts the seed's plain state_dicts (predictions in raw score units).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gq.models import MODEL_KINDS, CheckpointError, GQEstimatorBase, from_seed_checkpoint, load_torch_file

from .files import write_atomically
from .scores import Standardiser

FORMAT = "gq-train-checkpoint"
VERSION = 1


# What only a full checkpoint (last.pt) holds; best.pt keeps the weights alone.
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "loader", "rng", "state")


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically (files.write_atomically): WriteError names the file when the disk is full."""
    write_atomically(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **payload}, f))


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file's payload: ours (a dict with `format`) or the seed's state_dict; CheckpointError otherwise."""
    payload = load_torch_file(path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(payload).__name__})")
    return payload


def is_trainer_checkpoint(payload: dict) -> bool:
    return payload.get("format") == FORMAT


def check_resumable(path: Path, payload: dict) -> None:
    """CheckpointError unless `payload` is a full checkpoint of this trainer (what `fit --resume` needs)."""
    if not is_trainer_checkpoint(payload):
        raise CheckpointError(
            f"{path}: not a checkpoint of this trainer; start a new run (--init-from it, or --overwrite)"
        )
    if any(key not in payload for key in RESUME_KEYS):
        raise CheckpointError(
            f"{path}: not a resumable checkpoint (weights only, like best.pt: no optimizer, "
            f"scheduler or loader state); put the run's own last.pt back, or start a new run "
            f"from these weights with --init-from {path} and another --out"
        )


# --- what a checkpoint says about its model, typed -----------------------------------------------------
# Checked like a manifest: every key's presence and type, one line naming the key, before anything is
# built from it; the model's sizes must also be those of its weights, so a wrong record never builds one.

_FIX = "use another checkpoint (a run's best.pt or last.pt), or retrain"


def _invalid(where: str | Path, key: str, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: no valid {key} ({why}); {_FIX}")


def _take(data: Any, key: str, kind: type | tuple[type, ...], where: str | Path, prefix: str = "") -> Any:
    """`data[key]` if it is a `kind` (bool is no number here); CheckpointError naming the key otherwise."""
    if key not in data:
        raise _invalid(where, prefix + key, "missing")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join("dict" if k is Mapping else k.__name__ for k in kinds)
        raise _invalid(where, prefix + key, f"{type(value).__name__} {value!r:.40}, expected {expected}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """A checkpoint's `model_config`: the `build_model` arguments of its weights."""

    kind: str
    input_size: int
    base_channels: int
    fc_dims: tuple[int, ...]

    @classmethod
    def from_dict(cls, data: Mapping, *, where: str | Path) -> ModelConfig:
        """Each key present and typed, `kind` a known model; CheckpointError naming the first key that is not."""
        take = {key: _take(data, key, kind, where, "model_config.") for key, kind in
                (("kind", str), ("input_size", int), ("base_channels", int), ("fc_dims", (list, tuple)))}  # fmt: skip
        if take["kind"] not in MODEL_KINDS:
            known = ", ".join(MODEL_KINDS)
            raise _invalid(where, "model_config.kind", f"{take['kind']!r:.40}, expected one of {known}")
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in take["fc_dims"]):
            raise _invalid(where, "model_config.fc_dims", f"{take['fc_dims']!r:.40}, expected integers")
        return cls(**{**take, "fc_dims": tuple(take["fc_dims"])})


@dataclass(frozen=True)
class Trained:
    """What a checkpoint of ours says its model predicts in and was trained on (load_model's second value)."""

    units: Standardiser  # the train split's score statistics: the model predicts (score - mean) / std
    fingerprint: str | None  # the dataset's identity; None in checkpoints older than its recording

    @classmethod
    def from_payload(cls, payload: Mapping, *, where: str | Path) -> Trained:
        stats = _take(payload, "score_stats", Mapping, where)
        try:
            units = Standardiser.from_stats(dict(stats), f"{where}: score_stats")
        except ValueError as err:
            raise CheckpointError(f"{err}; {_FIX}") from None
        dataset = _take(payload, "dataset", Mapping, where) if "dataset" in payload else {}
        fingerprint = _take(dataset, "fingerprint", (str, type(None)), where, "dataset.") if dataset else None
        return cls(units, fingerprint)


def dataset_warning(source: str | Path, trained: Trained | None, fingerprint: str) -> str | None:
    """A one-line warning when a checkpoint was trained on another dataset than the one of `fingerprint`.

    `trained` is load_model's second value; None (a seed state_dict) records no dataset, so no warning.
    """
    if trained is None or trained.fingerprint == fingerprint:
        return None
    old = trained.fingerprint
    was = f"dataset {old[:16]}" if old else "a dataset it does not record (an older checkpoint)"
    return (
        f"warning: {source} was trained on {was}, not on --shards' dataset {fingerprint[:16]} "
        f"(another dataset, or this one rebuilt since)"
    )


def load_model(path: str | Path) -> tuple[GQEstimatorBase, Trained | None]:
    """(model, what it was trained with) from one of our checkpoints, or (model, None) from a seed state_dict.

    Our models predict standardised scores (`Trained.units`); the seed's predict raw scores. Every entry
    used is checked first (`ModelConfig`, `Trained`): a damaged or edited checkpoint is one CheckpointError.
    """
    payload = load_checkpoint(path)
    if not is_trainer_checkpoint(payload):
        return from_seed_checkpoint(payload, source=str(path)), None
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')}, this trainer reads {VERSION}")
    config = ModelConfig.from_dict(_take(payload, "model_config", Mapping, path), where=path)
    trained = Trained.from_payload(payload, where=path)
    # Sized from the weights themselves (as a seed file is), then held to the recorded sizes.
    model = from_seed_checkpoint(_take(payload, "model", Mapping, path), source=f"{path}: model")
    for key, recorded in asdict(config).items():
        if recorded != (actual := model.config[key]):
            raise _invalid(path, f"model_config.{key}", f"{recorded!r:.40}, but the weights are of {key} {actual!r}")
    return model, trained
