"""Occlusion sensitivity (Zeiler & Fergus 2013, fig. 7): slide a grey square over each sample image
and record, at every occluder position,

 (a) the probability of the true class (the unoccluded top-1 class when labels do not match outputs),
 (b) the most probable class,
 (c) the total activation (sum over the map) of the strongest channel of a deep layer, the channel
     chosen on the unoccluded image (largest spatial maximum, as the top-k ranking uses).

The grey is the data set mean, i.e. zero after normalisation.  Positions lie on a grid of cells
``stride`` pixels apart covering the image: cell (i, j) holds the value with the occluder centred on
that cell's centre (clipped at the border), so a map upsampled by ``stride`` lines up with the image.

All occluded copies of all sample images form one flat list of (image, position) jobs, cut into
batches of hundreds: the only work beyond plain forward passes is one masked fill per batch and a
gather in a hook (``bench/occlusion_bench.py`` measures the ratio).  Under torchrun the batches are
the work items: every rank runs the (cheap) unoccluded forward itself, computes every ``world``-th
batch, and rank 0 gathers the pieces (:func:`sitegen.distributed.gather_to_main`); the batches are
the same as in one process, so is the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import progress
from ..config import OcclusionConfig, SamplesConfig
from ..context import CPU_LARGE_BATCH, BuildContext
from ..distributed import broadcast_from_main, gather_to_main
from ..errors import ConfigError, LayerError
from ..hooks import get_module, model_guard
from ..model_loading import logits
from ..planning import PassPlan, Probe, count
from .base import AnalysisPass, Result
from .sampling import key_with, labels_match_outputs, output_names, sample_images

DEFAULT_BATCH = 256


def default_batch(ctx: BuildContext) -> int:
    """256 copies per forward, as the goal asks; on the CPU, for inputs larger than 64×64, the CPU's
    own batch cap (:meth:`BuildContext.batch_size`): there a batch of 64 ResNet-50 copies at 224 px
    takes 2-3 times as long per image as a batch of 8 or 16 (its feature maps leave the caches)."""
    h, w = ctx.input_size
    return DEFAULT_BATCH if ctx.device.type == "cuda" or h * w <= 64 * 64 else CPU_LARGE_BATCH
TOP = 5


@dataclass(frozen=True)
class Geometry:
    size: int
    stride: int
    rows: int
    cols: int
    boxes: np.ndarray
    """(rows*cols, 4) int64: y0, y1, x0, x1 of the occluder at each position, row-major, end exclusive."""


def geometry(input_size: tuple[int, int], size: int = 0, stride: int = 0) -> Geometry:
    """Occluder positions for an input of ``input_size`` (H, W); 0 picks the documented defaults."""
    h, w = input_size
    side = min(h, w)
    size = size or max(1, round(side / 4))
    stride = stride or max(1, math.ceil(side / 12))  # about 12×12 positions: seconds, not minutes
    if size > side:
        raise ConfigError(f"config key 'occlusion.size' is {size} px, larger than the {w}×{h} input",
                          "use a square no larger than the image (0 picks a quarter of its side)")
    if stride > side:
        raise ConfigError(f"config key 'occlusion.stride' is {stride} px, larger than the {w}×{h} input",
                          "use a step no larger than the image (0 picks 1/12 of its side)")
    rows, cols = math.ceil(h / stride), math.ceil(w / stride)

    def spans(n: int, limit: int) -> np.ndarray:
        start = np.arange(n) * stride + stride // 2 - size // 2  # square centred on the cell centre
        return np.stack([np.clip(start, 0, limit), np.clip(start + size, 0, limit)], 1)

    ys, xs = spans(rows, h), spans(cols, w)
    boxes = np.concatenate([np.repeat(ys, cols, 0), np.tile(xs, (rows, 1))], 1).astype(np.int64)
    return Geometry(size, stride, rows, cols, boxes)


def occlude(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Copies of ``x`` (B, C, H, W) with the box (y0, y1, x0, x1) of each row set to 0 (the mean)."""
    h, w = x.shape[-2:]
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    in_rows = (ys >= boxes[:, 0:1]) & (ys < boxes[:, 1:2])  # (B, H)
    in_cols = (xs >= boxes[:, 2:3]) & (xs < boxes[:, 3:4])  # (B, W)
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)


class ChannelTotal:
    """Forward hook: the sum over the map of one chosen channel per batch row (``channels``), or,
    while ``channels`` is None, every channel's spatial maximum and sum (to choose the channel)."""

    def __init__(self) -> None:
        self.channels: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.maxima: torch.Tensor | None = None

    def __call__(self, _module, _inputs, out) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise LayerError("config key 'occlusion.layer' must name a layer with a feature-map output",
                             "`sitegen layers MODEL --arch ...` lists them")
        if self.channels is None:
            self.maxima, self.total = out.amax(dim=(2, 3)), out.sum(dim=(2, 3))
        else:
            rows = torch.arange(out.shape[0], device=out.device)
            self.total = out[rows, self.channels].sum(dim=(1, 2))


class OcclusionPass(AnalysisPass):
    name = "occlusion"
    version = 2  # 2: default stride 1/12 of the side (was 1/16)
    distributed = True
    config: OcclusionConfig

    def __init__(self, config: OcclusionConfig, samples: SamplesConfig):
        super().__init__(config)
        self.samples = samples

    def cache_key(self, ctx: BuildContext) -> str:
        return key_with(super().cache_key(ctx), self.samples)

    def layer_name(self, ctx: BuildContext) -> str:
        name = self.config.layer or ctx.all_layers[-1].name
        try:
            get_module(ctx.net, name)
        except LayerError:
            raise LayerError(f"config key 'occlusion.layer' names {name!r}, which is not a layer of the model",
                             "`sitegen layers MODEL --arch ...` lists the names") from None
        return name

    def run(self, ctx: BuildContext) -> Result:
        geo = geometry(ctx.input_size, self.config.size, self.config.stride)
        layer = self.layer_name(ctx)
        ids, x, failed = load_inputs(ctx, sample_images(ctx.images, self.samples))
        hook = ChannelTotal()
        handle = get_module(ctx.net, layer).register_forward_hook(hook)
        try:
            with model_guard(ctx.net), torch.inference_mode():
                return self._measure(ctx, geo, layer, ids, x, failed, hook)
        finally:
            handle.remove()

    def plan(self, ctx: BuildContext, probe: Probe) -> PassPlan:
        """``samples × positions`` occluded copies, each a whole forward: a batch of copies is timed as
        the pass runs it (occlude, forward with the channel hook, softmax) on 1 and on a few; plus
        the unoccluded forwards and the decoding of the samples.  Bad settings fail here, before
        any work."""
        geo = geometry(ctx.input_size, self.config.size, self.config.stride)
        layer = self.layer_name(ctx)
        samples = len(sample_images(ctx.images, self.samples))
        batch = self.config.batch_size or default_batch(ctx)
        copies = samples * len(geo.boxes)
        boxes = torch.as_tensor(geo.boxes, device=ctx.device)

        def run(m: int) -> None:
            x = probe.inputs(min(m, 8))
            hook = ChannelTotal()
            hook.channels = torch.zeros(m, dtype=torch.int64, device=ctx.device)
            handle = get_module(ctx.net, layer).register_forward_hook(hook)
            try:
                with model_guard(ctx.net), torch.inference_mode():
                    jobs = torch.arange(m, device=ctx.device)
                    out = logits(ctx.net(occlude(x[jobs % len(x)], boxes[jobs % len(boxes)]))).float().softmax(1)
                    out.gather(1, torch.zeros((m, 1), dtype=torch.int64, device=out.device)).cpu()
                    out.argmax(1).cpu()
            finally:
                handle.remove()

        fit = probe.fit("occlusion", run, cap=batch)
        world = max(1, ctx.dist.world)
        seconds = fit.batched(copies, batch) / world + probe.forward(None).batched(samples, batch) \
            + samples * probe.decode_seconds()
        return PassPlan(self.name, seconds, {"images": samples, "positions": len(geo.boxes), "copies": copies,
                                             "batch": batch},
                        f"{count(samples)} images × {geo.rows}×{geo.cols} positions")

    def _measure(self, ctx, geo: Geometry, layer: str, ids: list[int], x: torch.Tensor, failed: list[int],
                 hook: ChannelTotal) -> Result:
        batch = self.config.batch_size or default_batch(ctx)
        meta = {"size": geo.size, "stride": geo.stride, "rows": geo.rows, "cols": geo.cols, "layer": layer,
                "labelled": False, "class_names": [], "input_size": list(ctx.input_size)}
        if not ids:
            return Result(meta=meta, arrays={"images": np.zeros(0, np.int64), "boxes": geo.boxes,
                                             "failed": np.array(failed, dtype=np.int64)})
        s, p = len(ids), len(geo.boxes)
        # The unoccluded images: predictions, and the strongest channel of the layer per image.
        hook.channels = None
        base_logits, maxima, totals = [], [], []
        for start in range(0, s, batch):
            base_logits.append(logits(ctx.net(x[start:start + batch])).float())
            maxima.append(hook.maxima)
            totals.append(hook.total)
        probs = torch.cat(base_logits).softmax(1)
        k = probs.shape[1]
        labelled = labels_match_outputs(ctx.images, k)
        target = torch.as_tensor(ctx.images.labels[ids], device=probs.device) if labelled else probs.argmax(1)
        channel = torch.cat(maxima).argmax(1)
        if ctx.dist.active:  # every rank occludes for the same class and channel as rank 0
            target, channel = broadcast_from_main(target), broadcast_from_main(channel)
        base_total = torch.cat(totals).gather(1, channel[:, None])[:, 0]
        # Every (image, position) pair, in batches that may span images.  The batches are the work
        # items: under torchrun each rank computes its share (every world-th batch) and rank 0
        # gathers the rest; one process takes them all.
        boxes = torch.as_tensor(geo.boxes, device=x.device)
        prob = torch.zeros(s * p, device=x.device)
        best = torch.zeros(s * p, dtype=torch.int64, device=x.device)
        total = torch.zeros(s * p, device=x.device)
        spans = [(start, min(start + batch, s * p)) for start in range(0, s * p, batch)]
        mine = ctx.dist.items(len(spans))
        with progress.bar("occlusion", sum(spans[i][1] - spans[i][0] for i in mine), "copies") as advance:
            for i in mine:
                jobs = torch.arange(*spans[i], device=x.device)
                img, pos = jobs // p, jobs % p
                hook.channels = channel[img]
                out = logits(ctx.net(occlude(x[img], boxes[pos]))).float().softmax(1)
                prob[jobs] = out.gather(1, target[img][:, None])[:, 0]
                best[jobs] = out.argmax(1)
                total[jobs] = hook.total.float()
                advance(len(jobs))
        if ctx.dist.active:
            self._gather(spans, mine, prob, best, total)
        top = probs.topk(min(TOP, k), dim=1)
        grid = (s, geo.rows, geo.cols)
        np_ = lambda t: t.detach().cpu().numpy()  # noqa: E731
        arrays = {
            "images": np.array(ids, dtype=np.int64),
            "prob": np_(prob.reshape(grid)).astype(np.float32),
            "best": np_(best.reshape(grid)).astype(np.int32),
            "total": np_(total.reshape(grid)).astype(np.float32),
            "target": np_(target).astype(np.int64),
            "base_prob": np_(probs.gather(1, target[:, None])[:, 0]).astype(np.float32),
            "base_total": np_(base_total).astype(np.float32),
            "channel": np_(channel).astype(np.int64),
            "top_classes": np_(top.indices).astype(np.int64),
            "top_probs": np_(top.values).astype(np.float32),
            "boxes": geo.boxes,
            "failed": np.array(failed, dtype=np.int64),
        }
        meta.update(labelled=bool(labelled), class_names=output_names(ctx.images, k))
        return Result(meta=meta, arrays=arrays)

    @staticmethod
    def _gather(spans: list[tuple[int, int]], mine: range, prob: torch.Tensor, best: torch.Tensor,
                total: torch.Tensor) -> None:
        """Rank 0 receives every other rank's batches and writes them into its arrays (the values
        travel as CPU NumPy arrays of the same dtypes, so nothing is rounded on the way)."""
        np_ = lambda t: t.detach().cpu().numpy()  # noqa: E731
        pieces = [(i, np_(prob[slice(*spans[i])]), np_(best[slice(*spans[i])]), np_(total[slice(*spans[i])]))
                  for i in mine]
        for rank_pieces in gather_to_main(pieces) or []:
            for i, pr, be, to in rank_pieces:
                jobs = slice(*spans[i])
                prob[jobs] = torch.from_numpy(pr).to(prob.device)
                best[jobs] = torch.from_numpy(be).to(best.device)
                total[jobs] = torch.from_numpy(to).to(total.device)


def load_inputs(ctx: BuildContext, indices: list[int]) -> tuple[list[int], torch.Tensor, list[int]]:
    """The normalised inputs of ``indices`` on the device, leaving out images that fail to decode."""
    ids: list[int] = []
    failed: list[int] = []
    parts = []
    for b in ctx.batches(indices):
        ok = b.ok.to(b.inputs.device)
        parts.append(b.inputs[ok])
        ids += [int(i) for i, good in zip(b.indices, b.ok) if good]
        failed += [int(i) for i, good in zip(b.indices, b.ok) if not good]
    h, w = ctx.input_size
    x = torch.cat(parts) if parts else torch.zeros((0, ctx.channels, h, w), device=ctx.device)
    return ids, x, failed
