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
