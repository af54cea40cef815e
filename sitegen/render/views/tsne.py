"""t-SNE pages: ``tsne/index.html`` (the scatter, coloured by class, how faithful the map is) and
``tsne/grid.html`` (the images snapped to a square grid).

The scatter is inline SVG: every point is a link to its image page, so it works without scripts;
``assets/tsne.js`` adds the hover thumbnail, read from one sprite of all points (no fetch(), no data
outside the page, so it works from file://).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...planning import SiteItem
from ..colormap import categories
from ..pages import Page
from .base import View
from .image_files import image_url, jpeg_bytes, safe_pixels, save_jpeg, usable

VIEW_W, VIEW_H, MARGIN = 1000, 760, 12
SPRITE = "img/tsne/thumbs.jpg"
GRID = "img/tsne/grid.jpg"
SPRITE_COLUMNS = 50
HTML = {"scatter": 2974, "point": 211, "grid": 3074, "cell": 22, "empty": 10}
"""Bytes of tsne/index.html (base + per point) and tsne/grid.html (base + per filled / empty cell),
measured on real atlases; names are added apart."""


def thumb_size(input_size: tuple[int, int]) -> int:
    return min(64, max(input_size))


def grid_cell(input_size: tuple[int, int]) -> int:
    return min(48, max(input_size))


def thumbnail(pixels: np.ndarray, side: int) -> np.ndarray:
    """The image fitted into a side×side square (aspect kept, white margins)."""
    h, w = pixels.shape[:2]
    s = side / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    img = Image.fromarray(pixels)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.Resampling.BOX if s < 1 else Image.Resampling.NEAREST)
    out = np.full((side, side, 3), 255, dtype=np.uint8)
    y0, x0 = (side - nh) // 2, (side - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = np.asarray(img)
    return out


def layout(xy: np.ndarray) -> np.ndarray:
    """Map coordinates scaled into the SVG view box (aspect kept, centred), y down as in the grid."""
    lo, hi = xy.min(0), xy.max(0)
    span = float(max((hi - lo).max(), 1e-12))
    k = min(VIEW_W, VIEW_H) - 2 * MARGIN
    pts = (xy - lo) / span * k
    extent = (hi - lo) / span * k
    offset = np.array([(VIEW_W - extent[0]) / 2, (VIEW_H - extent[1]) / 2])
    return pts + offset


class TsneView(View):
    name = "tsne"

    def available(self, results: dict) -> bool:
        return usable(results, "tsne")

    def nav(self) -> list[tuple[str, str]]:
        return [("tsne/index.html", "t-SNE of codes"), ("tsne/grid.html", "t-SNE image grid")]

    def estimate(self, ctx, sizes) -> list[SiteItem]:
        """The scatter page (a link per point), the grid page and their two JPEGs: bytes per pixel
        of a thumbnail sheet drawn from real images, times the pictures' exact areas (the grid's
        empty cells, white, count as nothing)."""
        from ...passes.sampling import stratified_sample
        from ...passes.tsne import classifier_name
        from ..sizing import texts

        cfg = ctx.config.tsne
        if not cfg.enabled or classifier_name(ctx.net, cfg.layer) is None:
            return []
        n = len(stratified_sample(ctx.images.labels, cfg.max_points, cfg.seed))
        if n < 5:
            return []
        g = min(cfg.grid_max, n)
        side = max(1, math.ceil(math.sqrt(g)))
        thumb, cell = thumb_size(ctx.input_size), grid_cell(ctx.input_size)

        def measure() -> float:
            ids = sizes.image_ids(SPRITE_COLUMNS)
            sheet = np.concatenate([thumbnail(sizes.shown(i), thumb) for i in ids], axis=1)
            return len(jpeg_bytes(sheet)) / (sheet.shape[0] * sheet.shape[1])

        per_px = sizes.memo(f"tsne-thumbs:{thumb}", measure)
        t = texts(ctx, sizes)
        html = HTML["scatter"] + n * (HTML["point"] + t.rel + t.label) + HTML["grid"] \
            + g * (HTML["cell"] + t.rel + t.label) + (side * side - g) * HTML["empty"]
        pictures = per_px * (n * thumb * thumb + g * cell * cell) + 1200
        return [SiteItem("tsne", "t-SNE pages", 2, html, example="tsne/index.html"),
                SiteItem("tsne", "t-SNE pictures", 2, pictures, example=SPRITE)]

    def pages(self, ctx, atlas: dict, results: dict, opts) -> list:

        r = results["tsne"]
        a, m = r.arrays, r.meta
        names = m["class_names"]
        colours = categories(max(len(names), 1))
        pos = layout(a["xy"].astype(np.float64))
        ids = a["images"].tolist()
        points = [{"j": j, "x": round(float(pos[j, 0]), 1), "y": round(float(pos[j, 1]), 1),
                   "colour": colours[int(c) % len(colours)], "label": _name(names, int(c)),
                   "name": ctx.images.records[n].rel, "url": f"../{image_url(ctx.images.records[n].rel)}"}
                  for j, (n, c) in enumerate(zip(ids, a["classes"].tolist()))]
        legend = [{"name": _name(names, row["class"]), "colour": colours[row["class"] % len(colours)],
                   "count": row["count"], "map": row["map"], "codes": row["codes"]} for row in m["per_class"]]
        thumb = thumb_size(ctx.input_size)
        info = {k: m[k] for k in ("layer", "code_dims", "pca_dims", "points", "of_images", "perplexity", "seed",
                                   "method", "neighbours", "colour_by", "agreement_map", "agreement_codes",
                                   "seconds", "labels_match_outputs")}
        scatter = {**info, "dots": points, "legend": legend, "view_w": VIEW_W, "view_h": VIEW_H,
                   "sprite": f"../{SPRITE}", "sprite_cols": SPRITE_COLUMNS, "thumb": thumb, "count": len(ids)}
        side, cell = int(m["grid_side"]), grid_cell(ctx.input_size)
        cells: list[dict[str, Any] | None] = [None] * (side * side)
        for p, c in zip(a["grid_points"].tolist(), a["grid_cells"].tolist()):
            n = ids[p]
            cells[c] = {"url": f"../{image_url(ctx.images.records[n].rel)}", "name": ctx.images.records[n].rel,
                        "label": _name(names, int(a["classes"][p]))}
        grid = {"side": side, "cell": cell, "src": f"../{GRID}", "cells": cells, "count": len(a["grid_points"]),
                "points": len(ids), "colour_by": m["colour_by"]}
        crumbs = [("index.html", "atlas")]
        return [Page("tsne/index.html", "tsne.html", scatter, title=f"t-SNE of codes · {opts.title}", crumbs=crumbs),
                Page("tsne/grid.html", "tsne_grid.html", grid, title=f"t-SNE image grid · {opts.title}", crumbs=crumbs)]

    def draw(self, ctx, atlas: dict, results: dict, out: Path, opts) -> None:
        r = results["tsne"]
        ids = r.arrays["images"].tolist()
        thumb, cell = thumb_size(ctx.input_size), grid_cell(ctx.input_size)
        rows = math.ceil(len(ids) / SPRITE_COLUMNS)
        sprite = np.full((rows * thumb, min(len(ids), SPRITE_COLUMNS) * thumb, 3), 255, dtype=np.uint8)
        side = int(r.meta["grid_side"])
        grid = np.full((side * cell, side * cell, 3), 255, dtype=np.uint8)
        where = dict(zip(r.arrays["grid_points"].tolist(), r.arrays["grid_cells"].tolist()))
        for j, n in enumerate(ids):
            px = safe_pixels(ctx, n)
            y, x = divmod(j, SPRITE_COLUMNS)
            sprite[y * thumb:(y + 1) * thumb, x * thumb:(x + 1) * thumb] = thumbnail(px, thumb)
            if j in where:
                gy, gx = divmod(where[j], side)
                grid[gy * cell:(gy + 1) * cell, gx * cell:(gx + 1) * cell] = thumbnail(px, cell)
        save_jpeg(sprite, out / SPRITE)
        save_jpeg(grid, out / GRID)


def _name(names: list[str], c: int) -> str:
    return names[c] if 0 <= c < len(names) else f"class {c}"
