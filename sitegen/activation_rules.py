"""The backward rules of guided backprop and deconvnet at every activation, and finding the kinds a model uses.

Notation: ``x`` is an activation's input, ``y = f(x)`` its output, ``g`` the gradient arriving at
``y`` from above (the signal the backward carries), ``g⁺ = max(g, 0)``.  The plain gradient sends
``g · f′(x)`` to ``x``.

Rules (docs/architectures.md#activations derives each one):

- **guided backprop** sends ``g⁺ · f′(x)`` to ``x`` at every activation.  For ReLU, ``f′(x) = [x > 0]``,
  so this is Springenberg et al.'s rule (pass where the forward input and the gradient are both
  positive).  For other activations the forward mask generalises to the local derivative: with
  every incoming signal positive, guided backprop is then exactly the gradient, the one property
  that defines it beside the rectification; a saturated unit (ReLU6 above 6, Hardsigmoid beyond
  ±3) passes nothing, as it cannot change the output.
- **deconvnet** sends ``g⁺`` to ``x``, whatever ``x`` was: Zeiler & Fergus rectify the reconstruction
  at each non-linearity and use nothing of the forward there; it stays so for every activation.
- **gates**: a feature map multiplied by a factor without spatial extent that depends on the
  input (a squeeze-and-excitation scale ``s`` of shape ``(N, C, 1, 1)``, however the product is
  spelt) is, under both rules, a per-channel scale held constant: the map receives ``g · s``
  and nothing flows into the gate's branch.  The plain gradient keeps the product rule.

:func:`classify` recognises one call, as a :class:`~torch.overrides.TorchFunctionMode` sees it
(module, functional, tensor-method and in-place spellings alike: ``nn.ReLU6`` arrives as
``F.hardtanh``, ``nn.Sigmoid`` as ``torch.sigmoid``, ``a * b`` as ``Tensor.mul``); :class:`RuleMode`
applies the rules during an attribution's forward; :func:`find_activations` runs one forward and
reports every kind found, how it was called, the rule used, and for each named layer the kinds
without a rule that lie on its path from the input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .fastops import Derived, FastOps
from .hooks import capture_outputs, model_guard, tensors_in

_nn = torch._C._nn
Tensor = torch.Tensor

# --- the rules, as the pages and the terminal state them ----------------------------------------

GATE = "gate"
"""Kind name of a feature map multiplied by an input-dependent factor without spatial extent."""
PRODUCT = "product of two feature maps"
"""Kind name of an elementwise product of two input-dependent maps (no rule: the product rule)."""

RULES: dict[str, tuple[str, str]] = {
    # kind: (guided backprop, deconvnet); g⁺ = max(g, 0), g the gradient arriving from above
    "relu": ("g⁺ · [x > 0]", "g⁺"),
    "relu6": ("g⁺ · [0 < x < 6]", "g⁺"),
    "hardtanh": ("g⁺ · [min < x < max]", "g⁺"),
    "leaky_relu": ("g⁺ · (1 if x > 0 else slope)", "g⁺"),
    "prelu": ("g⁺ · (1 if x > 0 else the channel's learned slope)", "g⁺"),
    "elu": ("g⁺ · (1 if x > 0 else α·eˣ)", "g⁺"),
    "silu": ("g⁺ · σ(x)·(1 + x·(1 − σ(x)))", "g⁺"),
    "gelu": ("g⁺ · (Φ(x) + x·φ(x)), or the derivative of the tanh approximation", "g⁺"),
    "hardswish": ("g⁺ · (0 if x < −3, (2x + 3)/6 if x ≤ 3, else 1)", "g⁺"),
    "hardsigmoid": ("g⁺ · (1/6 if −3 < x < 3 else 0)", "g⁺"),
    "mish": ("g⁺ · (t + x·σ(x)·(1 − t²)), t = tanh(softplus(x))", "g⁺"),
    "sigmoid": ("g⁺ · σ(x)·(1 − σ(x))", "g⁺"),
    "tanh": ("g⁺ · (1 − tanh²(x))", "g⁺"),
    GATE: ("held constant: the map gets g · s, the gate's branch nothing",
           "held constant: the map gets g · s, the gate's branch nothing"),
}
NO_RULE = ("none: the plain gradient g · f′(x)", "none: the plain gradient g · f′(x)")
NO_RULE_PRODUCT = ("none: the plain product rule", "none: the plain product rule")
NO_RULE_FUNCTION = ("none: the function's own backward", "none: the function's own backward")

# --- every spelling of every activation ------------------------------------------------------------


@dataclass(frozen=True)
class _Spelling:
    display: str
    kind: str
    """The kind, or "hardtanh" (relu6 when its bounds are 0 and 6)."""
    oop: Callable | None
    """The out-of-place function taking the same arguments (without ``inplace``); None if unruled."""
    inplace: bool | int
    """True: always in place (``relu_``); False: never; an int: position of the ``inplace`` argument."""


def _spellings() -> dict[Any, _Spelling]:
    table: dict[Any, _Spelling] = {}

    def add(func: Any, display: str, kind: str, oop: Callable | None, inplace: bool | int) -> None:
        if func is not None and func not in table:  # aliases (F.relu_ is torch.relu_) keep the first name
            table[func] = _Spelling(display, kind, oop, inplace)

    def family(kind: str, functional: Callable | None, inplace_pos: int | None, c_name: str) -> None:
        """F.<kind> (with an ``inplace`` argument at ``inplace_pos``), torch._C._nn.<c_name>(_)."""
        c_oop, c_ip = getattr(_nn, c_name, None), getattr(_nn, c_name + "_", None)
        if functional is not None:
            add(functional, f"F.{functional.__name__}", kind, functional,
                False if inplace_pos is None else inplace_pos)
        add(c_oop, f"torch._C._nn.{c_name}", kind, c_oop, False)
        if c_oop is not None:
            add(c_ip, f"F.{c_name}_" if getattr(F, c_name + "_", None) is c_ip else f"torch._C._nn.{c_name}_",
                kind, c_oop, True)

    add(F.relu, "F.relu", "relu", torch.relu, 1)
    add(torch.relu, "torch.relu", "relu", torch.relu, False)
    add(Tensor.relu, "Tensor.relu", "relu", torch.relu, False)
    add(torch.relu_, "F.relu_", "relu", torch.relu, True)
    add(Tensor.relu_, "Tensor.relu_", "relu", torch.relu, True)
    family("relu6", F.relu6, 1, "relu6")
    family("hardtanh", F.hardtanh, 3, "hardtanh")
    family("leaky_relu", F.leaky_relu, 2, "leaky_relu")
    add(torch.prelu, "F.prelu", "prelu", torch.prelu, False)
    add(Tensor.prelu, "Tensor.prelu", "prelu", torch.prelu, False)
    family("elu", F.elu, 2, "elu")
    family("silu", F.silu, 1, "silu")
    family("gelu", None, None, "gelu")
    table[F.gelu] = _Spelling("F.gelu", "gelu", F.gelu, False)  # F.gelu is torch._C._nn.gelu
    family("hardswish", F.hardswish, 1, "hardswish")
    family("hardsigmoid", F.hardsigmoid, 1, "hardsigmoid")
    family("mish", F.mish, 1, "mish")
    for kind, fn in (("sigmoid", torch.sigmoid), ("tanh", torch.tanh)):
        add(fn, f"torch.{kind}", kind, fn, False)
        add(getattr(Tensor, kind), f"Tensor.{kind}", kind, fn, False)
        add(getattr(torch, kind + "_"), f"torch.{kind}_", kind, fn, True)
        add(getattr(Tensor, kind + "_"), f"Tensor.{kind}_", kind, fn, True)
        add(getattr(F, kind), f"F.{kind}", kind, getattr(F, kind), False)
    add(torch.special.expit, "torch.special.expit", "sigmoid", torch.special.expit, False)
    # Activations without a rule: named wherever they affect a picture, never applied silently.
    unruled = {
        "selu": [(F.selu, "F.selu"), (torch.selu, "torch.selu"), (torch.selu_, "torch.selu_")],
        "celu": [(F.celu, "F.celu"), (torch.celu, "torch.celu"), (torch.celu_, "torch.celu_")],
        "rrelu": [(F.rrelu, "F.rrelu"), (F.rrelu_, "F.rrelu_"), (torch.rrelu, "torch.rrelu"),
                  (torch.rrelu_, "torch.rrelu_")],
        "threshold": [(F.threshold, "F.threshold"), (torch.threshold, "torch.threshold"),
                      (torch.threshold_, "torch.threshold_")],
        "softplus": [(F.softplus, "F.softplus")],
        "logsigmoid": [(F.logsigmoid, "F.logsigmoid")],
        "softsign": [(F.softsign, "F.softsign")],
        "tanhshrink": [(F.tanhshrink, "F.tanhshrink")],
        "hardshrink": [(F.hardshrink, "F.hardshrink"), (Tensor.hardshrink, "Tensor.hardshrink")],
        "softshrink": [(F.softshrink, "F.softshrink")],
        "glu": [(F.glu, "F.glu")],
    }
    for kind, funcs in unruled.items():
        for func, display in funcs:
            add(func, display, kind, None, False)
    return table


_SPELLINGS = _spellings()
_MULS = {torch.mul: "torch.mul", torch.multiply: "torch.multiply", Tensor.mul: "*", Tensor.mul_: "*=",
         Tensor.multiply: "Tensor.multiply", Tensor.multiply_: "Tensor.multiply_",
         Tensor.__mul__: "*", Tensor.__rmul__: "*", Tensor.__imul__: "*="}


def _lookup(table: dict, func: Any) -> Any:
    try:
        return table.get(func)
    except TypeError:  # an unhashable callable cannot be one of ours
        return None


# --- recognising one call --------------------------------------------------------------------------


@dataclass
class Call:
    """One activation (or gating product) call, as a torch-function mode sees it."""

    kind: str
    display: str
    x: torch.Tensor
    """The activation's input; for a product, the operand the rule acts on (the gate)."""
    inplace: bool = False
    pure: Callable[[torch.Tensor], torch.Tensor] | None = None
    """``f`` out of place, with the call's other arguments bound; None where there is no rule."""
    gate_arg: int | str | None = None
    """For a gate: where the gate operand sits in the call (a position or a keyword)."""

    @property
    def ruled(self) -> bool:
        return self.kind in RULES

    @property
    def on_path(self) -> bool:
        """Whether the call depends on the input, so a backward from a unit can reach it."""
        return torch.is_grad_enabled() and self.x.requires_grad


def classify(func: Any, args: tuple, kwargs: dict) -> Call | None:
    """The activation or gating product ``func(*args, **kwargs)`` is, or None for anything else."""
    spelling = _lookup(_SPELLINGS, func)
    if spelling is not None:
        return _activation_call(spelling, args, kwargs)
    mul = _lookup(_MULS, func)
    if mul is not None:
        return _product_call(mul, args, kwargs)
    return None


def _activation_call(sp: _Spelling, args: tuple, kwargs: dict) -> Call | None:
    args, kwargs = list(args), dict(kwargs)
    if args:
        x = args.pop(0)
    elif "input" in kwargs:
        x = kwargs.pop("input")
    else:
        x = kwargs.pop("self", None)
    if not isinstance(x, torch.Tensor):
        return None
    inplace = sp.inplace is True
    if isinstance(sp.inplace, int) and not isinstance(sp.inplace, bool):
        pos = sp.inplace - 1  # the input was popped
        if len(args) > pos:
            inplace = bool(args.pop(pos))
        inplace = bool(kwargs.pop("inplace", inplace))
    kind = sp.kind
    if kind == "hardtanh":
        lo = args[0] if args else kwargs.get("min_val", -1.0)
        hi = args[1] if len(args) > 1 else kwargs.get("max_val", 1.0)
        kind = "relu6" if (lo, hi) == (0, 6) else "hardtanh"
    return Call(kind, sp.display, x, inplace, _bind(sp.oop, tuple(args), kwargs) if sp.oop else None)


def _bind(oop: Callable, rest: tuple, named: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t -> oop(t, *rest, **named)``: the activation out of place, its other arguments bound."""

    def pure(t: torch.Tensor) -> torch.Tensor:
        return oop(t, *rest, **named)

    return pure


def _operands(args: tuple, kwargs: dict) -> list[tuple[int | str, Any]]:
    where: list[tuple[int | str, Any]] = [(i, a) for i, a in enumerate(args[:2])]
    for key in ("input", "other"):
        if key in kwargs:
            where.append((key, kwargs[key]))
    return where


def _spatial(shape: Sequence[int]) -> bool:
    return len(shape) >= 3 and math.prod(shape[2:]) > 1


def _flat(t: torch.Tensor, ndim: int) -> bool:
    """Whether ``t``, broadcast to ``ndim`` dimensions, is constant over every dimension after the
    channel one: size 1, broadcast, or stride 0 (an ``expand``/``expand_as`` of a vector)."""
    shift = ndim - t.dim()
    return all(t.shape[i - shift] == 1 or t.stride(i - shift) == 0 for i in range(max(2, shift), ndim))


def _product_call(display: str, args: tuple, kwargs: dict) -> Call | None:
    ops = [(k, a) for k, a in _operands(args, kwargs) if isinstance(a, torch.Tensor)]
    if len(ops) != 2 or not all(a.requires_grad for _, a in ops):
        return None  # a constant factor (a frozen parameter, a number): no rule needed
    (ka, a), (kb, b) = ops
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        return None
    if not _spatial(shape):
        return None  # products of pooled vectors (inside a gate's branch) leave the pictures alone
    flat_a, flat_b = _flat(a, len(shape)), _flat(b, len(shape))
    if flat_a != flat_b:
        key, gate = (ka, a) if flat_a else (kb, b)
        return Call(GATE, display, gate, gate_arg=key)
    return Call(PRODUCT, display, a)


# --- the rules as autograd functions ------------------------------------------------------------


class RuleState:
    """Which method's rule the recorded forward's activations apply, read when the backward runs.

    One forward can then serve every method: the graph is kept (``retain_graph``) and walked once per
    method with ``method`` set before each walk."""

    def __init__(self, method: str):
        self.method = method


class _RectifiedReLU(torch.autograd.Function):
    """ReLU forward (in place when asked, like torch.relu_); the backward follows ``state.method``
    at the time it runs.  Saves a copy of the input rather than the output (the model may later
    modify the output in place, which would invalidate a saved tensor) and rather than a boolean
    mask: torch's CPU kernels that make or read a bool tensor are slow.  On 64×16×32×32 float32
    maps (cold in the cache, as in a backward) making the mask ``x > 0`` took 3.4× a copy, and
    ``grad * mask`` 3.9× ``threshold_backward`` (the kernel autograd's own ReLU backward uses).
    The copy takes 4 bytes an element where the mask took 1; in the pass workers (which keep
    freed memory, :func:`sitegen.workpool.keep_freed_memory`) the attribution of 64 units of the
    shared ResNet-56 ran 8 % faster by layer than with the mask, the pictures bit-identical."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, state: RuleState, inplace: bool) -> torch.Tensor:
        ctx.state = state
        ctx.save_for_backward(x.detach().clone())
        if inplace:
            ctx.mark_dirty(x)
            return torch.relu_(x)
        return torch.relu(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        method = ctx.state.method
        if method == "deconvnet":
            return grad.clamp(min=0), None, None
        (x,) = ctx.saved_tensors
        passed = torch.ops.aten.threshold_backward(grad, x, 0)  # grad where x > 0, else 0
        if method == "guided":  # in place on threshold_backward's own new tensor (never on ``grad``)
            return passed.clamp_min_(0), None, None
        return passed, None, None  # "gradient": what autograd's own ReLU backward does


class _RuledActivation(torch.autograd.Function):
    """Any elementwise activation ``f``: the forward is ``f`` itself (in place when asked); the
    derivative ``f′(x)`` is taken in the forward, by autograd through ``f`` with a gradient of ones
    (exact for an elementwise function, and torch's own formula), and kept instead of ``x``, so a
    later in-place change of ``x`` or of the output cannot invalidate it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, state: RuleState, pure: Callable, inplace: bool) -> torch.Tensor:
        ctx.state = state
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            y = pure(xx)
            (derivative,) = torch.autograd.grad(y, xx, torch.ones_like(y))
        ctx.save_for_backward(derivative)
        y = y.detach()
        if inplace:
            ctx.mark_dirty(x)
            return x.copy_(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        method = ctx.state.method
        if method == "deconvnet":
            return grad.clamp(min=0), None, None, None
        (derivative,) = ctx.saved_tensors
        if method == "guided":
            return grad.clamp(min=0).mul_(derivative), None, None, None
        return grad * derivative, None, None, None


class _HeldGate(torch.autograd.Function):
    """The gate's value, unchanged; under guided backprop and deconvnet no gradient flows back
    into the gate's branch (a per-channel scale held constant), under the gradient all of it."""

    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, state: RuleState) -> torch.Tensor:
        ctx.state = state
        return s.view_as(s)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        return (grad if ctx.state.method == "gradient" else None), None


class RuleMode(FastOps):
    """Applies the rules of ``state.method`` to every activation and gate of the forward it wraps.

    A torch-function mode sees F.relu, torch.relu, Tensor.relu and their in-place forms alike, which
    module hooks cannot (a model calling F.relu has no ReLU module to hook).  Calls made while a
    handler runs are not seen again, so F.relu6 is one call, not also a hardtanh.  ``unhandled``
    collects the kinds met on the input's path that have no rule.  Every other call goes through
    :class:`sitegen.fastops.FastOps` (eval-mode BatchNorm folded into the convolution of ``folds``
    or run as its affine map, gradients of channels-last maps kept channels-last: equal up to
    rounding, cheaper).
    """

    def __init__(self, state: RuleState, folds: dict | None = None, derived: Derived | None = None):
        super().__init__(derived, folds)
        self.state = state
        self.unhandled: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = classify(func, args, kwargs)
        if call is None or not call.on_path:
            return super().__torch_function__(func, types, args, kwargs)
        if call.kind == "relu":
            return _RectifiedReLU.apply(call.x, self.state, call.inplace)
        if call.kind == GATE:
            held = _HeldGate.apply(call.x, self.state)
            if isinstance(call.gate_arg, int):
                args = tuple(held if i == call.gate_arg else a for i, a in enumerate(args))
            else:
                kwargs = {**kwargs, call.gate_arg: held}
            return func(*args, **kwargs)
        if call.ruled and call.pure is not None:
            return _RuledActivation.apply(call.x, self.state, call.pure, call.inplace)
        self.unhandled.add(call.kind)
        return func(*args, **kwargs)


# --- finding the kinds a model uses ---------------------------------------------------------------


@dataclass(frozen=True)
class ActivationKind:
    """One kind of activation found in a model, how it is called and the rules applied to it."""

    kind: str
    calls: tuple[str, ...]
    """How it is called: ``nn.SiLU`` from an activation module, else the function (``F.relu``,
    ``Tensor.relu_``), ``(in place)`` when it is; a gate also names the module it runs in."""
    count: int
    """Calls on the input's path in one forward."""
    guided: str
    deconvnet: str
    ruled: bool

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "calls": list(self.calls), "count": self.count, "guided": self.guided,
                "deconvnet": self.deconvnet, "ruled": self.ruled}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActivationKind":
        return cls(str(d["kind"]), tuple(d["calls"]), int(d["count"]), str(d["guided"]), str(d["deconvnet"]),
                   bool(d["ruled"]))


@dataclass(frozen=True)
class ActivationReport:
    kinds: tuple[ActivationKind, ...]
    """In the order first met in the forward."""
    affected: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """For each layer asked about: the kinds without a rule on some path from the input to it."""

    @property
    def unruled(self) -> list[str]:
        return [k.kind for k in self.kinds if not k.ruled]

    def to_dict(self) -> dict[str, Any]:
        return {"kinds": [k.to_dict() for k in self.kinds],
                "affected": {name: list(v) for name, v in self.affected.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActivationReport":
        return cls(tuple(ActivationKind.from_dict(k) for k in d.get("kinds", [])),
                   {name: tuple(v) for name, v in d.get("affected", {}).items()})


_ACTIVATION_MODULES = tuple(
    c for c in vars(nn.modules.activation).values()
    if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == nn.modules.activation.__name__
)
"""torch.nn's activation modules (nn.ReLU, nn.SiLU, ...): a call inside one is shown as the module."""


class _RecordMode(TorchFunctionMode):
    """Records every activation and gating product on the input's path; changes nothing."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.modules = modules
        """The modules running now, innermost last (kept by the hooks :func:`find_activations` adds)."""
        self.calls: dict[str, dict[str, int]] = {}
        """kind -> how called -> count, in the order first met."""
        self.unruled_nodes: dict[Any, str] = {}
        """Autograd node -> kind, for the calls without a rule (to find the layers they affect)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = classify(func, args, kwargs)
        on_path = call is not None and call.on_path
        result = func(*args, **kwargs)
        if on_path:
            self.calls.setdefault(call.kind, {})
            how = self._how(call)
            self.calls[call.kind][how] = self.calls[call.kind].get(how, 0) + 1
            if not call.ruled and isinstance(result, torch.Tensor) and result.grad_fn is not None:
                self.unruled_nodes[result.grad_fn] = call.kind
        return result

    def _how(self, call: Call) -> str:
        inner = self.modules[-1] if self.modules else None
        if call.kind in (GATE, PRODUCT):
            return f"{call.display} in {type(inner).__name__}" if inner is not None else call.display
        if isinstance(inner, _ACTIVATION_MODULES):
            text = f"nn.{type(inner).__name__}"
        else:
            text = call.display
        text += " (in place)" if call.inplace and not text.endswith("_") else ""
        return text + ("" if _spatial(call.x.shape) else " on pooled vectors")


def _walk(roots: Iterable[Any]) -> Iterable[Any]:
    """Every autograd node reachable backward from ``roots`` (iterative: graphs can be deep)."""
    seen: set[int] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(n for n, _ in node.next_functions if n is not None and id(n) not in seen)


def _custom_function(node: Any) -> str | None:
    """``custom autograd.Function Name`` for a Python ``autograd.Function`` node: its own backward
    runs, which no rule reaches (e.g. memory-efficient Swish, reentrant checkpointing)."""
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        name = type(node).__name__
        return f"custom autograd.Function {name[:-len('Backward')] if name.endswith('Backward') else name}"
    return None


def find_activations(model: nn.Module, example: torch.Tensor | tuple[int, ...],
                     layers: Sequence[str] = ()) -> ActivationReport:
    """Every activation kind of ``model``'s forward on ``example`` (one input ``(C, H, W)``, or a
    shape ``(C, H, W)`` or ``(H, W)`` to fill with seeded noise, ``C`` then being the first
    convolution's input channels), with the rules used, from one recorded forward.

    Also, for each of ``layers``, the kinds without a rule that lie on a path from the input to
    that layer's output (read off the autograd graph, so a branch that does not feed the layer does
    not count).  The model is left as it came: modes and flags restored, every hook removed.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(example, torch.Tensor):
        x = example.detach().to(device)
        x = x.unsqueeze(0) if x.dim() == 3 else x[:1]
    else:
        shape = tuple(example) if len(example) == 3 else (_input_channels(model), *example)
        x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    stack: list[nn.Module] = []
    mode = _RecordMode(stack)

    def enter(module: nn.Module, _inputs: Any) -> None:
        stack.append(module)

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:  # returns None: output unchanged
        if stack:
            stack.pop()

    handles = []
    with model_guard(model):
        try:
            for m in model.modules():
                handles.append(m.register_forward_pre_hook(enter))
                handles.append(m.register_forward_hook(leave))
            with capture_outputs(model, list(layers)) as outputs, torch.enable_grad(), mode:
                result = model(x.clone().requires_grad_(True))
        finally:
            for h in handles:
                h.remove()
        roots = [t.grad_fn for t in tensors_in(result)] + [o.grad_fn for o in outputs.values()]
        kinds = _kinds(mode, _walk(roots))
        affected = {}
        if any(not k.ruled for k in kinds):
            for name in layers:
                out = outputs.get(name)
                found = set()
                for node in _walk([out.grad_fn] if out is not None else []):
                    kind = mode.unruled_nodes.get(node) or _custom_function(node)
                    if kind:
                        found.add(kind)
                if found:
                    affected[name] = tuple(k.kind for k in kinds if k.kind in found)
    return ActivationReport(tuple(kinds), affected)


def _input_channels(model: nn.Module) -> int:
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)


def _kinds(mode: _RecordMode, nodes: Iterable[Any]) -> list[ActivationKind]:
    kinds = []
    for kind, how in mode.calls.items():
        if kind in RULES:
            guided, deconvnet = RULES[kind]
        else:
            guided, deconvnet = NO_RULE_PRODUCT if kind == PRODUCT else NO_RULE
        kinds.append(ActivationKind(kind, tuple(how), sum(how.values()), guided, deconvnet, kind in RULES))
    functions: dict[str, int] = {}
    for node in nodes:
        name = _custom_function(node)
        if name:
            functions[name] = functions.get(name, 0) + 1
    for name, count in functions.items():
        kinds.append(ActivationKind(name, ("autograd.Function.apply",), count, *NO_RULE_FUNCTION, False))
    return kinds


def describe_unruled(report: ActivationReport, layers: int | None = None) -> str | None:
    """One terminal line naming the kinds without a rule (None when every kind has one)."""
    names = report.unruled
    if not names:
        return None
    where = ""
    if layers is not None:
        n = len(report.affected)
        where = (f" ({n} of {layers} selected layer{'s' if layers != 1 else ''} lie{'s' if n == 1 else ''} behind "
                 f"{'them' if len(names) > 1 else 'it'}; their channel pages say so)")
    return (f"guided backprop and deconvnet have no rule for {', '.join(names)}: the plain gradient (or the "
            f"function's own backward) is used there, so their pictures are closer to the gradient's{where}")
