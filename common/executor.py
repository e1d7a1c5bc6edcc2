"""Where the per-object work of a build runs: worker processes on this machine, or Ray tasks on a cluster.

`open_executor` gives one interface, `imap(fn, items, chunksize)`: `fn` over `items`, its results yielded in
the order of `items`, so a build consumes them exactly as it does from a local pool and writes the same bytes
whichever engine ran the work. Two engines:

- the local process pool (`common.workers`; one worker runs in this process), and
- Ray tasks (`--ray ADDRESS`, the `ray` extra): `ray.init(address=ADDRESS)`, where `auto` is the cluster
  `ray start` made on this machine and `local` starts a private one. Each task runs `fn` over a chunk of
  items. `fn` must be a pure function of its item that may run twice: Ray reruns a task whose worker died
  (`RAY_RETRIES` times), so a killed worker changes nothing but the time taken. A task's own exception is not
  retried: it ends the build as it would locally (Ray's wrapper, which carries a traceback, is removed).

Ray's nodes must see the build's input and output folders under the same paths (a shared file system) and
run the same gq version, as `fn` reads and writes files there.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

from .errors import GQError, UsageError
from .extras import import_extra
from .workers import worker_count, worker_pool

T = TypeVar("T")
R = TypeVar("R")
RAY_RETRIES = 5  # reruns of a task whose worker process or node died (not of a task's own error)
RAY_LOCAL = "local"  # `--ray` without an address: a private cluster on this machine


class RayError(GQError):
    """A task Ray gave up on: its worker (or node) died on every try."""


class Executor(Protocol):
    """Runs a pure per-object function over a build's items."""

    workers: int  # the processes (local) or CPUs (Ray cluster) that run tasks at once

    def imap(self, fn: Callable[[T], R], items: Sequence[T], chunksize: int = 1) -> Iterator[R]:
        """`fn(item)` for each item, yielded in the order of `items` as they finish."""
        ...


class LocalPool:
    """Worker processes of this machine (`worker_pool`); one worker runs the tasks in this process."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = worker_pool(workers) if workers > 1 else None

    def imap(self, fn: Callable[[T], R], items: Sequence[T], chunksize: int = 1) -> Iterator[R]:
        return map(fn, items) if self._pool is None else self._pool.imap(fn, items, chunksize=chunksize)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()  # as `with Pool()` does: a finished or abandoned build needs none of it
            self._pool.join()


def _run_chunk(fn: Callable[[T], R], chunk: Sequence[T]) -> list[R]:
    return [fn(item) for item in chunk]


def _unreachable(address: str) -> str | None:
    """Why a HOST:PORT address takes no connection (Ray itself would retry it for minutes), or None; `auto`,
    `local` and `ray://` addresses are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return None
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__
    return None


class RayTasks:
    """Ray tasks on the cluster at `address` (`ray.init`'s meaning; `local`: a private one)."""

    def __init__(self, address: str) -> None:
        self._ray = ray = import_extra("ray", "ray")
        self._owner = not ray.is_initialized()  # a caller's own ray.init is used, and left connected
        if self._owner:
            why = _unreachable(address)
            if why is not None:
                raise UsageError(f"--ray {address}: no Ray cluster answers there ({why}); check the address")
            local = {"include_dashboard": False} if address == RAY_LOCAL else {}
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, **local)
            except (ConnectionError, ValueError, RuntimeError) as err:
                detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise UsageError(
                    f"--ray {address}: cannot connect to a Ray cluster: {detail}; start one with `ray start --head` "
                    "(then --ray auto) or give its address"
                ) from None
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(max_retries=RAY_RETRIES, retry_exceptions=False, num_cpus=1)(_run_chunk)

    def imap(self, fn: Callable[[T], R], items: Sequence[T], chunksize: int = 1) -> Iterator[R]:
        ray = self._ray
        fn_ref = ray.put(fn)  # shipped once, not with every task
        chunks = (items[i : i + chunksize] for i in range(0, len(items), chunksize))
        pending: collections.deque = collections.deque()
        window = 2 * self.workers  # tasks in flight: every CPU busy, and a bounded number of results held here
        for chunk in chunks:
            pending.append(self._task.remote(fn_ref, chunk))
            if len(pending) >= window:
                yield from self._get(pending.popleft())
        while pending:
            yield from self._get(pending.popleft())

    def _get(self, ref) -> list:
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(ref)
        except exceptions.RayTaskError as err:  # the task's own exception, as the local path raises it
            raise err.cause from None
        except exceptions.RayError as err:
            detail = str(err).strip().splitlines()[0]
            raise RayError(f"a Ray task failed on each of its {RAY_RETRIES + 1} tries: {detail}") from None

    def close(self) -> None:
        if self._owner:
            self._ray.shutdown()


@contextlib.contextmanager
def open_executor(workers: int | None, items: int, ray: str | None = None) -> Iterator[Executor]:
    """The engine of a build of `items` objects: Ray tasks at `ray` (an address, `auto` or `local`) when given,
    else `worker_count(workers, items)` local processes. Closed (the pool stopped, a private cluster shut down)
    on leaving the block."""
    if ray is not None and workers is not None:
        raise UsageError(f"--workers {workers} and --ray {ray}: choose one (a Ray cluster runs a task per CPU)")
    engine = RayTasks(ray) if ray is not None else LocalPool(worker_count(workers, items))
    try:
        yield engine
    finally:
        engine.close()
