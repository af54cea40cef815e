"""Dead and dull channels: from the dataset pass's statistics to the index table and layer tiles."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from sitegen.config import from_dict
from sitegen.context import BuildContext
from sitegen.images import discover as discover_images
from sitegen.layers import discover as discover_layers
from sitegen.model_loading import LoadedModel
from sitegen.passes.topk import TopKPass
from sitegen.render.pages import RenderOptions
from sitegen.render.site import collect_atlas, collect_pages, dull_channels


class Net(nn.Module):
    """conv1 channel 1 is forced dead (bias -1e4), channel 4 is constant (zero weights, bias 1),
    channel 5 varies a little (weights scaled by 1e-4); the others are ordinary."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        with torch.no_grad():
            self.conv1.bias[1] = -1e4
            self.conv1.weight[4] = 0
            self.conv1.bias[4] = 1.0
            self.conv1.weight[5] *= 1e-4
            self.conv1.bias[5] = 2.0
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv1(x)).mean(dim=(2, 3)))


def stats(std, mx):
    return [{"channel": c, "stats": {"std": s, "max": m}} for c, (s, m) in enumerate(zip(std, mx))]


def test_dull_is_relative_to_the_live_channels_median():
    chans = stats([1.0, 0.9, 1.1, 0.04, 0.06, 0.0, 0.0], [1, 1, 1, 1, 1, 0, -3])
    # Live stds: 1.0, 0.9, 1.1, 0.04, 0.06 -> median 0.9; below 0.05 × 0.9 = 0.045: channel 3 only.
    assert dull_channels(chans, 0.05) == [3]
    assert dull_channels(chans, 0.1) == [3, 4]
    assert dull_channels(chans, 0.0) == []
    # A mostly dead layer keeps a scale: the dead channels do not drag the median to 0.
    mostly_dead = stats([0.0] * 6 + [1.0, 1.2, 0.01], [0.0] * 6 + [2, 2, 2])
    assert dull_channels(mostly_dead, 0.05) == [8]


def test_forced_dead_and_constant_channels_are_reported(tmp_path, make_images):
    make_images(tmp_path / "imgs", 24, size=12, classes=2)
    net = Net()
    layers = discover_layers(net, (3, 12, 12))
    ctx = BuildContext(config=from_dict({"topk": {"k": 3}}),
                       model=LoadedModel(net, "0" * 64, "t", tmp_path / "m.pt", 2),
                       images=discover_images(tmp_path / "imgs"), layers=layers, all_layers=layers,
                       input_size=(12, 12), device=torch.device("cpu"), workers=0)
    topk = TopKPass(ctx.config.topk).run(ctx)
    assert topk.arrays["L0.max"][1] <= 0 < topk.arrays["L0.max"][[0, 2, 3, 4, 5, 6, 7]].min()
    atlas = collect_atlas(ctx, topk)
    pages = {p.path: p for p in collect_pages(ctx, atlas, RenderOptions(title="t", patch_size=16))}
    index = pages["index.html"].context
    row = index["layers"][0]
    assert (row["dead"], row["dull"], row["channels"]) == (1, 2, 8)
    assert [d["c"] for d in index["dead"][0]["list"]] == [1]
    assert [d["c"] for d in index["dull"][0]["list"]] == [4, 5]
    tiles = pages["layers/conv1/index.html"].context["tiles"]
    assert [t["c"] for t in tiles if t["dead"]] == [1]
    assert [t["c"] for t in tiles if t["dull"]] == [4, 5]
    # With the threshold at 0, nothing is dull; the dead channel stays dead.
    ctx.config = from_dict({"topk": {"k": 3}, "site": {"dull_ratio": 0.0}})
    index = collect_pages(ctx, atlas, RenderOptions(title="t", patch_size=16))[0].context
    assert index["layers"][0]["dull"] == 0 and not index["dull"] and index["layers"][0]["dead"] == 1
