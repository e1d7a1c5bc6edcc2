"""Worker processes of the commands with --workers (gq shards build, gq scenes, gq import-meshes).

`worker_count` is how many: more processes than CPUs, or than scenes to share out, only cost memory and
start-up time (100,000 asked for would fork until the machine stalls), so a larger request is capped at
what helps and says so in one line. `worker_pool` starts them: a worker ignores Ctrl-C (the parent
stops the pool) and ends silently when its parent is gone, instead of printing a BrokenPipeError
traceback for the result it can no longer send.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.pool
import os
import signal

from .errors import UsageError

log = logging.getLogger("gq")
_PR_SET_PDEATHSIG = 1


def worker_count(requested: int | None, scenes: int) -> int:
    """The processes to use for `scenes` scenes: `requested` (None: one per CPU), at most one per CPU available
    to this process and one per scene; a larger request is capped with one log line."""
    cpus = len(os.sched_getaffinity(0))
    useful = max(1, min(cpus, scenes))
    if requested is None:
        return useful
    if requested < 1:
        raise UsageError(f"--workers {requested}: must be at least 1")
    if requested > useful:
        log.warning(f"--workers {requested}: using {useful}, the most that helps ({cpus} CPUs, {scenes:,} scenes)")
        return useful
    return requested


def _quiet_worker(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the pool
    # The pool stops its workers with SIGTERM: a handler the parent had (a library's, e.g. Ray's driver, which
    # keeps one for the life of the process) must not keep a worker alive, and the parent waiting for it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Python ignores SIGPIPE, so a result written after the parent died raises BrokenPipeError and the worker
    # prints its traceback; with the default action the write ends the worker without a word.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # A worker that dies so inside the result queue's lock would leave the others waiting on it for ever:
    # the parent's death ends every worker (Linux; elsewhere only the first two lines apply).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(0)


def worker_pool(workers: int) -> multiprocessing.pool.Pool:
    """A process pool of `workers` quiet workers (a context manager, as multiprocessing.Pool)."""
    return multiprocessing.Pool(workers, initializer=_quiet_worker, initargs=(os.getpid(),))
