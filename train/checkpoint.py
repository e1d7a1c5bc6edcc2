"""Training checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint holds the model (unwrapped: no DDP `module.` or compile `_orig_mod.` prefixes), the
optimizer, scheduler and AMP scaler, the loader's epoch-plan position, the RNG states, and the
run's counters. It is written to a temporary file and renamed, so a kill never leaves half a file.
Loading for evaluation also accepts the seed's plain state_dicts (predictions in raw score units).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from models import CheckpointError, GQEstimatorBase, build_model, from_seed_checkpoint

FORMAT = "gq-train-checkpoint"
VERSION = 1


def save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint of this trainer; CheckpointError names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint ({first}); use another checkpoint") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(payload).__name__})")
    return payload


def is_trainer_checkpoint(payload: dict) -> bool:
    return payload.get("format") == FORMAT


def load_model(path: str | Path) -> tuple[GQEstimatorBase, dict | None]:
    """(model, score statistics) from one of our checkpoints, or (model, None) from a seed state_dict.

    Our models predict standardised scores (undo with the statistics); the seed's predict raw scores.
    """
    payload = load_checkpoint(path)
    if not is_trainer_checkpoint(payload):
        return from_seed_checkpoint(path), None
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')}, this trainer reads {VERSION}")
    model = build_model(**payload["model_config"])
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the recorded model ({str(err).splitlines()[0]})") from None
    return model, payload["score_stats"]
