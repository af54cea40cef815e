"""Receptive fields by arithmetic on one traced forward, and the gradient probe that checks them.

Arithmetic
----------
One forward of the real model at the atlas's input size, under a ``TorchFunctionMode`` that gives
every tensor computed from the input a *track*: which of its dimensions are the image's rows and
columns, and, per axis, the field of its units — unit ``y`` sees input rows
``[offset + y·stride, offset + y·stride + size)``.  Each operation updates the track as its
geometry says:

- a convolution or pooling with kernel ``k``, stride ``s``, padding ``p`` and dilation ``d`` turns
  ``(size, stride, offset)`` into ``(size + (k − 1)·d·stride, stride·s, offset − p·stride)``, per axis
  (non-square kernels, strides and paddings; ``ceil_mode`` changes the map's size, not this);
- elementwise operations (activations, normalisations, additions, products) and concatenation along
  the channels take the union of their operands' fields: a unit of a sum sees what either operand saw;
- permutations, views, transposes, splits and channel slices move the row and column axes along;
- a global pooling (``adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3))``...) makes the track *global*:
  the values no longer belong to a place in the image but to the whole image.  A convolution on a
  global track (the 1×1 convolutions of a squeeze-and-excitation gate, a classifier head written
  as a 1×1 convolution after the pooling) is a *pooled* layer: one value per channel and image.

Two conventions decide what counts as "seen":

- a global tensor that multiplies (or is added to) a feature map — a squeeze-and-excitation gate,
  a per-channel scale computed from the whole image — modulates each channel but adds no spatial
  extent: the product's field is the feature map's;
- likewise normalisations whose statistics span the map (group, instance, layer norm) keep each
  unit's field: the statistics modulate, the unit's value comes from its own window.

An operation the arithmetic cannot follow (an upsampling, a crop along the image axes, a matrix
product across positions...) *loses* the track, with the operation's name as the reason; layers
computed from a lost track are measured with the gradient probe instead (``layers.discover`` says so).

Gradient probe
--------------
:func:`probe_field` measures a field the independent way: the support of the gradient of one unit
with respect to the input, in a float64 copy of the model whose weights are positive random
numbers, whose BatchNorms are the identity, whose activations are the identity and whose max-pools
are average pools (so every pixel of a window gets gradient), with squeeze-and-excitation gates
(1×1 operands of a product or sum with a feature map) detached and set to 1, following the
convention above.  The input grows until the unit's field lies inside it.  It costs a backward per
layer and size; the tests check the arithmetic against it on every torchvision architecture.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .hooks import StopForward, run_until


@dataclass(frozen=True)
class ReceptiveField:
    """Unit (y, x) sees input rows [offset + y·stride, offset + y·stride + size) and columns
    [offset_x + x·stride_x, offset_x + x·stride_x + size_x).

    The ``_x`` values default to the row values (a square field, as most convolutions give).  A
    *pooled* layer's field is the whole input: ``stride`` 0, ``offset`` 0, ``size`` the input's
    height (``size_x`` its width), whatever the unit.
    """

    size: int
    stride: int
    offset: int
    size_x: int | None = None
    stride_x: int | None = None
    offset_x: int | None = None

    def __post_init__(self) -> None:
        for axis in ("size", "stride", "offset"):
            if getattr(self, f"{axis}_x") is None:
                object.__setattr__(self, f"{axis}_x", getattr(self, axis))

    @classmethod
    def whole_input(cls, height: int, width: int) -> "ReceptiveField":
        return cls(height, 0, 0, width, 0, 0)

    @property
    def pooled(self) -> bool:
        """Every unit sees the whole input (a layer on a globally pooled map)."""
        return self.stride == 0 and self.stride_x == 0

    @property
    def square(self) -> bool:
        return (self.size, self.stride, self.offset) == (self.size_x, self.stride_x, self.offset_x)

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in input pixels, end exclusive; may extend past the image."""
        y0, x0 = self.offset + y * self.stride, self.offset_x + x * self.stride_x
        return (x0, y0, x0 + self.size_x, y0 + self.size)

    def to_json(self) -> dict[str, int]:
        """``{size, stride, offset}``, plus ``size_x, stride_x, offset_x`` when the columns differ
        (docs/atlas-json.md)."""
        d = {"size": self.size, "stride": self.stride, "offset": self.offset}
        if not self.square:
            d.update(size_x=self.size_x, stride_x=self.stride_x, offset_x=self.offset_x)
        return d

    def size_text(self) -> str:
        """``35 px``; ``7×19 px`` (height × width) when not square; ``whole image`` when pooled."""
        if self.pooled:
            return "whole image"
        return f"{self.size} px" if self.size == self.size_x else f"{self.size}×{self.size_x} px"

    def stride_text(self) -> str:
        if self.pooled:
            return "-"
        return str(self.stride) if self.stride == self.stride_x else f"{self.stride}×{self.stride_x}"

    def describe(self) -> str:
        """``35 px, stride 8``; ``7 px high × 19 px wide, stride 8``; ``whole image (pooled)``."""
        if self.pooled:
            return "whole image (pooled)"
        if self.square:
            return f"{self.size} px, stride {self.stride}"
        stride = f"stride {self.stride}" if self.stride == self.stride_x else \
            f"stride {self.stride} down, {self.stride_x} across"
        return f"{self.size} px high × {self.size_x} px wide, {stride}"


# --------------------------------------------------------------------------------- arithmetic


class Axis(NamedTuple):
    """The field along one image axis: unit i sees [offset + i·stride, offset + i·stride + size)."""

    size: int
    stride: int
    offset: int

    def window(self, kernel: int, stride: int, padding: int, dilation: int = 1) -> "Axis":
        return Axis(self.size + (kernel - 1) * dilation * self.stride, self.stride * stride,
                    self.offset - padding * self.stride)


IDENTITY = Axis(1, 1, 0)


@dataclass(frozen=True)
class Track:
    """What the arithmetic knows about a tensor computed from the input."""

    kind: str
    """'map' (rows and columns at ``axes``), 'global' (computed from the whole image) or 'lost'."""
    axes: tuple[int, int] = (2, 3)
    y: Axis = IDENTITY
    x: Axis = IDENTITY
    reason: str = ""
    """For 'lost': the operation the arithmetic could not follow."""


GLOBAL = Track("global")


def lost(reason: str) -> Track:
    return Track("lost", reason=reason)


_ATTR = "_sitegen_track"
_RES = "_sitegen_residual"
"""Name of the module whose residual sum this tensor is (an add of the module's input, or of a
child's output on that input, with another tensor; kept through elementwise functions)."""
_BRANCH = "_sitegen_branch"
"""Name of the module on whose input this tensor was computed by one direct child module."""


def track_of(t: Any) -> Track | None:
    return getattr(t, _ATTR, None) if isinstance(t, torch.Tensor) else None


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return (int(v), int(v))


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _window(track: Track, out: torch.Tensor, kernel, stride, padding, dilation=1) -> Track:
    if track.axes != (out.dim() - 2, out.dim() - 1):
        return lost("a convolution or pooling whose input's last two dimensions are not the image's rows and columns")
    (kh, kw), (dh, dw) = _pair(kernel), _pair(dilation)
    sh, sw = _pair(stride if stride not in (None, (), []) else kernel)
    ph, pw = _pair(padding)
    return Track("map", track.axes, track.y.window(kh, sh, ph, dh), track.x.window(kw, sw, pw, dw))


def _union(a: Axis, b: Axis) -> Axis | None:
    if a == b:
        return a
    if a.stride != b.stride:
        return None
    lo = min(a.offset, b.offset)
    return Axis(max(a.offset + a.size, b.offset + b.size) - lo, a.stride, lo)


def combine(tracks: Sequence[tuple[Track, torch.Tensor]], out: torch.Tensor, what: str) -> Track:
    """The track of an elementwise result: the union of its operands' fields.

    Operands are aligned from the right (broadcasting).  Global operands broadcast over the map
    (gates, per-channel scales) modulate it and add no extent; a result of global operands only is
    global."""
    maps: list[Track] = []
    for tr, t in tracks:
        if tr.kind == "lost":
            return tr
        if tr.kind == "global":
            continue
        shift = out.dim() - t.dim()
        axes = (tr.axes[0] + shift, tr.axes[1] + shift)
        if t.shape[tr.axes[0]] != out.shape[axes[0]] or t.shape[tr.axes[1]] != out.shape[axes[1]]:
            return lost(f"{what} broadcasting a feature map along the image axes")
        maps.append(Track("map", axes, tr.y, tr.x))
    if not maps:
        return GLOBAL
    result = maps[0]
    for m in maps[1:]:
        if m.axes != result.axes:
            return lost(f"{what} of feature maps whose image axes differ")
        y, x = _union(result.y, m.y), _union(result.x, m.x)
        if y is None or x is None:
            return lost(f"{what} of feature maps with different strides")
        result = Track("map", result.axes, y, x)
    return result


def _reduce_dims(track: Track, dims: Iterable[int] | None, keepdim: bool, ndim: int, what: str) -> Track:
    if track.kind != "map":
        return track
    if dims is None:
        return GLOBAL
    ds = {_norm_dim(int(d), ndim) for d in dims}
    hit = [a in ds for a in track.axes]
    if all(hit):
        return GLOBAL
    if any(hit):
        return lost(f"{what} along one image axis")
    if keepdim:
        return track
    axes = tuple(a - sum(1 for d in ds if d < a) for a in track.axes)
    return Track("map", axes, track.y, track.x)  # type: ignore[arg-type]


def _moved(track: Track, mapping: Callable[[int], int | None], what: str) -> Track:
    """The track with its axes renumbered (``mapping`` gives an axis's new index, None if gone)."""
    if track.kind != "map":
        return track
    new = [mapping(a) for a in track.axes]
    if None in new:
        return lost(what)
    return Track("map", (new[0], new[1]), track.y, track.x)  # type: ignore[arg-type]


def _reshaped(track: Track, src: Sequence[int], dst: Sequence[int], what: str) -> Track:
    """A view or reshape keeps an axis where the output has a dimension of the same size with the
    same number of elements before it (and so after it)."""
    if track.kind != "map":
        return track

    def find(a: int) -> int | None:
        before = math.prod(src[:a])
        acc = 1
        for j, n in enumerate(dst):
            if acc == before and n == src[a]:
                return j
            acc *= n
        return None

    return _moved(track, find, f"{what} that merges or splits the image axes")


class _Seen:
    """Functions recognised by identity (some reach ``__torch_function__`` under an unhelpful
    ``__name__``: ``F.max_pool2d`` is a boolean-dispatch wrapper called ``fn``)."""

    MAX_POOL = {F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d}
    ADAPTIVE = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices}


ELEMENTWISE = frozenset({
    # arithmetic
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__", "rsub",
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__rtruediv__",
    "__itruediv__", "true_divide", "addcmul", "addcdiv", "where", "maximum", "minimum", "fmax", "fmin",
    "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max", "abs", "abs_", "__abs__", "neg", "__neg__",
    "exp", "log", "sqrt", "rsqrt", "pow", "__pow__", "square", "sign", "reciprocal", "erf", "lerp",
    "masked_fill", "masked_fill_", "nan_to_num",
    # activations (modules call the functional forms)
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid",
    "sigmoid_", "tanh", "tanh_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu", "leaky_relu_",
    "prelu", "rrelu", "rrelu_", "mish", "softplus", "softsign", "logsigmoid", "tanhshrink", "threshold",
    "threshold_", "hardshrink", "softshrink",
    # normalisations and regularisers (eval mode), copies and casts
    "batch_norm", "instance_norm", "group_norm", "layer_norm", "local_response_norm", "dropout", "dropout_",
    "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "contiguous", "clone",
    "detach", "float", "double", "half", "bfloat16", "to", "type", "type_as", "requires_grad_",
})
"""Functions whose output is elementwise in the image axes (broadcasting allowed)."""

ADDS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})
REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "logsumexp", "nansum", "nanmean", "max", "min"})
"""Reductions called as ``f(x, dim, keepdim)``."""
SPLITS = frozenset({"chunk", "split", "tensor_split", "split_with_sizes", "unsafe_chunk", "unsafe_split"})


def _tensors(args: Iterable[Any]) -> list[torch.Tensor]:
    found = []
    for a in args:
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(x for x in a if isinstance(x, torch.Tensor))
    return found


class FieldMode(TorchFunctionMode):
    """Gives every tensor computed from a tracked input a :class:`Track` (see the module docstring),
    and marks residual sums for :class:`FieldTracer`'s block detection."""

    def __init__(self, frames: list[tuple[str, Any]]):
        super().__init__()
        self.frames = frames
        """The modules running now, outermost first, with the tensor each was called on."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not (isinstance(out, torch.Tensor) or
                (isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor))):
            return out
        inputs = _tensors(list(args) + list(kwargs.values()))
        tracked = [(tr, t) for t in inputs if (tr := track_of(t)) is not None]
        if not tracked:
            return out
        name = getattr(func, "__name__", "") or ""
        try:
            self._follow(func, name, args, kwargs, tracked, out)
        except Exception as e:  # an argument form the rules did not foresee: say which, never guess
            self._mark(out, lost(f"{name or func} ({type(e).__name__})"))
        return out

    # ------------------------------------------------------------------ rules

    def _mark(self, out: Any, track: Track, residual: str | None = None) -> None:
        items = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
        if isinstance(out, (tuple, list)) and len(out) == 2 and not out[1].is_floating_point():
            items = [out[0]]  # (values, indices): the indices are positions, not features
        for t in items:
            setattr(t, _ATTR, track)
            setattr(t, _RES, residual)

    def _follow(self, func, name: str, args: tuple, kwargs: dict, tracked, out) -> None:
        first_tr, first = tracked[0]
        x = args[0] if args and isinstance(args[0], torch.Tensor) else first
        xt = track_of(x) or first_tr
        if all(tr.kind == "global" for tr, _ in tracked):
            self._mark(out, GLOBAL)  # whatever is computed from the pooled image stays global
            return
        if name == "conv2d":
            self._mark(out, _window(xt, out, _arg(args, kwargs, 1, "weight").shape[2:],
                                    _arg(args, kwargs, 3, "stride", 1), self._conv_padding(args, kwargs),
                                    _arg(args, kwargs, 5, "dilation", 1)) if xt.kind == "map" else xt)
            return
        if func in _Seen.MAX_POOL or name in ("max_pool2d", "max_pool2d_with_indices"):
            ks = _arg(args, kwargs, 1, "kernel_size")
            self._mark(out, self._pool(xt, x, out if isinstance(out, torch.Tensor) else out[0], ks,
                                       _arg(args, kwargs, 2, "stride"), _arg(args, kwargs, 3, "padding", 0),
                                       _arg(args, kwargs, 4, "dilation", 1)))
            return
        if name in ("avg_pool2d", "lp_pool2d"):
            if name == "lp_pool2d":
                ks, st, pad = _arg(args, kwargs, 2, "kernel_size"), _arg(args, kwargs, 3, "stride"), 0
            else:
                ks, st, pad = (_arg(args, kwargs, 1, "kernel_size"), _arg(args, kwargs, 2, "stride"),
                               _arg(args, kwargs, 3, "padding", 0))
            self._mark(out, self._pool(xt, x, out, ks, st, pad, 1))
            return
        if func in _Seen.ADAPTIVE or name.startswith("adaptive_"):
            self._mark(out, self._adaptive(xt, x, out if isinstance(out, torch.Tensor) else out[0], name))
            return
        if name in ELEMENTWISE:
            result = combine(tracked, out if isinstance(out, torch.Tensor) else out[0], name)
            self._mark(out, result, self._residual(name, tracked, x, result))
            return
        if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
            self._mark(out, self._cat(name, args, kwargs, tracked, out))
            return
        if name == "linear" or name in ("matmul", "__matmul__") and len(tracked) == 1 and tracked[0][1] is x:
            last = x.dim() - 1
            self._mark(out, lost(f"{name} across an image axis") if xt.kind == "map" and last in xt.axes else xt)
            return
        if name in REDUCTIONS:
            dims = _arg(args, kwargs, 1, "dim")
            if isinstance(dims, torch.Tensor):  # torch.max(a, b): elementwise
                self._mark(out, combine(tracked, out, name))
                return
            keep = bool(_arg(args, kwargs, 2, "keepdim", False))
            dims = None if dims is None else ([dims] if isinstance(dims, int) else list(dims))
            self._mark(out, _reduce_dims(xt, dims, keep, x.dim(), name))
            return
        self._mark(out, self._shape_op(name, args, kwargs, x, xt, out))

    @staticmethod
    def _conv_padding(args, kwargs):
        pad = _arg(args, kwargs, 4, "padding", 0)
        if isinstance(pad, str):
            if pad == "valid":
                return 0
            k = _arg(args, kwargs, 1, "weight").shape[2:]
            d = _pair(_arg(args, kwargs, 5, "dilation", 1))
            return tuple(d[i] * (k[i] - 1) // 2 for i in range(2))  # 'same': the smaller half before
        return pad

    @staticmethod
    def _pool(xt: Track, x, out, ks, stride, padding, dilation) -> Track:  # noqa: ARG004
        if xt.kind != "map":
            return xt
        # A fixed window is arithmetic even where it happens to cover the whole map at this input
        # size (``F.avg_pool2d(x, x.shape[-1])``): only adaptive pooling to 1×1 and means over
        # both image axes make a track global, as they do at every input size.
        return _window(xt, out, ks, stride, padding, dilation)

    @staticmethod
    def _adaptive(xt: Track, x, out, name: str) -> Track:
        if xt.kind != "map":
            return xt
        if xt.axes != (x.dim() - 2, x.dim() - 1) or out.dim() != x.dim():
            return lost(f"{name} on a tensor whose last two dimensions are not the image's")
        ih, iw, oh, ow = x.shape[-2], x.shape[-1], out.shape[-2], out.shape[-1]
        if (oh, ow) == (1, 1):
            return GLOBAL
        axes = []
        for i, o, ax in ((ih, oh, xt.y), (iw, ow, xt.x)):
            if i % o:
                return lost(f"{name} from {ih}×{iw} to {oh}×{ow} (windows of unequal size)")
            axes.append(ax.window(i // o, i // o, 0))
        return Track("map", xt.axes, axes[0], axes[1])

    def _cat(self, name, args, kwargs, tracked, out) -> Track:
        seq = _arg(args, kwargs, 0, "tensors")
        dim = _norm_dim(int(_arg(args, kwargs, 1, "dim", 0)), out.dim())
        if name in ("stack", "hstack", "vstack"):
            return lost(name) if any(tr.kind == "map" for tr, _ in tracked) else GLOBAL
        parts = [(track_of(t), t) for t in seq if track_of(t) is not None]
        result = combine(parts, out, name)
        if result.kind == "map" and dim in result.axes:
            return lost(f"{name} along an image axis")
        return result

    def _residual(self, name: str, tracked, x, result: Track) -> str | None:
        """The module whose residual sum this is: an addition, run by the innermost running module,
        of that module's input (or the output of a child run on it: a projection shortcut) and
        another tensor computed from the input.  Elementwise functions of the sum alone (with
        constants or parameters) keep the mark: the ReLU after a ResNet block's sum, a scale."""
        if result.kind != "map":
            return None
        if len(tracked) == 1:
            return getattr(tracked[0][1], _RES, None)
        if name not in ADDS or len(tracked) != 2 or not self.frames:
            return None
        module, module_input = self.frames[-1]
        (_, a), (_, b) = tracked
        if a.shape != b.shape:
            return None
        for s in (a, b):
            if s is module_input or getattr(s, _BRANCH, None) == module:
                return module
        return None

    @staticmethod
    def _shape_op(name: str, args, kwargs, x, xt: Track, out) -> Track:
        """Operations that move, merge, split or slice dimensions."""
        if xt.kind != "map":
            return xt
        nd = x.dim()
        o = out if isinstance(out, torch.Tensor) else out[0]
        if name == "permute":
            dims = _arg(args, kwargs, 1, "dims")
            dims = args[1:] if isinstance(dims, int) else dims  # x.permute(0, 2, 3, 1)
            order = [_norm_dim(int(d), nd) for d in dims]
            return _moved(xt, order.index, name)
        if name in ("transpose", "transpose_", "swapaxes", "swapdims"):
            d0, d1 = (_norm_dim(int(_arg(args, kwargs, i, n)), nd) for i, n in ((1, "dim0"), (2, "dim1")))
            return _moved(xt, lambda a: d1 if a == d0 else d0 if a == d1 else a, name)
        if name == "pad":
            return _padded(xt, x, _arg(args, kwargs, 1, "pad"))
        if name in SPLITS:
            dim = _norm_dim(int(_arg(args, kwargs, 2, "dim", 0)), nd)
            return lost(f"{name} along an image axis") if dim in xt.axes else xt
        if name == "unbind":
            dim = _norm_dim(int(_arg(args, kwargs, 1, "dim", 0)), nd)
            return _moved(xt, lambda a: None if a == dim else a - (a > dim), f"{name} along an image axis")
        if name in ("narrow", "select", "index_select"):
            dim = _norm_dim(int(_arg(args, kwargs, 1, "dim")), nd)
            if dim in xt.axes:
                return lost(f"{name} along an image axis")
            return _moved(xt, lambda a: a - (a > dim) if name == "select" else a, name)
        if name == "__getitem__":
            return FieldMode._getitem(xt, x, _arg(args, kwargs, 1, "idx"))
        if name in ("__get__", "expand_as", "expand", "broadcast_to", "view_as", "reshape_as", "view", "reshape",
                    "flatten", "unflatten", "squeeze", "unsqueeze"):
            if tuple(o.shape) == tuple(x.shape):
                return xt
            return _reshaped(xt, list(x.shape), list(o.shape), name)
        return lost(name)

    @staticmethod
    def _getitem(xt: Track, x, idx) -> Track:
        """Integer indices drop dimensions; a slice ``start::step`` along an image axis subsamples it
        (the CIFAR ResNets' shortcut ``x[:, :, ::2, ::2]``): a window of 1 with stride ``step``
        starting at ``start``."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis or i is None or isinstance(i, (torch.Tensor, list)) for i in idx):
            return lost("indexing with ..., None or tensors")
        removed = []
        y, xx = xt.y, xt.x
        for d, i in enumerate(idx):
            if d in xt.axes:
                if not isinstance(i, slice):
                    return lost("indexing a single row or column")
                start, _, step = i.indices(x.shape[d])
                if step < 1:
                    return lost("indexing along an image axis with a negative step")
                if d == xt.axes[0]:
                    y = y.window(1, step, -start)
                else:
                    xx = xx.window(1, step, -start)
            elif isinstance(i, int):
                removed.append(d)
        moved = _moved(xt, lambda a: a - sum(1 for d in removed if d < a), "indexing")
        return Track("map", moved.axes, y, xx) if moved.kind == "map" else moved


def _padded(xt: Track, x, pad: Sequence[int]) -> Track:
    """F.pad: pairs (before, after) from the last dimension backwards."""
    nd = x.dim()
    befores = {nd - 1 - i: int(pad[2 * i]) for i in range(len(pad) // 2)}
    ay, ax = xt.axes
    y = xt.y._replace(offset=xt.y.offset - befores.get(ay, 0) * xt.y.stride)
    xx = xt.x._replace(offset=xt.x.offset - befores.get(ax, 0) * xt.x.stride)
    return Track("map", xt.axes, y, xx)


@dataclass
class Traced:
    """What one traced forward found for the modules it was asked about."""

    shapes: dict[str, tuple[int, ...]]
    """Output shape (without the batch dimension) of each module, in the order they finished."""
    tracks: dict[str, Track | None]
    residual: set[str]
    """Modules whose output is a residual sum (see :meth:`FieldMode._residual`)."""


def trace(model: nn.Module, x: torch.Tensor) -> Traced:
    """Run ``model(x)`` once (no gradient) and record every module's first output shape and track,
    and which modules end in a residual sum.  Hooks are removed before returning."""
    frames: list[tuple[str, Any]] = []
    shapes: dict[str, tuple[int, ...]] = {}
    tracks: dict[str, Track | None] = {}
    residual: set[str] = set()
    handles = []

    def pre(name):
        def hook(_m, inputs):
            first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
            frames.append((name, first))
        return hook

    def post(name):
        def hook(_m, inputs, out):
            _, module_input = frames.pop()
            if not isinstance(out, torch.Tensor):
                return
            if getattr(out, _RES, None) == name:
                residual.add(name)
            if frames and module_input is not None and module_input is frames[-1][1] and out is not module_input:
                setattr(out, _BRANCH, frames[-1][0])  # a child run on its parent's input: a shortcut?
            if name not in shapes:
                shapes[name] = tuple(out.shape[1:])
                tracks[name] = track_of(out)
        return hook

    x = x.detach().clone()
    setattr(x, _ATTR, Track("map", (x.dim() - 2, x.dim() - 1)))
    try:
        for name, m in model.named_modules():
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
        with torch.no_grad(), FieldMode(frames):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return Traced(shapes, tracks, residual)


def to_field(track: Track, input_hw: tuple[int, int]) -> ReceptiveField:
    if track.kind == "global":
        return ReceptiveField.whole_input(*input_hw)
    if track.kind != "map":
        raise ValueError(f"no field for a {track.kind} track")
    return ReceptiveField(track.y.size, track.y.stride, track.y.offset,
                          track.x.size, track.x.stride, track.x.offset)


# --------------------------------------------------------------------------------- gradient probe


def _is_gate(t: torch.Tensor, other: torch.Tensor) -> bool:
    """A per-channel value broadcast over another operand's map (1×1 against a larger map)."""
    return t.dim() >= 2 and other.dim() >= 2 and tuple(t.shape[-2:]) == (1, 1) and \
        tuple(other.shape[-2:]) != (1, 1)


_PROBE_IDENTITY = frozenset({"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "hardswish",
                             "hardsigmoid", "sigmoid", "sigmoid_", "tanh", "tanh_", "elu", "elu_", "selu", "celu",
                             "leaky_relu", "leaky_relu_", "prelu", "mish", "softplus", "threshold"})
_PROBE_BINARY = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "add", "add_", "__add__",
                           "__radd__", "__iadd__"})


class ProbeMode(TorchFunctionMode):
    """During the gradient probe: activations are the identity, max-pooling is average pooling
    (same geometry, but the gradient reaches every pixel of each window) and gates (1×1 operands of
    a product or sum with a larger map) are detached, and 1 in a product."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func in _Seen.MAX_POOL or name in ("max_pool2d", "max_pool2d_with_indices"):
            x, ks = args[0], _arg(args, kwargs, 1, "kernel_size")
            stride = _arg(args, kwargs, 2, "stride") or ks
            padding = _arg(args, kwargs, 3, "padding", 0)
            dilation = _arg(args, kwargs, 4, "dilation", 1)
            ceil = _arg(args, kwargs, 5, "ceil_mode", False)
            if _pair(dilation) != (1, 1):  # average pooling has no dilation: a dilated all-ones conv
                c = x.shape[1]
                kh, kw = _pair(ks)
                w = torch.ones((c, 1, kh, kw), dtype=x.dtype, device=x.device) / (kh * kw)
                out = F.conv2d(x, w, None, stride, padding, dilation, c)
            else:
                out = F.avg_pool2d(x, ks, stride, padding, ceil, count_include_pad=True)
            indices = name == "max_pool2d_with_indices" or _arg(args, kwargs, 6, "return_indices", False)
            return (out, None) if indices else out
        if func in (F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices):
            out = F.adaptive_avg_pool2d(args[0], _arg(args, kwargs, 1, "output_size"))
            return (out, None) if _arg(args, kwargs, 2, "return_indices", False) or \
                func is F.adaptive_max_pool2d_with_indices else out
        if name in _PROBE_IDENTITY:
            return args[0]
        if name in _PROBE_BINARY and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
            a, b = args[0], args[1]
            # A gate adds no extent (the convention), so its gradient is cut; in a product its value
            # only scales the map per channel, which moves no support, so it is 1.  Its own value
            # would not do: an SE gate computed from the probe's all-positive map is about the
            # map's mean, so every gated block squares the magnitudes (MobileNetV3-Large's map
            # passes 1e37 by features.14, whose gate overflows float32, and an infinite forward
            # gives NaN gradients, which reach no pixel); ConvNeXt's layer scale (1e-6 in each of
            # 18 blocks) pushes the far edges of deep fields towards underflow.
            mul = "mul" in name
            if _is_gate(a, b):
                a = torch.ones_like(a) if mul else a.detach()
            elif _is_gate(b, a):
                b = torch.ones_like(b) if mul else b.detach()
            if name.endswith("_") or name.startswith("__i"):
                name = name.strip("_").rstrip("_")
                return torch.mul(a, b) if "mul" in name else torch.add(a, b)
            return func(a, b, *args[2:], **kwargs)
        return func(*args, **kwargs)


def probe_model(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A float64 copy whose convolution and linear weights are positive random numbers and whose
    BatchNorms are the identity: no gradient cancels to zero by symmetry or sign, so the gradient's
    support is exactly the receptive field.  (Equal weights would not do: a LayerNorm over channels
    passes no gradient back when every channel gets the same one.)  The model is only copied.

    float64, because the gradient that reaches the far edge of a field is a product of one small
    share per layer on the longest path (an edge tap of a 3×3 convolution carries about a third of
    a row's gradient, a DenseNet layer's 32 new channels a small part of the concatenation read
    after them), so it shrinks geometrically with depth.  In float32 it falls below the smallest
    float (1.4e-45) and reads as zero: DenseNet-121's denseblock3 fields came out 4 px short on
    each side, ConvNeXt-T's deep stages 12 px.  In float64 the smallest gradient any layer of the
    torchvision sweep gets is about 1e-104 (DenseNet-121), far above float64's smallest normal
    number (2.2e-308); tests/test_architectures.py fails any probed layer whose gradient turns
    subnormal, the symptom the float32 probe showed on every layer it cut short.
    Cost: the same time on DenseNet and ConvNeXt (whose float32 tails ran in slow subnormal
    arithmetic), about 4–5× on depthwise-convolution models (EfficientNet-B0, MobileNetV3)."""
    probe = copy.deepcopy(model).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in probe.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = torch.rand(m.weight.shape, generator=gen, dtype=torch.float64) + 0.5
                m.weight.copy_(w / max(1, m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.zero_()
                    m.running_var.fill_(1.0 - m.eps)
                if m.affine:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
    for p in probe.parameters():
        p.requires_grad_(False)
    return probe


def _extent(mask: torch.Tensor) -> tuple[int, int] | None:
    idx = torch.nonzero(mask).flatten()
    return (int(idx[0]), int(idx[-1]) + 1) if len(idx) else None


def gradient_support(probe: nn.Module, layer: str, shape: tuple[int, int, int],
                     units: Sequence[tuple[int, int]], seed: int = 0):
    """For each unit (y, x) of ``layer``: ((row0, row1), (col0, col1)), the extent of the input
    pixels its gradient reaches (None where none), and the layer's output (H, W).  One forward
    (cut after the layer) and one backward, one sample per unit.  FloatingPointError when the
    gradient is not finite (an overflowed forward): NaN would otherwise read as "not seen"."""
    out: dict[str, torch.Tensor] = {}

    def keep(_m, _i, o):
        out["o"] = o
        raise StopForward()

    gen = torch.Generator().manual_seed(seed)
    dtype = next((p.dtype for p in probe.parameters()), torch.float64)
    x = (torch.rand((len(units), *shape), generator=gen, dtype=dtype) + 0.5).requires_grad_(True)
    handle = probe.get_submodule(layer).register_forward_hook(keep)
    try:
        with ProbeMode():
            run_until(probe, x)
    finally:
        handle.remove()
    o = out["o"]
    g = torch.zeros_like(o)
    for n, (y, xx) in enumerate(units):
        g[n, :, y, xx] = 1.0
    (grad,) = torch.autograd.grad(o, x, g)
    if not torch.isfinite(grad).all():  # a NaN is not > 0: it would read as a pixel the unit does not see
        raise FloatingPointError(f"the gradient probe of {layer!r} overflowed at a {shape[1]}×{shape[2]} input")
    nz = grad.abs().sum(1) > 0  # (N, H, W)
    result = []
    for n in range(len(units)):
        rows, cols = _extent(nz[n].any(1)), _extent(nz[n].any(0))
        result.append(None if rows is None or cols is None else (rows, cols))
    return result, tuple(o.shape[-2:])


def probe_field(probe: nn.Module, layer: str, channels: int, start: tuple[int, int],
                max_side: int = 4096) -> ReceptiveField | None:
    """The field of ``layer`` from gradient supports, growing the input (both sides doubled) until
    the centre unit's field lies inside it; a layer whose single unit sees the whole input at
    every size is pooled.  None when the field still touches the border at ``max_side``."""
    h, w = max(start[0], 32), max(start[1], 32)
    whole = 0
    while h <= max_side and w <= max_side:
        _, (oh, ow) = gradient_support(probe, layer, (channels, h, w), [(0, 0)])
        cy, cx = oh // 2, ow // 2
        units = [(cy, cx), (min(cy + 1, oh - 1), cx), (cy, min(cx + 1, ow - 1))]
        (s0, s1, s2), _ = gradient_support(probe, layer, (channels, h, w), units)
        if (oh, ow) == (1, 1) and s0 == ((0, h), (0, w)):
            whole += 1
            if whole >= 2:
                return ReceptiveField.whole_input(*start)
        elif s0 and s1 and s2 and oh > 2 and ow > 2 and \
                s0[0][0] > 0 and s0[1][0] > 0 and s1[0][1] < h and s2[1][1] < w:
            sy, sx = s1[0][0] - s0[0][0], s2[1][0] - s0[1][0]
            return ReceptiveField(s0[0][1] - s0[0][0], sy, s0[0][0] - cy * sy,
                                  s0[1][1] - s0[1][0], sx, s0[1][0] - cx * sx)
        h, w = h * 2, w * 2
    return None
