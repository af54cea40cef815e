"""How channels of consecutive layers correspond: overlap of their top-k image sets.

For each selected layer, every channel is compared with every channel of the previous selected
layer by the Jaccard index of their top-k image sets from the dataset pass,
``|A ∩ B| / |A ∪ B|``: 1 when both channels rank the same images highest, 0 when they share none.
The sets are k-hot rows of sparse (channels × images) matrices, so all intersections of two layers
are one sparse product.  Only images on which a channel actually responds (value > 0) enter its
set: a channel that never fires has every value tied at 0 and its "top-k" is just the first k
images, which would otherwise make every pair of dead channels look identical.

For residual networks the same comparison answers the question Chu et al. left open — "does
channel c of res4f continue in res5a?" — at every stage boundary: the last block of a stage
against the first block of the next.  The channel that the shortcut carries unchanged, if any, is
found by pushing a one-hot input through the first block's shortcut (identity, or the parameter-
free subsample-and-pad "option A" of CIFAR ResNets, which moves channel c to c + planes/4); a
projection shortcut (a 1×1 convolution) carries no channel unchanged.

Results: ``L{i}.match``/``overlap``/``shared`` (C, m): the m best-overlapping channels of the
previous selected layer (-1 where fewer overlap at all), their Jaccard index and the number of
shared images; ``B{j}.*`` (C,) per stage boundary ``j``: ``best``, ``best_overlap``,
``best_shared``, ``carried`` (-1 if none) and ``carried_overlap``, ``carried_shared``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..config import TopKConfig
from ..context import BuildContext
from ..errors import SitegenError
from ..hooks import get_module, model_guard
from ..layers import LayerInfo
from .base import AnalysisPass, Result


@dataclass(frozen=True)
class CorrespondenceConfig:
    matches: int = 5
    """Best-overlapping channels of the previous layer kept per channel."""
    topk: TopKConfig = field(default_factory=TopKConfig)
    """The dataset pass's settings: the sets compared depend on them (part of the cache key)."""


def topk_sets(values: np.ndarray, images: np.ndarray, n_images: int) -> sp.csr_matrix:
    """(C, n_images) 0/1 matrix: row c marks the images in channel c's top-k with a value > 0."""
    keep = np.isfinite(values) & (values > 0) & (images >= 0) & (images < n_images)
    rows = np.nonzero(keep)[0]
    cols = images[keep].astype(np.int64)
    data = np.ones(len(rows), dtype=np.int32)
    m = sp.csr_matrix((data, (rows, cols)), shape=(values.shape[0], n_images))
    m.sum_duplicates()
    m.data[:] = 1  # a set: an image listed twice counts once
    return m


def jaccard(a: sp.csr_matrix, b: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Intersection sizes (Ca, Cb) and Jaccard indices of every row of ``a`` with every row of ``b``
    (0 where both sets are empty)."""
    inter = np.asarray((a @ b.T).todense(), dtype=np.int64)
    size_a = np.asarray(a.sum(1)).reshape(-1, 1)
    size_b = np.asarray(b.sum(1)).reshape(1, -1)
    union = size_a + size_b - inter
    jac = np.divide(inter, union, out=np.zeros(inter.shape, dtype=np.float64), where=union > 0)
    return inter, jac


def best_matches(inter: np.ndarray, jac: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the ``m`` columns of highest Jaccard (ties: lower column), only those > 0;
    padded with -1 (index), 0 (overlap, shared)."""
    m = min(m, jac.shape[1])
    order = np.argsort(-jac, axis=1, kind="stable")[:, :m]
    overlap = np.take_along_axis(jac, order, 1)
    shared = np.take_along_axis(inter, order, 1)
    none = overlap <= 0
    return np.where(none, -1, order), np.where(none, 0.0, overlap).astype(np.float32), np.where(none, 0, shared)


def stage_boundaries(all_layers: list[LayerInfo], selected: list[str]) -> list[tuple[LayerInfo, LayerInfo]]:
    """(last block of stage s, first block of stage s + 1) for consecutive stages, both selected."""
    stages: dict[str, list[LayerInfo]] = {}
    for l in all_layers:
        if l.kind == "block" and l.stage:
            stages.setdefault(l.stage, []).append(l)
    order = list(stages)
    pairs = []
    for s, nxt in zip(order, order[1:]):
        last, first = stages[s][-1], stages[nxt][0]
        if last.name in selected and first.name in selected:
            pairs.append((last, first))
    return pairs


def carried_channels(model: nn.Module, block: str, in_channels: int, out_channels: int) -> tuple[np.ndarray, str]:
    """For each input channel of residual block ``block``, the output channel its shortcut copies it
    to unchanged (-1 for none), and how that was decided."""
    module = get_module(model, block)
    short, found = None, False
    for attr in ("shortcut", "downsample", "proj"):  # proj: RegNet's blocks
        if hasattr(module, attr):
            short, found = getattr(module, attr), True
            break
    none = np.full(in_channels, -1, dtype=np.int64)
    if found and short is not None and any(True for _ in short.parameters()):
        return none, "projection shortcut: no channel is carried unchanged"
    if short is None:
        if found and in_channels == out_channels:
            return np.arange(in_channels, dtype=np.int64), "identity shortcut"
        if not found and in_channels == out_channels:
            return np.arange(in_channels, dtype=np.int64), "same channel index (no shortcut module found)"
        return none, "no shortcut module found and the widths differ"
    return _probe_shortcut(model, short, in_channels, out_channels)


def _probe_shortcut(model: nn.Module, short: nn.Module, cin: int, cout: int) -> tuple[np.ndarray, str]:
    """Push one-hot channel maps through a parameter-free shortcut and see where each lands."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.zeros((cin, cin, 2, 2), device=device)
    x[torch.arange(cin), torch.arange(cin)] = 1.0
    try:
        with model_guard(model), torch.no_grad():
            y = short(x)
    except Exception as e:  # an exotic shortcut: the table then shows no carried channel
        return np.full(cin, -1, dtype=np.int64), f"shortcut could not be probed ({type(e).__name__})"
    if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[1] != cout:
        return np.full(cin, -1, dtype=np.int64), "shortcut output does not match the block's width"
    hit = (y.abs().flatten(2).amax(2) > 0).cpu().numpy()  # (cin, cout)
    single = hit.sum(1) == 1
    carried = np.where(single, hit.argmax(1), -1).astype(np.int64)
    shift = np.unique(carried[carried >= 0] - np.arange(cin)[carried >= 0])
    if np.array_equal(carried, np.arange(cin)):
        how = "identity shortcut"
    elif len(shift) == 1 and single.all():
        how = f"parameter-free shortcut (subsample and zero-pad): channel c is carried to channel c + {int(shift[0])}"
    else:
        how = "parameter-free shortcut: each carried channel as listed"
    return carried, how


class CorrespondencePass(AnalysisPass):
    name = "correspondence"
    version = 1
    config: CorrespondenceConfig

    def run(self, ctx: BuildContext) -> Result:
        topk = ctx.results.get("topk")
        if topk is None:
            raise SitegenError("the correspondence pass needs the dataset pass (topk) to run first")
        names = topk.meta["layers"]
        n = len(ctx.images)
        sets = [topk_sets(topk.arrays[f"L{i}.values"], topk.arrays[f"L{i}.images"], n) for i in range(len(names))]
        arrays: dict[str, np.ndarray] = {}
        previous: list[str | None] = [None]
        for i in range(len(names)):
            if i == 0:
                c = sets[0].shape[0]
                arrays["L0.match"] = np.zeros((c, 0), np.int64)
                arrays["L0.overlap"] = np.zeros((c, 0), np.float32)
                arrays["L0.shared"] = np.zeros((c, 0), np.int64)
                continue
            previous.append(names[i - 1])
            inter, jac = jaccard(sets[i], sets[i - 1])
            match, overlap, shared = best_matches(inter, jac, self.config.matches)
            arrays[f"L{i}.match"], arrays[f"L{i}.overlap"], arrays[f"L{i}.shared"] = match, overlap, shared
        boundaries: list[dict[str, Any]] = []
        for j, (last, first) in enumerate(stage_boundaries(ctx.all_layers, names)):
            a, b = sets[names.index(last.name)], sets[names.index(first.name)]
            inter, jac = jaccard(a, b)
            best, best_overlap, best_shared = best_matches(inter, jac, 1)
            carried, how = carried_channels(ctx.net, first.name, last.channels, first.channels)
            rows = np.arange(len(carried))
            ok = carried >= 0
            col = np.where(ok, carried, 0)
            arrays[f"B{j}.best"] = best[:, 0]
            arrays[f"B{j}.best_overlap"] = best_overlap[:, 0]
            arrays[f"B{j}.best_shared"] = best_shared[:, 0]
            arrays[f"B{j}.carried"] = carried
            arrays[f"B{j}.carried_overlap"] = np.where(ok, jac[rows, col], 0.0).astype(np.float32)
            arrays[f"B{j}.carried_shared"] = np.where(ok, inter[rows, col], 0).astype(np.int64)
            boundaries.append({"from": last.name, "to": first.name, "from_caffe": last.caffe,
                               "to_caffe": first.caffe, "carry": how})
        meta = {"layers": names, "previous": previous, "k": topk.meta["k"], "images": n,
                "matches": self.config.matches, "boundaries": boundaries}
        return Result(meta=meta, arrays=arrays)
