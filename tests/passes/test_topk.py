"""The dataset pass against brute force: every activation kept, sorted, for every channel."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sitegen.build import prepare
from sitegen.config import from_dict
from sitegen.hooks import capture_outputs, model_guard
from sitegen.passes import topk as topk_mod
from sitegen.passes.topk import TopKPass, channel_top, stable_top


def brute_force(ctx, k):
    """All activations of every selected layer for every image, then a full sort per channel."""
    names = [l.name for l in ctx.layers]
    maps = {n: [] for n in names}
    ids = []
    with model_guard(ctx.net), torch.no_grad(), capture_outputs(ctx.net, names) as store:
        for batch in ctx.batches(batch_size=1):  # one image at a time: independent of batching
            if not bool(batch.ok.all()):
                continue
            ctx.net(batch.inputs)
            ids.append(int(batch.indices[0]))
            for n in names:
                maps[n].append(store[n][0].clone())
    out = {}
    for n in names:
        a = torch.stack(maps[n])  # (N, C, H, W)
        flat = a.flatten(2)
        maxima = flat.amax(2)  # (N, C)
        first_pos = (flat == maxima[..., None]).float().argmax(2)  # first occurrence
        out[n] = {"maxima": maxima.numpy(), "pos": first_pos.numpy(), "ids": np.array(ids),
                  "means": flat.mean(2).numpy(), "w": a.shape[3]}
    return out


def check_against(ctx, result, bf, k, atol=1e-4):
    for n, ref in bf.items():
        maxima, ids = ref["maxima"], ref["ids"]
        for c in range(maxima.shape[1]):
            # Sort by value descending, then image index ascending (the documented tie-break).
            order = np.lexsort((ids, -maxima[:, c]))[:k]
            got = channel_top(result, n, c)
            np.testing.assert_allclose(got.values, maxima[order, c], atol=atol, rtol=1e-5)
            same = got.images == ids[order]
            # Where float noise between batch sizes could swap two near-equal values, accept either.
            for j in np.nonzero(~same)[0]:
                assert abs(got.values[j] - maxima[order[j], c]) < atol, (n, c, j)
            for j in np.nonzero(same)[0]:
                row = list(ids).index(got.images[j])
                pos = ref["pos"][row, c]
                assert (got.y[j], got.x[j]) == (pos // ref["w"], pos % ref["w"]), (n, c, j)


def test_tiny_model_equals_brute_force_across_windows(tmp_path, tiny_checkpoint, make_images, paths, monkeypatch):
    make_images(tmp_path / "imgs", 53, size=16, classes=3)
    cfg = from_dict({"model": {"arch": paths["tiny_arch"]}, "topk": {"k": 5, "batch_size": 7}})
    ctx = prepare(tiny_checkpoint, tmp_path / "imgs", cfg, None)
    assert [l.name for l in ctx.layers] == ["conv1", "conv2"]
    monkeypatch.setattr(topk_mod, "WINDOW_IMAGES", 10)  # several merges, windows not batch-aligned
    result = TopKPass(cfg.topk).run(ctx)
    check_against(ctx, result, brute_force(ctx, 5), 5, atol=1e-5)


def test_ties_go_to_the_lower_image_index(tmp_path, tiny_checkpoint, make_images, paths):
    made = make_images(tmp_path / "imgs", 4, size=16)
    # Duplicates of image 0 at later indices: equal values everywhere.
    for j in range(4, 12):
        (tmp_path / "imgs" / f"img{j:03d}.png").write_bytes(made[0].read_bytes())
    cfg = from_dict({"model": {"arch": paths["tiny_arch"]}, "topk": {"k": 3, "batch_size": 5}})
    ctx = prepare(tiny_checkpoint, tmp_path / "imgs", cfg, None)
    result = TopKPass(cfg.topk).run(ctx)
    for layer in ("conv1", "conv2"):
        for c in range(ctx.layer(layer).channels):
            top = channel_top(result, layer, c)
            for a, b in zip(top.values[:-1], top.values[1:]):
                assert a >= b
            for j in range(len(top.values) - 1):
                if top.values[j] == top.values[j + 1]:
                    assert top.images[j] < top.images[j + 1]
            if 0 in top.images:  # image 0 and its copies: only the lowest copies can appear
                dup = [i for i in top.images if i == 0 or i >= 4]
                assert dup == sorted(dup) and dup[0] == 0


def test_stats_and_failed_images(tmp_path, tiny_checkpoint, make_images, paths):
    make_images(tmp_path / "imgs", 20, size=16)
    (tmp_path / "imgs" / "img005.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cfg = from_dict({"model": {"arch": paths["tiny_arch"]}, "topk": {"k": 4, "batch_size": 6}})
    ctx = prepare(tiny_checkpoint, tmp_path / "imgs", cfg, None)
    result = TopKPass(cfg.topk).run(ctx)
    assert result.arrays["failed"].tolist() == [5]
    assert "img005.png" in result.meta["failed_reasons"][0]
    bf = brute_force(ctx, 4)
    for li, n in enumerate(["conv1", "conv2"]):
        ref = bf[n]
        assert 5 not in ref["ids"] and 5 not in result.arrays[f"L{li}.images"]
        np.testing.assert_allclose(result.arrays[f"L{li}.max"], ref["maxima"].max(0), rtol=1e-5)
        np.testing.assert_allclose(result.arrays[f"L{li}.mean"], ref["means"].mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.arrays[f"L{li}.std"], ref["means"].std(0), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(result.arrays[f"L{li}.fire_rate"], (ref["maxima"] > 0).mean(0))


def test_fewer_images_than_k(tmp_path, tiny_checkpoint, make_images, paths):
    make_images(tmp_path / "imgs", 3, size=16)
    cfg = from_dict({"model": {"arch": paths["tiny_arch"]}, "topk": {"k": 9}})
    ctx = prepare(tiny_checkpoint, tmp_path / "imgs", cfg, None)
    result = TopKPass(cfg.topk).run(ctx)
    top = channel_top(result, "conv2", 0)
    assert sorted(top.images.tolist()) == [0, 1, 2]


def test_resnet20_on_real_cifar_equals_brute_force(cifar_subset, resnet20_path, paths):
    folder = cifar_subset(20)  # 200 real images, 10 classes
    cfg = from_dict({"model": {"arch": paths["cifar_arch"] + ":resnet20"}, "topk": {"k": 9, "batch_size": 64}})
    ctx = prepare(resnet20_path, folder, cfg, None)
    assert len(ctx.images) == 200 and len(ctx.layers) == 19 + 9  # 19 convs + 9 blocks
    result = TopKPass(cfg.topk).run(ctx)
    check_against(ctx, result, brute_force(ctx, 9), 9, atol=1e-4)


def test_reduced_precision_checked_against_fp32(tmp_path, tiny_checkpoint, make_images, paths):
    make_images(tmp_path / "imgs", 30, size=16)
    cfg = from_dict({"model": {"arch": paths["tiny_arch"]},
                     "topk": {"k": 4, "precision": "bf16", "precision_sample": 30, "min_agreement": 0.5}})
    ctx = prepare(tiny_checkpoint, tmp_path / "imgs", cfg, None)
    result = TopKPass(cfg.topk).run(ctx)
    prec = result.meta["precision"]
    assert prec["requested"] == "bf16" and 0.5 <= prec["agreement"] <= 1.0 and prec["used"] == "bfloat16"
    # An agreement nobody can reach forces fp32, and the result then equals a plain fp32 pass.
    strict = from_dict({"model": {"arch": paths["tiny_arch"]},
                        "topk": {"k": 4, "precision": "bf16", "precision_sample": 30, "min_agreement": 1.0}})
    exact = TopKPass(from_dict({"topk": {"k": 4}}).topk).run(ctx)
    forced = TopKPass(strict.topk).run(ctx)
    if forced.meta["precision"]["agreement"] < 1.0:
        assert forced.meta["precision"]["used"] == "fp32"
        np.testing.assert_array_equal(forced.arrays["L1.images"], exact.arrays["L1.images"])


def test_agreement_of_identical_and_disjoint_sets():
    from sitegen.passes.topk import LayerReducer, topk_agreement

    a, b = LayerReducer(2, 3, torch.device("cpu")), LayerReducer(2, 3, torch.device("cpu"))
    a.top.images = torch.tensor([[1, 2, 3], [4, 5, 6]])
    b.top.images = torch.tensor([[3, 2, 1], [7, 8, 4]])
    assert topk_agreement({"x": a}, {"x": b}) == pytest.approx((1.0 + 1 / 3) / 2)


def test_checkpoint_from_a_job_split_another_way_is_not_resumed(tmp_path):
    """A build killed with one --workers count and rerun with another shards the images differently:
    a rank must not restore a state covering images outside its new shard (they would count twice)."""
    import torch

    from sitegen.passes.topk import Checkpoint, LayerReducer

    def reducers():
        return {"a": LayerReducer(3, 2, torch.device("cpu"))}

    saved = reducers()
    saved["a"].images = torch.arange(4)
    saved["a"](None, None, torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2))
    saved["a"].flush()
    one_process = Checkpoint(tmp_path, 0, every=1, shard=(1, 0, 100))
    one_process.maybe_save(saved, 60, [(7, "x.png: cannot decode")])

    same = reducers()
    assert Checkpoint(tmp_path, 0, every=1, shard=(1, 0, 100)).restore(same, torch.device("cpu")) == \
        (60, [(7, "x.png: cannot decode")])
    assert same["a"].stats.n == 4 and torch.equal(same["a"].top.padded()["values"], saved["a"].top.padded()["values"])

    for other in ((2, 0, 50), (1, 0, 99)):  # rank 0 of two workers; a different image list length
        fresh = reducers()
        assert Checkpoint(tmp_path, 0, every=1, shard=other).restore(fresh, torch.device("cpu")) == (0, [])
        assert fresh["a"].stats.n == 0


@pytest.mark.parametrize("width", [1, 5, 9, 10, 300])
def test_stable_top_picks_what_a_stable_descending_sort_does(width):
    """The keyed selection against the stable sort it replaces: random values with many ties,
    signed zeros (equal, so the lower column first), infinities and NaN (the largest, as the sort
    orders it), and float64 (which takes the sort)."""
    g = torch.Generator().manual_seed(width)
    v = torch.randint(-3, 4, (40, width), generator=g).float() / 2  # few distinct values: ties
    v[torch.rand(v.shape, generator=g) < 0.1] = -0.0
    v[torch.rand(v.shape, generator=g) < 0.05] = float("-inf")
    v[torch.rand(v.shape, generator=g) < 0.05] = float("inf")
    v[torch.rand(v.shape, generator=g) < 0.05] = float("nan")
    v[0] = -torch.arange(width, dtype=torch.float32) * 1e-40  # denormals, all different
    v[1] = -float("nan")  # a NaN whose sign bit is set
    v = torch.cat([v, torch.randn(40, width, generator=g)])
    for values in (v, v.double()):
        expected = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :9]
        assert torch.equal(stable_top(values, 9), expected)
