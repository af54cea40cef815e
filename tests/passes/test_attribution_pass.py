"""The attribution pass against direct, one-unit-at-a-time attribute() calls on the real ResNet-20."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sitegen.attribution import attribute, normalise_for_display
from sitegen.build import prepare
from sitegen.config import AttributionConfig, from_dict
from sitegen.errors import ConfigError
from sitegen.images import load_pixels, normalise
from sitegen.passes import default_passes
from sitegen.passes.attribution import AttributionPass, activation_report, plan_layer, unit_crops
from sitegen.passes.base import Result
from sitegen.passes.topk import TopKPass, channel_top
from sitegen.crops import crop_box, display_box, resize_square

# layer1.0.conv1: a 5-px field, so windows cross the image border; layer2.2: a 37-px field on 32-px
# images, so the window is capped to the image's size (display_box) and may be off-centre.
LAYERS = ["layer1.0.conv1", "layer2.2"]
K = 4


@pytest.fixture(scope="module")
def built(resnet20_path, cifar_subset, paths):
    cfg = from_dict({"layers": LAYERS, "model": {"arch": f"{paths['cifar_arch']}:resnet20"}, "topk": {"k": K}})
    ctx = prepare(resnet20_path, cifar_subset(10), cfg, None)
    ctx.results["topk"] = TopKPass(cfg.topk).run(ctx)
    result = AttributionPass(cfg.attribution).run(ctx)
    return ctx, result


def _direct(ctx, layer: str, channel: int, j: int, method: str) -> np.ndarray:
    """One unit, one image, one attribute() call; cropped and normalised independently of the pass."""
    top = channel_top(ctx.results["topk"], layer, channel)
    i, y, x = int(top.images[j]), int(top.y[j]), int(top.x[j])
    inputs = normalise(load_pixels(ctx.images, i, ctx.config.data)[None], ctx.config.data)
    grad = attribute(ctx.net, inputs, layer, [(channel, y, x)], method)[0].numpy()
    x0, y0, x1, y1 = display_box(ctx.layer(layer).rf.box(y, x), ctx.input_size)
    pad = 64  # larger than any window here: plain slicing of a zero-padded copy
    padded = np.pad(grad, ((0, 0), (pad, pad), (pad, pad)))
    crop = padded[:, y0 + pad:y1 + pad, x0 + pad:x1 + pad]
    return normalise_for_display(crop)


def test_stored_crops_equal_direct_attribute_calls(built):
    ctx, result = built
    assert result.meta["methods"] == ["guided", "deconvnet", "gradient"]
    checked = 0
    for layer in LAYERS:
        info = ctx.layer(layer)
        for channel in (0, info.channels - 1):
            top = channel_top(ctx.results["topk"], layer, channel)
            for method in result.meta["methods"]:
                stored = unit_crops(result, layer, channel, method)
                assert stored.shape[0] == K and stored.dtype == np.uint8
                for j in range(len(top.images)):
                    want = _direct(ctx, layer, channel, j, method)
                    # The same window as the patch the sprite draws for this entry.
                    box = display_box(info.rf.box(int(top.y[j]), int(top.x[j])), ctx.input_size)
                    patch = crop_box(load_pixels(ctx.images, int(top.images[j]), ctx.config.data), box)
                    assert stored[j].shape == want.shape == patch.shape, (layer, channel, j)
                    # Batched and single-image convolutions may round differently in the last bit.
                    diff = np.abs(stored[j].astype(int) - want.astype(int))
                    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (layer, channel, method, j)
                    checked += 1
    assert checked == 2 * 2 * 3 * K


def test_windows_cross_the_border_and_attributions_are_not_blank(built):
    ctx, result = built
    windows = dict(zip(result.meta["layers"], result.meta["windows"]))
    assert windows == {"layer1.0.conv1": 5, "layer2.2": 32}  # 37-px field capped to the 32-px image
    for li, layer in enumerate(result.meta["layers"]):
        for method in result.meta["methods"]:
            crops = result.arrays[f"L{li}.{method}"]
            # Top units respond strongly, so (nearly) every attribution has some non-grey pixel.
            assert (crops.reshape(crops.shape[0] * K, -1) != 128).any(axis=1).mean() > 0.9, (layer, method)


def test_meta_lists_the_activations_the_rules_meet(built):
    """ResNet-20 calls F.relu 19 times (stem, two per block); every kind has its rule, no layer is affected."""
    _, result = built
    report = activation_report(result)
    assert [(k.kind, k.calls, k.count, k.ruled) for k in report.kinds] == [("relu", ("F.relu",), 19, True)]
    assert report.affected == {}


def test_result_saves_and_loads_without_pickle(built, tmp_path):
    _, result = built
    result.save(tmp_path / "r")
    back = Result.load(tmp_path / "r")
    assert back.meta == result.meta
    assert set(back.arrays) == set(result.arrays)
    for key, arr in result.arrays.items():
        assert back.arrays[key].dtype == np.uint8
        np.testing.assert_array_equal(back.arrays[key], arr)


def test_cache_key_follows_methods_and_topk(built):
    ctx, _ = built
    key = lambda **kw: AttributionPass(AttributionConfig(**kw)).cache_key(ctx)  # noqa: E731
    assert key() == key()
    assert key(methods=("guided",)) != key()
    assert key(methods=("deconvnet", "guided", "gradient")) != key()  # order = the page's row order
    assert key(max_side=16) != key()
    topk = ctx.results["topk"]
    before = key()
    other = Result(meta=dict(topk.meta), arrays=dict(topk.arrays))
    other.arrays["L0.images"] = topk.arrays["L0.images"][:, ::-1].copy()  # other top images
    ctx.results["topk"] = other
    try:
        assert key() != before
    finally:
        ctx.results["topk"] = topk


def test_missing_entries_stay_grey_and_large_windows_shrink(built):
    """One layer, gradient only: a slot without an image is plain grey; max_side shrinks crops
    exactly as the sprite shrinks patches (box filter of the normalised window)."""
    ctx, _ = built
    topk = ctx.results["topk"]
    li = topk.meta["layers"].index("layer2.2")
    arrays = {f"L0.{k}": topk.arrays[f"L{li}.{k}"].copy() for k in ("values", "images", "y", "x")}
    arrays["L0.values"][:, K - 1] = -np.inf  # as when fewer than k images could be used
    sub = Result(meta={**topk.meta, "layers": ["layer2.2"]}, arrays=arrays)
    ctx2 = dataclasses.replace(ctx, results={"topk": sub})
    r = AttributionPass(AttributionConfig(methods=("gradient",), max_side=12)).run(ctx2)
    assert r.meta["windows"] == [32] and r.meta["sides"] == [12]
    crops = r.arrays["L0.gradient"]
    assert crops.shape == (ctx.layer("layer2.2").channels, K, 12, 12, 3)
    assert (crops[:, K - 1] == 128).all()
    for channel in (1, 17):
        want = resize_square(_direct(ctx2, "layer2.2", channel, 0, "gradient"), 12)
        assert np.abs(crops[channel, 0].astype(int) - want.astype(int)).max() <= 1


def test_model_left_as_found(built):
    ctx, _ = built
    net = ctx.net
    net.train()
    flags = [p.requires_grad for p in net.parameters()]
    sub = Result(meta={**ctx.results["topk"].meta, "layers": ["layer1.0.conv1"]},
                 arrays={f"L0.{k}": ctx.results["topk"].arrays[f"L0.{k}"] for k in ("values", "images", "y", "x")})
    try:
        AttributionPass(AttributionConfig(methods=("guided",))).run(dataclasses.replace(ctx, results={"topk": sub}))
        assert all(m.training for m in net.modules())
        assert [p.requires_grad for p in net.parameters()] == flags
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    finally:
        net.eval()


def test_needs_the_topk_result(built):
    ctx, _ = built
    with pytest.raises(Exception, match="top-k"):
        AttributionPass(AttributionConfig()).run(dataclasses.replace(ctx, results={}))


@pytest.mark.parametrize("table, key", [
    ({"methods": ["guided", "smoothgrad"]}, "attribution.methods[1]"),
    ({"methods": []}, "attribution.methods"),
    ({"methods": ["guided", "guided"]}, "attribution.methods"),
    ({"batch_size": -1}, "attribution.batch_size"),
    ({"max_side": 4}, "attribution.max_side"),
])
def test_config_errors_name_the_key(table, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        from_dict({"attribution": table})


def test_default_passes_run_it_after_topk_unless_disabled():
    names = [p.name for p in default_passes(from_dict({}))]
    assert names.index("attribution") == names.index("topk") + 1
    off = [p.name for p in default_passes(from_dict({"attribution": {"enabled": False}}))]
    assert "attribution" not in off


@pytest.fixture(scope="module")
def small(built):
    """One layer, two methods, batches of at most 16 images (64 units in 7 work items: an image's
    units stay together, a batch's images have as many units each); and the result of an
    uninterrupted run without scratch."""
    ctx, _ = built
    topk = ctx.results["topk"]
    sub = Result(meta={**topk.meta, "layers": ["layer1.0.conv1"]},
                 arrays={f"L0.{k}": topk.arrays[f"L0.{k}"] for k in ("values", "images", "y", "x")})
    ctx2 = dataclasses.replace(ctx, results={"topk": sub}, scratch=None)
    p = AttributionPass(AttributionConfig(methods=("guided", "gradient"), batch_size=16))
    return ctx2, p, p.run(ctx2)


def _count_batches(monkeypatch, fail_after: int | None = None) -> list[int]:
    """The first pair index of every batch the pass computes; raises after ``fail_after`` batches."""
    calls: list[int] = []
    real = AttributionPass._batch

    def wrapped(self, ctx, plan, s, *args):
        if fail_after is not None and len(calls) >= fail_after:
            raise RuntimeError("killed")
        calls.append(s.start)
        return real(self, ctx, plan, s, *args)

    monkeypatch.setattr(AttributionPass, "_batch", wrapped)
    return calls


def _assert_same(a, b):
    assert a.meta == b.meta and set(a.arrays) == set(b.arrays)
    for key in a.arrays:
        assert a.arrays[key].dtype == b.arrays[key].dtype and np.array_equal(a.arrays[key], b.arrays[key]), key


def _killed_run(ctx, p, monkeypatch, after: int) -> None:
    """Run the pass and kill it once ``after`` batches are done (their item files stay behind)."""
    with monkeypatch.context() as m:
        _count_batches(m, fail_after=after)
        with pytest.raises(RuntimeError, match="killed"):
            p.run(ctx)


def _starts(ctx, batch: int) -> list[slice]:
    """The batches the pass cuts layer1.0.conv1 into (computed here from the plan, as the pass does)."""
    plan = plan_layer(ctx, ctx.results["topk"], 0, AttributionConfig().max_side)
    return plan.batches(batch)


@pytest.mark.usefixtures("inline_items")
def test_resumes_finished_batches_after_a_kill(small, tmp_path, monkeypatch):
    ctx, p, whole = small
    ctx = dataclasses.replace(ctx, scratch=tmp_path / "attribution-key.partial")
    batches = _starts(ctx, 16)
    assert len(batches) >= 4
    _killed_run(ctx, p, monkeypatch, after=2)
    assert sorted(f.name for f in ctx.scratch.iterdir()) == ["item0.npz", "item1.npz"]
    calls = _count_batches(monkeypatch)
    resumed = p.run(ctx)
    assert calls == [s.start for s in batches[2:]]  # only the batches not finished before the kill
    _assert_same(resumed, whole)
    assert not ctx.scratch.exists()


@pytest.mark.usefixtures("inline_items")
def test_a_damaged_batch_file_is_recomputed(small, tmp_path, monkeypatch):
    ctx, p, whole = small
    ctx = dataclasses.replace(ctx, scratch=tmp_path / "attribution-key.partial")
    batches = _starts(ctx, 16)
    _killed_run(ctx, p, monkeypatch, after=3)
    data = (ctx.scratch / "item0.npz").read_bytes()
    (ctx.scratch / "item0.npz").write_bytes(data[: len(data) // 2])  # truncated by a crash
    calls = _count_batches(monkeypatch)
    resumed = p.run(ctx)
    assert calls == [0] + [s.start for s in batches[3:]]
    _assert_same(resumed, whole)
    assert not ctx.scratch.exists()


@pytest.mark.usefixtures("inline_items")
def test_items_saved_with_another_batch_size_are_not_reused(small, tmp_path, monkeypatch):
    """The default batch size follows the free memory, so a resumed run may cut its batches
    differently: an item saved under the same index but for other pairs must not be reused; one
    with the very same pairs may be."""
    ctx, p, whole = small
    ctx = dataclasses.replace(ctx, scratch=tmp_path / "attribution-key.partial")
    saved = _starts(ctx, 16)[:3]
    _killed_run(ctx, p, monkeypatch, after=3)
    other = AttributionPass(AttributionConfig(methods=("guided", "gradient"), batch_size=1))
    cut = _starts(ctx, 1)
    # One image per batch: the first two items hold one image each in both cuts, the third not.
    assert cut[:2] == saved[:2] and cut[2] != saved[2]
    calls = _count_batches(monkeypatch)
    resumed = other.run(ctx)
    assert calls == [s.start for s in cut[2:]]  # item 2's file names other pairs: recomputed
    _assert_same(resumed, whole)


def test_batches_keep_images_whole_and_equal_in_units():
    """A hand-made plan: images 5 (3 units), 8 and 2 (2 each), then 4 images of 1 unit.  Batches of
    at most 2 images: each image's units in one batch, a batch's images with as many units each."""
    image = np.array([5, 5, 5, 8, 8, 2, 2, 1, 3, 6, 7])
    n = len(image)
    zeros = np.zeros(n, np.int64)
    from sitegen.passes.attribution import LayerPlan

    plan = LayerPlan(0, "x", 4, 5, 5, zeros, zeros, image, zeros, zeros, zeros, zeros)
    got = [(s.start, s.stop) for s in plan.batches(2)]
    assert got == [(0, 3), (3, 7), (7, 9), (9, 11)]
    assert [(s.start, s.stop) for s in plan.batches(100)] == [(0, 3), (3, 7), (7, 11)]
    for s in plan.batches(3):
        ids, counts = np.unique(plan.image[s], return_counts=True)
        assert len(ids) <= 3 and len(set(counts.tolist())) == 1
        assert np.isin(image, ids).sum() == s.stop - s.start  # no unit of these images elsewhere
    assert LayerPlan(0, "x", 4, 5, 5, *[np.zeros(0, np.int64)] * 7).batches(2) == []


# ---------------------------------------------------------------- deconvnet computed once per picture

def _unshared(ctx, cfg, monkeypatch):
    """The pass with the shortcut off: every unit's deconvnet computed from its own image."""
    from sitegen.attribution import Independence
    from sitegen.passes import attribution as pass_module

    with monkeypatch.context() as m:
        m.setattr(pass_module, "image_independent", lambda *a, **k: Independence(False, "off for the test"))
        return AttributionPass(cfg).run(ctx)


def test_deconvnet_shared_pictures_equal_the_per_unit_ones_without_max_pooling(built, monkeypatch):
    """ResNet-20 has no max-pooling, so deconvnet's picture is the same on every image: the pass
    computes it once per channel (inside the image) or per position (at the border) and copies it.
    Every copied crop equals the unit's own computation, and the count of computed pictures is
    derived here from the receptive fields, independently of the pass."""
    ctx, shared = built
    plain = _unshared(ctx, AttributionConfig(), monkeypatch)
    assert plain.meta["shared"] == {}
    meta = shared.meta["shared"]
    assert "layer1.0.conv1" in meta
    h, w = ctx.input_size
    for li, layer in enumerate(LAYERS):
        a, b = shared.arrays[f"L{li}.deconvnet"], plain.arrays[f"L{li}.deconvnet"]
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99, layer
        for m in ("guided", "gradient"):  # the other methods are computed as before
            assert np.array_equal(shared.arrays[f"L{li}.{m}"], plain.arrays[f"L{li}.{m}"])
        rf, plan = ctx.layer(layer).rf, plan_layer(ctx, ctx.results["topk"], li, 64)
        keys = set()
        translated = meta[layer]["translated"] if layer in meta else True
        for c, y, x in zip(plan.c.tolist(), plan.y.tolist(), plan.x.tolist()):
            x0, y0, x1, y1 = rf.box(y, x)
            keys.add((c,) if translated and x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h else (c, y, x))
        if layer in meta:
            assert meta[layer]["computed"] == len(keys) and meta[layer]["units"] == len(plan)
        else:  # a 37-px field on 32-px images: every unit at the border, too few share to be worth it
            assert len(keys) > 0.9 * len(plan), layer
    # a 5-px field on 32-px images: most units lie inside, one picture per channel serves them all
    first = meta["layer1.0.conv1"]
    assert first["translated"] and first["computed"] < 0.7 * first["units"]
    assert "same for every image" in first["reason"]


def test_deconvnet_is_computed_per_unit_through_max_pooling(tmp_path, paths, make_images, tiny_checkpoint, monkeypatch):
    """Max-pooling's backward follows the forward's switches: behind it (conv2) no sharing, every unit
    computed; before it (conv1) shared, and equal to the per-unit computation."""
    cfg = from_dict({"model": {"arch": paths["tiny_arch"]}, "topk": {"k": 3}})
    make_images(tmp_path / "imgs", 6)
    ctx = prepare(tiny_checkpoint, tmp_path / "imgs", cfg, None)
    ctx.results["topk"] = TopKPass(cfg.topk).run(ctx)
    result = AttributionPass(cfg.attribution).run(ctx)
    assert list(result.meta["shared"]) == ["conv1"]
    plain = _unshared(ctx, cfg.attribution, monkeypatch)
    for key in result.arrays:
        diff = np.abs(result.arrays[key].astype(int) - plain.arrays[key].astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99, key


def test_a_pool_of_workers_gives_the_one_thread_crops(small, pooled_and_inline):
    ctx, p, _ = small
    pooled, inline = pooled_and_inline(lambda: p.run(ctx))
    _assert_same(pooled, inline)
