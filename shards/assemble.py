"""Placing a complete set of scenes into shards: the one place shard files, index and manifest are written.

`ShardWriter` (and so `gq shards build`) spills each scene's record in arrival order; `merge` reads the
records of its parts where they lie. Either way, once every scene is known, `assemble` sorts the scenes
by name (a scene's id is its sorted position), places them (`placement.py`), copies each record to its
place in shard order, folds the record CRC-32s into the files' CRC-32s, and writes the index, the skip
report and the manifest (last). So the bytes depend only on the set of scenes and the options, never
on the order the scenes arrived in or on how many writers or parts made them.

A scene is a dict, as the build's journal stores it: name, split, and either `reason` (skipped as bad) or
its index fields (num_grasps, checksum, device_checksum, translation, global_scale) and the
conversion error; the CRC-32s (`sdf_crc`, `labels_crc`) and score sums (`scores`) when known, else they
are computed from the record's bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gq.common.files import write_atomically
from gq.common.ownership import write_record as write_ownership

from . import __version__
from .checksum import checksum
from .crc import CRCAppender
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GRASP_DIM,
    HEADER_BYTES,
    INDEX,
    LABEL_DIM,
    LABEL_DTYPE,
    MANIFEST,
    SCORE_COLUMN,
    SKIPPED,
    SPLITS,
    FileEntry,
    Manifest,
    Provenance,
    ScoreStats,
    SplitInfo,
    file_crc32,
    grid_points,
)
from .index import write_index
from .manifest import write_manifest
from .options import BuildOptions
from .outdir import TOOL, BuildError, dataset_entries
from .placement import place_scenes
from .stats import ScoreSums, score_stats
from .writer import commit_shard, copy_record, create_shard, write_record

INDEX_FIELDS = ("num_grasps", "checksum", "device_checksum", "translation", "global_scale")


@dataclass
class _ShardStats:
    """Per-shard sums, merged in shard order so every way of building rounds identically."""

    train: ScoreSums = dataclasses.field(default_factory=ScoreSums)
    conversion_error: float = 0.0


def _scores(labels: bytes, num_grasps: int, max_grasps: int) -> ScoreSums:
    """Score sums of a record's stored labels (what the build takes from the record before it is stored)."""
    table = np.frombuffer(labels, dtype=LABEL_DTYPE).reshape(max_grasps, LABEL_DIM)
    return ScoreSums.of(table[:num_grasps, SCORE_COLUMN])


def assemble(
    work: Path,
    opts: BuildOptions,
    scenes: list[dict],
    locate: Callable[[dict], tuple[tuple[int, int], tuple[int, int]]],
    *,
    source: str,
    part: dict | None = None,
) -> dict:
    """Write the dataset of `scenes` into the build folder `work`; returns the build summary.

    `locate(scene)` gives where a scene's record lies: (fd, offset) of its SDF and of its labels. A scene
    with its CRC-32s is copied in the kernel; one without is read, checked against its index checksum
    (`scene["where"]` names its dataset) and written. `part` (index, count, splits digest) marks a
    part of a dataset, recorded in the manifest for `merge`; a part may be empty and its scores all equal.
    """
    scenes = sorted(scenes, key=lambda s: s["name"])[: opts.limit]
    names, splits = [s["name"] for s in scenes], [s["split"] for s in scenes]
    placement = place_scenes(names, splits, opts.shuffle_seed, opts.records_per_shard)
    layout, r = opts.layout(), opts.records_per_shard
    sizes = (layout.sdf_record_bytes, layout.labels_record_bytes)
    write_ownership(work, tool=TOOL, entries=dataset_entries(placement.num_shards))  # before the shards exist
    scene_at = placement.scene_at
    for k in range(placement.num_shards):
        create_shard(work, layout, k, int((scene_at[k * r : (k + 1) * r] >= 0).sum()))
    header_crcs = [zlib.crc32(h) for h in layout.headers()]
    appenders = (CRCAppender(layout.sdf_record_bytes), CRCAppender(layout.labels_record_bytes))
    empty_crcs, empty_labels = layout.empty_checksums(), layout.empty_labels()
    shards, rows, skipped = [], [], []
    crcs, stats = list(header_crcs), _ShardStats()
    for position, scene in enumerate(scene_at.tolist()):
        entry = scenes[scene] if scene >= 0 else None
        if entry is not None and "reason" not in entry:
            where = locate(entry)
            if "sdf_crc" in entry:  # known: copied in the kernel, never read here
                copy_record(work, layout, position, where)
                record_crcs = (entry["sdf_crc"], entry["labels_crc"])
            else:  # read, checked against the index's checksum, and written
                sdf, labels = (os.pread(fd, size, offset) for (fd, offset), size in zip(where, sizes))
                if checksum(sdf, labels) != entry["checksum"]:
                    raise BuildError(f"{entry['where']}: the record of scene {entry['name']} fails its checksum")
                write_record(work, layout, position, sdf, labels)
                record_crcs = (zlib.crc32(sdf), zlib.crc32(labels))
            row = {"scene": scene, "name": entry["name"], "split": entry["split"], "shard": position // r}
            rows.append({**row, "slot": position % r, **{k: entry[k] for k in INDEX_FIELDS}})
            stats.conversion_error = max(stats.conversion_error, entry["conversion_error"])
            if entry["split"] == "train":
                stats.train.add(
                    ScoreSums(**entry["scores"])
                    if "scores" in entry
                    else _scores(labels, entry["num_grasps"], layout.max_grasps)
                )
        else:  # a skipped scene or a split's padding: an empty record
            if entry is not None:
                skipped.append({"name": entry["name"], "reason": entry["reason"]})
            write_record(work, layout, position, None, empty_labels)
            record_crcs = empty_crcs
        crcs = [a.append(c, x) for a, c, x in zip(appenders, crcs, record_crcs)]
        if position % r == r - 1:
            shards.append((commit_shard(work, position // r, tuple(crcs)), stats))
            crcs, stats = list(header_crcs), _ShardStats()
    if not rows and part is None:
        raise BuildError(f"{source}: every scene was skipped as bad; see skipped.jsonl reasons above")
    return _finish(work, opts, source, shards, rows, skipped, len(names), placement, part)


def _finish(
    out: Path,
    opts: BuildOptions,
    source: str,
    shards: list[tuple[list[dict], _ShardStats]],
    rows: list[dict],
    skipped: list[dict],
    considered: int,
    placement,
    part: dict | None,
) -> dict:
    """Index, skip report and manifest (last)."""
    layout = opts.layout()
    files = [f for entries, _ in shards for f in entries]
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
    train = score_stats([stats.train for _, stats in shards])
    if train["count"] and train["min"] == train["max"] and part is None:
        raise BuildError(
            f"{source}: all {train['count']} train scores are equal ({train['min']}), so their "
            "std is 0 and scores cannot be standardised; check the labels"
        )
    args = asdict(opts) if part is None else {**asdict(opts), "part": part}
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
        num_shards=len(shards),
        num_scenes=len(rows),
        num_records=len(shards) * layout.records_per_shard,
        source_scenes=considered,
        splits={s: SplitInfo(**counts) for s, counts in per_split.items()},
        score_stats=ScoreStats(**train),
        sdf_max_conversion_error=max((stats.conversion_error for _, stats in shards), default=0.0),
        skipped=len(skipped),
        checksums={
            "files": "crc32 of the whole file",
            "records": "xxh3_64 of the record's SDF bytes, then its labels bytes",
            "device_records": "sum of the record's little-endian 32-bit words times splitmix64 keys, "
            "mod 2^64 (shards/checksum.py)",
        },
        files=tuple(FileEntry(**f) for f in files),
        made_by=Provenance(tool="make_shards", version=__version__, source=source, args=args),
    )
    write_manifest(out, manifest)
    paths = [out / f["name"] for f in files] + [out / MANIFEST]
    return {
        "scenes": len(rows),
        "considered": considered,
        "skipped": len(skipped),
        "splits": per_split,
        "shards": len(shards),
        "records": manifest.num_records,
        "bytes_on_disk": sum(p.stat().st_blocks * 512 for p in paths),  # sparse holes excluded, as `du` counts
        "bytes_apparent": sum(p.stat().st_size for p in paths),
        "score_stats": train,
        "sdf_dtype": layout.dtype,
        "sdf_max_conversion_error": manifest.sdf_max_conversion_error,
    }
