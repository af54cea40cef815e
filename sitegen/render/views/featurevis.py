"""Feature-visualisation images: on every channel tile and channel page, a page of the channels
gradient ascent could not excite (beside the dataset's dead-channel report), and a page per class.

Images are written one small PNG per channel (``img/<layer>/<c>.fv.png``) at the optimised size
and enlarged by the browser (pixelated): a per-layer grid would make every channel page download
the whole layer's images, which for a 2048-channel layer of 224 px images is hundreds of MB.  They
stay PNG whatever the sprites' format: they are small, synthetic and shown enlarged, where lossy
WebP's blocks would show.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from ...planning import SiteItem
from ..pages import Page, channel_url, layer_url, slug
from ..patches import save_image
from .base import View

PNG_BYTES_PER_PIXEL = 2.0
"""Bytes per pixel of an optimised image's PNG (measured: 2.3-2.6 kB at 32 px and 7.3-10 kB at 64 px on
a trained ResNet-56, docs/size.md; the ascent's images are noise-like at the pixel level, so PNG's
size follows their area)."""
PNG_BASE = 100
"""Bytes of a PNG's header and chunks."""
HTML = {"channel": 810, "tile": 170, "atlas": 70, "summary": 2424, "summary_layer": 230,
        "classes": 1874, "class": 210}
"""Bytes a channel adds to its channel page, layer tile and atlas.json entry, and of featurevis.html
and classes/index.html (``base`` + per row), measured on real atlases."""

CLASS_DIR = "img/featurevis-classes"
"""Layer folders are named after module names, which as Python attributes cannot contain a dash."""


def channel_image_url(layer: str, c: int) -> str:

    return f"img/{slug(layer)}/{c}.fv.png"


def class_image_url(k: int) -> str:
    return f"{CLASS_DIR}/class-{k}.png"


def class_names(ctx, n: int) -> list[str]:
    """The image folder's class names when there is one per logit, else ``class <k>``."""
    classes = list(ctx.images.classes)
    return classes if len(classes) == n else [f"class {k}" for k in range(n)]


def _usable(results: dict) -> bool:
    r = results.get("featurevis")
    return r is not None and "layers" in r.meta


def _dead_on_data(channel: dict) -> bool:
    return channel["stats"]["max"] <= 0  # the atlas's own "never fires" rule (index page)


class FeatureVisView(View):
    name = "featurevis"
    channel_partial = "_channel_featurevis.html"

    def available(self, results: dict) -> bool:
        return _usable(results)

    def nav(self) -> list[tuple[str, str]]:
        return [("featurevis.html", "Feature visualisation"), ("classes/index.html", "Class visualisations")]

    def _layer_index(self, results: dict, name: str) -> int | None:
        names = results["featurevis"].meta["layers"]
        return names.index(name) if name in names else None

    def channel_context(self, ctx, atlas: dict, results: dict, li: int, c: int) -> dict[str, Any]:
        layer = atlas["layers"][li]
        fi = self._layer_index(results, layer["name"])
        if fi is None:
            return {"present": False}
        a = results["featurevis"].arrays
        objective = float(a[f"L{fi}.objective"][c])
        return {"present": True, "image": channel_image_url(layer["name"], c),
                "objective": objective, "start": float(a[f"L{fi}.start"][c]), "excited": objective > 0,
                "dead_on_data": _dead_on_data(layer["channels"][c]), "size": results["featurevis"].meta["size"],
                "settings": _settings(results["featurevis"].meta)}

    def pages(self, ctx, atlas: dict, results: dict, opts) -> list:

        r = results["featurevis"]
        rows, never = [], []
        any_dead = False
        for li, layer in enumerate(atlas["layers"]):
            fi = self._layer_index(results, layer["name"])
            if fi is None:
                continue
            objective = r.arrays[f"L{fi}.objective"]
            start = r.arrays[f"L{fi}.start"]
            _annotate(layer, objective)
            off = [int(c) for c in np.nonzero(objective <= 0)[0]]
            dead = [_dead_on_data(layer["channels"][c]) for c in off]
            any_dead = any_dead or any(_dead_on_data(ch) for ch in layer["channels"])
            rows.append({"name": layer["name"], "url": layer_url(layer["name"]), "channels": len(objective),
                         "never": len(off), "median": float(np.median(objective)) if len(objective) else 0.0,
                         "median_start": float(np.median(start)) if len(start) else 0.0})
            if off:
                never.append({"name": layer["name"], "url": layer_url(layer["name"]), "count": len(off),
                              "channels": len(objective), "both": sum(dead),
                              "list": [{"c": c, "url": channel_url(layer["name"], c), "dead": d}
                                       for c, d in zip(off, dead)]})
        crumbs = [("index.html", "atlas")]
        summary = Page("featurevis.html", "featurevis.html", {
            "layers": rows, "never": never, "settings": _settings(r.meta), "dead_report": any_dead,
        }, title=f"Feature visualisation · {opts.title}", crumbs=crumbs)
        return [summary, self._classes_page(ctx, r, opts)]

    def _classes_page(self, ctx, r, opts):

        n = int(r.meta.get("classes", 0))
        names = class_names(ctx, n)
        items = []
        if n:
            for k in range(n):
                items.append({"k": k, "name": names[k], "src": class_image_url(k),
                              "logit": float(r.arrays["classes.objective"][k]),
                              "start": float(r.arrays["classes.start"][k])})
        return Page("classes/index.html", "classes.html", {
            "entries": items, "settings": _settings(r.meta), "reason": r.meta.get("classes_reason", ""),
            "named": bool(n) and names == list(ctx.images.classes),
        }, title=f"Class visualisations · {opts.title}", crumbs=[("index.html", "atlas")])

    def estimate(self, ctx, sizes) -> list[SiteItem]:
        """One PNG per channel (and per class) of the optimised size, each the bytes of real
        optimised images (:func:`measured_image_bytes`); each tagged ``featurevis`` so the size
        budget can draw them smaller."""
        cfg = ctx.config.featurevis
        if not cfg.enabled:
            return []
        h, w = (cfg.image_size, cfg.image_size) if cfg.image_size else ctx.input_size
        png = measured_image_bytes(ctx, sizes)
        items = []
        for l in ctx.layers:
            c = l.channels
            items.append(SiteItem("featurevis", "feature-vis images", c, c * png, l.name, tag="featurevis",
                                  example=channel_image_url(l.name, c - 1)))
            items.append(SiteItem("featurevis", "channel pages", 0, c * HTML["channel"], l.name))
            items.append(SiteItem("featurevis", "layer pages", 0, c * (HTML["tile"] + 2 * len(l.name)), l.name))
            items.append(SiteItem("featurevis", "data/atlas.json", 0, c * (HTML["atlas"] + len(l.name)), l.name))
        n = 0
        if cfg.classes:
            n = sizes.memo(f"logits:{h}x{w}", lambda: logit_count_at(ctx, (h, w)))
        items.append(SiteItem("featurevis", "class images", n, n * png, tag="featurevis",
                              example=class_image_url(max(0, n - 1))))
        items.append(SiteItem("featurevis", "feature-vis pages", 2, HTML["summary"] + HTML["classes"]
                              + HTML["summary_layer"] * len(ctx.layers) + HTML["class"] * n,
                              example="classes/index.html"))
        return items

    def draw_jobs(self, ctx, atlas: dict, results: dict, out: Path, opts) -> list:
        """One job per layer (its channels' images), then one for the class images."""
        r = results["featurevis"]

        def layer(name: str, fi: int) -> None:
            for c, img in enumerate(r.arrays[f"L{fi}.images"]):
                save_image(np.ascontiguousarray(img), out / channel_image_url(name, c), "png")

        def classes() -> None:
            for k, img in enumerate(r.arrays.get("classes.images", np.zeros((0, 1, 1, 3), np.uint8))):
                save_image(np.ascontiguousarray(img), out / class_image_url(k), "png")

        indices = {l["name"]: self._layer_index(results, l["name"]) for l in atlas["layers"]}
        return [functools.partial(layer, name, fi) for name, fi in indices.items() if fi is not None] + [classes]


def image_bytes(h: int, w: int) -> float:
    """Bytes of one optimised image's PNG at h×w px from the measured rate (docs/size.md): the
    fallback where no ascent can be run for the estimate."""
    return PNG_BASE + PNG_BYTES_PER_PIXEL * h * w


def measured_image_bytes(ctx, sizes) -> float:
    """Mean bytes of an optimised image's PNG at the size the pass will optimise, measured: the
    pass's own ascent (its settings and step count) of one channel of the first and one of the
    middle shown layer, encoded as ``draw_jobs`` encodes them.  How well a PNG compresses depends on
    the model, the layer and the ascent's schedule (smooth images of a random network compress
    several times better than a trained network's textures), so no fixed rate serves."""
    from ...passes.featurevis import FeatureVisPass, visualise_channels
    from ..patches import encode

    cfg = ctx.config.featurevis
    h, w = (cfg.image_size, cfg.image_size) if cfg.image_size else ctx.input_size

    def measure() -> float:
        if not ctx.layers:
            return image_bytes(h, w)
        a = FeatureVisPass(cfg).ascent(ctx)
        picks = {ctx.layers[0].name: 0, ctx.layers[len(ctx.layers) // 2].name: ctx.layers[len(ctx.layers) // 2].channels // 2}
        out = []
        for name, c in picks.items():
            r = visualise_channels(ctx.net, name, [c], a, device=ctx.device)
            out += [len(encode(np.ascontiguousarray(img), "png")) for img in r.images]
        return float(np.mean(out))

    return sizes.memo(f"featurevis-png:{h}x{w}:{cfg.steps}:{cfg.lr}:{cfg.lr_end}:{cfg.decorrelate}", measure)


def _annotate(layer: dict, objective: np.ndarray) -> None:
    """Record each channel's feature-vis image in the atlas's layer entry.

    The layer page's context is built by site.py from the atlas's layer entry (``page.layer``) and
    gives views no hook of their own; the tile reads the image from here.  ``pages`` runs before the
    layer pages are collected, and the entry also lands in ``data/atlas.json`` for other tools.
    """
    for c, ch in enumerate(layer["channels"]):
        ch["featurevis"] = {"image": channel_image_url(layer["name"], c),
                            "objective": round(float(objective[c]), 6), "excited": bool(objective[c] > 0)}


def _settings(meta: dict) -> dict[str, Any]:
    keys = ("steps", "lr", "lr_end", "precision", "jitter", "size", "decorrelate", "seed", "redirect_steps",
            "stop_window", "stop_gain")
    return {k: meta[k] for k in keys if k in meta}


def logit_count_at(ctx, size: tuple[int, int]) -> int:
    """How many class images the pass will optimise at ``size`` (0 when the model cannot run there)."""
    from ...passes.featurevis import Ascent, logit_count

    a = Ascent(steps=1, lr=0.05, jitter=0, size=size, mean=tuple(ctx.config.data.mean), std=tuple(ctx.config.data.std))
    return logit_count(ctx.net, a, ctx.device)[0]
