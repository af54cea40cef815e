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

    At every ReLU the forward executes, the backward follows the method's rule:

    - ``guided`` (Springenberg et al. 2015): pass the gradient only where the forward input was
      positive *and* the incoming gradient is positive;
    - ``deconvnet`` (Zeiler & Fergus 2014): pass the incoming gradient rectified (``clamp(min=0)``),
      whatever the forward input was.  Max-pooling routes through the forward switches, which is
      what autograd already does;
    - ``gradient``: plain autograd.

    Other activations (GELU, SiLU, sigmoid, ...) have no rule; the plain gradient flows through
    them and one :class:`AttributionWarning` per call names them.

``attribute_methods(model, inputs, layer, units, methods=METHODS) -> dict[str, torch.Tensor]``
    The same for several methods, ``{method: tensor}``, from one shared forward: the ReLUs record
    their masks once and the rule is picked as each method's backward walks the kept graph.

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
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import SitegenError
from .hooks import capture_outputs, get_module, model_guard, run_until

METHODS = ("guided", "deconvnet", "gradient")

Unit = tuple[int, int, int]


class AttributionError(SitegenError):
    """Bad arguments to an attribution: method, units, inputs or a layer without a feature map."""


class AttributionWarning(UserWarning):
    """The model runs an activation the chosen method has no rule for."""


# --- the ReLU rule --------------------------------------------------------------------------------

# Every way a forward can call a ReLU, as the object that reaches ``__torch_function__``.
# nn.ReLU (inplace or not) calls F.relu; F.relu(inplace=True) arrives as F.relu with the flag;
# F.relu_ *is* torch.relu_; Tensor.relu(_) arrive as the TensorBase methods (same objects).
_RELU_OUT_OF_PLACE = frozenset({F.relu, torch.relu, torch.Tensor.relu})
_RELU_IN_PLACE = frozenset({torch.relu_, F.relu_, torch.Tensor.relu_})


def _activation_names() -> dict[Any, str]:
    """Activations with no guided/deconvnet rule, keyed by the function object the mode sees."""
    table: dict[Any, str] = {}
    candidates = {
        "gelu": [F.gelu],
        "silu": [F.silu],
        "mish": [F.mish],
        "hardswish": [F.hardswish],
        "hardsigmoid": [F.hardsigmoid],
        "elu": [F.elu, F.elu_],
        "selu": [F.selu, torch.selu, torch.selu_],
        "celu": [F.celu, torch.celu, torch.celu_],
        "leaky_relu": [F.leaky_relu, F.leaky_relu_],
        "rrelu": [F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_],
        "prelu": [F.prelu, torch.prelu],
        "relu6": [F.relu6],
        "hardtanh/relu6": [F.hardtanh, F.hardtanh_],  # nn.ReLU6 calls F.hardtanh
        "threshold": [F.threshold, torch.threshold, torch.threshold_],
        "softplus": [F.softplus],
        "logsigmoid": [F.logsigmoid],
        "softsign": [F.softsign],
        "tanhshrink": [F.tanhshrink],
        "glu": [F.glu],
        "sigmoid": [torch.sigmoid, torch.sigmoid_, torch.Tensor.sigmoid, torch.Tensor.sigmoid_, F.sigmoid],
        "tanh": [torch.tanh, torch.tanh_, torch.Tensor.tanh, torch.Tensor.tanh_, F.tanh],
    }
    for name, funcs in candidates.items():
        for func in funcs:
            table[func] = name
    return table


_OTHER_ACTIVATIONS = _activation_names()


class _RuleState:
    """Which rule the ReLUs of a recorded forward apply, read when the backward runs.

    One forward can then serve every method: the graph is kept (``retain_graph``) and walked once per
    method with ``method`` set before each walk."""

    def __init__(self, method: str):
        self.method = method


class _RectifiedReLU(torch.autograd.Function):
    """ReLU forward; the backward follows ``state.method`` at the time the backward runs.
    In place when asked, like torch.relu_."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, state: _RuleState, inplace: bool) -> torch.Tensor:
        ctx.state = state
        # A boolean mask rather than the output: the model may later modify the output in place,
        # which would invalidate a saved tensor.  Guided and plain-gradient backwards both need it.
        ctx.save_for_backward(x > 0)
        if inplace:
            ctx.mark_dirty(x)
            return torch.relu_(x)
        return torch.relu(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        method = ctx.state.method
        if method == "deconvnet":
            return grad.clamp(min=0), None, None
        (positive_input,) = ctx.saved_tensors
        if method == "guided":
            return grad.clamp(min=0) * positive_input, None, None
        return grad * positive_input, None, None  # "gradient": what autograd's own ReLU backward does


def _relu_call(func: Callable, args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
    """The tensor and the in-place flag of a ReLU call, however it was spelt."""
    x = args[0] if args else kwargs["input"]
    if func in _RELU_IN_PLACE:
        return x, True
    if func is F.relu:
        return x, bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))
    return x, False


def _lookup(table: Any, func: Any) -> bool:
    try:
        return func in table
    except TypeError:  # an unhashable callable cannot be one of ours
        return False


class _RuleMode(TorchFunctionMode):
    """Sends every ReLU call of the forward through :class:`_RectifiedReLU`.

    A torch-function mode sees F.relu, torch.relu, Tensor.relu and their in-place forms alike,
    which module hooks cannot (a model calling F.relu has no ReLU module to hook).  Calls made
    while a handler runs are not seen again, so F.relu6 is reported once, not also as hardtanh.
    """

    def __init__(self, state: _RuleState):
        super().__init__()
        self.state = state
        self.unhandled: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _lookup(_RELU_OUT_OF_PLACE, func) or _lookup(_RELU_IN_PLACE, func):
            x, inplace = _relu_call(func, args, kwargs)
            return _RectifiedReLU.apply(x, self.state, inplace)
        if _lookup(_OTHER_ACTIVATIONS, func):
            self.unhandled.add(_OTHER_ACTIVATIONS[func])
        return func(*args, **kwargs)


@contextlib.contextmanager
def _rule(method: str) -> Iterator[set[str]]:
    """Apply the method's ReLU rule inside the block; yields the set of rule-less activations seen.

    Nothing is patched: the mode is popped on exit, also when the forward raises.
    """
    if method == "gradient":
        yield set()
        return
    mode = _RuleMode(_RuleState(method))
    with mode:
        yield mode.unhandled


# --- argument checks ------------------------------------------------------------------------------


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise AttributionError(
            f"unknown attribution method {method!r}", f"choose one of {', '.join(METHODS)}"
        )


def _check_inputs(inputs: torch.Tensor, units: Sequence[Unit], rows: Sequence[int] | None = None) -> list[Unit]:
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() < 1:
        raise AttributionError("inputs must be a floating-point tensor batch (N, C, H, W)")
    if rows is not None:
        if len(rows) != len(units):
            raise AttributionError(f"{len(rows)} rows for {len(units)} units", "give one input row per unit")
        for i, r in enumerate(rows):
            if not isinstance(r, (int, np.integer)) or not 0 <= r < inputs.shape[0]:
                raise AttributionError(f"row {r!r} of unit {i} is not an input index (0 to {inputs.shape[0] - 1})")
        return [_as_unit(u) for u in units]
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
    # TorchScript code bypasses __torch_function__, so its ReLUs would silently skip the rule.
    if method != "gradient" and any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        raise AttributionError(
            f"the {method} rule cannot reach the ReLUs inside a TorchScript module",
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


def _rounds(rows: list[int] | None, n: int) -> list[list[int]]:
    """Unit indices in rounds holding at most one unit per input: round ``r`` takes the ``r``-th unit
    of every input that has one (unit order kept).  Without ``rows``, unit ``i`` belongs to input
    ``i`` and there is one round of all ``n``."""
    if rows is None:
        return [list(range(n))]
    rounds: list[list[int]] = []
    seen: dict[int, int] = {}
    for i, r in enumerate(rows):
        k = seen.get(r, 0)
        seen[r] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
    return rounds


def _attribute(
    model: nn.Module, inputs: torch.Tensor, layer: str, units: list[Unit], methods: Sequence[str],
    rows: list[int] | None = None,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """One forward of ``inputs`` up to ``layer``, then backward passes from the units, per method
    (the graph is kept between them); also the rule-less activations seen.

    Unit ``i`` belongs to input ``rows[i]`` (default: input ``i``).  Several units of one input share
    its forward: the units go back in rounds of at most one per input (:func:`_rounds`), one backward
    per round and method, each the backward a unit alone would get (in eval mode the inputs of a
    batch do not interact).  Returns ``(len(units), *inputs.shape[1:])`` per method."""
    get_module(model, layer)  # an unknown layer fails here, with the `sitegen layers` hint
    if not units:
        return {m: inputs.new_zeros((0, *inputs.shape[1:])) for m in methods}, set()
    rounds = _rounds(rows, len(units))
    # Only the plain gradient: no mode at all, so autograd's own backward runs untouched.
    state = None if all(m == "gradient" for m in methods) else _RuleState(methods[0])
    with model_guard(model):
        x = inputs.detach().clone().requires_grad_(True)
        mode = _RuleMode(state) if state else contextlib.nullcontext()
        with capture_outputs(model, [layer], stop_after_last=True) as store, mode:
            # A non-leaf copy, so a model that edits its input in place (x.sub_(mean)) still works.
            run_until(model, x.clone())
        if layer not in store:
            raise AttributionError(f"layer {layer!r} never ran during the forward pass")
        out = store[layer]
        _check_units(units, out, layer)
        if not out.requires_grad:
            raise AttributionError(f"layer {layer!r} does not depend on the input")
        grads = {m: None if rows is None else x.new_empty((len(units), *x.shape[1:])) for m in methods}
        last = len(rounds) * len(methods) - 1
        for r, members in enumerate(rounds):
            at = torch.tensor(members if rows is None else [rows[i] for i in members], device=out.device)
            onehot = torch.zeros_like(out)
            c, y, x_ = (torch.tensor(v, device=out.device) for v in zip(*(units[i] for i in members)))
            onehot[at, c, y, x_] = 1.0
            for i, m in enumerate(methods):
                if state is not None:
                    state.method = m
                (g,) = torch.autograd.grad(out, x, onehot, retain_graph=r * len(methods) + i < last)
                if rows is None:
                    grads[m] = g
                else:
                    grads[m][members] = g[at.to(g.device)]
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
    rows: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`attribute` for several methods at once, ``{method: tensor}``: one forward serves them
    all (the rule is chosen when each backward runs), which saves a forward per extra method.

    With ``rows``, unit ``i`` is a unit of input ``rows[i]`` and inputs may have several units (or
    none): each input's forward runs once for all its units, and sample ``i`` of each returned
    tensor is unit ``i``'s attribution (``len(units)`` samples)."""
    return _attribute_checked(model, inputs, layer, units, methods, rows)


def _attribute_checked(model: nn.Module, inputs: torch.Tensor, layer: str, units: Sequence[Unit],
                       methods: Sequence[str], rows: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """The public functions' body; the warning points at their caller (two frames up)."""
    methods = _check_methods(methods)
    checked = _check_inputs(inputs, units, rows)
    for m in methods:
        _check_scripted(model, m)
    grads, unhandled = _attribute(model, inputs, layer, checked, methods,
                                  None if rows is None else [operator.index(r) for r in rows])
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
