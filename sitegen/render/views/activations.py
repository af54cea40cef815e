"""Activation maps: for each sample image (``activations/<name>.html``, the name of its image page,
see ``image_pages.image_name``), every selected layer's feature maps as a grid of small pictures,
channel c at row c // columns, column c % columns.

Each layer's maps share one scale for that image: v = clip(a / M, 0, 1) with M the largest value
of any of the layer's maps for the image, drawn in viridis (so negative values, e.g. a convolution's
output before its ReLU, look like zero).  Maps that are never active for the image (maximum ≤ 0)
get a red frame and are listed.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from ..colormap import upscale, viridis
from ..pages import Page, layer_url
from .base import View
from ...planning import SiteItem
from ..patches import encode, save_image
from .image_files import activations_url, display_factor, image_url, picture_url, save_png, usable

GAP = 2
DEAD_FRAME = np.array([200, 30, 30], dtype=np.uint8)
LISTED = 48
"""Never-active channels named on a page per layer (the rest counted)."""
SIZE_LAYERS = 4
"""Layers whose activation picture is drawn (from one real sample image) and encoded for the size
estimate; the others are estimated from their picture's area at the measured bytes per pixel."""
HTML = {"page": 2394, "layer": 596, "index": 1874, "item": 213}
"""Bytes of an activation page (base + per layer) and of activations/index.html (base + per image)."""


def grid_size(shape: tuple[int, int, int], max_side: int) -> tuple[int, int]:
    """(height, width) in pixels of :func:`map_grid`'s picture of a layer's maps of ``shape``."""
    c, h, w = shape
    h, w = min(h, max_side), min(w, max_side)
    columns = max(1, math.ceil(math.sqrt(c)))
    rows = math.ceil(c / columns)
    scale = max(1, round(48 / max(h, w)))
    return rows * (h * scale + GAP) + GAP, columns * (w * scale + GAP) + GAP


def picture_path(n: int, li: int, fmt: str) -> str:
    """Sample image ``n``'s picture of selected layer ``li`` in ``site.image_format``: lossless
    either way (WebP lossless coded these pictures in half the time of PNG, to 3 % fewer bytes:
    2.0 against 3.9 ms and 20.8 against 21.4 kB a picture on the shared ResNet-56 atlas)."""
    return f"img/activations/{n}/L{li}.{fmt}"


def picture_bytes(picture: np.ndarray, fmt: str) -> bytes:
    return encode(picture, fmt, lossless=True)


def map_grid(maps: np.ndarray, peak: float, never: np.ndarray) -> tuple[np.ndarray, int]:
    """(picture, columns): maps (C, h, w) on the scale [0, peak], channels row-major in a near-square
    grid, each enlarged to about 48 px, never-active ones framed in red."""
    c, h, w = maps.shape
    columns = max(1, math.ceil(math.sqrt(c)))
    rows = math.ceil(c / columns)
    scale = max(1, round(48 / max(h, w)))  # tiles about 48 px: a 32×32 map doubled, a 7×7 one ×7
    th, tw = h * scale, w * scale
    v = np.clip(maps.astype(np.float64) / peak, 0.0, 1.0) if peak > 0 else np.zeros(maps.shape)
    tiles = viridis(v)
    out = np.full((rows * (th + GAP) + GAP, columns * (tw + GAP) + GAP, 3), 255, dtype=np.uint8)
    for i in range(c):
        r, col = divmod(i, columns)
        y, x = GAP + r * (th + GAP), GAP + col * (tw + GAP)
        if never[i]:
            out[y - GAP:y + th + GAP, x - GAP:x + tw + GAP] = DEAD_FRAME
        out[y:y + th, x:x + tw] = upscale(tiles[i], scale)
    return out, columns


class ActivationsView(View):
    name = "activations"

    def available(self, results: dict) -> bool:
        return usable(results, "activations")

    def nav(self) -> list[tuple[str, str]]:
        return [("activations/index.html", "Activation maps")]

    def estimate(self, ctx, sizes) -> list[SiteItem]:
        """Per sample image a page and, per layer, a picture of its maps: bytes per pixel measured on
        the pictures of up to SIZE_LAYERS layers drawn from one real sample image (the maps kept as
        the pass keeps them), interpolated between them; the pictures' areas are exact."""
        from ...passes.activations import sample_maps
        from ...passes.sampling import sample_images
        from ..sizing import texts

        cfg = ctx.config
        if not cfg.activations.enabled or not ctx.layers:
            return []
        ids = sample_images(ctx.images, cfg.samples)
        if not ids:
            return []
        side, fmt = cfg.activations.max_side, cfg.site.image_format
        names = [l.name for l in ctx.layers]
        picks = sorted(set(np.round(np.linspace(0, len(names) - 1, min(SIZE_LAYERS, len(names)))).astype(int).tolist()))

        def measure() -> dict[int, float]:
            maps = sample_maps(ctx, [names[i] for i in picks], sizes.pixels(ids[0]), side)
            out = {}
            for i in picks:
                mx, _mn, m = maps[names[i]]
                picture, _ = map_grid(m, float(max(mx.max(), 0.0)), mx <= 0)
                out[i] = len(picture_bytes(picture, fmt)) / (picture.shape[0] * picture.shape[1])
            return out

        per_px = sizes.memo(f"activations:{','.join(names[i] for i in picks)}:{side}:{fmt}", measure)
        t = texts(ctx, sizes)
        s = len(ids)
        items = []
        for j, l in enumerate(ctx.layers):
            lo = max((i for i in per_px if i <= j), default=min(per_px))
            hi = min((i for i in per_px if i >= j), default=max(per_px))
            w = 0.0 if hi == lo else (j - lo) / (hi - lo)
            bpp = (1 - w) * per_px[lo] + w * per_px[hi]
            gh, gw = grid_size(l.shape, side)
            items.append(SiteItem("activations", "activation pictures", s, s * (100 + bpp * gh * gw), l.name,
                                  example=picture_path(ids[-1], j, fmt)))
            items.append(SiteItem("activations", "activation pages", 0, s * (HTML["layer"] + 4 * len(l.name)), l.name))
        colour_bar = not (cfg.occlusion.enabled)  # otherwise the occlusion view counts the shared file
        items.append(SiteItem("activations", "activation pages", s + 1 + colour_bar, s * (HTML["page"] + 4 * t.rel)
                              + HTML["index"] + s * (HTML["item"] + 2 * t.rel + t.label) + 300 * colour_bar,
                              example=activations_url(ctx.images.records[ids[-1]].rel)))
        return items

    def pages(self, ctx, atlas: dict, results: dict, opts) -> list:

        r = results["activations"]
        a, m = r.arrays, r.meta
        ids = a["images"].tolist()
        factor = display_factor(ctx.input_size)
        h, w = ctx.input_size
        crumbs = [("index.html", "atlas")]
        rels = [ctx.images.records[n].rel for n in ids]
        gallery = [{"url": f"../{activations_url(rel)}", "src": f"../{picture_url(rel)}", "name": rel,
                    "label": ctx.images.label_name(n)} for n, rel in zip(ids, rels)]
        pages = [Page("activations/index.html", "activations.html",
                      {"gallery": gallery, "width": w * factor, "height": h * factor, "layers": len(m["layers"])},
                      title=f"Activation maps · {opts.title}", crumbs=crumbs)]
        for s, n in enumerate(ids):
            layers = []
            for li, name in enumerate(m["layers"]):
                mx = a[f"L{li}.max"][s]
                never = np.flatnonzero(mx <= 0)
                shape = list(ctx.layer(name).shape)
                layers.append({
                    "name": name, "url": f"../{layer_url(name)}", "shape": shape,
                    "src": f"../{picture_path(n, li, opts.image_format)}", "peak": float(max(mx.max(), 0.0)),
                    "never": len(never), "never_list": never[:LISTED].tolist(), "channels": len(mx),
                    "pooled": list(a[f"L{li}.maps"].shape[2:]) if list(a[f"L{li}.maps"].shape[2:]) != shape[1:] else None,
                    "global_pool": ctx.layer(name).kind == "pooled",
                })
            rel = rels[s]
            pages.append(Page(activations_url(rel), "activations_image.html", {
                "n": n, "name": rel, "label": ctx.images.label_name(n),
                "src": f"../{picture_url(rel)}", "image_url": f"../{image_url(rel)}",
                "width": w * factor, "height": h * factor, "layers": layers, "bar": "../img/colorbar.png",
                "prev": f"../{activations_url(rels[s - 1])}" if s > 0 else None,
                "next": f"../{activations_url(rels[s + 1])}" if s + 1 < len(ids) else None,
            }, title=f"Activation maps of {rel} · {opts.title}",
                crumbs=crumbs + [("activations/index.html", "activation maps")]))
        return pages

    def draw_jobs(self, ctx, atlas: dict, results: dict, out: Path, opts) -> list:
        """The colour bar, then one job per sample image (its maps of every layer)."""
        from ..colormap import colorbar

        r = results["activations"]
        a, m = r.arrays, r.meta

        def image(s: int, n: int) -> None:
            for li in range(len(m["layers"])):
                mx = a[f"L{li}.max"][s]
                picture, _ = map_grid(a[f"L{li}.maps"][s], float(mx.max()), mx <= 0)
                save_image(picture, out / picture_path(n, li, opts.image_format), opts.image_format, lossless=True)

        return [lambda: save_png(colorbar(), out / "img/colorbar.png")] + \
            [functools.partial(image, s, n) for s, n in enumerate(a["images"].tolist())]
