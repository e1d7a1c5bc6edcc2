"""The shard format, version 2: names, constants, the 4 KiB-aligned NPY header, `Layout` and the typed `Manifest`.

A shard file is a plain NPY 1.0 file whose header is padded so the data starts at byte 4096:
any NumPy reads it with `np.load(mmap_mode="r")`, and every record of a 48^3 float16 grid is
4 KiB aligned on disk, which is what O_DIRECT and GPUDirect Storage reads want. Version 2 keeps
each split in its own consecutive shards, in a seeded order of its scenes (see `build.py`).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from gq.common.errors import UsageError
from gq.common.grasps import GRASP_DIM
from gq.common.inputs import InputError, parse_json, read_small_file

FORMAT_NAME = "gq-shards"
FORMAT_VERSION = 2
HEADER_BYTES = 4096
LABEL_DIM = GRASP_DIM + 1  # the 19 grasp values, then the score
SCORE_COLUMN = GRASP_DIM
SDF_DTYPES = ("float16", "float32")
LABEL_DTYPE = np.dtype("<f4")

MANIFEST = "manifest.json"
INDEX = "scenes.parquet"
SKIPPED = "skipped.jsonl"
BUILD_DIR = ".build"  # resume journal of an unfinished build; removed when the manifest is written
SPLITS = ("train", "val", "test")

_MAGIC = b"\x93NUMPY\x01\x00"
# Bounds of a manifest's counts: far above any real dataset (the seed: 15,547 scenes, 480 grasps, 48^3), far
# below what would make a reader allocate without end.
MAX_GRID = 1024
MAX_COUNT = 1 << 40
MAX_FILE_BYTES = 1 << 50
_SHARD_FILE = re.compile(r"(?:sdf|labels)-\d{5}\.npy")


def grid_points(grid: int) -> tuple[float, float]:
    """(origin, spacing) of the seed's (mesh2sdf's) grid: voxel i sits at origin + i * spacing = -1 + 2i/n."""
    return -1.0, 2.0 / grid


def sdf_name(shard: int) -> str:
    return f"sdf-{shard:05d}.npy"


def labels_name(shard: int) -> str:
    return f"labels-{shard:05d}.npy"


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """NPY 1.0 header for a C-order array, padded with spaces to exactly HEADER_BYTES."""
    text = repr(
        {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": tuple(int(s) for s in shape),
        }
    )
    body = text.encode("latin1")
    pad = HEADER_BYTES - len(_MAGIC) - 2 - len(body) - 1
    if pad < 0:
        raise ValueError(f"NPY header for shape {shape} does not fit in {HEADER_BYTES} bytes")
    body += b" " * pad + b"\n"
    return _MAGIC + len(body).to_bytes(2, "little") + body


def read_npy_header(path: Path) -> tuple[tuple[int, int], tuple[int, ...], bool, np.dtype, int]:
    """(version, shape, fortran_order, dtype, data offset) of an NPY file, without reading data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported NPY version {version}")
        return version, shape, fortran, dtype, f.tell()


def file_crc32(path: Path, chunk: int = 1 << 22) -> str:
    """Whole-file CRC-32 as 8 hex digits (zlib's, the same as the `crc32` command prints)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


class DatasetError(UsageError):
    """A directory that is not a readable dataset of this format; `str()` says what and what to do."""


@dataclass(frozen=True)
class Layout:
    """Shapes and dtypes shared by every shard of a dataset."""

    grid: int
    dtype: str
    max_grasps: int
    records_per_shard: int

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Layout:
        return cls(manifest.grid[0], manifest.sdf_dtype, manifest.max_grasps, manifest.records_per_shard)

    @property
    def sdf_record_bytes(self) -> int:
        return self.grid**3 * np.dtype(self.dtype).itemsize

    @property
    def labels_record_bytes(self) -> int:
        return self.max_grasps * LABEL_DIM * LABEL_DTYPE.itemsize

    @property
    def record_words(self) -> int:
        """32-bit words of one record (SDF then labels), the length of its device checksum's keys."""
        return (self.sdf_record_bytes + self.labels_record_bytes) // 4

    def sdf_shape(self) -> tuple[int, ...]:
        return (self.records_per_shard,) + (self.grid,) * 3

    def labels_shape(self) -> tuple[int, ...]:
        return (self.records_per_shard, self.max_grasps, LABEL_DIM)

    def headers(self) -> tuple[bytes, bytes]:
        """The NPY headers of a shard's SDF file and labels file."""
        return npy_header(self.sdf_shape(), np.dtype(self.dtype)), npy_header(self.labels_shape(), LABEL_DTYPE)

    def empty_labels(self) -> bytes:
        """Labels of an empty record: zero grasps, NaN scores."""
        labels = np.zeros((self.max_grasps, LABEL_DIM), dtype=LABEL_DTYPE)
        labels[:, SCORE_COLUMN] = np.nan
        return labels.tobytes()

    def empty_checksums(self) -> tuple[int, int]:
        """CRC-32s of an empty record's SDF (zeros) and labels."""
        return zlib.crc32(bytes(self.sdf_record_bytes)), zlib.crc32(self.empty_labels())


# --- manifest.json, typed -----------------------------------------------------------------------------
# Each dataclass below is one JSON object of the manifest; its field names are the JSON keys (the one
# place they are spelled), `from_dict` checks every key's presence and JSON type, and `to_dict` gives
# back exactly the object it was read from, so a written manifest's bytes do not depend on the typing.

_REBUILD = "rebuild the dataset with gq shards build"


def _bad(where: str, key: str, why: str) -> DatasetError:
    return DatasetError(f"{where}: no valid {key} ({why}); {_REBUILD}")


def _json_type(value: Any) -> str:
    return (
        "null"
        if value is None
        else {bool: "boolean", dict: "object", list: "array", str: "string"}.get(type(value), "number")
    )


def _take(data: Mapping, key: str, kind: str, where: str, prefix: str = "") -> Any:
    """`data[key]`, checked to be of JSON kind `kind`: int, number, str, object, array (a trailing
    '?' allows null); DatasetError naming the key otherwise."""
    name = prefix + key
    if not isinstance(data, Mapping):
        raise _bad(where, prefix.rstrip(".") or "manifest", f"{_json_type(data)}, expected an object")
    if key not in data:
        raise _bad(where, name, "missing")
    value = data[key]
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "str": lambda v: isinstance(v, str),
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
    }[kind](value)
    if not ok:
        expected = "a finite number" if kind == "number" else kind
        raise _bad(where, name, f"{_json_type(value)} {value!r:.40}, expected {expected}")
    return value


def _typed(cls: type, data: Mapping, where: str, prefix: str, kinds: dict[str, str]) -> Any:
    return cls(**{key: _take(data, key, kind, where, prefix) for key, kind in kinds.items()})


@dataclass(frozen=True)
class ScoreStats:
    """The train split's score statistics (scores as stored; None values for an empty train split)."""

    split: str
    count: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None

    _KINDS = {"split": "str", "count": "int", "mean": "number?", "std": "number?", "min": "number?", "max": "number?"}

    @classmethod
    def from_dict(cls, data: Mapping, *, where: str = MANIFEST) -> ScoreStats:
        return _typed(cls, data, where, "score_stats.", cls._KINDS)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class SplitInfo:
    """One split's scene and grasp counts and its consecutive shards."""

    scenes: int
    grasps: int
    first_shard: int
    num_shards: int

    @classmethod
    def from_dict(cls, data: Mapping, *, where: str = MANIFEST, prefix: str = "splits.") -> SplitInfo:
        return _typed(cls, data, where, prefix, {f.name: "int" for f in fields(cls)})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class FileEntry:
    """A file of the dataset with its byte size and whole-file CRC-32 (8 hex digits)."""

    name: str
    bytes: int
    crc32: str

    @classmethod
    def from_dict(cls, data: Mapping, *, where: str = MANIFEST, prefix: str = "files[].") -> FileEntry:
        return _typed(cls, data, where, prefix, {"name": "str", "bytes": "int", "crc32": "str"})

    def to_dict(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "crc32": self.crc32}


@dataclass(frozen=True)
class Provenance:
    """How the dataset was made: tool, its version, the source directory and the build options."""

    tool: str
    version: str
    source: str
    args: dict

    @classmethod
    def from_dict(cls, data: Mapping, *, where: str = MANIFEST) -> Provenance:
        kinds = {"tool": "str", "version": "str", "source": "str", "args": "object"}
        return _typed(cls, data, where, "made_by.", kinds)

    def to_dict(self) -> dict:
        return {"tool": self.tool, "version": self.version, "source": self.source, "args": dict(self.args)}


# JSON kind of each plain (not nested) manifest field; the nested ones have their own dataclass.
_MANIFEST_KINDS = {
    "format": "str",
    "version": "int",
    "grid_origin": "number",
    "grid_spacing": "number",
    "sdf_dtype": "str",
    "label_dtype": "str",
    "grasp_dim": "int",
    "label_dim": "int",
    "max_grasps": "int",
    "records_per_shard": "int",
    "header_bytes": "int",
    "num_shards": "int",
    "num_scenes": "int",
    "num_records": "int",
    "source_scenes": "int",
    "sdf_max_conversion_error": "number",
    "skipped": "int",
}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Every field of `manifest.json`, typed; `from_json` checks the format, `to_dict` gives the JSON object."""

    format: str
    version: int
    grid: tuple[int, int, int]
    grid_origin: float
    grid_spacing: float
    sdf_dtype: str
    label_dtype: str
    grasp_dim: int
    label_dim: int
    max_grasps: int
    records_per_shard: int
    header_bytes: int
    num_shards: int
    num_scenes: int
    num_records: int
    source_scenes: int
    splits: dict[str, SplitInfo]
    score_stats: ScoreStats
    sdf_max_conversion_error: float
    skipped: int
    checksums: dict[str, str]  # what each kind of checksum is, in words
    files: tuple[FileEntry, ...]
    made_by: Provenance
    fingerprint: str | None = None  # None only before it is computed (`manifest.write_manifest`)

    @classmethod
    def from_json(cls, path: str | Path) -> Manifest:
        """Read and check `path` (a dataset's manifest.json): format name and version first, then every key."""
        path = Path(path)
        root = path.parent
        if not root.is_dir():
            raise DatasetError(f"{root}: no such dataset directory; build one with gq shards build")
        if not path.exists():
            hint = " (an unfinished build: rerun make_shards with --resume)" if (root / BUILD_DIR).exists() else ""
            raise DatasetError(f"{path}: missing, so {root} is not a finished dataset{hint}")
        try:
            data = parse_json(read_small_file(path, "manifest"))
        except InputError as err:
            raise DatasetError(f"{path}: {err.reason}; rebuild the dataset") from None
        except (OSError, ValueError) as err:
            raise DatasetError(f"{path}: unreadable manifest ({err}); rebuild the dataset") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, where: str = MANIFEST) -> Manifest:
        """Check a parsed manifest (format name, version, then each key's presence and type); `where` names
        it in errors. Keys this version does not know are ignored."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise DatasetError(f"{where}: not a {FORMAT_NAME} manifest")
        if data.get("version") != FORMAT_VERSION:
            raise DatasetError(
                f"{where}: format version {data.get('version')}, this reader reads version "
                f"{FORMAT_VERSION}; rebuild the dataset with gq shards build SOURCE --out DIR"
            )
        plain = {key: _take(data, key, kind, where) for key, kind in _MANIFEST_KINDS.items()}
        grid = _take(data, "grid", "array", where)
        if len(grid) != 3 or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid):
            raise _bad(where, "grid", f"{grid!r:.40}, expected 3 integers")
        splits = _take(data, "splits", "object", where)
        checksums = _take(data, "checksums", "object", where)
        if not all(isinstance(v, str) for v in checksums.values()):
            raise _bad(where, "checksums", "expected strings")
        manifest = cls(
            **plain,
            grid=tuple(grid),
            splits={
                s: SplitInfo.from_dict(_take(splits, s, "object", where, "splits."), where=where, prefix=f"splits.{s}.")
                for s in SPLITS
            },
            score_stats=ScoreStats.from_dict(_take(data, "score_stats", "object", where), where=where),
            checksums=dict(checksums),
            files=tuple(FileEntry.from_dict(f, where=where) for f in _take(data, "files", "array", where)),
            made_by=Provenance.from_dict(_take(data, "made_by", "object", where), where=where),
            fingerprint=_take(data, "fingerprint", "str", where) if "fingerprint" in data else None,
        )
        manifest.check_counts(where)
        return manifest

    def check_counts(self, where: str = MANIFEST) -> None:
        """Every count within sane bounds and consistent with the files listed, so that no reader sizes
        anything by a number the files do not back (a forged `num_shards` of 1e12 would grow memory until
        killed); DatasetError naming the first key that is not."""

        def need(key: str, ok: bool, why: str) -> None:
            if not ok:
                raise _bad(where, key, why)

        need(
            "grid",
            len(set(self.grid)) == 1 and 2 <= self.grid[0] <= MAX_GRID,
            f"{list(self.grid)}, expected three equal sizes in 2..{MAX_GRID}",
        )
        need("sdf_dtype", self.sdf_dtype in SDF_DTYPES, f"{self.sdf_dtype!r:.40}, expected one of {SDF_DTYPES}")
        for key, value, expected in (
            ("label_dtype", self.label_dtype, "float32"),
            ("grasp_dim", self.grasp_dim, GRASP_DIM),
            ("label_dim", self.label_dim, LABEL_DIM),
            ("header_bytes", self.header_bytes, HEADER_BYTES),
        ):
            need(key, value == expected, f"{value!r:.40}, expected {expected!r}")
        for key, low in (
            ("max_grasps", 1),
            ("records_per_shard", 1),
            ("num_shards", 0 if isinstance(self.made_by.args.get("part"), dict) else 1),  # a part may be empty
            ("num_scenes", 0),
            ("num_records", 0),
            ("source_scenes", 0),
            ("skipped", 0),
        ):
            value = getattr(self, key)
            need(key, low <= value <= MAX_COUNT, f"{value}, expected {low}..{MAX_COUNT}")
        for f in self.files:
            need("files[].bytes", 0 <= f.bytes <= MAX_FILE_BYTES, f"{f.name}: {f.bytes}, expected 0..{MAX_FILE_BYTES}")
        layout = Layout.from_manifest(self)
        for kind, named, record_bytes in (
            ("sdf", sdf_name, layout.sdf_record_bytes),
            ("labels", labels_name, layout.labels_record_bytes),
        ):
            listed = sorted(f.name for f in self.files if _SHARD_FILE.fullmatch(f.name) and f.name.startswith(kind))
            need(
                "num_shards",
                len(listed) == self.num_shards and listed == [named(k) for k in range(len(listed))],
                f"{self.num_shards}, but the files list {len(listed)} {kind} shard files",
            )
            size = HEADER_BYTES + self.records_per_shard * record_bytes
            for f in self.files:
                if f.name in listed:
                    need(
                        "files[].bytes",
                        f.bytes == size,
                        f"{f.name}: {f.bytes}, expected {size} for "
                        f"{self.records_per_shard} records of grid {self.grid[0]}, {self.max_grasps} grasps",
                    )
        need(
            "num_records",
            self.num_records == self.num_shards * self.records_per_shard,
            f"{self.num_records}, expected num_shards x records_per_shard, {self.num_shards * self.records_per_shard}",
        )
        need(
            "num_scenes",
            self.num_scenes <= self.num_records,
            f"{self.num_scenes}, more than {self.num_records} records",
        )
        end = 0
        for split in SPLITS:
            info, key = self.splits[split], f"splits.{split}"
            need(
                f"{key}.first_shard",
                info.first_shard == end,
                f"{info.first_shard}, expected {end} (splits are consecutive)",
            )
            need(
                f"{key}.num_shards",
                0 <= info.num_shards <= self.num_shards - end,
                f"{info.num_shards}, expected 0..{self.num_shards - end}",
            )
            end += info.num_shards
            room = info.num_shards * self.records_per_shard
            need(f"{key}.scenes", 0 <= info.scenes <= room, f"{info.scenes}, expected 0..{room} in its shards")
            most = info.scenes * self.max_grasps
            need(f"{key}.grasps", 0 <= info.grasps <= most, f"{info.grasps}, expected 0..{most}")
        need("splits", end == self.num_shards, f"the splits' shards add up to {end}, not num_shards {self.num_shards}")
        total = sum(info.scenes for info in self.splits.values())
        need("num_scenes", self.num_scenes == total, f"{self.num_scenes}, but the splits hold {total}")
        train = self.splits["train"].grasps
        need(
            "score_stats.count", 0 <= self.score_stats.count <= train, f"{self.score_stats.count}, expected 0..{train}"
        )

    def to_dict(self) -> dict:
        """The JSON object of manifest.json (without `fingerprint` while it is None)."""
        out = {key: getattr(self, key) for key in _MANIFEST_KINDS}
        out |= {
            "grid": list(self.grid),
            "splits": {s: info.to_dict() for s, info in self.splits.items()},
            "score_stats": self.score_stats.to_dict(),
            "checksums": dict(self.checksums),
            "files": [f.to_dict() for f in self.files],
            "made_by": self.made_by.to_dict(),
        }
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        return out
