"""Every option of a training run, in one place; written to RUN_DIR/config.json."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from gq.common.errors import UsageError
from gq.common.options import flag, option
from gq.models import MODEL_KINDS
from gq.pipeline import DEFAULT_WINDOW, MODES, parse_window

AMP_MODES = ("off", "bf16", "fp16")
LR_SCHEDULES = ("plateau", "linear")
DEVICES = ("auto", "cpu", "cuda")
# Options that may change between a run and its --resume: they do not change what is computed.
RESUMABLE = {"resume", "overwrite", "epochs", "max_steps", "max_time", "log_every", "ckpt_every", "threads", "progress"}
# Compared by identity, not spelling: the dataset by its fingerprint, the run folder by being the one resumed.
IDENTITIES = {"shards", "out"}


# fit's defaults were chosen by measurement (docs/benchmarks.md, "Choosing fit's defaults"): the seed's train_gq.py
# values (lr 1e-3, weight decay 1e-5, c=8 for the small model) with the plateau schedule, which beat train_gq.py's
# linear decay at the same budget and needs no planned length (--max-time runs); the seed README's values (lr 1e-4,
# weight decay 1e-4, c=16) learn far less in the same steps. Users stop on time, so the batch shape was chosen by
# quality per second (`bench_train --time-study`): G=64 grasps per SDF trains ~3x the grasps per second of G=16 at
# S=8, and S=16 gives fewer steps for no gain at these budgets.
BASE_CHANNELS = {"small": 8}  # a fresh model's width where it differs from the model class's own default

# Options that count things: each must be at least 1 (None, where allowed, means "not set").
POSITIVE = ("scenes_per_batch", "grasps_per_scene", "epochs", "log_every", "ckpt_every", "val_scenes_per_batch",
            "max_steps", "val_every", "base_channels", "threads")  # fmt: skip


class ConfigError(UsageError):
    """An option value that cannot work; `str()` names the flag and the reason."""


@dataclass
class FitConfig:
    """A run's options; each field with help text is a `fit` / `compare` option (train/run.py derives them)."""

    shards: str = option(help="Shard dataset directory.")
    out: str = option(help="Run directory.")
    loader: str = option("cache", choices=MODES, help="Full cache in memory, or DALI streaming of whole shards.")
    model: str | None = option(
        None, choices=tuple(MODEL_KINDS),
        help="GQEstimator (small) or GQEstimatorLarge (large) [default: small, or --init-from's].",
    )  # fmt: skip
    base_channels: int | None = option(
        None, help="Conv channels c (c, 2c, 4c, 8c) [default: 8 for small, 32 for large, or --init-from's]."
    )
    fc_dims: tuple[int, ...] | None = option(None, help="Head sizes, comma-separated, e.g. 256,128,64.")
    scenes_per_batch: int = option(8, short="-S", help="SDFs per batch.")
    grasps_per_scene: int = option(64, short="-G", help="Grasps per SDF per batch (1 = the seed's independent grasps).")
    shuffle_window: int | str = option(
        DEFAULT_WINDOW, help="Shards per shuffle window (each rank reads its shards a window at a time), or 'all'."
    )
    epochs: int = option(100, help="Passes over the train split.")
    max_steps: int | None = option(None, help="Stop after this many steps (overrides --epochs).")
    max_time: float | None = option(None, help="Stop after this many seconds of training (validation not counted).")
    lr: float = option(1e-3, help="Adam learning rate (the seed's README: 1e-4).")
    weight_decay: float = option(1e-5, help="Adam weight decay (the seed's README: 1e-4).")
    lr_schedule: str = option(
        "plateau", choices=LR_SCHEDULES,
        help="plateau: lr x --plateau-factor after --plateau-patience validations without improvement; "
        "linear: lr x 1 -> --lr-end-factor over the planned steps (the seed's train_gq.py).",
    )  # fmt: skip
    lr_end_factor: float = option(0.05, help="Linear schedule: the last step's lr, as a fraction of --lr.")
    plateau_factor: float = option(0.5, help="Plateau schedule: lr multiplier when val MSE stops improving.")
    plateau_patience: int = option(5, help="Plateau schedule: validations without improvement before lowering lr.")
    early_stopping: int = option(15, help="Stop after this many validations without improvement (0: never).")
    amp: str = option("off", choices=AMP_MODES, help="Mixed precision of the forward pass.")
    channels_last: bool = option(False, help="channels_last_3d memory format.")
    compile: bool = option(False, help="torch.compile the model.")
    device: str = option("auto", choices=DEVICES, help="auto: CUDA when present, else CPU.")
    seed: int = option(0, help="Seed of the model's initialisation and the epoch plan.")
    resume: bool = option(False, help="Continue the run in --out from its last.pt.")
    overwrite: bool = option(False, help="Replace the run in --out.")
    init_from: str | None = option(
        None, help="Start from a checkpoint: ours (best.pt/last.pt) or the seed's state_dict files."
    )
    val_every: int | None = option(None, help="Steps between validations [default: one epoch].")
    val_scenes_per_batch: int = option(8, help="SDFs per validation batch (each with all its grasps).")
    log_every: int = option(10, help="Steps between metrics rows.")
    ckpt_every: int = option(500, help="Steps between last.pt saves (also saved at every validation and at the end).")
    zero_sdf: bool = option(False, help="Control run: feed zeros instead of the SDFs.")
    threads: int | None = option(None, help="torch CPU threads [default: torch's].")
    progress: bool = option(True, flag="--progress/--quiet", help="Progress bars (--quiet: none).")

    def __post_init__(self) -> None:
        # The command line gives text: "4" is the number 4, "256,128" the head sizes (256, 128).
        if isinstance(self.shuffle_window, str) and self.shuffle_window.isdigit():
            self.shuffle_window = int(self.shuffle_window)
        if isinstance(self.fc_dims, str):
            self.fc_dims = parse_fc_dims(self.fc_dims)
        for name in ("shards", "out", "init_from"):  # paths are recorded as text in config.json
            if getattr(self, name) is not None:
                setattr(self, name, str(getattr(self, name)))

    def check(self) -> None:
        """ConfigError naming the flag of the first option value that cannot work."""
        for name in ("lr", "weight_decay", "max_time"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):  # NaN passes every comparison below
                hint = " (leave --max-time out for no limit)" if name == "max_time" else ""
                raise ConfigError(f"{_flag(name)} {value}: must be a finite number{hint}")
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{_flag(f.name)} {value}: choose one of {', '.join(choices)}")
        for name in POSITIVE:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{_flag(name)} {value}: must be at least 1")
        try:
            parse_window(self.shuffle_window)
        except ValueError as err:
            raise ConfigError(f"--shuffle-window: {err}") from None
        if self.max_time is not None and self.max_time <= 0:
            raise ConfigError(f"--max-time {self.max_time}: must be > 0 seconds")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"--lr {self.lr} --weight-decay {self.weight_decay}: need lr > 0 and weight decay >= 0")
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


def _flag(name: str) -> str:
    return flag(FitConfig, name)
