"""RUN_DIR: config.json, metrics.jsonl (each row also to the sinks: progress lines, trackers), summary.json, plots.

RUN_DIR records what a run writes (`gq.common.ownership`): `--overwrite` removes only that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from gq.common.files import check_writable
from gq.common.ownership import Lock, Owned, check_replaceable, read_record, remove_owned, seal_record, write_record

from .config import ConfigError, FitConfig
from .files import WriteError, write_atomically
from .tracking import Trackers

OUTPUTS = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "curves.png", "tensorboard", "wandb")
FOLDERS = ("tensorboard", "wandb")  # owned with everything in them
TOOL = "fit"
RUN_ENTRIES = tuple(name + "/" if name in FOLDERS else name for name in OUTPUTS)  # its ownership record
log = logging.getLogger("train")


@contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """Hold RUN_DIR for one run with the ownership lock beside it (`.<name>.lock`, `gq.common.ownership.Lock`),
    taken before anything is written there, so a second run into the same --out is refused naming the holder
    (pid, host, command, start).

    A file, or a folder holding anything without fit's record, is refused before anything is created. Under
    the lock, temporaries of the run's files that a killed run left are removed; on exit the lock file (and
    the parent folders this call made, if still empty) goes again.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: is a file, not a directory; choose a directory for the run")
    check_writable(path, flag="--out")
    if path.is_dir() and read_record(path) is None:
        check_replaceable(path, tool=TOOL, overwrite=True)  # anything there without a record is never ours
    made = [p for p in reversed(path.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = Lock(path, tool=TOOL)
    except OSError as err:
        _remove_empty(made)
        raise WriteError(
            f"--out {path}: cannot write in {path.parent} ({err.strerror}); choose another --out"
        ) from None
    try:
        for name in OUTPUTS:  # no other run can be writing these: they were left by a killed one
            for stale in path.glob(f".{name}.*tmp"):
                if stale.is_file() and not stale.is_symlink():
                    stale.unlink()
        yield
    finally:
        lock.release()
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):  # not empty: the run wrote there
            folder.rmdir()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "nvidia-dali": v("nvidia-dali-cuda120"),
        "gq-pipeline": v("gq-pipeline"),
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }


def replaceable_run(path: Path, *, overwrite: bool) -> Owned | None:
    """What a new run into `path` removes first (None: nothing), or ConfigError / OwnershipError in one line.

    Only what an earlier fit recorded, unchanged, is ever removed, and only with
    `overwrite`: anything else, a config.json of another tool included, refuses the folder untouched. Changes
    nothing, so a command that starts several runs (compare) checks each before any of them starts.
    """
    owned = check_replaceable(path, tool=TOOL, overwrite=True)
    if owned is None or not owned.entries:
        return None
    if not overwrite:
        raise ConfigError(f"--out {path}: already holds a run; pass --resume to continue it or --overwrite")
    return owned


class RunDir:
    """The files of one run; only the main rank writes."""

    def __init__(self, path: Path, writer: bool):
        self.path, self.writer = Path(path), writer
        self.trackers: Trackers | None = None
        self.sinks: list = []  # each gets every logged row (`.log(row)`): the progress lines, the trackers
        # metrics.jsonl as written so far (rows, sha256 of its bytes): last.pt records it, --resume checks it
        self._rows, self._digest = 0, hashlib.sha256()

    def prepare(self, cfg: FitConfig) -> None:
        """Refuse to mix runs: a new run needs an empty (or --overwrite) directory, --resume needs last.pt."""
        p = self.path
        if cfg.resume:
            if not (p / "last.pt").exists():
                raise ConfigError(f"--resume: {p / 'last.pt'} not found; start the run without --resume")
            return
        # Only what an earlier fit recorded, unchanged, is ever removed: anything else (a config.json of another
        # tool, a folder with its own record inside tensorboard/, a changed file) refuses the folder untouched.
        owned = replaceable_run(p, overwrite=cfg.overwrite)
        if owned is not None and self.writer:
            remove_owned(p, owned)

    def write_config(self, cfg: FitConfig, resolved: dict) -> None:
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
            write_record(self.path, tool=TOOL, entries=RUN_ENTRIES)  # before the first run file: what it owns
            text = json.dumps({"options": cfg.to_dict(), "resolved": resolved, "versions": versions()}, indent=2)
            write_atomically(self.path / "config.json", lambda f: f.write((text + "\n").encode()))

    def seal(self) -> None:
        """At the end of a run: its record claims each run file as now written (size and hash), so `--overwrite`
        keeps one changed later. A run that starts again (`--resume`) rewrites the record without claims."""
        if self.writer and (owned := read_record(self.path)) is not None:
            seal_record(self.path, owned)

    def truncate_metrics(self, step: int, record: dict | None) -> None:
        """On resume: drop rows logged after the checkpoint, so the file reads as one run, and hold what is kept
        to last.pt's `record` of it (`metrics_record`): a history deleted, trimmed or edited since is refused,
        never continued shorter. (Checkpoints older than the record are checked by their rows' steps alone.)

        A torn last line is what a kill during a write leaves: it is dropped (and logged). A line
        that does not parse anywhere else means the file was damaged: ConfigError names the line.
        """
        path = self.path / "metrics.jsonl"
        if not self.writer:
            return
        if path.exists() and not path.is_file():
            kind = "directory" if path.is_dir() else "special file"
            raise ConfigError(f"{path}: is not a file (a {kind}); put the run's metrics.jsonl back, then --resume")
        data = path.read_bytes() if path.exists() else b""
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
                if number == len(lines) and not data.endswith(b"\n"):  # a torn write never reached its newline
                    log.warning("%s: dropped a torn last line (a write cut short by a kill): %r", path, line[:60])
                    continue
                raise ConfigError(
                    f"{path}: line {number} is not a metrics row ({line[:60]!r}); the file is "
                    f"damaged: repair or delete that line, then --resume again"
                )
            if row["step"] <= step:
                kept.append(line + b"\n")
        text = b"".join(kept)
        expected = (record.get("rows"), record.get("sha256")) if isinstance(record, dict) else (None, None)
        if record is not None and (len(kept), hashlib.sha256(text).hexdigest()) != expected:
            state = "is missing" if not path.exists() else f"holds {len(kept)} rows up to step {step}"
            raise ConfigError(
                f"{path}: {state}, not the {expected[0]} rows that last.pt (step {step}) recorded (deleted, "
                f"trimmed or edited since); put the run's metrics.jsonl back, or start a new run from its weights: "
                f"--init-from {self.path / 'last.pt'} --out NEW_DIR"
            )
        if path.exists() or text:
            write_atomically(path, lambda f: f.write(text))
        self._rows, self._digest = len(kept), hashlib.sha256(text)

    def metrics_record(self) -> dict:
        """What last.pt keeps of metrics.jsonl: its rows and the sha256 of their bytes."""
        return {"rows": self._rows, "sha256": self._digest.hexdigest()}

    def log(self, row: dict) -> None:
        if not self.writer:
            return
        path = self.path / "metrics.jsonl"
        line = (json.dumps(row) + "\n").encode()
        try:
            with open(path, "ab") as f:
                f.write(line)
        except OSError as err:  # what is left is at worst a torn last line, which --resume drops
            raise WriteError(
                f"{path}: could not be written ({err.strerror}); free disk space (or choose "
                f"another --out), then rerun with --resume"
            ) from None
        self._rows += 1
        self._digest.update(line)
        for sink in self.sinks:
            sink.log(row)

    def rows(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def write_summary(self, summary: dict) -> None:
        if self.writer:
            text = json.dumps(summary, indent=2) + "\n"
            write_atomically(self.path / "summary.json", lambda f: f.write(text.encode()))

    def track(self, cfg: FitConfig, *, start_step: int, state: dict | None) -> None:
        """Open the trackers `cfg` asks for (TensorBoard, wandb); `state` is last.pt's, to continue their runs."""
        if self.writer:
            self.trackers = Trackers(self.path, options=cfg.to_dict(), start_step=start_step, state=state)
            self.sinks.append(self.trackers)

    def tracker_state(self) -> dict | None:
        """What last.pt keeps so that --resume continues the same tracker runs (the wandb run id)."""
        return self.trackers.state() if self.trackers else None

    def close(self) -> None:
        if self.trackers:
            self.trackers.close()
