"""Publishing a dataset to object storage (`upload`), copying one back (`download`), and building straight to a URL.

A dataset at a URL is its `manifest.json` and the files that manifest lists (the local copy's `skipped.jsonl`
and ownership record stay local). `upload` writes so that a reader polling the URL sees no dataset or a
whole one, never a part:

1. It checks what the URL holds: nothing; a dataset (replaced only with `overwrite`); or an unfinished upload.
   Any object that neither the dataset's manifest nor the unfinished upload's marker lists is refused in one
   line: gq deletes only objects it can prove it wrote.
2. It writes the marker `.gq-upload.json`, naming every object this upload and the one before wrote, so
   that an upload killed at any point is recognised, and replaced, by the next.
3. It deletes the old manifest (readers now see no dataset), uploads the data files, and the manifest LAST.
4. It deletes the old objects that the new manifest does not list, then the marker.

A reader that opened the old dataset before step 3 reads objects that step 3 replaces: their bytes no longer
match the manifest it holds, so its checked fetch (`RemoteStore.fetch`) refuses them and it stops with one
line saying the dataset changed; it never mixes the two. One upload to a URL at a time: two at once are not
detected (object storage has no lock gq could take).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from gq.common.files import write_atomically
from gq.common.inputs import parse_json, read_small_file
from gq.common.ownership import BesideBuild

from .format import MANIFEST, DatasetError, FileEntry, file_crc32
from .manifest import read_manifest
from .outdir import TOOL, dataset_entries
from .remote import RemoteStore, read_remote_manifest
from .verify import verify

log = logging.getLogger(__name__)

MARKER = ".gq-upload.json"  # an upload in progress: the objects it (and the replaced dataset) wrote
UPLOADER = "gq shards upload"
TRANSFERS = 4  # files sent or fetched at once: object storage serves several streams faster than one


def _marker_objects(store: RemoteStore) -> set[str] | None:
    """The objects an unfinished upload's marker names, or None when its marker is not gq's."""
    try:
        data = parse_json(store.read_small(MARKER))
    except ValueError:
        return None
    objects = data.get("objects") if isinstance(data, dict) and data.get("tool") == UPLOADER else None
    if not (isinstance(objects, list) and all(isinstance(name, str) for name in objects)):
        return None
    return set(objects)


def replaceable(store: RemoteStore, *, overwrite: bool) -> set[str]:
    """The objects at `store.url` that an upload may delete (none for an empty prefix); DatasetError (one line)
    when the URL holds objects gq cannot prove it wrote, or a dataset and `overwrite` is not given."""
    objects = store.list()
    if not objects:
        return set()
    manifest = marker = None
    if MANIFEST in objects:
        try:
            manifest, _ = read_remote_manifest(store)
        except DatasetError as err:
            raise DatasetError(
                f"{store.url}: holds a {MANIFEST} that is not a sound gq dataset's ({err}); nothing is replaced: "
                "choose another URL, or delete what is there with your storage's own tools"
            ) from None
    if MARKER in objects:
        marker = _marker_objects(store)
    if manifest is None and marker is None:
        first = sorted(objects)[0]
        raise DatasetError(
            f"{store.url}: holds {len(objects)} objects ({first!r} first) and no gq dataset; gq replaces only a "
            "dataset it published: choose another URL, or delete them with your storage's own tools"
        )
    owned = {MANIFEST, MARKER} | (marker or set()) | ({f.name for f in manifest.files} if manifest else set())
    foreign = sorted(set(objects) - owned)
    if foreign:
        raise DatasetError(
            f"{store.url}: holds {foreign[0]!r}, which the dataset there does not list ({len(foreign)} such "
            "objects); nothing is replaced: move them away first, or choose another URL"
        )
    if manifest is not None and not overwrite:
        raise DatasetError(f"{store.url}: already holds a dataset; pass --overwrite to replace it, or choose another")
    if manifest is None:
        log.info("%s: an unfinished upload is there; it is replaced", store.url)
    return owned & set(objects)


def _transfer(files: Sequence[FileEntry], work: Callable[[FileEntry], None], desc: str, progress: bool) -> None:
    """`work(entry)` for every file, TRANSFERS at a time, with a progress bar in bytes. The first failure stops
    the rest: what has not started is dropped, what runs is waited for (so nothing writes after the return)."""
    bar = tqdm(
        total=sum(f.bytes for f in files),
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc=desc,
        disable=(not progress) or None,
    )
    with bar, ThreadPoolExecutor(TRANSFERS) as pool:
        futures = {pool.submit(work, entry): entry for entry in files}
        try:
            for future in as_completed(futures):
                future.result()
                bar.update(futures[future].bytes)
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def upload(src: str | Path, url: str, *, overwrite: bool = False, progress: bool = False) -> dict:
    """Publish the local dataset `src` at `url` (see the module's docstring for the order of writes).

    The dataset must pass `verify --quick`, and each file's CRC-32 is checked against its manifest just
    before it is uploaded. Returns {"url", "files", "bytes", "removed"} (objects of the old dataset deleted).
    """
    src = Path(src)
    result = verify(src, quick=True)
    if not result.ok:
        raise DatasetError(
            f"{src}: fails its checks ({result.problems[0]}); nothing uploaded (gq shards verify {src} lists "
            "every problem)"
        )
    manifest, raw = read_manifest(src), read_small_file(src / MANIFEST, "manifest")
    store = RemoteStore(url)
    owned = replaceable(store, overwrite=overwrite)
    names = [f.name for f in manifest.files]
    store.put_bytes(MARKER, json.dumps({"tool": UPLOADER, "objects": sorted(owned | {*names, MANIFEST})}).encode())
    store.delete([MANIFEST])  # from here until the new one is written, readers see no dataset

    def send(entry: FileEntry) -> None:
        if file_crc32(src / entry.name) != entry.crc32:
            raise DatasetError(
                f"{src / entry.name}: its CRC-32 differs from the manifest's (changed since the build); "
                f"nothing more uploaded and no dataset is at {store.url}: rebuild {src}, then upload again"
            )
        store.upload(src / entry.name, entry.name)

    _transfer(manifest.files, send, "upload", progress)
    store.put_bytes(MANIFEST, raw)
    stale = sorted(owned - {*names, MANIFEST, MARKER})
    store.delete(stale)
    store.delete([MARKER])
    total = sum(f.bytes for f in manifest.files) + len(raw)
    return {"url": store.url, "files": len(names) + 1, "bytes": total, "removed": len(stale)}


def download(url: str, out: str | Path, *, overwrite: bool = False, progress: bool = False) -> dict:
    """Copy the dataset at `url` into the local folder `out`, every file checked against the manifest as it
    arrives, built beside `out` and swapped in when complete (the ownership rules of `gq shards build`: `out`
    is replaced only with `overwrite`, and only if it is a dataset). Returns {"url", "out", "files", "bytes"}."""
    store = RemoteStore(url)
    out = Path(out).absolute()
    beside = BesideBuild(out, tool=TOOL, overwrite=overwrite)  # checks `out` before the first byte moves
    manifest, raw = read_remote_manifest(store)
    fetched = [len(raw)]  # bytes downloaded, tries that did not match included
    with beside:
        tmp = beside.create(dataset_entries(manifest.num_shards))

        def fetch(entry: FileEntry) -> None:
            fetched.append(store.fetch(entry.name, tmp / entry.name, size=entry.bytes, crc32=entry.crc32))

        _transfer(manifest.files, fetch, "download", progress)
        write_atomically(tmp / MANIFEST, raw)
        result = verify(tmp, quick=True)  # the index and headers agree with the manifest
        if not result.ok:
            raise DatasetError(f"{url}: the dataset there fails its checks ({result.problems[0]}); nothing written")
        beside.commit()
    return {"url": store.url, "out": str(out), "files": len(manifest.files) + 1, "bytes": sum(fetched)}


@contextlib.contextmanager
def staged(url: str, *, stage: str | Path | None, overwrite: bool, progress: bool = False) -> Iterator[Path]:
    """Build to a URL: yields the local folder to build the dataset in, uploads it when the block ends without
    an error. What the URL holds is checked first (before the slow build). `stage` None: a new temporary
    folder (in TMPDIR), removed afterwards; a folder given is a local dataset like any other and is kept."""
    replaceable(RemoteStore(url), overwrite=overwrite)
    if stage is not None:
        yield Path(stage)
        upload(stage, url, overwrite=overwrite, progress=progress)
        return
    folder = Path(tempfile.mkdtemp(prefix="gq-stage-"))
    try:
        yield folder / "dataset"
        upload(folder / "dataset", url, overwrite=overwrite, progress=progress)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # a folder this call made, whole
