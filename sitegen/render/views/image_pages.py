"""A page per image that a whole-model view looks at (``images/<name>.html``, see ``image_name``).

The images are the occlusion and activation samples and the t-SNE points (so the scatter's points
open a page), bounded by ``samples.max_images`` + ``tsne.max_points``.  Each page shows the image,
its label and top-5 predictions, and whatever the views know about it: occlusion heatmaps (with
colour bars and a class legend), a link to its activation maps, its place in the t-SNE map.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...images import load_pixels
from ...errors import ImageError
from . import View

DISPLAY = 192
"""Images are shown at least this many CSS pixels wide (CIFAR's 32 px are enlarged, pixelated)."""


SLUG_MAX = 60
"""Most characters of the readable part of an image's name (the whole name stays under 80)."""
HASH_LEN = 8
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]+")


def image_name(rel: str) -> str:
    """The stable, file-name-safe name of an image's page and pictures, from its path relative to
    the images folder: a readable slug plus a short hash of the exact path, e.g. ``dog/0001.jpg`` ->
    ``dog-0001-jpg-3f2a9c1e``.

    It depends on the path alone, not on the image's index, so adding or removing other images
    never moves a page (permalinks survive rebuilds).  The hash (sha256 of the path's UTF-8 bytes,
    surrogate escapes as the original bytes) keeps paths apart that the slug cannot tell apart
    (``a b.jpg`` / ``a_b.jpg``, case, non-ASCII, truncation).  Only ``[A-Za-z0-9-]``, never empty,
    never starting with a dot, at most SLUG_MAX + 1 + HASH_LEN characters.
    """
    if not isinstance(rel, str):
        raise TypeError(f"image_name takes the image's relative path, not {type(rel).__name__}")
    try:
        raw = rel.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (not from os.walk)
        raw = rel.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(raw).hexdigest()[:HASH_LEN]
    ascii_text = unicodedata.normalize("NFKD", rel).encode("ascii", "ignore").decode("ascii")
    slug = _NOT_ALNUM.sub("-", ascii_text).strip("-")
    if len(slug) > SLUG_MAX:  # keep the start (class folder) and the end (file name)
        head, tail = SLUG_MAX // 3, SLUG_MAX - SLUG_MAX // 3 - 2
        slug = f"{slug[:head].rstrip('-')}--{slug[-tail:].lstrip('-')}"
    return f"{slug or 'image'}-{digest}"


def image_url(rel: str) -> str:
    """The image page of the image at ``rel`` (its path relative to the images folder), relative to
    the site root.  Every link to an image page goes through here."""
    return f"images/{image_name(rel)}.html"


def picture_url(rel: str) -> str:
    """The image as the pages show it (a JPEG), relative to the site root."""
    return f"img/images/{image_name(rel)}.jpg"


def display_factor(input_size: tuple[int, int]) -> int:
    """Integer enlargement that shows an input at least DISPLAY pixels wide."""
    return max(1, math.ceil(DISPLAY / max(1, input_size[1])))


def save_jpeg(arr: np.ndarray, path: Path, quality: int = 90) -> int:
    """Photographs as JPEG: a few thousand image pages stay small (PNG would be ~5× larger)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def save_png(arr: np.ndarray, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=6)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def safe_pixels(ctx, n: int) -> np.ndarray:
    """The preprocessed image ``n``; a grey square if it can no longer be read (the site still builds)."""
    try:
        return load_pixels(ctx.images, n, ctx.config.data)
    except ImageError:
        h, w = ctx.input_size
        return np.full((h, w, 3), 128, dtype=np.uint8)


def top_list(classes: np.ndarray, probs: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    return [{"name": names[int(c)] if int(c) < len(names) else f"class {int(c)}", "prob": float(p)}
            for c, p in zip(classes, probs)]


def usable(results: dict, name: str) -> bool:
    r = results.get(name)
    return r is not None and "skipped" not in r.meta and "images" in r.arrays and len(r.arrays["images"]) > 0


class ImagePagesView(View):
    name = "image_pages"

    def available(self, results: dict) -> bool:
        return any(usable(results, n) for n in ("occlusion", "activations", "tsne"))

    def image_ids(self, results: dict) -> list[int]:
        ids: set[int] = set()
        for n in ("occlusion", "activations", "tsne"):
            if usable(results, n):
                ids.update(int(i) for i in results[n].arrays["images"])
        return sorted(ids)

    def pages(self, ctx, atlas: dict, results: dict, opts) -> list:
        from ..site import Page, layer_url

        ids = self.image_ids(results)
        occ = _index(results, "occlusion")
        act = _index(results, "activations")
        tsne = _index(results, "tsne")
        factor = display_factor(ctx.input_size)
        h, w = ctx.input_size
        pages = []
        rels = [ctx.images.records[n].rel for n in ids]
        urls = [image_url(rel) for rel in rels]
        for pos, n in enumerate(ids):
            rel = rels[pos]
            context: dict[str, Any] = {
                "n": n, "rel": rel, "name": rel.rsplit("/", 1)[-1],
                "label": ctx.images.label_name(n), "src": f"../{picture_url(rel)}",
                "width": w * factor, "height": h * factor,
                "prev": f"../{urls[pos - 1]}" if pos > 0 else None,
                "next": f"../{urls[pos + 1]}" if pos + 1 < len(ids) else None,
                "position": pos + 1, "count": len(ids),
                "top": [], "occlusion": None, "activations": None, "tsne": None,
            }
            if n in occ:
                context["occlusion"] = occlusion_context(ctx, atlas, results["occlusion"], occ[n], layer_url)
                context["top"] = context["occlusion"]["top"]
            if n in tsne:
                r, j = results["tsne"], tsne[n]
                if not context["top"]:
                    context["top"] = top_list(r.arrays["top_classes"][j], r.arrays["top_probs"][j],
                                              r.meta["output_names"])
                context["tsne"] = {"url": f"../tsne/index.html#p{j}", "agree_map": float(r.arrays["agree_map"][j]),
                                   "agree_codes": float(r.arrays["agree_codes"][j]), "k": r.meta["neighbours"]}
            if n in act:
                from .activations import activations_url
                context["activations"] = {"url": f"../{activations_url(rel)}"}
            pages.append(Page(urls[pos], "image_page.html", context, title=f"{rel} · {opts.title}",
                              crumbs=[("index.html", "atlas")]))
        return pages

    def draw(self, ctx, atlas: dict, results: dict, out: Path, opts) -> None:
        for n in self.image_ids(results):
            save_jpeg(safe_pixels(ctx, n), out / picture_url(ctx.images.records[n].rel))


def _index(results: dict, name: str) -> dict[int, int]:
    """Image index -> row in that result's arrays."""
    if not usable(results, name):
        return {}
    return {int(n): j for j, n in enumerate(results[name].arrays["images"])}


def occlusion_context(ctx, atlas: dict, r, s: int, layer_url) -> dict[str, Any]:
    """What an image page shows of occlusion row ``s``: the three overlays and their scales."""
    from .occlusion import class_legend, map_urls

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
