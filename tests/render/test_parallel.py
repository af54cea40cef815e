"""The render on several processes: the same site byte for byte as one process, every job run once,
a job's error raised in the parent."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sitegen.render import workers

REPO = Path(__file__).resolve().parents[2]


def _small_atlas_module():
    spec = importlib.util.spec_from_file_location("sitegen_small_atlas", REPO / "tests" / "e2e" / "small_atlas.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(site: Path) -> dict[str, bytes]:
    """Every file's bytes; data/atlas.json without its ``build`` record, which holds the seconds this
    build measured (they differ from run to run; nothing else in the site does)."""
    files = {p.relative_to(site).as_posix(): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}
    atlas = json.loads(files["data/atlas.json"])
    assert atlas.pop("build")["passes"]
    files["data/atlas.json"] = json.dumps(atlas, sort_keys=True).encode()
    return files


def test_the_site_is_byte_identical_on_one_and_on_three_processes_or_threads(tmp_path_factory, monkeypatch):
    small = _small_atlas_module()
    base = tmp_path_factory.getbasetemp()
    work, cache = base / "small-atlas-work", base / "sitegen-pass-cache"  # shared with test_site.py
    one = small.build_small_atlas(tmp_path_factory.mktemp("one") / "atlas", work, cache, render_workers=1)
    three = small.build_small_atlas(tmp_path_factory.mktemp("three") / "atlas", work, cache, render_workers=3)
    a, b = _files(one), _files(three)
    assert sorted(a) == sorted(b)
    assert len(a) > 200 and any(k.endswith(".webp") for k in a) and any(k.endswith(".fv.png") for k in a)
    different = [k for k in a if a[k] != b[k]]
    assert not different, different[:10]
    # Where Python cannot fork (Windows, macOS) threads draw, sharing one decoded-image cache.
    monkeypatch.setattr(workers, "can_fork", lambda: False)
    threads = _files(small.build_small_atlas(tmp_path_factory.mktemp("threads") / "atlas", work, cache,
                                             render_workers=3))
    assert sorted(threads) == sorted(a)
    different = [k for k in a if a[k] != threads[k]]
    assert not different, different[:10]


def test_the_pixel_cache_is_safe_to_share_between_threads():
    """Many threads asking for overlapping images through a cache that holds only a few: every
    answer is the right image, and the bookkeeping stays consistent."""
    import threading

    import numpy as np

    from sitegen.crops import PixelCache

    def load(i: int) -> np.ndarray:
        return np.full((8, 8, 3), i % 251, np.uint8)

    cache = PixelCache(load, budget_bytes=4 * 8 * 8 * 3)
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for i in rng.integers(0, 12, 3000).tolist():
                assert int(cache(i)[0, 0, 0]) == i % 251
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: an unlocked cache fails here
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    assert cache.used == sum(a.nbytes for a in cache.items.values()) <= 4 * 8 * 8 * 3


def _write_job(folder: Path, i: int):
    def job() -> int:
        path = folder / f"{i}.txt"
        with open(path, "a", encoding="ascii") as f:  # appended: a job run twice would show
            f.write(f"{i}\n")
        return 1
    return job


@pytest.mark.parametrize("fork", [True, False])
def test_every_job_runs_once(tmp_path, monkeypatch, fork):
    if fork and not workers.can_fork():
        pytest.skip("no fork on this platform")
    monkeypatch.setattr(workers, "can_fork", lambda: fork)
    jobs = [_write_job(tmp_path, i) for i in range(300)]
    workers.run(jobs, 3, "test", "jobs")
    assert sorted(int(p.stem) for p in tmp_path.iterdir()) == list(range(300))
    assert all(p.read_text() == f"{p.stem}\n" for p in tmp_path.iterdir())


@pytest.mark.parametrize("fork", [True, False])
def test_an_error_in_a_job_reaches_the_caller(tmp_path, monkeypatch, fork):
    if fork and not workers.can_fork():
        pytest.skip("no fork on this platform")
    monkeypatch.setattr(workers, "can_fork", lambda: fork)

    def bad() -> int:
        raise ValueError("job 7 cannot draw")

    jobs = [_write_job(tmp_path, i) for i in range(20)]
    jobs[7] = bad
    with pytest.raises(ValueError, match="job 7 cannot draw"):
        workers.run(jobs, 2, "test", "jobs")


def test_worker_counts():
    assert workers.resolve(0) == workers.available_cores() >= 1
    assert workers.resolve(3) == 3
    chunks = workers._chunks(1000, 2)
    assert chunks[0] == (0, 8) and chunks[-1][1] == 1000
    assert workers._chunks(100, 2)[0] == (0, 3)
    assert sum(hi - lo for lo, hi in chunks) == 1000
    assert workers._chunks(5, 4) == [(i, i + 1) for i in range(5)]
