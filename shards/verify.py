"""Verification: manifest, files and index agree; headers are right; every record's bytes match.

`verify(DIR)` returns a `VerifyResult`: one line per problem naming the file, shard, slot and scene,
or none and a one-line summary (`gq shards verify` prints them). The full check also
recomputes the train score statistics from the stored labels and compares them with the manifest's.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gq.common.inputs import InputError

from .checksum import checksum, device_checksum, word_keys
from .format import (
    HEADER_BYTES,
    INDEX,
    LABEL_DIM,
    LABEL_DTYPE,
    SCORE_COLUMN,
    SPLITS,
    Layout,
    Manifest,
    file_crc32,
    labels_name,
    read_npy_header,
    sdf_name,
)
from .index import read_index, read_index_file
from .manifest import DatasetError, fingerprint, read_manifest
from .stats import ScoreSums, score_stats


@dataclass(frozen=True)
class VerifyResult:
    """What `verify` found: one line per problem (none when the dataset is sound), and a summary line."""

    root: Path
    problems: list[str]
    summary: str = ""  # "OK <root>: ..." once the checks ran to the end ("" when a problem stopped them early)
    quick: bool = False  # records were not read
    shards: int = 0  # shards whose records were read and checked

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_header(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> list[str]:
    try:
        version, got_shape, fortran, got_dtype, offset = read_npy_header(path)
    except (OSError, ValueError) as err:
        return [f"{path.name}: unreadable NPY header ({err})"]
    problems = []
    if version != (1, 0):
        problems.append(f"{path.name}: NPY version {version[0]}.{version[1]}, expected 1.0")
    if fortran:
        problems.append(f"{path.name}: Fortran order, expected C order")
    if got_shape != shape:
        problems.append(f"{path.name}: shape {got_shape}, expected {shape}")
    if got_dtype != dtype:
        problems.append(f"{path.name}: dtype {got_dtype}, expected {dtype}")
    if offset != HEADER_BYTES:
        problems.append(f"{path.name}: data starts at byte {offset}, expected {HEADER_BYTES}")
    return problems


def _check_index(manifest: Manifest, index: dict, layout: Layout) -> list[str]:
    """The index agrees with the manifest: one row per record in storage order, each split in its own shards."""
    n, r, problems = manifest.num_scenes, layout.records_per_shard, []
    scene = index["scene"]
    if len(scene) != n:
        return [f"{INDEX}: {len(scene)} rows, manifest says {n} scenes"]
    if len(np.unique(scene)) != n or (scene < 0).any() or (scene >= manifest.source_scenes).any():
        problems.append(f"{INDEX}: scene ids must be unique and in 0..{manifest.source_scenes - 1}")
    if len(np.unique(index["name"])) != n:
        problems.append(f"{INDEX}: scene names must be unique")
    position = index["shard"].astype(np.int64) * r + index["slot"]
    if (
        (np.diff(position) <= 0).any()
        or (index["slot"] < 0).any()
        or (index["slot"] >= r).any()
        or (position < 0).any()
        or (position >= manifest.num_records).any()
    ):
        problems.append(
            f"{INDEX}: (shard, slot) must be unique records of the {manifest.num_shards} shards, in storage order"
        )
    for row in np.flatnonzero((index["num_grasps"] < 1) | (index["num_grasps"] > layout.max_grasps)):
        problems.append(
            f"{INDEX}: scene {scene[row]} ({index['name'][row]}) has num_grasps "
            f"{index['num_grasps'][row]}, outside 1..{layout.max_grasps}"
        )
    for split in SPLITS:
        entry = manifest.splits[split]
        mask = index["split"] == split
        got = {"scenes": int(mask.sum()), "grasps": int(index["num_grasps"][mask].sum())}
        if got != {k: getattr(entry, k) for k in got}:
            problems.append(f"{INDEX}: split {split} has {got}, manifest says {entry.to_dict()}")
        first, count = entry.first_shard, entry.num_shards
        outside = mask & ((index["shard"] < first) | (index["shard"] >= first + count))
        for row in np.flatnonzero(outside)[:1]:
            problems.append(
                f"{INDEX}: scene {scene[row]} ({index['name'][row]}) of split {split} is in shard "
                f"{index['shard'][row]}, outside the split's shards {first}..{first + count - 1}"
            )
    return problems


def _check_stats(manifest: Manifest, recomputed: dict | None = None) -> list[str]:
    """The manifest's train score statistics: a spread (std > 0), and equal to those `recomputed` from the labels."""
    stats, problems = manifest.score_stats, []
    if stats.count and (stats.std == 0 or stats.min == stats.max):
        problems.append(
            f"manifest.json: score_stats std is {stats.std}: all train scores are equal "
            f"(min {stats.min}, max {stats.max}); scores cannot be standardised, rebuild "
            "with varied labels"
        )
    if recomputed is not None:
        for key, want in recomputed.items():
            got = getattr(stats, key)
            same = (
                got == want
                if not isinstance(want, float) or not isinstance(got, (int, float))
                else math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
            )
            if not same:
                problems.append(
                    f"manifest.json: score_stats {key} is {got}, but the train labels give {want}; "
                    "the manifest was edited or is not this dataset's: rebuild the dataset"
                )
    return problems


def corrupt_files(root: Path, manifest: Manifest, shard: int) -> list[Path]:
    """The files of `shard` (its SDF file, its labels file) whose CRC-32 differs from the manifest's; both when
    neither does. A record's checksums cover its SDF and labels bytes together, so a record that fails them
    is blamed on the file that really changed by this (whole-file) check, run only once a record has failed."""
    listed = {f.name: f.crc32 for f in manifest.files}
    paths = [root / sdf_name(shard), root / labels_name(shard)]
    return [p for p in paths if file_crc32(p) != listed.get(p.name)] or paths


def _check_records(
    root: Path, shard: int, layout: Layout, index: dict, rows: dict[int, int], crcs: dict[str, str], train: ScoreSums
) -> list[str]:
    """One pass over a shard's two files: whole-file CRC-32, every record's two checksums and its scores
    (adding the train records' scores, as stored, to `train`). A record whose checksums fail is named with the
    file whose CRC-32 fails (both files' names when neither or both do)."""
    problems, bad_records = [], []
    keys = word_keys(layout.record_words)
    sdf_path, lab_path = root / sdf_name(shard), root / labels_name(shard)
    with open(sdf_path, "rb") as fs, open(lab_path, "rb") as fl:
        sdf_crc, lab_crc = zlib.crc32(fs.read(HEADER_BYTES)), zlib.crc32(fl.read(HEADER_BYTES))
        for slot in range(layout.records_per_shard):
            sdf_rec, lab_rec = fs.read(layout.sdf_record_bytes), fl.read(layout.labels_record_bytes)
            sdf_crc, lab_crc = zlib.crc32(sdf_rec, sdf_crc), zlib.crc32(lab_rec, lab_crc)
            scores = np.frombuffer(lab_rec, dtype=LABEL_DTYPE).reshape(layout.max_grasps, LABEL_DIM)[:, SCORE_COLUMN]
            row = rows.get(slot)
            where = f"shard {shard} slot {slot}"
            if row is None:
                if not np.isnan(scores).all():
                    problems.append(f"{lab_path.name}: {where} (empty record): scores must all be NaN")
                continue
            where += f" scene {index['scene'][row]} ({index['name'][row]})"
            sums = (
                ("checksum", checksum(sdf_rec, lab_rec), int(index["checksum"][row])),
                ("device checksum", device_checksum(sdf_rec, lab_rec, keys), int(index["device_checksum"][row])),
            )
            bad = [
                f"{where}: record {kind} {got:016x}, index says {want:016x}" for kind, got, want in sums if got != want
            ]
            if bad:
                bad_records += bad
                continue
            used = int(index["num_grasps"][row])
            if not np.isfinite(scores[:used]).all() or not np.isnan(scores[used:]).all():
                problems.append(
                    f"{lab_path.name}: {where}: scores of the {used} used slots must be finite and the rest NaN"
                )
            elif index["split"][row] == "train":
                train.add(ScoreSums.of(scores[:used]))
    failed = [path for path, crc in ((sdf_path, sdf_crc), (lab_path, lab_crc)) if f"{crc:08x}" != crcs[path.name]]
    named = failed[0].name if len(failed) == 1 else f"{sdf_path.name}/{lab_path.name}"
    problems += [f"{named}: {line}" for line in bad_records]
    for path, crc in ((sdf_path, sdf_crc), (lab_path, lab_crc)):
        if path in failed:
            problems.append(
                f"{path.name}: shard {shard}: file CRC-32 {crc:08x} differs from the manifest's {crcs[path.name]}"
            )
    return problems


def verify(
    root: str | Path,
    *,
    quick: bool = False,
    progress: bool = False,
    shard_files: Callable[[int], AbstractContextManager] | None = None,
    label: str | None = None,
    remote_sizes: Mapping[str, int] | None = None,
) -> VerifyResult:
    """Check the dataset in `root`; `quick` checks sizes, headers and the index, not the bytes.

    `shard_files(k)`, when given, is entered around the reading of shard k's records: a copy of a remote
    dataset (`verify_remote`) fetches the shard's files there, and drops them after. `label` names the
    dataset in the summary and messages instead of `root`. `remote_sizes` (with `quick`): the sizes of the
    files of a remote dataset whose local copy in `root` (its folder in the shard cache) holds only some of
    them; the shard files are checked by their remote sizes, not their headers (a fetch checks the whole
    file's CRC-32 against the manifest, and the loaders every record), the index as a local one."""
    root = Path(root)
    if remote_sizes is not None and not quick:
        raise ValueError("remote_sizes is for the quick verify of a partial local copy")
    shown = label or str(root)
    shard_files = shard_files or (lambda k: contextlib.nullcontext())
    try:
        m = read_manifest(root)
    except DatasetError as err:
        return VerifyResult(root, [str(err)], quick=quick)
    if m.fingerprint != fingerprint(m):
        return VerifyResult(
            root,
            [
                f"{shown}/manifest.json: its fingerprint does not match its contents: edited after the build; "
                "rebuild the dataset"
            ],
            quick=quick,
        )
    layout = Layout.from_manifest(m)
    listed = {f.name: f for f in m.files}
    problems = []
    for k in range(m.num_shards):
        for name in (sdf_name(k), labels_name(k)):
            if name not in listed:
                problems.append(f"{name}: shard {k}: not listed in the manifest")
    for name, entry in listed.items():
        path = root / name
        if remote_sizes is not None and name != INDEX:
            size = remote_sizes.get(name)  # a cached copy was checked against the manifest when it was fetched
        else:
            size = path.stat().st_size if path.exists() else None
        if size is None:
            problems.append(f"{name}: listed in the manifest but missing")
        elif size != entry.bytes:
            problems.append(f"{name}: {size} bytes, manifest says {entry.bytes}")
    for k in range(m.num_shards if remote_sizes is None else 0):  # a cache may evict a copy at any moment
        if (root / sdf_name(k)).exists():
            problems += _check_header(root / sdf_name(k), layout.sdf_shape(), np.dtype(layout.dtype))
        if (root / labels_name(k)).exists():
            problems += _check_header(root / labels_name(k), layout.labels_shape(), LABEL_DTYPE)
    # The index is small: its checksum is checked even by --quick, so an index from another
    # dataset (or with scenes moved between splits) never reaches a loader.
    try:
        data = read_index_file(root / INDEX) if INDEX in listed and (root / INDEX).exists() else None
    except InputError as err:
        return VerifyResult(root, problems + [str(err)], quick=quick)
    if data is not None and f"{zlib.crc32(data):08x}" != listed[INDEX].crc32:  # one read: checked, then parsed
        problems.append(
            f"{INDEX}: file CRC-32 differs from the manifest's: not this dataset's index; rebuild the dataset"
        )
        return VerifyResult(root, problems, quick=quick)
    try:
        index = read_index(root / INDEX, data=data)
    except (OSError, ValueError) as err:
        return VerifyResult(root, problems + [f"{INDEX}: unreadable index ({err})"], quick=quick)
    problems += _check_index(m, index, layout)
    problems += _check_stats(m)
    read = 0
    if problems or quick:
        checked = "sizes, headers and index match (records not read: --quick)"
    else:
        rows_by_shard: dict[int, dict[int, int]] = {k: {} for k in range(m.num_shards)}
        for row, (shard, slot) in enumerate(zip(index["shard"], index["slot"])):
            rows_by_shard[int(shard)][int(slot)] = row
        crcs = {name: entry.crc32 for name, entry in listed.items()}
        parts = []
        for k in tqdm(range(m.num_shards), unit="shard", desc="verify", disable=(not progress) or None):
            parts.append(ScoreSums())
            with shard_files(k):
                problems += _check_records(root, k, layout, index, rows_by_shard[k], crcs, parts[-1])
        read = m.num_shards
        if not problems:
            problems += _check_stats(m, score_stats(parts))
        checked = "every file and record checksum matches"
    splits = " / ".join(f"{s} {m.splits[s].scenes}" for s in SPLITS)
    size = sum(entry.bytes for entry in m.files) / 1e6
    summary = (
        f"OK {shown}: {m.num_scenes} scenes ({splits}), {m.num_shards} shards of "
        f"{m.records_per_shard}, {size:.1f} MB; {checked}"
    )
    return VerifyResult(root, problems, summary, quick=quick, shards=read)
