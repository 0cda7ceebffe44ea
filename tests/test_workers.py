"""The experiments' worker processes: every job answered once, errors raised in the parent with their type,
a dead worker reported instead of waited on, and every worker gone once the iterator is left."""

from __future__ import annotations

import os
import time

import pytest
import worker_jobs as jobs

from amer.errors import DataError, ExperimentError
from amer.experiments.workers import imap_unordered


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a killed child is reaped by join; a zombie would still answer kill(0)
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


def test_every_job_once_with_the_initializer_run_in_each_worker() -> None:
    got = sorted(imap_unordered(jobs.square, range(7), 3, init=jobs.set_base, initargs=(100,)))
    assert got == [(x, 100 + x * x) for x in range(7)]
    assert list(imap_unordered(jobs.square, [], 2)) == []
    assert sorted(imap_unordered(jobs.square, [3, 1], 1)) == [(1, 1), (3, 9)]
    with pytest.raises(ValueError, match="workers"):
        list(imap_unordered(jobs.square, [1], 0))


def test_a_failing_job_raises_its_own_error_and_kills_the_rest() -> None:
    with pytest.raises(DataError, match="job 3 is bad"):
        list(imap_unordered(jobs.fail_on, [5, 4, 3, 2, 1], 2))


def test_a_failing_initializer_is_raised_not_respawned() -> None:
    # multiprocessing.Pool replaces such a worker forever: the run hangs with nothing printed
    with pytest.raises(DataError, match="cannot read /nowhere"):
        list(imap_unordered(jobs.square, [1, 2, 3], 2, init=jobs.fail_init, initargs=("/nowhere",)))


def test_a_worker_that_dies_is_an_error_not_a_hang() -> None:
    t0 = time.perf_counter()
    with pytest.raises(ExperimentError, match="exit code 7"):
        list(imap_unordered(jobs.die_on, [0, 1, 2, 3], 2))
    assert time.perf_counter() - t0 < 60


def test_leaving_early_kills_every_worker() -> None:
    it = imap_unordered(jobs.pid, range(6), 2)
    first = next(it)
    it.close()  # what an exception or Ctrl-C in the consumer does
    assert _gone(first)
    # negative control: a live worker is not taken for gone
    it = imap_unordered(jobs.pid, range(6), 2)
    other = next(it)
    assert not _gone(other)
    it.close()
    assert _gone(other)
