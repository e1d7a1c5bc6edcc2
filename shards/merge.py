"""`gq shards merge`: the parts of one build (`--part I/N`, `ShardWriter(part=...)`) joined into one dataset.

Each part is a complete dataset of its own scenes; its manifest records which part it is, of how many,
and the content digest of its splits file. The merge refuses, in one line and before writing anything,
parts built with other options (any `BuildOptions` field, the splits file's content, the SOURCE), a
part missing or given twice, a scene in two parts, and a part that fails `verify --quick`. It then
hands every scene, where it lies in its part, to `assemble`: the one placement of all the scenes, so
the result is byte for byte the single build of them all. Each record is read once (and checked
against its index checksum: a part whose bytes were damaged is refused, nothing left behind) and
written once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

from gq.common.inputs import read_small_file
from gq.common.ownership import BesideBuild

from .assemble import assemble
from .format import HEADER_BYTES, SKIPPED, Layout, Manifest, labels_name, sdf_name
from .index import read_index
from .manifest import read_manifest
from .options import BuildOptions
from .outdir import TOOL, BuildError, dataset_entries
from .shard_writer import disk_error
from .splits import hash_split, load_splits, splits_digest
from .verify import verify

MAX_OPEN = 256  # shard files of the parts held open at once


def _manifest_of(root: Path) -> Manifest:
    """A part's manifest, once `verify --quick` finds nothing wrong; BuildError naming it otherwise."""
    result = verify(root, quick=True)
    if result.problems:
        raise BuildError(
            f"PART {root}: fails its checks ({result.problems[0]}); rebuild that part "
            f"(gq shards verify {root} lists every problem)"
        )
    manifest = read_manifest(root)
    if not isinstance(manifest.made_by.args.get("part"), dict):
        raise BuildError(f"PART {root}: not a part of a build (made without --part I/N); merge joins parts")
    return manifest


def _check_alike(roots: list[Path], manifests: list[Manifest]) -> BuildOptions:
    """The parts' common options; BuildError naming the first part and option that differ, or a missing part."""
    first, first_part = manifests[0].made_by, manifests[0].made_by.args["part"]
    names = [f.name for f in fields(BuildOptions)]
    seen: dict[int, Path] = {}
    for root, manifest in zip(roots, manifests):
        made, part = manifest.made_by, manifest.made_by.args["part"]
        for key in names:
            if made.args.get(key) != first.args.get(key):
                raise BuildError(
                    f"PART {root}: built with --{key.replace('_', '-')} {made.args.get(key)!r}, PART {roots[0]} "
                    f"with {first.args.get(key)!r}; merge only the parts of one build"
                )
        if part.get("splits_sha256") != first_part.get("splits_sha256"):
            raise BuildError(
                f"PART {root}: built with a splits file of other content than PART {roots[0]}'s; "
                "merge only the parts of one build"
            )
        if made.source != first.source:
            raise BuildError(
                f"PART {root}: built from {made.source}, PART {roots[0]} from {first.source}; "
                "merge only the parts of one build"
            )
        if part.get("count") != first_part.get("count"):
            raise BuildError(
                f"PART {root}: part {part.get('index')} of {part.get('count')}, PART {roots[0]} part "
                f"{first_part.get('index')} of {first_part.get('count')}; merge only the parts of one build"
            )
        if part.get("index") in seen:
            raise BuildError(
                f"PART {root} and PART {seen[part['index']]}: both part {part['index']} of {part['count']}; "
                "give each part once"
            )
        seen[part.get("index")] = root
    count = first_part["count"]
    missing = [i for i in range(count) if i not in seen]
    if missing:
        raise BuildError(
            f"part {missing[0]} of {count} is missing ({len(missing)} missing in all); give all {count} parts "
            "(an empty part is a dataset of its own too)"
        )
    return BuildOptions(**{key: first.args[key] for key in names})


def _scenes_of(root: Path, manifest: Manifest, number: int, opts: BuildOptions) -> list[dict]:
    """The scenes of one part as `assemble` takes them, each located in the part (`part`, `shard`, `slot`)."""
    index = read_index(root / "scenes.parquet")
    scenes = []
    for i, name in enumerate(index["name"].tolist()):
        translation, scale = index["translation"][i], float(index["global_scale"][i])
        scenes.append(
            {
                "name": name,
                "split": str(index["split"][i]),
                "num_grasps": int(index["num_grasps"][i]),
                "checksum": int(index["checksum"][i]),
                "device_checksum": int(index["device_checksum"][i]),
                "translation": None if translation[0] != translation[0] else [float(v) for v in translation],
                "global_scale": None if scale != scale else scale,  # NaN: the source had none
                "conversion_error": manifest.sdf_max_conversion_error,  # only the maximum counts
                "where": f"PART {root}",
                "part": number,
                "shard": int(index["shard"][i]),
                "slot": int(index["slot"][i]),
            }
        )
    if opts.skip_bad:  # a skipped scene keeps its place (an empty record): its split is recomputed as build did
        assignment = load_splits(Path(opts.splits)) if opts.splits else None
        for line in read_small_file(root / SKIPPED, SKIPPED).decode().splitlines():
            skipped = json.loads(line)
            name = skipped["name"]
            split = assignment[name] if assignment else hash_split(name, opts.val_fraction, opts.test_fraction)
            scenes.append({"name": name, "split": split, "reason": skipped["reason"], "where": f"PART {root}"})
    return scenes


class _PartFiles:
    """Open shard files of the parts, at most MAX_OPEN at once (the oldest is closed first)."""

    def __init__(self, roots: list[Path], layout: Layout):
        self.roots, self.layout, self.open = roots, layout, {}

    def fd(self, path: Path) -> int:
        if path not in self.open:
            if len(self.open) >= MAX_OPEN:
                os.close(self.open.pop(next(iter(self.open))))
            self.open[path] = os.open(path, os.O_RDONLY)
        return self.open[path]

    def locate(self, scene: dict) -> tuple[tuple[int, int], tuple[int, int]]:
        root, shard, slot = self.roots[scene["part"]], scene["shard"], scene["slot"]
        return (
            (self.fd(root / sdf_name(shard)), HEADER_BYTES + slot * self.layout.sdf_record_bytes),
            (self.fd(root / labels_name(shard)), HEADER_BYTES + slot * self.layout.labels_record_bytes),
        )

    def close(self) -> None:
        for fd in self.open.values():
            os.close(fd)
        self.open = {}


def merge_parts(parts: Iterable[str | Path], out: str | Path, *, overwrite: bool = False) -> dict:
    """Join the parts of one build into the dataset `out`, byte for byte the single build of all their scenes.

    Args:
        parts: The datasets written by `gq shards build --part I/N` (or `ShardWriter(part=(I, N))`), all N of
            them, in any order.
        out: The dataset directory to create (or replace, with `overwrite`).
        overwrite: Replace an existing dataset in `out` (only the files its record names are removed).

    Returns:
        The build summary, as `build_shards` returns it.

    Raises:
        BuildError: Parts of different builds (options, splits file content, SOURCE), a part missing or given
            twice, a scene in two parts, a part that fails its checks; `out` not ours to replace.
    """
    roots = [Path(p).resolve() for p in parts]
    if not roots:
        raise BuildError("gq shards merge: no PART given; give every part of the build")
    if len(set(roots)) != len(roots):
        twice = next(r for r in roots if roots.count(r) > 1)
        raise BuildError(f"PART {twice}: given twice; give each part once")
    manifests = [_manifest_of(root) for root in roots]
    opts = _check_alike(roots, manifests)
    if opts.splits and splits_digest(opts.splits) != manifests[0].made_by.args["part"]["splits_sha256"]:
        raise BuildError(f"--splits {opts.splits}: changed since the parts were built; rebuild them")
    scenes, owner = [], {}
    for number, (root, manifest) in enumerate(zip(roots, manifests)):
        for scene in _scenes_of(root, manifest, number, opts):
            if scene["name"] in owner:
                raise BuildError(
                    f"scene {scene['name']}: in PART {owner[scene['name']]} and in PART {root}; "
                    "a scene belongs to one part: rebuild the parts from one --part I/N split"
                )
            owner[scene["name"]] = root
            scenes.append(scene)
    files = _PartFiles(roots, opts.layout())
    build = BesideBuild(Path(out), tool=TOOL, overwrite=overwrite)
    try:
        with build:
            work = build.create(dataset_entries(0))
            summary = assemble(work, opts, scenes, files.locate, source=manifests[0].made_by.source)
            build.commit()
    except OSError as err:
        raise disk_error(err, build.out) from None
    finally:
        files.close()
    return {**summary, "out": str(build.out)}
