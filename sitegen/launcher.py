"""``--workers N``: the same command as N ranks of one torch.distributed job on this machine.

What ``torchrun --standalone --nproc-per-node N`` does, with the ranks tied to the ``sitegen``
process that started them:

- they die with it, however it dies: each rank gets the kernel's parent-death signal (Linux
  ``PR_SET_PDEATHSIG``) and also watches its parent itself (:func:`watch_parent`), so a killed
  ``sitegen`` never leaves ranks running that publish an atlas later;
- Ctrl-C, SIGTERM and SIGHUP to ``sitegen`` are forwarded to every rank, which stop the way a
  single process does (the staging folder removed, nothing published); when one rank fails, the
  others are stopped too;
- the terminal sees rank 0 (progress, warnings, the final message) and, when another rank failed
  first, that rank's message: once, with no launcher banner.

The ranks meet through a file in a private temporary folder (a ``file://`` store), not a TCP port.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PARENT_ENV = "SITEGEN_PARENT_PID"
"""Set in each rank: the pid of the ``sitegen`` process that started it."""
STORE_ENV = "SITEGEN_STORE_FILE"
"""Set in each rank: the file through which the ranks find each other."""

_PR_SET_PDEATHSIG = 1
GRACE_S = 10.0
"""How long stopped ranks get to clean up before they are killed."""
SETTLE_S = 2.0
"""After one rank fails, how long the others get to end by themselves (an input mistake makes
every rank fail the same way: then rank 0's message is the one shown)."""


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _rank_setup(parent: int, group: int):
    """``preexec_fn`` for a rank: join process group ``group`` (0: a new one), SIGKILL when
    ``parent`` dies (Linux), and no start at all if it is already gone."""
    libc = _libc() if sys.platform.startswith("linux") else None  # looked up before the fork

    def in_child() -> None:
        try:
            os.setpgid(0, group)
        except OSError:
            os.setpgid(0, 0)  # rank 0 (the group's leader) has already ended
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # died between the fork and the prctl
            os._exit(1)

    return in_child


def watch_parent() -> None:
    """In a rank started by :func:`run_local`: end this process when the ``sitegen`` process that
    started it is gone (where the kernel's parent-death signal is not available)."""
    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit():
        return

    def watch() -> None:
        while True:
            if os.getppid() != int(parent):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.5)

    threading.Thread(target=watch, name="sitegen-parent-watch", daemon=True).start()


def _signal(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except OSError:
                pass


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def run_local(workers: int, argv: list[str]) -> int:
    """Run ``python -m sitegen ARGV`` as ``workers`` ranks; the exit code of the job."""
    parent = os.getpid()
    threads = max(1, (os.cpu_count() or 1) // workers)
    received: list[int] = []
    old = {}

    def forward(signum, _frame) -> None:
        received.append(signum)
        _signal(procs, signum)

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="sitegen-ranks-") as tmp:
        env = dict(os.environ, WORLD_SIZE=str(workers), LOCAL_WORLD_SIZE=str(workers), GROUP_RANK="0",
                   **{PARENT_ENV: str(parent), STORE_ENV: str(Path(tmp) / "store")})
        env.setdefault("OMP_NUM_THREADS", str(threads))  # N ranks share the cores
        logs = [Path(tmp) / f"rank{r}.txt" for r in range(workers)]
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            old[sig] = signal.signal(sig, forward)
        try:
            for rank in range(workers):
                err = None if rank == 0 else open(logs[rank], "wb")
                try:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "sitegen", *argv], stdin=subprocess.DEVNULL,
                        stdout=None if rank == 0 else subprocess.DEVNULL, stderr=err,
                        env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                        # A process group of their own: the terminal's Ctrl-C reaches sitegen alone,
                        # which forwards it once to every rank.
                        preexec_fn=_rank_setup(parent, procs[0].pid if procs else 0) if os.name == "posix" else None))
                finally:
                    if err is not None:
                        err.close()
            return _wait(procs, logs, received)
        finally:
            _signal(procs, signal.SIGKILL)
            for p in procs:
                p.wait()
            for sig, handler in old.items():
                signal.signal(sig, handler)


def _wait(procs: list[subprocess.Popen], logs: list[Path], received: list[int]) -> int:
    first_failed = None
    stop_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if first_failed is None:
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                first_failed = failed[0]
                stop_at = now + SETTLE_S
        if received and stop_at is None:
            stop_at = now + GRACE_S
        if stop_at is not None and now > stop_at:
            _signal(procs, signal.SIGKILL)
        time.sleep(0.05)
    if received:
        return 128 + received[0]
    if first_failed is None:  # every rank ended before the loop looked
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if not failed:
            return 0
        first_failed = failed[0]
    codes = [p.returncode for p in procs]
    if first_failed != 0 and codes[0] in (-signal.SIGKILL, 0):
        # Rank 0 was stopped (or had finished): the failing rank's own message is the one to show.
        sys.stderr.write(logs[first_failed].read_text(encoding="utf-8", errors="replace"))
        sys.stderr.flush()
    return _exit_code(codes[first_failed])
