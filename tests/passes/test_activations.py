"""Activation maps of the sample images against a direct forward, and never-active channels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from sitegen.config import ActivationsConfig, SamplesConfig, from_dict
from sitegen.context import BuildContext
from sitegen.images import discover as discover_images
from sitegen.images import normalise
from sitegen.layers import discover as discover_layers
from sitegen.model_loading import LoadedModel
from sitegen.passes.activations import ActivationsPass, shrink
from sitegen.passes.sampling import sample_images


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1, stride=2)
        with torch.no_grad():
            self.conv1.bias[2] = -1e4  # channel 2 can never be positive
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


def make_ctx(net, folder: Path, size: int) -> BuildContext:
    layers = discover_layers(net, (3, size, size))
    return BuildContext(config=from_dict({}), model=LoadedModel(net, "0" * 64, "t", folder / "m.pt", None),
                        images=discover_images(folder), layers=layers, all_layers=layers,
                        input_size=(size, size), device=torch.device("cpu"), workers=0)


def test_maps_equal_a_direct_forward_pooled(tmp_path, make_images):
    make_images(tmp_path / "imgs", 8, size=20, classes=2)
    net = Net()
    ctx = make_ctx(net, tmp_path / "imgs", 20)
    samples = SamplesConfig(per_class=2)
    r = ActivationsPass(ActivationsConfig(max_side=8), samples).run(ctx)
    ids = sample_images(ctx.images, samples)
    assert r.arrays["images"].tolist() == ids == [0, 1, 4, 5]
    x = normalise(np.stack([np.asarray(Image.open(ctx.images.path(i))) for i in ids]), ctx.config.data)
    with torch.no_grad():
        a1 = net.conv1(x)
        a2 = net.conv2(torch.relu(a1))
    for li, a in enumerate([a1, a2]):
        np.testing.assert_allclose(r.arrays[f"L{li}.max"], a.amax(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r.arrays[f"L{li}.min"], a.amin(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-5)
    # conv1's 20×20 maps are max-pooled to 8×8; conv2's 10×10 too; float16 storage.
    assert r.arrays["L0.maps"].shape == (4, 4, 8, 8) and r.arrays["L0.maps"].dtype == np.float16
    ref = F.adaptive_max_pool2d(a1, (8, 8)).clamp(-65000, 65000).numpy()
    np.testing.assert_allclose(r.arrays["L0.maps"].astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    # The dead channel is never active for any image; the others are active somewhere.
    never = r.arrays["L0.max"] <= 0
    assert never[:, 2].all() and not never[:, [0, 1, 3]].all(axis=0).any()


def test_shrink_keeps_small_maps_and_peaks():
    small = torch.randn(1, 2, 5, 6)
    assert shrink(small, 8) is small
    big = torch.zeros(1, 1, 32, 32)
    big[0, 0, 17, 3] = 5.0
    out = shrink(big, 8)
    assert out.shape == (1, 1, 8, 8) and float(out.max()) == 5.0 and float(out[0, 0, 4, 0]) == 5.0
