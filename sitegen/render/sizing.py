"""Measurements the size estimates of several views share: the names that appear in pages, and a
layer's sprite row of patches drawn from real images.  Below the views and the estimate
orchestrator (:mod:`sitegen.render.estimate`), so both import it.
"""
from __future__ import annotations

import numpy as np

from ..context import BuildContext
from ..crops import crop_box, display_box
from ..layers import LayerInfo
from ..planning import SizeSamples
from .patches import sprite_bytes

SPRITES_PER_LAYER = 2
"""Row-0 sprites drawn and encoded per layer."""
SAMPLE_IMAGES = 32
"""Images the dataset pass runs over for the size estimate: each sampled channel's top-k among them
stand for its top-k among all images (a channel's strongest windows sit where its units respond,
usually more inside the image and on busier pictures than random windows, which changes the
sprites' bytes by tens of per cent)."""


class Texts:
    """Mean lengths (UTF-8 bytes) of the names that appear in pages, from the real image list."""

    def __init__(self, ctx: BuildContext, sizes: SizeSamples):
        ids = sizes.image_ids(200)
        recs = [ctx.images.records[i] for i in ids]
        self.rel = sizes.mean_text_bytes(r.rel for r in recs)
        self.name = sizes.mean_text_bytes(r.rel.rsplit("/", 1)[-1] for r in recs)
        self.label = sizes.mean_text_bytes(ctx.images.label_name(i) for i in ids)


def texts(ctx: BuildContext, sizes: SizeSamples) -> Texts:
    return sizes.memo("texts", lambda: Texts(ctx, sizes))


def sample_top(ctx: BuildContext, sizes: SizeSamples) -> dict[str, np.ndarray]:
    """The dataset pass over SAMPLE_IMAGES images spread over the list, for every selected layer:
    per layer ``(C, k, 3)`` int64 rows of (image index, y, x), strongest first."""
    from ..passes.topk import TopKPass

    def run() -> dict[str, np.ndarray]:
        ids = sizes.image_ids(SAMPLE_IMAGES)
        names = [l.name for l in ctx.layers]
        if not ids or not names:
            return {}
        reducers, _ = TopKPass(ctx.config.topk)._stream(ctx, names, ids, None, label="size sample")
        out = {}
        for n in names:
            top = reducers[n].top
            w = ctx.layer(n).shape[2]
            pos = top.pos.cpu().numpy()
            out[n] = np.stack([top.images.cpu().numpy(), pos // w, pos % w], axis=-1)
        return out

    return sizes.memo(f"sample-top:{','.join(l.name for l in ctx.layers)}:{ctx.config.topk.k}", run)


def sample_units(ctx: BuildContext, sizes: SizeSamples, layer: LayerInfo, count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``count`` (image, channel, y, x) units of ``layer`` from :func:`sample_top`: the top entries
    of channels picked at random (seeded), channel by channel."""
    top = sample_top(ctx, sizes).get(layer.name)
    if top is None or not len(top):
        return []
    rng = np.random.default_rng(seed + len(layer.name))
    units: list[tuple[int, ...]] = []
    for c in rng.permutation(len(top)):
        for i, y, x in top[c]:
            if len(units) < count:
                units.append((int(i), int(c), int(y), int(x)))
    return units


def row0_bytes(ctx: BuildContext, sizes: SizeSamples, layer: LayerInfo) -> float:
    """Mean bytes of a layer's sprite with only its row 0 (k patches): SPRITES_PER_LAYER sprites of
    channels picked at random, each from its top-k windows among SAMPLE_IMAGES real images
    (:func:`sample_top`), encoded in the site's format."""
    cfg = ctx.config
    k = min(cfg.topk.k, max(1, len(ctx.images)))

    def measure() -> float:
        units = sample_units(ctx, sizes, layer, SPRITES_PER_LAYER * k)
        out = []
        for s in range(0, len(units), k):
            cells = [crop_box(sizes.shown(i), display_box(layer.rf.box(y, x), ctx.input_size))
                     for i, _c, y, x in units[s:s + k]]
            out.append(len(sprite_bytes([cells], cfg.site.patch_size, k, cfg.site.image_format)))
        return float(np.mean(out)) if out else 0.0

    return sizes.memo(f"row0:{layer.name}:{cfg.site.image_format}:{cfg.site.patch_size}:{k}", measure)


def changed_share(ctx: BuildContext, sizes: SizeSamples) -> float:
    """In a comparison build, the share of SAMPLE_IMAGES images (spread over the list) whose top class
    differs between the model and the checkpoint it is compared with: how many images the changes
    page will list and give a page.  0 when the outputs are not class scores."""
    import torch

    from ..errors import ModelLoadError
    from ..hooks import model_guard
    from ..images import normalise
    from ..model_loading import logits

    def run() -> float:
        ids = sizes.image_ids(SAMPLE_IMAGES)
        if ctx.compare is None or not ids:
            return 0.0
        x = normalise(torch.from_numpy(np.stack([sizes.pixels(i) for i in ids])).to(ctx.device), ctx.config.data)
        tops = []
        try:
            for net in (ctx.net, ctx.compare.model):
                with model_guard(net), torch.inference_mode():
                    tops.append(logits(net(x)).argmax(1).cpu())
        except ModelLoadError:  # no class scores: the comparison lists no predictions
            return 0.0
        return float((tops[0] != tops[1]).float().mean())

    return sizes.memo("changed-share", run)
