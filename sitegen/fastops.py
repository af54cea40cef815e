"""Cheaper forward and backward passes through a fixed model, the same function up to rounding.

Used by the passes that run a backward from a model whose weights do not change (attribution, the
sanity checks, the feature-vis steps); the dataset pass's stored activations and every stored
feature-vis objective come from the model's own ops.

Eval-mode BatchNorm as the per-channel affine map it is: ``x · s + t`` with
``s = γ / √(σ² + ε)`` and ``t = β − μ·s``, computed in ``x``'s own precision.  The same function as ``batch_norm`` up to rounding, but one fused multiply-add forward and one
multiply backward.  ``native_batch_norm``'s backward took 8–16 % of a ResNet-56 forward-and-backward
on the CPU (more on channels-last maps, where its kernel is slow), and under bfloat16 autocast it
casts every map to float32 and back.  Training-mode calls, and calls without running statistics,
run unchanged.

Gradients of channels-last maps kept channels-last: the backward of indexing (``x[:, :, ::2, ::2]``,
the CIFAR ResNets' shortcut) and of a mean or sum over a map hands back a channels-first (or
expanded) gradient, and every later step of the backward then mixes layouts: torch's ReLU backward
on a channels-first gradient and a channels-last map took 2.8 ms against 0.14 ms for one
64×16×32×32 map on this CPU, and the convolutions' backward reorders their inputs.  Such calls get
their input through :class:`_SameLayoutGrad`, whose backward returns the gradient channels-last.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


def batch_norm_args(args: tuple, kwargs: dict) -> tuple | None:
    """``(input, running_mean, running_var, weight, bias, eps)`` of an eval-mode ``F.batch_norm``
    call with running statistics (None for any other call: it runs unchanged)."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    bound = {**defaults, **dict(zip(names, args)), **kwargs}
    x, mean, var = bound.get("input"), bound.get("running_mean"), bound.get("running_var")
    if bound["training"] or not all(isinstance(t, torch.Tensor) for t in (x, mean, var)) or x.dim() < 2:
        return None
    return x, mean, var, bound["weight"], bound["bias"], float(bound["eps"])


class Derived:
    """Values derived from a model's frozen tensors (BatchNorm's scale and shift, weights cast for
    autocast), made once and reused for as long as the object lives: a feature-vis ascent keeps
    one for all its steps, where they were recomputed at every call (47 BatchNorms and 57
    convolutions a step on the shared ResNet-56).  Keyed by the tensors themselves and their
    version counters, so a tensor changed in place is derived again, never read stale; tensors
    that require grad (their derived values would carry a graph between steps) and calls in
    inference mode (whose tensors autograd cannot save later) are not cached."""

    def __init__(self):
        self._values: dict[tuple, tuple[tuple, object]] = {}

    def get(self, tag: str, tensors: tuple, make):
        if torch.is_inference_mode_enabled() or any(t is not None and t.requires_grad for t in tensors):
            return make()
        key = (tag,) + tuple(None if t is None else (id(t), t._version) for t in tensors)
        hit = self._values.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], tensors)):
            return hit[1]
        value = make()
        self._values[key] = (tensors, value)  # the tensors are kept alive, so their ids stay theirs
        return value


def affine_batch_norm(func, args: tuple, kwargs: dict, derived: Derived | None = None) -> torch.Tensor | None:
    """The affine map of an eval-mode ``F.batch_norm`` call; None when ``func`` is something else or
    the call is not one (the caller then runs it unchanged)."""
    if func is not torch.nn.functional.batch_norm:
        return None
    bound = batch_norm_args(args, kwargs)
    if bound is None:
        return None
    x, mean, var, weight, bias, eps = bound
    shape = (1, -1) + (1,) * (x.dim() - 2)

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.rsqrt(var.float() + eps)
        if weight is not None:
            scale = scale * weight.float()
        shift = -mean.float() * scale
        if bias is not None:
            shift = shift + bias.float()
        return shift.to(x.dtype).view(shape), scale.to(x.dtype).view(shape)

    tensors = (mean, var, weight, bias)
    shift, scale = make() if derived is None else derived.get(f"bn:{x.dtype}:{eps}:{x.dim()}", tensors, make)
    return torch.addcmul(shift, x, scale)


_WEIGHTED = {torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
             torch.nn.functional.linear}
"""Calls whose weight and bias autocast casts at every call."""


def _cast_weights(func, args: tuple, kwargs: dict, derived: Derived) -> tuple[tuple, dict]:
    """Under autocast, a convolution's or linear layer's float32 weight and bias already cast to the
    autocast dtype (once per :class:`Derived`), so autocast's own cast finds nothing to do."""
    if func not in _WEIGHTED or len(args) < 2 or not isinstance(args[0], torch.Tensor):
        return args, kwargs
    device = args[0].device.type
    if not torch.is_autocast_enabled(device):
        return args, kwargs
    dtype = torch.get_autocast_dtype(device)
    out = list(args)
    for i in (1, 2):
        t = out[i] if i < len(out) else None
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == device:
            out[i] = derived.get(f"cast:{dtype}", (t,), lambda t=t: t.to(dtype))
    return tuple(out), kwargs


class _SameLayoutGrad(torch.autograd.Function):
    """The identity; its backward returns the gradient channels-last (a copy where it is not)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


_LAYOUT_LOSING = {torch.Tensor.__getitem__, torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum}
"""Calls whose backward hands back a channels-first or expanded gradient for a channels-last input."""


def _channels_last_map(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.requires_grad and torch.is_grad_enabled() \
        and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def fast_call(func, args: tuple, kwargs: dict, derived: Derived | None = None):
    """``func(*args, **kwargs)`` through the shortcuts above (for a torch-function mode to call);
    with ``derived``, BatchNorm's scale and shift and autocast's weight casts are made once."""
    out = affine_batch_norm(func, args, kwargs, derived)
    if out is not None:
        return out
    if func in _LAYOUT_LOSING and args and _channels_last_map(args[0]):
        return func(_SameLayoutGrad.apply(args[0]), *args[1:], **kwargs)
    if derived is not None:
        args, kwargs = _cast_weights(func, args, kwargs, derived)
    return func(*args, **kwargs)


class FastOps(TorchFunctionMode):
    """Every call of the forward it wraps through :func:`fast_call`.  One instance may be entered
    again and again (a feature-vis ascent enters one per step): what it derives from the frozen
    weights is kept between entries (:class:`Derived`)."""

    def __init__(self, derived: Derived | None = None):
        super().__init__()
        self.derived = derived if derived is not None else Derived()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return fast_call(func, args, kwargs or {}, self.derived)
