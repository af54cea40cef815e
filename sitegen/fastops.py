"""Cheaper forward and backward passes through a fixed model, the same function up to rounding.

Used by the passes that run a backward from a model whose weights do not change (attribution, the
sanity checks, the feature-vis steps); the dataset pass's stored activations and every stored
feature-vis objective come from the model's own ops.

Eval-mode BatchNorm as the per-channel affine map it is: ``x · s + t`` with
``s = γ / √(σ² + ε)`` and ``t = β − μ·s``, computed in ``x``'s own precision.  The same function as
``batch_norm`` up to rounding, but one fused multiply-add forward and one multiply backward.
``native_batch_norm``'s backward took 8–16 % of a ResNet-56 forward-and-backward on the CPU (more
on channels-last maps, where its kernel is slow), and under bfloat16 autocast it casts every map
to float32 and back.  Training-mode calls, and calls without running statistics, run unchanged.

Better still, where nothing but its eval-mode BatchNorm reads a convolution's output (every
convolution of a ResNet; proved on one forward of the model by :func:`find_folds`, which watches
every call that reads the output and every module output a pass captures), the BatchNorm is
folded into the convolution, ``conv(x, W·s)`` with bias ``b·s + t``, and the BatchNorm passes the
result through: no BatchNorm work at all, forward or backward.

Gradients of channels-last maps kept channels-last: the backward of indexing (``x[:, :, ::2, ::2]``,
the CIFAR ResNets' shortcut) and of a mean or sum over a map hands back a channels-first (or
expanded) gradient, and every later step of the backward then mixes layouts: torch's ReLU backward
on a channels-first gradient and a channels-last map took 2.8 ms against 0.14 ms for one
64×16×32×32 map on this CPU, and the convolutions' backward reorders their inputs.  Such calls get
their input through :class:`_SameLayoutGrad`, whose backward returns the gradient channels-last.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.overrides import TorchFunctionMode

from .hooks import StopForward, get_module, run_until, tensors_in


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
        key = (tag,) + tuple(None if t is None else id(t) for t in tensors)
        versions = tuple(None if t is None else t._version for t in tensors)
        hit = self._values.get(key)
        if hit is not None and hit[1] == versions and all(a is b for a, b in zip(hit[0], tensors)):
            return hit[2]
        value = make()
        # The tensors are kept alive, so their ids stay theirs; a new version replaces the entry.
        self._values[key] = (tensors, versions, value)
        return value


def _scale_shift(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm's ``s = γ / √(σ² + ε)`` and ``t = β − μ·s``, in float32."""
    scale = torch.rsqrt(var.float() + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean.float() * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale, shift


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
        scale, shift = _scale_shift(mean, var, weight, bias, eps)
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


# --- BatchNorm folded into the convolution before it -----------------------------------------------

_CONVS = {torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d}
_METADATA = {"size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous", "is_floating_point",
             "is_complex", "element_size", "get_device", "__len__"}
_METADATA_PROPERTIES = {"shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_cuda", "is_cpu",
                        "is_leaf", "grad_fn", "is_sparse", "is_quantized", "is_meta", "names"}


def _reads_values(func) -> bool:
    """Whether a call may read a tensor argument's values (metadata queries do not)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None) not in _METADATA_PROPERTIES
    return name not in _METADATA


@dataclass(frozen=True)
class Fold:
    """A convolution whose output nothing reads but the eval-mode BatchNorm after it."""

    weight: torch.Tensor
    """The convolution's weight (the call is recognised by it)."""
    bn: tuple
    """The BatchNorm's ``(running_mean, running_var, weight, bias, eps)``."""


class _FoldProbe(TorchFunctionMode):
    """Records, over one forward, every convolution's output and every call that reads it."""

    def __init__(self):
        super().__init__()
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (output, weight)
        self.readers: dict[int, list] = {}  # id -> the BatchNorm tuple, or None for any other reader

    def read(self, t: torch.Tensor, bn: tuple | None = None) -> None:
        hit = self.outputs.get(id(t))
        if hit is not None and hit[0] is t:
            self.readers.setdefault(id(t), []).append(bn)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_values(func):
            bound = batch_norm_args(args, kwargs) if func is torch.nn.functional.batch_norm else None
            first = args[0] if args else None
            for t in tensors_in((args, kwargs)):
                self.read(t, bound[1:] if bound is not None and t is first else None)
        out = func(*args, **kwargs)
        if func in _CONVS and isinstance(out, torch.Tensor) and len(args) > 1 and isinstance(args[1], torch.Tensor):
            self.outputs[id(out)] = (out, args[1])
        return out


def _hooked(model: torch.nn.Module) -> bool:
    from torch.nn.modules import module as module_mod

    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks or any(
        m._forward_hooks or m._forward_pre_hooks for m in model.modules()))


_FOLDS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_DERIVED: "weakref.WeakKeyDictionary[torch.nn.Module, Derived]" = weakref.WeakKeyDictionary()


def model_derived(model: torch.nn.Module) -> Derived:
    """One :class:`Derived` per model, for passes that run many forwards (each batch of the
    attribution pass): its values follow the tensors' versions, so it never goes stale."""
    return _DERIVED.setdefault(model, Derived())


def cached_folds(model: torch.nn.Module, example: torch.Tensor, read: Sequence[str] = (),
                 stop: bool = False) -> dict[int, Fold]:
    """:func:`find_folds`, kept per model, input shape and ``read``, for as long as the model has
    the same parameter and buffer tensors (a swapped module or tensor probes again) and no
    forward hooks of its own (checked at every call)."""
    if _hooked(model):
        return {}
    key = (tuple(read), stop, tuple(example.shape[1:]), example.dtype, example.device)
    tensors = tuple(model.parameters()) + tuple(model.buffers())
    per_model = _FOLDS.setdefault(model, {})
    hit = per_model.get(key)
    if hit is not None and len(hit[0]) == len(tensors) and all(a is b for a, b in zip(hit[0], tensors)):
        return hit[1]
    folds = find_folds(model, example, read, stop)
    per_model[key] = (tensors, folds)
    return folds


def find_folds(model: torch.nn.Module, example: torch.Tensor, read: Sequence[str] = (),
               stop: bool = False) -> dict[int, Fold]:
    """The convolutions of ``model`` whose output only an eval-mode BatchNorm reads, found on one
    forward of ``example`` (with ``stop``, cut short once every module of ``read`` has run, as the
    passes' forwards are): by the weight's id.  ``read`` names the modules whose outputs a pass
    captures (their outputs are read, so a convolution among them is not folded).  None at all
    where the model carries forward hooks of its own (they might read an output) or a weight
    serves two calls that would fold differently."""
    if _hooked(model):
        return {}
    probe = _FoldProbe()
    handles = []
    seen: set[str] = set()

    def reader(name: str):
        def hook(_module, _inputs, output):
            for t in tensors_in(output):
                probe.read(t)
            seen.add(name)
            if stop and seen.issuperset(read):
                raise StopForward()  # the passes stop there too: what follows never runs
        return hook

    try:
        for name in read:
            handles.append(get_module(model, name).register_forward_hook(reader(name)))
        with torch.no_grad(), probe:
            try:
                run_until(model, example)
            except Exception:  # a model that cannot run on the example: fold nothing rather than guess
                return {}
    finally:
        for h in handles:
            h.remove()
    folds: dict[int, Fold] = {}
    refused: set[int] = set()
    for key, (out, weight) in probe.outputs.items():
        readers = probe.readers.get(key, [])
        ok = len(readers) == 1 and readers[0] is not None
        wid = id(weight)
        if not ok or wid in refused or (wid in folds and not all(
                a is b for a, b in zip(folds[wid].bn[:4], readers[0][:4]))):
            folds.pop(wid, None)
            refused.add(wid)
            continue
        folds[wid] = Fold(weight, tuple(readers[0]))
    return folds


def _folded_params(f: Fold, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv(x, W)·s + t`` is ``conv(x, W·s)`` with bias ``b·s + t``: the folded weight and bias."""
    scale, shift = _scale_shift(*f.bn)
    if bias is not None:
        shift = shift + bias.float() * scale
    w = f.weight.float() * scale.view(-1, *[1] * (f.weight.dim() - 1))
    return w.to(f.weight.dtype), shift.to(f.weight.dtype)


def _fold_conv(func, args: tuple, kwargs: dict, derived: Derived, folds: dict[int, Fold],
               pending: dict[int, tuple]) -> torch.Tensor | None:
    """A folded convolution's output (its BatchNorm applied), remembered for that BatchNorm to pass
    through; None for any other call."""
    if func not in _CONVS or len(args) < 2 or not isinstance(args[1], torch.Tensor):
        return None
    f = folds.get(id(args[1]))
    if f is None or f.weight is not args[1]:
        return None
    args, kwargs = list(args), dict(kwargs)
    if "bias" in kwargs:
        bias = kwargs["bias"]
    else:
        bias = args[2] if len(args) > 2 else None
    w, b = derived.get("fold", (f.weight, bias, *f.bn[:4]), lambda: _folded_params(f, bias))
    args[1] = w
    if "bias" in kwargs or len(args) < 3:
        kwargs["bias"] = b
    else:
        args[2] = b
    args, kwargs = _cast_weights(func, tuple(args), kwargs, derived)
    out = func(*args, **kwargs)
    pending[id(out)] = (out, f.bn[0])
    return out


def _folded_batch_norm(func, args: tuple, kwargs: dict, pending: dict[int, tuple]) -> torch.Tensor | None:
    """The input itself, for the BatchNorm of a folded convolution (already applied); else None."""
    if func is not torch.nn.functional.batch_norm or not pending:
        return None
    bound = batch_norm_args(args, kwargs)
    if bound is None:
        return None
    hit = pending.get(id(bound[0]))
    if hit is None or hit[0] is not bound[0] or hit[1] is not bound[1]:
        return None
    del pending[id(bound[0])]
    return bound[0]


def fast_call(func, args: tuple, kwargs: dict, derived: Derived | None = None,
              folds: dict[int, Fold] | None = None, pending: dict[int, tuple] | None = None):
    """``func(*args, **kwargs)`` through the shortcuts above (for a torch-function mode to call);
    with ``derived``, BatchNorm's scale and shift and autocast's weight casts are made once; with
    ``folds`` (:func:`find_folds`) and ``pending`` (a dict the mode keeps), those convolutions run
    with their BatchNorm folded in and the BatchNorm passes their output through."""
    if folds and derived is not None and pending is not None:
        out = _fold_conv(func, args, kwargs, derived, folds, pending)
        if out is None:
            out = _folded_batch_norm(func, args, kwargs, pending)
        if out is not None:
            return out
    out = affine_batch_norm(func, args, kwargs, derived)
    if out is not None:
        return out
    if func in _LAYOUT_LOSING and args and _channels_last_map(args[0]):
        return func(_SameLayoutGrad.apply(args[0]), *args[1:], **kwargs)
    if derived is not None:
        args, kwargs = _cast_weights(func, args, kwargs, derived)
    return func(*args, **kwargs)


class FastOps(TorchFunctionMode):
    """Every call of the forward it wraps through :func:`fast_call` (with ``folds``, those
    convolutions with their BatchNorm folded in).  One instance may be entered
    again and again (a feature-vis ascent enters one per step): what it derives from the frozen
    weights is kept between entries (:class:`Derived`)."""

    def __init__(self, derived: Derived | None = None, folds: dict[int, Fold] | None = None):
        super().__init__()
        self.derived = derived if derived is not None else Derived()
        self.folds = folds or {}
        self._pending: dict[int, tuple] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return fast_call(func, args, kwargs or {}, self.derived, self.folds, self._pending)

    def __exit__(self, *exc):
        self._pending.clear()  # a forward stopped early may leave a folded output unread
        return super().__exit__(*exc)
