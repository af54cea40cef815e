"""A page per image that a whole-model view looks at (``images/<name>.html``, see ``image_name``).

The images are the occlusion and activation samples and the t-SNE points (so the scatter's points
open a page), bounded by ``samples.max_images`` + ``tsne.max_points``, and in a comparison build the
images the changes page lists as having changed their prediction (``compare.changed_images``).  Each page shows the image,
its label and top-5 predictions, and whatever the views know about it: occlusion heatmaps (with
colour bars and a class legend), a link to its activation maps, its place in the t-SNE map.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from ...planning import SiteItem
from ..pages import Page, layer_url
from .activations import activations_url
from .base import View
from .compare import changed_predictions, image_compare_context
from .compare import usable as compare_usable
from .image_files import (display_factor, image_url, jpeg_bytes, picture_url, safe_pixels, save_jpeg, top_list,
                          usable)

SIZE_IMAGES = 4
"""Images encoded as the pages show them (JPEG) for the size estimate."""
HTML = {"page": 2374, "occlusion": 1300, "tsne": 100}
"""Bytes of an image page (base), and what its occlusion and t-SNE sections add, measured."""
from .occlusion import occlusion_context

class ImagePagesView(View):
    name = "image_pages"

    def available(self, results: dict) -> bool:
        return any(usable(results, n) for n in ("occlusion", "activations", "tsne")) or compare_usable(results)

    def estimate(self, ctx, sizes) -> list[SiteItem]:
        """A page and a JPEG per image the whole-model views show (the occlusion and activation
        samples and the t-SNE points, each once): the JPEG's bytes measured on a few real images."""
        from ...passes.sampling import sample_images, stratified_sample
        from ...passes.tsne import classifier_name
        from ..sizing import texts

        cfg = ctx.config
        samples = set(sample_images(ctx.images, cfg.samples)) \
            if cfg.occlusion.enabled or cfg.activations.enabled else set()
        points: set[int] = set()
        if cfg.tsne.enabled and classifier_name(ctx.net, cfg.tsne.layer) is not None:
            picked = stratified_sample(ctx.images.labels, cfg.tsne.max_points, cfg.tsne.seed)
            points = set(picked.tolist()) if len(picked) >= 5 else set()
        ids = samples | points
        if not ids:
            return []

        def measure() -> float:
            return float(np.mean([len(jpeg_bytes(sizes.shown(i))) for i in sizes.image_ids(SIZE_IMAGES)]))

        jpeg = sizes.memo("image-jpeg", measure)
        t = texts(ctx, sizes)
        occluded = len(samples) if cfg.occlusion.enabled else 0
        html = len(ids) * (HTML["page"] + 4 * t.rel + t.label) + occluded * HTML["occlusion"] \
            + len(points) * HTML["tsne"]
        last = ctx.images.records[max(ids)].rel
        return [SiteItem("image_pages", "image pages", len(ids), html, example=image_url(last)),
                SiteItem("image_pages", "image pictures", len(ids), len(ids) * jpeg, example=picture_url(last))]

    def image_ids(self, results: dict, images) -> list[int]:
        ids: set[int] = set()
        for n in ("occlusion", "activations", "tsne"):
            if usable(results, n):
                ids.update(int(i) for i in results[n].arrays["images"])
        ids.update(changed_predictions(results, images))  # a comparison build's changed predictions
        return sorted(ids)

    def pages(self, ctx, atlas: dict, results: dict, opts) -> list:

        ids = self.image_ids(results, ctx.images)
        changed = changed_predictions(results, ctx.images, listed=False)
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
                context["activations"] = {"url": f"../{activations_url(rel)}"}
            compared = image_compare_context(results, n, changed)
            if compared is not None:
                context["compare"] = compared
            pages.append(Page(urls[pos], "image_page.html", context, title=f"{rel} · {opts.title}",
                              crumbs=[("index.html", "atlas")]))
        return pages

    def draw_jobs(self, ctx, atlas: dict, results: dict, out: Path, opts) -> list:
        """One job per image (its picture)."""
        def image(n: int) -> None:
            save_jpeg(safe_pixels(ctx, n), out / picture_url(ctx.images.records[n].rel))

        return [functools.partial(image, n) for n in self.image_ids(results, ctx.images)]


def _index(results: dict, name: str) -> dict[int, int]:
    """Image index -> row in that result's arrays."""
    if not usable(results, name):
        return {}
    return {int(n): j for j, n in enumerate(results[name].arrays["images"])}
