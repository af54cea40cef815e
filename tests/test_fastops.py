"""sitegen.fastops: the cheaper forward and backward equal the model's own, to rounding."""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cifar_resnet import resnet20
from tiny_models import randomise_batch_norm
from sitegen.fastops import FastOps, find_folds


@pytest.mark.parametrize("affine", [True, False])
def test_eval_batch_norm_is_its_affine_map(affine):
    """Under FastOps, eval-mode BatchNorm is x·s + t: the same function as torch's (forward and
    backward, to float rounding); a training-mode call and anything else run unchanged."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        if affine:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    x = torch.randn(3, 5, 4, 6, requires_grad=True)
    g = torch.randn(3, 5, 4, 6)
    want = bn(x)
    (want_grad,) = torch.autograd.grad(want, x, g)
    with FastOps():
        got = bn(x)
        (got_grad,) = torch.autograd.grad(got, x, g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    # By hand for one element: (x − μ)/√(σ² + ε)·γ + β.
    c = 2
    gamma, beta = (bn.weight[c], bn.bias[c]) if affine else (1.0, 0.0)
    hand = (x[1, c, 2, 3] - bn.running_mean[c]) / torch.sqrt(bn.running_var[c] + bn.eps) * gamma + beta
    torch.testing.assert_close(got[1, c, 2, 3], hand.detach(), rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16), FastOps():  # stays in the map's precision
        assert bn(x.bfloat16()).dtype == torch.bfloat16
    train = nn.BatchNorm2d(5).train()
    with FastOps():
        out = train(x)
    assert train.num_batches_tracked.item() == 1  # the real training-mode call ran
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(5), atol=1e-5, rtol=0)


def _layout(t: torch.Tensor) -> str | None:
    """'NHWC' / 'NCHW' for a 4-D map whose layout is one of them and not both; None otherwise."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] == 1 or t.shape[2] * t.shape[3] == 1:
        return None
    cl, cf = t.is_contiguous(memory_format=torch.channels_last), t.is_contiguous()
    return "NHWC" if cl and not cf else "NCHW" if cf and not cl else "other"


class _MixedLayouts(TorchDispatchMode):
    """Counts the backward's elementwise ops (ReLU backward, gradient sums, products) whose map
    arguments mix layouts: torch's slow path (2.8 ms against 0.14 ms for one ReLU backward)."""

    OPS = ("threshold_backward", "add.Tensor", "mul.Tensor", "mul_.Tensor")

    def __init__(self):
        super().__init__()
        self.mixed = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(name.endswith(op) for op in self.OPS):
            kinds = {k for k in map(_layout, args) if k}
            if len(kinds) > 1:
                self.mixed[name] += 1
        return func(*args, **(kwargs or {}))


def test_gradients_stay_channels_last_and_equal_autograds():
    """The CIFAR ResNet's shortcut (``x[:, :, ::2, ::2]``) and a mean over the map hand back
    channels-first gradients: without FastOps the backward then mixes layouts; with it none
    does, and the input gradient is autograd's own to rounding."""
    torch.manual_seed(0)
    model = resnet20().eval()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def grad(fast: bool):
        xx = x.clone().requires_grad_(True)
        spy = _MixedLayouts()
        with FastOps() if fast else contextlib.nullcontext():
            h = model.layer3(model.layer2(model.layer1(torch.relu(model.bn1(model.conv1(xx))))))
            objective = h.mean(dim=(2, 3))[:, 5].sum()
        with spy:
            (g,) = torch.autograd.grad(objective, xx)
        return g, spy.mixed

    plain, mixed_plain = grad(False)
    fast, mixed_fast = grad(True)
    assert sum(mixed_plain.values()) > 0, mixed_plain  # the case the shortcut exists for
    assert not mixed_fast, mixed_fast
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-6 * float(plain.abs().max()))


def test_channels_first_maps_are_left_alone():
    """A channels-first map's gradient is not copied into another layout."""
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    with FastOps():
        y = x[:, :, ::2, ::2].sum()
    (g,) = torch.autograd.grad(y, x)
    assert g.is_contiguous()
    assert g[0, 0, 0, 0] == 1 and g[0, 0, 0, 1] == 0


def test_derived_values_are_made_once_and_never_stale():
    """One FastOps entered for many steps derives BatchNorm's scale and shift and autocast's
    weight casts once; a tensor changed in place is derived again; results equal fresh ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 6, 6)
    fast = FastOps()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with fast:
            first = model(x)
        n = len(fast.derived._values)
        with fast:
            again = model(x)
        assert len(fast.derived._values) == n == 3  # BatchNorm's pair, the conv's weight and bias
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        with torch.no_grad():
            model[1].running_mean.add_(1.0)  # in place: a new version
        with fast:
            moved = model(x)
        with FastOps():
            fresh = model(x)
    torch.testing.assert_close(moved, fresh, rtol=0, atol=0)
    assert not torch.equal(moved, first)


def test_nothing_is_cached_from_tensors_that_require_grad():
    bn = nn.BatchNorm2d(3).eval()  # weight and bias require grad
    x = torch.randn(2, 3, 4, 4)
    fast = FastOps()
    for _ in range(2):
        with fast:
            bn(x).sum().backward()
    assert not fast.derived._values
    assert bn.weight.grad is not None and torch.isfinite(bn.weight.grad).all()


# --- BatchNorm folded into the convolution before it ----------------------------------------------


def test_folds_found_on_torchvision_resnet():
    import torchvision

    model = randomise_batch_norm(torchvision.models.resnet18(num_classes=10))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    x = torch.zeros(1, 3, 32, 32)
    folds = find_folds(model, x)
    assert len(folds) == len(convs) == 20  # every convolution feeds only its BatchNorm
    read = find_folds(model, x, ["layer2.0.conv1"], stop=True)
    names = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    folded = {names[k] for k in read}
    assert "layer2.0.conv1" not in folded  # its output is captured: left as it is
    assert "layer1.1.conv2" in folded and "layer2.0.conv2" not in folded  # nothing after the stop ran


class _Reused(nn.Module):
    """conv1's output is read twice (its BatchNorm and the sum); conv2 is called twice with two
    BatchNorms; only conv3 may be folded."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2a, self.bn2b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv1(x)
        y = torch.relu(self.bn1(y) + y)
        y = self.bn2b(self.conv2(torch.relu(self.bn2a(self.conv2(y)))))
        return self.bn3(self.conv3(y))


def test_folds_only_where_nothing_else_reads_the_output():
    model = randomise_batch_norm(_Reused())
    x = torch.randn(2, 3, 6, 6)
    assert set(find_folds(model, x)) == {id(model.conv3.weight)}
    handle = model.bn3.register_forward_hook(lambda *a: None)  # a hook of the user's might read anything
    try:
        assert find_folds(model, x) == {}
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["resnet20", "torchvision:resnet18", "reused"])
def test_folded_forward_and_backward_equal_the_models_own(arch):
    import torchvision

    if arch == "resnet20":
        model = randomise_batch_norm(resnet20())
    elif arch == "reused":
        model = randomise_batch_norm(_Reused())
    else:
        model = randomise_batch_norm(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(3, 3, 32, 32)
    folds = find_folds(model, x[:1])
    assert folds
    outs = {}
    for fast in (False, True):
        xx = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        with FastOps(folds=folds) if fast else contextlib.nullcontext():
            y = model(xx)
            (g,) = torch.autograd.grad(y[:, 1].sum(), xx)
        outs[fast] = (y.detach(), g)
    for got, want in zip(outs[True], outs[False]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
