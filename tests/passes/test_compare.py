"""Comparing two checkpoints: a model against itself, against a copy with its channels permuted, and
against a fine-tuned copy, each checked against a brute-force recomputation; a checkpoint of another
width is refused before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

from sitegen.build import BuildReport, build, prepare, run_passes
from sitegen.cli import main
from sitegen.config import from_dict
from sitegen.model_loading import build_architecture
from sitegen.passes.base import Cache
from sitegen.passes.topk import channel_top

OFF = {section: {"enabled": False} for section in ("attribution", "featurevis", "occlusion", "tsne", "kernels",
                                                   "activations")}
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # the config's defaults


def _arch(paths, name: str = "tiny_cnn") -> str:
    return f"{paths['repo'] / 'tests' / 'tiny_models.py'}:{name}"


def _images(tmp_path, make_images, n: int = 24) -> Path:
    folder = tmp_path / "imgs"
    make_images(folder, n, size=16, classes=3)
    return folder


def _results(new: Path, old: Path, images: Path, arch: str, **sections):
    cfg = from_dict({"model": {"arch": arch}, "compare": {"checkpoint": str(old)}, "topk": {"k": 5},
                     **OFF, **sections})
    ctx = prepare(new, images, cfg, None)
    return ctx, run_passes(ctx, Cache(None), BuildReport(index=Path("unused")))


def _pixels(ctx) -> torch.Tensor:
    """Every image, normalised by hand (these are 16 px PNGs used as they are: no resize, no crop)."""
    arrays = [np.asarray(Image.open(ctx.images.path(i)).convert("RGB"), np.float64) / 255.0
              for i in range(len(ctx.images))]
    x = (np.stack(arrays) - MEAN) / STD
    return torch.from_numpy(x).permute(0, 3, 1, 2).float()


def brute_force(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict:
    """Every selected layer's whole output on every image, the logits and the codes (fc's input)."""
    maps, codes = {}, []
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: maps.__setitem__(n, out.detach().clone())) for n in names]
    hooks.append(model.fc.register_forward_pre_hook(lambda _m, inp: codes.append(inp[0].detach().clone())))
    try:
        with torch.no_grad():
            logits = model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return {"maxima": {n: maps[n].flatten(2).amax(2).double().numpy() for n in names},
            "logits": logits.double().numpy(), "codes": codes[0].double().numpy()}


def topk_sets(maxima: np.ndarray, k: int) -> list[set[int]]:
    ids = np.arange(len(maxima))
    return [set(np.lexsort((ids, -maxima[:, c]))[:k].tolist()) for c in range(maxima.shape[1])]


def nearest_sets(codes: np.ndarray, k: int) -> list[set[int]]:
    d = ((codes[:, None, :] - codes[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return [set(np.argsort(row, kind="stable")[:k].tolist()) for row in d]


# ------------------------------------------------------------------ a model against itself


def test_a_model_compared_with_itself_changes_nothing(tmp_path, tiny_checkpoint, make_images, paths):
    images = _images(tmp_path, make_images)
    copy = tmp_path / "copy.pt"  # the same weights in another file (other bytes: torch.save names its archive)
    torch.save(torch.load(tiny_checkpoint, weights_only=True), copy)
    cfg = from_dict({"model": {"arch": paths["tiny_arch"]}, "compare": {"checkpoint": str(copy)},
                     **{**OFF, "tsne": {"enabled": True, "iterations": 250, "perplexity": 5.0}},
                     "site": {"image_format": "png"}})
    out = tmp_path / "site"
    build(tiny_checkpoint, images, out, cfg, cache_dir=None)
    section = json.loads((out / "data" / "atlas.json").read_text())["compare"]
    assert section["old"]["checkpoint"] == "copy.pt" and not section["same_file"]
    for layer in section["layers"]:
        assert layer["fits"] == "identity" and layer["moved"] == 0
        assert not layer["newly_dead"] and not layer["newly_alive"]
        for ch in layer["channels"]:
            assert ch["jaccard"] == 1 and ch["correlation"] == pytest.approx(1, abs=1e-9)
            assert ch["match"] == ch["channel"] and ch["match_correlation"] == pytest.approx(1, abs=1e-9)
    assert section["predictions"]["available"] and section["predictions"]["changed"] == 0
    assert section["predictions"]["changed_images"] == [] and section["predictions"]["listed_images"] == []
    assert section["codes"]["shared_mean"] == 1
    # Every image keeps all its neighbours (24 images: 10 each), listed by path.
    codes = section["codes"]
    assert codes["neighbours"] == 10 and codes["shared"] == [10] * codes["points"] == [10] * len(codes["images"])
    assert sorted(codes["images"]) == sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    atlas_layers = {l["name"]: l for l in json.loads((out / "data" / "atlas.json").read_text())["layers"]}
    for layer in section["layers"]:
        assert layer["unchanged"]
        # compare.channels (10) is more than these layers have: every channel is listed, once.
        assert sorted(layer["most_changed"]) == list(range(len(layer["channels"])))
        # Dead in both: the new model's own statistics say which (the old one is the same).
        assert layer["dead_both"] == sum(ch["stats"]["max"] <= 0 for ch in atlas_layers[layer["name"]]["channels"])
    assert section["nothing_changed"]
    page = (out / "changes.html").read_text()
    assert "Nothing changed." in page and "No image changed its top class" in page
    index = (out / "index.html").read_text()
    assert 'href="changes.html"' in index
    channel = (out / "layers" / "conv2" / "0.html").read_text()
    assert "In the old checkpoint" in channel and "0.old.png" in channel
    assert (out / "img" / "conv2" / "0.old.png").read_bytes() == (out / "img" / "conv2" / "0.png").read_bytes()
    assert "Channel order kept" in (out / "layers" / "conv2" / "index.html").read_text()
    assert (out / "layers" / "conv2" / "by-change.html").is_file()
    assert "Codes of both checkpoints" in (out / "changes-tsne.html").read_text()


# ------------------------------------------------------------------ permuted channels


def test_permuted_channels_are_recovered_by_the_matching(tmp_path, make_images, paths):
    arch = _arch(paths, "wide_tiny_cnn")
    model = build_architecture(arch, None)
    old = tmp_path / "old.pt"
    torch.save(model.state_dict(), old)
    perm = torch.tensor([2, 0, 5, 1, 3, 4])  # new channel c is old channel perm[c]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["conv1.weight"], sd["conv1.bias"] = sd["conv1.weight"][perm], sd["conv1.bias"][perm]
    sd["conv2.weight"] = sd["conv2.weight"][:, perm]  # the next layer reads them in the new order
    new = tmp_path / "new.pt"
    torch.save(sd, new)
    images = _images(tmp_path, make_images)

    ctx, results = _results(new, old, images, arch)
    x = _pixels(ctx)
    a, b = brute_force(ctx.net, x, ["conv1", "conv2"]), brute_force(ctx.compare.model, x, ["conv1", "conv2"])
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5)  # the permutation changes no output

    r = results["compare"]
    conv1, conv2 = r.meta["layers"]
    np.testing.assert_array_equal(r.arrays["L0.match"], perm.numpy())  # linear assignment recovers it exactly
    np.testing.assert_allclose(r.arrays["L0.match_corr"], 1, atol=1e-9)
    assert conv1["fits"] == "matching" and conv1["moved"] == 6 and conv1["matched_correlation"] == pytest.approx(1)
    # The identity sees a change in every moved channel.
    assert (r.arrays["L0.corr"] < 0.99).all() and conv1["mean_correlation"] < 0.9
    assert r.arrays["L0.jaccard"].min() < 1
    assert r.meta["ranking"][0] == "conv1" and not conv1["unchanged"]
    assert conv2["fits"] == "identity" and conv2["unchanged"]
    np.testing.assert_allclose(r.arrays["L1.corr"], 1, atol=1e-6)
    assert r.meta["predictions"]["changed"] == 0
    acc = r.meta["predictions"]["accuracy"]
    assert acc["new"] == acc["old"]
    assert not r.meta["nothing_changed"]


# ------------------------------------------------------------------ a fine-tuned copy against brute force


def fine_tune(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 25, lr: float = 0.5):
    """A few steps of full-batch SGD on the images' class folders: a fine-tuned copy."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model


def test_fine_tuned_copy_equals_brute_force(tmp_path, tiny_checkpoint, make_images, paths):
    images = _images(tmp_path, make_images, n=30)
    old = tiny_checkpoint
    x = _pixels(prepare(old, images, from_dict({"model": {"arch": paths["tiny_arch"]}}), None))
    labels = torch.from_numpy(prepare(old, images, from_dict({"model": {"arch": paths["tiny_arch"]}}), None).images.labels)
    tuned = fine_tune(build_architecture(paths["tiny_arch"], None), x, labels)
    new = tmp_path / "tuned.pt"
    torch.save(tuned.state_dict(), new)

    ctx, results = _results(new, old, images, paths["tiny_arch"], compare={"checkpoint": str(old), "changed_images": 3})
    names = [l.name for l in ctx.layers]
    bn, bo = brute_force(ctx.net, x, names), brute_force(ctx.compare.model, x, names)
    r, top = results["compare"], results["topk"]
    k = top.meta["k"]
    assert r.meta["sample"]["images"] == len(x)  # fewer images than compare.sample: all of them
    for li, n in enumerate(names):
        new_sets, old_sets = topk_sets(bn["maxima"][n], k), topk_sets(bo["maxima"][n], k)
        c_count = bn["maxima"][n].shape[1]
        for c in range(c_count):
            assert set(channel_top(top, n, c).images.tolist()) == new_sets[c]
            assert set(channel_top(top, n, c, prefix="old.").images.tolist()) == old_sets[c]
            shared = len(new_sets[c] & old_sets[c])
            assert r.arrays[f"L{li}.shared"][c] == shared
            assert r.arrays[f"L{li}.jaccard"][c] == pytest.approx(shared / len(new_sets[c] | old_sets[c]))
        full = np.corrcoef(bn["maxima"][n].T, bo["maxima"][n].T)[:c_count, c_count:]
        np.testing.assert_allclose(r.arrays[f"L{li}.corr"], np.diag(full), atol=1e-6)
        rows, cols = linear_sum_assignment(-full)
        np.testing.assert_array_equal(r.arrays[f"L{li}.match"][rows], cols)
        np.testing.assert_allclose(r.arrays[f"L{li}.match_corr"], full[rows, cols], atol=1e-6)
        np.testing.assert_array_equal(r.arrays[f"L{li}.dead_new"], bn["maxima"][n].max(0) <= 0)
        np.testing.assert_array_equal(r.arrays[f"L{li}.dead_old"], bo["maxima"][n].max(0) <= 0)
        layer = r.meta["layers"][li]
        assert layer["mean_correlation"] == pytest.approx(np.diag(full).mean(), abs=1e-6)
        assert layer["fits"] == ("identity" if (cols == rows).all() else "matching")
        dead_new, dead_old = bn["maxima"][n].max(0) <= 0, bo["maxima"][n].max(0) <= 0
        assert layer["dead_both"] == int((dead_new & dead_old).sum())
        assert layer["newly_dead"] == np.flatnonzero(dead_new & ~dead_old).tolist()
        # The most-changed channels: the compare.channels (10, more than these layers have) channels
        # with the largest 1 − r, most changed first (to float tolerance: near-equal r may swap).
        change = 1 - np.diag(full)
        listed = layer["most_changed"]
        assert sorted(listed) == list(range(c_count))
        assert all(change[a] >= change[b] - 1e-6 for a, b in zip(listed, listed[1:])), (n, listed, change)
        assert layer["unchanged"] == bool(np.diag(full).min() > 1 - 1e-9 and (dead_new == dead_old).all()
                                          and r.arrays[f"L{li}.jaccard"].min() == 1)
    assert min(r.arrays[f"L{li}.corr"].min() for li in range(len(names))) < 0.99  # the copy did change

    pn, po = bn["logits"].argmax(1), bo["logits"].argmax(1)
    changed = np.flatnonzero(pn != po)
    assert len(changed) > 0, "the fine-tune changed no prediction: the test would check nothing"
    np.testing.assert_array_equal(r.arrays["pred.changed"], np.stack([changed, pn[changed], po[changed]], 1))
    p = r.meta["predictions"]
    assert p["changed"] == len(changed) and p["listed"] == min(3, len(changed))
    y = labels.numpy()
    for c, row in enumerate(p["per_class"]):
        assert row["new"] == pytest.approx((pn[y == c] == c).mean()) and row["old"] == pytest.approx((po[y == c] == c).mean())
    assert p["accuracy"]["new"] == pytest.approx((pn == y).mean())

    shared = [len(a & b) / 10 for a, b in zip(nearest_sets(bn["codes"], 10), nearest_sets(bo["codes"], 10))]
    np.testing.assert_allclose(r.arrays["codes.shared"], shared)
    assert r.meta["codes"]["shared_mean"] == pytest.approx(np.mean(shared))
    assert r.meta["codes"]["neighbours"] == 10


def test_sample_is_capped_seeded_and_stratified(tmp_path, tiny_checkpoint, make_images, paths):
    images = _images(tmp_path, make_images, n=30)
    ctx, results = _results(tiny_checkpoint, tiny_checkpoint, images, paths["tiny_arch"],
                            compare={"checkpoint": str(tiny_checkpoint), "sample": 12, "seed": 3})
    top = results["topk"]
    sample = top.arrays["sample.images"]
    assert len(sample) == 12 and list(sample) == sorted(set(sample.tolist()))
    assert np.bincount(ctx.images.labels[sample]).tolist() == [4, 4, 4]
    x = _pixels(ctx)
    bf = brute_force(ctx.net, x, ["conv1"])
    np.testing.assert_allclose(top.arrays["sample.new.L0"], bf["maxima"]["conv1"][sample], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(top.arrays["sample.new.L0"], top.arrays["sample.old.L0"])
    _, again = _results(tiny_checkpoint, tiny_checkpoint, images, paths["tiny_arch"],
                        compare={"checkpoint": str(tiny_checkpoint), "sample": 12, "seed": 3})
    np.testing.assert_array_equal(again["topk"].arrays["sample.images"], sample)


def test_killed_comparison_resumes_from_its_checkpoint(tmp_path, tiny_checkpoint, make_images, paths):
    """The dataset pass of both models resumes after a kill with the per-image arrays it had."""
    from sitegen.passes.compare import CompareTopKPass

    images = _images(tmp_path, make_images, n=30)
    cfg = from_dict({"model": {"arch": paths["tiny_arch"]}, "compare": {"checkpoint": str(tiny_checkpoint)},
                     "topk": {"k": 5, "batch_size": 4, "checkpoint_every": 8}, **OFF})
    ctx = prepare(tiny_checkpoint, images, cfg, None)
    p = CompareTopKPass(cfg.topk, cfg.compare, cfg.tsne)
    ctx.scratch = tmp_path / "partial"
    calls = []

    def die(_m, _i):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    handle = ctx.compare.model.register_forward_pre_hook(die)
    with pytest.raises(KeyboardInterrupt):
        p.run(ctx)
    handle.remove()
    assert (tmp_path / "partial" / "rank0.npz").is_file()
    resumed = p.run(ctx)
    ctx.scratch = None
    fresh = p.run(ctx)
    assert resumed.arrays.keys() == fresh.arrays.keys()
    for key in fresh.arrays:
        np.testing.assert_array_equal(resumed.arrays[key], fresh.arrays[key], err_msg=key)


# ------------------------------------------------------------------ a checkpoint that does not fit


def test_checkpoint_of_another_width_fails_before_any_output(tmp_path, tiny_checkpoint, make_images, paths, capsys):
    images = _images(tmp_path, make_images, n=6)
    wide = tmp_path / "wide.pt"
    torch.save(build_architecture(_arch(paths, "wide_tiny_cnn"), None).state_dict(), wide)
    out, cache = tmp_path / "site", tmp_path / "cache"
    with pytest.raises(SystemExit) as e:
        main(["build", str(tiny_checkpoint), "--images", str(images), "--arch", paths["tiny_arch"],
              "--compare", str(wide), "-o", str(out), "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "wide.pt does not fit" in err and "'conv1.weight'" in err
    assert "(6, 3, 3, 3)" in err and "(4, 3, 3, 3)" in err  # both shapes
    assert "hint:" in err
    assert not out.exists() and not cache.exists()
