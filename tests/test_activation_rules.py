"""Tests for sitegen.activation_rules: each activation's rules against derivatives written by hand,
every call spelling, the squeeze-and-excitation gate, and finding the kinds a model uses."""
from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import SqueezeExcitation

from sitegen.activation_rules import (GATE, PRODUCT, RULES, ActivationReport, describe_unruled,
                                      find_activations)
from sitegen.attribution import METHODS, AttributionWarning, attribute, attribute_methods

# --- derivatives written by hand, in float64 NumPy ---------------------------------------------------


def _sigma(x):
    return 1.0 / (1.0 + np.exp(-x))


def _phi(x):
    return np.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _Phi(x):
    return np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in np.ravel(x)]).reshape(np.shape(x))


def _gelu_tanh_prime(x):
    c = math.sqrt(2 / math.pi)
    t = np.tanh(c * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


def _mish_prime(x):
    t = np.tanh(np.log1p(np.exp(x)))
    return t + x * _sigma(x) * (1 - t * t)


PRELU_SLOPE = 0.25

# kind -> (the activation as a module, f'(x) by hand)
DERIVATIVES: dict[str, tuple[Callable[[], nn.Module], Callable[[np.ndarray], np.ndarray]]] = {
    "relu": (nn.ReLU, lambda x: (x > 0) * 1.0),
    "relu6": (nn.ReLU6, lambda x: ((x > 0) & (x < 6)) * 1.0),
    "hardtanh": (lambda: nn.Hardtanh(-1.0, 2.0), lambda x: ((x > -1) & (x < 2)) * 1.0),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), lambda x: np.where(x > 0, 1.0, 0.1)),
    "prelu": (lambda: nn.PReLU(1, init=PRELU_SLOPE), lambda x: np.where(x > 0, 1.0, PRELU_SLOPE)),
    "elu": (lambda: nn.ELU(1.3), lambda x: np.where(x > 0, 1.0, 1.3 * np.exp(x))),
    "silu": (nn.SiLU, lambda x: _sigma(x) * (1 + x * (1 - _sigma(x)))),
    "gelu": (nn.GELU, lambda x: _Phi(x) + x * _phi(x)),
    "gelu (tanh)": (lambda: nn.GELU("tanh"), _gelu_tanh_prime),
    "hardswish": (nn.Hardswish, lambda x: np.where(x < -3, 0.0, np.where(x <= 3, (2 * x + 3) / 6, 1.0))),
    "hardsigmoid": (nn.Hardsigmoid, lambda x: ((x > -3) & (x < 3)) / 6.0),
    "mish": (nn.Mish, _mish_prime),
    "sigmoid": (nn.Sigmoid, lambda x: _sigma(x) * (1 - _sigma(x))),
    "tanh": (nn.Tanh, lambda x: 1 - np.tanh(x) ** 2),
}

# One row of inputs that visits every region of every activation (no kink hit exactly) and a
# second-layer kernel whose negative entries meet activations of nonzero slope (x = 1.5, -0.2).
X = np.array([-4.0, -2.0, -0.7, -0.2, 0.4, 1.5, 3.5, 7.0])
K = np.array([1.0, -1.0, 2.0, -3.0, 1.5, -2.0, 0.5, -0.5])


def _one_activation_net(act: nn.Module) -> nn.Sequential:
    """x -> conv 1×1 (weight 1: the activation's input is x) -> act -> conv with kernel K (one unit)."""
    first, last = nn.Conv2d(1, 1, 1, bias=False), nn.Conv2d(1, 1, (1, len(K)), bias=False)
    with torch.no_grad():
        first.weight.fill_(1.0)
        last.weight.copy_(torch.tensor(K, dtype=torch.float32).reshape(1, 1, 1, -1))
    return nn.Sequential(first, act, last)


@pytest.mark.parametrize("name", list(DERIVATIVES))
def test_each_rule_against_a_hand_derived_backward(name: str):
    make, fprime = DERIVATIVES[name]
    model = _one_activation_net(make()).eval()
    inputs = torch.tensor(X, dtype=torch.float32).reshape(1, 1, 1, -1)
    d = fprime(X)
    expected = {
        "gradient": K * d,  # dL/dy = K, times f'(x)
        "guided": np.maximum(K, 0) * d,  # the rectified gradient, times f'(x)
        "deconvnet": np.maximum(K, 0),  # the rectified gradient, whatever x was
    }
    got = attribute_methods(model, inputs, "2", [(0, 0, 0)])
    for method in METHODS:
        np.testing.assert_allclose(got[method].reshape(-1).numpy(), expected[method], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{name} {method}")
        # One method at a time (a forward of its own) gives the same.
        alone = attribute(model, inputs, "2", [(0, 0, 0)], method)
        np.testing.assert_allclose(alone.reshape(-1).numpy(), expected[method], rtol=1e-5, atol=1e-6)
    # The rules matter here: guided backprop and deconvnet are not the gradient, nor each other.
    for a, b in (("guided", "gradient"), ("deconvnet", "gradient"), ("guided", "deconvnet")):
        assert np.abs(expected[a] - expected[b]).max() > 0.05, (name, a, b)


# --- every spelling ----------------------------------------------------------------------------------


def _discarded(inplace_act: Callable[[torch.Tensor], object]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network ignores the return value: only a truly in-place call gives the right forward."""

    def act(t: torch.Tensor) -> torch.Tensor:
        inplace_act(t)
        return t

    return act


def _prelu_weight() -> torch.Tensor:
    return torch.linspace(-0.2, 0.4, 6)  # one slope per channel, one of them negative


# kind -> [(spelling, factory of the callable applied at both activation sites)]
SPELLINGS: dict[str, list[tuple[str, Callable[[], Callable]]]] = {
    "relu6": [
        ("nn.ReLU6", lambda: nn.ReLU6()),
        ("nn.ReLU6(inplace=True)", lambda: nn.ReLU6(inplace=True)),
        ("nn.ReLU6(inplace=True), result discarded", lambda: _discarded(nn.ReLU6(inplace=True))),
        ("F.relu6", lambda: F.relu6),
        ("F.relu6(inplace=True)", lambda: lambda t: F.relu6(t, inplace=True)),
        ("F.hardtanh(0, 6)", lambda: lambda t: F.hardtanh(t, 0.0, 6.0)),
        ("F.hardtanh_(0, 6), result discarded", lambda: _discarded(lambda t: F.hardtanh_(t, 0.0, 6.0))),
        ("torch._C._nn.relu6_", lambda: torch._C._nn.relu6_),
    ],
    "hardtanh": [
        ("nn.Hardtanh(-1, 2)", lambda: nn.Hardtanh(-1.0, 2.0)),
        ("nn.Hardtanh(-1, 2, inplace=True)", lambda: nn.Hardtanh(-1.0, 2.0, inplace=True)),
        ("F.hardtanh(min_val=, max_val=)", lambda: lambda t: F.hardtanh(t, min_val=-1.0, max_val=2.0)),
        ("F.hardtanh(inplace=True), discarded",
         lambda: _discarded(lambda t: F.hardtanh(t, -1.0, 2.0, inplace=True))),
        ("F.hardtanh_", lambda: lambda t: F.hardtanh_(t, -1.0, 2.0)),
    ],
    "leaky_relu": [
        ("nn.LeakyReLU", lambda: nn.LeakyReLU(0.1)),
        ("nn.LeakyReLU(inplace=True), discarded", lambda: _discarded(nn.LeakyReLU(0.1, inplace=True))),
        ("F.leaky_relu", lambda: lambda t: F.leaky_relu(t, 0.1)),
        ("F.leaky_relu(negative_slope=, inplace=True)",
         lambda: lambda t: F.leaky_relu(t, negative_slope=0.1, inplace=True)),
        ("F.leaky_relu_, discarded", lambda: _discarded(lambda t: F.leaky_relu_(t, 0.1))),
    ],
    "prelu": [
        ("nn.PReLU(6)", lambda: _prelu_module()),
        ("F.prelu", lambda: lambda t: F.prelu(t, _prelu_weight())),
        ("torch.prelu", lambda: lambda t: torch.prelu(t, _prelu_weight())),
        ("Tensor.prelu", lambda: lambda t: t.prelu(_prelu_weight())),
    ],
    "elu": [
        ("nn.ELU", lambda: nn.ELU(1.3)),
        ("nn.ELU(inplace=True), discarded", lambda: _discarded(nn.ELU(1.3, inplace=True))),
        ("F.elu", lambda: lambda t: F.elu(t, 1.3)),
        ("F.elu(alpha=, inplace=True)", lambda: lambda t: F.elu(t, alpha=1.3, inplace=True)),
        ("F.elu_, discarded", lambda: _discarded(lambda t: F.elu_(t, 1.3))),
    ],
    "silu": [
        ("nn.SiLU", lambda: nn.SiLU()),
        ("nn.SiLU(inplace=True), discarded", lambda: _discarded(nn.SiLU(inplace=True))),
        ("F.silu", lambda: F.silu),
        ("F.silu(inplace=True)", lambda: lambda t: F.silu(t, inplace=True)),
        ("torch._C._nn.silu_, discarded", lambda: _discarded(torch._C._nn.silu_)),
    ],
    "gelu": [
        ("nn.GELU", lambda: nn.GELU()),
        ("F.gelu", lambda: F.gelu),
        ("F.gelu(input=)", lambda: lambda t: F.gelu(input=t)),
    ],
    "gelu (tanh)": [
        ("nn.GELU('tanh')", lambda: nn.GELU("tanh")),
        ("F.gelu(approximate='tanh')", lambda: lambda t: F.gelu(t, approximate="tanh")),
    ],
    "hardswish": [
        ("nn.Hardswish", lambda: nn.Hardswish()),
        ("nn.Hardswish(inplace=True), discarded", lambda: _discarded(nn.Hardswish(inplace=True))),
        ("F.hardswish", lambda: F.hardswish),
        ("F.hardswish(inplace=True)", lambda: lambda t: F.hardswish(t, inplace=True)),
    ],
    "hardsigmoid": [
        ("nn.Hardsigmoid", lambda: nn.Hardsigmoid()),
        ("nn.Hardsigmoid(inplace=True), discarded", lambda: _discarded(nn.Hardsigmoid(inplace=True))),
        ("F.hardsigmoid", lambda: F.hardsigmoid),
        ("F.hardsigmoid(inplace=True)", lambda: lambda t: F.hardsigmoid(t, True)),
    ],
    "mish": [
        ("nn.Mish", lambda: nn.Mish()),
        ("nn.Mish(inplace=True), discarded", lambda: _discarded(nn.Mish(inplace=True))),
        ("F.mish", lambda: F.mish),
        ("F.mish(inplace=True)", lambda: lambda t: F.mish(t, inplace=True)),
    ],
    "sigmoid": [
        ("nn.Sigmoid", lambda: nn.Sigmoid()),
        ("torch.sigmoid", lambda: torch.sigmoid),
        ("Tensor.sigmoid", lambda: torch.Tensor.sigmoid),
        ("F.sigmoid", lambda: F.sigmoid),
        ("torch.special.expit", lambda: torch.special.expit),
        ("torch.sigmoid_, discarded", lambda: _discarded(torch.sigmoid_)),
        ("Tensor.sigmoid_, discarded", lambda: _discarded(torch.Tensor.sigmoid_)),
    ],
    "tanh": [
        ("nn.Tanh", lambda: nn.Tanh()),
        ("torch.tanh", lambda: torch.tanh),
        ("Tensor.tanh", lambda: torch.Tensor.tanh),
        ("F.tanh", lambda: F.tanh),
        ("torch.tanh_, discarded", lambda: _discarded(torch.tanh_)),
        ("Tensor.tanh_, discarded", lambda: _discarded(torch.Tensor.tanh_)),
    ],
}


def _prelu_module() -> nn.PReLU:
    m = nn.PReLU(6)
    with torch.no_grad():
        m.weight.copy_(_prelu_weight())
    return m


def _torch_prime(kind: str, t: torch.Tensor) -> torch.Tensor:
    """f'(x) for the spelling tests, written out in torch (not through autograd)."""
    s = torch.sigmoid(t)
    if kind == "relu6":
        return ((t > 0) & (t < 6)).to(t.dtype)
    if kind == "hardtanh":
        return ((t > -1) & (t < 2)).to(t.dtype)
    if kind == "leaky_relu":
        return torch.where(t > 0, 1.0, 0.1)
    if kind == "prelu":
        return torch.where(t > 0, torch.ones_like(t), _prelu_weight().reshape(1, -1, 1, 1).expand_as(t))
    if kind == "elu":
        return torch.where(t > 0, 1.0, 1.3 * torch.exp(t))
    if kind == "silu":
        return s * (1 + t * (1 - s))
    if kind == "gelu":
        return 0.5 * (1 + torch.erf(t / math.sqrt(2))) + t * torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    if kind == "gelu (tanh)":
        c = math.sqrt(2 / math.pi)
        th = torch.tanh(c * (t + 0.044715 * t ** 3))
        return 0.5 * (1 + th) + 0.5 * t * (1 - th * th) * c * (1 + 3 * 0.044715 * t * t)
    if kind == "hardswish":
        return torch.where(t < -3, 0.0, torch.where(t <= 3, (2 * t + 3) / 6, 1.0))
    if kind == "hardsigmoid":
        return ((t > -3) & (t < 3)).to(t.dtype) / 6
    if kind == "mish":
        th = torch.tanh(torch.log1p(torch.exp(t)))
        return th + t * s * (1 - th * th)
    if kind == "sigmoid":
        return s * (1 - s)
    if kind == "tanh":
        return 1 - torch.tanh(t) ** 2
    raise KeyError(kind)


class _Reference(torch.autograd.Function):
    """The rules as stated, with f'(x) written out: guided g⁺·f'(x), deconvnet g⁺, gradient g·f'(x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, f: Callable, kind: str, method: str) -> torch.Tensor:
        ctx.method = method
        ctx.save_for_backward(_torch_prime(kind, x))
        return f(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (d,) = ctx.saved_tensors
        if ctx.method == "deconvnet":
            return g.clamp(min=0), None, None, None
        if ctx.method == "guided":
            return g.clamp(min=0) * d, None, None, None
        return g * d, None, None, None


class _TwoActNet(nn.Module):
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


def _reference(kind: str, method: str, inputs: torch.Tensor, units: list) -> torch.Tensor:
    """Plain autograd through _Reference at both sites, full forward, one-hot backward."""
    f = (lambda t: torch.prelu(t, _prelu_weight())) if kind == "prelu" else DERIVATIVES[kind][0]()
    model = _TwoActNet(lambda: lambda t: _Reference.apply(t, f, kind, method)).eval()
    x = inputs.clone().requires_grad_(True)
    out = model(x)
    onehot = torch.zeros_like(out)
    for i, (c, y, xx) in enumerate(units):
        onehot[i, c, y, xx] = 1.0
    (grad,) = torch.autograd.grad(out, x, onehot)
    return grad


INPUTS = 3 * torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(1))  # wide: reaches ±3, 6
UNITS = [(0, 4, 4), (3, 5, 2), (1, 0, 9)]


@pytest.mark.parametrize("kind, spelling", [(k, s) for k, forms in SPELLINGS.items() for s, _ in forms])
def test_every_spelling_follows_the_rule(kind: str, spelling: str):
    make = dict(SPELLINGS[kind])[spelling]
    model = _TwoActNet(make).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttributionWarning)  # every spelling has its rule: no warning
        got = attribute_methods(model, INPUTS, "conv3", UNITS)
    for method in METHODS:
        expected = _reference(kind, method, INPUTS, UNITS)
        torch.testing.assert_close(got[method], expected, rtol=1e-4, atol=1e-6, msg=f"{spelling} {method}")
    # The rules change the picture on this net, so a spelling that missed its rule could not pass.
    for method in ("guided", "deconvnet"):
        diff = (got[method] - got["gradient"]).abs().max()
        assert diff > 1e-2 * got["gradient"].abs().max(), (spelling, method)


def test_spellings_cover_every_ruled_kind():
    assert {k.split(" ")[0] for k in SPELLINGS} | {"relu"} == set(RULES) - {GATE}
    assert set(DERIVATIVES) - {"gelu (tanh)"} == set(RULES) - {GATE}


def test_inplace_activation_on_a_view():
    class Net(nn.Module):
        def __init__(self, partial: Callable[[torch.Tensor], torch.Tensor]):
            super().__init__()
            torch.manual_seed(0)
            self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
            self.partial = partial

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(self.partial(self.conv1(x)))

    def in_place(h: torch.Tensor) -> torch.Tensor:
        F.silu(h[:, :3], inplace=True)
        return h

    def out_of_place(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.silu(h[:, :3]), h[:, 3:]], dim=1)

    a = attribute_methods(Net(in_place), INPUTS, "conv2", UNITS)
    b = attribute_methods(Net(out_of_place), INPUTS, "conv2", UNITS)
    for method in METHODS:
        torch.testing.assert_close(a[method], b[method])


def test_output_changed_in_place_afterwards():
    """The derivative is kept, not the input or output: editing either later breaks nothing."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)

        def forward(self, x):
            h = self.conv1(x)
            y = torch.sigmoid(h)
            h.mul_(2.0)  # the sigmoid's input changes after the call
            return self.conv2(y + h)

    got = attribute_methods(Net(), INPUTS, "conv2", UNITS)
    assert all(torch.isfinite(g).all() for g in got.values())


# --- squeeze-and-excitation gates --------------------------------------------------------------------


class _SENet(nn.Module):
    """conv -> squeeze-and-excitation -> conv; ``combine(map, scale)`` is how the model multiplies."""

    def __init__(self, combine: Callable, hard: bool = False, linear: bool = False, hold: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
        self.fc1, self.fc2 = (nn.Linear(6, 3), nn.Linear(3, 6)) if linear else (nn.Conv2d(6, 3, 1), nn.Conv2d(3, 6, 1))
        self.gate = nn.Hardsigmoid() if hard else nn.Sigmoid()
        self.combine, self.linear, self.hold = combine, linear, hold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        pooled = h.mean((2, 3)) if self.linear else F.adaptive_avg_pool2d(h, 1)
        s = self.gate(self.fc2(F.relu(self.fc1(pooled))))
        if self.linear:
            s = s.view(s.shape[0], -1, 1, 1)
        if self.hold:  # the reference: the scale as a constant
            s = s.detach()
        return self.conv2(self.combine(h, s))


def _inplace_mul(h, s):
    y = h.clone()
    y.mul_(s)
    return y


def _augmented(h, s):
    y = h.clone()
    y *= s
    return y


GATE_FORMS = {
    "scale * input (SqueezeExcitation)": dict(combine=lambda h, s: s * h),
    "input * scale": dict(combine=lambda h, s: h * s),
    "torch.mul": dict(combine=torch.mul),
    "torch.mul(input=, other=)": dict(combine=lambda h, s: torch.mul(input=h, other=s)),
    "Tensor.mul": dict(combine=lambda h, s: h.mul(s)),
    "Tensor.mul_": dict(combine=_inplace_mul),
    "*=": dict(combine=_augmented),
    "input * scale.expand_as(input)": dict(combine=lambda h, s: h * s.expand_as(h)),
    "hardsigmoid gate": dict(combine=lambda h, s: s * h, hard=True),
    "Linear SE, (N, C) viewed": dict(combine=lambda h, s: h * s, linear=True),
}


def _plain(model: nn.Module, inputs: torch.Tensor, layer: str, units: list) -> torch.Tensor:
    x = inputs.clone().requires_grad_(True)
    store = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.setdefault("out", o))
    try:
        model(x)
    finally:
        handle.remove()
    onehot = torch.zeros_like(store["out"])
    for i, (c, y, xx) in enumerate(units):
        onehot[i, c, y, xx] = 1.0
    return torch.autograd.grad(store["out"], x, onehot)[0]


@pytest.mark.parametrize("form", list(GATE_FORMS))
def test_gate_is_a_scale_held_constant(form: str):
    kw = GATE_FORMS[form]
    got = attribute_methods(_SENet(**kw).eval(), INPUTS, "conv2", UNITS)
    held = _plain(_SENet(**kw, hold=True).eval(), INPUTS, "conv2", UNITS)  # no activation on the main path
    full = _plain(_SENet(**kw).eval(), INPUTS, "conv2", UNITS)
    torch.testing.assert_close(got["guided"], held, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["deconvnet"], held, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["gradient"], full, rtol=1e-5, atol=1e-7)  # the product rule, whole
    assert (held - full).abs().max() > 1e-3 * full.abs().max()  # the gate's branch matters here


def test_torchvision_squeeze_excitation():
    class Net(nn.Module):
        def __init__(self, hold: bool = False):
            super().__init__()
            torch.manual_seed(0)
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
            self.se = SqueezeExcitation(8, 4)
            self.hold = hold

        def forward(self, x):
            h = self.conv1(x)
            if self.hold:
                return self.conv2(self.se._scale(h).detach() * h)
            return self.conv2(self.se(h))

    got = attribute_methods(Net().eval(), INPUTS, "conv2", UNITS)
    held = _plain(Net(hold=True).eval(), INPUTS, "conv2", UNITS)
    torch.testing.assert_close(got["guided"], held, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["gradient"], _plain(Net().eval(), INPUTS, "conv2", UNITS), rtol=1e-5, atol=1e-7)


# --- finding the kinds ------------------------------------------------------------------------------


class _Softplus(nn.Module):
    def forward(self, x):
        return F.softplus(x)


class _Branches(nn.Module):
    """Two branches from one stem: softplus in branch a only, SiLU (module and function) in b."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.soft = _Softplus()
        self.act = nn.SiLU(inplace=True)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        s = self.act(self.stem(x))
        a = self.a(self.soft(s))
        b = self.b(F.silu(s))
        return self.head(torch.cat([a, b], 1)).mean((2, 3))


def test_find_activations_names_kinds_calls_and_affected_layers():
    model = _Branches()
    report = find_activations(model, (3, 12, 12), layers=["stem", "a", "b", "head"])
    kinds = {k.kind: k for k in report.kinds}
    assert list(kinds) == ["silu", "softplus"]
    assert kinds["silu"].calls == ("nn.SiLU (in place)", "F.silu") and kinds["silu"].count == 2
    assert kinds["silu"].ruled and (kinds["silu"].guided, kinds["silu"].deconvnet) == RULES["silu"]
    assert not kinds["softplus"].ruled and "plain gradient" in kinds["softplus"].guided
    assert kinds["softplus"].calls == ("F.softplus",)
    # softplus lies on the paths to a and head only (not the stem, not branch b).
    assert report.affected == {"a": ("softplus",), "head": ("softplus",)}
    assert report.unruled == ["softplus"]
    assert ActivationReport.from_dict(report.to_dict()) == report
    assert "softplus" in describe_unruled(report, 4) and "2 of 4 selected layers lie behind it" in describe_unruled(report, 4)


def test_find_activations_gates_products_and_custom_functions():
    class Swish(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * torch.sigmoid(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            s = torch.sigmoid(x)
            return g * s * (1 + x * (1 - s))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.conv3 = (nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                                                  nn.Conv2d(4, 4, 3, padding=1))
            self.se = SqueezeExcitation(4, 2)

        def forward(self, x):
            h = self.se(self.conv1(x))
            h = self.conv2(h * torch.sigmoid(h))  # a hand-written swish: a product of two maps
            return self.conv3(Swish.apply(h))

    report = find_activations(Net(), torch.randn(3, 10, 10), layers=["conv1", "conv2", "conv3"])
    kinds = {k.kind: k for k in report.kinds}
    assert kinds[GATE].calls == ("* in SqueezeExcitation",) and kinds[GATE].ruled
    assert kinds["relu"].calls == ("nn.ReLU on pooled vectors",)
    assert set(kinds["sigmoid"].calls) == {"nn.Sigmoid on pooled vectors", "torch.sigmoid"}
    assert not kinds[PRODUCT].ruled and kinds[PRODUCT].calls == ("* in Net",)
    assert not kinds["custom autograd.Function Swish"].ruled
    assert report.affected == {"conv2": (PRODUCT,), "conv3": (PRODUCT, "custom autograd.Function Swish")}


def test_find_activations_leaves_the_model_as_it_was():
    model = _Branches().train()
    model.a.weight.requires_grad_(False)
    before = ([(m, m.training) for m in model.modules()], [(p, p.requires_grad) for p in model.parameters()])
    find_activations(model, (3, 8, 8), layers=["a"])
    assert [(m, m.training) for m in model.modules()] == before[0]
    assert [(p, p.requires_grad) for p in model.parameters()] == before[1]
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_attribution_warns_about_kinds_without_rule():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _Softplus(), nn.Conv2d(4, 4, 1))
    with pytest.warns(AttributionWarning, match="softplus"):
        attribute(model, INPUTS, "2", UNITS, "guided")


# --- torchvision's architectures --------------------------------------------------------------------

TORCHVISION = {
    # name: (a layer behind activations, the kinds in the order met)
    "mobilenet_v3_small": ("features.4.block.0.0", ["hardswish", "relu", "hardsigmoid", GATE]),
    "efficientnet_b0": ("features.2.0.block.0.0", ["silu", "sigmoid", GATE]),
    "regnet_y_400mf": ("trunk_output.block1.block1-0.f.b.0", ["relu", "sigmoid", GATE]),
    "convnext_tiny": ("features.1.1.block.0", ["gelu"]),
    "mobilenet_v2": ("features.3.conv.0.0", ["relu6"]),
}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_models_kinds_and_rules(name: str):
    import torchvision

    layer, kinds = TORCHVISION[name]
    model = torchvision.models.get_model(name, weights=None).train()
    with torch.no_grad():  # ConvNeXt starts its residual branches at 1e-6 (layer scale): make them dominate
        for m in model.modules():
            if isinstance(getattr(m, "layer_scale", None), torch.Tensor):
                m.layer_scale.fill_(100.0)
    flags = [p.requires_grad for p in model.parameters()]
    report = find_activations(model, (3, 32, 32), layers=[layer])
    assert [k.kind for k in report.kinds] == kinds and all(k.ruled for k in report.kinds)
    assert report.affected == {}
    if GATE in kinds:
        assert next(k for k in report.kinds if k.kind == GATE).calls == ("* in SqueezeExcitation",)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttributionWarning)
        got = attribute_methods(model, x, layer, [(0, 1, 1), (1, 0, 0)])
    for method in ("guided", "deconvnet"):
        assert (got[method] - got["gradient"]).abs().max() > 0.1 * got["gradient"].abs().max(), method
    assert all(m.training for m in model.modules()) and [p.requires_grad for p in model.parameters()] == flags
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
