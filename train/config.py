"""Every option of a training run, in one place; written to RUN_DIR/config.json."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from pipeline import DEFAULT_WINDOW, parse_window

AMP_MODES = ("off", "bf16", "fp16")
LR_SCHEDULES = ("plateau", "linear")
DEVICES = ("auto", "cpu", "cuda")
# Options that may change between a run and its --resume: they do not change what is computed.
RESUMABLE = {"resume", "overwrite", "epochs", "max_steps", "max_time", "log_every", "ckpt_every", "threads", "progress"}
# Compared by identity, not spelling: the dataset by its fingerprint, the run folder by being the one resumed.
IDENTITIES = {"shards", "out"}


class ConfigError(ValueError):
    """An option value that cannot work; `str()` names the flag and the reason."""


@dataclass
class FitConfig:
    shards: str
    out: str
    loader: str = "cache"
    model: str | None = None  # small, large; None: small, or the kind of --init-from
    base_channels: int | None = None
    fc_dims: tuple[int, ...] | None = None
    scenes_per_batch: int = 8
    grasps_per_scene: int = 16
    shuffle_window: int | str = DEFAULT_WINDOW  # shards per shuffle window, or "all"
    epochs: int = 100
    max_steps: int | None = None
    max_time: float | None = None  # seconds of training (validation excluded)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_schedule: str = "plateau"  # plateau: ReduceLROnPlateau on val MSE; linear: lr x 1 -> lr_end_factor over the run
    lr_end_factor: float = 0.05
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    early_stopping: int = 15
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    init_from: str | None = None
    val_every: int | None = None
    val_scenes_per_batch: int = 8
    log_every: int = 10
    ckpt_every: int = 500
    zero_sdf: bool = False
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.shuffle_window, str) and self.shuffle_window.isdigit():
            self.shuffle_window = int(self.shuffle_window)  # "4" from the command line is the number 4

    def check(self) -> None:
        for flag, value in {"--lr": self.lr, "--weight-decay": self.weight_decay, "--max-time": self.max_time}.items():
            if value is not None and not math.isfinite(value):  # NaN passes every comparison below
                raise ConfigError(
                    f"{flag} {value}: must be a finite number (leave --max-time out for no limit)"
                    if flag == "--max-time"
                    else f"{flag} {value}: must be a finite number"
                )
        if self.loader not in ("cache", "dali"):
            raise ConfigError(f"--loader {self.loader}: choose cache or dali")
        if self.model not in (None, "small", "large"):
            raise ConfigError(f"--model {self.model}: choose small or large")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"--amp {self.amp}: choose one of {', '.join(AMP_MODES)}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device {self.device}: choose one of {', '.join(DEVICES)}")
        positive = {
            "--scenes-per-batch": self.scenes_per_batch,
            "--grasps-per-scene": self.grasps_per_scene,
            "--epochs": self.epochs,
            "--log-every": self.log_every,
            "--ckpt-every": self.ckpt_every,
            "--val-scenes-per-batch": self.val_scenes_per_batch,
            "--max-steps": self.max_steps,
            "--val-every": self.val_every,
            "--base-channels": self.base_channels,
            "--threads": self.threads,
        }
        for flag, value in positive.items():
            if value is not None and value < 1:
                raise ConfigError(f"{flag} {value}: must be at least 1")
        try:
            parse_window(self.shuffle_window)
        except ValueError as err:
            raise ConfigError(f"--shuffle-window: {err}") from None
        if self.max_time is not None and self.max_time <= 0:
            raise ConfigError(f"--max-time {self.max_time}: must be > 0 seconds")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"--lr {self.lr} --weight-decay {self.weight_decay}: need lr > 0 and weight decay >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule {self.lr_schedule}: choose one of {', '.join(LR_SCHEDULES)}")
        if not 0 < self.lr_end_factor <= 1:
            raise ConfigError(f"--lr-end-factor {self.lr_end_factor}: must be in (0, 1]")
        if self.early_stopping < 0 or self.plateau_patience < 0 or not 0 < self.plateau_factor < 1:
            raise ConfigError("--early-stopping and --plateau-patience must be >= 0, --plateau-factor in (0, 1)")
        if self.fc_dims is not None and (not self.fc_dims or min(self.fc_dims) < 1):
            raise ConfigError(f"--fc-dims {self.fc_dims}: comma-separated positive sizes, e.g. 256,128,64")

    @property
    def window(self) -> int | None:
        """The shuffle window in shards (None: all of the rank's shards)."""
        return parse_window(self.shuffle_window)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fc_dims"] = list(self.fc_dims) if self.fc_dims is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FitConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if d.get("fc_dims") is not None:
            d["fc_dims"] = tuple(d["fc_dims"])
        return cls(**d)

    def differences(self, other: FitConfig) -> list[str]:
        """Options (other than RESUMABLE ones and IDENTITIES) whose values differ, as 'name: a != b'."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if k not in RESUMABLE | IDENTITIES and a[k] != b[k]]


def parse_fc_dims(text: str | None) -> tuple[int, ...] | None:
    """'256,128,64' -> (256, 128, 64)."""
    if text is None or text == "":
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--fc-dims {text}: comma-separated integers, e.g. 256,128,64") from None
