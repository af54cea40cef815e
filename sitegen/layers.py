"""Discover the layers worth showing, select them by dotted name, and find their receptive fields.

Discover, then select (as torchvision's ``feature_extraction`` does): every convolution's output and
every residual block's output, in execution order, addressed by dotted module names.
"""
from __future__ import annotations

import copy
import fnmatch
import string
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import LayerError
from .hooks import StopForward, model_guard, run_until


@dataclass(frozen=True)
class ReceptiveField:
    """Unit (y, x) of the layer sees input pixels [offset + y*stride, offset + y*stride + size)."""

    size: int
    stride: int
    offset: int

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in input pixels, end exclusive; may extend past the image."""
        y0, x0 = self.offset + y * self.stride, self.offset + x * self.stride
        return (x0, y0, x0 + self.size, y0 + self.size)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str
    """'conv' (a convolution's output) or 'block' (a residual block's output, after add and ReLU)."""
    shape: tuple[int, int, int]
    """(channels, height, width) of the output for the atlas's input size."""
    rf: ReceptiveField
    stage: str = ""
    """For residual blocks and the layers inside them: the stage's module name (``layer3``)."""
    block: int = -1
    """Index of the block within its stage (-1 outside residual stages)."""
    caffe: str = ""
    """The Caffe-style name of a block (``res4c``), as in He et al. and Chu et al."""
    branch: str = ""
    """For a block: its inner branch layer (last convolution of the residual branch, 'branch2c')."""

    @property
    def channels(self) -> int:
        return self.shape[0]

    def to_dict(self) -> dict:
        return asdict(self)


def is_residual_block(module: nn.Module) -> bool:
    """torchvision's BasicBlock/Bottleneck and the common CIFAR blocks: a block class with a shortcut."""
    cls = type(module).__name__.lower()
    looks_like_block = "block" in cls or "bottleneck" in cls
    has_shortcut = hasattr(module, "downsample") or hasattr(module, "shortcut")
    return looks_like_block and has_shortcut


def _execution_order(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Output shapes of the named modules, in the order they first run."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def hook_for(name):
        def hook(_m, _i, out):
            if name not in shapes and isinstance(out, torch.Tensor):
                shapes[name] = tuple(out.shape[1:])
        return hook

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def discover(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerInfo]:
    """Every Conv2d output and every residual block output, with shapes and receptive fields."""
    candidates = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            candidates.append((name, "conv"))
        elif is_residual_block(m):
            candidates.append((name, "block"))
    if not candidates:
        raise LayerError("the model has no Conv2d layers or residual blocks to show")
    kinds = dict(candidates)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with model_guard(model):
        shapes = _execution_order(model, torch.zeros((1, *input_shape), device=device), list(kinds))
    ordered = [n for n in shapes if len(shapes[n]) == 3]
    rfs = receptive_fields(model, ordered, input_shape)
    blocks = [n for n in ordered if kinds[n] == "block"]
    return [_describe(n, kinds[n], shapes[n], rfs[n], blocks, model) for n in ordered]


def _describe(name, kind, shape, rf, blocks, model) -> LayerInfo:
    owner = next((b for b in blocks if name == b or name.startswith(b + ".")), None)
    if owner is None:
        return LayerInfo(name, kind, tuple(shape), rf)
    stage, _, idx = owner.rpartition(".")
    block = int(idx) if idx.isdigit() else -1
    branch = ""
    if kind == "block":
        convs = [n for n, m in model.get_submodule(name).named_modules()
                 if isinstance(m, nn.Conv2d) and "downsample" not in n and "shortcut" not in n]
        branch = f"{name}.{convs[-1]}" if convs else ""
    return LayerInfo(name, kind, tuple(shape), rf, stage=stage, block=block,
                     caffe=caffe_name(stage, block) if kind == "block" else "", branch=branch)


def caffe_name(stage: str, block: int) -> str:
    """torchvision ``layer3`` block 2 -> Caffe ``res4c`` (res2 is torchvision's layer1)."""
    digits = "".join(ch for ch in stage.rsplit(".", 1)[-1] if ch.isdigit())
    if not digits or block < 0:
        return ""
    letters = string.ascii_lowercase
    suffix = letters[block] if block < 26 else f"b{block}"
    return f"res{int(digits) + 1}{suffix}"


def select(layers: Sequence[LayerInfo], patterns: Sequence[str]) -> list[LayerInfo]:
    """Layers matching any pattern (exact dotted name or glob), in execution order."""
    if not patterns:
        return list(layers)
    names = [l.name for l in layers]
    chosen = set()
    for pat in patterns:
        hits = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hits:
            near = [n for n in names if n.startswith(pat.split("*")[0].rstrip("."))][:3]
            raise LayerError(
                f"no layer {pat!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""),
                "`sitegen layers MODEL --arch ...` lists them",
            )
        chosen.update(hits)
    return [l for l in layers if l.name in chosen]


class _ProbeMode(TorchFunctionMode):
    """During the receptive-field probe: max-pooling becomes average pooling (same geometry, but
    the gradient reaches every pixel of the window) and every activation becomes the identity."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("max_pool2d", "max_pool2d_with_indices", "_max_pool2d"):
            x, ks = args[0], kwargs.get("kernel_size", args[1] if len(args) > 1 else None)
            stride = kwargs.get("stride", args[2] if len(args) > 2 else None) or ks
            padding = kwargs.get("padding", args[3] if len(args) > 3 else 0)
            ceil = kwargs.get("ceil_mode", args[5] if len(args) > 5 else False)
            out = torch.nn.functional.avg_pool2d(x, ks, stride, padding, ceil, count_include_pad=True)
            return (out, None) if name == "max_pool2d_with_indices" or kwargs.get("return_indices") else out
        if name in ("relu", "relu_", "gelu", "silu", "hardswish", "relu6", "hardtanh", "elu", "leaky_relu",
                    "sigmoid", "tanh", "mish", "hardtanh_", "leaky_relu_", "elu_", "silu_"):
            return args[0]
        return func(*args, **kwargs)


def _probe_model(model: nn.Module) -> nn.Module:
    """A float64 copy whose every weight is positive and every BatchNorm the identity: no gradient
    can cancel to zero, so the gradient's support is exactly the receptive field."""
    probe = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for m in probe.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / max(1, m.weight[0].numel()))
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


def receptive_fields(model: nn.Module, names: Sequence[str], input_shape: tuple[int, int, int],
                     max_side: int = 4096) -> dict[str, ReceptiveField]:
    """Size, stride and offset of each named layer, read off gradient supports in a probe copy.

    The field is measured along the height (square kernels and strides assumed, as in the
    models the atlas targets); the probe input grows taller until the centre unit's field lies
    inside it, so the field is not clipped by the border.  The width stays the real input's,
    which keeps the probe cheap.  The user's model is only copied, never changed.
    """
    c, h, w = input_shape
    side = max(h, 32)
    pending = list(names)
    result: dict[str, ReceptiveField] = {}
    probe = _probe_model(model)
    # A narrow probe is much cheaper for wide inputs; models that cannot take it get the real width.
    width = min(w, 32)
    while pending and side <= max_side:
        try:
            found, clipped = _probe_once(probe, pending, (c, side, width))
        except RuntimeError:
            if width == w:
                raise
            width = w
            continue
        result.update(found)
        pending = clipped
        side *= 2
    if pending:
        raise LayerError(f"the receptive field of {pending[0]!r} is larger than {max_side} pixels")
    return result


def _probe_once(probe: nn.Module, names, shape):
    outputs: dict[str, torch.Tensor] = {}
    last = names[-1]

    def keep(name):
        def hook(_m, _i, out):
            outputs[name] = out
            if name == last:
                raise StopForward()  # nothing after the deepest pending layer is needed
        return hook

    handles = [probe.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    x = torch.ones((2, *shape), dtype=torch.float64, requires_grad=True)
    try:
        with _ProbeMode():
            run_until(probe, x)
    finally:
        for hd in handles:
            hd.remove()
    found, clipped = {}, []
    for n in names:
        out = outputs[n]
        oh, ow = out.shape[2], out.shape[3]
        cy, cx = oh // 2, ow // 2
        if oh < 3:
            clipped.append(n)
            continue
        # Sample 0 back-propagates from unit (cy, cx), sample 1 from (cy+1, cx): two in one backward.
        g = torch.zeros_like(out)
        g[0, :, cy, cx] = 1.0
        g[1, :, cy + 1, cx] = 1.0
        (grad,) = torch.autograd.grad(out, x, g, retain_graph=True)
        b0, b1 = _rows(grad[0]), _rows(grad[1])
        if b0 is None or b1 is None or b0[0] <= 0 or b1[1] >= shape[1]:
            clipped.append(n)
            continue
        stride = max(b1[0] - b0[0], 1)
        found[n] = ReceptiveField(size=b0[1] - b0[0], stride=stride, offset=b0[0] - cy * stride)
    return found, clipped


def _rows(grad: torch.Tensor) -> tuple[int, int] | None:
    """(first, last + 1) row where the gradient is nonzero."""
    ys = torch.nonzero((grad != 0).any(0).any(1)).flatten()
    return (int(ys[0]), int(ys[-1]) + 1) if len(ys) else None
