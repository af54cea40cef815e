"""The kernels pass keeps each selected convolution's weights and the model's first convolution."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from sitegen.config import KernelsConfig
from sitegen.context import BuildContext
from sitegen.config import from_dict
from sitegen.images import discover as discover_images
from sitegen.layers import discover as discover_layers
from sitegen.model_loading import LoadedModel
from sitegen.passes.kernels import KernelsPass


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Conv2d(3, 5, 5, padding=2)
        self.dw = nn.Conv2d(5, 10, 3, padding=1, groups=5, bias=False)
        self.fc = nn.Linear(10, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.dw(torch.relu(self.stem(x)))).mean(dim=(2, 3)))


def test_weights_first_conv_and_groups(tmp_path, make_images):
    make_images(tmp_path / "imgs", 2, size=12)
    net = Net()
    layers = discover_layers(net, (3, 12, 12))
    only_dw = [l for l in layers if l.name == "dw"]  # the first conv is kept even when not selected
    ctx = BuildContext(config=from_dict({}), model=LoadedModel(net, "0" * 64, "t", tmp_path / "m.pt", None),
                       images=discover_images(tmp_path / "imgs"), layers=only_dw, all_layers=layers,
                       input_size=(12, 12), device=torch.device("cpu"), workers=0)
    r = KernelsPass(KernelsConfig(block=8)).run(ctx)
    assert r.meta["layers"] == ["dw"] and r.meta["groups"] == [5] and r.meta["first"] == "stem"
    np.testing.assert_array_equal(r.arrays["L0.weight"], net.dw.weight.detach().numpy())
    assert "L0.bias" not in r.arrays
    np.testing.assert_array_equal(r.arrays["first.weight"], net.stem.weight.detach().numpy())
    assert r.arrays["L0.weight"].shape == (10, 1, 3, 3)
