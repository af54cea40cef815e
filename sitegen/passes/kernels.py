"""Convolution kernels: the weights the kernel mosaics are drawn from.

The first convolution of the model (in execution order, whether or not it is a selected layer) is
kept for the RGB mosaic; every selected convolution for the per-input-channel grids.  A pass of its
own, though it runs no images, so the renderer reads weights like any other result (cached and
keyed by the weights' hash like every pass).
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import KernelsConfig
from ..context import BuildContext
from ..hooks import get_module
from .base import AnalysisPass, Result


def conv_weights(model: torch.nn.Module, name: str) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(weight (out, in/groups, kh, kw), bias or None, groups) of the Conv2d ``name``, as float32."""
    conv = get_module(model, name)
    w = conv.weight.detach().float().cpu().numpy().copy()
    b = conv.bias.detach().float().cpu().numpy().copy() if conv.bias is not None else None
    return w, b, int(conv.groups)


class KernelsPass(AnalysisPass):
    name = "kernels"
    version = 1
    config: KernelsConfig

    def run(self, ctx: BuildContext) -> Result:
        convs = [l.name for l in ctx.layers
                 if l.kind in ("conv", "pooled") and isinstance(get_module(ctx.net, l.name), torch.nn.Conv2d)]
        first = next((l.name for l in ctx.all_layers
                      if l.kind == "conv" and isinstance(get_module(ctx.net, l.name), torch.nn.Conv2d)), None)
        arrays: dict[str, np.ndarray] = {}
        groups = []
        for i, name in enumerate(convs):
            w, b, g = conv_weights(ctx.net, name)
            arrays[f"L{i}.weight"] = w
            if b is not None:
                arrays[f"L{i}.bias"] = b
            groups.append(g)
        meta = {"layers": convs, "groups": groups, "first": first, "block": self.config.block}
        if first is not None:
            w, _, g = conv_weights(ctx.net, first)
            arrays["first.weight"] = w
            meta["first_groups"] = g
        return Result(meta=meta, arrays=arrays)
