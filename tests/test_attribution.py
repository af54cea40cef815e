"""Tests for sitegen.attribution: hand-derived values, every ReLU spelling, ResNet-20 on real images."""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sitegen.attribution import (
    METHODS,
    AttributionError,
    AttributionWarning,
    attribute,
    attribute_batched,
    attribute_methods,
    normalise_for_display,
)
from sitegen.errors import LayerError, SitegenError

HERE = Path(__file__).resolve().parent
SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINT = SHARED / "models" / "resnet20-12fca82f.th"
CIFAR = SHARED / "data" / "cifar10-test"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _load_cifar_resnet_module():
    # tests/ is not a package and conftest.py is not ours: load the architecture file by path.
    spec = importlib.util.spec_from_file_location("sitegen_test_cifar_resnet", HERE / "cifar_resnet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cifar_resnet = _load_cifar_resnet_module()


# --- hand-derived values --------------------------------------------------------------------------


def _conv(shape: tuple[int, ...], weight: list, bias: float | None = None) -> nn.Conv2d:
    conv = nn.Conv2d(1, 1, shape, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weight, dtype=torch.float32).reshape(1, 1, *shape))
        if bias is not None:
            conv.bias.fill_(bias)
    return conv


def test_hand_derived_one_relu():
    # h = 2x; r = relu(h); unit = sum(K * r) with K = [[1, -1], [2, -3]], so dL/dr = K.
    # Image 0: top row h > 0, bottom row h < 0, so K's four entries cover every
    # (input sign, gradient sign) pair.  Image 1 is the negation of image 0.
    model = nn.Sequential(_conv((1, 1), [2.0]), nn.ReLU(), _conv((2, 2), [1.0, -1.0, 2.0, -3.0]))
    x0 = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    inputs = torch.stack([x0, -x0]).unsqueeze(1)
    units = [(0, 0, 0), (0, 0, 0)]
    expected = {
        # (h > 0) * K * 2
        "gradient": [[[2.0, -2.0], [0.0, 0.0]], [[0.0, 0.0], [4.0, -6.0]]],
        # (h > 0) * (K > 0) * K * 2
        "guided": [[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [4.0, 0.0]]],
        # clamp(K, 0) * 2, whatever the input
        "deconvnet": [[[2.0, 0.0], [4.0, 0.0]], [[2.0, 0.0], [4.0, 0.0]]],
    }
    for method in METHODS:
        got = attribute(model, inputs, "2", units, method)
        torch.testing.assert_close(got, torch.tensor(expected[method]).unsqueeze(1), rtol=0, atol=0)


def test_hand_derived_two_relus():
    # h1 = x; r1 = relu(h1); h2 = r1 - 1; r2 = relu(h2); unit = sum(k * r2), k = [2, -1, 1, -3].
    # x = [.5, -1, 3, 2]: h1 = [.5, -1, 3, 2], h2 = [-.5, -1, 2, 1].
    model = nn.Sequential(
        _conv((1, 1), [1.0]), nn.ReLU(), _conv((1, 1), [1.0], bias=-1.0), nn.ReLU(),
        _conv((1, 4), [2.0, -1.0, 1.0, -3.0]),
    )
    inputs = torch.tensor([0.5, -1.0, 3.0, 2.0]).reshape(1, 1, 1, 4)
    expected = {
        "gradient": [0.0, 0.0, 1.0, -3.0],  # k * (h2 > 0) * (h1 > 0)
        "guided": [0.0, 0.0, 1.0, 0.0],  # only position 2 has positive input and gradient throughout
        "deconvnet": [2.0, 0.0, 1.0, 0.0],  # clamp(k, 0): passes at h2 < 0 too
    }
    for method in METHODS:
        got = attribute(model, inputs, "4", [(0, 0, 0)], method)
        torch.testing.assert_close(got, torch.tensor(expected[method]).reshape(1, 1, 1, 4), rtol=0, atol=0)


def test_unit_in_a_relu_layer_after_max_pool():
    # Unit taken at a ReLU module's output, after max-pooling: deconvnet routes through the pool's
    # switch even where the pre-ReLU value is negative; guided and gradient are blocked there.
    model = nn.Sequential(_conv((1, 1), [-1.0]), nn.MaxPool2d(2), nn.ReLU())
    inputs = torch.tensor([[1.0, 3.0], [2.0, 5.0]]).reshape(1, 1, 2, 2)  # h = -x, max at x = 1
    switch = torch.tensor([[-1.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)  # d(-x)/dx at the argmax
    assert attribute(model, inputs, "2", [(0, 0, 0)], "guided").abs().sum() == 0
    assert attribute(model, inputs, "2", [(0, 0, 0)], "gradient").abs().sum() == 0
    torch.testing.assert_close(attribute(model, inputs, "2", [(0, 0, 0)], "deconvnet"), switch)


# --- every spelling of ReLU ----------------------------------------------------------------------


def _relu_forms() -> dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]]:
    """Factories of the activation applied at both ReLU sites of _TwoReluNet."""
    shared = nn.ReLU()

    def discarded(inplace_relu: Callable[[torch.Tensor], object]) -> Callable[[torch.Tensor], torch.Tensor]:
        # The network ignores the return value: only a truly in-place ReLU gives the right forward.
        def act(t: torch.Tensor) -> torch.Tensor:
            inplace_relu(t)
            return t

        return act

    return {
        "nn.ReLU": lambda: nn.ReLU(),
        "nn.ReLU shared": lambda: shared,
        "nn.ReLU(inplace=True)": lambda: nn.ReLU(inplace=True),
        "F.relu": lambda: F.relu,
        "F.relu(inplace=True)": lambda: lambda t: F.relu(t, inplace=True),
        "F.relu_": lambda: F.relu_,
        "torch.relu": lambda: torch.relu,
        "torch.relu_": lambda: torch.relu_,
        "Tensor.relu": lambda: torch.Tensor.relu,
        "Tensor.relu_": lambda: torch.Tensor.relu_,
        "nn.ReLU(inplace=True), result discarded": lambda: discarded(nn.ReLU(inplace=True)),
        "F.relu_, result discarded": lambda: discarded(F.relu_),
        "Tensor.relu_, result discarded": lambda: discarded(torch.Tensor.relu_),
    }


class _TwoReluNet(nn.Module):
    def __init__(self, make_act: Callable[[], Callable[[torch.Tensor], torch.Tensor]]):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 4, 3, padding=1)
        self.act1 = make_act()
        self.act2 = make_act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        return self.conv3(x)


class _RefRule(torch.autograd.Function):
    """Independent reference: the rule written as the papers state it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, method: str) -> torch.Tensor:
        ctx.method = method
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        if ctx.method == "guided":
            return grad * (x > 0) * (grad > 0), None
        if ctx.method == "deconvnet":
            return grad * (grad > 0), None
        return grad * (x > 0), None


def _reference(model: nn.Module, inputs: torch.Tensor, layer: str, units: list) -> torch.Tensor:
    """Plain autograd, written independently of sitegen: full forward, one-hot backward."""
    x = inputs.clone().requires_grad_(True)
    store = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.setdefault("out", o))
    try:
        model(x)
    finally:
        handle.remove()
    out = store["out"]
    onehot = torch.zeros_like(out)
    for i, (c, y, xx) in enumerate(units):
        onehot[i, c, y, xx] = 1.0
    (grad,) = torch.autograd.grad(out, x, onehot)
    return grad


SMALL_INPUTS = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(1))
SMALL_UNITS = [(0, 4, 4), (3, 5, 2), (1, 0, 9)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", list(_relu_forms()))
def test_every_relu_form_follows_the_rule(form: str, method: str):
    model = _TwoReluNet(_relu_forms()[form]).eval()
    reference_model = _TwoReluNet(lambda: lambda t: _RefRule.apply(t, method)).eval()
    expected = _reference(reference_model, SMALL_INPUTS, "conv3", SMALL_UNITS)
    got = attribute(model, SMALL_INPUTS, "conv3", SMALL_UNITS, method)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    # The rule matters on this net, so a silently skipped rule cannot pass.
    if method != "gradient":
        plain = _reference(_TwoReluNet(lambda: nn.ReLU()).eval(), SMALL_INPUTS, "conv3", SMALL_UNITS)
        assert (got - plain).abs().max() > 1e-3 * plain.abs().max()


@pytest.mark.parametrize("form", list(_relu_forms()))
def test_one_forward_for_every_method_equals_separate_calls(form: str):
    """attribute_methods walks one recorded forward once per method; each result must equal its own
    hand-built reference, whatever the order (a rule leaking from one walk to the next would not)."""
    model = _TwoReluNet(_relu_forms()[form]).eval()
    for order in (METHODS, tuple(reversed(METHODS)), ("gradient", "guided")):
        got = attribute_methods(model, SMALL_INPUTS, "conv3", SMALL_UNITS, order)
        assert list(got) == list(order)
        for method in order:
            reference_model = _TwoReluNet(lambda: lambda t: _RefRule.apply(t, method)).eval()
            expected = _reference(reference_model, SMALL_INPUTS, "conv3", SMALL_UNITS)
            torch.testing.assert_close(got[method], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("methods", [(), ("guided", "guided"), ("guided", "lrp")])
def test_attribute_methods_refuses_a_bad_list(methods):
    model = _TwoReluNet(lambda: nn.ReLU()).eval()
    with pytest.raises(AttributionError):
        attribute_methods(model, SMALL_INPUTS, "conv3", SMALL_UNITS, methods)


def test_inplace_relu_on_a_view():
    class Net(nn.Module):
        def __init__(self, partial_relu: Callable[[torch.Tensor], None]):
            super().__init__()
            torch.manual_seed(0)
            self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
            self.partial_relu = partial_relu

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv1(x)
            return self.conv2(self.partial_relu(h))

    def in_place(h: torch.Tensor) -> torch.Tensor:
        h[:, :3].relu_()
        return h

    def out_of_place(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(h[:, :3]), h[:, 3:]], dim=1)

    for method in METHODS:
        torch.testing.assert_close(
            attribute(Net(in_place), SMALL_INPUTS, "conv2", SMALL_UNITS, method),
            attribute(Net(out_of_place), SMALL_INPUTS, "conv2", SMALL_UNITS, method),
        )


# --- activations without a rule ---------------------------------------------------------------------


class _UnruledNet(nn.Module):
    """Two kinds without a rule (SELU, softplus) around a ruled one (GELU): only the former are named."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.selu = nn.SELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.softplus(F.gelu(self.selu(self.conv1(x)))))


@pytest.mark.parametrize("method", ["guided", "deconvnet"])
def test_one_warning_names_the_unruled_activations(method: str):
    with pytest.warns(AttributionWarning) as record:
        attribute(_UnruledNet(), SMALL_INPUTS, "conv2", SMALL_UNITS, method)
    (warning,) = _attribution_warnings(record)
    message = str(warning.message)
    assert "selu" in message and "softplus" in message and method in message and "plain gradient" in message
    assert "gelu" not in message
    assert warning.filename == __file__  # points at the caller

    with pytest.warns(AttributionWarning) as record:
        attribute_batched(_UnruledNet(), SMALL_INPUTS, "conv2", SMALL_UNITS, method, batch_size=1)
    assert len(_attribution_warnings(record)) == 1


def test_no_warning_for_gradient_or_ruled_activations():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attribute(_UnruledNet(), SMALL_INPUTS, "conv2", SMALL_UNITS, "gradient")
        attribute(_TwoReluNet(lambda: F.relu), SMALL_INPUTS, "conv3", SMALL_UNITS, "guided")
        attribute(_TwoReluNet(lambda: nn.Hardswish()), SMALL_INPUTS, "conv3", SMALL_UNITS, "deconvnet")


@pytest.mark.parametrize(
    "name, act",
    [
        ("softplus", nn.Softplus()),
        ("selu", lambda t: torch.selu(t)),
        ("celu", nn.CELU()),
        ("logsigmoid", nn.LogSigmoid()),
        ("hardshrink", torch.Tensor.hardshrink),
        ("product of two feature maps", lambda t: t * torch.sigmoid(t)),  # a hand-written swish
    ],
)
def test_other_activations_are_named(name: str, act: Callable):
    act = act if isinstance(act, nn.Module) else _Lambda(act)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act, nn.Conv2d(4, 4, 1))
    with pytest.warns(AttributionWarning, match=name) as record:
        attribute(model, SMALL_INPUTS, "2", SMALL_UNITS, "guided")
    assert len(_attribution_warnings(record)) == 1


def _attribution_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, AttributionWarning)]


class _Lambda(nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


# --- no trace left behind --------------------------------------------------------------------------


def _state(model: nn.Module) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [
            (list(m._forward_hooks), list(m._forward_pre_hooks), list(m._backward_hooks),
             list(m._backward_pre_hooks))
            for m in model.modules()
        ],
    }


def _assert_same_state(before: dict, after: dict) -> None:
    assert before["params"].keys() == after["params"].keys()
    for k in before["params"]:
        assert torch.equal(before["params"][k], after["params"][k]), k
    for k in ("training", "requires_grad", "grads", "hooks"):
        assert before[k] == after[k], k


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_model_and_inputs_left_as_they_were(train: bool, method: str):
    model = cifar_resnet.resnet20()  # BatchNorm: train mode would update running stats
    model.train(train)
    model.layer1.eval()  # mixed modes must come back mixed
    model.linear.weight.requires_grad_(False)
    model.layer2.register_forward_hook(lambda *a: None)
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs_before = inputs.clone()
    before = _state(model)
    attribute(model, inputs, "layer2.0", [(0, 1, 1), (5, 3, 2)], method)
    _assert_same_state(before, _state(model))
    assert torch.equal(inputs, inputs_before) and not inputs.requires_grad
    assert torch._C._len_torch_function_stack() == 0


def test_nothing_stays_active_when_the_forward_fails():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            F.relu(self.conv1(x))
            raise RuntimeError("boom")  # before conv2, the requested layer

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        attribute(model, SMALL_INPUTS, "conv2", SMALL_UNITS, "guided")
    assert torch._C._len_torch_function_stack() == 0
    assert model.training and model.conv1.weight.requires_grad and not model.conv2._forward_hooks
    # F.relu is itself again outside the call: plain gradient, not the rule.
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    (g,) = torch.autograd.grad(F.relu(x), x, torch.tensor([5.0, -3.0]))
    assert g.tolist() == [0.0, -3.0]


# --- errors ----------------------------------------------------------------------------------------


def test_errors_are_readable():
    model = _TwoReluNet(lambda: F.relu)
    with pytest.raises(AttributionError, match="guided, deconvnet, gradient"):
        attribute(model, SMALL_INPUTS, "conv3", SMALL_UNITS, "guidd")
    with pytest.raises(AttributionError, match="2 units for 3 inputs"):
        attribute(model, SMALL_INPUTS, "conv3", SMALL_UNITS[:2])
    with pytest.raises(AttributionError, match=r"\(4, 10, 10\)"):
        attribute(model, SMALL_INPUTS, "conv3", [(4, 0, 0)] * 3)
    with pytest.raises(AttributionError, match="outside"):
        attribute(model, SMALL_INPUTS, "conv3", [(0, 0, 10)] * 3)
    with pytest.raises(AttributionError, match="outside"):
        attribute(model, SMALL_INPUTS, "conv3", [(0, -1, 0)] * 3)  # no silent wrap-around
    with pytest.raises(AttributionError, match="not a"):
        attribute(model, SMALL_INPUTS, "conv3", [(0, 0)] * 3)
    with pytest.raises(LayerError, match="sitegen layers"):
        attribute(model, SMALL_INPUTS, "conv9", SMALL_UNITS)
    with pytest.raises(SitegenError):
        attribute_batched(model, SMALL_INPUTS, "conv3", SMALL_UNITS, batch_size=0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(300, 4))
    with pytest.raises(AttributionError, match="feature map"):
        attribute(linear, SMALL_INPUTS, "1", SMALL_UNITS)


def test_torchscript_models_are_refused_for_rules():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still loadable
        scripted = torch.jit.script(_TwoReluNet(lambda: nn.ReLU()))
    with pytest.raises(AttributionError, match="TorchScript"):
        attribute(scripted, SMALL_INPUTS, "conv3", SMALL_UNITS, "guided")


# --- display ---------------------------------------------------------------------------------------


def test_normalise_for_display():
    a = np.zeros((3, 4, 5), dtype=np.float32)
    a[0, 0, 0], a[1, 1, 1], a[2, 2, 2] = 2.0, -2.0, 1.0
    img = normalise_for_display(torch.from_numpy(a))  # tensors accepted too
    assert img.shape == (4, 5, 3) and img.dtype == np.uint8
    assert img[3, 4].tolist() == [128, 128, 128]  # zero is grey
    assert img[0, 0, 0] == 255 and img[1, 1, 1] == 1  # sign kept, symmetric
    assert normalise_for_display(np.zeros((3, 2, 2))).tolist() == np.full((2, 2, 3), 128).tolist()

    grey = normalise_for_display(np.array([[[0.5, -0.25]]]))
    assert grey.shape == (1, 2, 3) and (grey[..., 0] == grey[..., 2]).all()

    # One hot pixel does not wash out the rest: the 99th percentile sets the scale.
    b = np.ones((1, 100, 100))
    b[0, 0, 0] = 1e6
    out = normalise_for_display(b)
    assert out[0, 0, 0] == 255 and out[50, 50, 0] == 255

    with pytest.raises(AttributionError):
        normalise_for_display(np.zeros((2, 4, 4)))


# --- ResNet-20 on real CIFAR images ------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    if not CHECKPOINT.exists() or not CIFAR.is_dir():
        pytest.skip(f"shared models/data not found under {SHARED}")
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["state_dict"]
    model = cifar_resnet.resnet20()
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval()


@pytest.fixture(scope="module")
def cifar_images(resnet20) -> torch.Tensor:
    from PIL import Image

    paths = [CIFAR / cls / "0000.jpg" for cls in ("airplane", "cat", "dog", "ship", "truck", "frog")]
    batch = []
    for path in paths:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr).permute(2, 0, 1)
        batch.append((t - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])
    return torch.stack(batch)


def _active_units(model: nn.Module, images: torch.Tensor, layer: str, where: list[tuple[int, int]]) -> list:
    """Per image, the most active channel at the given position: a unit whose attribution is not 0."""
    with torch.no_grad():
        out = _reference_forward(model, images, layer)
    return [(int(out[i, :, y, x].argmax()), y, x) for i, (y, x) in enumerate(where)]


def _reference_forward(model: nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    store = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.setdefault("out", o))
    try:
        model(images)
    finally:
        handle.remove()
    return store["out"]


class _RuleF:
    """Stands in for torch.nn.functional in the architecture file, with F.relu replaced by _RefRule."""

    def __init__(self, method: str):
        self.relu = lambda t: _RefRule.apply(t, method)

    def __getattr__(self, name: str):
        return getattr(F, name)


@pytest.mark.parametrize("layer", ["layer2.1", "layer3.2.conv2"])
def test_resnet20_matches_independent_reference(resnet20, cifar_images, layer, monkeypatch):
    where = [(3, 5), (0, 0), (7, 2), (4, 4), (6, 1), (2, 7)]
    units = _active_units(resnet20, cifar_images, layer, where)
    plain = _reference(resnet20, cifar_images, layer, units)
    results = {m: attribute(resnet20, cifar_images, layer, units, m) for m in METHODS}
    torch.testing.assert_close(results["gradient"], plain)
    for method in ("guided", "deconvnet"):
        with monkeypatch.context() as patch:
            patch.setattr(cifar_resnet, "F", _RuleF(method))
            expected = _reference(resnet20, cifar_images, layer, units)
        torch.testing.assert_close(results[method], expected, rtol=1e-4, atol=1e-6)
        # F.relu calls really went through the rule: far from the plain gradient, per image.
        for i in range(len(units)):
            assert (results[method][i] - plain[i]).abs().max() > 0.1 * plain[i].abs().max()
    # Guided is never larger in support than the gradient: it only ever blocks more.
    assert ((results["guided"] != 0) & (plain == 0)).sum() == 0


@pytest.mark.parametrize("layer", ["layer2.1", "layer3.2.conv2"])
@pytest.mark.parametrize("method", METHODS)
def test_resnet20_batched_equals_one_at_a_time(resnet20, cifar_images, layer, method):
    where = [(1, 2), (5, 5), (0, 7), (3, 3), (7, 0), (6, 6)]
    units = _active_units(resnet20, cifar_images, layer, where)
    singles = torch.cat(
        [attribute(resnet20, cifar_images[i : i + 1], layer, [u], method) for i, u in enumerate(units)]
    )
    assert all(s.abs().sum() > 0 for s in singles)
    whole = attribute(resnet20, cifar_images, layer, units, method)
    batched = attribute_batched(resnet20, cifar_images, layer, units, method, batch_size=4)
    torch.testing.assert_close(whole, singles, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-5)


def test_resnet20_shared_forward_equals_separate_calls(resnet20, cifar_images):
    """On the shared ResNet-20 (F.relu): one forward for the three methods gives each method's result."""
    where = [(1, 2), (5, 5), (0, 7), (3, 3), (7, 0), (6, 6)]
    units = _active_units(resnet20, cifar_images, "layer2.1", where)
    shared = attribute_methods(resnet20, cifar_images, "layer2.1", units)
    for method in METHODS:
        alone = attribute(resnet20, cifar_images, "layer2.1", units, method)
        torch.testing.assert_close(shared[method], alone, rtol=0, atol=1e-6)
    assert (shared["guided"] - shared["gradient"]).abs().max() > 0.1 * shared["gradient"].abs().max()


# Layer -> number of 3x3 stride-1 pad-1 convs on the longest path from the input: each adds 1 px
# of radius to the receptive field (the identity shortcuts are shorter paths, inside it).
RECEPTIVE_RADIUS = {"conv1": 1, "layer1.0.conv1": 2, "layer1.0": 3, "layer1.1.conv1": 4}


@pytest.mark.parametrize("layer", list(RECEPTIVE_RADIUS))
@pytest.mark.parametrize("method", METHODS)
def test_resnet20_zero_outside_receptive_field(resnet20, cifar_images, layer, method):
    r = RECEPTIVE_RADIUS[layer]
    where = [(16, 16), (0, 0), (31, 5), (10, 31), (r, 20), (25, 25)]
    units = _active_units(resnet20, cifar_images, layer, where)
    attr = attribute(resnet20, cifar_images, layer, units, method)
    for i, (_, y, x) in enumerate(units):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[max(y - r, 0) : y + r + 1, max(x - r, 0) : x + r + 1] = True
        support = attr[i].abs().sum(0) != 0
        assert not (support & ~inside).any(), f"image {i} unit {units[i]}: nonzero outside the field"
        assert support.any()
    if method == "gradient":  # the box is tight: the gradient reaches its border rows and columns
        _, y, x = units[0]
        support = attr[0].abs().sum(0) != 0
        assert support[y - r].any() and support[y + r].any()
        assert support[:, x - r].any() and support[:, x + r].any()


# --- several units per input: one forward serves them all ----------------------------------------------


def _per_unit(model: nn.Module, inputs: torch.Tensor, layer: str, units: list, rows: list, method: str) -> torch.Tensor:
    """Each unit on its own: its input alone through the forward, one backward from the unit."""
    return torch.cat([attribute(model, inputs[r:r + 1], layer, [u], method) for u, r in zip(units, rows)])


def test_rounds_hold_one_unit_per_input():
    from sitegen.attribution import _rounds

    assert _rounds(None, 3) == [[0, 1, 2]]
    assert _rounds([2, 0, 2, 2, 1, 0], 6) == [[0, 1, 4], [2, 5], [3]]


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sitegen_tiny_models", Path(__file__).with_name("tiny_models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_cnn().eval()


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_shared_forward_equals_per_unit_with_max_pooling(tiny_model, layer):
    """TinyCNN (conv-ReLU-max-pool-conv-ReLU): max-pooling's switches come from each input's own
    forward, and several units of one input (one of them twice) go back from one forward."""
    torch.manual_seed(1)
    inputs = torch.randn(3, 3, 16, 16)
    side = 16 if layer == "conv1" else 6
    rows = [0, 2, 0, 0, 1, 2, 0]  # input 0: four units, input 1: one, input 2: two
    units = [(0, 3, 4), (1, 0, 0), (2, side - 1, 2), (0, 3, 5), (3 % (4 if layer == "conv1" else 5), 2, 2),
             (1, side - 1, side - 1), (0, 3, 4)]  # the last repeats the first: the same unit twice
    shared = attribute_methods(tiny_model, inputs, layer, units, METHODS, rows=rows)
    for method in METHODS:
        expected = _per_unit(tiny_model, inputs, layer, units, rows, method)
        assert shared[method].shape == (len(units), 3, 16, 16)
        torch.testing.assert_close(shared[method], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared["guided"][0], shared["guided"][6], rtol=0, atol=0)
    assert all(shared["gradient"][i].abs().sum() > 0 for i in range(len(units)))


@pytest.mark.parametrize("layer", ["layer1.0", "layer3.2.conv2"])
def test_shared_forward_equals_per_unit_without_max_pooling(resnet20, cifar_images, layer):
    """The shared ResNet-20 (no max-pooling, F.relu, residual blocks) on real CIFAR images."""
    rows = [0, 0, 0, 3, 3, 5, 1, 0]
    where = [(1, 2), (5, 5), (0, 7), (3, 3), (7, 0), (6, 6), (2, 2), (7, 7)]
    with torch.no_grad():
        out = _reference_forward(resnet20, cifar_images, layer)
    units = [(int(out[r, :, y, x].argmax()), y, x) for r, (y, x) in zip(rows, where)]
    units[2] = (units[0][0], 4, 4)  # the same channel twice on one image
    shared = attribute_methods(resnet20, cifar_images, layer, units, METHODS, rows=rows)
    for method in METHODS:
        expected = _per_unit(resnet20, cifar_images, layer, units, rows, method)
        torch.testing.assert_close(shared[method], expected, rtol=1e-4, atol=1e-6)


def test_rows_are_checked(tiny_model):
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(AttributionError, match="rows for"):
        attribute_methods(tiny_model, x, "conv1", [(0, 1, 1)], METHODS, rows=[0, 1])
    with pytest.raises(AttributionError, match="not an input index"):
        attribute_methods(tiny_model, x, "conv1", [(0, 1, 1)], METHODS, rows=[2])
    # Inputs without units are fine: they go forward and get no attribution.
    got = attribute_methods(tiny_model, x, "conv1", [(0, 1, 1)], ["gradient"], rows=[1])
    assert got["gradient"].shape == (1, 3, 16, 16)


def test_display_normalisation_of_a_batch_equals_one_by_one():
    """The passes normalise a batch of crops at once: each keeps its own scale, byte for byte the
    single-crop result (an all-zero crop grey, a crop whose 99th percentile is 0 scaled by its max)."""
    from sitegen.attribution import normalise_for_display, normalise_many_for_display

    rng = np.random.default_rng(0)
    crops = rng.normal(size=(5, 3, 7, 7)) * np.array([1, 10, 0.01, 0, 1])[:, None, None, None]
    crops[4] = 0
    crops[4, 1, 3, 3] = -2.0  # one pixel: the 99th percentile of |a| is 0
    many = normalise_many_for_display(crops)
    assert many.shape == (5, 7, 7, 3) and many.dtype == np.uint8
    for p in range(5):
        assert np.array_equal(many[p], normalise_for_display(crops[p]))
    assert (many[3] == 128).all() and many[4][3, 3, 1] == 1
    grey = normalise_many_for_display(crops[:, :1])
    assert np.array_equal(grey[0], normalise_for_display(crops[0, :1]))


def test_channels_last_inputs_and_the_cheaper_ops_give_the_same_attributions(monkeypatch):
    """The passes feed channels-last inputs on the CPU and run eval BatchNorm as its affine map
    (sitegen.fastops): every method's attribution is the one of channels-first inputs through
    torch's own BatchNorm, to float rounding, on the CIFAR ResNet (option-A shortcuts, F.relu)."""
    import sitegen.fastops as fastops

    from tiny_models import randomise_batch_norm

    model = randomise_batch_norm(cifar_resnet.resnet20())
    x = torch.randn(6, 3, 32, 32)
    units = [(i % 64, 1 + i % 3, 2 + i % 4) for i in range(6)]
    for layer in ("layer1.1", "layer2.0.conv2", "layer3.2"):
        n = 16 if layer.startswith("layer1") else 32 if layer.startswith("layer2") else 64
        us = [(c % n, y, x_) for c, y, x_ in units]
        fast = {"NHWC": attribute_methods(model, x.contiguous(memory_format=torch.channels_last), layer, us, METHODS),
                "NCHW": attribute_methods(model, x, layer, us, METHODS)}
        with monkeypatch.context() as mp:
            mp.setattr(fastops, "affine_batch_norm", lambda *a: None)
            mp.setattr(fastops, "_LAYOUT_LOSING", set())
            native = attribute_methods(model, x, layer, us, METHODS)
        for m in METHODS:
            scale = float(native[m].abs().max())
            assert scale > 0
            for name, got in fast.items():
                torch.testing.assert_close(got[m], native[m], rtol=1e-4, atol=1e-5 * scale,
                                           msg=lambda s, name=name, m=m, layer=layer: f"{layer} {m} {name}: {s}")
