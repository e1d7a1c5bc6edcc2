"""RUN_DIR: config.json, metrics.jsonl (+ TensorBoard events when installed), summary.json, plots."""
from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, FitConfig

OUTPUTS = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "curves.png", "tensorboard")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "nvidia-dali": v("nvidia-dali-cuda120"), "gq-pipeline": v("gq-pipeline"),
            "cuda": torch.version.cuda, "platform": platform.platform()}


class RunDir:
    """The files of one run; only the main rank writes."""

    def __init__(self, path: Path, writer: bool):
        self.path, self.writer = Path(path), writer
        self._tb = None

    def prepare(self, cfg: FitConfig) -> None:
        """Refuse to mix runs: a new run needs an empty (or --overwrite) directory, --resume needs last.pt."""
        p = self.path
        if cfg.resume:
            if not (p / "last.pt").exists():
                raise ConfigError(f"--resume: {p / 'last.pt'} not found; start the run without --resume")
            return
        if p.exists() and any(p.iterdir()):
            if not (p / "config.json").exists():
                raise ConfigError(f"--out {p}: not empty and not a run directory; choose a new directory")
            if not cfg.overwrite:
                raise ConfigError(f"--out {p}: already holds a run; pass --resume to continue it or --overwrite")
            if self.writer:
                for name in OUTPUTS:
                    target = p / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    else:
                        target.unlink(missing_ok=True)

    def write_config(self, cfg: FitConfig, resolved: dict) -> None:
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"options": cfg.to_dict(), "resolved": resolved, "versions": versions()}, indent=2)
            (self.path / "config.json").write_text(text + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, so the file reads as one run."""
        path = self.path / "metrics.jsonl"
        if self.writer and path.exists():
            rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(r + "\n" for r in rows))

    def log(self, row: dict) -> None:
        if not self.writer:
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.path / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = False
        if self._tb:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])

    def rows(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def write_summary(self, summary: dict) -> None:
        if self.writer:
            (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        if self._tb:
            self._tb.close()
