"""Figures a person would rather look at than read: loss curves, and the loader comparison."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from .files import write_atomically  # noqa: E402  (a full disk: one-line WriteError, as for run files)

COLORS = ["#4c72b0", "#dd8452"]  # one colour per loader, in the curves and the bars


def _log_y(ax) -> None:
    """Log scale with plain numbers (12, 20, 40), not 1.2x10^1."""
    ax.set_yscale("log")
    for axis in (ax.yaxis,):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    """curves.png: train MSE (per log window) and validation MSE over steps, in score units."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(*_series(rows, "train_mse"), label="train MSE (window mean)", lw=1.2)
    steps, val = _series(rows, "val_mse")
    ax.plot(steps, val, "o-", label="val MSE", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("MSE (score units)")
    _log_y(ax)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def plot_compare(
    runs: dict[str, list[dict]], *, table: dict[str, dict], baseline: float, path: Path, title: str
) -> None:
    """compare.png: both loaders' train and val MSE over steps with the mean-predictor's val MSE as a line (what
    learning nothing scores), and their throughput side by side."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    for (name, rows), style, color in zip(runs.items(), ("-", "--"), COLORS):
        left.plot(*_series(rows, "train_mse"), style, color=color, label=f"{name}: train (window mean)", lw=1.6)
        left.plot(*_series(rows, "val_mse"), "o" + style, color=color, label=f"{name}: val", lw=1.2, ms=4)
    left.axhline(baseline, color="grey", ls=":", lw=1.5, label=f"val, predicting the train mean ({baseline:.2f})")
    left.set_xlabel("training step")
    left.set_ylabel("MSE (score units², log scale)")
    _log_y(left)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    left.set_title("learning: below the grey line the model beats the mean (identical batches coincide)", fontsize=9)
    names = list(table)
    # A run of one step has no steady state (its first step is left out of the rates): no bar, "n/a".
    rates = [table[n]["samples_per_s"] or 0 for n in names]
    bars = right.bar(names, rates, color=COLORS[: len(names)])
    for bar, n in zip(bars, names):
        wait = "n/a" if table[n]["data_wait"] is None else f"{table[n]['data_wait']:.0%}"
        right.annotate(
            f"wait {wait}\nfirst batch {table[n]['first_batch_s']:.2f} s",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    right.set_xlabel("loader")
    right.set_ylabel("training samples/s (steady state)")
    right.set_title("throughput", fontsize=10)
    right.margins(y=0.25)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
