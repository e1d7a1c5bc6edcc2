"""Building a dataset from the seed's processed layout: parallel decode, streaming write, resume.

Worker processes load and check scenes (`source.load_record`); the parent writes records in scene
order through one `ShardWriter`. After each completed shard a line goes to `.build/journal.jsonl`
(its files' hashes, its index rows, where the source stands); `--resume` keeps the journalled
shards whose hashes still match and continues from there, so a resumed build writes the same
bytes as an uninterrupted one. The manifest is written last and the journal removed.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__
from .format import (BUILD_DIR, FORMAT_NAME, FORMAT_VERSION, GRASP_DIM, HEADER_BYTES, INDEX, LABEL_DIM,
                     MANIFEST, SDF_DTYPES, SKIPPED, file_sha256)
from .index import write_index
from .manifest import write_manifest
from .reader import SPLITS
from .source import Record, SceneError, list_scenes, load_record
from .splits import assign_splits
from .writer import Layout, ShardWriter

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

    def check(self) -> None:
        if self.dtype not in SDF_DTYPES:
            raise BuildError(f"--dtype {self.dtype}: choose one of {', '.join(SDF_DTYPES)}")
        for flag, value in (("--grid", self.grid), ("--records-per-shard", self.records_per_shard),
                            ("--max-grasps", self.max_grasps)):
            if value < 1:
                raise BuildError(f"{flag} {value}: must be at least 1")
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
            s = record.scores
            self.train_count += s.size
            self.train_sum += float(s.sum())
            self.train_sumsq += float(np.square(s).sum())
            self.train_min = min(self.train_min, float(s.min()))
            self.train_max = max(self.train_max, float(s.max()))


def _load(source: Path, opts: BuildOptions, name: str) -> Record | SceneError:
    """Worker task: a bad scene comes back as a value, so the parent decides skip or stop."""
    try:
        return load_record(source, name, opts.grid, opts.dtype, opts.max_grasps)
    except SceneError as err:
        return err


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


def _read_journal(out: Path, header: dict, layout: Layout) -> list[dict]:
    """The journalled shards that still verify, in order; the rest of the journal is dropped."""
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
        good = all((out / f["name"]).exists() and (out / f["name"]).stat().st_size == f["bytes"]
                   and file_sha256(out / f["name"]) == f["sha256"] for f in entry["files"])
        if not good or entry["shard"] != len(kept):
            break
        kept.append(entry)
    return kept


def _journal_line(path: Path, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()


def _allocated_bytes(paths: list[Path]) -> int:
    """Bytes the files occupy on disk (sparse padding excluded), as `du` counts them."""
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
    layout = opts.layout()
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "source": str(source), "args": asdict(opts)}

    created = _prepare_out(out, resume, overwrite)
    writer = ShardWriter(out, layout)
    try:
        done = _read_journal(out, header, layout) if resume else []
        _restart_journal(out, header, done)
        writer.shard = len(done)
        summary = _write_all(source, out, opts, names, splits, done, writer, workers, progress)
    except (SceneError, BuildError, OSError, MemoryError):
        writer.abort()
        _remove_outputs(out, created)
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit: keep complete shards for --resume
        writer.abort()
        raise
    summary["wall_s"] = time.perf_counter() - start
    return summary


def _restart_journal(out: Path, header: dict, done: list[dict]) -> None:
    """Rewrite the journal with the kept shards only, and delete every file beyond them."""
    keep = {f["name"] for entry in done for f in entry["files"]}
    for path in out.iterdir():
        if path.is_file() and path.name not in keep:
            path.unlink()
    lines = [header] + done
    (out / BUILD_DIR / JOURNAL).write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))


def _write_all(source: Path, out: Path, opts: BuildOptions, names: list[str], splits: list[str],
               done: list[dict], writer: ShardWriter, workers: int | None, progress: bool) -> dict:
    layout = writer.layout
    rows = [row for entry in done for row in entry["rows"]]
    skipped = [s for entry in done for s in entry["skipped"]]
    stats = [_ShardStats(**entry["stats"]) for entry in done]
    files = [f for entry in done for f in entry["files"]]
    position = done[-1]["next"] if done else 0
    pending_skips: list[dict] = []
    current = _ShardStats()
    record_bytes = layout.sdf_record_bytes + layout.labels_record_bytes
    journal = out / BUILD_DIR / JOURNAL

    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(names), initial=position, unit="scene", disable=not progress,
               desc="make_shards", dynamic_ncols=True)
    bar_start, bar_bytes = time.perf_counter(), 0
    with multiprocessing.Pool(workers) as pool:
        results = pool.imap(partial(_load, source, opts), names[position:], chunksize=4)
        for i, result in enumerate(results, start=position):
            bar.update(1)
            if isinstance(result, SceneError):
                if not opts.skip_bad:
                    raise result
                pending_skips.append({"name": names[i], "reason": result.reason})
                continue
            scene = len(rows)
            rows.append({"scene": scene, "name": result.name, "split": splits[i], "shard": writer.shard,
                         "slot": writer.slot, "num_grasps": result.num_grasps, "checksum": result.checksum,
                         "translation": result.translation, "global_scale": result.global_scale})
            current.add(result, splits[i])
            completed = writer.append(result.sdf, result.labels)
            bar_bytes += record_bytes
            if scene % 64 == 0:
                bar.set_postfix_str(f"{bar_bytes / 1e6 / max(time.perf_counter() - bar_start, 1e-9):.0f} MB/s")
            if completed:
                entry = {"shard": writer.shard - 1, "files": completed, "next": i + 1,
                         "rows": rows[-layout.records_per_shard:], "skipped": pending_skips,
                         "stats": asdict(current)}
                _journal_line(journal, entry)
                files += completed
                stats.append(current)
                skipped += pending_skips
                pending_skips, current = [], _ShardStats()
    bar.close()
    tail = writer.finish()
    if tail:
        files += tail
        stats.append(current)
    skipped += pending_skips
    if not rows:
        raise BuildError(f"SOURCE {source}: every scene was skipped as bad; see the reasons above")
    return _finish(out, opts, source, rows, files, stats, skipped, len(names))


def _finish(out: Path, opts: BuildOptions, source: Path, rows: list[dict], files: list[dict],
            stats: list[_ShardStats], skipped: list[dict], considered: int) -> dict:
    """Index, skip report and manifest (last), then drop the journal."""
    layout = opts.layout()
    write_index(out / INDEX, rows)
    files = files + [{"name": INDEX, "bytes": (out / INDEX).stat().st_size, "sha256": file_sha256(out / INDEX)}]
    if opts.skip_bad:
        tmp = out / f".{SKIPPED}.tmp"
        tmp.write_text("".join(json.dumps(s) + "\n" for s in skipped))
        os.replace(tmp, out / SKIPPED)

    per_split = {s: {"scenes": 0, "grasps": 0} for s in SPLITS}
    for row in rows:
        per_split[row["split"]]["scenes"] += 1
        per_split[row["split"]]["grasps"] += row["num_grasps"]
    n = sum(s.train_count for s in stats)
    mean = sum(s.train_sum for s in stats) / n if n else None
    std = float(np.sqrt(max(sum(s.train_sumsq for s in stats) / n - mean ** 2, 0.0))) if n else None
    score_stats = {"split": "train", "count": n, "mean": mean, "std": std,
                   "min": min(s.train_min for s in stats) if n else None,
                   "max": max(s.train_max for s in stats) if n else None}
    num_shards = len(stats)
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "grid": [layout.grid] * 3, "sdf_dtype": layout.dtype, "label_dtype": "float32",
        "grasp_dim": GRASP_DIM, "label_dim": LABEL_DIM, "max_grasps": layout.max_grasps,
        "records_per_shard": layout.records_per_shard, "header_bytes": HEADER_BYTES,
        "num_shards": num_shards, "num_scenes": len(rows), "num_records": num_shards * layout.records_per_shard,
        "splits": per_split, "score_stats": score_stats,
        "sdf_max_conversion_error": max(s.conversion_error for s in stats),
        "skipped": len(skipped),
        "checksums": {"files": "sha256", "records": "crc32 of the SDF record bytes, then the labels record bytes"},
        "files": files,
        "made_by": {"tool": "make_shards", "version": __version__, "source": str(source), "args": asdict(opts)},
    }
    write_manifest(out, manifest)
    shutil.rmtree(out / BUILD_DIR)
    paths = [out / f["name"] for f in files] + [out / MANIFEST]
    return {
        "out": str(out), "scenes": len(rows), "considered": considered, "skipped": len(skipped),
        "splits": per_split, "shards": num_shards, "records": manifest["num_records"],
        "bytes_on_disk": _allocated_bytes(paths), "bytes_apparent": sum(p.stat().st_size for p in paths),
        "score_stats": score_stats, "sdf_dtype": layout.dtype,
        "sdf_max_conversion_error": manifest["sdf_max_conversion_error"],
    }
