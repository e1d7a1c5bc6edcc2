"""`ShardWriter`: the push-style writer of a dataset; `gq shards build` is a loop over it.

    with ShardWriter(out="data/shards", grid=48) as w:
        for name, sdf, grasps, scores in simulator():
            w.add(name, sdf=sdf, grasps=grasps, scores=scores)

Each added scene gets the checks of `gq shards build` (shapes, dtypes, finite values, its name) and is
converted to its record at once; the record is appended to two spill files in the build folder (beside
`out`, `BesideBuild`) and a line describing it to the build's journal. Where a record goes depends on every
scene's name, so nothing is placed until the `with` block ends cleanly: then `assemble` writes the shards,
index and manifest, and the build is swapped in. The bytes depend only on the set of scenes and the
options, not on the order of `add`. An exception inside the block leaves nothing behind (`out` is as it
was). `gq shards build --resume` continues an interrupted build from its journalled scenes.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np

from gq.common.ownership import BesideBuild

from .assemble import INDEX_FIELDS, assemble
from .format import BUILD_DIR, FORMAT_NAME, FORMAT_VERSION, SPLITS
from .options import BuildOptions
from .outdir import JOURNAL, SPILL, TOOL, BuildError, dataset_entries
from .source import Record, SceneError, check_arrays, control_character, to_record
from .splits import SplitError, hash_split, load_splits, splits_digest


def check_part(part: tuple[int, int] | None) -> tuple[int, int] | None:
    """`part` as (index, count) with 0 <= index < count, or BuildError in the words of `--part I/N`."""
    if part is None:
        return None
    try:
        index, count = (int(x) for x in part)
    except (TypeError, ValueError):
        raise BuildError(f"--part {part!r}: expected I/N, two whole numbers (part I of N)") from None
    if not 0 <= index < count:
        raise BuildError(f"--part {index}/{count}: I must be 0 .. N-1 (N >= 1)")
    return index, count


def check_name(name: object) -> str:
    """A scene name that a build could have read as a folder of SOURCE; BuildError otherwise."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise BuildError(f"scene name {name!r}: not a folder name; use a non-empty name without '/'")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise BuildError(f"scene name {name!r}: not UTF-8 text (scene names are stored as text in the index)") from None
    control = control_character(name)
    if control is not None:
        raise BuildError(f"scene name {name!r}: has a control character ({control!r}); names are written one a line")
    return name


def disk_error(err: OSError, out: Path) -> BuildError:
    """One line for a failed read or write (a full disk, a lost permission)."""
    what = f"{err.strerror or os.strerror(err.errno or 0)} ({err.filename})" if err.filename else str(err)
    advice = (
        "free some space (or choose another --out) and rerun"
        if err.errno in (errno.ENOSPC, errno.EDQUOT)
        else "fix it and rerun"
    )
    return BuildError(f"--out {out}: the build failed: {what}; --out was left as it was; {advice}")


class ShardWriter:
    """Write a dataset from scenes pushed one at a time (see the module's docstring).

    Args:
        out: The dataset directory to create (or replace, with `overwrite`).
        overwrite: Replace an existing dataset in `out` (only the files its record names are removed).
        part: `(I, N)`: this dataset is part I of N, for `gq shards merge` (which needs all N).
        source: What made the scenes, recorded in the manifest (`made_by.source`); `gq shards build` records
            its SOURCE directory.
        **options: The fields of `BuildOptions` (grid, dtype, records_per_shard, max_grasps, splits,
            val_fraction, test_fraction, limit, skip_bad, shuffle_seed), as `gq shards build` takes them.

    Raises:
        BuildError: Unusable options, or `out` not ours to replace (at construction, before any work).
    """

    def __init__(
        self,
        *,
        out: str | Path,
        overwrite: bool = False,
        part: tuple[int, int] | None = None,
        source: str = "ShardWriter",
        **options: object,
    ):
        self._setup(out, part, source, options)
        self._build = BesideBuild(self.out, tool=TOOL, overwrite=overwrite)  # checks `out` now, before any work

    def _setup(self, out: str | Path, part: tuple[int, int] | None, source: str, options: dict) -> None:
        if options.get("splits") is not None:  # recorded in the manifest: an absolute path says which file it was
            options["splits"] = str(Path(options["splits"]).resolve())
        try:
            self.opts = BuildOptions(**options)
        except TypeError as err:
            raise BuildError(f"ShardWriter: {err}; the options are BuildOptions' fields") from None
        self.opts.check()
        self.out, self.part, self.source = Path(out).absolute(), check_part(part), source
        self.summary: dict | None = None  # what `gq shards build` prints, once the block has ended cleanly
        self._assignment = load_splits(Path(self.opts.splits)) if self.opts.splits else None
        self._owned = True  # this writer enters and leaves its BesideBuild (a build passes its own)
        self._work: Path | None = None
        self._scenes: list[dict] = []
        self._names: set[str] = set()
        self._spilled = 0
        self._fds: list[int] = []
        self._journal = None

    @classmethod
    def _inside(cls, build: BesideBuild, work: Path, kept: list[dict], **kwargs) -> ShardWriter:
        """A writer continuing in the build folder `work` of `build` (entered by the caller), with the
        scenes `kept` already journalled and spilled (`gq shards build`, `--resume`)."""
        writer = cls.__new__(cls)
        writer._setup(build.out, kwargs.pop("part", None), kwargs.pop("source"), kwargs)
        writer._build, writer._owned, writer._work = build, False, work
        writer._scenes = list(kept)
        writer._names = {s["name"] for s in kept}
        writer._spilled = sum(s["slot"] is not None for s in kept)
        return writer

    @property
    def part_record(self) -> dict | None:
        """What the manifest records of a part: which one, of how many, and the splits file's content."""
        if self.part is None:
            return None
        return {"index": self.part[0], "count": self.part[1], "splits_sha256": splits_digest(self.opts.splits)}

    def __enter__(self) -> ShardWriter:
        if self._owned:
            self._build.__enter__()
        try:
            if self._owned:
                self._work = self._build.create(dataset_entries(0))
                (self._work / BUILD_DIR).mkdir()
                header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "source": self.source,
                          "args": asdict(self.opts), "part": self.part_record}  # fmt: skip
                (self._work / BUILD_DIR / JOURNAL).write_text(json.dumps(header, sort_keys=True) + "\n")
            self._fds = [os.open(self._work / BUILD_DIR / name, os.O_RDWR | os.O_CREAT, 0o644) for name in SPILL]
            self._journal = open(self._work / BUILD_DIR / JOURNAL, "a")
        except BaseException:
            self._close_files()
            if self._owned:
                self._build.__exit__(*sys.exc_info())
            raise
        return self

    def add(
        self,
        name: str,
        *,
        sdf: np.ndarray,
        grasps: np.ndarray,
        scores: np.ndarray,
        split: str | None = None,
        translation: np.ndarray | None = None,
        global_scale: float | None = None,
    ) -> None:
        """Check and store one scene: its (D,D,D) SDF, (N,19) grasps and (N,) scores, floating point and
        finite, as a scene.npz holds them. `split`: None takes it from the splits file, or a hash of the
        name; a given split must agree with the splits file. A bad scene raises SceneError naming it (or,
        with skip_bad, is listed in skipped.jsonl)."""
        check_name(name)
        where = f"scene {name!r}"
        arrays = {
            "sdf": sdf,
            "grasps": grasps,
            "scores": scores,
            "translation": translation,
            "global_scale": global_scale,
        }
        try:
            checked = check_arrays(where, arrays, grid=self.opts.grid, max_grasps=self.opts.max_grasps)
            result = to_record(where, name, checked, self.opts.dtype, self.opts.max_grasps)
        except SceneError as err:
            result = err
        self.add_prepared(name, result, split)

    def add_prepared(
        self, name: str, result: Record | SceneError, split: str | None = None, source: dict | None = None
    ) -> None:
        """Store a scene already checked and converted (`to_record`, as `gq shards build`'s workers do), or
        the error that its checks raised; `source`: its file's stat, which `--resume` re-checks."""
        if self._work is None:
            raise BuildError("ShardWriter: add scenes inside `with ShardWriter(...) as w:`")
        check_name(name)
        if name in self._names:
            raise BuildError(f"scene {name!r}: added twice to {self.out}; add each scene once")
        split = self._split_of(name, split)
        if isinstance(result, SceneError):
            if not self.opts.skip_bad:
                raise result
            entry = {"name": name, "split": split, "slot": None, "reason": result.reason}
        else:
            entry = self._spill(name, split, result)
        if source is not None:
            entry["source"] = source
        try:
            self._journal.write(json.dumps(entry, sort_keys=True) + "\n")
            self._journal.flush()  # a killed build's journal ends with whole lines
        except OSError as err:
            raise disk_error(err, self.out) from None
        self._names.add(name)
        self._scenes.append(entry)

    def _split_of(self, name: str, split: str | None) -> str:
        if split is not None and split not in SPLITS:
            raise BuildError(f"scene {name!r}: split {split!r}: choose one of {', '.join(SPLITS)}")
        if self._assignment is None:
            return split or hash_split(name, self.opts.val_fraction, self.opts.test_fraction)
        listed = self._assignment.get(name)
        if listed is None:
            raise SplitError(f"{self.opts.splits}: scene {name} is in no split; add it to the file")
        if split is not None and split != listed:
            raise SplitError(f"scene {name!r}: split {split!r}, but {self.opts.splits} puts it in {listed!r}")
        return listed

    def _spill(self, name: str, split: str, record: Record) -> dict:
        """Append the record's bytes to the spill files; returns its journal entry."""
        layout, slot = self.opts.layout(), self._spilled
        try:
            for fd, data, size in zip(
                self._fds, (record.sdf, record.labels), (layout.sdf_record_bytes, layout.labels_record_bytes)
            ):
                os.pwrite(fd, data, slot * size)
        except OSError as err:
            raise disk_error(err, self.out) from None
        self._spilled += 1
        return {
            "name": name,
            "split": split,
            "slot": slot,
            **{k: getattr(record, k) for k in INDEX_FIELDS},
            "sdf_crc": record.sdf_crc,
            "labels_crc": record.labels_crc,
            "scores": asdict(record.scores),
            "conversion_error": record.conversion_error,
        }

    def _locate(self, entry: dict) -> tuple[tuple[int, int], tuple[int, int]]:
        layout, slot = self.opts.layout(), entry["slot"]
        return (self._fds[0], slot * layout.sdf_record_bytes), (self._fds[1], slot * layout.labels_record_bytes)

    def _finish(self) -> None:
        if not self._scenes and self.part is None:
            raise BuildError(f"--out {self.out}: no scenes were added; nothing to write")
        try:
            summary = assemble(
                self._work, self.opts, self._scenes, self._locate, source=self.source, part=self.part_record
            )
            self._close_files()
            for name in (JOURNAL, *SPILL):
                (self._work / BUILD_DIR / name).unlink()
            (self._work / BUILD_DIR).rmdir()
            self._build.commit()
        except OSError as err:
            raise disk_error(err, self.out) from None
        self.summary = {**summary, "out": str(self.out)}

    def _close_files(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self._finish()
            self._close_files()
        except BaseException:
            self._close_files()
            if self._owned:
                self._build.__exit__(*sys.exc_info())
            raise
        if self._owned:
            self._build.__exit__(kind, value, traceback)


def spilled_intact(work: Path, opts: BuildOptions, entries: list[dict]) -> list[dict]:
    """The leading journal entries whose spilled bytes are all there and match their CRC-32s (`--resume`)."""
    layout = opts.layout()
    sizes = (layout.sdf_record_bytes, layout.labels_record_bytes)
    kept, slot = [], 0
    fds = [os.open(work / BUILD_DIR / name, os.O_RDONLY | os.O_CREAT, 0o644) for name in SPILL]
    try:
        for entry in entries:
            if entry.get("slot") is not None:
                if entry["slot"] != slot:
                    break
                data = [os.pread(fd, size, slot * size) for fd, size in zip(fds, sizes)]
                if [zlib.crc32(d) for d in data] != [entry["sdf_crc"], entry["labels_crc"]] or any(
                    len(d) != size for d, size in zip(data, sizes)
                ):
                    break
                slot += 1
            kept.append(entry)
    finally:
        for fd in fds:
            os.close(fd)
    return kept
