"""Reading and checking one scene of the seed's processed layout (`<name>/scene.npz`).

Every check names the file and the problem; nothing is repaired, cast from a non-float type,
or substituted. A scene that passes becomes a `Record`: its bytes exactly as the shard stores them.
"""

from __future__ import annotations

import math
import os
import unicodedata
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from gq.common.errors import FileError, UsageError
from gq.common.inputs import InputError, open_input

from .checksum import checksum, device_checksum, word_keys
from .format import GRASP_DIM, LABEL_DIM, LABEL_DTYPE, SCORE_COLUMN
from .half import to_float16
from .stats import ScoreSums

SCENE_FILE = "scene.npz"
REQUIRED_KEYS = ("sdf", "grasps", "scores")
OPTIONAL_KEYS = ("translation", "global_scale")  # the seed's later versions add them
FLOAT16_MAX = float(np.finfo(np.float16).max)


class SceneError(FileError):
    """A scene file that cannot go into a dataset; `str()` is the one-line reason."""


class SourceError(UsageError):
    """A SOURCE directory whose listing cannot be trusted (a dangling link, a name that is not UTF-8)."""


@dataclass
class Record:
    """One scene converted to the shard's layout, plus what the manifest and index need."""

    name: str
    sdf: memoryview | bytes  # (D,D,D) in the shard dtype, C order (bytes when it crosses processes)
    labels: memoryview | bytes  # (max_grasps, 20) float32; unused slots: zeros, NaN score
    num_grasps: int
    checksum: int  # XXH3-64 of sdf then labels: the index's per-record checksum
    device_checksum: int  # the same bytes' word hash, checked on GPUs (shards/checksum.py)
    sdf_crc: int  # CRC-32 of sdf alone and of labels alone: folded into the files' CRC-32
    labels_crc: int
    translation: list[float] | None
    global_scale: float | None
    scores: ScoreSums  # of the scores as stored, for the train split's statistics
    conversion_error: float  # max |sdf - stored sdf| (0 for float32)


def list_scenes(source: Path, exclude: tuple[Path, ...] = ()) -> list[str]:
    """Scene names of a processed directory: its subdirectories, sorted by name, minus `exclude`
    (the dataset being written and its build folder, when they sit inside SOURCE).

    A dangling symlink or a name that is not UTF-8 is an error, never silently dropped.
    """
    names = []
    for p in source.iterdir():
        if p in exclude:
            continue
        if p.is_symlink() and not p.exists():
            raise SourceError(
                f"{os.fsencode(p)!r}: a symlink to {os.fsencode(os.readlink(p))!r}, which does not "
                "exist; fix the link or remove the scene from SOURCE"
            )
        if not p.is_dir():
            continue
        try:
            p.name.encode("utf-8")
        except UnicodeEncodeError:
            raise SourceError(
                f"SOURCE {source}: scene folder {os.fsencode(p.name)!r} is not a UTF-8 name; "
                "rename it (scene names are stored as text in the index)"
            ) from None
        control = control_character(p.name)
        if control is not None:
            raise SourceError(
                f"SOURCE {source}: scene folder {p.name!r} has a control character ({control!r}) in its name; "
                "rename it (a name is printed in reports and written one a line)"
            )
        names.append(p.name)
    return sorted(names)


def control_character(name: str) -> str | None:
    """The first control character of a scene name, if any: a name is printed in reports and written one a line."""
    return next((c for c in name if unicodedata.category(c) == "Cc"), None)


def _header_of(path: Path, f, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of one NPY array (an npz member, or a .npy file); `f` is left at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        header = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        header = np.lib.format.read_array_header_2_0(f)
    else:
        raise SceneError(path, f"'{key}' has NPY version {version}, expected 1.0 or 2.0")
    _floating(path, key, header[2])
    return header


def _floating(path: Path, key: str, dtype: np.dtype) -> None:
    if dtype.kind != "f":
        raise SceneError(path, f"'{key}' has dtype {dtype}, expected a floating-point array")


def _read_data(
    path: Path, f, key: str, shape: tuple[int, ...], fortran: bool, dtype: np.dtype, *, total: int
) -> np.ndarray:
    """The array whose header `_header_of` read (and whose shape was checked), from an npz member or file of
    `total` bytes: exactly its bytes, or an error. More bytes than the member holds is refused before any
    is read, so a header claiming petabytes costs nothing."""
    size, held = math.prod(shape) * dtype.itemsize, total - f.tell()
    if size > held:
        raise SceneError(path, f"corrupt or truncated: '{key}' claims shape {shape}, {size:,} bytes; it holds {held:,}")
    data = f.read(size)
    if len(data) != size:
        raise SceneError(path, f"unreadable or corrupt npz ('{key}' holds {len(data)} of its {size} bytes)")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def read_npz(
    path: Path,
    required: tuple[str, ...],
    optional: tuple[str, ...],
    check_shapes: Callable[[dict[str, tuple[int, ...]]], object],
) -> dict[str, np.ndarray]:
    """The floating-point arrays `required` (+ those of `optional` present) of an npz, headers first: every
    member's header is read and `check_shapes` (shape by key) called before any data, a header claiming more
    bytes than its member holds is refused, and no value may be NaN or inf. SceneError names the file."""
    try:
        with open_input(path, "npz") as f, zipfile.ZipFile(f) as archive:
            present = {n[:-4] for n in archive.namelist() if n.endswith(".npy")}
            missing = [k for k in required if k not in present]
            if missing:
                found = ", ".join(sorted(present)) or "none"
                raise SceneError(path, f"missing key(s) {', '.join(missing)}; found {found}")
            keys = [k for k in required + optional if k in present]
            members = {k: archive.open(f"{k}.npy") for k in keys}
            try:
                headers = {k: _header_of(path, members[k], k) for k in keys}
                check_shapes({k: h[0] for k, h in headers.items()})
                sizes = {k: archive.getinfo(f"{k}.npy").file_size for k in keys}
                return {k: finite(path, k, _read_data(path, members[k], k, *headers[k], total=sizes[k])) for k in keys}
            finally:
                for member in members.values():
                    member.close()
    except SceneError:
        raise
    except InputError as err:
        raise SceneError(path, err.reason) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise SceneError(path, f"unreadable or corrupt npz ({type(err).__name__}: {err})") from None


def _check_shapes(
    path: Path, shapes: dict[str, tuple[int, ...]], *, grid: int | None, max_grasps: int | None, grid_of: str
) -> None:
    """Check the arrays' shapes against the grid (None: any cube) and --max-grasps before any is loaded."""
    if grid is None:
        if len(shapes["sdf"]) != 3 or len(set(shapes["sdf"])) != 1:
            raise SceneError(path, f"'sdf' has shape {shapes['sdf']}, expected a cube (D, D, D)")
    elif shapes["sdf"] != (grid,) * 3:
        raise SceneError(path, f"'sdf' has shape {shapes['sdf']}, expected {(grid,) * 3} ({grid_of})")
    grasps = shapes["grasps"]
    if len(grasps) != 2 or grasps[1] != GRASP_DIM:
        raise SceneError(path, f"'grasps' has shape {grasps}, expected (N, {GRASP_DIM})")
    n = grasps[0]
    if max_grasps is not None and n > max_grasps:
        raise SceneError(path, f"has {n} grasps, more than --max-grasps {max_grasps}")
    if "scores" in shapes and shapes["scores"] != (n,):
        raise SceneError(path, f"'scores' has shape {shapes['scores']}, expected ({n},) to match 'grasps'")
    if n == 0:
        raise SceneError(path, "has no grasps (N = 0)")
    for key, shape in (("translation", (3,)), ("global_scale", ())):
        if key in shapes and shapes[key] != shape:
            raise SceneError(path, f"'{key}' has shape {shapes[key]}, expected {shape}")


def finite(path: Path, key: str, array: np.ndarray, as_stored: bool = False) -> np.ndarray:
    """`array`, or SceneError counting its NaN and inf values; `as_stored`: values finite in the file (float64)
    that the stored dtype cannot hold (1e39 as float32) are named so."""
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if as_stored:
            raise SceneError(
                path,
                f"'{key}' has {bad} values that are finite in the file but not as stored "
                f"({array.dtype}, |x| <= {float(np.finfo(array.dtype).max):.6g}); fix the scene",
            )
        raise SceneError(path, f"'{key}' has {bad} non-finite values (NaN or inf)")
    return array


def read_scene(
    path: Path,
    *,
    grid: int | None,
    max_grasps: int | None = None,
    required: tuple[str, ...] = REQUIRED_KEYS,
    grid_of: str | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of one scene.npz (`required` keys and whichever of the others it has), checked: headers
    first (float dtypes, shapes for `grid` and `max_grasps`, sizes the file holds), then finite values.
    Every problem is a one-line SceneError naming the file; `grid_of` says where the grid comes from (`grid`
    None: any cubic grid)."""
    if not path.exists():
        raise SceneError(path, f"missing {SCENE_FILE}")
    check = partial(_check_shapes, path, grid=grid, max_grasps=max_grasps, grid_of=grid_of or f"--grid {grid}")
    optional = tuple(k for k in REQUIRED_KEYS + OPTIONAL_KEYS if k not in required)
    return read_npz(path, required, optional, check)


def read_npy(path: Path, *, key: str) -> np.ndarray:
    """A floating-point .npy file, read through the same header checks as a scene's arrays (one-line SceneError)."""
    try:
        with open_input(path, key) as f:
            return _read_data(path, f, key, *_header_of(path, f, key), total=os.fstat(f.fileno()).st_size)
    except SceneError:
        raise
    except InputError as err:
        raise SceneError(path, err.reason) from None
    except (OSError, ValueError, EOFError) as err:
        raise SceneError(path, f"unreadable .npy ({type(err).__name__}: {err})") from None


def check_arrays(path: Path | str, arrays: dict[str, np.ndarray], *, grid: int, max_grasps: int) -> dict:
    """The checks `read_scene` applies to a file's arrays, for arrays given in memory (`ShardWriter.add`):
    float dtypes, shapes for `grid` and `max_grasps`, finite values; `path` names the scene in the error."""
    arrays = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    for key, array in arrays.items():
        _floating(path, key, array.dtype)
    _check_shapes(
        path, {k: a.shape for k, a in arrays.items()}, grid=grid, max_grasps=max_grasps, grid_of=f"grid {grid}"
    )
    return {k: finite(path, k, a) for k, a in arrays.items()}


def load_record(source: Path, name: str, grid: int, dtype: str, max_grasps: int) -> Record:
    """Load `source/name/scene.npz`, check it (`read_scene`: headers first, then values), convert it to a record."""
    path = source / name / SCENE_FILE
    return to_record(path, name, read_scene(path, grid=grid, max_grasps=max_grasps), dtype, max_grasps)


def to_record(path: Path | str, name: str, arrays: dict[str, np.ndarray], dtype: str, max_grasps: int) -> Record:
    """Checked arrays of one scene converted to its record: the stored bytes, their checksums and statistics."""
    n = len(arrays["grasps"])
    sdf = arrays["sdf"]

    if dtype == "float16":
        peak = float(np.abs(sdf).max())
        if peak > FLOAT16_MAX:
            raise SceneError(
                path,
                f"'sdf' reaches |{peak:.6g}|, outside float16's finite range "
                f"(±{FLOAT16_MAX:.0f}); store with --dtype float32",
            )
    if dtype == "float16" and sdf.dtype == np.float32:
        stored, error = to_float16(sdf)
    else:
        stored = finite(path, "sdf", np.ascontiguousarray(sdf, dtype=dtype), as_stored=True)
        error = float(np.abs(stored.astype(np.float64) - sdf).max())

    labels = np.zeros((max_grasps, LABEL_DIM), dtype=LABEL_DTYPE)
    labels[n:, SCORE_COLUMN] = np.nan
    labels[:n, :GRASP_DIM] = finite(path, "grasps", arrays["grasps"].astype(LABEL_DTYPE), as_stored=True)
    labels[:n, SCORE_COLUMN] = finite(path, "scores", arrays["scores"].astype(LABEL_DTYPE), as_stored=True)
    extras = {k: finite(path, k, arrays[k].astype(np.float32), as_stored=True) for k in OPTIONAL_KEYS if k in arrays}
    sdf_bytes, label_bytes = memoryview(stored).cast("B"), memoryview(labels).cast("B")
    keys = word_keys((len(sdf_bytes) + len(label_bytes)) // 4)
    return Record(
        name=name,
        sdf=sdf_bytes,
        labels=label_bytes,
        num_grasps=n,
        checksum=checksum(sdf_bytes, label_bytes),
        device_checksum=device_checksum(sdf_bytes, label_bytes, keys),
        sdf_crc=zlib.crc32(sdf_bytes),
        labels_crc=zlib.crc32(label_bytes),
        translation=[float(v) for v in extras["translation"]] if "translation" in extras else None,
        global_scale=float(extras["global_scale"]) if "global_scale" in extras else None,
        scores=ScoreSums.of(labels[:n, SCORE_COLUMN]),
        conversion_error=error,
    )
