"""Layer discovery, selection and receptive fields (checked against gradient supports)."""
from __future__ import annotations

import pytest
import torch
import torchvision

from sitegen.errors import LayerError
from sitegen.layers import ReceptiveField, caffe_name, discover, select
from sitegen.model_loading import build_architecture, load_model


def gradient_supports(model, layer, shape, units):
    """For each unit (y, x): rows/cols (first, last+1) where d unit / d input is nonzero, for a
    random input (one sample per unit, one backward)."""
    out = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: out.__setitem__("o", o))
    try:
        inp = torch.randn((len(units), *shape), dtype=torch.float64, requires_grad=True)
        model.double()(inp)
        g = torch.zeros_like(out["o"])
        for n, (y, x) in enumerate(units):
            g[n, :, y, x] = 1.0
        (grad,) = torch.autograd.grad(out["o"], inp, g)
    finally:
        h.remove()
        model.float()
    result = []
    for n in range(len(units)):
        nz = grad[n].abs().sum(0) > 0
        rows = torch.nonzero(nz.any(1)).flatten()
        cols = torch.nonzero(nz.any(0)).flatten()
        result.append(((int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)))
    return result


def test_resnet20_layers_and_fields_match_gradient_support(paths):
    if not paths["resnet20"].is_file():
        pytest.skip("../shared absent")
    model = load_model(paths["resnet20"], paths["cifar_arch"] + ":resnet20").model
    layers = discover(model, (3, 32, 32))
    names = [l.name for l in layers]
    assert names[:4] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.0"]
    assert names[-1] == "layer3.2" and len(layers) == 28
    block = next(l for l in layers if l.name == "layer2.0")
    assert (block.kind, block.shape, block.caffe, block.branch, block.stage) == \
        ("block", (32, 16, 16), "res3a", "layer2.0.conv2", "layer2")
    # Known by hand: 3x3 convs grow the field by 2 (x stride); stride-2 convs double the stride.
    assert next(l for l in layers if l.name == "conv1").rf == ReceptiveField(3, 1, -1)
    assert next(l for l in layers if l.name == "layer1.0.conv2").rf == ReceptiveField(7, 1, -3)
    for l in layers:
        _, oh, ow = l.shape
        units = [(oh // 2, ow // 2), (oh - 1, 0)]
        for (y, x), ((r0, r1), (c0, c1)) in zip(units, gradient_supports(model, l.name, (3, 32, 32), units)):
            bx0, by0, bx1, by1 = l.rf.box(y, x)
            # The support lies inside the field box clipped to the image, and touches its edges.
            assert (r0, r1) == (max(by0, 0), min(by1, 32)), l.name
            assert (c0, c1) == (max(bx0, 0), min(bx1, 32)), l.name


def test_torchvision_resnet18_discovery_and_fields():
    model = torchvision.models.resnet18()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    layers = discover(model, (3, 64, 64))
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(not m._forward_hooks for m in model.modules())
    by_name = {l.name: l for l in layers}
    assert by_name["conv1"].rf == ReceptiveField(7, 2, -3)
    assert by_name["layer4.1"].rf.size == 435 and by_name["layer4.1"].rf.stride == 32  # published value
    assert by_name["layer4.1"].caffe == "res5b"
    assert "layer2.0.downsample.0" in by_name  # the projection shortcut is a convolution too


def test_select_patterns_and_errors():
    model = build_architecture("torchvision:resnet18", None)
    layers = discover(model, (3, 32, 32))
    chosen = select(layers, ["layer4.*", "conv1"])
    assert chosen[0].name == "conv1" and all(l.name.startswith("layer4") for l in chosen[1:])
    assert select(layers, []) == layers
    with pytest.raises(LayerError) as e:
        select(layers, ["layer5"])
    assert "no layer 'layer5'" in str(e.value) and "sitegen layers" in str(e.value)


def test_caffe_names():
    assert caffe_name("layer1", 0) == "res2a"
    assert caffe_name("layer4", 2) == "res5c"
    assert caffe_name("features", 1) == ""


# ------------------------------------------------------------------ field arithmetic, by hand


class Seq(torch.nn.Module):
    """Runs a list of callables; the layers to look at are its Conv2d children."""

    def __init__(self, *steps):
        super().__init__()
        self.steps = steps
        self.mods = torch.nn.ModuleList([s for s in steps if isinstance(s, torch.nn.Module)])

    def forward(self, x):
        for s in self.steps:
            x = s(x)
        return x


def fields(model, size=32, channels=3):
    return {l.name: l for l in discover(model, (channels, size, size))}


def test_dilated_strided_depthwise_and_non_square_fields():
    c = torch.nn.Conv2d
    model = Seq(c(3, 4, 3, dilation=2, padding=2), c(4, 4, 3, stride=2, padding=1, groups=4),
                c(4, 4, (1, 7), padding=(0, 3)), c(4, 4, (7, 1), stride=(2, 1), padding=(3, 0)))
    f = fields(model)
    # dilation 2: 1 + 2·2 = 5 px; then a depthwise 3×3 stride 2: 5 + 2·1 = 7, stride 2, offset -2 - 1.
    assert f["mods.0"].rf == ReceptiveField(5, 1, -2)
    assert f["mods.1"].rf == ReceptiveField(7, 2, -3)
    # 1×7 grows the columns only (7 + 6·2 = 19, offset -3 - 3·2), then 7×1 stride (2, 1) the rows.
    assert f["mods.2"].rf == ReceptiveField(7, 2, -3, 19, 2, -9)
    assert f["mods.3"].rf == ReceptiveField(7 + 6 * 2, 4, -3 - 3 * 2, 19, 2, -9)
    assert f["mods.3"].rf.size_text() == "19 px" and f["mods.2"].rf.size_text() == "7×19 px"
    assert f["mods.3"].rf.stride_text() == "4×2"
    assert f["mods.2"].rf.to_json() == {"size": 7, "stride": 2, "offset": -3, "size_x": 19, "stride_x": 2,
                                        "offset_x": -9}
    assert f["mods.0"].rf.to_json() == {"size": 5, "stride": 1, "offset": -2}


def test_ceil_mode_pool_union_of_branches_and_padding():
    class Branches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = torch.nn.MaxPool2d(3, stride=2, ceil_mode=True)
            self.a = torch.nn.Conv2d(3, 2, 3, padding=1)  # rows [-1, 2) of the pooled map
            self.b = torch.nn.Conv2d(3, 2, 3)  # after padding right/bottom by 2: rows [0, 3)
            self.c = torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            x = self.pool(x)
            return self.c(torch.cat([self.a(x), self.b(torch.nn.functional.pad(x, (0, 2, 0, 2)))], 1))

    f = fields(Branches(), size=8)
    assert f["a"].shape == (2, 4, 4)  # ceil mode: (8 - 3) / 2 rounded up, + 1
    assert f["a"].rf == ReceptiveField(3 + 2 * 2, 2, -2) and f["b"].rf == ReceptiveField(7, 2, 0)
    assert f["c"].rf == ReceptiveField(9, 2, -2)  # the union [-2, 7) of both branches
    assert f["c"].rf.box(3, 3) == (4, 4, 13, 13)  # the last unit's field passes the image (ceil mode)


def test_squeeze_excitation_gate_is_pooled_and_adds_no_extent():
    class SE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc1 = torch.nn.Conv2d(8, 2, 1)
            self.fc2 = torch.nn.Conv2d(2, 8, 1)
            self.head = torch.nn.Conv2d(8, 4, 1)
            self.norm = torch.nn.GroupNorm(2, 4)
            self.after = torch.nn.Conv2d(4, 4, 1)
            self.cls = torch.nn.Conv2d(4, 5, 1)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(torch.nn.functional.adaptive_avg_pool2d(x, 1)))))
            x = self.norm(self.head(x * s))
            x = self.after(x)
            return self.cls(x.mean((2, 3), keepdim=True)).flatten(1)

    f = fields(SE(), size=16)
    assert f["conv"].rf == f["head"].rf == f["after"].rf == ReceptiveField(3, 1, -1)
    for name in ("fc1", "fc2", "cls"):
        assert f[name].kind == "pooled" and f[name].rf == ReceptiveField(16, 0, 0) and f[name].rf.pooled
        assert f[name].rf.box(0, 0) == (0, 0, 16, 16) and f[name].rf.describe() == "whole image (pooled)"
    assert f["conv"].kind == "conv"
    # Non-square input: the whole input is its height by its width.
    l = next(l for l in discover(SE(), (3, 12, 20)) if l.name == "fc1")
    assert l.rf.box(0, 0) == (0, 0, 20, 12) and l.rf.to_json() == {"size": 12, "stride": 0, "offset": 0,
                                                                  "size_x": 20, "stride_x": 0, "offset_x": 0}


def test_channels_last_blocks_and_shuffles_keep_the_field():
    class NHWC(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = torch.nn.Conv2d(4, 4, 7, padding=3, groups=4)
            self.norm = torch.nn.LayerNorm(4)
            self.lin = torch.nn.Linear(4, 4)
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 1))[:, :4]  # a channel, not a row
            y = self.lin(self.norm(self.dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
            b, c, h, w = y.shape
            y = y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)  # channel shuffle
            a, b2 = y.chunk(2, dim=1)
            return self.conv(torch.cat([a, b2], 1) + x)

    f = fields(NHWC(), size=16, channels=3)
    assert f["dw"].rf == ReceptiveField(7, 1, -3) and f["conv"].rf == ReceptiveField(9, 1, -4)


def test_operations_the_arithmetic_cannot_follow_use_the_gradient_probe(capsys):
    class SpaceToDepth(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.b = torch.nn.Conv2d(12, 4, 3, padding=1)

        def forward(self, x):
            return self.b(torch.nn.functional.pixel_unshuffle(self.a(x), 2))

    f = fields(SpaceToDepth(), size=16)
    # pixel_unshuffle puts each 2×2 block into channels: 2 px, stride 2; the 3×3 after it: 2 + 2·2.
    assert f["a"].rf == ReceptiveField(3, 1, -1)
    assert f["b"].rf == ReceptiveField(3 + 1 + 2 * 2, 2, -1 - 2)
    err = capsys.readouterr().err
    assert "gradient probe" in err and "pixel_unshuffle" in err


def test_residual_blocks_are_found_by_structure():
    class Body(torch.nn.Module):  # no "block" in the name: found by its sum
        def __init__(self):
            super().__init__()
            self.f = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.f(x))

    class NotResidual(torch.nn.Module):  # looks like a block (a downsample attribute), adds nothing back
        def __init__(self):
            super().__init__()
            self.downsample = None
            self.f = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.f(x) * 2

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.stage = torch.nn.Sequential(Body(), Body(), NotResidual())

        def forward(self, x):
            return self.stage(self.stem(x))

    f = fields(Net(), size=8)
    assert [n for n, l in f.items() if l.kind == "block"] == ["stage.0", "stage.1"]
    assert (f["stage.1"].stage, f["stage.1"].block, f["stage.1"].branch) == ("stage", 1, "stage.1.f")
    assert f["stage.1.f"].stage == "stage" and f["stage.2.f"].stage == ""
    assert f["stage.1"].caffe == ""  # not a ResNet stage name
