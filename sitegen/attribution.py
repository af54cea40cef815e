"""Per-unit input attributions: guided backprop, deconvnet and the plain gradient.

Public API
----------
``METHODS = ("guided", "deconvnet", "gradient")``

``attribute(model, inputs, layer, units, method="guided") -> torch.Tensor``
    ``inputs`` is a preprocessed batch ``(N, C, H, W)`` (any floating dtype, any device);
    ``layer`` a dotted module name; ``units`` a list of ``N`` tuples ``(channel, y, x)`` in that
    layer's feature map, one per input.  Returns a tensor shaped like ``inputs`` whose sample ``i``
    is the attribution of unit ``units[i]`` of sample ``i``: the backward pass starts from
    ``output[i, channel, y, x]`` alone (a one-hot ``grad_output`` per sample).  The whole batch
    takes one forward (cut short after ``layer``) and one backward; in eval mode samples do not
    interact, so this equals ``N`` separate calls.

    At every activation the forward executes as written; the backward follows the method's rule
    (``sitegen.activation_rules``; x the activation's input, g the gradient arriving from above,
    g⁺ = max(g, 0)):

    - ``guided`` (Springenberg et al. 2015): ``g⁺ · f′(x)``, which at a ReLU is their rule (pass
      only where the forward input and the gradient are both positive);
    - ``deconvnet`` (Zeiler & Fergus 2014): ``g⁺``, whatever the forward input was.  Max-pooling
      routes through the forward switches, which is what autograd already does;
    - ``gradient``: plain autograd.

    Under both rules a squeeze-and-excitation gate (a feature map times an input-dependent factor
    without spatial extent) is a scale held constant: nothing flows into the gate's branch.
    Activations without a rule (softplus, SELU, ...) and products of two feature maps pass the
    plain gradient; one :class:`AttributionWarning` per call names them, and
    :func:`sitegen.activation_rules.find_activations` lists them for the pages.

``attribute_methods(model, inputs, layer, units, methods=METHODS) -> dict[str, torch.Tensor]``
    The same for several methods, ``{method: tensor}``, from one shared forward: the activations
    record their derivatives once and the rule is picked as each method's backward walks the kept graph.

``attribute_batched(model, inputs, layer, units, method="guided", batch_size=64)``
    The same result, computed ``batch_size`` samples at a time (for long lists).

``normalise_for_display(attr) -> np.ndarray``
    ``(C, H, W)`` attribution to a ``(H, W, 3)`` uint8 image, see its docstring.

The model is left exactly as it came (``sitegen.hooks.model_guard``: eval mode and frozen parameters
during the call, modes and ``requires_grad`` flags restored, every hook removed); ``inputs`` is never
modified.  Every mistake in the arguments raises an :class:`AttributionError` or, for an unknown
layer, a :class:`~sitegen.errors.LayerError`.
"""
from __future__ import annotations

import contextlib
import operator
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .activation_rules import RuleMode, RuleState
from .errors import SitegenError
from .hooks import capture_outputs, get_module, model_guard, run_until

METHODS = ("guided", "deconvnet", "gradient")

Unit = tuple[int, int, int]


class AttributionError(SitegenError):
    """Bad arguments to an attribution: method, units, inputs or a layer without a feature map."""


class AttributionWarning(UserWarning):
    """The model runs an activation the chosen method has no rule for."""


@contextlib.contextmanager
def _rule(method: str) -> Iterator[set[str]]:
    """Apply the method's rules inside the block; yields the set of rule-less kinds seen.

    Nothing is patched: the mode is popped on exit, also when the forward raises.
    """
    if method == "gradient":
        yield set()
        return
    mode = RuleMode(RuleState(method))
    with mode:
        yield mode.unhandled


# --- argument checks ------------------------------------------------------------------------------


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise AttributionError(
            f"unknown attribution method {method!r}", f"choose one of {', '.join(METHODS)}"
        )


def _check_inputs(inputs: torch.Tensor, units: Sequence[Unit]) -> list[Unit]:
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() < 1:
        raise AttributionError("inputs must be a floating-point tensor batch (N, C, H, W)")
    if len(units) != inputs.shape[0]:
        raise AttributionError(
            f"{len(units)} units for {inputs.shape[0]} inputs",
            "give one (channel, y, x) unit per input image",
        )
    return [_as_unit(u) for u in units]


def _as_unit(unit: Any) -> Unit:
    try:
        c, y, x = (operator.index(v) for v in unit)
    except (TypeError, ValueError):
        raise AttributionError(f"unit {unit!r} is not a (channel, y, x) tuple of integers") from None
    return c, y, x


def _check_scripted(model: nn.Module, method: str) -> None:
    # TorchScript code bypasses __torch_function__, so its activations would silently skip the rules.
    if method != "gradient" and any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        raise AttributionError(
            f"the {method} rule cannot reach the activations inside a TorchScript module",
            "load the model from its Python architecture, or use method 'gradient'",
        )


def _check_units(units: list[Unit], out: torch.Tensor, layer: str) -> None:
    if out.dim() != 4:
        raise AttributionError(
            f"layer {layer!r} outputs shape {tuple(out.shape)}, not a (N, C, H, W) feature map",
            "choose a convolutional layer (`sitegen layers` lists them)",
        )
    shape = tuple(out.shape[1:])
    for i, unit in enumerate(units):
        if not all(0 <= v < n for v, n in zip(unit, shape)):
            raise AttributionError(
                f"unit {unit} of input {i} is outside layer {layer!r}, whose feature map is "
                f"(channels, height, width) = {shape}"
            )


# --- attribution ----------------------------------------------------------------------------------


def _attribute(
    model: nn.Module, inputs: torch.Tensor, layer: str, units: list[Unit], methods: Sequence[str]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """One forward up to ``layer``, then one backward from the units per method (the graph is kept
    between them); also the rule-less activations seen."""
    get_module(model, layer)  # an unknown layer fails here, with the `sitegen layers` hint
    if not units:
        return {m: torch.zeros_like(inputs) for m in methods}, set()
    # Only the plain gradient: no mode at all, so autograd's own backward runs untouched.
    state = None if all(m == "gradient" for m in methods) else RuleState(methods[0])
    with model_guard(model):
        x = inputs.detach().clone().requires_grad_(True)
        mode = RuleMode(state) if state else contextlib.nullcontext()
        with capture_outputs(model, [layer], stop_after_last=True) as store, mode:
            # A non-leaf copy, so a model that edits its input in place (x.sub_(mean)) still works.
            run_until(model, x.clone())
        if layer not in store:
            raise AttributionError(f"layer {layer!r} never ran during the forward pass")
        out = store[layer]
        _check_units(units, out, layer)
        if not out.requires_grad:
            raise AttributionError(f"layer {layer!r} does not depend on the input")
        onehot = torch.zeros_like(out)
        c, y, x_ = (torch.tensor(v, device=out.device) for v in zip(*units))
        onehot[torch.arange(len(units), device=out.device), c, y, x_] = 1.0
        grads = {}
        for i, m in enumerate(methods):
            if state is not None:
                state.method = m
            (grads[m],) = torch.autograd.grad(out, x, onehot, retain_graph=i < len(methods) - 1)
    return grads, (mode.unhandled if state else set())


def _warn_unhandled(names: set[str], methods: Sequence[str], stacklevel: int = 3) -> None:
    ruled = [m for m in methods if m != "gradient"]
    if names and ruled:
        which = " and ".join(ruled)
        warnings.warn(
            f"{which} attribution: the model uses {', '.join(sorted(names))}, which the {which} "
            f"rule{'s do' if len(ruled) > 1 else ' does'} not define; the plain gradient was used through "
            f"{'them' if len(names) > 1 else 'it'}",
            AttributionWarning,
            stacklevel=stacklevel,
        )


def _check_methods(methods: Sequence[str]) -> list[str]:
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods or len(set(methods)) != len(methods):
        raise AttributionError(f"methods must be distinct and at least one, not {methods!r}",
                               f"choose among {', '.join(METHODS)}")
    for m in methods:
        _check_method(m)
    return methods


def attribute(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    units: Sequence[Unit],
    method: str = "guided",
) -> torch.Tensor:
    """Attribution of ``units[i]`` of ``layer`` to ``inputs[i]``, for every ``i`` (see module doc)."""
    return _attribute_checked(model, inputs, layer, units, [method])[method]


def attribute_methods(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    units: Sequence[Unit],
    methods: Sequence[str] = METHODS,
) -> dict[str, torch.Tensor]:
    """:func:`attribute` for several methods at once, ``{method: tensor}``: one forward serves them
    all (the rule is chosen when each backward runs), which saves a forward per extra method."""
    return _attribute_checked(model, inputs, layer, units, methods)


def _attribute_checked(model: nn.Module, inputs: torch.Tensor, layer: str, units: Sequence[Unit],
                       methods: Sequence[str]) -> dict[str, torch.Tensor]:
    """The public functions' body; the warning points at their caller (two frames up)."""
    methods = _check_methods(methods)
    checked = _check_inputs(inputs, units)
    for m in methods:
        _check_scripted(model, m)
    grads, unhandled = _attribute(model, inputs, layer, checked, methods)
    _warn_unhandled(unhandled, methods, stacklevel=4)
    return grads


def attribute_batched(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    units: Sequence[Unit],
    method: str = "guided",
    batch_size: int = 64,
) -> torch.Tensor:
    """:func:`attribute` computed ``batch_size`` inputs at a time; the same result, one warning."""
    _check_method(method)
    checked = _check_inputs(inputs, units)
    _check_scripted(model, method)
    if batch_size < 1:
        raise AttributionError(f"batch_size must be at least 1, not {batch_size}")
    parts, unhandled = [], set()
    for start in range(0, len(checked), batch_size):
        end = start + batch_size
        grads, seen = _attribute(model, inputs[start:end], layer, checked[start:end], [method])
        parts.append(grads[method])
        unhandled |= seen
    _warn_unhandled(unhandled, [method])
    return torch.cat(parts) if parts else torch.zeros_like(inputs)


# --- display --------------------------------------------------------------------------------------


def normalise_for_display(attr: np.ndarray | torch.Tensor, percentile: float = 99.0) -> np.ndarray:
    """A ``(C, H, W)`` attribution (C = 1 or 3) as a ``(H, W, 3)`` uint8 image, per image:

    - zero stays the grey centre, signs are kept (no mean is subtracted);
    - values are divided by the ``percentile``-th percentile of ``|attr|`` (99 by default, so a few
      extreme pixels do not wash out the rest; the maximum of ``|attr|`` when that percentile is 0,
      as for a small receptive field) and clipped to [-1, 1];
    - ``v`` maps to ``round(128 + 127 * v)``: 0 -> 128, -1 -> 1, +1 -> 255;
    - a 1-channel attribution is repeated into grey RGB;
    - an all-zero (or non-finite) attribution becomes plain grey 128.
    """
    if isinstance(attr, torch.Tensor):
        attr = attr.detach().cpu().float().numpy()
    a = np.nan_to_num(np.asarray(attr, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if a.ndim != 3 or a.shape[0] not in (1, 3):
        raise AttributionError(f"cannot display an attribution of shape {a.shape}; expected (1 or 3, H, W)")
    scale = np.percentile(np.abs(a), percentile)
    if scale <= 0:
        scale = np.abs(a).max()
    v = np.clip(a / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(a)
    img = np.rint(128.0 + 127.0 * v).astype(np.uint8).transpose(1, 2, 0)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else np.ascontiguousarray(img)
