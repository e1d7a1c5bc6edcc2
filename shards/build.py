"""`gq shards build`: the scenes of the seed's processed layout, decoded in parallel, pushed through `ShardWriter`.

Scenes are listed and sorted by name, given their split (and, with `--part I/N`, only this part's are
kept), then decoded, checked and converted by worker processes (`prepare_scene`, one pure task per
scene, mapped through `gq.common.workers`); the writer takes each result in name order, spills its
record and journals it (`.build/journal.jsonl`: the record's metadata and the size and mtime_ns of its
source file). When all are in, the writer places them (`assemble.py`) and swaps the dataset in. All of
it happens in a build folder beside `--out`, under a lock (`outdir.py`). `--resume` keeps the journalled
scenes whose spilled bytes still match and decodes the rest, so a resumed build writes the same bytes
as an uninterrupted one; a kept scene whose source file changed since is an error.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from tqdm import tqdm

from gq.common.executor import open_executor
from gq.common.ownership import RECORD, BesideBuild

from .format import BUILD_DIR, FORMAT_NAME, FORMAT_VERSION
from .options import BuildOptions
from .outdir import JOURNAL, SPILL, TOOL, BuildError, dataset_entries, unfinished_build
from .shard_writer import ShardWriter, check_part, disk_error, spilled_intact
from .source import SCENE_FILE, Record, SceneError, list_scenes, load_record
from .splits import assign_splits, part_of, splits_digest

__all__ = ["BuildError", "BuildOptions", "build_shards", "prepare_scene"]


def _source_stat(source: Path, name: str) -> dict:
    """Size and mtime_ns of a scene's file, taken before it is read: what `--resume` re-checks."""
    try:
        st = os.stat(source / name / SCENE_FILE)
    except OSError:
        return {"name": name, "bytes": None, "mtime_ns": None}
    return {"name": name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare_scene(source: Path, opts: BuildOptions, name: str) -> tuple[str, Record | SceneError, dict]:
    """Worker task, pure: load, check and convert one scene (`load_record`); returns its name, its record (bytes
    included) or its error, and its file's stat taken before the read."""
    stat = _source_stat(source, name)
    try:
        record = load_record(source, name, opts.grid, opts.dtype, opts.max_grasps)
    except SceneError as err:
        return name, err, stat  # a value, not a raise: the writer decides to skip or stop
    return name, replace(record, sdf=record.sdf.tobytes(), labels=record.labels.tobytes()), stat


def _prepare(
    build: BesideBuild, resume: bool, overwrite: bool, header: dict, source: Path, opts: BuildOptions
) -> tuple[Path, list[dict]]:
    """Ready the build folder for this build: the unfinished one (`resume`) or a new one.

    Returns it and the scenes kept from the unfinished build. Nothing is removed before every check has
    passed; a refused resume leaves the unfinished build as it was (the lock file still names it).
    """
    entries = dataset_entries(0)  # the shards' names are added when their number is known (`assemble`)
    if resume:
        if build.unfinished is not None:
            done = _read_journal(build.unfinished, header, source, opts)
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


def _read_journal(work: Path, header: dict, source: Path, opts: BuildOptions) -> list[dict]:
    """The journalled scenes whose spilled records still match, in order; later ones are decoded again.

    A kept scene whose source file's size or mtime_ns differs from the journal's is an error.
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
    entries = []
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break  # the line being written when the build was killed
        if not (isinstance(entry, dict) and {"name", "split", "slot", "source"} <= entry.keys()):
            break  # a line of an older make_shards' journal (one per shard): decoded again
        entries.append(entry)
    kept = spilled_intact(work, opts, entries)
    if changed and (kept or not changed.startswith("placement unknown")):
        raise BuildError(
            f"--out {work}: cannot resume: {changed} since the unfinished build started, so its shards would hold "
            "other scenes; pass --overwrite to rebuild from scratch (or undo the change)"
        )
    for entry in kept:
        recorded = entry["source"]
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
    if journalled.get("part") != header["part"]:
        return f"option --part changed ({journalled.get('part')} -> {header['part']})"
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


def _restart_journal(work: Path, header: dict, opts: BuildOptions, done: list[dict]) -> None:
    """Rewrite the journal with the kept scenes only, cut the spill files after their records, and delete every
    other file (the record stays)."""
    for path in work.iterdir():
        if path.is_file() and path.name != RECORD:
            path.unlink()
    layout, spilled = opts.layout(), sum(entry["slot"] is not None for entry in done)
    for name, size in zip(SPILL, (layout.sdf_record_bytes, layout.labels_record_bytes)):
        with open(work / BUILD_DIR / name, "ab") as f:
            f.truncate(spilled * size)
    lines = [header] + done
    (work / BUILD_DIR / JOURNAL).write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))


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
    part: tuple[int, int] | None = None,
) -> dict:
    """Build a dataset in `out` from `source/<name>/scene.npz`; returns the build summary.

    The build runs in a build folder beside `out` under a lock and replaces `out` only when
    complete; the same source and options give byte-identical files for any number of workers. When it
    raises, `out` is as it was and no build folder is left; a KeyboardInterrupt keeps the scenes
    converted so far for `resume`.

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
        part: `(I, N)`: build part I of N, the scenes whose `part_of(name, N)` is I (`gq shards merge` joins them).

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
    if part is not None:
        index, count = check_part(part)
        names, splits = zip(*[(n, s) for n, s in zip(names, splits) if part_of(n, count) == index]) or ((), ())
        names, splits = list(names), list(splits)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "source": str(source),
        "args": asdict(opts),
        "part": list(part) if part is not None else None,
        "scenes": names,  # with the splits file's content and the options: everything that decides placement
        "splits_sha256": splits_digest(opts.splits),
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
        work, done = _prepare(build, resume, overwrite, header, source, opts)
        try:
            _restart_journal(work, header, opts, done)
            writer = ShardWriter._inside(build, work, done, source=str(source), part=part, **asdict(opts))
            with writer:
                _convert_all(writer, source, opts, names, splits, done, workers, ray, progress)
        except OSError as err:
            raise disk_error(err, out) from None
    summary = writer.summary
    summary["wall_s"] = time.perf_counter() - start
    return summary


def _convert_all(
    writer: ShardWriter,
    source: Path,
    opts: BuildOptions,
    names: list[str],
    splits: list[str],
    done: list[dict],
    workers: int | None,
    ray: str | None,
    progress: bool,
) -> None:
    """Decode, check and convert the scenes not `done` in worker processes (one map call), in name order,
    and hand each result to the writer."""
    kept = {entry["name"] for entry in done}
    split_of = dict(zip(names, splits))
    todo = [n for n in names if n not in kept]
    layout = opts.layout()
    record_bytes = layout.sdf_record_bytes + layout.labels_record_bytes
    # Progress in bytes of scene records converted (MB/s, decimal like the documented figures).
    bar = tqdm(
        total=len(names) * record_bytes,
        initial=len(kept) * record_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        disable=(not progress) or None,
        desc="make_shards",
        dynamic_ncols=True,
    )
    with open_executor(workers, len(todo), ray) as engine:
        for name, result, stat in engine.imap(partial(prepare_scene, source, opts), todo, chunksize=8):
            writer.add_prepared(name, result, split_of[name], source=stat)
            bar.update(record_bytes)
    bar.close()
