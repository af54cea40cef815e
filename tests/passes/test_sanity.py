"""The sanity pass: similarity measures against independent computations, the derived image
independence, the re-initialised copies, the user's model untouched, determinism, and the ordering
of the methods measured on the shared trained ResNet-20."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from sitegen.config import SanityConfig, from_dict
from sitegen.passes.base import Result

TINY = Path(__file__).resolve().parents[1] / "tiny_models.py"
CIFAR_ARCH = Path(__file__).resolve().parents[1] / "cifar_resnet.py"


# ---------------------------------------------------------------- the similarity measures


def test_spearman_matches_scipy_with_ties_and_the_blank_convention():
    from scipy.stats import spearmanr

    from sitegen.passes.sanity import spearman

    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.integers(0, 4, size=(6, 7)).astype(float)  # many ties
        b = rng.normal(size=(6, 7)) + a
        assert spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)
    a = rng.normal(size=20)
    assert spearman(a, a) == 1.0 and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, 3 * a ** 3 + 1) == pytest.approx(1.0)  # ranks only
    assert spearman(np.zeros(20), a) == 0.0  # a blank picture has no ranking in common with another
    assert spearman(np.zeros(20), np.zeros(20)) == 1.0  # two blank pictures are the same picture


def _ssim_brute(a: np.ndarray, b: np.ndarray, w: int) -> float:
    """Wang et al.'s SSIM with a uniform w×w window, position by position, sample (co)variances."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - w + 1):
        for j in range(a.shape[1] - w + 1):
            x, y = a[i:i + w, j:j + w].ravel(), b[i:i + w, j:j + w].ravel()
            mx, my = x.mean(), y.mean()
            vx, vy = x.var(ddof=1), y.var(ddof=1)
            cxy = ((x - mx) * (y - my)).sum() / (x.size - 1)
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


@pytest.mark.parametrize("side", [3, 6, 12])
def test_ssim_equals_the_definition_computed_window_by_window(side):
    from sitegen.passes.sanity import ssim

    rng = np.random.default_rng(side)
    a = rng.integers(0, 256, size=(side, side)).astype(float)
    b = np.clip(a + rng.normal(0, 40, size=a.shape), 0, 255)
    w = min(7, side - (1 - side % 2))
    assert ssim(a, b) == pytest.approx(_ssim_brute(a, b, w), rel=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)
    assert np.isnan(ssim(a[:2, :2], b[:2, :2]))  # no 3×3 window fits


def test_sobel_magnitude_of_a_vertical_step():
    from sitegen.passes.sanity import sobel_magnitude

    img = np.zeros((8, 8, 3), np.uint8)
    img[:, 4:] = 10
    mag = sobel_magnitude(img)
    # The kernel [1, 2, 1] ⊗ [-1, 0, 1] across a step of 10: 4·10 on both columns beside the step, 0 elsewhere.
    assert np.allclose(mag[:, 3:5], 40.0) and np.allclose(mag[:, :3], 0) and np.allclose(mag[:, 5:], 0)


# ---------------------------------------------------------------- running the pass on small models


def _context(tmp_path, make_images, arch: str, layers=(), **sanity):
    from sitegen.build import prepare
    from sitegen.model_loading import build_architecture

    images = tmp_path / "imgs"
    if not images.exists():
        make_images(images, 24, size=16, classes=2)
    ckpt = tmp_path / f"{arch.rsplit(':', 1)[-1]}.pt"
    torch.save(build_architecture(arch, None).state_dict(), ckpt)
    cfg = from_dict({"model": {"arch": arch}, "layers": list(layers), "sanity": sanity})
    return prepare(ckpt, images, cfg, None), cfg


def _attribution_meta(ctx, methods=("guided", "deconvnet", "gradient")) -> Result:
    """What the sanity pass reads of the attribution result (its windows and display sides),
    computed as the attribution pass does, without attributing every top-k unit."""
    from sitegen.passes.attribution import plan_layer

    topk = ctx.results["topk"]
    plans = [plan_layer(ctx, topk, li, ctx.config.attribution.max_side) for li in range(len(topk.meta["layers"]))]
    return Result(meta={"layers": list(topk.meta["layers"]), "methods": list(methods),
                        "windows": [p.window for p in plans], "sides": [p.side for p in plans], "percentile": 99.0})


def _run(ctx, cfg, methods=("guided", "deconvnet", "gradient")) -> Result:
    from sitegen.passes.sanity import SanityPass
    from sitegen.passes.topk import TopKPass

    if "topk" not in ctx.results:
        ctx.results["topk"] = TopKPass(cfg.topk).run(ctx)
    ctx.results["attribution"] = _attribution_meta(ctx, methods)
    return SanityPass(cfg.sanity).run(ctx)


def test_deconvnet_without_max_pooling_has_image_similarity_one_measured_and_proved(tmp_path, make_images,
                                                                                     monkeypatch):
    from sitegen.passes import sanity as sanity_module
    from sitegen.passes.sanity import layer_figures

    ctx, cfg = _context(tmp_path, make_images, f"{TINY}:pool_free_cnn")
    monkeypatch.setattr(sanity_module, "CROSS_CHECK", 10 ** 6)  # measure every unit, proof or not
    r = _run(ctx, cfg)
    for li, layer in enumerate(r.meta["layers"]):
        measured = r.arrays[f"L{li}.deconvnet.images"]
        assert measured.size and np.isfinite(measured).all()
        # Derived: deconvnet's backward never reads the forward here, so every image gives the same map.
        assert np.allclose(measured, 1.0, atol=1e-9), layer
        assert np.allclose(r.arrays[f"L{li}.deconvnet.ssim_images"], 1.0, atol=1e-9)
        f = layer_figures(r, layer)["methods"]
        assert f["deconvnet"]["images_proved"] and f["deconvnet"]["images"] == 1.0
        assert f["deconvnet"]["verdict"] == "fixed"
        if layer != "conv1":  # behind a ReLU: guided and gradient read the forward, and do change
            assert not f["gradient"]["images_proved"] and f["gradient"]["images_measured"] < 0.99
    # Units: each the strongest of a different channel that fires; all of them here (fewer than 16).
    for li, layer in enumerate(r.meta["layers"]):
        units = r.arrays[f"L{li}.units"]
        assert len(set(units[:, 0].tolist())) == len(units) == ctx.layer(layer).channels


@pytest.mark.usefixtures("inline_items")
def test_a_proved_method_is_measured_on_a_few_units_and_the_rest_take_the_proof(tmp_path, make_images,
                                                                               monkeypatch):
    """Deconvnet without max-pooling: the default run measures the other images of the first
    CROSS_CHECK units only and gives the rest the proved 1; every figure equals a run that measures
    every unit, and the unproved methods are measured everywhere."""
    from sitegen.passes import sanity as sanity_module

    ctx, cfg = _context(tmp_path, make_images, f"{TINY}:pool_free_cnn")
    calls: list[tuple[int, tuple[str, ...]]] = []
    real = sanity_module.attribute_pairs

    def counted(ctx_, model, layer, images, units, boxes, side, methods, *rest):
        calls.append((len(images), tuple(methods)))
        return real(ctx_, model, layer, images, units, boxes, side, methods, *rest)

    monkeypatch.setattr(sanity_module, "attribute_pairs", counted)
    quick = _run(ctx, cfg)
    short = [n for n, methods in calls if "deconvnet" not in methods]
    assert short and sum(short) > 0  # the rest of the other-image pairs ran without deconvnet
    monkeypatch.setattr(sanity_module, "CROSS_CHECK", 10 ** 6)
    full = _run(ctx, cfg)
    assert set(quick.arrays) == set(full.arrays)
    for key in quick.arrays:
        a, b = quick.arrays[key], full.arrays[key]
        if a.dtype == bool or a.dtype.kind == "i":
            assert np.array_equal(a, b), key
        else:
            assert np.allclose(a, b, atol=1e-9, equal_nan=True), key


def test_gradient_on_a_linear_network_has_image_similarity_one(tmp_path, make_images):
    ctx, cfg = _context(tmp_path, make_images, f"{TINY}:linear_cnn")
    r = _run(ctx, cfg, methods=("gradient",))
    for li, layer in enumerate(r.meta["layers"]):
        assert r.meta["proofs"][layer]["gradient"][0] is True
        assert np.allclose(r.arrays[f"L{li}.gradient.images"], 1.0, atol=1e-9)
        # The weights do matter: re-initialising them changes the pictures.
        assert np.nanmean(r.arrays[f"L{li}.gradient.cascade"]) < 0.9


def test_the_users_model_is_unchanged(tmp_path, make_images):
    ctx, cfg = _context(tmp_path, make_images, f"{TINY}:pool_free_cnn")
    net = ctx.net.train()
    net.conv2.weight.requires_grad_(False)
    calls = []
    handle = net.conv1.register_forward_hook(lambda *_: calls.append(1))
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in net.named_buffers()}
    flags = {k: v.requires_grad for k, v in net.named_parameters()}
    modes = {k: m.training for k, m in net.named_modules()}
    ids = {k: id(v) for k, v in net.named_parameters()}
    _run(ctx, cfg)
    assert {k: v.requires_grad for k, v in net.named_parameters()} == flags
    assert {k: m.training for k, m in net.named_modules()} == modes
    assert {k: id(v) for k, v in net.named_parameters()} == ids
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k]), k
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert list(net.conv1._forward_hooks) == [handle.id]  # the user's hook stays, ours are gone
    assert all(not m._forward_pre_hooks and (m is net.conv1 or not m._forward_hooks) for m in net.modules())
    handle.remove()


def test_deterministic_with_the_seed_and_cached_by_version(tmp_path, make_images):
    from sitegen.passes.sanity import SanityPass

    ctx, cfg = _context(tmp_path, make_images, f"{TINY}:pool_free_cnn", units=16, images=4, seed=3)
    a = _run(ctx, cfg)
    b = _run(ctx, cfg)
    assert a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        assert np.array_equal(a.arrays[k], b.arrays[k], equal_nan=True), k
    other_cfg = from_dict({"model": {"arch": f"{TINY}:pool_free_cnn"}, "sanity": {"seed": 4}})
    c = SanityPass(other_cfg.sanity).run(ctx)
    assert not np.array_equal(a.arrays["L2.others"], c.arrays["L2.others"])
    key = SanityPass(cfg.sanity).cache_key(ctx)

    class Next(SanityPass):
        version = SanityPass.version + 1
    assert Next(cfg.sanity).cache_key(ctx) != key
    assert SanityPass(other_cfg.sanity).cache_key(ctx) != key


def test_the_randomised_copies(tmp_path, make_images):
    from sitegen.passes.sanity import Randomiser, _seed, reinitialise

    net = copy.deepcopy(_context(tmp_path, make_images, f"{TINY}:pool_free_cnn")[0].net)
    trained = copy.deepcopy(net.state_dict())
    rand = Randomiser(net, ["conv1", "conv2", "conv3"], (3, 16, 16), seed=5)
    assert rand.before["conv2"] == ["conv1", "bn1", "conv2"]
    with rand.own("conv2") as own:
        assert not torch.equal(own.conv2.weight, net.conv2.weight)
        assert torch.equal(own.conv1.weight, net.conv1.weight) and torch.equal(own.conv3.weight, net.conv3.weight)
    for k, v in rand._own.state_dict().items():  # restored from the trained weights
        assert torch.equal(v, trained[k]), k
    rand.cascade("conv2")
    cascade = rand.cascade("conv3")  # progressive: conv1, bn1, conv2 were done for conv2 already
    fresh = copy.deepcopy(net)
    for name in ("conv1", "bn1", "conv2", "conv3"):
        reinitialise(fresh.get_submodule(name), _seed(5, "weights", name))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, cascade.state_dict()[k]), k
    assert torch.equal(cascade.bn1.running_mean, torch.zeros(6)) and torch.equal(cascade.bn1.running_var, torch.ones(6))
    assert torch.equal(cascade.fc.weight, net.fc.weight)  # after the last layer: untouched
    for k, v in net.state_dict().items():
        assert torch.equal(v, trained[k]), k
    state = torch.random.get_rng_state()
    reinitialise(fresh.conv1, 1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone


def test_modules_without_reset_parameters_are_redrawn_and_reported(tmp_path):
    from sitegen.passes.sanity import reinitialise

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((4,), 2.0) + torch.arange(4.0))

    m = Scale()
    before = m.w.detach().clone()
    assert reinitialise(m, 1) == "normal"
    assert not torch.equal(m.w, before)
    assert reinitialise(torch.nn.Conv2d(1, 1, 3), 1) == "reset_parameters"


def test_the_config_is_checked():
    from sitegen.errors import ConfigError

    for bad in ({"units": 8}, {"images": 2}, {"seed": -1}, {"batch_size": -1}):
        with pytest.raises(ConfigError, match="sanity"):
            from_dict({"sanity": bad})
    assert from_dict({}).sanity == SanityConfig()


# ---------------------------------------------------------------- the shared trained ResNet-20

STAGES = ["layer1.2", "layer2.2", "layer3.2"]
"""The last block of each stage; the pass runs on the last one (the deepest, where the published
ordering is checked), the structural proof on all of them."""


@pytest.fixture(scope="module")
def resnet20_sanity(cifar_subset, resnet20_path):
    from sitegen.build import prepare

    cfg = from_dict({"model": {"arch": f"{CIFAR_ARCH}:resnet20"}, "layers": STAGES[-1:],
                     "data": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261]}})
    ctx = prepare(resnet20_path, cifar_subset(20), cfg, None)
    return ctx, _run(ctx, cfg)


def test_resnet20_published_ordering(resnet20_sanity):
    """Measured on the shared trained ResNet-20 (16 units, 4 other images each, seed 0, the first 20
    CIFAR-10 test images per class; docs/sanity.md has the table for every stage), then pinned with
    margins about half the measured gaps."""
    from sitegen.attribution import image_independent
    from sitegen.passes.sanity import layer_figures

    ctx, r = resnet20_sanity
    last = layer_figures(r, "layer3.2")["methods"]
    # Adebayo et al.: guided backprop's pictures survive re-initialising the weights better than the
    # plain gradient's.  Measured: Spearman 0.658 against 0.464, SSIM 0.484 against 0.142.
    assert last["guided"]["weights_cascade"] > last["gradient"]["weights_cascade"] + 0.1
    assert last["guided"]["ssim_cascade"] > last["gradient"]["ssim_cascade"] + 0.15
    # The gradient's pictures there depend on the weights and on the image (measured 0.254).
    assert last["gradient"]["images"] < 0.4 and last["gradient"]["verdict"] == "both"
    # Nie et al.: without max-pooling, deconvnet cannot depend on the image: proved and measured 1.
    assert last["deconvnet"]["images_proved"] and last["deconvnet"]["verdict"] == "fixed"
    assert last["deconvnet"]["images_measured"] == pytest.approx(1.0, abs=1e-6)
    for method in ("guided", "gradient"):  # these read the ReLUs' forward signs, and do change
        assert not last[method]["images_proved"] and last[method]["images"] < 0.9
    for layer in STAGES:
        assert image_independent(ctx.net, layer, "deconvnet", (3, 32, 32))
        assert not image_independent(ctx.net, layer, "guided", (3, 32, 32))


def test_many_at_once_equals_one_by_one():
    """The pass compares each unit's picture with all its others in one call: the same figures as
    pair by pair (ties, blank pictures and an identical picture included)."""
    from sitegen.passes.sanity import spearman, spearman_many, ssim, ssim_many

    rng = np.random.default_rng(3)
    a = rng.integers(0, 6, size=(9, 9)).astype(float)  # many ties
    others = [a.copy(), -a, np.zeros_like(a), rng.integers(0, 6, size=a.shape).astype(float), 2 * a + 1,
              rng.random(a.shape)]
    got = spearman_many(a, np.stack(others))
    want = [spearman(a, b) for b in others]
    assert got[0] == 1.0 and got[2] == 0.0
    assert got == pytest.approx(want, abs=1e-12)
    assert spearman_many(np.zeros((4, 4)), np.stack([np.zeros((4, 4)), a[:4, :4]])).tolist() == [1.0, 0.0]
    grey = [np.clip(a * 40 + rng.normal(0, 30, a.shape), 0, 255) for _ in range(4)] + [a * 40]
    assert ssim_many(a * 40, np.stack(grey)) == pytest.approx([ssim(a * 40, g) for g in grey], rel=1e-12)
    assert np.isnan(ssim_many(a[:2, :2], np.stack([a[:2, :2]]))).all()


def test_a_pool_of_workers_gives_the_one_thread_figures(tmp_path, make_images, pooled_and_inline):
    # Every layer an item; each worker re-initialises its own copies as it goes deeper.
    ctx, cfg = _context(tmp_path, make_images, f"{TINY}:pool_free_cnn")
    pooled, inline = pooled_and_inline(lambda: _run(ctx, cfg))
    assert len(pooled.meta["layers"]) >= 3
    assert pooled.meta == inline.meta and set(pooled.arrays) == set(inline.arrays)
    for key in pooled.arrays:
        assert np.array_equal(pooled.arrays[key], inline.arrays[key], equal_nan=True), key
