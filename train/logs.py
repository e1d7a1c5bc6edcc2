"""What `fit` tells a person while it runs: a progress bar on a terminal, plain log lines a batch job's log keeps.

On a terminal the tqdm bar shows the train MSE (score units, like every other figure) and samples/s of the
last metrics row. Anywhere else (SLURM, `| tee`, a file) a bar would be one endless line of carriage returns,
so instead a line goes to the "gq.train.logs" logger every --log-every steps or INTERVAL_S seconds, whichever
comes first. Either way each validation is one line as it happens. All of it goes through `logging`, so a
handler a user configures sees it too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)
INTERVAL_S = 30.0  # at most this long between two progress lines of a slow run
# Validation metrics a line shows (label, metrics row key): the error, then how well each object's grasps rank.
VAL_FIELDS = (("MSE", "val_mse"), ("MAE", "val_mae"), ("R2", "val_r2"), ("Spearman", "val_spearman"),
              ("Kendall", "val_kendall_tau"), ("top-1 regret", "val_top1_regret"))  # fmt: skip


class TrainLog:
    """The training loop's progress: `step` after each step, `log` with each metrics row (RunDir passes it on).

    `initial` is the step the run starts at (a resumed run's checkpoint step). `enabled` False (--quiet, or
    a rank other than 0) says nothing. `score_std` turns the standardised training loss into score units.
    A context manager: the bar (and the logging redirect that keeps log lines from tearing it) lives inside
    the `with`.
    """

    def __init__(
        self,
        *,
        total: int,
        initial: int,
        steps_per_epoch: int,
        log_every: int,
        score_std: float,
        enabled: bool,
        stream: TextIO | None = None,
        interval_s: float = INTERVAL_S,
    ) -> None:
        stream = stream or sys.stderr
        self.terminal = enabled and stream.isatty()
        self.lines = enabled and not self.terminal
        self.total, self.steps_per_epoch, self.log_every = total, steps_per_epoch, log_every
        self.score_var, self.interval_s = score_std**2, interval_s
        self._stack = contextlib.ExitStack()
        self._bar: tqdm | None = None
        self._stream, self._initial = stream, initial
        self._since = _Since(step=initial)

    def __enter__(self) -> TrainLog:
        if self.terminal:
            self._bar = self._stack.enter_context(
                tqdm(total=self.total, initial=self._initial, unit="step", dynamic_ncols=True, file=self._stream)
            )
            self._stack.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._bar = None

    def step(self, step: int, *, loss: float, samples: int, elapsed: float, lr: float) -> None:
        """One training step done (`loss` standardised, as the optimiser sees it)."""
        if self._bar is not None:
            self._bar.update(1)
        since = self._since
        since.step, since.lr = step, lr
        since.loss += loss
        since.steps += 1
        since.samples += samples
        since.time += elapsed
        if self.lines and (step % self.log_every == 0 or time.monotonic() - since.started >= self.interval_s):
            self._line()

    def log(self, row: dict) -> None:
        """A metrics row: a validation's is one line; a training row updates the bar (the line went at `step`)."""
        if "val_mse" in row:
            if self.terminal or self.lines:
                log.info(validation_line(row))
        elif self._bar is not None and "train_mse" in row:
            self._bar.set_postfix_str(f"train MSE {row['train_mse']:.4f}  {row['samples_per_s']:,.0f} samples/s")
        elif self.lines and self._since.steps:  # the last step of a run, when it is not a multiple of --log-every
            self._line()

    def _line(self) -> None:
        s = self._since
        rate = s.samples / s.time if s.time else math.nan
        log.info(
            "step %d/%d  epoch %.2f  train MSE %.4f  %s samples/s  lr %.3g",
            s.step, self.total, s.step / self.steps_per_epoch, s.loss / s.steps * self.score_var, f"{rate:,.0f}", s.lr,
        )  # fmt: skip
        self._since = _Since(step=s.step)


class _Since:
    """Sums over the steps since the last progress line."""

    def __init__(self, step: int = 0) -> None:
        self.step, self.lr = step, math.nan
        self.loss, self.steps, self.samples, self.time = 0.0, 0, 0, 0.0
        self.started = time.monotonic()


def validation_line(row: dict) -> str:
    """One validation's metrics row as a line: its step and epoch, then VAL_FIELDS (those it has)."""
    figures = "  ".join(f"{label} {row[key]:.4f}" for label, key in VAL_FIELDS if key in row)
    # a mixture's datasets (val_NAME_mse, val_NAME_r2): the two figures of each, after the mixture's
    parts = [k[4:-4] for k in row if k.startswith("val_") and k.endswith("_mse") and k != "val_mse"]
    each = "".join(f"; {name}: MSE {row[f'val_{name}_mse']:.4f}  R2 {row[f'val_{name}_r2']:.4f}" for name in parts
                   if f"val_{name}_r2" in row)  # fmt: skip
    return f"validation at step {row['step']} (epoch {row['epoch']:.2f}): {figures}{each}"
