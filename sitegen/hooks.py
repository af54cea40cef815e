"""Hook hygiene: every hook removed in ``finally``, the model's modes and flags restored.

The user's model must leave every sitegen call exactly as it came in (DEVELOPERS.md: "leave the
user's model as you found it").
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import LayerError


@contextlib.contextmanager
def model_guard(model: nn.Module, *, eval_mode: bool = True, freeze: bool = True) -> Iterator[nn.Module]:
    """Run analysis in eval mode (BatchNorm/Dropout frozen) with parameters not requiring grad,
    then restore every module's ``training`` flag and every parameter's ``requires_grad``."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        # Only what differs is set, either way: analysis calls this once per batch, and a model
        # already in eval mode with frozen weights (the usual case) then costs two list walks.
        if eval_mode and any(training for _, training in modes):
            model.eval()
        if freeze:
            for p, flag in flags:
                if flag:
                    p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            if m.training != training:
                m.training = training
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted ``name``, or a LayerError with the hint to list layers."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LayerError(
            f"no layer {name!r} in the model",
            "`sitegen layers MODEL --arch ...` lists the layer names",
        ) from None


class StopForward(Exception):
    """Raised from a hook once the last needed layer has run, so the forward stops early."""


@contextlib.contextmanager
def capture_outputs(
    model: nn.Module,
    names: Sequence[str],
    *,
    stop_after_last: bool = False,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each named module into the yielded dict during forward passes.

    With ``stop_after_last`` the forward is cut short by :class:`StopForward` once every named layer
    has produced its output (call the model through :func:`run_until`).  A module called several
    times per forward keeps its last output.
    """
    store: dict[str, torch.Tensor] = {}
    wanted = set(names)
    handles = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise LayerError(
                    f"layer {name!r} returns {type(output).__name__}, not a tensor",
                    "choose a layer whose output is a feature map (`sitegen layers` lists them)",
                )
            store[name] = transform(name, output) if transform else output
            if stop_after_last and wanted.issubset(store):
                raise StopForward()

        return hook

    try:
        for name in names:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


def tensors_in(value: object) -> Iterator[torch.Tensor]:
    """Every tensor in ``value``: itself, or inside (nested) lists, tuples and dict values, such
    as a call's ``(args, kwargs)`` or a module's outputs."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)


def run_until(model: nn.Module, x: torch.Tensor) -> None:
    """Call the model, treating an early :class:`StopForward` as success."""
    try:
        model(x)
    except StopForward:
        pass
