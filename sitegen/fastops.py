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


def affine_batch_norm(func, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The affine map of an eval-mode ``F.batch_norm`` call; None when ``func`` is something else or
    the call is not one (the caller then runs it unchanged)."""
    if func is not torch.nn.functional.batch_norm:
        return None
    bound = batch_norm_args(args, kwargs)
    if bound is None:
        return None
    x, mean, var, weight, bias, eps = bound
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(var.float() + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean.float() * scale
    if bias is not None:
        shift = shift + bias.float()
    return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))


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


def fast_call(func, args: tuple, kwargs: dict):
    """``func(*args, **kwargs)`` through the shortcuts above (for a torch-function mode to call)."""
    out = affine_batch_norm(func, args, kwargs)
    if out is not None:
        return out
    if func in _LAYOUT_LOSING and args and _channels_last_map(args[0]):
        return func(_SameLayoutGrad.apply(args[0]), *args[1:], **kwargs)
    return func(*args, **kwargs)


class FastOps(TorchFunctionMode):
    """Every call of the forward it wraps through :func:`fast_call`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return fast_call(func, args, kwargs or {})
