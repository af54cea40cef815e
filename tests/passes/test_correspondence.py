"""Layer correspondence: Jaccard overlaps against Python sets, stage boundaries, shortcut probes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sitegen.build import prepare
from sitegen.config import from_dict
from sitegen.layers import LayerInfo, ReceptiveField
from sitegen.passes.correspondence import (CorrespondenceConfig, CorrespondencePass, best_matches,
                                           carried_channels, jaccard, stage_boundaries, topk_sets)
from sitegen.passes.topk import TopKPass, channel_top

INF = float("-inf")


def cifar_resnet():
    path = Path(__file__).resolve().parents[1] / "cifar_resnet.py"
    spec = importlib.util.spec_from_file_location("cifar_resnet_for_correspondence", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def as_sets(values, images):
    return [{int(i) for v, i in zip(vr, ir) if np.isfinite(v) and v > 0} for vr, ir in zip(values, images)]


def test_jaccard_on_hand_made_sets():
    # Layer A: 3 channels, layer B: 4 channels, k = 4, 20 images.
    va = np.array([[5, 4, 3, 2], [9, 8, 0, 0], [1, 1, INF, INF]], dtype=np.float32)
    ia = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [0, 10, 0, 0]])
    vb = np.array([[3, 2, 1, 1], [7, 6, 5, 4], [0, 0, 0, 0], [2, 2, 2, 2]], dtype=np.float32)
    ib = np.array([[2, 3, 4, 5], [10, 0, 11, 12], [0, 1, 2, 3], [0, 1, 2, 3]])
    # By hand: A0={0,1,2,3} A1={4,5} (zeros dropped) A2={0,10} (-inf slots dropped);
    # B0={2,3,4,5} B1={10,0,11,12} B2={} (never fires) B3={0,1,2,3}.
    expected = np.array([
        [2 / 6, 1 / 7, 0.0, 1.0],
        [2 / 4, 0.0, 0.0, 0.0],
        [0.0, 2 / 4, 0.0, 1 / 5],
    ])
    inter, jac = jaccard(topk_sets(va, ia, 20), topk_sets(vb, ib, 20))
    np.testing.assert_allclose(jac, expected)
    np.testing.assert_array_equal(inter, [[2, 1, 0, 4], [2, 0, 0, 0], [0, 2, 0, 1]])
    match, overlap, shared = best_matches(inter, jac, 3)
    np.testing.assert_array_equal(match, [[3, 0, 1], [0, -1, -1], [1, 3, -1]])
    np.testing.assert_allclose(overlap, [[1.0, 2 / 6, 1 / 7], [0.5, 0, 0], [0.5, 0.2, 0]], rtol=1e-6)
    np.testing.assert_array_equal(shared, [[4, 2, 1], [2, 0, 0], [2, 1, 0]])


def test_jaccard_against_python_sets_random():
    rng = np.random.default_rng(1)
    n, k = 30, 5
    def random_layer(c):
        images = np.stack([rng.choice(n, k, replace=False) for _ in range(c)])
        values = rng.normal(size=(c, k)).astype(np.float32)
        values[rng.random((c, k)) < 0.1] = INF
        return values, images
    (va, ia), (vb, ib) = random_layer(12), random_layer(9)
    inter, jac = jaccard(topk_sets(va, ia, n), topk_sets(vb, ib, n))
    sa, sb = as_sets(va, ia), as_sets(vb, ib)
    for i, a in enumerate(sa):
        for j, b in enumerate(sb):
            union = len(a | b)
            assert inter[i, j] == len(a & b)
            assert jac[i, j] == pytest.approx(len(a & b) / union if union else 0.0)
    match, overlap, _ = best_matches(inter, jac, 4)
    for i in range(len(sa)):
        ranked = sorted(range(len(sb)), key=lambda j: (-jac[i, j], j))  # ties: lower channel
        want = [j for j in ranked[:4] if jac[i, j] > 0]
        assert [int(m) for m in match[i] if m >= 0] == want


def _info(name, kind="block", stage="", block=-1, channels=4):
    return LayerInfo(name, kind, (channels, 4, 4), ReceptiveField(3, 1, -1), stage=stage, block=block)


def test_stage_boundaries_need_both_ends_selected():
    layers = [_info("conv1", "conv"), _info("layer1.0", stage="layer1", block=0),
              _info("layer1.1.conv1", "conv", stage="layer1", block=1), _info("layer1.1", stage="layer1", block=1),
              _info("layer2.0", stage="layer2", block=0), _info("layer2.1", stage="layer2", block=1),
              _info("layer3.0", stage="layer3", block=0)]
    every = [l.name for l in layers]
    pairs = [(a.name, b.name) for a, b in stage_boundaries(layers, every)]
    assert pairs == [("layer1.1", "layer2.0"), ("layer2.1", "layer3.0")]
    pairs = [(a.name, b.name) for a, b in stage_boundaries(layers, ["layer1.0", "layer2.0", "layer3.0"])]
    assert pairs == []  # layer1.1 (the real last block of layer1) is not selected


def test_carried_channels_of_shortcuts():
    cr = cifar_resnet()
    # Option A (subsample and zero-pad 16 -> 32 channels): channel c lands on c + 32 // 4.
    block = nn.Sequential(cr.BasicBlock(16, 32, stride=2))
    carried, how = carried_channels(block, "0", 16, 32)
    np.testing.assert_array_equal(carried, np.arange(16) + 8)
    assert "c + 8" in how
    same = nn.Sequential(cr.BasicBlock(16, 16, stride=1))  # empty Sequential shortcut: identity
    carried, how = carried_channels(same, "0", 16, 16)
    np.testing.assert_array_equal(carried, np.arange(16))
    assert how == "identity shortcut"
    from torchvision.models.resnet import BasicBlock as TvBlock

    proj = nn.Sequential(TvBlock(8, 16, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16))))
    carried, how = carried_channels(proj, "0", 8, 16)
    assert (carried == -1).all() and "projection" in how
    plain = nn.Sequential(TvBlock(8, 8))  # downsample=None: identity
    carried, how = carried_channels(plain, "0", 8, 8)
    np.testing.assert_array_equal(carried, np.arange(8))


def test_pass_matches_brute_force_on_the_dataset_pass(tmp_path, tiny_checkpoint, make_images, paths):
    make_images(tmp_path / "imgs", 40, size=16, classes=2)
    cfg = from_dict({"model": {"arch": paths["tiny_arch"]}, "topk": {"k": 6}})
    ctx = prepare(tiny_checkpoint, tmp_path / "imgs", cfg, None)
    ctx.results["topk"] = TopKPass(cfg.topk).run(ctx)
    r = CorrespondencePass(CorrespondenceConfig(matches=3, topk=cfg.topk)).run(ctx)
    assert r.meta["previous"] == [None, "conv1"] and r.meta["boundaries"] == []
    sets = {n: [{int(i) for i, v in zip(t.images, t.values) if v > 0}
                for t in (channel_top(ctx.results["topk"], n, c) for c in range(ctx.layer(n).channels))]
            for n in ("conv1", "conv2")}
    for c, a in enumerate(sets["conv2"]):
        jac = [len(a & b) / len(a | b) if a | b else 0.0 for b in sets["conv1"]]
        want = [j for j in sorted(range(len(jac)), key=lambda j: (-jac[j], j))[:3] if jac[j] > 0]
        got = [int(m) for m in r.arrays["L1.match"][c] if m >= 0]
        assert got == want
        np.testing.assert_allclose(r.arrays["L1.overlap"][c][:len(want)], [jac[j] for j in want], rtol=1e-6)


def test_pass_boundary_table_on_a_residual_net(tmp_path, make_images):
    """ResNet-20 (random weights) with option-A shortcuts: the table's carried channel is c + 8, and
    each overlap is the Jaccard index of the two channels' sets."""
    cr = cifar_resnet()
    torch.manual_seed(0)
    ckpt = tmp_path / "r20.pt"
    torch.save({"state_dict": cr.resnet20().state_dict()}, ckpt)
    make_images(tmp_path / "imgs", 30, size=16)
    arch = f"{Path(__file__).resolve().parents[1] / 'cifar_resnet.py'}:resnet20"
    cfg = from_dict({"model": {"arch": arch}, "layers": ["layer1.2", "layer2.0"], "topk": {"k": 5}})
    ctx = prepare(ckpt, tmp_path / "imgs", cfg, None)
    ctx.results["topk"] = TopKPass(cfg.topk).run(ctx)
    r = CorrespondencePass(CorrespondenceConfig(topk=cfg.topk)).run(ctx)
    assert [(b["from"], b["to"]) for b in r.meta["boundaries"]] == [("layer1.2", "layer2.0")]
    np.testing.assert_array_equal(r.arrays["B0.carried"], np.arange(16) + 8)
    top = ctx.results["topk"]
    sa = as_sets(top.arrays["L0.values"], top.arrays["L0.images"])
    sb = as_sets(top.arrays["L1.values"], top.arrays["L1.images"])
    for c in range(16):
        a, b = sa[c], sb[c + 8]
        want = len(a & b) / len(a | b) if a | b else 0.0
        assert r.arrays["B0.carried_overlap"][c] == pytest.approx(want)
        best = max((len(a & s) / len(a | s) if a | s else 0.0) for s in sb)
        assert r.arrays["B0.best_overlap"][c] == pytest.approx(best)
