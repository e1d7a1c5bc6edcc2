"""Load the seed's checkpoints: plain or torch.compile'd state_dicts, sizes inferred from shapes.

The seed saved bare `model.state_dict()`s with no record of the configuration, so the model kind,
channel width, head sizes and SDF grid size are all read back from the tensors.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from gq.common.errors import UsageError

from .estimators import GRASP_DIM, GRID_DIVISOR, MODEL_KINDS, NUM_STAGES, GQEstimatorBase

COMPILE_PREFIX = "_orig_mod."  # what torch.compile's wrapper adds to every key
_HEAD_WEIGHT = re.compile(r"gq_head\.(\d+)\.weight")

StateDict = Mapping[str, torch.Tensor]


class CheckpointError(UsageError):
    """A checkpoint that cannot be used; the message names the source, the problem and the fix."""


def strip_compile_prefix(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Drop torch.compile's `_orig_mod.` key prefix so the dict loads into an uncompiled model."""
    return {
        key[len(COMPILE_PREFIX) :] if key.startswith(COMPILE_PREFIX) else key: value
        for key, value in state_dict.items()
    }


def infer_config(state_dict: StateDict, source: str = "state_dict") -> dict[str, Any]:
    """The `build_model` arguments (kind, input_size, base_channels, fc_dims) a state_dict fits.

    Raises CheckpointError when the tensors match neither estimator layout.
    """
    state_dict = strip_compile_prefix(state_dict)

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(
            f"{source}: {problem}; expected a GQEstimator or GQEstimatorLarge state_dict (keys "
            f"conv_block.<i>.*, gq_head.<i>.*), e.g. the seed's torch.save(model.state_dict())"
        )

    first_conv = state_dict.get("conv_block.0.weight")
    if first_conv is None or first_conv.dim() != 5 or first_conv.shape[1] != 1:
        raise fail("no 1-channel Conv3d weight at conv_block.0.weight")
    base_channels = first_conv.shape[0]
    # Only the large layout has a BatchNorm right after the first conv.
    kind = "large" if "conv_block.1.running_mean" in state_dict else "small"

    # The head's Linear weights are its only 2-D gq_head tensors; order them by layer index.
    linears = sorted(
        (int(match[1]), value)
        for key, value in state_dict.items()
        if (match := _HEAD_WEIGHT.fullmatch(key)) and value.dim() == 2
    )
    if not linears or linears[-1][1].shape[0] != 1:
        raise fail("no gq_head Linear layers ending in a single output")
    fc_dims = tuple(weight.shape[0] for _, weight in linears[:-1])

    # in_features = 8c * (D/16)^3 + 19: solve for the SDF grid size D.
    channels_out = base_channels * 2 ** (NUM_STAGES - 1)
    cells, remainder = divmod(linears[0][1].shape[1] - GRASP_DIM, channels_out)
    side = round(cells ** (1 / 3)) if cells > 0 else 0
    if remainder or side < 1 or side**3 != cells:
        raise fail(
            f"first Linear takes {linears[0][1].shape[1]} inputs, which is not "
            f"{channels_out} * k^3 + {GRASP_DIM} for base_channels={base_channels}"
        )
    return {
        "kind": kind,
        "input_size": side * GRID_DIVISOR,
        "base_channels": base_channels,
        "fc_dims": fc_dims,
    }


def load_torch_file(path: str | Path) -> Any:
    """The one torch.load of the project (weights-only, on the CPU); every failure is a one-line CheckpointError.

    Nothing damaged is used: every entry of torch.save's zip archive must match the CRC-32 recorded when it was
    written (torch.load does not check them, so a flipped bit would load as a wrong weight), and every
    floating-point tensor in the file (weights, optimizer state) must be finite.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file (not found, or not a file); check the path")
    with open(path, "rb") as f:
        head = f.read(8)
        if not head.startswith(b"PK\x03\x04") and head[:1] != b"\x80":  # torch.save: a zip, or a legacy pickle
            raise CheckpointError(
                f"{path}: unreadable checkpoint: not a PyTorch checkpoint file (it begins {head!r}, torch.save files "
                f"are zip archives), so it cannot be read; give a .pt/.pth file written by torch.save"
            )
        f.seek(0)
        try:
            if head.startswith(b"PK"):  # a zip archive; a legacy pickle (before torch 1.6) carries no checksums
                _check_archive(f, path)
                f.seek(0)
            loaded = torch.load(f, map_location="cpu", weights_only=True)  # the bytes just checked
        except CheckpointError:
            raise
        # torch.load and zipfile signal bad bytes with many types (UnpicklingError, RuntimeError, EOFError, ...).
        except Exception as exc:
            raise CheckpointError(
                f"{path}: unreadable checkpoint: it cannot be read as a weights-only torch checkpoint "
                f"({_first_sentence(exc)}); it is corrupt, truncated or not a checkpoint file: use another checkpoint"
            ) from None
    if where := _first_non_finite(loaded):
        raise CheckpointError(
            f"{path}: non-finite value (NaN or inf) in {where}: the run diverged or the file was damaged; "
            f"use another checkpoint (best.pt, an earlier copy) or retrain"
        )
    return loaded


def _first_sentence(exc: Exception) -> str:
    """The exception's type and first sentence: torch's full text is long and may advise weights_only=False."""
    first = str(exc).strip().split("\n")[0].split(". ")[0][:160]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _check_archive(f: BinaryIO, path: Path) -> None:
    """CheckpointError unless every entry of the zip archive `f` reads back with the CRC-32 written with it.

    torch.save stores entries uncompressed and, unless told not to (`torch.serialization.set_crc32_options`),
    records each one's CRC-32: a file whose CRCs are all zero records none, and has nothing to check.
    """
    with zipfile.ZipFile(f) as archive:
        entries = archive.infolist()
        if any(entry.compress_type != zipfile.ZIP_STORED for entry in entries):
            raise CheckpointError(
                f"{path}: unreadable checkpoint: a compressed zip archive, which torch.save never writes; "
                f"give a .pt/.pth file written by torch.save"
            )
        if any(entry.CRC for entry in entries) and (bad := archive.testzip()) is not None:
            raise CheckpointError(
                f"{path}: damaged checkpoint: its entry {bad} fails its CRC-32 check (the bytes changed after "
                f"torch.save wrote them: a disk, copy or transfer error); use another checkpoint (best.pt, an "
                f"earlier copy) or retrain"
            )


def _first_non_finite(loaded: Any) -> str | None:
    """Where (`model.gq_head.0.weight`) a floating-point tensor of a loaded checkpoint holds NaN or inf, or None.

    Walked with a stack, not recursion: a hostile file may nest containers deeper than Python's recursion limit.
    """
    stack: list[tuple[str, Any]] = [("", loaded)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, torch.Tensor):
            if (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
                return where or "the file's tensor"
            continue
        if isinstance(value, Mapping):
            items = list(value.items())
        elif isinstance(value, list | tuple):
            items = list(enumerate(value))
        else:
            continue
        stack.extend((f"{where}.{key}" if where else str(key), item) for key, item in reversed(items))
    return None


def _check_state_dict(loaded: Any, source: str) -> StateDict:
    """`loaded` if it is a state_dict of tensors, else a CheckpointError naming `source`."""
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise CheckpointError(
            f"{source}: holds a {type(loaded).__name__}, not a state_dict of tensors; "
            f"re-save it with torch.save(model.state_dict(), path)"
        )
    return loaded


def from_seed_checkpoint(checkpoint: str | Path | StateDict, *, source: str | None = None) -> GQEstimatorBase:
    """A GQEstimator or GQEstimatorLarge, sized from and loaded (strictly) with a seed state_dict.

    `checkpoint` is a path to a `.pth` file or an already-loaded state_dict (`source` names it in
    errors); torch.compile'd dicts (`_orig_mod.` keys) are accepted. The model is on the CPU in
    train mode, like a new one.
    """
    if isinstance(checkpoint, Mapping):
        source, loaded = source or "state_dict", checkpoint
    else:
        source, loaded = str(checkpoint), load_torch_file(checkpoint)
    state_dict = strip_compile_prefix(_check_state_dict(loaded, source))
    config = infer_config(state_dict, source)
    model = MODEL_KINDS[config.pop("kind")](**config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        # torch's message lists every missing/unexpected key over many lines; keep the gist.
        detail = " ".join(str(exc).split())
        raise CheckpointError(
            f"{source}: does not match the inferred {model.layout.kind} layout {model.config} "
            f"({detail[:300]}); expected a seed GQEstimator/GQEstimatorLarge state_dict"
        ) from exc
    return model
