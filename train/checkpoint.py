"""Training checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint holds the model (unwrapped: no DDP `module.` or compile `_orig_mod.` prefixes), the
optimizer, scheduler and AMP scaler, the loader's epoch-plan position, the RNG states, and the
run's counters, and the identity (fingerprint) of the dataset it was trained on. It is written to a
temporary file of its own and renamed, so a kill or a full disk never leaves half a file. Loading for
evaluation also accepts the seed's plain state_dicts (predictions in raw score units).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gq.models import CheckpointError, GQEstimatorBase, build_model, from_seed_checkpoint, load_torch_file

from .rundir import write_atomically

FORMAT = "gq-train-checkpoint"
VERSION = 1


# What only a full checkpoint (last.pt) holds; best.pt keeps the weights alone.
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "loader", "rng", "state")


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically (rundir.write_atomically): WriteError names the file when the disk is full."""
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


def dataset_warning(source: str | Path, trained: dict | None, fingerprint: str) -> str | None:
    """A one-line warning when a checkpoint was trained on another dataset than the one of `fingerprint`.

    `trained` is load_model's second value; None (a seed state_dict) records no dataset, so no warning.
    """
    if trained is None or trained.get("fingerprint") == fingerprint:
        return None
    old = trained.get("fingerprint")
    was = f"dataset {old[:16]}" if old else "a dataset it does not record (an older checkpoint)"
    return (
        f"warning: {source} was trained on {was}, not on --shards' dataset {fingerprint[:16]} "
        f"(another dataset, or this one rebuilt since)"
    )


def load_model(path: str | Path) -> tuple[GQEstimatorBase, dict | None]:
    """(model, what it was trained with) from one of our checkpoints, or (model, None) from a seed state_dict.

    Our models predict standardised scores (undo with the statistics `mean`, `std`; `fingerprint` is
    the dataset's identity, None in older checkpoints); the seed's predict raw scores.
    """
    payload = load_checkpoint(path)
    if not is_trainer_checkpoint(payload):
        return from_seed_checkpoint(payload, source=str(path)), None
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')}, this trainer reads {VERSION}")
    model = build_model(**payload["model_config"])
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the recorded model ({str(err).splitlines()[0]})") from None
    return model, {**payload["score_stats"], "fingerprint": payload.get("dataset", {}).get("fingerprint")}
