"""Experiment trackers beside metrics.jsonl: TensorBoard (--tensorboard) and Weights & Biases (--wandb PROJECT).

Both get the same scalars, grouped by what they measure (`train/…`, `val/…`, `perf/…`; see `scalars`), and
the run's options as hyperparameters. Each lives in an extra of its own, imported only when asked for; a
missing one is a one-line error naming the extra to install (FitConfig.check looks before any data is read).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gq.common.files import temporary_file

from .files import WriteError

log = logging.getLogger(__name__)

# metrics row key -> tag. Counts (val_grasps, val_scenes), the step, epoch and time_s (every event records
# its step and wall time already) are not scalars worth plotting, so they have no tag.
TAGS = {
    "train_mse": "train/mse",  # score units, comparable to val/mse
    "loss": "train/loss_standardised",  # what the optimiser minimises: MSE of standardised scores
    "lr": "train/lr",
    "samples_per_s": "perf/samples_per_s",
    "data_wait": "perf/data_wait",
}
VAL_COUNTS = ("_grasps", "_scenes")  # val_grasps, and each dataset's of a mixture: val_NAME_grasps
# The hyperparameter view's metrics: how good the run's model is.
HPARAM_METRICS = ("val/mse", "val/mae", "val/r2", "val/spearman", "val/top1_regret")


def scalars(row: dict) -> dict[str, float]:
    """The tags and values of a metrics row: training keys by TAGS, validation keys val_X as val/X (a mixture's
    datasets' val_NAME_X as val/NAME_X)."""
    out = {TAGS[k]: v for k, v in row.items() if k in TAGS}
    out.update({"val/" + k[4:]: v for k, v in row.items() if k.startswith("val_") and not k.endswith(VAL_COUNTS)})
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def hparams(options: dict) -> dict[str, int | float | str | bool]:
    """The run's options as hyperparameter values: lists as "256,128,64", unset ones (None) left out."""
    flat = {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in options.items()}
    return {k: v for k, v in flat.items() if v is not None}


def check_folder(folder: Path, what: str) -> None:
    """WriteError unless `folder` is, or can be made, a folder a tracker can write in: checked before the tracker
    opens, so a file put in its place or a read-only folder is one line saying what to fix (nothing of the
    run is changed yet, so it stays resumable)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = temporary_file(folder / ".write-check")
    except OSError as err:
        raise WriteError(
            f"{folder}: {what} cannot be written ({err.strerror}); make it a writable folder (move away what is "
            f"there), then run again: --resume continues the run"
        ) from None
    os.close(fd)
    probe.unlink()


class TensorBoard:
    """Events in RUN_DIR/tensorboard; a resumed run purges what its killed predecessor logged after last.pt."""

    def __init__(self, folder: Path, *, options: dict, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        check_folder(folder, "TensorBoard's events")
        # purge_step: events at steps past the checkpoint, logged by the run that was killed, are hidden, so
        # the curves read as one run (metrics.jsonl is truncated the same way).
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)
        for summary in hparams_summaries(hparams(options), dict.fromkeys(HPARAM_METRICS)):
            self.writer.file_writer.add_summary(summary)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A wandb run in RUN_DIR/wandb. Its id is kept in last.pt, so --resume continues the same wandb run.

    Mode: $WANDB_MODE when set (online, offline, disabled), else offline: a training job often runs where
    there is no network; `wandb sync RUN_DIR/wandb/offline-run-*` uploads an offline run later.
    """

    def __init__(self, folder: Path, *, project: str, options: dict, run_id: str | None) -> None:
        import wandb

        check_folder(folder / "wandb", "wandb's run files")
        mode = os.environ.get("WANDB_MODE") or "offline"
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
        self.run = wandb.init(
            project=project, dir=str(folder), id=run_id, resume="allow", config=options, name=folder.name,
            mode=mode, settings=settings,
        )  # fmt: skip
        self.id = self.run.id
        folder = Path(self.run.dir).parent  # RUN_DIR/wandb/<mode>-run-<time>-<id>
        upload = f"; upload it with: wandb sync {folder}" if mode == "offline" else ""
        log.info("wandb: %s run %s of project %s in %s%s", mode, self.id, project, folder, upload)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers a run asked for, fed each metrics row (RunDir passes them on); `state` goes into last.pt."""

    def __init__(self, folder: Path, *, options: dict, start_step: int, state: dict | None) -> None:
        self._open: list[TensorBoard | Wandb] = []
        self.wandb: Wandb | None = None
        try:
            if options.get("tensorboard"):
                self._open.append(TensorBoard(folder / "tensorboard", options=options, start_step=start_step))
            if options.get("wandb"):
                run_id = (state or {}).get("wandb_id")
                self.wandb = Wandb(folder, project=options["wandb"], options=options, run_id=run_id)
                self._open.append(self.wandb)
        except BaseException:
            self.close()
            raise

    def log(self, row: dict) -> None:
        values = scalars(row)
        if values:
            for tracker in self._open:
                tracker.log(row["step"], values)

    def state(self) -> dict:
        """What --resume needs to continue the same tracker runs."""
        return {"wandb_id": self.wandb.id if self.wandb else None}

    def close(self) -> None:
        while self._open:
            self._open.pop().close()
