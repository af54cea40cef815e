"""The passes' worker pool: every item once, one torch thread per worker, errors reach the build."""
from __future__ import annotations

import ctypes
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


_KEPT_AFTER_FREE = """
import os, resource, sys, torch
from sitegen import workpool
torch.set_num_threads(1)
kept = workpool.keep_freed_memory() if sys.argv[1] == "keep" else False
if sys.argv[1] in ("initial", "build"):  # glibc's starting threshold, held (its default raises it as blocks are freed)
    import ctypes
    ctypes.CDLL(None).mallopt(workpool._M_MMAP_THRESHOLD, 128 << 10)
if sys.argv[1] == "build":  # a whole build, from the command line, before the buffers
    from sitegen.cli import main
    try:
        main(sys.argv[2:])
        kept = True
    except SystemExit as e:
        kept = e.code in (0, None)
    torch.set_num_threads(1)
page = os.sysconf("SC_PAGE_SIZE")
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
held = [torch.ones(1 << 18) for _ in range(128)]  # 128 buffers of 1 MiB, touched
full = resident()
del held
after = resident()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
held = [torch.ones(1 << 18) for _ in range(128)]
again = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(int(kept), (full - after) >> 20, again, (128 << 20) // page)
"""
"""In a fresh interpreter: whether malloc was set to keep freed memory, the MiB handed back when
the buffers were freed, and the page faults of touching as many buffers again (and their pages)."""


def _kept_after_free(setting: str, *argv: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _KEPT_AFTER_FREE, setting, *argv], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    return [int(v) for v in out.stdout.split()[-4:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, Linux")
def test_pass_workers_keep_freed_memory_for_their_next_allocations():
    """Kept, 128 MiB of freed buffers stay resident and the next 128 MiB reuse their pages (few
    page faults).  With glibc's starting threshold (128 KiB) held, each buffer is mapped on its own,
    handed back when freed and faulted in again.  (glibc's default raises that threshold as blocks
    are freed, so whether it hands these buffers back depends on what the process did before: in
    fresh interpreters it did in two runs of three, 119 MiB handed back and 32,738 faults of 32,768
    pages, against none and 1,792 kept.)"""
    kept, released, faults, pages = _kept_after_free("keep")
    if not kept:
        pytest.skip("not glibc: mallopt is not there")
    assert released < 8 and faults < pages // 10
    _, released_initial, faults_initial, _ = _kept_after_free("initial")
    assert released_initial > 64 and faults_initial > pages // 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, Linux")
def test_a_build_keeps_freed_memory_in_its_own_process(tmp_path, tiny_checkpoint, make_images, paths):
    """After a build from the command line, the process that ran it keeps the memory it frees (its
    batches' maps are reused, not faulted in afresh), even where glibc's threshold had been held at
    its start: the build sets it."""
    make_images(tmp_path / "imgs", 8, size=16, classes=2)
    built, released, faults, pages = _kept_after_free(
        "build", "build", str(tiny_checkpoint), "--images", str(tmp_path / "imgs"), "--arch", paths["tiny_arch"],
        "-o", str(tmp_path / "site"), "--no-cache", "--k", "2")
    assert built == 1 and (tmp_path / "site" / "index.html").is_file()
    if not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("not glibc: mallopt is not there")
    assert released < 8 and faults < pages // 10
