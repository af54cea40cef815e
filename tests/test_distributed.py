"""Several ranks through torch.distributed (gloo, CPU), and resuming a killed build."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

SITEGEN = [sys.executable, "-m", "sitegen"]


def _atlas(site: Path) -> dict:
    return json.loads((site / "data" / "atlas.json").read_text())


def assert_same_atlas(a: dict, b: dict) -> None:
    """Same top-k images and positions; values and statistics equal within float tolerance."""
    assert [l["name"] for l in a["layers"]] == [l["name"] for l in b["layers"]]
    for la, lb in zip(a["layers"], b["layers"]):
        for ca, cb in zip(la["channels"], lb["channels"]):
            assert [(e["image"], e["fmap_yx"]) for e in ca["top"]] == [(e["image"], e["fmap_yx"]) for e in cb["top"]]
            for ea, eb in zip(ca["top"], cb["top"]):
                assert ea["value"] == pytest.approx(eb["value"], rel=1e-5, abs=1e-6)
            for key in ca["stats"]:
                assert ca["stats"][key] == pytest.approx(cb["stats"][key], rel=1e-6, abs=1e-9)
    assert a["data"]["skipped"] == b["data"]["skipped"]


def assert_same_sanity(a: dict, b: dict) -> None:
    """The sanity figures of every layer and method: the same verdicts and proofs, numbers equal
    within float tolerance (the ranks shared the layers out and re-initialised their own copies)."""
    assert a["sanity"] == b["sanity"]
    for la, lb in zip(a["layers"], b["layers"]):
        fa, fb = la["sanity"], lb["sanity"]
        assert fa.keys() == fb.keys() and fa["methods"].keys() == fb["methods"].keys()
        assert fa["units"] > 0
        for m in fa["methods"]:
            ma, mb = fa["methods"][m], fb["methods"][m]
            assert ma.keys() == mb.keys()
            for key, va in ma.items():
                if isinstance(va, float):
                    assert va == pytest.approx(mb[key], abs=1e-6), (la["name"], m, key)
                else:
                    assert va == mb[key], (la["name"], m, key)


@pytest.fixture
def tiny_setup(tmp_path, make_images):
    from sitegen.model_loading import build_architecture

    images = tmp_path / "imgs"
    make_images(images, 45, size=16, classes=3)
    (images / "c1" / "broken.png").write_bytes(b"\x89PNG broken")
    ckpt = tmp_path / "tiny.pt"
    torch.save(build_architecture(f"{Path(__file__).parent / 'tiny_models.py'}:tiny_cnn", None).state_dict(), ckpt)
    return images, ckpt


def _build(argv, **kw):
    return subprocess.run(SITEGEN + argv, capture_output=True, text=True, timeout=300, **kw)


def test_two_gloo_ranks_equal_one_process(tmp_path, tiny_setup, paths):
    images, ckpt = tiny_setup
    common = ["build", str(ckpt), "--images", str(images), "--arch", paths["tiny_arch"], "--no-cache",
              "--batch-size", "4", "--k", "5"]
    one = _build(common + ["-o", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _build(common + ["-o", str(tmp_path / "two"), "--workers", "2"])
    assert two.returncode == 0, two.stderr
    # The launcher's own chatter (torchrun's OMP_NUM_THREADS banner, its log lines) stays off the terminal.
    assert "OMP_NUM_THREADS" not in two.stderr and "*****" not in two.stderr and "torch.distributed" not in two.stderr
    assert_same_atlas(_atlas(tmp_path / "one"), _atlas(tmp_path / "two"))
    assert_same_sanity(_atlas(tmp_path / "one"), _atlas(tmp_path / "two"))
    pages = lambda site: sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))  # noqa: E731
    assert pages(tmp_path / "one") == pages(tmp_path / "two")
    # The attribution and feature-vis work was split between the ranks and gathered on rank 0: every
    # picture (sprites, attribution crops, optimised images, kernels, maps) is the same, byte for byte.
    pictures = lambda site: {p.relative_to(site).as_posix(): p.read_bytes()  # noqa: E731
                             for p in site.rglob("*") if p.suffix in (".png", ".webp")}
    one_pics, two_pics = pictures(tmp_path / "one"), pictures(tmp_path / "two")
    assert one_pics.keys() == two_pics.keys()
    assert any(name.endswith(".fv.png") for name in one_pics) and any("class-" in name for name in one_pics)
    with Image.open(tmp_path / "one" / "img" / "conv1" / "0.webp") as sprite:  # k=5 columns of square cells
        assert sprite.height == 4 * sprite.width // 5  # patches, then guided, deconvnet and gradient rows
    assert [name for name in one_pics if one_pics[name] != two_pics[name]] == []


def test_shards_cover_every_image_once():
    from sitegen.distributed import Dist

    for n in (0, 1, 7, 45, 1000):
        for world in (1, 2, 3, 8):
            parts = [list(Dist(rank=r, world=world).shard(n)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            # Work items (attribution and feature-vis batches): each exactly once, shares differ by ≤ 1.
            shares = [list(Dist(rank=r, world=world).items(n)) for r in range(world)]
            assert sorted(sum(shares, [])) == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_killed_build_resumes_and_equals_uninterrupted(tmp_path, tiny_setup, paths):
    images, ckpt = tiny_setup
    cfg = tmp_path / "c.toml"
    cfg.write_text("[topk]\ncheckpoint_every = 8\nbatch_size = 4\n")
    slow = f"{Path(__file__).parent / 'tiny_models.py'}:slow_tiny_cnn"
    cache = tmp_path / "cache"
    argv = ["build", str(ckpt), "--images", str(images), "--arch", slow, "--config", str(cfg),
            "--cache-dir", str(cache), "-o", str(tmp_path / "resumed")]
    proc = subprocess.Popen(SITEGEN + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    checkpoints: list[Path] = []
    while time.time() < deadline and not checkpoints and proc.poll() is None:
        time.sleep(0.05)
        checkpoints = list(cache.glob("topk-*.partial/rank0.npz"))
    assert checkpoints, "no checkpoint was written before the pass ended"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "resumed" / "index.html").exists()  # nothing that looks complete

    again = _build(argv)
    assert again.returncode == 0, again.stderr
    assert "resuming after" in again.stderr
    assert not list(cache.glob("topk-*.partial/rank0.npz"))  # removed once the pass finished

    fresh = _build(argv[:-4] + ["--no-cache", "-o", str(tmp_path / "fresh")])
    assert fresh.returncode == 0, fresh.stderr
    assert_same_atlas(_atlas(tmp_path / "resumed"), _atlas(tmp_path / "fresh"))


# ----------------------------------------------------------------------------- --workers: the ranks' lifetime

def _children() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            found[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def _descendants(pid: int) -> set[int]:
    parents = _children()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _start_slow_workers(tmp_path, tiny_setup, paths, out):
    """A --workers 2 build slow enough to be caught running, in its own session (like a terminal's job)."""
    images, ckpt = tiny_setup
    slow = f"{Path(__file__).parent / 'tiny_models.py'}:slow_tiny_cnn"
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen(SITEGEN + ["build", str(ckpt), "--images", str(images), "--arch", slow, "--no-cache",
                                       "--batch-size", "1", "-o", str(out), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    deadline = time.time() + 120
    ranks: set[int] = set()
    while time.time() < deadline and proc.poll() is None:
        ranks = {p for p in _descendants(proc.pid) if "sitegen" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")}
        if len(ranks) >= 2 and "images, " in (tmp_path / "stderr.txt").read_text():
            break
        time.sleep(0.1)
    assert proc.poll() is None and len(ranks) >= 2, (tmp_path / "stderr.txt").read_text()
    return proc, _descendants(proc.pid)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_sitegen_takes_its_workers_with_it(tmp_path, tiny_setup, paths, sig):
    out = tmp_path / "site"
    proc, family = _start_slow_workers(tmp_path, tiny_setup, paths, out)
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in family):
            time.sleep(0.1)
        assert not [p for p in family if _alive(p)], "ranks outlived the sitegen process"
        assert not out.exists()  # and nothing was published behind the user's back
        if sig == signal.SIGTERM:
            assert proc.returncode in (143, -signal.SIGTERM)
    finally:
        for p in family:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def test_ctrl_c_stops_every_rank_and_says_so_once(tmp_path, tiny_setup, paths):
    out = tmp_path / "site"
    proc, family = _start_slow_workers(tmp_path, tiny_setup, paths, out)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends to the whole foreground job
        assert proc.wait(timeout=60) == 130
        err = (tmp_path / "stderr.txt").read_text()
        assert err.count("interrupted") == 1, err
        assert "Traceback" not in err and "SignalException" not in err
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in family):
            time.sleep(0.1)
        assert not [p for p in family if _alive(p)]
        assert not out.exists()
    finally:
        for p in family:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def test_an_input_mistake_under_workers_is_one_clean_error(tmp_path, tiny_setup, paths):
    images, ckpt = tiny_setup
    run = _build(["build", str(ckpt), "--images", str(images), "--arch", paths["tiny_arch"], "--no-cache",
                  "-o", str(tmp_path / "site"), "--workers", "2", "--layer", "nope"])
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("error: no layer 'nope'") == 1, run.stderr
    assert "Traceback" not in run.stderr and "ChildFailedError" not in run.stderr
    assert not (tmp_path / "site").exists()


def test_comparison_on_two_gloo_ranks_equals_one_process(tmp_path, tiny_setup, paths):
    """The dataset pass of both models on two ranks: the per-image arrays each rank filled for its
    shard (sample maxima, codes, predictions) merge into the one-process figures."""
    images, ckpt = tiny_setup
    old = tmp_path / "old.pt"
    torch.save({k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
                for k, v in torch.load(ckpt, weights_only=True).items()}, old)
    cfg = tmp_path / "c.toml"
    cfg.write_text("".join(f"[{s}]\nenabled = false\n" for s in ("attribution", "featurevis", "occlusion",
                                                                "kernels", "activations"))
                   + "[tsne]\niterations = 250\nperplexity = 5.0\n[compare]\nsample = 20\n")
    common = ["build", str(ckpt), "--images", str(images), "--arch", paths["tiny_arch"], "--no-cache",
              "--batch-size", "4", "--k", "5", "--config", str(cfg), "--compare", str(old)]
    one = _build(common + ["-o", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _build(common + ["-o", str(tmp_path / "two"), "--workers", "2"])
    assert two.returncode == 0, two.stderr
    a, b = _atlas(tmp_path / "one"), _atlas(tmp_path / "two")
    assert_same_atlas(a, b)
    ca, cb = a["compare"], b["compare"]
    assert ca["predictions"]["changed_images"] == cb["predictions"]["changed_images"]
    assert ca["predictions"]["per_class"] == cb["predictions"]["per_class"]
    assert ca["codes"]["shared_mean"] == pytest.approx(cb["codes"]["shared_mean"])
    assert ca["predictions"]["listed_images"] == cb["predictions"]["listed_images"]
    assert (ca["codes"]["images"], ca["codes"]["shared"]) == (cb["codes"]["images"], cb["codes"]["shared"])
    for la, lb in zip(ca["layers"], cb["layers"]):
        assert la["fits"] == lb["fits"] and la["newly_dead"] == lb["newly_dead"]
        assert (la["dead_both"], la["unchanged"]) == (lb["dead_both"], lb["unchanged"])
        for x, y in zip(la["channels"], lb["channels"]):
            assert (x["jaccard"], x["match"]) == (y["jaccard"], y["match"])
            assert [(e["image"], e["fmap_yx"]) for e in x["old_top"]] == [(e["image"], e["fmap_yx"]) for e in y["old_top"]]
            assert [e["value"] for e in x["old_top"]] == pytest.approx([e["value"] for e in y["old_top"]], rel=1e-5, abs=1e-6)
            assert x["correlation"] == pytest.approx(y["correlation"], abs=1e-5)
