"""What one batch does: the forward pass (autocast built once), a training step, and evaluation.

Both loader modes and every caller (the recipe, bench_train, eval) go through these, so a batch is
always scored the same way.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gq.common.errors import GQError
from gq.pipeline import Batch, Loader

from .metrics import Metrics
from .scores import Standardiser

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainError(GQError, RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); `str()` says where and what to try."""


@dataclass(frozen=True)
class Forward:
    """How batches go through a model: autocast, memory format, and the zero-SDF control run."""

    ctx: AbstractContextManager = field(default_factory=nullcontext)
    channels_last: bool = False
    zero_sdf: bool = False

    @classmethod
    def build(
        cls, device_type: str, *, amp: str = "off", channels_last: bool = False, zero_sdf: bool = False
    ) -> Forward:
        """The autocast context is built once and re-entered every batch (as nanoGPT's `ctx`)."""
        ctx = nullcontext() if amp == "off" else torch.autocast(device_type, dtype=AMP_DTYPES[amp])
        return cls(ctx, channels_last, zero_sdf)

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The model's (standardised) scores for a batch, float32."""
        sdf = torch.zeros_like(batch.sdf) if self.zero_sdf else batch.sdf
        if self.channels_last:
            sdf = sdf.contiguous(memory_format=torch.channels_last_3d)
        with self.ctx:
            return model(sdf, batch.grasps, batch.scene_of_grasp).float()


def train_step(
    net: torch.nn.Module,
    batch: Batch,
    *,
    forward: Forward,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scores: Standardiser,
    step: int,
) -> float:
    """One optimisation step on standardised scores; returns the loss. `step` names it in errors."""
    loss = F.mse_loss(forward(net, batch), scores.encode(batch.scores))
    value = loss.item()  # the step's one device sync: checked here, logged by the caller
    if not math.isfinite(value):
        _check_inputs(batch, step)
        raise TrainError(
            f"non-finite loss ({value}) at step {step}, batch of scenes "
            f"{batch.scene_ids.tolist()}; lower --lr, or try --amp off"
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return value


def _check_inputs(batch: Batch, step: int) -> None:
    """TrainError naming the scenes whose SDF, grasps or scores hold NaN or inf (the data's fault, not --lr's)."""
    grasp_rows = ~torch.isfinite(torch.cat([batch.grasps, batch.scores[:, None]], 1)).all(1)
    bad_sdf = ~torch.isfinite(batch.sdf).flatten(1).all(1)
    bad = {"SDF": batch.scene_ids[bad_sdf], "grasps or scores": batch.scene_ids[batch.scene_of_grasp[grasp_rows]]}
    found = [f"{what} of scenes {sorted(set(ids.tolist()))}" for what, ids in bad.items() if len(ids)]
    if found:
        raise TrainError(
            f"non-finite loss at step {step}: non-finite input data ({'; '.join(found)} hold NaN or "
            f"inf); the dataset is damaged: check it with gq shards verify and rebuild it"
        )


def evaluate(
    model: torch.nn.Module,
    loader: Loader,
    *,
    scores: Standardiser,
    forward: Forward | None = None,
    prefix: str = "val_",
    baseline: float | None = None,
    parts: dict[str, tuple[int, int]] | None = None,
) -> dict[str, float]:
    """Metrics in score units over every grasp of the loader's split (whole scenes per group, epoch 0's order).

    `baseline` is the train split's mean score, whose MSE is reported beside the model's (default: `scores.mean`,
    which it is when the model was trained on this dataset). `parts`: name -> a range [first, end) of scene ids
    (a mixture's datasets, `MixedDataset.scene_ranges`): each part's metrics too, from the same pass, as
    `{prefix}{name}_{metric}`."""
    forward = forward or Forward()
    was_training = model.training
    model.eval()
    metrics = Metrics(loader.device)
    by_part = {name: Metrics(loader.device) for name in parts or {}}
    loader.set_epoch(0)
    with torch.no_grad():
        for batch in loader:
            pred = scores.decode(forward(model, batch))
            metrics.add(pred, batch.scores, batch.scene_of_grasp, batch.num_scenes)
            scene = batch.scene_ids[batch.scene_of_grasp]
            for name, (first, end) in (parts or {}).items():
                mine = (scene >= first) & (scene < end)
                by_part[name].add(pred[mine], batch.scores[mine], batch.scene_of_grasp[mine], batch.num_scenes)
    model.train(was_training)
    baseline = scores.mean if baseline is None else baseline
    result = metrics.result(baseline=baseline, prefix=prefix)
    for name, part in by_part.items():
        result.update(part.result(baseline=baseline, prefix=f"{prefix}{name}_"))
    return result
