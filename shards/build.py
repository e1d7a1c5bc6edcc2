"""Building a dataset from the seed's processed layout: parallel decode and write, resume.

Scenes are sorted by name; a scene's id is its sorted position. Its record's place is fixed up
front (`placement.py`): each split fills its own consecutive shards, its scenes in a seeded order.
Worker processes load, check and convert scenes and write each record straight into its shard's
temporary files; only metadata comes back. The builder consumes results in record order, folds
the record CRC-32s into the files' CRC-32s, and when a shard's R records are all in, renames its
files into place and appends a line to `.build/journal.jsonl` (its files, its index rows, and the
size and mtime_ns of each of its source files). `--resume` keeps the journalled shards whose files
still match and rebuilds the rest, so a resumed build writes the same bytes as an uninterrupted
one; a kept shard whose source file changed since is an error. The manifest is last. All of it
happens in a build folder beside `--out`, under a lock, swapped in when complete (`outdir.py`).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import time
import zlib
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from tqdm import tqdm

from gq.common.executor import open_executor
from gq.common.files import write_atomically
from gq.common.grasps import SEED_MAX_GRASPS
from gq.common.options import option
from gq.common.ownership import RECORD, BesideBuild

from . import __version__
from .crc import CRCAppender
from .format import (
    BUILD_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    GRASP_DIM,
    HEADER_BYTES,
    INDEX,
    LABEL_DIM,
    MANIFEST,
    SDF_DTYPES,
    SKIPPED,
    SPLITS,
    FileEntry,
    Layout,
    Manifest,
    Provenance,
    ScoreStats,
    SplitInfo,
    file_crc32,
    grid_points,
)
from .index import write_index
from .manifest import write_manifest
from .outdir import JOURNAL, TOOL, BuildError, dataset_entries, unfinished_build
from .placement import Placement, place_scenes
from .source import SCENE_FILE, Record, SceneError, list_scenes, load_record
from .splits import assign_splits, read_splits_file
from .stats import ScoreSums, score_stats
from .writer import commit_shard, create_shard, write_record

MAX_RECORD_BYTES = 1 << 28  # 256 MiB: a 256^3 float32 grid is 64 MiB; the seed's 480 grasps take 38 kB
MAX_SHARD_BYTES = 1 << 36  # 64 GiB per shard file


@dataclass(frozen=True)
class BuildOptions:
    """Everything that shapes the bytes of a dataset (recorded in the manifest); each field is a make_shards option."""

    grid: int = option(48, help="SDF grid size D (every scene must be D^3).")
    dtype: str = option("float16", choices=SDF_DTYPES, help="Stored SDF dtype.")
    records_per_shard: int = option(256, help="Records R in every shard file.")
    max_grasps: int = option(SEED_MAX_GRASPS, help="Grasp slots per record.")
    splits: str | None = option(
        None, help="The seed's splits.json; every scene must be in it. Default: split by a hash of the name."
    )
    val_fraction: float = option(0.1, help="Hash split: share of scenes in val.")
    test_fraction: float = option(0.1, help="Hash split: share of scenes in test.")
    limit: int | None = option(None, help="Use only the first N scenes by name.")
    skip_bad: bool = option(False, help="Skip bad scenes (listed in DIR/skipped.jsonl) instead of stopping.")
    shuffle_seed: int = option(0, help="Seed of the stored order of each split's scenes (a hash of seed and name).")

    def check(self) -> None:
        if self.dtype not in SDF_DTYPES:
            raise BuildError(f"--dtype {self.dtype}: choose one of {', '.join(SDF_DTYPES)}")
        for flag, value in (
            ("--grid", self.grid),
            ("--records-per-shard", self.records_per_shard),
            ("--max-grasps", self.max_grasps),
        ):
            if value < 1:
                raise BuildError(f"{flag} {value}: must be at least 1")
        if self.grid % 2:
            raise BuildError(f"--grid {self.grid}: must be even (records are whole 32-bit words)")
        layout = self.layout()
        record = layout.sdf_record_bytes + layout.labels_record_bytes
        if record > MAX_RECORD_BYTES:
            raise BuildError(
                f"--grid {self.grid} --max-grasps {self.max_grasps}: one record would take "
                f"{record:,} bytes (SDF {layout.sdf_record_bytes:,} + labels "
                f"{layout.labels_record_bytes:,}), over the {MAX_RECORD_BYTES >> 20} MiB limit; "
                f"the seed's scenes have 48^3 grids and at most {SEED_MAX_GRASPS} grasps"
            )
        if record * self.records_per_shard > MAX_SHARD_BYTES:
            raise BuildError(
                f"--records-per-shard {self.records_per_shard}: a shard would take "
                f"{record * self.records_per_shard:,} bytes ({record:,} per record), over the "
                f"{MAX_SHARD_BYTES >> 30} GiB limit; use fewer records per shard"
            )
        if self.shuffle_seed < 0:
            raise BuildError(f"--shuffle-seed {self.shuffle_seed}: must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise BuildError(f"--limit {self.limit}: must be at least 1")
        if not (self.val_fraction >= 0 and self.test_fraction >= 0 and self.val_fraction + self.test_fraction < 1):
            raise BuildError(
                f"--val-fraction {self.val_fraction} --test-fraction {self.test_fraction}: "
                "each must be >= 0 and together < 1"
            )

    def layout(self) -> Layout:
        return Layout(self.grid, self.dtype, self.max_grasps, self.records_per_shard)


@dataclass
class _ShardStats:
    """Per-shard sums, merged in shard order so resumed and fresh builds round identically."""

    train: ScoreSums = dataclasses.field(default_factory=ScoreSums)
    conversion_error: float = 0.0

    def add(self, record: Record, split: str) -> None:
        self.conversion_error = max(self.conversion_error, record.conversion_error)
        if split == "train":
            self.train.add(record.scores)


class _Shard:
    """The shard being completed: its rows, skips, statistics and running file CRC-32s."""

    def __init__(self, number: int, header_crcs: tuple[int, int]):
        self.number, self.crcs = number, list(header_crcs)
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.sources: list[dict] = []  # each scene's source file as read: name, bytes, mtime_ns
        self.stats = _ShardStats()

    def add_crcs(self, appenders: tuple[CRCAppender, CRCAppender], crcs: tuple[int, int]) -> None:
        self.crcs = [a.append(c, r) for a, c, r in zip(appenders, self.crcs, crcs)]


def _source_stat(source: Path, name: str) -> dict:
    """Size and mtime_ns of a scene's file, taken before it is read: what `--resume` re-checks."""
    try:
        st = os.stat(source / name / SCENE_FILE)
    except OSError:
        return {"name": name, "bytes": None, "mtime_ns": None}
    return {"name": name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _convert(source: Path, out: Path, opts: BuildOptions, task: tuple[int, str]) -> tuple[Record | SceneError, dict]:
    """Worker task: load, check, convert and write one scene; returns its metadata or its error, and its file's stat."""
    position, name = task
    stat = _source_stat(source, name)
    try:
        record = load_record(source, name, opts.grid, opts.dtype, opts.max_grasps)
    except SceneError as err:
        return err, stat  # a value, not a raise: the builder decides to skip or stop
    write_record(out, opts.layout(), position, record.sdf, record.labels)
    return dataclasses.replace(record, sdf=b"", labels=b""), stat


def _prepare(
    build: BesideBuild, resume: bool, overwrite: bool, header: dict, source: Path, num_shards: int
) -> tuple[Path, list[dict]]:
    """Ready the build folder for this build: the unfinished one (`resume`) or a new one.

    Returns it and the shards kept from the unfinished build. Nothing is removed before every check has
    passed; a refused resume leaves the unfinished build as it was (the lock file still names it).
    """
    entries = dataset_entries(num_shards)
    if resume:
        if build.unfinished is not None:
            done = _read_journal(build.unfinished, header, source)
            return build.resume(entries), done
        if build.old is not None:
            raise BuildError(
                f"--out {build.out}: already a finished dataset, nothing to resume; pass --overwrite to rebuild it"
            )
    elif not overwrite and (build.old is not None or build.unfinished is not None):
        raise BuildError(
            f"--out {build.out}: already holds a dataset or an unfinished build; "
            "pass --resume to continue it or --overwrite to replace it"
        )
    work = build.create(entries)
    (work / BUILD_DIR).mkdir()
    (work / BUILD_DIR / JOURNAL).write_text(json.dumps(header, sort_keys=True) + "\n")
    return work, []


def _read_journal(work: Path, header: dict, source: Path) -> list[dict]:
    """The journalled shards whose files still match, in order; later ones are rebuilt.

    A kept shard whose source file's size or mtime_ns differs from the journal's is an error.
    """
    lines = (work / BUILD_DIR / JOURNAL).read_text().splitlines()
    try:
        first = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        first = None
    if not isinstance(first, dict) or first.get("format") != header["format"]:
        raise BuildError(
            f"--out {work}: the unfinished build there has no readable journal header; pass --overwrite to start again"
        )
    changed = _what_changed(first, header)
    kept = []
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break  # the line being written when the build was killed
        good = (
            entry["shard"] == len(kept)
            and "sources" in entry
            and all(
                (work / f["name"]).exists()
                and (work / f["name"]).stat().st_size == f["bytes"]
                and file_crc32(work / f["name"]) == f["crc32"]
                for f in entry["files"]
            )
        )
        if not good:
            break
        kept.append(entry)
    if changed and (kept or not changed.startswith("placement unknown")):
        raise BuildError(
            f"--out {work}: cannot resume: {changed} since the unfinished build started, so its shards would hold "
            "other scenes; pass --overwrite to rebuild from scratch (or undo the change)"
        )
    for entry in kept:
        for recorded in entry["sources"]:
            now = _source_stat(source, recorded["name"])
            if now != recorded:
                raise BuildError(
                    f"{source / recorded['name'] / SCENE_FILE}: changed since the unfinished build read "
                    f"it (size {recorded['bytes']} -> {now['bytes']}, mtime_ns {recorded['mtime_ns']} -> "
                    f"{now['mtime_ns']}); pass --overwrite to rebuild from scratch"
                )
    return kept


def _what_changed(journalled: dict, header: dict) -> str | None:
    """What differs between the journal's header and this build's, in words (None: nothing): an option, the
    source, a scene added to or removed from SOURCE, the splits file's content. Everything that decides
    where a scene's record goes is in the header, so equal headers mean equal placements."""
    if journalled.get("version") != header["version"]:
        return f"the format version changed ({journalled.get('version')} -> {header['version']})"
    old_args, new_args = journalled.get("args") or {}, header["args"]
    for key in new_args:
        if old_args.get(key) != new_args[key]:
            return f"option --{key.replace('_', '-')} changed ({old_args.get(key)!r} -> {new_args[key]!r})"
    if journalled.get("source") != header["source"]:
        return f"SOURCE changed ({journalled.get('source')} -> {header['source']})"
    if "scenes" not in journalled:
        return "placement unknown: the journal (of an older make_shards) does not record its scene list"
    old, new = journalled["scenes"], header["scenes"]
    if old != new:
        added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        if added:
            return f"scene {added[0]} was added to SOURCE ({len(added)} added, {len(removed)} removed)"
        if removed:
            return f"scene {removed[0]} was removed from SOURCE ({len(removed)} removed)"
        return "the scene list changed"
    if journalled.get("splits_sha256") != header["splits_sha256"]:
        return f"the content of the splits file {new_args['splits']} changed"
    return None


def _splits_digest(splits: str | None) -> str | None:
    """SHA-256 of the splits file's bytes (None without one): its content decides placement, not its name."""
    if splits is None:
        return None
    return hashlib.sha256(read_splits_file(Path(splits))).hexdigest()


def _restart_journal(work: Path, header: dict, done: list[dict]) -> None:
    """Rewrite the journal with the kept shards only, and delete every other file (the record stays)."""
    keep = {f["name"] for entry in done for f in entry["files"]} | {RECORD}
    for path in work.iterdir():
        if path.is_file() and path.name not in keep:
            path.unlink()
    lines = [header] + done
    (work / BUILD_DIR / JOURNAL).write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))


def _allocated_bytes(paths: list[Path]) -> int:
    """Bytes the files occupy on disk (sparse holes excluded), as `du` counts them."""
    return sum(p.stat().st_blocks * 512 for p in paths)


def build_shards(
    source: str | Path,
    out: str | Path,
    opts: BuildOptions,
    *,
    workers: int | None = None,
    ray: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    allow_missing_scenes: bool = False,
) -> dict:
    """Build a dataset in `out` from `source/<name>/scene.npz`; returns the build summary.

    The build runs in a build folder beside `out` under a lock and replaces `out` only when
    complete; the same source and options give byte-identical files for any number of workers. When it
    raises, `out` is as it was and no build folder is left; a KeyboardInterrupt keeps the complete
    shards for `resume`.

    Args:
        source: A processed directory in the seed's layout: `<name>/scene.npz` with `sdf`, `grasps`, `scores`.
        out: The dataset directory to create (or replace, with `overwrite`).
        opts: The format and split options (`BuildOptions`: grid, dtype, records per shard, max grasps,
            splits file or fractions, shuffle seed, skip_bad, limit).
        workers: Processes that decode and write scenes [default and most: the CPUs, or the scenes if fewer].
        ray: Run that work as Ray tasks on the cluster at this address instead (`auto`: the one `ray start`
            made; `local`: a private one); SOURCE and `out`'s folder must be on a file system every node sees.
        resume: Continue an interrupted build of the same source and options.
        overwrite: Replace an existing dataset in `out` (only the files its record names are removed).
        progress: Show a progress bar.
        allow_missing_scenes: Accept a splits file that names scenes absent from `source`.

    Returns:
        The build summary: scene, grasp and shard counts per split, skipped scenes, score statistics,
        bytes written and timings (what `gq shards build` prints).

    Raises:
        SceneError: The first bad scene (unreadable, wrong shape or dtype, non-finite values), unless
            `opts.skip_bad`.
        BuildError: Unusable options or output (a foreign file in `out`, another build holding the lock,
            a full disk).
        SplitError: A splits file that is unreadable or disagrees with the scenes.
        SourceError: An unusable source directory (a dangling link, a name that is not UTF-8).

    Example:
        ```python
        from gq.shards import BuildOptions, build_shards

        summary = build_shards("data/processed", "data/shards", BuildOptions(splits="splits.json"), workers=4)
        ```
    """
    start = time.perf_counter()
    opts.check()
    source, out = Path(source).resolve(), Path(out).resolve()
    if not source.is_dir():
        raise BuildError(f"SOURCE {source}: no such directory (expected <name>/scene.npz inside)")
    listed = list_scenes(source, exclude=(out, unfinished_build(out)))
    names = listed[: opts.limit]
    if not names:
        raise BuildError(f"SOURCE {source}: no scene directories found (expected <name>/scene.npz)")
    splits = assign_splits(
        names,
        Path(opts.splits) if opts.splits else None,
        opts.val_fraction,
        opts.test_fraction,
        present=listed,
        allow_missing=allow_missing_scenes,
    )
    placement = place_scenes(names, splits, opts.shuffle_seed, opts.records_per_shard)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "source": str(source),
        "args": asdict(opts),
        "scenes": names,  # with the splits file's content and the options: everything that decides placement
        "splits_sha256": _splits_digest(opts.splits),
    }

    if not out.parent.is_dir():
        raise BuildError(f"--out {out}: its parent directory does not exist; create it first")
    if out.is_dir() and out.stat().st_dev != out.parent.stat().st_dev:
        raise BuildError(
            f"--out {out}: a mount point; choose a directory inside it (make_shards builds "
            "beside --out and renames the result into place)"
        )
    # make_shards words its own refusal of an existing dataset (it offers --resume too): checked in _prepare.
    build = BesideBuild(out, tool=TOOL, overwrite=True, resumable=True)
    with build:
        work, done = _prepare(build, resume, overwrite, header, source, placement.num_shards)
        try:
            _restart_journal(work, header, done)
            summary = _write_all(source, work, opts, names, splits, placement, done, workers, ray, progress)
            build.commit()
        except OSError as err:
            raise _disk_error(err, out) from None
        except (KeyboardInterrupt, SystemExit):  # the complete shards stay for --resume, half-filled ones go
            for tmp in work.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            raise
    summary["out"] = str(out)
    summary["wall_s"] = time.perf_counter() - start
    return summary


def _disk_error(err: OSError, out: Path) -> BuildError:
    """One line for a failed read or write (a full disk, a lost permission)."""
    what = f"{err.strerror or os.strerror(err.errno or 0)} ({err.filename})" if err.filename else str(err)
    advice = (
        "free some space (or choose another --out) and rerun"
        if err.errno in (errno.ENOSPC, errno.EDQUOT)
        else "fix it and rerun"
    )
    return BuildError(f"--out {out}: the build failed: {what}; --out was left as it was; {advice}")


def _write_all(
    source: Path,
    out: Path,
    opts: BuildOptions,
    names: list[str],
    splits: list[str],
    placement: Placement,
    done: list[dict],
    workers: int | None,
    ray: str | None,
    progress: bool,
) -> dict:
    layout = opts.layout()
    r = layout.records_per_shard
    num_shards = placement.num_shards
    scene_at = placement.scene_at
    header_crcs = tuple(zlib.crc32(h) for h in layout.headers())
    appenders = (CRCAppender(layout.sdf_record_bytes), CRCAppender(layout.labels_record_bytes))
    empty_crcs, empty_labels = layout.empty_checksums(), layout.empty_labels()
    journal = out / BUILD_DIR / JOURNAL
    for k in range(len(done), num_shards):
        create_shard(out, layout, k, int((scene_at[k * r : (k + 1) * r] >= 0).sum()))

    entries = list(done)
    shard = _Shard(len(done), header_crcs)
    first = len(done) * r
    record_bytes = layout.sdf_record_bytes + layout.labels_record_bytes
    # Progress in bytes of scene records written (MB/s, decimal like the documented figures).
    bar = tqdm(
        total=len(names) * record_bytes,
        initial=int((scene_at[:first] >= 0).sum()) * record_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        disable=(not progress) or None,
        desc="make_shards",
        dynamic_ncols=True,
    )
    tasks = [(p, names[i]) for p, i in enumerate(scene_at[first:].tolist(), first) if i >= 0]
    with open_executor(workers, len(tasks), ray) as engine:
        results = engine.imap(partial(_convert, source, out, opts), tasks, chunksize=8)
        for position in range(first, num_shards * r):
            scene = int(scene_at[position])
            result, stat = next(results) if scene >= 0 else (None, None)
            if stat is not None:
                shard.sources.append(stat)
            if isinstance(result, Record):
                shard.rows.append(
                    {
                        "scene": scene,
                        "name": result.name,
                        "split": splits[scene],
                        "shard": shard.number,
                        "slot": position % r,
                        "num_grasps": result.num_grasps,
                        "checksum": result.checksum,
                        "device_checksum": result.device_checksum,
                        "translation": result.translation,
                        "global_scale": result.global_scale,
                    }
                )
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
                bar.update(record_bytes)
            if position % r == r - 1:
                entry = {
                    "shard": shard.number,
                    "files": commit_shard(out, shard.number, tuple(shard.crcs)),
                    "rows": shard.rows,
                    "skipped": shard.skipped,
                    "stats": asdict(shard.stats),
                    "sources": shard.sources,
                }
                with open(journal, "a") as f:
                    f.write(json.dumps(entry, sort_keys=True) + "\n")
                entries.append(entry)
                shard = _Shard(shard.number + 1, header_crcs)
    bar.close()
    if not any(entry["rows"] for entry in entries):
        raise BuildError(f"SOURCE {source}: every scene was skipped as bad; see skipped.jsonl reasons above")
    return _finish(out, opts, source, entries, len(names), placement)


def _finish(
    out: Path, opts: BuildOptions, source: Path, entries: list[dict], considered: int, placement: Placement
) -> dict:
    """Index, skip report and manifest (last), then drop the journal."""
    layout = opts.layout()
    rows = [row for e in entries for row in e["rows"]]
    skipped = [s for e in entries for s in e["skipped"]]
    stats = [_ShardStats(ScoreSums(**e["stats"]["train"]), e["stats"]["conversion_error"]) for e in entries]
    files = [f for e in entries for f in e["files"]]
    write_index(out / INDEX, rows)
    files.append({"name": INDEX, "bytes": (out / INDEX).stat().st_size, "crc32": file_crc32(out / INDEX)})
    if opts.skip_bad:
        write_atomically(out / SKIPPED, "".join(json.dumps(s) + "\n" for s in skipped))

    per_split = {
        s: {"scenes": 0, "grasps": 0, "first_shard": placement.shards[s][0], "num_shards": placement.shards[s][1]}
        for s in SPLITS
    }
    for row in rows:
        per_split[row["split"]]["scenes"] += 1
        per_split[row["split"]]["grasps"] += row["num_grasps"]
    train = score_stats([s.train for s in stats])
    if train["count"] and train["min"] == train["max"]:
        raise BuildError(
            f"SOURCE {source}: all {train['count']} train scores are equal ({train['min']}), so their "
            "std is 0 and scores cannot be standardised; check the labels"
        )
    manifest = Manifest(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
        grid=(layout.grid,) * 3,
        grid_origin=grid_points(layout.grid)[0],
        grid_spacing=grid_points(layout.grid)[1],
        sdf_dtype=layout.dtype,
        label_dtype="float32",
        grasp_dim=GRASP_DIM,
        label_dim=LABEL_DIM,
        max_grasps=layout.max_grasps,
        records_per_shard=layout.records_per_shard,
        header_bytes=HEADER_BYTES,
        num_shards=len(entries),
        num_scenes=len(rows),
        num_records=len(entries) * layout.records_per_shard,
        source_scenes=considered,
        splits={s: SplitInfo(**counts) for s, counts in per_split.items()},
        score_stats=ScoreStats(**train),
        sdf_max_conversion_error=max(s.conversion_error for s in stats),
        skipped=len(skipped),
        checksums={
            "files": "crc32 of the whole file",
            "records": "xxh3_64 of the record's SDF bytes, then its labels bytes",
            "device_records": "sum of the record's little-endian 32-bit words times splitmix64 keys, "
            "mod 2^64 (shards/checksum.py)",
        },
        files=tuple(FileEntry(**f) for f in files),
        made_by=Provenance(tool="make_shards", version=__version__, source=str(source), args=asdict(opts)),
    )
    write_manifest(out, manifest)
    (out / BUILD_DIR / JOURNAL).unlink()
    (out / BUILD_DIR).rmdir()
    paths = [out / f["name"] for f in files] + [out / MANIFEST]
    return {
        "out": str(out),
        "scenes": len(rows),
        "considered": considered,
        "skipped": len(skipped),
        "splits": per_split,
        "shards": len(entries),
        "records": manifest.num_records,
        "bytes_on_disk": _allocated_bytes(paths),
        "bytes_apparent": sum(p.stat().st_size for p in paths),
        "score_stats": train,
        "sdf_dtype": layout.dtype,
        "sdf_max_conversion_error": manifest.sdf_max_conversion_error,
    }
