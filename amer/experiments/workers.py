"""Worker processes for experiment grids, without the failure modes of ``multiprocessing.Pool``.

``Pool`` shares one task queue and one result queue, each guarded by a lock that every worker takes. When a
worker's initializer raises, the pool replaces the worker forever and the run hangs with nothing printed; and
``Pool.terminate()`` kills workers that may hold a queue lock, after which it can wait forever on its own
task thread (seen here: once in about 40 runs that stop early on an error). Here each worker has its own pipe
and nothing is shared, so a worker can be killed at any time, and the parent waits on the pipes and on the
processes themselves: an error in a job or in the initializer, or a worker that dies without answering, is
raised in the parent, and leaving the iterator for any reason (an error, Ctrl-C, ``break``) kills every worker.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from amer.errors import ExperimentError
from amer.logs import configure as configure_logging
from amer.logs import configured

__all__ = ["imap_unordered"]


def _portable(e: BaseException) -> BaseException:
    """``e`` itself when it survives pickling (an amer error stays one line at the CLI), else its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _serve(conn: Connection, fn: Callable[[Any], Any], init: Callable[..., None] | None,
           initargs: Sequence[Any], verbosity: str | None = None) -> None:
    # Ctrl-C reaches the whole process group: the parent handles it and kills the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if verbosity is not None:  # a spawned process starts with logging unconfigured: show messages as the parent
        configure_logging(verbosity)
    failed: BaseException | None = None
    if init is not None:
        try:
            init(*initargs)
        except Exception as e:  # answered to every job, so the parent raises it
            failed = _portable(e)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        if failed is not None:
            conn.send((False, failed))
            continue
        try:
            conn.send((True, fn(job)))
        except Exception as e:
            conn.send((False, _portable(e)))


def imap_unordered(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int, *,
                   init: Callable[..., None] | None = None, initargs: Sequence[Any] = ()) -> Iterator[Any]:
    """``fn(job)`` for every job, yielded as workers finish them, in ``min(workers, len(jobs))`` spawned
    processes that each ran ``init(*initargs)`` once. ``fn`` and ``init`` must be module-level functions.

    Spawn, not fork: a forked child of a process that has run OpenMP regions can deadlock.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    ctx = multiprocessing.get_context("spawn")
    todo = list(jobs)[::-1]
    procs: dict[Connection, Any] = {}
    try:
        for _ in range(min(workers, len(todo))):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, fn, init, tuple(initargs), configured()), daemon=True)
            proc.start()
            child.close()
            procs[parent] = proc
            parent.send(todo.pop())
        busy = set(procs)
        while busy:
            by_sentinel = {procs[c].sentinel: c for c in busy}
            seen: set[Connection] = set()
            for ready in wait([*busy, *by_sentinel]):
                conn = ready if isinstance(ready, Connection) else by_sentinel[ready]
                if conn in seen or conn not in busy:
                    continue  # its answer and its exit both woke this wait
                seen.add(conn)
                job = None
                try:
                    ok, value = conn.recv()
                    if ok:
                        job = todo.pop() if todo else None
                        conn.send(job)  # None: no more work, the worker exits
                except (EOFError, OSError):
                    procs[conn].join(timeout=10)  # its pipe closes a moment before it can be reaped
                    raise ExperimentError(f"a worker process died (exit code {procs[conn].exitcode}) before "
                                          "finishing its job; finished jobs are kept") from None
                if not ok:
                    raise value
                if job is None:
                    busy.discard(conn)
                yield value
    finally:
        for conn, proc in procs.items():
            if proc.is_alive():
                proc.kill()
            proc.join()
            conn.close()
