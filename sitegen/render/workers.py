"""Render jobs on every core: a pool of forked processes, or of threads where fork is unavailable.

A job is a zero-argument callable that writes its own files (two jobs may write the same file only
with the same bytes, like the colour bar two views show) and returns nothing the caller needs.  The
jobs are listed before the pool starts; where the platform can ``fork``, the workers inherit the
list and everything its closures reference (the atlas, the pass results, the compiled templates),
so nothing is pickled on the way in and only the numbers come back.  A job writes the same bytes in a worker as in one process, so the site is byte-identical
whatever the worker count (tests/render/test_parallel.py builds it both ways and compares).

Without ``fork`` (Windows; macOS, where Python starts processes with spawn because forking a
process that uses Apple's frameworks is unsafe) the jobs run on threads instead: Pillow's PNG, WebP
and JPEG encoders release the GIL, so drawing still gains while templating (pure Python) does not.
"""
from __future__ import annotations

import multiprocessing
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from .. import progress
from ..workpool import available_cores, can_fork, start_worker

Job = Callable[[], Any]

_JOBS: Sequence[Job] = ()
"""The jobs of the pool being started: set before the fork, inherited by the workers."""


def resolve(workers: int) -> int:
    """The worker count a setting asks for: 0 means every core."""
    return available_cores() if workers <= 0 else workers


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous index ranges of at most 8 jobs, at least 16 per worker where there are enough
    jobs: small enough for the loads to even out (jobs differ in size), large enough that handing
    them out costs nothing beside drawing them (well under 1 ms a chunk, 5-50 ms a job)."""
    size = max(1, min(8, n // (workers * 16)))
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _run_chunk(bounds: tuple[int, int]) -> int:
    lo, hi = bounds
    for i in range(lo, hi):
        _JOBS[i]()
    return hi - lo


def run(jobs: Sequence[Job], workers: int, description: str, unit: str) -> None:
    """Run every job once, on ``workers`` processes (threads without fork; inline for one worker),
    with a progress bar.  An exception in a job stops the others and is raised here."""
    global _JOBS
    workers = min(resolve(workers), len(jobs))
    with progress.bar(description, len(jobs), unit) as advance:
        if workers <= 1:
            for job in jobs:
                job()
                advance(1)
            return
        chunks = _chunks(len(jobs), workers)
        _JOBS = jobs
        try:
            if can_fork():
                with warnings.catch_warnings():
                    # Python ≥ 3.12 warns that forking a process with threads (torch's) may deadlock;
                    # the workers only run the jobs (NumPy, Pillow, Jinja), none of which waits on a
                    # lock another thread of the parent could have held at the fork.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    pool = multiprocessing.get_context("fork").Pool(workers, initializer=start_worker,
                                                                  initargs=(os.getpid(),))
                try:
                    for done in pool.imap_unordered(_run_chunk, chunks):
                        advance(done)
                except BaseException:
                    pool.terminate()  # the other workers stop too; the build's error is raised
                    pool.join()
                    raise
                pool.close()
                pool.join()
            else:
                with ThreadPoolExecutor(workers) as pool:
                    for done in pool.map(_run_chunk, chunks):
                        advance(done)
        finally:
            _JOBS = ()
