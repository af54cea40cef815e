"""The passes' worker pool: every item once, one torch thread per worker, errors reach the build."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sitegen import workpool
from sitegen.errors import LayerError

needs_fork = pytest.mark.skipif(not workpool.can_fork(), reason="no fork on this platform")


def _square(i: int) -> tuple[int, int, int]:
    return i * i, os.getpid(), torch.get_num_threads()


@needs_fork
def test_a_pool_runs_every_item_once_on_one_thread_each():
    got = dict(workpool.map_items(_square, list(range(7)), workers=2))
    assert sorted(got) == list(range(7))
    assert all(v[0] == i * i for i, v in got.items())
    assert all(v[1] != os.getpid() for v in got.values())  # in the workers, not here
    assert {v[2] for v in got.values()} == {1}


def test_one_worker_runs_inline_in_order():
    seen = []
    out = list(workpool.map_items(lambda i: seen.append(i) or -i, [3, 1, 2], workers=1, cost=lambda i: i))
    assert out == [(3, -3), (1, -1), (2, -2)] and seen == [3, 1, 2]  # the cost orders a pool only


def _pid(i: int) -> int:
    return os.getpid()


@needs_fork
def test_the_costliest_items_go_first_in_a_pool():
    # Each worker takes the next item in the pool's order: with the cost ``i``, every worker meets
    # its items from the largest down.
    by_worker: dict[int, list[int]] = {}
    for i, pid in workpool.map_items(_pid, list(range(8)), workers=2, cost=lambda i: i):
        by_worker.setdefault(pid, []).append(i)
    assert sorted(i for items in by_worker.values() for i in items) == list(range(8))
    assert all(items == sorted(items, reverse=True) for items in by_worker.values())


def _fail_at_three(i: int) -> int:
    if i == 3:
        raise LayerError("no layer 'layer5'", "`sitegen layers model.pt` lists them")
    return i


@needs_fork
def test_an_error_in_a_worker_reaches_the_caller_with_its_hint():
    with pytest.raises(LayerError) as err:
        list(workpool.map_items(_fail_at_three, list(range(6)), workers=2))
    assert err.value.hint == "`sitegen layers model.pt` lists them"
    assert "no layer 'layer5'" in str(err.value)


def test_pool_workers_only_on_a_cpu_that_can_fork(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(workpool, "can_fork", lambda: True)
    assert workpool.pool_workers(torch.device("cpu"), memory_bound=10) == 4
    assert workpool.pool_workers(torch.device("cpu"), memory_bound=3) == 3  # the memory holds 3
    assert workpool.pool_workers(torch.device("cpu"), memory_bound=0) == 1
    assert workpool.pool_workers(torch.device("cuda"), memory_bound=10) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CPU build on a GPU machine
    assert workpool.pool_workers(torch.device("cpu"), memory_bound=10) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(workpool, "can_fork", lambda: False)
    assert workpool.pool_workers(torch.device("cpu"), memory_bound=10) == 1


@needs_fork
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_end_with_a_build_killed_outright(tmp_path):
    pids = tmp_path / "pids"
    script = f"""
import os, time
from sitegen import workpool
def work(i):
    with open({str(pids)!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    time.sleep(60)
list(workpool.map_items(work, [0, 1], workers=2))
"""
    build = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not pids.exists() or len(pids.read_text().split()) < 2):
            time.sleep(0.05)
        workers = [int(p) for p in pids.read_text().split()]
        assert len(workers) == 2
    finally:
        build.kill()  # SIGKILL: no finally, no atexit in the build
        build.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _faults_of_rounds(keep: bool) -> tuple[bool, list[int]]:
    """In this (forked) process: whether malloc was set to keep freed memory, and the page faults
    of each of eight rounds of a backward's pattern of allocations: maps of 2, 4 and 6 MiB made one
    after the other, each freed once three newer ones exist."""
    import resource

    kept = workpool.keep_freed_memory() if keep else False
    faults = []
    for r in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        held = []
        for i in range(12):
            held.append(torch.ones((1 + (i + r) % 3) << 19))
            if len(held) > 3:
                held.pop(0)
        del held
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return kept, faults


def _in_child(keep: bool) -> tuple[bool, list[int]]:
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:  # a fresh process for each setting
        return pool.apply(_faults_of_rounds, (keep,))


@pytest.mark.skipif(not sys.platform.startswith("linux") or not workpool.can_fork(), reason="glibc's malloc, Linux")
def test_pass_workers_keep_freed_memory_for_their_next_allocations():
    """With the memory kept, the rounds after the first two reuse the pages already touched (no
    faults); by default glibc keeps handing freed memory back and faulting it in again (measured:
    1,536 to 5,056 faults in each of rounds 3 to 8, against none kept)."""
    kept, faults = _in_child(True)
    if not kept:
        pytest.skip("not glibc: mallopt is not there")
    assert faults[0] > 2000  # the first round does touch its pages
    assert sum(faults[2:]) < 100
    _, default = _in_child(False)
    assert sum(default[2:]) > 5000  # the default really faults: the setting is what helps
