"""A dataset on object storage (s3://, gs://, https://: any fsspec URL): `RemoteStore` reads and writes its objects.

Credentials and endpoints come from where the storage's own client looks (for S3: the AWS_* environment
variables such as AWS_ENDPOINT_URL for MinIO or Ceph, ~/.aws files, instance roles), never from gq's flags.
fsspec and s3fs come with the `s3` extra and are imported at first use; gs:// needs gcsfs.

Every call is retried on network errors (connection errors, timeouts, 5xx answers) with exponential backoff:
`attempts` tries (ATTEMPTS), waiting `base_delay` (BASE_DELAY_S), then twice that, ..., with jitter; then
`RemoteError`, one line naming the URL. The S3 client's own retries are turned off, so the two do not multiply.
A missing object is `RemoteNotFoundError` at once, refused access `RemoteError` at once.

`fetch` downloads an object whole into a temporary file beside its destination, named as every temporary of the
project is (`common.files.temporary_file`): `.<dest name>.<8 random characters>.tmp`, checks its byte size and
whole-file CRC-32 against the manifest's (`FileEntry`), fsyncs it and renames it into place: a reader of `dest`
sees nothing or the checked file. A download that does not match is fetched again (bounded, with the same
backoff), then `RemoteMismatchError`. The temporary is removed on every failure; only kill -9 (or a power loss)
leaves one, which nothing ever reads: a cache may remove such `.<name>.*.tmp` files once no fetch that could
own them runs (it holds the lock it fetches under). A full local disk is `LocalWriteError`, naming the folder.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import random
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from gq.common.errors import GQError
from gq.common.extras import import_extra
from gq.common.files import temporary_file
from gq.common.inputs import MAX_TEXT_BYTES, parse_json

from .format import MANIFEST, DatasetError, Manifest
from .manifest import fingerprint

log = logging.getLogger(__name__)
T = TypeVar("T")

ATTEMPTS = 5  # tries of one call before RemoteError
BASE_DELAY_S = 0.5  # the first wait between tries; doubled after each
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # a scheme of two letters or more: "C:\\" is no URL
_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "http": "aiohttp", "https": "aiohttp"}
_S3 = ("s3", "s3a")
_UNLISTED = ("http", "https")  # a web page's links are no listing: sizes are asked one by one
_LOCAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class RemoteError(DatasetError):
    """A remote dataset that cannot be read or written now; `str()` is one line naming the URL and what to do."""


class RemoteNotFoundError(RemoteError):
    """The object is not there."""


class RemoteMismatchError(RemoteError):
    """Every download of an object differed from what the manifest records: the object was replaced or damaged."""


class LocalWriteError(GQError):
    """A download could not be written locally (a full disk, a read-only file system); `str()` names the folder."""


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL with a scheme (s3://, gs://, https://, memory://, file://), False for a local path."""
    return isinstance(path, str) and bool(_URL.match(path))


def _checksum(path: Path) -> tuple[int, str]:
    """(byte size, CRC-32 as 8 hex digits) of a local file, in one read."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return size, f"{crc:08x}"


@functools.cache
def _transient_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a failure that may pass: network and server errors of the client stack."""
    kinds: list[type[BaseException]] = [OSError, TimeoutError]
    for module, names in (
        ("botocore.exceptions", ("BotoCoreError", "ClientError")),
        ("aiohttp", ("ClientError",)),
        ("fsspec.exceptions", ("FSTimeoutError",)),
    ):
        try:
            imported = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        kinds += [getattr(imported, name) for name in names if hasattr(imported, name)]
    return tuple(kinds)


class RemoteStore:
    """The objects under one URL (a dataset's root): read small ones, fetch checked ones, list, upload, delete.

    Names are relative to the root (`sdf-00000.npy`, `manifest.json`). `attempts` and `base_delay` bound the
    retries (module defaults ATTEMPTS, BASE_DELAY_S); `storage_options` go to fsspec's filesystem as they are.
    Usable from several threads and in forked children.
    """

    def __init__(
        self,
        url: str,
        *,
        attempts: int | None = None,
        base_delay: float | None = None,
        storage_options: dict | None = None,
    ) -> None:
        if not is_remote(url):
            raise RemoteError(f"{url}: not a URL (s3://bucket/prefix, gs://..., https://...)")
        self.url = url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0].lower()
        self.attempts = max(1, ATTEMPTS if attempts is None else attempts)
        self.base_delay = BASE_DELAY_S if base_delay is None else base_delay
        self.storage_options = dict(storage_options or {})

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    @property
    def fs(self):
        """The fsspec filesystem of this process for the URL's protocol, options and environment (`_client`)."""
        return _client(self.url, self.protocol, self.storage_options)

    # --- retries ------------------------------------------------------------------------------------------

    def _delays(self) -> Iterable[float]:
        """The waits between tries: base_delay, doubling, each scaled by a random factor in [0.5, 1.5)."""
        for attempt in range(self.attempts - 1):
            yield self.base_delay * 2**attempt * (0.5 + random.random())

    def _call(self, url: str, what: str, call: Callable[[], T]) -> T:
        """`call()`, retried on transient errors; RemoteError naming `url` and `what` failed otherwise."""
        delays = iter(self._delays())
        tries = 0
        while True:
            tries += 1
            try:
                return call()
            except LocalWriteError:
                raise
            except FileNotFoundError:
                raise RemoteNotFoundError(f"{url}: no such object") from None
            except PermissionError as err:
                raise RemoteError(
                    f"{url}: access denied ({err}); check the credentials (AWS_* variables, ~/.aws) and the URL"
                ) from None
            except _transient_errors() as err:
                if isinstance(err, OSError) and err.errno in _LOCAL_ERRNOS:
                    raise
                if isinstance(err, OSError) and err.errno == errno.EINVAL:  # the request itself is wrong
                    raise RemoteError(f"{url}: {what} refused: {_brief(err)}; check the URL") from None
                delay = next(delays, None)
                if delay is None:
                    raise RemoteError(
                        f"{url}: {what} failed {tries} times, last: {_brief(err)}; check the network, the endpoint "
                        f"(AWS_ENDPOINT_URL) and the credentials, then run again"
                    ) from None
                log.info("%s: %s failed (%s); again in %.1f s", url, what, _brief(err), delay)
                time.sleep(delay)

    # --- reading ------------------------------------------------------------------------------------------

    def read_small(self, name: str, limit: int = MAX_TEXT_BYTES) -> bytes:
        """The bytes of a small object (a manifest, an index) of at most `limit` bytes; RemoteError if larger."""
        url = self.url_of(name)

        def read() -> bytes:
            size = self.fs.size(url)
            if size is not None and size > limit:
                raise RemoteError(f"{url}: {size:,} bytes, more than the {limit:,} such an object may hold")
            with self.fs.open(url, "rb") as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                raise RemoteError(f"{url}: more than the {limit:,} bytes such an object may hold")
            return data

        return self._call(url, "reading", read)

    def read_head(self, name: str, count: int) -> bytes:
        """The first `count` bytes of an object (fewer if it is shorter)."""
        url = self.url_of(name)
        head = self._call(url, "reading", lambda: self.fs.cat_file(url, start=0, end=count))
        return head[:count]  # a web server that ignores the byte range sends the whole file

    def exists(self, name: str) -> bool:
        url = self.url_of(name)
        return self._call(url, "looking up", lambda: self.fs.exists(url))

    def size(self, name: str) -> int:
        url = self.url_of(name)
        return int(self._call(url, "looking up", lambda: self.fs.size(url)))

    def list(self) -> dict[str, int]:
        """Every object under the root, as {name relative to the root: byte size}."""
        root = self.fs._strip_protocol(self.url).rstrip("/")

        def find() -> dict[str, int]:
            found = self.fs.find(self.url, detail=True)
            return {
                path[len(root) + 1 :]: int(info.get("size") or 0)
                for path, info in found.items()
                if path.startswith(root + "/") and info.get("type", "file") != "directory"
            }

        try:
            return self._call(self.url, "listing", find)
        except RemoteNotFoundError:
            raise RemoteNotFoundError(f"{self.url}: no such bucket; create it first (gq creates none)") from None

    def sizes(self, names: Iterable[str]) -> dict[str, int]:
        """The byte sizes of those of `names` that exist: one listing where the storage has listings, else
        (http, https) one request each."""
        names = list(names)
        if self.protocol not in _UNLISTED:
            listed = self.list()
            return {name: listed[name] for name in names if name in listed}
        found = {}
        for name in names:
            with contextlib.suppress(RemoteNotFoundError):
                found[name] = self.size(name)
        return found

    def copy_to(self, name: str, dest: Path) -> int:
        """Download `name` into `dest` through a temporary beside it, unchecked (for `verify`, which checks it
        itself); the byte count."""
        return self._download(name, dest, check=None)

    def fetch(self, name: str, dest: Path, *, size: int, crc32: str) -> int:
        """Download `name` to `dest` (atomically: a temporary beside it, renamed into place) if its byte size and
        whole-file CRC-32 are `size` and `crc32` (the manifest's `FileEntry`); one that is not is downloaded
        again, then `RemoteMismatchError`. Returns the bytes downloaded (all tries)."""
        return self._download(name, dest, check=(size, crc32.lower()))

    def _download(self, name: str, dest: Path, *, check: tuple[int, str] | None) -> int:
        url, dest = self.url_of(name), Path(dest)
        delays = iter(self._delays())
        downloaded, tries = 0, 0
        while True:
            tries += 1
            tmp = self._temporary(dest, url)
            try:
                self._call(url, "downloading", lambda tmp=tmp: self._get(url, tmp, dest))
                got = _checksum(tmp)
                downloaded += got[0]
                if check is None or got == check:
                    _fsync(tmp)
                    os.replace(tmp, dest)
                    return downloaded
            except OSError as err:
                raise _local_error(err, dest, url) from None
            finally:
                tmp.unlink(missing_ok=True)  # gone already after the rename
            delay = next(delays, None)
            if delay is None:
                raise RemoteMismatchError(
                    f"{url}: downloaded {tries} times, {got[0]:,} bytes with CRC-32 {got[1]} the last time, but the "
                    f"manifest says {check[0]:,} bytes with CRC-32 {check[1]}: the object was replaced or damaged "
                    f"on the server; run gq shards verify {self.url}, and publish the dataset again if it fails"
                )
            log.info("%s: the download does not match the manifest (%s bytes, CRC-32 %s); again", url, *got)
            time.sleep(delay)

    def _temporary(self, dest: Path, url: str) -> Path:
        try:
            fd, tmp = temporary_file(dest)
        except OSError as err:
            raise _local_error(err, dest, url) from None
        os.close(fd)
        return tmp

    def _get(self, url: str, tmp: Path, dest: Path) -> None:
        # One stream per object: s3fs would split a large one into parts fetched at once, but only after a first
        # request whose body it drops, and the callers fetch several objects at once anyway.
        options = {"max_concurrency": 1} if self.protocol in _S3 else {}
        try:
            self.fs.get_file(url, str(tmp), **options)
        except OSError as err:
            if err.errno in _LOCAL_ERRNOS:
                raise _local_error(err, dest, url) from None
            raise

    # --- writing ------------------------------------------------------------------------------------------

    def upload(self, src: Path, name: str) -> None:
        """Put the local file `src` at `name` (an object appears whole or not at all)."""
        url = self.url_of(name)
        self._call(url, "uploading", lambda: self.fs.put_file(str(src), url))

    def put_bytes(self, name: str, data: bytes) -> None:
        url = self.url_of(name)
        self._call(url, "uploading", lambda: self.fs.pipe_file(url, data))

    def delete(self, names: Iterable[str]) -> None:
        """Remove these objects; one already gone is no error."""
        for name in names:
            url = self.url_of(name)
            with contextlib.suppress(RemoteNotFoundError):
                self._call(url, "deleting", lambda url=url: self.fs.rm_file(url))


_CLIENTS: dict[tuple, object] = {}
_CLIENTS_LOCK = threading.Lock()
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS", "FSSPEC")  # what the clients read their settings from


def _client(url: str, protocol: str, storage_options: dict):
    """One fsspec filesystem per process, protocol, options and client environment, made on first use: making
    one costs a third of a second (the S3 client's service models), and stores of one bucket share it. A forked
    child makes its own (a client does not survive a fork); a changed AWS_* variable makes a new one."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))
    key = (os.getpid(), protocol, repr(sorted(storage_options.items())), env)
    with _CLIENTS_LOCK:
        if key in _CLIENTS:
            return _CLIENTS[key]
        fsspec = import_extra("fsspec", "s3")
        options: dict = {"skip_instance_cache": True}  # fsspec's own cache would ignore the environment
        if protocol in _S3:
            import_extra("s3fs", "s3")
            # Listings are read anew each time (a dataset may be replaced), and the retries are ours.
            options |= {"use_listings_cache": False, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
        options |= storage_options
        try:
            fs = fsspec.filesystem(protocol, **options)
        except ImportError:
            package = _PACKAGES.get(protocol, f"the fsspec package for {protocol}://")
            raise RemoteError(f"{url}: reading {protocol}:// needs {package}: pip install {package}") from None
        except ValueError as err:
            raise RemoteError(f"{url}: {err}; use s3://, gs://, https:// or another fsspec URL") from None
        if protocol in _S3:
            fs.retries = 1  # s3fs's own loop over the same errors
        _CLIENTS[key] = fs
        return fs


def read_remote_manifest(store: RemoteStore) -> tuple[Manifest, bytes]:
    """The manifest of the dataset at `store.url`, checked (format, every key, the fingerprint against its
    contents), and its bytes as stored; DatasetError (one line) when there is none or it is not sound."""
    url = store.url_of(MANIFEST)
    try:
        raw = store.read_small(MANIFEST)
    except RemoteNotFoundError:
        raise DatasetError(
            f"{url}: missing, so {store.url} is no finished dataset; publish one there with "
            "gq shards upload DIR URL (or gq shards build ... --out URL)"
        ) from None
    try:
        data = parse_json(raw)
    except ValueError as err:
        raise DatasetError(f"{url}: unreadable manifest ({err}); publish the dataset again") from None
    manifest = Manifest.from_dict(data, where=url)
    if manifest.fingerprint != fingerprint(manifest):
        raise DatasetError(
            f"{url}: its fingerprint does not match its contents: edited after the build; publish the dataset again"
        )
    return manifest, raw


def _brief(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _local_error(err: OSError, dest: Path, url: str) -> LocalWriteError:
    """One line for a download that could not be written locally, naming the folder."""
    what = err.strerror or os.strerror(err.errno or 0) or str(err)
    advice = "free some space or choose another folder" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "fix it"
    return LocalWriteError(f"{dest.parent}: cannot write {url} there ({what}); {advice}, then run again")
