"""Every option of a training run, in one place; written to RUN_DIR/config.json."""

from __future__ import annotations

import logging
import math
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import InitVar, asdict, dataclass, fields
from pathlib import Path

from gq.common.errors import UsageError
from gq.common.extras import missing_extra
from gq.common.inputs import InputError, parse_json, read_small_file
from gq.common.options import flag, option
from gq.common.sizes import SizeError, parse_size
from gq.models import GRID_DIVISOR, MODEL_KINDS, ModelSizeError, check_model_size
from gq.pipeline import DEFAULT_GRASPS_PER_SDF, DEFAULT_WINDOW, MODES, parse_window

log = logging.getLogger(__name__)

AMP_MODES = ("off", "bf16", "fp16")
LR_SCHEDULES = ("plateau", "linear")
DEVICES = ("auto", "cpu", "cuda")
# Options that may change between a run and its --resume: they do not change what is computed.
RESUMABLE = {"resume", "overwrite", "epochs", "max_steps", "max_time", "log_every", "ckpt_every", "threads", "progress",
             "tensorboard", "wandb", "cache_dir", "cache_limit"}  # fmt: skip
# What one command does rather than how the run trains: taken from the command line only, never from a file
# (a resumed run's config.json says resume: true; given back as --config for a new run it must not resume).
ACTIONS = ("resume", "overwrite")
# Compared by identity, not spelling: the dataset by its fingerprint, the run folder by being the one resumed.
IDENTITIES = {"shards", "out"}
# Options renamed, by old name: the old one still works as a flag, a config key and in a run's config.json or last.pt
# (-G counts grasps per SDF in a batch; `gq scenes --grasps-per-scene` counts the grasps a scene is made with).
RENAMED = {"grasps_per_scene": "grasps_per_sdf"}


# fit's defaults were chosen by measurement (docs/benchmarks.md, "Choosing fit's defaults"): the seed's train_gq.py
# values (lr 1e-3, weight decay 1e-5, c=8 for the small model) with the plateau schedule, which beat train_gq.py's
# linear decay at the same budget and needs no planned length (--max-time runs); the seed README's values (lr 1e-4,
# weight decay 1e-4, c=16) learn far less in the same steps. Users stop on time, so the batch shape was chosen by
# quality per second (`bench_train --time-study`): G=64 grasps per SDF trains ~3x the grasps per second of G=16 at
# S=8, and S=16 gives fewer steps for no gain at these budgets.
BASE_CHANNELS = {"small": 8}  # a fresh model's width where it differs from the model class's own default

# torch.manual_seed and the epoch plan's generators take a seed as a signed 64-bit integer.
MAX_SEED = 2**63 - 1

# Options that count things: each must be at least 1 (None, where allowed, means "not set").
POSITIVE = ("scenes_per_batch", "grasps_per_sdf", "epochs", "log_every", "ckpt_every", "val_scenes_per_batch",
            "max_steps", "val_every", "base_channels", "threads")  # fmt: skip


class ConfigError(UsageError):
    """An option value that cannot work; `str()` names the flag and the reason."""


@dataclass
class FitConfig:
    """A run's options; each field with help text is a `fit` / `compare` option (gq.tools.training derives them)."""

    shards: str = option(help="Shard dataset directory, or its URL (s3://bucket/prefix, gs://..., https://...).")
    out: str = option(help="Run directory.")
    cache_dir: str | None = option(
        None, help="Local cache of a --shards URL, shared by the ranks of a node [default: $XDG_CACHE_HOME/gq or "
        "~/.cache/gq]."
    )  # fmt: skip
    cache_limit: str | None = option(
        None, help="The most that cache holds, e.g. 800KB, 20GB, 1.5TiB [default: the disk's space]."
    )  # fmt: skip
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
    grasps_per_sdf: int = option(
        DEFAULT_GRASPS_PER_SDF, short="-G", help="Grasps per SDF per batch (1 = the seed's independent grasps)."
    )
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
    progress: bool = option(
        True, flag="--progress/--quiet",
        help="A progress bar on a terminal, a progress line every --log-every steps or 30 s otherwise (--quiet: none).",
    )  # fmt: skip
    tensorboard: bool = option(
        False, flag="--tensorboard/--no-tensorboard",
        help="Write TensorBoard events to RUN_DIR/tensorboard (needs the tensorboard extra).",
    )  # fmt: skip
    wandb: str | None = option(
        None,
        help="Log to this Weights & Biases project (needs the wandb extra; offline unless WANDB_MODE says otherwise).",
    )
    grasps_per_scene: InitVar[int | None] = None  # the old name of grasps_per_sdf (deprecated; not an option)

    def __post_init__(self, grasps_per_scene: int | None) -> None:
        if grasps_per_scene is not None:
            if self.grasps_per_sdf not in (DEFAULT_GRASPS_PER_SDF, grasps_per_scene):
                raise ConfigError(
                    f"grasps_per_scene {grasps_per_scene} and grasps_per_sdf {self.grasps_per_sdf}: one option by two "
                    "names (grasps_per_scene is its old name); give grasps_per_sdf only"
                )
            warnings.warn(
                "FitConfig(grasps_per_scene=...) is deprecated: it is grasps_per_sdf, the grasps of each SDF per batch",
                DeprecationWarning,
                stacklevel=3,  # the caller of the dataclass's __init__
            )
            self.grasps_per_sdf = grasps_per_scene
        # The command line gives text: "4" is the number 4, "256,128" the head sizes (256, 128).
        if isinstance(self.shuffle_window, str) and self.shuffle_window.isdigit():
            self.shuffle_window = int(self.shuffle_window)
        if isinstance(self.fc_dims, str):
            self.fc_dims = parse_fc_dims(self.fc_dims)
        elif isinstance(self.fc_dims, list):  # as JSON holds it
            self.fc_dims = tuple(self.fc_dims)
        for name in ("shards", "out", "init_from", "cache_dir"):  # paths are recorded as text in config.json
            if getattr(self, name) is not None:
                setattr(self, name, str(getattr(self, name)))

    def check(self, *, spell: Callable[[str], str] | None = None) -> None:
        """ConfigError naming the first option value that cannot work: by its flag, or as `spell` names a field."""
        name = spell or _flag
        if self.resume and self.overwrite:
            raise ConfigError(
                f"{name('resume')} and {name('overwrite')}: choose one ({name('resume')} continues the run in "
                f"{name('out')}, {name('overwrite')} replaces it)"
            )
        for key in ("lr", "weight_decay", "max_time"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):  # NaN passes every comparison below
                hint = f" (leave {name('max_time')} out for no limit)" if key == "max_time" else ""
                raise ConfigError(f"{name(key)} {value}: must be a finite number{hint}")
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{name(f.name)} {value}: choose one of {', '.join(choices)}")
        for key in POSITIVE:
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{name(key)} {value}: must be at least 1")
        try:
            parse_window(self.shuffle_window)
        except ValueError as err:
            raise ConfigError(f"{name('shuffle_window')}: {err}") from None
        if self.cache_limit is not None:
            try:
                parse_size(self.cache_limit, what=name("cache_limit"))
            except SizeError as err:
                raise ConfigError(str(err)) from None
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"{name('seed')} {self.seed}: must be an integer from 0 to {MAX_SEED} (2**63 - 1)")
        if self.max_time is not None and self.max_time <= 0:
            raise ConfigError(f"{name('max_time')} {self.max_time}: must be > 0 seconds")
        if self.lr <= 0:
            raise ConfigError(f"{name('lr')} {self.lr}: must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"{name('weight_decay')} {self.weight_decay}: must be >= 0")
        if not 0 < self.lr_end_factor <= 1:
            raise ConfigError(f"{name('lr_end_factor')} {self.lr_end_factor}: must be in (0, 1]")
        for key in ("early_stopping", "plateau_patience"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{name(key)} {getattr(self, key)}: must be >= 0")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"{name('plateau_factor')} {self.plateau_factor}: must be in (0, 1)")
        if self.fc_dims is not None and (not self.fc_dims or min(self.fc_dims) < 1):
            raise ConfigError(f"{name('fc_dims')} {self.fc_dims}: comma-separated positive sizes, e.g. 256,128,64")
        self._check_model_size(name)
        for key in ("tensorboard", "wandb"):  # before any data is read: a missing extra fails at once
            if getattr(self, key) and (missing := missing_extra(key, key)):
                raise ConfigError(f"{name(key)}: {missing}")

    def _check_model_size(self, name: Callable[[str], str]) -> None:
        """ConfigError naming --base-channels or --fc-dims when the model would be too large to build even on the
        smallest grid (the dataset's grid is checked when the model is built)."""
        kind = self.model or "small"
        channels = self.base_channels or BASE_CHANNELS.get(kind)
        try:
            check_model_size(kind, input_size=GRID_DIVISOR, base_channels=channels, fc_dims=self.fc_dims)
        except ModelSizeError as err:
            raise ConfigError(f"{name(err.option)} {_shown(getattr(self, err.option))}: {err}") from None

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
        """The options a run recorded (last.pt's copy of them), old names (RENAMED) read as today's."""
        known = {f.name for f in fields(cls)}
        d = {RENAMED.get(k, k): v for k, v in d.items() if RENAMED.get(k, k) in known}
        if d.get("fc_dims") is not None:
            d["fc_dims"] = tuple(d["fc_dims"])
        return cls(**d)

    def differences(self, run: FitConfig) -> list[str]:
        """Options (other than RESUMABLE ones and IDENTITIES) set otherwise than in `run`, as flags would spell
        them: '--lr 0.01 (the run: 0.001)'."""
        return [
            f"{_flag(f.name)} {_shown(getattr(self, f.name))} (the run: {_shown(getattr(run, f.name))})"
            for f in fields(self)
            if f.name not in RESUMABLE | IDENTITIES and getattr(self, f.name) != getattr(run, f.name)
        ]


def read_config_file(path: str | Path, *, notes: list[str] | None = None) -> dict:
    """The options a YAML or JSON file sets (a run's own config.json included), checked: ConfigError names the
    file and the key of an unknown option or a bad value. Keys are field names (`lr_end_factor`) or flags'
    spellings (`lr-end-factor`); `null` leaves an optional one unset; ACTIONS are ignored (command line only).
    An old name (RENAMED) is read as today's with a deprecation note: logged once the file has passed its checks,
    or added to `notes` for the caller to log."""
    path = Path(path)
    try:
        text = read_small_file(path, "--config").decode()
    except InputError as err:
        raise ConfigError(str(err)) from None
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot be read ({err.strerror}); give a YAML or JSON file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {err.start}); give a YAML or JSON file") from None
    data = _parse(path, text)
    if isinstance(data, dict) and isinstance(data.get("options"), dict):  # a run's config.json
        extra = sorted(set(data) - {"options", "resolved", "versions"})
        if extra:
            raise ConfigError(f"--config {path}: unknown key {extra[0]!r} beside 'options'; remove it")
        data = data["options"]
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: holds a {type(data).__name__}, not a mapping of option: value")
    hints = typing.get_type_hints(FitConfig)
    values, found = {}, []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in RENAMED:
            name = RENAMED[name]
            found.append(f"--config {path}: key {key!r} is deprecated: write {name}, its new name (read as it)")
        if name not in hints:
            raise ConfigError(f"--config {path}: unknown key {key!r}; `gq fit --help` lists the options")
        if name in values:
            raise ConfigError(f"--config {path}: {key!r} sets {name} a second time; keep one")
        if name not in ACTIONS:
            values[name] = _checked_value(name, value, hints[name], f"--config {path}: {key}")
    FitConfig(**{"shards": "-", "out": "-", **values}).check(spell=lambda name: f"--config {path}: {name}")
    _note(found, notes)
    return {k: v for k, v in values.items() if v is not None or k not in ("shards", "out")}


def _note(found: list[str], notes: list[str] | None) -> None:
    """Deprecation notes: added to `notes` (the caller logs them once its checks pass), else logged now."""
    if notes is not None:
        notes.extend(found)
        return
    for line in found:
        log.warning(line)


def _parse(path: Path, text: str) -> object:
    """JSON for a .json file, YAML otherwise; ConfigError says where the text stops making sense."""
    if path.suffix == ".json":
        try:
            return parse_json(text)
        except ValueError as err:
            raise ConfigError(f"--config {path}: not valid JSON ({err}); fix the file") from None
    import yaml  # only for YAML files: JSON needs no extra package

    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"--config {path}: not valid YAML (nested too deeply to be read); fix the file") from None
    except yaml.YAMLError as err:  # its message spans lines; the mark says where
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"--config {path}: not valid YAML{at} ({getattr(err, 'problem', None) or err})") from None


def _checked_value(name: str, value: object, hint: object, where: str) -> object:
    """`value` as field `name` takes it, or ConfigError at `where`: YAML and JSON give bools, ints, floats,
    text and lists; a number written as text ("1e-3", which YAML reads as text) counts as a number."""
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    if value is None:
        if len(kinds) < len(typing.get_args(hint)) or name in ("shards", "out"):
            return None
        raise ConfigError(f"{where}: must be set (null is not allowed here)")
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue  # True is an int to Python, not to a config file
        if kind is int and isinstance(value, int):
            return value
        if kind is float and isinstance(value, (int, float)):
            return float(value)
        if kind is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                continue
        if kind is str and isinstance(value, str):
            return value
        if typing.get_origin(kind) is tuple and isinstance(value, (list, str)):
            items = parse_fc_dims(value, where=where) if isinstance(value, str) else value
            if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
                return tuple(items)
    wanted = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    described = " or ".join(wanted.get(k, "a list of integers such as [256, 128, 64]") for k in kinds)
    raise ConfigError(f"{where}: {value!r} is not {described}")


def _is_union(hint: object) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def resolve_config(given: dict, *, config_file: str | Path | None = None) -> FitConfig:
    """A run's options: FitConfig's defaults, under --config's values, under the flags `given` on the command line.

    With --resume the run's own options (RUN_DIR/config.json) replace the defaults and the file's and flags'
    values must agree with them, but for RESUMABLE options and IDENTITIES (a moved dataset is checked by its
    fingerprint): ConfigError names each flag that does not. Old names (RENAMED: flags, keys) are read as today's,
    with a deprecation note each, logged once the options resolve (a refusal stays one line).
    """
    notes: list[str] = []
    values = {
        **(read_config_file(config_file, notes=notes) if config_file else {}),
        **renamed_flags(given, notes=notes),
    }
    if values.get("resume") and values.get("out"):
        run = _run_options(Path(values["out"]), notes)
        clash = FitConfig(**{**run, **values}).differences(FitConfig(**run))
        if clash:
            raise ConfigError(
                f"--resume: {', '.join(clash)} {'differs' if len(clash) == 1 else 'differ'} from the run in "
                f"{values['out']}; leave {'it' if len(clash) == 1 else 'them'} out to continue the run as it was, "
                f"or start a new run with another --out"
            )
        values = {**run, **values}
    for name in ("shards", "out"):
        if values.get(name) is None:
            raise ConfigError(f"{_flag(name)}: missing; give it on the command line or in --config")
    for line in notes:
        log.warning(line)
    return FitConfig(**values)


def renamed_flags(given: dict, *, notes: list[str] | None = None) -> dict:
    """The options `given` on a command line with each old flag (RENAMED) under today's name, with a deprecation
    note (logged, or added to `notes`); ConfigError if both names are given."""
    given, found = dict(given), []
    for old, new in RENAMED.items():
        if old in given:
            spelled = "--" + old.replace("_", "-")
            if new in given:
                raise ConfigError(f"{spelled} and {_flag(new)}: one option by two names; give {_flag(new)} only")
            found.append(f"{spelled} is deprecated: give {_flag(new)}, its new name")
            given[new] = given.pop(old)
    _note(found, notes)
    return given


def _run_options(out: Path, notes: list[str]) -> dict:
    """The options of the run in `out`: its config.json, else (config.json lost) last.pt's copy of them."""
    if (out / "config.json").exists():
        return read_config_file(out / "config.json", notes=notes)
    if not (out / "last.pt").exists():
        raise ConfigError(f"--resume: {out / 'last.pt'} not found; start the run without --resume")
    from .checkpoint import load_checkpoint

    options = load_checkpoint(out / "last.pt").get("config")
    if not isinstance(options, dict):
        raise ConfigError(f"--resume: {out / 'config.json'} not found and {out / 'last.pt'} records no options")
    cfg = FitConfig.from_dict(options)
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ACTIONS}


def _shown(value: object) -> str:
    """A value as a flag would spell it ("not set" for None)."""
    if value is None:
        return "not set"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_fc_dims(text: str | None, *, where: str = "--fc-dims") -> tuple[int, ...] | None:
    """'256,128,64' -> (256, 128, 64); ConfigError at `where` (the flag, or a config file's key) otherwise."""
    if text is None or text == "":
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{where} {text}: comma-separated integers, e.g. 256,128,64") from None


def _flag(name: str) -> str:
    return flag(FitConfig, name)
