"""Kernel mosaics: ``kernels/index.html`` (the first convolution's filters as RGB pictures, as in
the Chu et al. and CS231n figures, or grey pictures for a model that reads grey images) and ``kernels/<layer>/<p>.html`` (every filter of a convolution as
a row of grey kernels, one per input channel: "one filter = one kernel per input channel, summed").

Normalisation, documented on the pages and checked by the tests (v in [0, 1], stored as
round(255 v)):

- RGB mosaic, each filter on its own scale:  v = 0.5 + w / (2 max|w_f|), w_f = that filter's weights;
- RGB mosaic, all filters on one scale:      v = 0.5 + w / (2 max|W|),   W = the whole layer;
- grey kernel grids (one scale per layer):   v = 0.5 + w / (2 max|W|).

So zero is mid-grey, positive weights are light and negative ones dark, in every picture.
Layers wider than ``kernels.block`` filters or input channels are cut into blocks: one page per
block of filters, one picture per block of input channels.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from ...planning import SiteItem
from ..colormap import greybar, upscale
from ..pages import Page, layer_url, slug
from .base import View
from .image_files import png_bytes, save_png

GAP = 1
"""Pixels of white between kernels (grids) and filters (mosaic)."""
SIZE_LAYERS = 3
"""Convolutions whose first kernel grid is drawn and encoded for the size estimate."""
HTML = {"index": 2974, "index_layer": 170, "page": 2474, "row": 120, "picture": 120}
"""Bytes of kernels/index.html (base + per layer) and of a layer's page (base + per filter row and per
picture), measured on real atlases."""


def signed_unit(w: np.ndarray, peak: float) -> np.ndarray:
    """v = 0.5 + w / (2 peak): zero at mid-grey, ±peak at the ends (all mid-grey when peak is 0)."""
    if peak <= 0:
        return np.full(w.shape, 0.5)
    return np.clip(0.5 + w.astype(np.float64) / (2.0 * peak), 0.0, 1.0)


def to_uint8(v: np.ndarray) -> np.ndarray:
    return np.round(v * 255.0).astype(np.uint8)


def rgb_tiles(weight: np.ndarray, each: bool) -> np.ndarray:
    """(out, kh, kw, 3) uint8 pictures of filters with 3 input channels (RGB), or with 1 (a grey
    input: drawn in grey), each filter scaled on its own (``each``) or all on the layer's scale."""
    w = weight.astype(np.float64)
    if each:
        peaks = np.abs(w).reshape(len(w), -1).max(1)
        tiles = np.stack([signed_unit(f, p) for f, p in zip(w, peaks)])
    else:
        tiles = signed_unit(w, float(np.abs(w).max()) if w.size else 0.0)
    tiles = to_uint8(tiles.transpose(0, 2, 3, 1))
    return np.repeat(tiles, 3, axis=3) if tiles.shape[3] == 1 else tiles


def tile_scale(kernel: int, target: int = 24) -> int:
    """Integer enlargement that shows a kernel about ``target`` pixels wide (1×1 kernels: 8 px)."""
    return max(1, min(target, 8 * kernel) // max(1, kernel))


def mosaic(tiles: np.ndarray, columns: int, scale: int, gap: int = GAP) -> np.ndarray:
    """Tiles (N, h, w, 3) enlarged by ``scale`` and laid out row-major, ``gap`` white pixels apart."""
    n, h, w = tiles.shape[:3]
    rows = max(1, math.ceil(n / columns))
    th, tw = h * scale, w * scale
    out = np.full((rows * (th + gap) + gap, columns * (tw + gap) + gap, 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = gap + r * (th + gap), gap + c * (tw + gap)
        out[y:y + th, x:x + tw] = upscale(t, scale)
    return out


def grey_grid(weight: np.ndarray, peak: float, scale: int, gap: int = GAP) -> np.ndarray:
    """(filters × input channels) grid of kernels (F, C, kh, kw) in grey on the layer's scale ``peak``:
    row f, column c is kernel w[f, c]."""
    f, c, kh, kw = weight.shape
    grey = to_uint8(signed_unit(weight, peak))
    tiles = np.repeat(grey.reshape(f * c, kh, kw)[..., None], 3, axis=3)
    return mosaic(tiles, c, scale, gap)


def kernel_pages_of(shape: tuple[int, ...], block: int) -> tuple[int, int]:
    """(pages of filter blocks, pictures of input-channel blocks per page)."""
    return math.ceil(shape[0] / block), math.ceil(shape[1] / block)


class KernelsView(View):
    name = "kernels"

    def available(self, results: dict) -> bool:
        r = results.get("kernels")
        return r is not None and (bool(r.meta["layers"]) or "first.weight" in r.arrays)

    def nav(self) -> list[tuple[str, str]]:
        return [("kernels/index.html", "Kernels")]

    def estimate(self, ctx, sizes) -> list[SiteItem]:
        """The first convolution's two mosaics and the grey bar (drawn exactly); per selected
        convolution its pages and grids, bytes per pixel measured on the first grid of up to
        SIZE_LAYERS of them (real weights), the grids' areas exact."""
        import torch

        from ...hooks import get_module
        from ...passes.kernels import conv_weights

        cfg = ctx.config.kernels
        if not cfg.enabled:
            return []
        is_conv = lambda l: l.kind == "conv" and isinstance(get_module(ctx.net, l.name), torch.nn.Conv2d)  # noqa: E731
        convs = [l.name for l in ctx.layers if is_conv(l)]
        first = next((l.name for l in ctx.all_layers if is_conv(l)), None)
        block = cfg.block
        items = []

        def fixed() -> tuple[int, float]:
            files, size = 1, float(len(png_bytes(greybar())))
            if first is not None:
                w = conv_weights(ctx.net, first)[0]
                if w.shape[1] == 3:
                    columns = math.ceil(math.sqrt(len(w)))
                    scale = max(1, 48 // max(w.shape[2], w.shape[3]))
                    for each in (True, False):
                        size += len(png_bytes(mosaic(rgb_tiles(w, each=each), columns, scale, 2)))
                        files += 1
            return files, size

        files, size = sizes.memo("kernels:first", fixed)
        items.append(SiteItem("kernels", "kernel pictures", files, size, example="img/kernels/first-shared.png"))
        items.append(SiteItem("kernels", "kernel pages", 1, HTML["index"] + HTML["index_layer"] * len(convs),
                              example="kernels/index.html"))
        if not convs:
            return items
        picks = sorted(set(np.round(np.linspace(0, len(convs) - 1, min(SIZE_LAYERS, len(convs)))).astype(int).tolist()))

        def measure() -> dict[int, float]:
            out = {}
            for i in picks:
                w = conv_weights(ctx.net, convs[i])[0]
                part = w[:block, :block]
                grid = grey_grid(part, float(np.abs(w).max()), tile_scale(max(w.shape[2], w.shape[3])))
                out[i] = len(png_bytes(grid)) / (grid.shape[0] * grid.shape[1])
            return out

        per_px = sizes.memo(f"kernels:{','.join(convs[i] for i in picks)}:{block}", measure)
        for j, name in enumerate(convs):
            lo = max((i for i in per_px if i <= j), default=min(per_px))
            hi = min((i for i in per_px if i >= j), default=max(per_px))
            wgt = 0.0 if hi == lo else (j - lo) / (hi - lo)
            bpp = (1 - wgt) * per_px[lo] + wgt * per_px[hi]
            shape = get_module(ctx.net, name).weight.shape
            f, c, kh, kw = (int(v) for v in shape)
            scale = tile_scale(max(kh, kw))
            n_pages, n_cols = kernel_pages_of((f, c), block)
            # every picture: (rows of filters) × (columns of input channels) kernels, GAP apart
            area = ((f * (kh * scale + GAP)) + n_pages * GAP) * ((c * (kw * scale + GAP)) + n_cols * GAP)
            items.append(SiteItem("kernels", "kernel pictures", n_pages * n_cols, bpp * area + 100 * n_pages * n_cols, name,
                                  example=f"img/kernels/{slug(name)}/{n_pages - 1}-{n_cols - 1}.png"))
            items.append(SiteItem("kernels", "kernel pages", n_pages, n_pages * (HTML["page"] + 4 * len(name))
                                  + f * HTML["row"] + n_pages * n_cols * HTML["picture"], name,
                                  example=f"kernels/{slug(name)}/{n_pages - 1}.html"))
        return items

    def pages(self, ctx, atlas: dict, results: dict, opts) -> list:

        r = results["kernels"]
        a, m = r.arrays, r.meta
        block = int(m["block"])
        crumbs = [("index.html", "atlas")]
        first = None
        if "first.weight" in a:
            w = a["first.weight"]
            first = {"name": m["first"], "shape": list(w.shape), "rgb": w.shape[1] == 3, "grey": w.shape[1] == 1,
                     "each": "../img/kernels/first-each.png", "shared": "../img/kernels/first-shared.png",
                     "peak": float(np.abs(w).max())}
        layers, pages = [], []
        for li, name in enumerate(m["layers"]):
            w = a[f"L{li}.weight"]
            n_pages, n_cols = kernel_pages_of(w.shape, block)
            peak = float(np.abs(w).max())
            layers.append({"name": name, "shape": list(w.shape), "groups": m["groups"][li], "pages": n_pages,
                           "url": f"{slug(name)}/0.html"})
            scale = tile_scale(max(w.shape[2], w.shape[3]))
            for p in range(n_pages):
                f0, f1 = p * block, min((p + 1) * block, w.shape[0])
                th = w.shape[2] * scale + GAP
                pictures = [{"src": f"../../img/kernels/{slug(name)}/{p}-{q}.png", "c0": q * block,
                             "c1": min((q + 1) * block, w.shape[1]) - 1} for q in range(n_cols)]
                rows = [{"f": f, "url": f"../../{layer_url(name).rsplit('/', 1)[0]}/{f}.html",
                         "bias": float(a[f"L{li}.bias"][f]) if f"L{li}.bias" in a else None} for f in range(f0, f1)]
                pages.append(Page(f"kernels/{slug(name)}/{p}.html", "kernels_layer.html", {
                    "layer": name, "layer_url": f"../../{layer_url(name)}", "shape": list(w.shape),
                    "groups": m["groups"][li], "page": p + 1, "pages": n_pages, "f0": f0, "f1": f1 - 1,
                    "pictures": pictures, "rows": rows, "row_height": th, "gap": GAP, "peak": peak,
                    "bar": "../../img/kernels/greybar.png",
                    "prev": f"{p - 1}.html" if p > 0 else None, "next": f"{p + 1}.html" if p + 1 < n_pages else None,
                }, title=f"{name} kernels · {opts.title}", crumbs=crumbs + [("kernels/index.html", "kernels")]))
        index = Page("kernels/index.html", "kernels.html", {"first": first, "layers": layers, "block": block,
                                                            "bar": "../img/kernels/greybar.png"},
                     title=f"Kernels · {opts.title}", crumbs=crumbs)
        return [index] + pages

    def draw_jobs(self, ctx, atlas: dict, results: dict, out: Path, opts) -> list:
        """The grey bar and the first layer's mosaics, then one job per layer's kernel grids."""
        r = results["kernels"]
        a, m = r.arrays, r.meta
        block = int(m["block"])

        def first() -> None:
            save_png(greybar(), out / "img/kernels/greybar.png")
            if "first.weight" in a and a["first.weight"].shape[1] in (1, 3):
                w = a["first.weight"]
                columns = math.ceil(math.sqrt(len(w)))
                scale = max(1, 48 // max(w.shape[2], w.shape[3]))  # first-layer filters ~48 px: the figure
                save_png(mosaic(rgb_tiles(w, each=True), columns, scale, 2), out / "img/kernels/first-each.png")
                save_png(mosaic(rgb_tiles(w, each=False), columns, scale, 2), out / "img/kernels/first-shared.png")

        def layer(li: int, name: str) -> None:
            w = a[f"L{li}.weight"]
            peak = float(np.abs(w).max())
            scale = tile_scale(max(w.shape[2], w.shape[3]))
            n_pages, n_cols = kernel_pages_of(w.shape, block)
            for p in range(n_pages):
                for q in range(n_cols):
                    part = w[p * block:(p + 1) * block, q * block:(q + 1) * block]
                    save_png(grey_grid(part, peak, scale), out / f"img/kernels/{slug(name)}/{p}-{q}.png")

        return [first] + [functools.partial(layer, li, name) for li, name in enumerate(m["layers"])]
