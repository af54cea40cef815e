"""Occlusion sensitivity against hand-built models and one-image-at-a-time brute force."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from sitegen.config import OcclusionConfig, SamplesConfig, from_dict
from sitegen.context import BuildContext
from sitegen.errors import ConfigError, LayerError
from sitegen.images import discover as discover_images
from sitegen.images import normalise
from sitegen.layers import discover as discover_layers
from sitegen.model_loading import LoadedModel
from sitegen.passes.occlusion import OcclusionPass, geometry, occlude

REGION = (4, 8, 10, 14)  # y0, y1, x0, x1 of the only pixels the region model looks at


class RegionModel(nn.Module):
    """Logits (m, 0, -m) where m is the mean over REGION of the channel-averaged input: the output
    depends on those pixels only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        self.fc = nn.Linear(1, 3, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 3)
            self.fc.weight.copy_(torch.tensor([[1.0], [0.0], [-1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0, y1, x0, x1 = REGION
        return self.fc(self.conv(x)[:, :, y0:y1, x0:x1].mean(dim=(2, 3)))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def make_ctx(model: nn.Module, folder: Path, table: dict | None = None) -> BuildContext:
    cfg = from_dict(table or {})
    images = discover_images(folder)
    h, w = np.asarray(Image.open(images.path(0))).shape[:2]
    layers = discover_layers(model, (3, h, w))
    return BuildContext(config=cfg, model=LoadedModel(model, "0" * 64, "test", folder / "m.pt", None),
                        images=images, layers=layers, all_layers=layers, input_size=(h, w),
                        device=torch.device("cpu"), workers=0)


def bright_region_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    y0, y1, x0, x1 = REGION
    for i in range(n):
        px = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        px[y0:y1, x0:x1] = 230 + i * 5  # positive after normalisation: class 0 wins
        Image.fromarray(px).save(folder / f"im{i}.png")


def test_geometry_centres_the_square_on_each_cell():
    g = geometry((16, 16), size=4, stride=2)
    assert (g.rows, g.cols) == (8, 8) and g.boxes.shape == (64, 4)
    assert g.boxes[0].tolist() == [0, 3, 0, 3]  # centred on pixel 1: [-1, 3) clipped
    assert g.boxes[9].tolist() == [1, 5, 1, 5]  # cell (1, 1): centre 3
    assert g.boxes[63].tolist() == [13, 16, 13, 16]
    d = geometry((224, 224))
    assert (d.size, d.stride, d.rows, d.cols) == (56, 19, 12, 12)
    c = geometry((32, 32))  # CIFAR: an 8 px square every 3 px, 11×11 positions
    assert (c.size, c.stride, c.rows) == (8, 3, 11) and c.boxes[-1].tolist() == [27, 32, 27, 32]
    with pytest.raises(ConfigError, match="occlusion.size"):
        geometry((16, 16), size=17)


def test_occlude_fills_exactly_the_box_with_zero():
    x = torch.randn(2, 3, 6, 7) + 10
    out = occlude(x, torch.tensor([[1, 3, 2, 5], [0, 6, 6, 7]]))
    ref = x.clone()
    ref[0, :, 1:3, 2:5] = 0
    ref[1, :, 0:6, 6:7] = 0
    assert torch.equal(out, ref)


def test_probability_drops_exactly_where_the_square_covers_the_region(tmp_path):
    bright_region_images(tmp_path / "imgs", 3)
    model = RegionModel()
    ctx = make_ctx(model, tmp_path / "imgs")  # no class folders: the target is the top-1 class (0)
    result = OcclusionPass(OcclusionConfig(size=4, stride=2, batch_size=50), SamplesConfig()).run(ctx)
    a = result.arrays
    assert a["images"].tolist() == [0, 1, 2] and a["target"].tolist() == [0, 0, 0]
    y0, y1, x0, x1 = REGION
    b = a["boxes"]
    covers = ((b[:, 0] < y1) & (b[:, 1] > y0) & (b[:, 2] < x1) & (b[:, 3] > x0)).reshape(8, 8)
    assert 0 < covers.sum() < 64
    for s in range(3):
        prob = a["prob"][s]
        assert np.all(prob[covers] < a["base_prob"][s] - 1e-4)
        np.testing.assert_allclose(prob[~covers], a["base_prob"][s], rtol=0, atol=1e-6)
        # (b): class 0 stays on top where the region is untouched.
        assert np.all(a["best"][s][~covers] == 0)
    # (c): the only channel of the layer 'conv' loses exactly the occluded pixels' sum.
    assert result.meta["layer"] == "conv" and a["channel"].tolist() == [0, 0, 0]
    x = normalise(np.stack([np.asarray(Image.open(ctx.images.path(i))) for i in range(3)]), ctx.config.data)
    f = x.mean(1)  # the 1×1 convolution averages the channels
    for s in range(3):
        for pos, (py0, py1, px0, px1) in enumerate(b):
            ref = f[s].sum() - f[s, py0:py1, px0:px1].sum()
            assert abs(a["total"][s].flat[pos] - float(ref)) < 1e-3


def test_batched_equals_one_by_one_by_hand(tmp_path, make_images):
    make_images(tmp_path / "imgs", 9, size=16, classes=3)  # 3 class folders = 3 outputs: true labels
    model = SmallCNN()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    ctx = make_ctx(model, tmp_path / "imgs", {"samples": {"per_class": 1}})
    result = OcclusionPass(OcclusionConfig(size=5, stride=4, batch_size=7), ctx.config.samples).run(ctx)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert not model.conv2._forward_hooks
    a = result.arrays
    firsts = [0, 3, 6]  # sorted c0/*, c1/*, c2/*, three images each: the first of each class
    assert a["images"].tolist() == firsts
    assert result.meta["labelled"] and a["target"].tolist() == [0, 1, 2]
    model.eval()
    x = normalise(np.stack([np.asarray(Image.open(ctx.images.path(i))) for i in firsts]), ctx.config.data)
    with torch.no_grad():
        base_maps = model.conv2(torch.relu(model.conv1(x)))  # the last layer: conv2, before its ReLU
        channel = base_maps.amax(dim=(2, 3)).argmax(1)
        assert a["channel"].tolist() == channel.tolist()
        for s in range(3):
            for pos, (py0, py1, px0, px1) in enumerate(a["boxes"]):
                one = x[s:s + 1].clone()
                one[:, :, py0:py1, px0:px1] = 0.0
                pre = model.conv2(torch.relu(model.conv1(one)))  # conv2's output: the hooked layer's
                probs = model.fc(torch.relu(pre).mean(dim=(2, 3))).softmax(1)[0]
                r, c = divmod(pos, a["prob"].shape[2])
                assert abs(float(probs[a["target"][s]]) - a["prob"][s, r, c]) < 1e-5
                if probs.topk(2).values.diff().abs().item() > 1e-5:
                    assert int(probs.argmax()) == a["best"][s, r, c]
                assert abs(float(pre[0, channel[s]].sum()) - a["total"][s, r, c]) < 1e-4
    one_by_one = OcclusionPass(OcclusionConfig(size=5, stride=4, batch_size=1), ctx.config.samples).run(ctx)
    for key in ("prob", "total", "base_prob", "top_probs"):
        np.testing.assert_allclose(one_by_one.arrays[key], a[key], atol=1e-5)


def test_named_samples_and_unknown_layer(tmp_path, make_images):
    make_images(tmp_path / "imgs", 6, size=16, classes=2)
    ctx = make_ctx(SmallCNN(), tmp_path / "imgs")
    named = SamplesConfig(images=("c1/img003.png", "c0/img000.png"))
    result = OcclusionPass(OcclusionConfig(), named).run(ctx)
    assert result.arrays["images"].tolist() == [4, 0]  # the config's order (c1/img003 is the 5th file)
    with pytest.raises(ConfigError, match="samples.images"):
        OcclusionPass(OcclusionConfig(), SamplesConfig(images=("nope.png",))).run(ctx)
    with pytest.raises(LayerError, match="occlusion.layer"):
        OcclusionPass(OcclusionConfig(layer="conv9"), SamplesConfig()).run(ctx)


def test_cache_key_follows_the_samples_section(tmp_path, make_images):
    make_images(tmp_path / "imgs", 4, size=16)
    ctx = make_ctx(SmallCNN(), tmp_path / "imgs")
    a = OcclusionPass(OcclusionConfig(), SamplesConfig()).cache_key(ctx)
    b = OcclusionPass(OcclusionConfig(), SamplesConfig(max_images=3)).cache_key(ctx)
    assert a != b and a == OcclusionPass(OcclusionConfig(), SamplesConfig()).cache_key(ctx)
