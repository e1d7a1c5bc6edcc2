"""Building a dataset from the seed's processed layout: parallel decode and write, resume.

Scenes are sorted by name; a scene's id is its sorted position. Its record's place is fixed up
front (`placement.py`): each split fills its own consecutive shards, its scenes in a seeded order.
Worker processes load, check and convert scenes and write each record straight into its shard's
temporary files; only metadata comes back. The builder consumes results in record order, folds
the record CRC-32s into the files' CRC-32s, and when a shard's R records are all in, renames its
files into place and appends a line to `.build/journal.jsonl` (its files, its index rows).
`--resume` keeps the journalled shards whose files still match and rebuilds the rest, so a resumed
build writes the same bytes as an uninterrupted one. The manifest is last.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .crc import CRCAppender
from .format import (BUILD_DIR, FORMAT_NAME, FORMAT_VERSION, GRASP_DIM, HEADER_BYTES, INDEX, LABEL_DIM,
                     MANIFEST, SDF_DTYPES, SKIPPED, file_crc32, grid_points)
from .index import write_index
from .manifest import write_manifest
from .placement import Placement, place_scenes
from .reader import SPLITS
from .source import Record, SceneError, list_scenes, load_record
from .splits import assign_splits
from .writer import Layout, commit_shard, create_shard, write_record

JOURNAL = "journal.jsonl"


class BuildError(ValueError):
    """A build that cannot start or continue; `str()` says what and what to do."""


@dataclass(frozen=True)
class BuildOptions:
    """Everything that shapes the bytes of a dataset (recorded in the manifest)."""

    grid: int = 48
    dtype: str = "float16"
    records_per_shard: int = 256
    max_grasps: int = 480
    splits: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    limit: int | None = None
    skip_bad: bool = False
    shuffle_seed: int = 0

    def check(self) -> None:
        if self.dtype not in SDF_DTYPES:
            raise BuildError(f"--dtype {self.dtype}: choose one of {', '.join(SDF_DTYPES)}")
        for flag, value in (("--grid", self.grid), ("--records-per-shard", self.records_per_shard),
                            ("--max-grasps", self.max_grasps)):
            if value < 1:
                raise BuildError(f"{flag} {value}: must be at least 1")
        if self.grid % 2:
            raise BuildError(f"--grid {self.grid}: must be even (records are whole 32-bit words)")
        if self.shuffle_seed < 0:
            raise BuildError(f"--shuffle-seed {self.shuffle_seed}: must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise BuildError(f"--limit {self.limit}: must be at least 1")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise BuildError(f"--val-fraction {self.val_fraction} --test-fraction {self.test_fraction}: "
                             "each must be >= 0 and together < 1")

    def layout(self) -> Layout:
        return Layout(self.grid, self.dtype, self.max_grasps, self.records_per_shard)


@dataclass
class _ShardStats:
    """Per-shard sums, merged in shard order so resumed and fresh builds round identically."""

    train_count: int = 0
    train_sum: float = 0.0
    train_sumsq: float = 0.0
    train_min: float = float("inf")
    train_max: float = float("-inf")
    conversion_error: float = 0.0

    def add(self, record: Record, split: str) -> None:
        self.conversion_error = max(self.conversion_error, record.conversion_error)
        if split == "train":
            self.train_count += record.num_grasps
            self.train_sum += record.score_sum
            self.train_sumsq += record.score_sumsq
            self.train_min = min(self.train_min, record.score_min)
            self.train_max = max(self.train_max, record.score_max)


class _Shard:
    """The shard being completed: its rows, skips, statistics and running file CRC-32s."""

    def __init__(self, number: int, header_crcs: tuple[int, int]):
        self.number, self.crcs = number, list(header_crcs)
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.stats = _ShardStats()

    def add_crcs(self, appenders: tuple[CRCAppender, CRCAppender], crcs: tuple[int, int]) -> None:
        self.crcs = [a.append(c, r) for a, c, r in zip(appenders, self.crcs, crcs)]


def _convert(source: Path, out: Path, opts: BuildOptions, task: tuple[int, str]) -> Record | SceneError:
    """Worker task: load, check, convert and write one scene; returns its metadata or its error."""
    position, name = task
    try:
        record = load_record(source, name, opts.grid, opts.dtype, opts.max_grasps)
    except SceneError as err:
        return err  # a value, not a raise: the builder decides to skip or stop
    write_record(out, opts.layout(), position, record.sdf, record.labels)
    return dataclasses.replace(record, sdf=b"", labels=b"")


def _ours(path: Path) -> bool:
    return (path / MANIFEST).exists() or (path / BUILD_DIR).exists()


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> bool:
    """Check or clear the output directory; returns whether this build created it."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not _ours(out):
            raise BuildError(f"--out {out}: not empty and not a dataset; choose a new or empty directory")
        if overwrite:
            shutil.rmtree(out)
        elif resume and (out / MANIFEST).exists():
            raise BuildError(f"--out {out}: already a finished dataset, nothing to resume; "
                             "pass --overwrite to rebuild it")
        elif not resume:
            raise BuildError(f"--out {out}: already holds a dataset or an unfinished build; "
                             "pass --resume to continue it or --overwrite to replace it")
    created = not out.exists()
    (out / BUILD_DIR).mkdir(parents=True, exist_ok=True)
    return created


def _remove_outputs(out: Path, created: bool) -> None:
    """Leave nothing behind after a failed build: the directory if we made it, else our files."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for path in out.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _read_journal(out: Path, header: dict) -> list[dict]:
    """The journalled shards whose files still match, in order; later ones are rebuilt."""
    path = out / BUILD_DIR / JOURNAL
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    try:
        first = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        first = None
    if first != header:
        raise BuildError(f"--out {out}: the unfinished build there used other sources or options; "
                         "pass --overwrite to start again")
    kept = []
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break  # the line being written when the build was killed
        good = entry["shard"] == len(kept) and all(
            (out / f["name"]).exists() and (out / f["name"]).stat().st_size == f["bytes"]
            and file_crc32(out / f["name"]) == f["crc32"] for f in entry["files"])
        if not good:
            break
        kept.append(entry)
    return kept


def _restart_journal(out: Path, header: dict, done: list[dict]) -> None:
    """Rewrite the journal with the kept shards only, and delete every other file."""
    keep = {f["name"] for entry in done for f in entry["files"]}
    for path in out.iterdir():
        if path.is_file() and path.name not in keep:
            path.unlink()
    lines = [header] + done
    (out / BUILD_DIR / JOURNAL).write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))


def _allocated_bytes(paths: list[Path]) -> int:
    """Bytes the files occupy on disk (sparse holes excluded), as `du` counts them."""
    return sum(p.stat().st_blocks * 512 for p in paths)


def build_shards(source: str | Path, out: str | Path, opts: BuildOptions, *, workers: int | None = None,
                 resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Build a dataset in `out` from `source/<name>/scene.npz`; returns the build summary.

    Raises SceneError for the first bad scene (unless `opts.skip_bad`), BuildError or SplitError
    for unusable arguments; in both cases nothing is left in `out`. A KeyboardInterrupt keeps the
    completed shards for `--resume`.
    """
    start = time.perf_counter()
    opts.check()
    source, out = Path(source).resolve(), Path(out)
    if not source.is_dir():
        raise BuildError(f"SOURCE {source}: no such directory (expected <name>/scene.npz inside)")
    names = list_scenes(source)[: opts.limit]
    if not names:
        raise BuildError(f"SOURCE {source}: no scene directories found (expected <name>/scene.npz)")
    splits = assign_splits(names, Path(opts.splits) if opts.splits else None, opts.val_fraction, opts.test_fraction)
    placement = place_scenes(names, splits, opts.shuffle_seed, opts.records_per_shard)
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "source": str(source), "args": asdict(opts)}

    created = _prepare_out(out, resume, overwrite)
    try:
        done = _read_journal(out, header) if resume else []
        _restart_journal(out, header, done)
        summary = _write_all(source, out, opts, names, splits, placement, done, workers, progress)
    except (SceneError, BuildError, OSError, MemoryError):
        _remove_outputs(out, created)
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit: keep complete shards for --resume
        for tmp in out.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        raise
    summary["wall_s"] = time.perf_counter() - start
    return summary


def _write_all(source: Path, out: Path, opts: BuildOptions, names: list[str], splits: list[str],
               placement: Placement, done: list[dict], workers: int | None, progress: bool) -> dict:
    layout = opts.layout()
    r = layout.records_per_shard
    num_shards = placement.num_shards
    scene_at = placement.scene_at
    header_crcs = tuple(zlib.crc32(h) for h in layout.headers())
    appenders = (CRCAppender(layout.sdf_record_bytes), CRCAppender(layout.labels_record_bytes))
    empty_crcs, empty_labels = layout.empty_checksums(), layout.empty_labels()
    journal = out / BUILD_DIR / JOURNAL
    for k in range(len(done), num_shards):
        create_shard(out, layout, k, int((scene_at[k * r:(k + 1) * r] >= 0).sum()))

    entries = list(done)
    shard = _Shard(len(done), header_crcs)
    first = len(done) * r
    record_bytes = layout.sdf_record_bytes + layout.labels_record_bytes
    bar = tqdm(total=len(names), initial=first, unit="scene", disable=(not progress) or None, desc="make_shards",
               dynamic_ncols=True)
    started = time.perf_counter()
    with multiprocessing.Pool(workers or os.cpu_count() or 1) as pool:
        tasks = [(p, names[i]) for p, i in enumerate(scene_at[first:].tolist(), first) if i >= 0]
        results = pool.imap(partial(_convert, source, out, opts), tasks, chunksize=8)
        for position in range(first, num_shards * r):
            scene = int(scene_at[position])
            result = next(results) if scene >= 0 else None
            if isinstance(result, Record):
                shard.rows.append({"scene": scene, "name": result.name, "split": splits[scene],
                                   "shard": shard.number, "slot": position % r, "num_grasps": result.num_grasps,
                                   "checksum": result.checksum, "device_checksum": result.device_checksum,
                                   "translation": result.translation, "global_scale": result.global_scale})
                shard.stats.add(result, splits[scene])
                shard.add_crcs(appenders, (result.sdf_crc, result.labels_crc))
            else:  # a skipped scene or a split's padding: an empty record
                if isinstance(result, SceneError):
                    if not opts.skip_bad:
                        raise result
                    shard.skipped.append({"name": names[scene], "reason": result.reason})
                write_record(out, layout, position, None, empty_labels)
                shard.add_crcs(appenders, empty_crcs)
            if scene >= 0:
                bar.update(1)
                if position % 64 == 0:
                    rate = (position - first + 1) * record_bytes / 1e6 / max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix_str(f"{rate:.0f} MB/s")
            if position % r == r - 1:
                entry = {"shard": shard.number, "files": commit_shard(out, shard.number, tuple(shard.crcs)),
                         "rows": shard.rows, "skipped": shard.skipped, "stats": asdict(shard.stats)}
                with open(journal, "a") as f:
                    f.write(json.dumps(entry, sort_keys=True) + "\n")
                entries.append(entry)
                shard = _Shard(shard.number + 1, header_crcs)
    bar.close()
    if not any(entry["rows"] for entry in entries):
        raise BuildError(f"SOURCE {source}: every scene was skipped as bad; see skipped.jsonl reasons above")
    return _finish(out, opts, source, entries, len(names), placement)


def _finish(out: Path, opts: BuildOptions, source: Path, entries: list[dict], considered: int,
            placement: Placement) -> dict:
    """Index, skip report and manifest (last), then drop the journal."""
    layout = opts.layout()
    rows = [row for e in entries for row in e["rows"]]
    skipped = [s for e in entries for s in e["skipped"]]
    stats = [_ShardStats(**e["stats"]) for e in entries]
    files = [f for e in entries for f in e["files"]]
    write_index(out / INDEX, rows)
    files.append({"name": INDEX, "bytes": (out / INDEX).stat().st_size, "crc32": file_crc32(out / INDEX)})
    if opts.skip_bad:
        tmp = out / f".{SKIPPED}.tmp"
        tmp.write_text("".join(json.dumps(s) + "\n" for s in skipped))
        os.replace(tmp, out / SKIPPED)

    per_split = {s: {"scenes": 0, "grasps": 0, "first_shard": placement.shards[s][0],
                     "num_shards": placement.shards[s][1]} for s in SPLITS}
    for row in rows:
        per_split[row["split"]]["scenes"] += 1
        per_split[row["split"]]["grasps"] += row["num_grasps"]
    n = sum(s.train_count for s in stats)
    mean = sum(s.train_sum for s in stats) / n if n else None
    std = max(sum(s.train_sumsq for s in stats) / n - mean ** 2, 0.0) ** 0.5 if n else None
    score_stats = {"split": "train", "count": n, "mean": mean, "std": std,
                   "min": min(s.train_min for s in stats) if n else None,
                   "max": max(s.train_max for s in stats) if n else None}
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "grid": [layout.grid] * 3, "grid_origin": grid_points(layout.grid)[0],
        "grid_spacing": grid_points(layout.grid)[1], "sdf_dtype": layout.dtype, "label_dtype": "float32",
        "grasp_dim": GRASP_DIM, "label_dim": LABEL_DIM, "max_grasps": layout.max_grasps,
        "records_per_shard": layout.records_per_shard, "header_bytes": HEADER_BYTES,
        "num_shards": len(entries), "num_scenes": len(rows), "num_records": len(entries) * layout.records_per_shard,
        "source_scenes": considered,
        "splits": per_split, "score_stats": score_stats,
        "sdf_max_conversion_error": max(s.conversion_error for s in stats),
        "skipped": len(skipped),
        "checksums": {"files": "crc32 of the whole file",
                      "records": "xxh3_64 of the record's SDF bytes, then its labels bytes",
                      "device_records": "sum of the record's little-endian 32-bit words times splitmix64 keys, "
                                        "mod 2^64 (shards/checksum.py)"},
        "files": files,
        "made_by": {"tool": "make_shards", "version": __version__, "source": str(source), "args": asdict(opts)},
    }
    write_manifest(out, manifest)
    shutil.rmtree(out / BUILD_DIR)
    paths = [out / f["name"] for f in files] + [out / MANIFEST]
    return {
        "out": str(out), "scenes": len(rows), "considered": considered, "skipped": len(skipped),
        "splits": per_split, "shards": len(entries), "records": manifest["num_records"],
        "bytes_on_disk": _allocated_bytes(paths), "bytes_apparent": sum(p.stat().st_size for p in paths),
        "score_stats": score_stats, "sdf_dtype": layout.dtype,
        "sdf_max_conversion_error": manifest["sdf_max_conversion_error"],
    }
