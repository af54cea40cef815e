"""A pass's work items on every CPU core: forked processes of one torch thread each.

The costly passes on the CPU (feature visualisation, attribution, the sanity checks) run many small
forwards and backwards: 32×32 maps of a few channels, each op a few hundred microseconds, with
Python (autograd, the passes' torch-function modes) between them.  Two threads share such an op
badly: one core idles while the other runs the Python between the ops, and both wait at every
op's barrier.  Two processes of one thread each keep both cores busy instead: on the 2-core
development machine, feature visualisation of six layers of the shared ResNet-56 ran 1.24× the
throughput of one process of two threads (2 × 21.0 s against 2 × 13.0 s of work; 1.48× at
16-channel layers, 1.18× at 64-channel ones), measured side by side.  (The dataset pass, whose
convolutions are large, is faster on threads: it does not use this.)

:func:`map_items` runs ``work(i)`` for each item, in a pool of ``workers`` processes forked once
the pass has prepared everything the work reads (so nothing is pickled on the way in; the results
come back pickled); the parent keeps what they return (and saves it, shows progress) as items
finish.  Every worker runs one torch thread, so an item's result does not depend on the worker
count nor on which worker ran it (it equals the one-thread inline run's).

Only on the CPU, only where Python can fork (Linux and the BSDs; see :func:`can_fork`), and only
on a machine without a CUDA or XPU device (a CPU build there runs its items in its own process): a
forked child can use neither a CUDA context its parent holds nor autograd once the parent's
autograd has started its per-device threads.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import warnings
from typing import Callable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")

_WORK: Callable[[int], object] | None = None
"""The work of the pool being started: set before the fork, inherited by the workers."""


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform says, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def can_fork() -> bool:
    """Processes by fork: on Linux and the BSDs (not Windows; not macOS, where Python starts
    processes with spawn because forking a process that uses Apple's frameworks is unsafe)."""
    return "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"


def _has_accelerator() -> bool:
    """A CUDA or XPU device is present: autograd then starts a thread per device at its first
    backward, after which a forked child cannot run a backward (even a CPU one)."""
    for name in ("cuda", "xpu"):
        backend = getattr(torch, name, None)
        try:
            if backend is not None and backend.is_available():
                return True
        except (AttributeError, RuntimeError):
            continue
    return False


def pool_workers(device: torch.device, memory_bound: int) -> int:
    """Processes for a CPU pass's items: one per torch thread this process may use, at most
    ``memory_bound`` (how many items' working sets fit the memory), 1 where a pool cannot run
    (another device, no fork, a machine with a GPU)."""
    if device.type != "cpu" or not can_fork() or _has_accelerator():
        return 1
    return max(1, min(torch.get_num_threads(), memory_bound))


_PR_SET_PDEATHSIG = 1


def start_worker(parent: int) -> None:
    """The start of a worker forked from the build (a pass's or the render's pool): it ends with
    the build however the build ends, leaves Ctrl-C to the build (which stops the pool), dies
    quietly when the pool is stopped, and writes through stream objects of its own."""
    # Linux's parent-death signal: a worker waiting for its next item would otherwise outlive a
    # build killed with SIGKILL.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the build ended before the line above
        os._exit(1)
    # The build's own handlers (SIGTERM raised as an exception) would print a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    # Fresh stream objects on the same descriptors: the fork may have caught another thread of the
    # parent (a progress bar's refresh) holding the lock of sys.stderr's buffer, which would block
    # this process's first warning for ever.
    sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
"""glibc's ``mallopt`` parameters (malloc.h)."""


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory this process frees for its next allocations rather
    than hand it back to the system; whether it could (glibc only).

    By default glibc maps each allocation above a threshold (128 KiB at first, raised up to
    32 MiB as mapped blocks are freed) with a fresh ``mmap``, and hands the top of its heap back to
    the system past another: a backward pass that allocates and frees maps of a few MiB then keeps
    touching fresh pages, a page fault per 4 KiB.  With every allocation up to 32 MiB from the heap
    and no trimming, the pages are touched once per process.  Called by a build, for its own
    process (whose freed memory it keeps, at most the build's peak) and its pass workers (whose
    memory goes back to the system when they end).  A bare forward of the shared ResNet-56 over
    the 10,000 CIFAR images, two threads: 17.0 s with it against 21.5 s without.  In the pass
    workers, one thread each: feature visualisation 2-4 % faster by layer, the attribution of 64
    units 1-12 %; with it, the attribution's ReLU rule could copy its input instead of keeping a
    bool mask (8 % faster again, :class:`sitegen.activation_rules._RectifiedReLU`).  Setting it
    again (a worker forked from a build inherits it) changes nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no such knobs)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def _start_pass_worker(parent: int) -> None:
    start_worker(parent)
    torch.set_num_threads(1)
    keep_freed_memory()


def _call(i: int) -> tuple[int, object]:
    assert _WORK is not None
    return i, _WORK(i)


def map_items(work: Callable[[int], T], items: Sequence[int], workers: int,
              cost: Callable[[int], object] | None = None) -> Iterator[tuple[int, T]]:
    """``(i, work(i))`` for every item ``i``: inline and in order for one worker (on this process's
    threads); else in a pool of ``workers`` forked processes of one torch thread each, as the items
    finish.  Each worker takes the next item in order, so a worker meets its items in the order
    given; with ``cost`` (a sort key), the pool takes the costliest first instead, so the workers
    finish together.  An exception in an item stops the pool and is raised here."""
    workers = min(workers, len(items))
    if workers <= 1:
        for i in items:
            yield i, work(i)
        return
    if cost is not None:
        items = sorted(items, key=cost, reverse=True)
    global _WORK
    _WORK = work  # before the fork: the workers inherit it (and so would a replaced worker)
    try:
        with warnings.catch_warnings():
            # Python ≥ 3.12 warns that forking a process with threads (torch's) may deadlock; the
            # workers run torch on one thread, which waits on no lock of the parent's threads.
            warnings.simplefilter("ignore", DeprecationWarning)
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_start_pass_worker,
                                                              initargs=(os.getpid(),))
        finished = False
        try:
            for i, result in pool.imap_unordered(_call, items, chunksize=1):
                yield i, result  # type: ignore[misc]
            finished = True
        finally:
            if finished:
                pool.close()
            else:  # an error here or in an item, an interrupt, or the caller stopped early
                pool.terminate()
            pool.join()
    finally:
        _WORK = None
