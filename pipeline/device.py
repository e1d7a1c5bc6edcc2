"""The training device a loader puts its batches on."""

from __future__ import annotations

import torch

from .base import LoaderError


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device ("auto": CUDA when present, else CPU), refusing CUDA when this torch has none."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise LoaderError(f"device {device!r}: {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoaderError(f"device {device!r}: CUDA is not available to this torch; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise LoaderError(f"device {device!r}: only cpu and cuda are supported")
    return dev
