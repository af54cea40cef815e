"""Attribution view: each top-k patch beside its guided-backprop image, and stage views.

Reads the attribution pass's display crops (already normalised uint8 images of each unit's window;
this view computes nothing) and
 - adds one sprite row per method to every channel sprite, so a channel's sprite holds rows
   ``[patches, guided, deconvnet, gradient]`` (in the configured method order), each cell the same
   window as the patch above it;
 - puts a partial on every channel page: each patch beside its attribution, a method switch that
   changes the sprite row shown (no rebuild; ``assets/site.js``), and how the images are normalised;
 - writes stage views ``stages/<stage>/<c>.html``: channel ``c`` of every residual block of a stage
   side by side (``layer3.0`` → ``layer3.1`` → ..., Caffe ``res4a`` → ``res4b`` → ...), each with its
   top-k and their attributions, plus the block's branch layer (the last convolution of its residual
   branch) for the same channel when that layer is selected; ``stages/index.html`` lists them.

The method rows start at sprite row 1: this view must stay the first registered view that adds
sprite rows (``registered()`` in ``views/__init__.py``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ...crops import crop_box
from ...passes.attribution import activation_report, attribute_units, unit_crops
from ...planning import SiteItem
from ..pages import Page, RenderOptions, channel_url, layer_url, slug, sprite_url
from ..patches import sprite_bytes
from ..sizing import row0_bytes, sample_units, texts
from .base import View
from ..stages import Stage, find_stages
from .sanity import figures_for

if TYPE_CHECKING:  # pragma: no cover
    from ...context import BuildContext
    from ...passes.base import Result
    from ...planning import SizeSamples

FIRST_ROW = 1
"""Sprite row of the first method (row 0 holds the patches)."""

SIZE_UNITS = 9
"""Units attributed per measured layer for the size estimate (the sprite rows' bytes per cell)."""
SIZE_LAYERS = 3
"""Layers (spread over the selection) whose attribution rows are measured; the others interpolated."""
HTML = {"channel": 1930, "channel_cell": 430, "stage": 3304, "stage_column": 190, "stage_cell": 310,
        "stages": 2104, "stages_stage": 200, "stages_link": 40}
"""Bytes of the attribution section of a channel page, of a stage page and of stages/index.html
(``base`` + per item), measured on real atlases; names are added apart."""

LABELS = {"guided": "guided backprop", "deconvnet": "deconvnet", "gradient": "gradient"}
NOTES = {
    "guided": "Guided backpropagation (Springenberg et al. 2015): at every activation the gradient arriving "
              "from above is rectified (its negative part dropped), then multiplied by the activation's "
              "slope at its forward input; at a ReLU it passes only where the forward input was positive "
              "and the gradient itself is positive.",
    "deconvnet": "Deconvnet (Zeiler & Fergus 2014): at every activation the gradient is rectified, whatever "
                 "the forward input was.",
    "gradient": "Gradient: the plain gradient of the unit with respect to the input pixels.",
}
RULED = ("guided", "deconvnet")
"""The methods with backward rules at activations (the gradient has none to miss)."""


def normalisation_note(percentile: float, window: int | None = None, side: int | None = None) -> str:
    """How ``sitegen.attribution.normalise_for_display`` made the images, in words for the page."""
    pct = f"{percentile:g}"
    text = (f"Each attribution image is scaled on its own, so brightness is not comparable between images: "
            f"the crop shown (the same window as its patch) is divided by the {pct}th percentile of its "
            f"absolute values (by its largest absolute value where that percentile is 0) and clipped to ±1. "
            f"Grey is zero; each colour channel is brighter than grey where the attribution to that input "
            f"channel is positive and darker where it is negative (signs kept, no mean subtracted); an "
            f"all-zero attribution is plain grey, as is the part of a window outside the image.")
    if window and side and side < window:
        text += f" Windows of {window} px are stored shrunk to {side} px (box filter)."
    return text


def shared_note(meta: dict, layer: str | None, method: str) -> str:
    """For a layer whose pictures of ``method`` the pass computed once and shared (the attribution
    pass's ``shared`` meta), what that means for the reader; empty otherwise."""
    shared = meta.get("shared", {}).get(layer) if layer else None
    if not shared or shared["method"] != method:
        return ""
    where = ("once per channel for the units whose field lies inside the image, and once per position at "
             "the border" if shared["translated"] else "once per channel and position")
    return (f" In this layer its picture of a unit is the same on every image, proved from the model "
            f"({shared['reason']}): it was computed {where}, {shared['computed']:,} pictures for "
            f"{shared['units']:,} units.")


def unruled_kinds(r: "Result", layers: list[str]) -> list[str]:
    """The kinds without a rule on the path to any of ``layers`` (in the report's order); none when
    no method with rules was computed."""
    if not set(RULED) & set(r.meta["methods"]):
        return []
    report = activation_report(r)
    found = {k for name in layers for k in report.affected.get(name, ())}
    return [k for k in report.unruled if k in found]


class AttributionView(View):
    name = "attribution"
    channel_partial = "_channel_attribution.html"
    index_partial = "_index_attribution.html"

    def __init__(self) -> None:
        self._stages: tuple[int, list[Stage]] | None = None

    def available(self, results: dict[str, "Result"]) -> bool:
        return "attribution" in results

    def nav(self) -> list[tuple[str, str]]:
        return [("stages/index.html", "residual stages: a channel across blocks")]

    # -------------------------------------------------------------- channel sprites and pages

    def sprite_rows(self, ctx: "BuildContext", atlas: dict, results: dict, li: int, c: int,
                    patch_boxes: list[tuple[int, int, int, int]]) -> list[list[np.ndarray]]:
        r = results["attribution"]
        layer = atlas["layers"][li]["name"]
        window = r.meta["windows"][r.meta["layers"].index(layer)]
        for box in patch_boxes:
            if box[2] - box[0] != window:  # the pass and the sprite must crop the same windows
                raise RuntimeError(f"{layer}:{c}: patch window {box} is not the attribution's {window} px")
        n = len(patch_boxes)
        return [list(unit_crops(r, layer, c, m)[:n]) for m in r.meta["methods"]]

    def _methods(self, results: dict, layer: str | None = None) -> list[dict[str, Any]]:
        meta = results["attribution"].meta
        return [{"name": m, "label": LABELS[m], "note": NOTES[m] + shared_note(meta, layer, m),
                 "row": FIRST_ROW + i, "checked": i == 0}
                for i, m in enumerate(meta["methods"])]

    def channel_context(self, ctx: "BuildContext", atlas: dict, results: dict, li: int, c: int) -> dict[str, Any]:
        r = results["attribution"]
        layer = atlas["layers"][li]["name"]
        i = r.meta["layers"].index(layer)
        stage = self._stage_of(ctx, atlas, layer)
        link = None
        if stage is not None:
            link = {"url": f"stages/{stage.slug}/{c}.html", "stage": stage.stage, "caffe": stage.caffe}
        return {"methods": self._methods(results, layer), "default_row": FIRST_ROW,
                "normalisation": normalisation_note(r.meta["percentile"], r.meta["windows"][i], r.meta["sides"][i]),
                "stage": link, "unruled": unruled_kinds(r, [layer]),
                # Beside the method switch: how far each method's pictures of this layer can be trusted.
                "sanity": figures_for(results, layer)}

    def index_context(self, ctx: "BuildContext", atlas: dict, results: dict) -> dict[str, Any]:
        r = results["attribution"]
        report = activation_report(r)
        return {"kinds": [k.to_dict() for k in report.kinds],
                "ruled_methods": [LABELS[m] for m in r.meta["methods"] if m in RULED],
                "unruled": report.unruled if set(RULED) & set(r.meta["methods"]) else [],
                "affected": [{"name": name, "url": layer_url(name), "kinds": list(kinds)}
                             for name, kinds in report.affected.items()]}

    # -------------------------------------------------------------- stage views

    def stages(self, ctx: "BuildContext", atlas: dict) -> list[Stage]:
        if self._stages is None or self._stages[0] != id(atlas):
            self._stages = (id(atlas), find_stages(ctx, [l["name"] for l in atlas["layers"]]))
        return self._stages[1]

    def _stage_of(self, ctx: "BuildContext", atlas: dict, layer: str) -> Stage | None:
        for s in self.stages(ctx, atlas):
            if any(b.name == layer for b in s.blocks) or layer in s.branches.values():
                return s
        return None

    def pages(self, ctx: "BuildContext", atlas: dict, results: dict, opts: "RenderOptions") -> list["Page"]:

        stages = self.stages(ctx, atlas)
        crumbs = [("index.html", "atlas")]
        pages = [Page("stages/index.html", "stages.html", {"stages": [self._summary(s) for s in stages]},
                      title=f"residual stages · {opts.title}", crumbs=crumbs)]
        by_name = {l["name"]: l for l in atlas["layers"]}
        r = results["attribution"]
        for s in stages:
            # The sanity figures of the stage's last block (the deepest pictures on the page).
            sanity = figures_for(results, s.blocks[-1].name)
            for c in range(s.width):
                pages.append(Page(f"stages/{s.slug}/{c}.html", "stage.html",
                                  {**self._stage_context(s, c, by_name, r, atlas["k"], opts), "sanity": sanity},
                                  title=f"{s.stage}:{c} · {opts.title}",
                                  crumbs=crumbs + [("stages/index.html", "residual stages")]))
        return pages

    def _summary(self, s: Stage) -> dict[str, Any]:
        return {"stage": s.stage, "caffe": s.caffe, "width": s.width,
                "blocks": [{"name": b.name, "caffe": b.caffe} for b in s.blocks],
                "branches": len(s.branches),
                "left_out": [{"name": b.name, "channels": b.channels} for b in s.left_out],
                "channels": [{"c": c, "url": f"stages/{s.slug}/{c}.html"} for c in range(s.width)]}

    def _stage_context(self, s: Stage, c: int, by_name: dict, r: "Result", k: int,
                       opts: "RenderOptions") -> dict[str, Any]:
        def column(name: str, caffe: str) -> dict[str, Any]:

            ch = by_name[name]["channels"][c]
            cells = [{"col": j, "name": e["image"].rsplit("/", 1)[-1], "image": e["image"], "label": e["label"],
                      "value": e["value"], "fmap_yx": e["fmap_yx"]} for j, e in enumerate(ch["top"])]
            return {"name": name, "caffe": caffe, "url": channel_url(name, c),
                    "sprite": sprite_url(name, c, opts.image_format), "cells": cells,
                    "dead": ch["stats"]["max"] <= 0}

        blocks = []
        for b in s.blocks:
            col = column(b.name, b.caffe)
            col["branch"] = column(s.branches[b.name], s.branch_caffe[b.name]) if b.name in s.branches else None
            blocks.append(col)
        sizes = [(r.meta["windows"][i], r.meta["sides"][i]) for i, name in enumerate(r.meta["layers"])
                 if name in {b["name"] for b in blocks} | {b["branch"]["name"] for b in blocks if b["branch"]}]
        shrunk = [(w, side) for w, side in sizes if side < w]
        shown_layers = [b["name"] for b in blocks] + [b["branch"]["name"] for b in blocks if b["branch"]]
        return {"stage": s.stage, "caffe": s.caffe, "width": s.width, "channel": c, "k": k,
                "unruled": unruled_kinds(r, shown_layers),
                "cell": max(16, opts.patch_size // 2), "blocks": blocks,
                "left_out": [{"name": b.name, "channels": b.channels} for b in s.left_out],
                "methods": self._methods({"attribution": r}), "default_row": FIRST_ROW,
                "normalisation": normalisation_note(r.meta["percentile"], *(max(shrunk) if shrunk else (None, None))),
                "prev": f"{c - 1}.html" if c > 0 else None,
                "next": f"{c + 1}.html" if c + 1 < s.width else None}

    # -------------------------------------------------------------- size estimate

    def estimate(self, ctx: "BuildContext", sizes: "SizeSamples") -> list[SiteItem]:
        """Per layer, one sprite row per method (bytes measured: real attributions of a few units of
        up to SIZE_LAYERS layers drawn as the sprite draws them, relative to their patches' row,
        interpolated between the measured layers) and the channel pages' attribution section; the
        stage pages (a column per block and branch layer, split among them so leaving a layer out
        removes its share)."""
        cfg = ctx.config
        if not cfg.attribution.enabled or not ctx.layers:
            return []
        methods = list(cfg.attribution.methods)
        k = min(cfg.topk.k, max(1, len(ctx.images)))
        t = texts(ctx, sizes)
        ratios = self._row_ratios(ctx, sizes, methods)
        items: list[SiteItem] = []
        for l in ctx.layers:
            row0 = row0_bytes(ctx, sizes, l)
            for m in methods:
                items.append(SiteItem("attribution", "sprites", 0, l.channels * ratios[l.name][m] * row0,
                                      l.name, tag=f"attribution:{m}"))
            cell = HTML["channel_cell"] + 2 * len(slug(l.name)) + 3 * t.name + t.rel + t.label
            items.append(SiteItem("attribution", "channel pages", 0, l.channels * (HTML["channel"] + k * cell), l.name,
                                  tag="attribution"))
        stages = find_stages(ctx, [l.name for l in ctx.layers])
        for s in stages:
            page = f"stages/{s.slug}/{s.width - 1}.html"
            cell = HTML["stage_cell"] + t.rel + t.label + 2 * t.name
            for i, b in enumerate(s.blocks):
                col = s.width * (HTML["stage_column"] + 4 * len(b.name) + k * (cell + 2 * len(slug(b.name))))
                base = s.width * (HTML["stage"] + HTML["stages_link"]) + HTML["stages_stage"] if i == 0 else 0
                items.append(SiteItem("attribution", "stage pages", s.width if i == 0 else 0, col + base, b.name,
                                      tag="attribution", example=page))
                if b.name in s.branches:
                    br = s.branches[b.name]
                    items.append(SiteItem("attribution", "stage pages", 0, s.width * (
                        HTML["stage_column"] + 4 * len(br) + k * (cell + 2 * len(slug(br)))), br, tag="attribution"))
        items.append(SiteItem("attribution", "stages index", 1, HTML["stages"], tag="attribution",
                              example="stages/index.html"))
        return items

    def _row_ratios(self, ctx: "BuildContext", sizes: "SizeSamples", methods: list[str]) -> dict[str, dict[str, float]]:
        """Per layer and method: bytes of the method's sprite row over the bytes of the patches' row."""
        names = [l.name for l in ctx.layers]
        picks = sorted(set(np.round(np.linspace(0, len(names) - 1, min(SIZE_LAYERS, len(names)))).astype(int)))
        measured = {int(i): self._measure_row(ctx, sizes, names[int(i)], methods) for i in picks}
        out = {}
        for j, name in enumerate(names):
            lo = max((i for i in measured if i <= j), default=min(measured))
            hi = min((i for i in measured if i >= j), default=max(measured))
            w = 0.0 if hi == lo else (j - lo) / (hi - lo)
            out[name] = {m: (1 - w) * measured[lo][m] + w * measured[hi][m] for m in methods}
        return out

    def _measure_row(self, ctx: "BuildContext", sizes: "SizeSamples", name: str, methods: list[str]) -> dict[str, float]:
        cfg = ctx.config

        def measure() -> dict[str, float]:
            units = sample_units(ctx, sizes, ctx.layer(name), SIZE_UNITS, seed=1)
            if not units:
                return {m: 0.0 for m in methods}
            plan, crops = attribute_units(ctx, name, units, methods, cfg.attribution.max_side, sizes.pixels)
            w = plan.window
            patches = [crop_box(sizes.shown(int(i)), (int(x), int(y), int(x) + w, int(y) + w))
                       for i, x, y in zip(plan.image, plan.x0, plan.y0)]
            rows = [patches]
            n = len(patches)
            sizes_so_far = [len(sprite_bytes(rows, cfg.site.patch_size, n, cfg.site.image_format))]
            for m in methods:
                rows.append(list(crops[m]))
                sizes_so_far.append(len(sprite_bytes(rows, cfg.site.patch_size, n, cfg.site.image_format)))
            base = max(1, sizes_so_far[0])
            return {m: max(0.0, (sizes_so_far[i + 1] - sizes_so_far[i]) / base) for i, m in enumerate(methods)}

        key = f"attribution-rows:{name}:{','.join(methods)}:{cfg.attribution.max_side}:{cfg.site.patch_size}:" \
              f"{cfg.site.image_format}"
        return sizes.memo(key, measure)
