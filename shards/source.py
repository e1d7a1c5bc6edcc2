"""Reading and checking one scene of the seed's processed layout (`<name>/scene.npz`).

Every check names the file and the problem; nothing is repaired, cast from a non-float type,
or substituted. A scene that passes becomes a `Record`: its bytes exactly as the shard stores them.
"""
from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checksum import checksum, device_checksum, word_keys
from .format import GRASP_DIM, LABEL_DIM, LABEL_DTYPE, SCORE_COLUMN
from .half import to_float16

SCENE_FILE = "scene.npz"
REQUIRED_KEYS = ("sdf", "grasps", "scores")
FLOAT16_MAX = float(np.finfo(np.float16).max)


class SceneError(ValueError):
    """A scene file that cannot go into a dataset; `str()` is the one-line reason."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self):  # travels back from worker processes intact
        return SceneError, (self.path, self.reason)


@dataclass
class Record:
    """One scene converted to the shard's layout, plus what the manifest and index need."""

    name: str
    sdf: memoryview            # (D,D,D) in the shard dtype, C order (dropped before crossing processes)
    labels: memoryview         # (max_grasps, 20) float32; unused slots: zeros, NaN score
    num_grasps: int
    checksum: int              # XXH3-64 of sdf then labels: the index's per-record checksum
    device_checksum: int       # the same bytes' word hash, checked on GPUs (shards/checksum.py)
    sdf_crc: int               # CRC-32 of sdf alone and of labels alone: folded into the files' CRC-32
    labels_crc: int
    translation: list[float] | None
    global_scale: float | None
    score_sum: float           # float64 sums, for the split's score statistics
    score_sumsq: float
    score_min: float
    score_max: float
    conversion_error: float    # max |sdf - stored sdf| (0 for float32)


def list_scenes(source: Path) -> list[str]:
    """Scene names of a processed directory: its subdirectories, sorted by name."""
    return sorted(p.name for p in source.iterdir() if p.is_dir())


def _finite_float(path: Path, key: str, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind != "f":
        raise SceneError(path, f"'{key}' has dtype {array.dtype}, expected a floating-point array")
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise SceneError(path, f"'{key}' has {bad} non-finite values (NaN or inf)")
    return array


def _optional_extra(path: Path, data, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if key not in data.files:
        return None
    value = _finite_float(path, key, np.asarray(data[key]))
    if value.shape != shape:
        raise SceneError(path, f"'{key}' has shape {value.shape}, expected {shape}")
    return value


def load_record(source: Path, name: str, grid: int, dtype: str, max_grasps: int) -> Record:
    """Load `source/name/scene.npz`, check it, and convert it to a shard record."""
    path = source / name / SCENE_FILE
    if not path.exists():
        raise SceneError(path, f"missing {SCENE_FILE}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in REQUIRED_KEYS if k not in data.files]
            if missing:
                raise SceneError(path, f"missing key(s) {', '.join(missing)}; found {', '.join(data.files) or 'none'}")
            sdf = _finite_float(path, "sdf", data["sdf"])
            grasps = _finite_float(path, "grasps", data["grasps"])
            scores = _finite_float(path, "scores", data["scores"])
            translation = _optional_extra(path, data, "translation", (3,))
            global_scale = _optional_extra(path, data, "global_scale", ())
    except SceneError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise SceneError(path, f"unreadable or corrupt npz ({type(err).__name__}: {err})") from None

    if sdf.shape != (grid,) * 3:
        raise SceneError(path, f"'sdf' has shape {sdf.shape}, expected {(grid,) * 3} (--grid {grid})")
    if grasps.ndim != 2 or grasps.shape[1] != GRASP_DIM:
        raise SceneError(path, f"'grasps' has shape {grasps.shape}, expected (N, {GRASP_DIM})")
    n = grasps.shape[0]
    if scores.shape != (n,):
        raise SceneError(path, f"'scores' has shape {scores.shape}, expected ({n},) to match 'grasps'")
    if n == 0:
        raise SceneError(path, "has no grasps (N = 0)")
    if n > max_grasps:
        raise SceneError(path, f"has {n} grasps, more than --max-grasps {max_grasps}")

    if dtype == "float16":
        peak = float(np.abs(sdf).max())
        if peak > FLOAT16_MAX:
            raise SceneError(path, f"'sdf' reaches |{peak:.6g}|, outside float16's finite range "
                                   f"(±{FLOAT16_MAX:.0f}); store with --dtype float32")
    if dtype == "float16" and sdf.dtype == np.float32:
        stored, error = to_float16(sdf)
    else:
        stored = np.ascontiguousarray(sdf, dtype=dtype)
        error = float(np.abs(stored.astype(np.float64) - sdf).max())

    labels = np.zeros((max_grasps, LABEL_DIM), dtype=LABEL_DTYPE)
    labels[n:, SCORE_COLUMN] = np.nan
    labels[:n, :GRASP_DIM] = grasps
    labels[:n, SCORE_COLUMN] = scores
    sdf_bytes, label_bytes = memoryview(stored).cast("B"), memoryview(labels).cast("B")
    s64 = scores.astype(np.float64)
    keys = word_keys((len(sdf_bytes) + len(label_bytes)) // 4)
    return Record(
        name=name, sdf=sdf_bytes, labels=label_bytes, num_grasps=n, checksum=checksum(sdf_bytes, label_bytes),
        device_checksum=device_checksum(sdf_bytes, label_bytes, keys),
        sdf_crc=zlib.crc32(sdf_bytes), labels_crc=zlib.crc32(label_bytes),
        translation=None if translation is None else [float(v) for v in translation.astype(np.float32)],
        global_scale=None if global_scale is None else float(np.float32(global_scale)),
        score_sum=float(s64.sum()), score_sumsq=float(np.square(s64).sum()),
        score_min=float(s64.min()), score_max=float(s64.max()), conversion_error=error,
    )
