"""Occlusion sensitivity pages: a gallery (``occlusion/index.html``) of the sample images, each
opening its image page, which shows the three maps overlaid on the image with colour bars.

Maps: (a) probability of the target class on a fixed 0-1 viridis scale; (b) the most probable class
per position in category colours with a legend; (c) the strongest channel's total activation on a
viridis scale from that map's minimum to its maximum (the numbers are printed under the bar).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from ..colormap import categories, colorbar, hex_to_rgb, overlay, scale, upscale, viridis
from ..pages import Page, layer_url
from .base import View
from ...planning import SiteItem
from .image_files import (display_factor, image_url, map_urls, png_bytes, safe_pixels, save_png, top_list,
                          usable)

COLORBAR = "img/colorbar.png"
SIZE_SAMPLES = 2
"""Sample images whose three overlays are drawn and encoded for the size estimate."""
HTML = {"index": 2534, "item": 325}
"""Bytes of occlusion/index.html: base + per gallery item (names added apart), measured."""


def class_legend(best: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """The classes that win somewhere in map (b), most positions first, with their colours."""
    colours = categories(max(len(names), 1))
    classes, counts = np.unique(best, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [{"name": names[int(classes[i])] if int(classes[i]) < len(names) else f"class {int(classes[i])}",
             "colour": colours[int(classes[i]) % len(colours)], "share": float(counts[i] / best.size)}
            for i in order]


def heatmaps(r, s: int) -> dict[str, np.ndarray]:
    """The three coarse (rows, cols, 3) maps of sample row ``s`` in display colours."""
    a = r.arrays
    colours = np.array([hex_to_rgb(c) for c in categories(max(len(r.meta["class_names"]), 1))], dtype=np.uint8)
    total = a["total"][s]
    return {"prob": viridis(a["prob"][s]),
            "best": colours[a["best"][s] % len(colours)],
            "total": viridis(scale(total, float(total.min()), float(total.max())))}


class OcclusionView(View):
    name = "occlusion"

    def available(self, results: dict) -> bool:
        return usable(results, "occlusion")

    def nav(self) -> list[tuple[str, str]]:
        return [("occlusion/index.html", "Occlusion sensitivity")]

    def pages(self, ctx, atlas: dict, results: dict, opts) -> list:

        r = results["occlusion"]
        a, m = r.arrays, r.meta
        names = m["class_names"]
        factor = display_factor(ctx.input_size)
        h, w = ctx.input_size
        items = []
        for s, n in enumerate(a["images"].tolist()):
            target = int(a["target"][s])
            top1 = int(a["top_classes"][s][0])
            items.append({
                "url": f"../{image_url(ctx.images.records[n].rel)}", "src": f"../{map_urls(n)['prob']}", "name": ctx.images.records[n].rel,
                "label": ctx.images.label_name(n), "target": names[target], "base_prob": float(a["base_prob"][s]),
                "top1": names[top1], "top1_prob": float(a["top_probs"][s][0]), "min_prob": float(a["prob"][s].min()),
            })
        shown = {l["name"] for l in atlas["layers"]}
        context = {
            "gallery": items, "size": m["size"], "stride": m["stride"], "rows": m["rows"], "cols": m["cols"],
            "layer": m["layer"], "layer_url": f"../{layer_url(m['layer'])}" if m["layer"] in shown else None,
            "labelled": m["labelled"], "width": w * factor, "height": h * factor, "bar": f"../{COLORBAR}",
            "failed": [ctx.images.records[int(i)].rel for i in a["failed"]],
        }
        return [Page("occlusion/index.html", "occlusion.html", context, title=f"Occlusion sensitivity · {opts.title}",
                     crumbs=[("index.html", "atlas")])]

    def estimate(self, ctx, sizes) -> list[SiteItem]:
        """Three overlays per sample image (drawn as ``draw`` draws them, from real sample images
        and random coarse maps, encoded), the colour bar and the gallery page."""
        from ...passes.occlusion import geometry
        from ...passes.sampling import sample_images
        from ..sizing import texts

        cfg = ctx.config
        if not cfg.occlusion.enabled:
            return []
        ids = sample_images(ctx.images, cfg.samples)
        if not ids:
            return []
        geo = geometry(ctx.input_size, cfg.occlusion.size, cfg.occlusion.stride)
        factor = display_factor(ctx.input_size)

        def measure() -> float:
            rng = np.random.default_rng(0)
            out = []
            for n in ids[:SIZE_SAMPLES]:
                pixels = sizes.shown(n)
                for heat in (viridis(rng.random((geo.rows, geo.cols))),
                             viridis(scale(rng.random((geo.rows, geo.cols)), 0.0, 1.0)),
                             rng.integers(0, 256, (geo.rows, geo.cols, 3), dtype=np.uint8)):
                    out.append(len(png_bytes(upscale(overlay(pixels, heat, geo.stride), factor))))
            return float(np.mean(out))

        each = sizes.memo(f"occlusion:{geo.stride}:{factor}", measure)
        t = texts(ctx, sizes)
        return [SiteItem("occlusion", "occlusion overlays", 3 * len(ids), 3 * len(ids) * each, example=map_urls(ids[-1])["total"]),
                SiteItem("occlusion", "occlusion page", 2, HTML["index"] + 300
                         + len(ids) * (HTML["item"] + 2 * t.rel + t.label), example="occlusion/index.html")]

    def draw_jobs(self, ctx, atlas: dict, results: dict, out: Path, opts) -> list:
        """The colour bar, then one job per sample image (its three overlays)."""
        r = results["occlusion"]
        factor = display_factor(ctx.input_size)
        stride = int(r.meta["stride"])

        def image(s: int, n: int) -> None:
            pixels = safe_pixels(ctx, n)
            urls = map_urls(n)
            for key, heat in heatmaps(r, s).items():
                save_png(upscale(overlay(pixels, heat, stride), factor), out / urls[key])

        return [lambda: save_png(colorbar(), out / COLORBAR)] + \
            [functools.partial(image, s, n) for s, n in enumerate(r.arrays["images"].tolist())]


def occlusion_context(ctx, atlas: dict, r, s: int, layer_url) -> dict[str, Any]:
    """What an image page shows of occlusion row ``s``: the three overlays and their scales."""
    a, m = r.arrays, r.meta
    n = int(a["images"][s])
    names = m["class_names"]
    target = int(a["target"][s])
    total = a["total"][s]
    layer = m["layer"]
    shown = {l["name"] for l in atlas["layers"]}
    channel = int(a["channel"][s])
    urls = map_urls(n)
    return {
        "top": top_list(a["top_classes"][s], a["top_probs"][s], names),
        "target": names[target] if target < len(names) else f"class {target}",
        "labelled": m["labelled"], "size": m["size"], "stride": m["stride"],
        "base_prob": float(a["base_prob"][s]),
        "prob_url": f"../{urls['prob']}", "best_url": f"../{urls['best']}", "total_url": f"../{urls['total']}",
        "prob_min": float(a["prob"][s].min()),
        "legend": class_legend(a["best"][s], names),
        "layer": layer, "channel": channel,
        "channel_url": f"../layers/{layer_url(layer).split('/')[1]}/{channel}.html" if layer in shown else None,
        "total_lo": float(total.min()), "total_hi": float(total.max()), "base_total": float(a["base_total"][s]),
        "bar": "../img/colorbar.png",
    }
