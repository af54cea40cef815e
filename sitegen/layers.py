"""Discover the layers worth showing, select them by dotted name, and find their receptive fields.

Discover, then select (as torchvision's ``feature_extraction`` does): every convolution's output and
every residual block's output, in execution order, addressed by dotted module names.  One traced
forward at the atlas's input size gives the shapes, the receptive fields (arithmetic on the
traced operations, :mod:`sitegen.fields`) and the residual blocks (modules whose output is the sum
of their input, or a shortcut of it, with another tensor); layers the arithmetic cannot follow are
measured with the gradient probe.
"""
from __future__ import annotations

import fnmatch
import re
import string
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from . import progress
from .errors import LayerError
from .fields import ReceptiveField, probe_field, probe_model, to_field, trace
from .hooks import model_guard

__all__ = ["LayerInfo", "ReceptiveField", "caffe_name", "discover", "select"]

KINDS = ("conv", "block", "pooled")

SHORTCUT_NAMES = ("downsample", "shortcut", "proj")
"""Child names of the shortcut branch in torchvision's and common residual blocks; their
convolutions are not part of the residual branch."""


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str
    """'conv' (a convolution's output), 'block' (a residual block's output, after its sum and
    activation) or 'pooled' (a convolution on a globally pooled map: a squeeze-and-excitation
    gate, a classifier head written as a 1×1 convolution; one value per channel and image, its
    field the whole input)."""
    shape: tuple[int, int, int]
    """(channels, height, width) of the output for the atlas's input size."""
    rf: ReceptiveField
    stage: str = ""
    """For residual blocks and the layers inside them: the stage (``layer3``; ``features[5:7]`` for
    a run of blocks inside a container that holds blocks of several widths)."""
    block: int = -1
    """Index of the block within its stage's module (-1 outside residual stages)."""
    caffe: str = ""
    """The Caffe-style name of a ResNet block (``res4c``), as in He et al. and Chu et al."""
    branch: str = ""
    """For a block: its inner branch layer (last convolution of the residual branch, 'branch2c')."""

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def pooled(self) -> bool:
        return self.kind == "pooled"

    def to_dict(self) -> dict:
        return asdict(self)


def discover(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerInfo]:
    """Every Conv2d output and every residual block output, with shapes and receptive fields."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise LayerError("the model has no Conv2d layers or residual blocks to show")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    with model_guard(model):
        traced = trace(model, torch.zeros((1, *input_shape), device=device, dtype=dtype))
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    ordered = [n for n, shape in traced.shapes.items()
               if len(shape) == 3 and (n in convs or n in traced.residual)]
    if not ordered:
        raise LayerError("the model has no Conv2d layers or residual blocks to show")
    hw = (int(input_shape[1]), int(input_shape[2]))
    fields: dict[str, ReceptiveField] = {}
    kinds: dict[str, str] = {}
    fallback: dict[str, str] = {}
    for n in ordered:
        track = traced.tracks.get(n)
        kinds[n] = "block" if n in traced.residual else "conv"
        if track is not None and track.kind == "global":
            kinds[n] = "pooled"
        if track is None or track.kind == "lost":
            fallback[n] = track.reason if track is not None else "an output not computed from the input"
        else:
            fields[n] = to_field(track, hw)
    fields.update(_probed(model, fallback, input_shape, traced.shapes, kinds))
    blocks = [n for n in ordered if kinds[n] == "block"]
    stages = _stages(model, blocks, traced.shapes)
    return [_describe(n, kinds[n], traced.shapes[n], fields[n], blocks, stages, model) for n in ordered]


def _probed(model: nn.Module, fallback: dict[str, str], input_shape: tuple[int, int, int],
            shapes: dict[str, tuple[int, ...]], kinds: dict[str, str], max_side: int = 4096) -> dict[str, ReceptiveField]:
    """Fields of the layers the arithmetic could not follow, from the gradient probe (said on the
    terminal: it costs a backward per layer and input size)."""
    if not fallback:
        return {}
    reasons = sorted(set(fallback.values()))
    progress.info(f"note: measuring the receptive fields of {len(fallback)} layers with the gradient probe; "
                  f"the field arithmetic cannot follow {'; '.join(reasons[:3])}"
                  + (f" and {len(reasons) - 3} more" if len(reasons) > 3 else ""))
    probe = probe_model(model)
    found = {}
    for n, reason in fallback.items():
        try:
            rf = probe_field(probe, n, input_shape[0], (input_shape[1], input_shape[2]), max_side)
        except FloatingPointError as e:
            raise LayerError(f"the receptive field of {n!r} is not measurable: {e} "
                             f"(the field arithmetic cannot follow {reason})",
                             "select other layers with --layer; `sitegen layers` lists them") from None
        if rf is None:
            raise LayerError(f"the receptive field of {n!r} is larger than {max_side} pixels or not measurable "
                             f"(the field arithmetic cannot follow {reason})",
                             "select other layers with --layer; `sitegen layers` lists them")
        if rf.pooled:
            kinds[n] = "pooled"
        found[n] = rf
    return found


def _stages(model: nn.Module, blocks: list[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, int]]:
    """Block name -> (stage, index).  A stage is the module holding the blocks (torchvision's
    ``layer3``, EfficientNet's ``features.3``, RegNet's ``trunk_output.block2``) when its blocks all
    have one width; a container holding blocks of several widths (MobileNet's flat ``features``)
    is cut into runs of consecutive blocks of one width, named like the slice of the container
    that holds them (``features[5:7]``).  The index is the block's position in its module."""
    by_parent: dict[str, list[tuple[int, str]]] = {}
    for b in blocks:
        parent, _, child = b.rpartition(".")
        container = model.get_submodule(parent) if parent else model
        children = [c for c, _ in container.named_children()]
        by_parent.setdefault(parent, []).append((children.index(child) if child in children else -1, b))
    out: dict[str, tuple[str, int]] = {}
    for parent, members in by_parent.items():
        members.sort()
        if len({shapes[b][0] for _, b in members}) == 1:
            out.update({b: (parent, pos) for pos, b in members})
            continue
        runs: list[list[tuple[int, str]]] = []
        for pos, b in members:
            if runs and runs[-1][-1][0] == pos - 1 and shapes[runs[-1][-1][1]][0] == shapes[b][0]:
                runs[-1].append((pos, b))
            else:
                runs.append([(pos, b)])
        for run in runs:
            name = f"{parent}[{run[0][0]}:{run[-1][0] + 1}]"
            out.update({b: (name, pos) for pos, b in run})
    return out


def _describe(name, kind, shape, rf, blocks, stages, model) -> LayerInfo:
    owner = next((b for b in blocks if name == b or name.startswith(b + ".")), None)
    if owner is None:
        return LayerInfo(name, kind, tuple(shape), rf)
    stage, block = stages[owner]
    branch = ""
    if kind == "block":
        convs = [n for n, m in model.get_submodule(name).named_modules()
                 if isinstance(m, nn.Conv2d) and not set(n.split(".")) & set(SHORTCUT_NAMES)]
        branch = f"{name}.{convs[-1]}" if convs else ""
    return LayerInfo(name, kind, tuple(shape), rf, stage=stage, block=block,
                     caffe=caffe_name(stage, block) if kind == "block" else "", branch=branch)


def caffe_name(stage: str, block: int) -> str:
    """torchvision ``layer3`` block 2 -> Caffe ``res4c`` (res2 is torchvision's layer1).  Only
    ResNet-style stages (``layer<N>``, as torchvision's ResNets and the CIFAR ResNets name them) get
    one: the numbering is ResNet's."""
    m = re.fullmatch(r"layer(\d+)", stage.rsplit(".", 1)[-1])
    if not m or block < 0:
        return ""
    digits = m.group(1)
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
