"""sitegen.attribution.image_independent: which (method, layer) pictures are provably the same for
every image, decided from the network's structure; checked against attributions on different images."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sitegen.attribution import METHODS, attribute_methods, image_independent
from sitegen.model_loading import build_architecture

TINY = Path(__file__).with_name("tiny_models.py")


def _tiny(name: str) -> nn.Module:
    return build_architecture(f"{TINY}:{name}", None).eval()


def pool_free_cnn() -> nn.Module:
    return _tiny("pool_free_cnn")


def linear_cnn() -> nn.Module:
    return _tiny("linear_cnn")


def tiny_cnn() -> nn.Module:
    return _tiny("tiny_cnn")


def _attributions_on_two_images(model: nn.Module, layer: str, unit=(0, 1, 1), size: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 3, size, size), generator=g) * torch.tensor([1.0, 3.0])[:, None, None, None]
    return attribute_methods(model, x, layer, [unit, unit], METHODS)


@pytest.mark.parametrize("layer", ["conv1", "conv2", "conv3"])
def test_deconvnet_without_max_pooling_is_proved_and_really_image_independent(layer):
    model = pool_free_cnn()
    proof = image_independent(model, layer, "deconvnet", (3, 16, 16))
    assert proof and "deconvnet" in proof.reason
    grads = _attributions_on_two_images(model, layer)["deconvnet"]
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-7)  # the derivation, checked by brute force
    # ... while guided backprop and the gradient read the ReLUs' forward signs: not proved, and they differ.
    if layer != "conv1":
        for method in ("guided", "gradient"):
            verdict = image_independent(model, layer, method, (3, 16, 16))
            assert not verdict and "ReLU" in verdict.reason
        g = _attributions_on_two_images(model, layer)["gradient"]
        assert not torch.allclose(g[0], g[1])


def test_every_method_on_a_linear_network_is_proved_image_independent():
    model = linear_cnn()
    for method in METHODS:
        assert image_independent(model, "conv2", method, (3, 16, 16))
    grads = _attributions_on_two_images(model, "conv2")
    for method in METHODS:
        assert torch.allclose(grads[method][0], grads[method][1], rtol=1e-6, atol=1e-7)


def test_max_pooling_stops_the_proof_and_the_pictures_differ():
    model = tiny_cnn()
    verdict = image_independent(model, "conv2", "deconvnet", (3, 16, 16))
    assert not verdict and "max_pool2d" in verdict.reason and "switches" in verdict.reason
    assert image_independent(model, "conv1", "deconvnet", (3, 16, 16))  # above the pooling: still proved
    grads = _attributions_on_two_images(model, "conv2", unit=(0, 2, 2))["deconvnet"]
    assert not torch.allclose(grads[0], grads[1])


class _Gate(nn.Module):
    """conv, then a squeeze-excitation gate: the product of two tensors that both depend on the image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = F.relu(self.conv(x))
        scale = self.fc(h.mean((2, 3), keepdim=True))  # no activation: only the product is nonlinear
        return self.out(h * scale)


class _Norms(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.bn = nn.BatchNorm2d(4)
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.conv(x)
        if self.kind == "group":
            h = self.gn(h)
        elif self.kind == "batch-train":  # BatchNorm forced into training mode in the forward
            h = F.batch_norm(h, None, None, training=True)
        elif self.kind == "division":
            h = h / (h.sum() + 1)
        elif self.kind == "reciprocal":
            h = 2.0 / (h + 10.0)
        elif self.kind == "branch":
            h = h if bool(h.sum() > 0) else -h  # control flow on the image's values
        elif self.kind == "scaled":
            h = 2.0 * h / 3.0 - h * self.bn.weight[None, :, None, None]  # products with constants: linear
        return self.out(F.relu(h))


@pytest.mark.parametrize("model, needle", [
    (_Gate(), "gate"),
    (_Norms("group"), "group_norm"),
    (_Norms("batch-train"), "training mode"),
    (_Norms("division"), "division"),
    (_Norms("reciprocal"), "rdiv"),
    (_Norms("branch"), "gt"),
])
def test_forward_reading_operations_are_named(model, needle):
    verdict = image_independent(model, "out", "deconvnet", (3, 8, 8))
    assert not verdict and needle in verdict.reason


def test_deconvnet_through_ruled_activations_is_proved_and_measured():
    """SiLU and GELU have a deconvnet rule (g⁺) that reads nothing of the forward; the max-pooling
    after them, a softplus (no rule) and a custom autograd.Function each stop the proof."""
    model = _tiny("smooth_cnn")
    assert image_independent(model, "conv2", "deconvnet", (3, 16, 16))
    assert not image_independent(model, "conv2", "guided", (3, 16, 16))
    grads = _attributions_on_two_images(model, "conv2")
    assert torch.allclose(grads["deconvnet"][0], grads["deconvnet"][1], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(grads["guided"][0], grads["guided"][1])
    assert "max_pool2d" in image_independent(model, "conv3", "deconvnet", (3, 16, 16)).reason
    resnet = _tiny("softplus_resnet")
    assert image_independent(resnet, "layer1.0", "deconvnet", (3, 16, 16))
    verdict = image_independent(resnet, "layer1.1", "deconvnet", (3, 16, 16))
    assert not verdict and "softplus" in verdict.reason

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.out = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.out(Twice.apply(F.relu(self.conv(x))))

    verdict = image_independent(Custom(), "out", "deconvnet", (3, 8, 8))
    assert not verdict and "Twice" in verdict.reason


def test_products_and_divisions_by_constants_keep_the_proof():
    assert image_independent(_Norms("scaled"), "out", "deconvnet", (3, 8, 8))


def test_operations_the_python_audit_cannot_see_are_caught_in_the_autograd_graph():
    from sitegen.attribution import _graph_blocker

    x = torch.zeros((1, 3, 8, 8), requires_grad=True)
    out = torch.ops.aten.max_pool2d_with_indices(x, [2, 2])[0]  # an op reached without a Python wrapper
    assert "MaxPool2DWithIndices" in _graph_blocker(out, "deconvnet")
    relu = torch.ops.aten.relu(x) * 2
    assert _graph_blocker(relu, "deconvnet", activations=1) is None  # a ReLU the rule reached
    assert "out of the rule's reach" in _graph_blocker(relu, "deconvnet", activations=0)  # one it did not
    assert "ReLU" in _graph_blocker(torch.ops.aten.relu(x), "guided")
    assert "two tensors" in _graph_blocker(x * x, "deconvnet")


def test_the_model_is_left_as_it_came():
    model = pool_free_cnn().train()
    model.conv1.weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    image_independent(model, "conv3", "deconvnet", (3, 16, 16))
    assert model.training and model.bn1.training and not model.conv1.weight.requires_grad
    assert model.conv2.weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_unknown_layer_and_method_are_refused():
    from sitegen.attribution import AttributionError
    from sitegen.errors import LayerError

    with pytest.raises(LayerError):
        image_independent(pool_free_cnn(), "conv9", "deconvnet", (3, 16, 16))
    with pytest.raises(AttributionError):
        image_independent(pool_free_cnn(), "conv1", "lrp", (3, 16, 16))
