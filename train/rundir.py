"""RUN_DIR: config.json, metrics.jsonl (each row also to the sinks: progress lines, trackers), summary.json, plots.

RUN_DIR records what a run writes (`gq.common.ownership`): `--overwrite` removes only that.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from gq.common.files import check_writable
from gq.common.ownership import Owned, check_replaceable, remove_owned, write_record

from .config import ConfigError, FitConfig
from .files import WriteError, write_atomically
from .tracking import Trackers

OUTPUTS = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "curves.png", "tensorboard", "wandb")
FOLDERS = ("tensorboard", "wandb")  # owned with everything in them
TOOL = "fit"
RUN_ENTRIES = tuple(name + "/" if name in FOLDERS else name for name in OUTPUTS)  # its ownership record
TB_EVENTS = "events.out.tfevents."  # the name TensorBoard's writer gives its files
LOCK = ".run.lock"  # exists while a run holds RUN_DIR (and after a kill -9, unlocked: the next run takes it)
log = logging.getLogger("train")


def _holder(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "a run still starting"
    except OSError:
        return "a run that just ended"


def _legacy_run(path: Path) -> Owned | None:
    """A run folder written before ownership records, recognised exactly: a config.json of ours (options,
    resolved, versions), only run files besides, a tensorboard/ holding only event files; else None."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(config, dict) and set(config) == {"options", "resolved", "versions"}):
        return None
    board = path / "tensorboard"
    if (
        board.is_dir()
        and not board.is_symlink()
        and not all(e.name.startswith(TB_EVENTS) and e.is_file() and not e.is_symlink() for e in board.iterdir())
    ):
        return None
    return Owned(TOOL, frozenset(RUN_ENTRIES))


def _is_run_dir(path: Path) -> bool:
    return (path / "config.json").exists() or (path / "last.pt").exists()


@contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """Hold RUN_DIR for one run: an exclusive flock on RUN_DIR/.run.lock, taken before anything else is
    written there, so a second run into the same --out is refused naming the holder (pid, host, command).

    A file, or a folder holding other things than a run, is refused before anything is created. Under
    the lock, temporaries left by a killed run are removed; on exit the lock file (and the folder, when
    this call made it and nothing was written) goes again.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: is a file, not a directory; choose a directory for the run")
    check_writable(path, flag="--out")
    if path.is_dir() and not _is_run_dir(path) and any(p.name != LOCK for p in path.iterdir()):
        raise ConfigError(f"--out {path}: not empty and not a run directory; choose a new directory")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ConfigError(
                f"--out {path}: in use by another run ({_holder(lock)}); wait for it to end or choose another --out"
            ) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break  # else the previous holder removed the file between our open and flock: take the new one
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {started}: {shlex.join(sys.argv)}"
        try:
            os.write(fd, holder.encode() + b"\n")
        except OSError as err:
            raise WriteError(
                f"{lock}: could not be written ({err.strerror}); free disk space or choose another --out"
            ) from None
        for name in OUTPUTS:  # no other run can be writing these: they were left by a killed one
            for stale in path.glob(f".{name}*.tmp"):
                stale.unlink()
        yield
    finally:
        try:  # removed while still held, so an opener that raced us sees the inode change and retries
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)
        if created and not any(path.iterdir()):
            path.rmdir()


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

    Only what an earlier fit recorded (or an older fit's exact layout) is ever removed, and only with
    `overwrite`: anything else, a config.json of another tool included, refuses the folder untouched. Changes
    nothing, so a command that starts several runs (compare) checks each before any of them starts.
    """
    owned = check_replaceable(path, tool=TOOL, overwrite=True, legacy=_legacy_run, ignore=(LOCK,))
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
        owned = replaceable_run(p, overwrite=cfg.overwrite)
        if owned is not None and self.writer:
            remove_owned(p, owned, ignore=(LOCK,))

    def write_config(self, cfg: FitConfig, resolved: dict) -> None:
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
            write_record(self.path, tool=TOOL, entries=RUN_ENTRIES)  # before the first run file: what it owns
            text = json.dumps({"options": cfg.to_dict(), "resolved": resolved, "versions": versions()}, indent=2)
            write_atomically(self.path / "config.json", lambda f: f.write((text + "\n").encode()))

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
