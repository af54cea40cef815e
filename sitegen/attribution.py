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
from torch.overrides import TorchFunctionMode

from .activation_rules import GATE, RuleMode, RuleState, classify
from .errors import SitegenError
from .fastops import FastOps, cached_folds, model_derived
from .hooks import StopForward, capture_outputs, get_module, model_guard, run_until, tensors_in

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
    # Only the plain gradient: no rules, so autograd's own backward runs (through the same cheaper
    # ops as under the rules, sitegen.fastops: the same function up to rounding).
    state = None if all(m == "gradient" for m in methods) else RuleState(methods[0])
    with model_guard(model):
        x = inputs.detach().clone().requires_grad_(True)
        # Convolutions whose output only their BatchNorm reads run with it folded in (found on one
        # image's forward, before the capture's own hook; kept per model while its tensors stay).
        folds = cached_folds(model, x[:1].detach(), [layer], stop=True)
        derived = model_derived(model)
        mode = RuleMode(state, folds, derived) if state else FastOps(derived, folds)
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
    a = np.asarray(attr)
    if a.ndim != 3 or a.shape[0] not in (1, 3):
        raise AttributionError(f"cannot display an attribution of shape {a.shape}; expected (1 or 3, H, W)")
    return normalise_many_for_display(a[None], percentile)[0]


def normalise_many_for_display(attrs: np.ndarray | torch.Tensor, percentile: float = 99.0) -> np.ndarray:
    """:func:`normalise_for_display` of each of ``P`` attributions ``(P, C, H, W)`` at once (each
    with its own scale), as ``(P, H, W, 3)`` uint8: the same numbers, one call instead of ``P``."""
    if isinstance(attrs, torch.Tensor):
        attrs = attrs.detach().cpu().float().numpy()
    a = np.nan_to_num(np.asarray(attrs, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise AttributionError(f"cannot display attributions of shape {a.shape}; expected (P, 1 or 3, H, W)")
    if not len(a):
        return np.zeros((0, *a.shape[2:], 3), dtype=np.uint8)
    flat = np.abs(a).reshape(len(a), -1)
    scale = np.percentile(flat, percentile, axis=1)
    scale = np.where(scale > 0, scale, flat.max(axis=1))
    safe = np.where(scale > 0, scale, 1.0)[:, None, None, None]
    v = np.where(scale[:, None, None, None] > 0, np.clip(a / safe, -1.0, 1.0), 0.0)
    img = np.rint(128.0 + 127.0 * v).astype(np.uint8).transpose(0, 2, 3, 1)
    return np.repeat(img, 3, axis=3) if img.shape[3] == 1 else np.ascontiguousarray(img)


# --- image independence, decided from the model's structure ---------------------------------------


class Independence:
    """Whether a method's attribution of a layer's units can depend on the input image at all.

    ``independent`` is True only when it was *proved* from the operations between the input and
    the layer (see :func:`image_independent`); ``reason`` says why, or names the first operation
    that stops the proof.  Truthy exactly when ``independent``."""

    __slots__ = ("independent", "reason")

    def __init__(self, independent: bool, reason: str):
        self.independent = bool(independent)
        self.reason = reason

    def __bool__(self) -> bool:
        return self.independent

    def __repr__(self) -> str:
        return f"Independence({self.independent}, {self.reason!r})"


# Operations whose backward is a fixed linear map of the incoming gradient (no forward value read):
# by their name, whatever the namespace (torch.add, Tensor.add, F.pad...).  Dunder forms and the
# in-place forms (``add_``) are folded onto these names before the lookup.
_LINEAR_OPS = frozenset({
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
    "add", "sub", "rsub", "neg", "positive", "cat", "concat", "concatenate", "stack", "hstack", "vstack",
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t",
    "swapaxes", "movedim", "contiguous", "getitem", "narrow", "select", "squeeze", "unsqueeze", "expand",
    "expand_as", "repeat", "tile", "chunk", "split", "tensor_split", "unbind", "clone", "to", "float",
    "double", "type_as", "pad", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "mean", "sum", "flip", "roll", "pixel_shuffle",
    "pixel_unshuffle", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "identity",
})
# Products: linear in the input when at most one operand depends on it (a weight times an activation);
# the product of two activations (an SE gate, attention) reads the forward.
_PRODUCT_OPS = frozenset({"mul", "matmul", "mm", "bmm", "einsum", "addmm", "baddbmm", "tensordot", "multiply"})
_DIVISION_OPS = frozenset({"div", "truediv", "divide"})
# Calls that only read a tensor's metadata (shape, dtype...), never its values.
_METADATA_OPS = frozenset({
    "dim", "size", "shape", "ndim", "ndimension", "numel", "nelement", "dtype", "device", "layout",
    "is_contiguous", "is_floating_point", "is_complex", "requires_grad", "is_cuda", "stride",
    "element_size", "storage_offset", "grad_fn", "is_leaf", "names", "len", "data_ptr",
})
# Autograd nodes whose backward reads no forward value (given the checks on the calls above):
# a second, independent look at what the forward built, which also sees operations that bypass
# __torch_function__ (C++ extensions, TorchScript).
_LINEAR_NODES = frozenset({
    "Convolution", "MkldnnConvolution", "CudnnConvolution", "ConvolutionBackwardOverrideable", "Add", "Sub",
    "Rsub", "Neg", "Cat", "Stack", "View", "UnsafeView", "Reshape", "ReshapeAlias", "Permute", "Transpose",
    "T", "Clone", "Slice", "Select", "Narrow", "Expand", "Squeeze", "Unsqueeze", "Split", "SplitWithSizes",
    "Unbind", "Chunk", "AsStrided", "ToCopy", "ConstantPadNd", "ReflectionPad1D", "ReflectionPad2D",
    "ReplicationPad1D", "ReplicationPad2D", "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool2D",
    "AdaptiveAvgPool3D", "Mean", "Sum", "Flip", "Roll", "Repeat", "Addmm", "Mm", "Bmm", "Mul", "Div",
    "Matmul", "UnsafeSplit", "NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm",
    "NativeBatchNormLegitNoTraining", "UpsampleNearest1D", "UpsampleNearest2D", "UpsampleNearest3D",
    "UpsampleNearestExact2D", "UpsampleBilinear2D", "UpsampleBicubic2D", "UpsampleLinear1D",
    "PixelShuffle", "PixelUnshuffle", "Alias", "Detach", "AccumulateGrad",
})
_ACTIVATION_NODES = frozenset({
    "Relu", "Hardtanh", "LeakyRelu", "PreluKernel", "Elu", "Silu", "Gelu", "Hardswish", "Hardsigmoid",
    "Mish", "Sigmoid", "Tanh",
})
"""Autograd nodes of the activations that have a rule (sitegen.activation_rules.RULES): under
deconvnet the rule replaces their backward by g⁺, which reads nothing of the forward."""
_PRODUCT_NODES = {"Mul": 0, "Mm": 0, "Bmm": 0, "Matmul": 0, "Addmm": 1, "Baddbmm": 1}
"""Product nodes and the index of their first multiplied operand (Addmm's first input is the bias):
at most one of the operands may lead back to the input."""
_TRAINING_FLAG = {"batch_norm": 5, "dropout": 2, "dropout1d": 2, "dropout2d": 2, "dropout3d": 2,
                  "alpha_dropout": 2, "feature_alpha_dropout": 2}
"""Calls that are affine only in eval mode: the position of their ``training`` argument."""


def _op_name(func: Any) -> str:
    """``torch.add``, ``Tensor.add_``, ``Tensor.__iadd__`` and ``F.pad`` as ``add``, ``add``, ``add``, ``pad``."""
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":  # a property getter (Tensor.shape): its owner's name
        name = getattr(getattr(func, "__self__", None), "__name__", "") or name
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        # In-place (__iadd__) and reflected (__radd__) forms are the operation itself, except a
        # reflected division (2 / x), which divides by the tensor: it keeps its own name.
        if name.startswith("i") and name[1:] in _LINEAR_OPS | _PRODUCT_OPS | _DIVISION_OPS:
            name = name[1:]
        elif name.startswith("r") and name[1:] in _LINEAR_OPS | _PRODUCT_OPS:
            name = name[1:]
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _input_derived(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


class _OpAudit(TorchFunctionMode):
    """Records, for one probe forward, the first call that makes a method's backward read the forward."""

    def __init__(self, method: str):
        super().__init__()
        self.method = method
        self.blocker: str | None = None
        self.activations = 0
        """Ruled activation calls on the input's path (the graph may hold no more of them)."""

    def _block(self, why: str) -> None:
        if self.blocker is None:
            self.blocker = why
            # The answer is "not proved" whatever runs after: stop the probe forward here (the
            # gradient and guided backprop meet their first ReLU a few calls in).
            raise StopForward()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._check(func, args, kwargs)
        return func(*args, **kwargs)

    def _check(self, func: Any, args: tuple, kwargs: dict) -> None:
        operands = [t for t in tensors_in((args, kwargs)) if _input_derived(t)]
        if not operands or self.blocker is not None:
            return  # parameters, buffers and constants: the same for every image
        call = classify(func, args, kwargs)
        if call is not None and call.on_path:
            # The activations and gates the attribution's RuleMode sees in the same calls.
            if call.kind == GATE:
                self._block(f"a gate ({call.display} by a factor computed from the image): the map's backward "
                            "is scaled by the gate's value")
            elif not (call.ruled and call.pure is not None) and call.kind != "relu":
                self._block(f"{call.kind} ({call.display}), which has no {self.method} rule that ignores the forward")
            elif self.method != "deconvnet":
                self._block(f"{'a ReLU' if call.kind == 'relu' else call.kind}, whose {self.method} backward "
                            "reads the forward's input")
            else:
                self.activations += 1
            return
        name = _op_name(func)
        if name in _METADATA_OPS:
            return
        if name in _TRAINING_FLAG:
            pos = _TRAINING_FLAG[name]
            training = args[pos] if len(args) > pos else kwargs.get("training", name != "batch_norm")
            if training:
                self._block(f"{name} in training mode, which depends on the batch")
            return
        if name in _LINEAR_OPS:
            return
        if name in _PRODUCT_OPS:
            if len(operands) > 1:
                self._block(f"{name} of two tensors that both depend on the image (a gate or attention)")
            return
        if name in _DIVISION_OPS:
            divisor = args[1] if len(args) > 1 else kwargs.get("other")
            if _input_derived(divisor):
                self._block("a division by a tensor that depends on the image")
            return
        self._block(f"{name or repr(func)}, whose backward may read the forward"
                    + (" (max-pooling routes the gradient through the forward's switches)" if "max" in name else ""))


def _graph_blocker(out: torch.Tensor, method: str, activations: int = 0) -> str | None:
    """The first autograd node between ``out`` and the input whose backward may read the forward;
    ``activations`` is how many ruled activation calls Python saw (more activation nodes than that
    means one ran where no rule can reach it: TorchScript, a C++ extension)."""
    seen: set[Any] = set()
    found = 0
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kind = type(node).__name__
        base = kind.rstrip("0123456789")
        base = base[: -len("Backward")] if base.endswith("Backward") else base
        edges = [f for f, _ in node.next_functions]
        if base in _ACTIVATION_NODES:
            found += 1
            if method != "deconvnet":
                return f"{'a ReLU' if base == 'Relu' else kind}, whose {method} backward reads the forward's input"
            if found > activations:
                return f"{kind}, an activation that ran out of the rule's reach (not through Python)"
        elif base not in _LINEAR_NODES:
            return f"the operation {kind}, whose backward may read the forward"
        elif base in _PRODUCT_NODES and sum(f is not None for f in edges[_PRODUCT_NODES[base]:]) > 1:
            return f"{kind}: a product of two tensors that both depend on the image"
        elif base == "Div" and len(edges) > 1 and edges[1] is not None:
            return "a division by a tensor that depends on the image"
        elif "BatchNorm" in base and getattr(node, "_saved_training", False):
            return "BatchNorm in training mode, which depends on the batch"
        stack.extend(edges)
    return None


def image_independent(model: nn.Module, layer: str, method: str,
                      input_shape: Sequence[int]) -> Independence:
    """Whether ``method``'s attribution of any unit of ``layer`` is the same for every input image,
    decided from the model's structure (never by measuring).

    An attribution is a backward pass from one unit; it depends on the image only where some step
    of that backward reads a value of the forward.  Convolutions, linear layers, additions, padding,
    average pooling, reshapes and eval-mode BatchNorm and Dropout are fixed linear maps of the
    incoming gradient; deconvnet's rule at every activation that has one (ReLU, SiLU, GELU, ...:
    ``sitegen.activation_rules``) rectifies the gradient without reading the forward.  So deconvnet
    is image-independent exactly when every operation between the input and the layer is one of
    those (no max-pooling, whose backward follows the forward's switches; no activation without a
    rule; no gate or other product of two maps that depend on the image, such as
    squeeze-and-excitation or attention; no normalisation by the input's own statistics); the plain
    gradient and guided backprop read every activation's forward input, so for them it holds only in
    a network without activations.

    The decision is conservative: one probe forward (zeros of ``input_shape`` = ``(C, H, W)``, in
    eval mode, stopped at the layer) is audited twice, call by call through ``__torch_function__``
    (which sees BatchNorm's training flag and which operands of a product depend on the input) and
    node by node in the autograd graph it built (which also sees what bypasses Python, e.g. a C++
    extension); any operation not known to be linear, or rule-applied without reading the forward,
    answers "not proved" and names it.  The model is left as it came (``model_guard``).
    """
    _check_method(method)
    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        return Independence(False, "the model contains TorchScript code, which cannot be audited")
    get_module(model, layer)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    audit = _OpAudit(method)
    with model_guard(model):
        x = torch.zeros((1, *input_shape), device=device, requires_grad=True)
        with torch.enable_grad(), capture_outputs(model, [layer], stop_after_last=True) as store, audit:
            run_until(model, x.clone())
        if audit.blocker is not None:
            return Independence(False, f"between the input and {layer}: {audit.blocker}")
        out = store.get(layer)
        if out is None or not isinstance(out, torch.Tensor):
            return Independence(False, f"layer {layer!r} never ran during the probe forward")
        if not out.requires_grad:
            return Independence(False, f"layer {layer!r} does not depend on the input")
        blocker = _graph_blocker(out, method, audit.activations)
    if blocker is not None:
        return Independence(False, f"between the input and {layer}: {blocker}")
    what = ("linear or an activation whose deconvnet rule (g⁺) never reads the forward"
            if audit.activations else "linear")
    return Independence(True, f"every operation between the input and {layer} is {what}, so the "
                              f"{method} backward is one fixed map, the same for every image")
