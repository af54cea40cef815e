"""Comparison view: the atlas of the new model with the old checkpoint beside it.

Reads the comparison passes' results (``sitegen.passes.compare``; this view computes no figure) and
 - writes ``changes.html``: the layers ranked by how much they changed, each layer's most-changed
   channels, the channels that died or came alive, per-class accuracy under both checkpoints and the
   images whose prediction changed; ``changes-tsne.html``: both models' t-SNE maps side by side and
   how many of each image's nearest neighbours the two code spaces share;
 - puts a partial on every channel page (the old model's top-k row, its feature visualisation when
   there is one, the channel's change figures) and on every layer page (identity against the best
   matching, the permutation when it is not the identity, a link to the tiles sorted by change);
 - writes the tiles of each layer sorted by change (``layers/<layer>/by-change.html``): a second
   static ordering, so sorting needs neither a rebuild nor a script;
 - draws the old model's top-k patches as a sprite of their own per channel
   (``img/<layer>/<c>.old.<format>``) and its feature-vis images (``<c>.fv-old.png``);
 - adds the ``compare`` section of ``data/atlas.json`` (docs/atlas-json.md).

It adds no rows to the channel sprites, so it may come before the attribution view, whose method
rows must start at sprite row 1: its partial then follows the new model's top-k row directly.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from ...crops import PixelCache, crop_box, display_box
from ...images import shown
from ...planning import SiteItem
from ...passes.topk import channel_top
from ..colormap import categories
from ..pages import TILES_PER_PAGE, Page, channel_url, layer_url, slug
from ..patches import save_image, save_sprite
from ..workers import resolve
from .base import View
from .image_files import image_url, picture_url, safe_pixels
from .tsne import layout

CHANGES = "changes.html"
CHANGES_TSNE = "changes-tsne.html"

SIZES = {
    # a channel page's section: its frame, per old top-k cell, the old feature visualisation
    "section": 900, "cell": 325, "featurevis": 360,
    # a layer page's section; a page of tiles sorted by change and each tile
    "layer": 1000, "by_change": 2015, "tile": 472,
    # changes.html: the page, per layer (its row and its most-changed list), per listed channel,
    # per class, per listed image; changes-tsne.html and each of its dots (two per point)
    "changes": 4950, "changes_layer": 305, "changes_channel": 70, "changes_class": 85, "changes_image": 280,
    "changes_tsne": 3780, "dot": 60,
    # data/atlas.json's compare section: fixed, per class, per changed image, per layer, per channel
    # and per old top-k entry; per number of a list (a most-changed channel, a listed image), per
    # code point (besides its path) and per old feature-vis entry (besides the layer's folder)
    "json": 700, "json_class": 130, "json_changed": 130, "json_layer": 290, "json_channel": 257, "json_entry": 56,
    "json_number": 4, "json_point": 6, "json_featurevis": 90,
}
"""Bytes of the comparison's pages and data (``base`` + per item), measured on comparison atlases;
names (layers, images, classes, the old checkpoint's file name) are added apart."""


def old_sprite_url(layer: str, c: int, fmt: str) -> str:
    """The old model's top-k patches of channel ``c`` (one row), beside the channel's own sprite."""
    return f"img/{slug(layer)}/{c}.old.{fmt}"


def old_featurevis_url(layer: str, c: int) -> str:
    return f"img/{slug(layer)}/{c}.fv-old.png"


def by_change_url(layer: str, page: int = 1) -> str:
    """The layer's tiles sorted by change: ``by-change.html``, then ``by-change-2.html``, ..."""
    return f"layers/{slug(layer)}/by-change.html" if page == 1 else f"layers/{slug(layer)}/by-change-{page}.html"


def usable(results: dict) -> bool:
    r = results.get("compare")
    return r is not None and "layers" in r.meta and "topk" in results and "sample.images" in results["topk"].arrays


def changed_predictions(results: dict, images, listed: bool = True) -> dict[int, dict[str, Any]]:
    """The images whose top class changed (only those the changes page lists, unless ``listed`` is
    False), by image index: both predictions."""
    if not usable(results) or not results["compare"].meta["predictions"]["available"]:
        return {}
    r = results["compare"]
    names = r.meta["predictions"]["output_names"]
    rows, probs = r.arrays["pred.changed"], r.arrays["pred.changed_prob"]
    out = {}
    for j in (r.arrays["pred.listed"].tolist() if listed else range(len(rows))):
        n, new, old = (int(v) for v in rows[j])
        label = images.label_name(n)
        out[n] = {"new": _name(names, new), "old": _name(names, old), "new_prob": float(probs[j, 0]),
                  "old_prob": float(probs[j, 1]), "label": label,
                  "verdict": _verdict(label, _name(names, new), _name(names, old))}
    return out


def image_compare_context(results: dict, n: int, changed: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """What an image page says about the comparison: both predictions when they differ (``changed``:
    every changed image, from :func:`changed_predictions` with ``listed=False``)."""
    if not usable(results):
        return None
    meta = results["compare"].meta
    p = meta["predictions"]
    if not p["available"]:
        return {"old": meta["old"]["checkpoint"], "changed": None, "reason": p["reason"]}
    return {"old": meta["old"]["checkpoint"], "changed": changed.get(n), "reason": "",
            "changes_url": f"../{CHANGES}#predictions"}


def shared_counts(shared: np.ndarray, neighbours: int) -> np.ndarray:
    """How many of each image's ``neighbours`` nearest neighbours the two code spaces share, from
    the pass's fractions (each a whole number of neighbours over ``neighbours``)."""
    return np.rint(np.asarray(shared, np.float64) * neighbours).astype(np.int64)


def _name(names: list[str], c: int) -> str:
    return names[c] if 0 <= c < len(names) else f"class {c}"


def _verdict(label: str, new: str, old: str) -> str:
    if not label:
        return ""
    if new == label:
        return "now right"
    if old == label:
        return "now wrong"
    return "wrong under both"


class CompareView(View):
    name = "compare"
    channel_partial = "_channel_compare.html"
    layer_partial = "_layer_compare.html"

    def __init__(self) -> None:
        self._format = ""
        self._orders: dict[tuple[int, int], tuple[list[int], dict[int, int]]] = {}
        """The sprites' image format, from the render options ``pages`` receives (before any channel page)."""

    def available(self, results: dict) -> bool:
        return usable(results)

    def nav(self) -> list[tuple[str, str]]:
        return [(CHANGES, "Changes from the old checkpoint")]

    # -------------------------------------------------------------- per layer and channel

    def _figures(self, results: dict, li: int) -> dict[str, np.ndarray]:
        a = results["compare"].arrays
        return {k: a[f"L{li}.{k}"] for k in ("shared", "jaccard", "corr", "match", "match_corr",
                                               "dead_new", "dead_old", "change")}

    def _order(self, results: dict, li: int) -> list[int]:
        """The layer's channels, most changed first (ties: lower overlap, then channel index)."""
        key = (id(results["compare"]), li)
        if key not in self._orders:  # every channel page of the layer asks
            f = self._figures(results, li)
            order = np.lexsort((np.arange(len(f["change"])), f["jaccard"], -f["change"]))
            self._orders[key] = (order.tolist(), {int(c): i for i, c in enumerate(order)})
        return self._orders[key][0]

    def _rank(self, results: dict, li: int, c: int) -> int:
        """Channel ``c``'s place in :meth:`_order` (0 = most changed)."""
        self._order(results, li)
        return self._orders[(id(results["compare"]), li)][1][c]

    def _old_top(self, results: dict, atlas: dict, li: int, c: int) -> list[dict[str, Any]]:
        """The old model's top-k entries of channel ``c``, read as the atlas reads the new one's."""
        t = channel_top(results["topk"], atlas["layers"][li]["name"], c, prefix="old.")
        return [{"index": int(i), "value": float(v), "fmap_yx": [int(y), int(x)]}
                for v, i, y, x in zip(t.values.tolist(), t.images.tolist(), t.y.tolist(), t.x.tolist())]

    def _status(self, dead_new: bool, dead_old: bool) -> str:
        if dead_new and not dead_old:
            return "newly dead"
        if dead_old and not dead_new:
            return "newly alive"
        return "dead in both" if dead_new else ""

    def channel_context(self, ctx, atlas: dict, results: dict, li: int, c: int) -> dict[str, Any]:
        layer = atlas["layers"][li]
        name = layer["name"]
        f = self._figures(results, li)
        meta = results["compare"].meta
        new_images = {e["index"] for e in layer["channels"][c]["top"]}
        cells = []
        for j, e in enumerate(self._old_top(results, atlas, li, c)):
            rel = shown(ctx.images.records[e["index"]].rel)
            cells.append({"col": j, "image": rel, "name": rel.rsplit("/", 1)[-1],
                          "label": shown(ctx.images.label_name(e["index"])), "value": e["value"],
                          "fmap_yx": e["fmap_yx"], "shared": e["index"] in new_images})
        a = results["topk"].arrays
        match = int(f["match"][c])
        position = self._rank(results, li, c)
        fv = None
        old_fv = results.get("featurevis_old")
        if old_fv is not None and name in old_fv.meta.get("layers", []):
            objective = float(old_fv.arrays[f"L{old_fv.meta['layers'].index(name)}.objective"][c])
            fv = {"image": old_featurevis_url(name, c), "objective": objective, "excited": objective > 0}
        return {
            "old": meta["old"]["checkpoint"], "cells": cells, "k": meta["k"],
            "sprite": old_sprite_url(name, c, self._fmt(ctx)).split("/")[-1],
            "jaccard": float(f["jaccard"][c]), "shared": int(f["shared"][c]),
            "correlation": float(f["corr"][c]), "sample": meta["sample"]["images"],
            "match": match, "match_correlation": float(f["match_corr"][c]), "moved": match != c,
            # The old channel's top images are on the page of the new channel of its index.
            "match_url": f"{channel_url(name, match).rsplit('/', 1)[-1]}#compare",
            "status": self._status(bool(f["dead_new"][c]), bool(f["dead_old"][c])),
            "old_stats": {"max": float(a[f"old.L{li}.max"][c]), "mean": float(a[f"old.L{li}.mean"][c]),
                          "std": float(a[f"old.L{li}.std"][c]), "fire_rate": float(a[f"old.L{li}.fire_rate"][c])},
            "rank": position + 1, "channels": len(f["change"]),
            "by_change": f"{by_change_url(name, position // TILES_PER_PAGE + 1).rsplit('/', 1)[-1]}#c{c}",
            "featurevis": fv, "featurevis_on": old_fv is not None,
        }

    def layer_context(self, ctx, atlas: dict, results: dict, li: int) -> dict[str, Any]:
        info = results["compare"].meta["layers"][li]
        f = self._figures(results, li)
        name = info["name"]
        moved = [{"c": c, "url": channel_url(name, c).rsplit("/", 1)[-1], "old": int(f["match"][c]),
                  "r": float(f["match_corr"][c]), "identity_r": float(f["corr"][c])}
                 for c in range(len(f["match"])) if int(f["match"][c]) != c]
        return {**{k: info[k] for k in ("change", "mean_jaccard", "mean_correlation", "matched_correlation", "fits",
                                        "moved", "channels")},
                "old": results["compare"].meta["old"]["checkpoint"], "permutation": moved,
                "newly_dead": [{"c": c, "url": channel_url(name, c).rsplit("/", 1)[-1]} for c in info["newly_dead"]],
                "newly_alive": [{"c": c, "url": channel_url(name, c).rsplit("/", 1)[-1]} for c in info["newly_alive"]],
                "by_change": by_change_url(name).rsplit("/", 1)[-1], "sample": results["compare"].meta["sample"]["images"],
                "rank": results["compare"].meta["ranking"].index(name) + 1, "layers": len(atlas["layers"])}

    def _fmt(self, ctx) -> str:
        return self._format or ctx.config.site.image_format

    # -------------------------------------------------------------- pages

    def pages(self, ctx, atlas: dict, results: dict, opts) -> list:
        self._format = opts.image_format
        meta = results["compare"].meta
        atlas["compare"] = self._public(ctx, atlas, results)  # data/atlas.json's compare section
        crumbs = [("index.html", "atlas")]
        pages = [Page(CHANGES, "changes.html", self._changes_context(ctx, atlas, results),
                      title=f"Changes from {meta['old']['checkpoint']} · {opts.title}", crumbs=crumbs)]
        if meta["codes"]["available"]:
            pages.append(Page(CHANGES_TSNE, "changes_tsne.html", self._tsne_context(ctx, results),
                              title=f"Codes compared · {opts.title}",
                              crumbs=crumbs + [(CHANGES, "changes")]))
        for li, layer in enumerate(atlas["layers"]):
            pages.extend(self._by_change_pages(atlas, results, li, layer, opts))
        return pages

    def _changes_context(self, ctx, atlas: dict, results: dict) -> dict[str, Any]:
        meta = results["compare"].meta
        by_name = {l["name"]: (li, l) for li, l in enumerate(meta["layers"])}
        ranked = []
        for name in meta["ranking"]:
            li, l = by_name[name]
            f = self._figures(results, li)
            ranked.append({**l, "url": layer_url(name), "by_change": by_change_url(name),
                           "top": [{"c": c, "url": channel_url(name, c), "r": float(f["corr"][c]),
                                    "jaccard": float(f["jaccard"][c]), "shared": int(f["shared"][c]),
                                    "status": self._status(bool(f["dead_new"][c]), bool(f["dead_old"][c]))}
                                   for c in l["most_changed"]],
                           "newly_dead": [{"c": c, "url": channel_url(name, c)} for c in l["newly_dead"]],
                           "newly_alive": [{"c": c, "url": channel_url(name, c)} for c in l["newly_alive"]]})
        p = dict(meta["predictions"])
        if p["available"]:
            listed = changed_predictions(results, ctx.images)
            p["list"] = [{**v, "rel": shown(ctx.images.records[n].rel),
                          "name": shown(ctx.images.records[n].rel).rsplit("/", 1)[-1],
                          "url": image_url(ctx.images.records[n].rel), "src": picture_url(ctx.images.records[n].rel)}
                         for n, v in sorted(listed.items())]
            p["thumb"] = min(64, max(ctx.input_size))
        dead_changes = [r for r in ranked if r["newly_dead"] or r["newly_alive"]]
        return {"old": meta["old"], "new": meta["new"], "same_file": meta["same_file"],
                "nothing_changed": meta["nothing_changed"], "k": meta["k"], "sample": meta["sample"],
                "layers": ranked, "dead_changes": dead_changes,
                "dead_both": sum(l["dead_both"] for l in meta["layers"]),
                "newly_dead": sum(len(l["newly_dead"]) for l in meta["layers"]),
                "newly_alive": sum(len(l["newly_alive"]) for l in meta["layers"]),
                "predictions": p, "codes": meta["codes"], "tsne_url": CHANGES_TSNE,
                "featurevis": "featurevis_old" in results}

    def _tsne_context(self, ctx, results: dict) -> dict[str, Any]:
        meta = results["compare"].meta
        codes = meta["codes"]
        a = results["compare"].arrays
        context: dict[str, Any] = {"codes": codes, "old": meta["old"]["checkpoint"], "new": meta["new"]["checkpoint"],
                                   "maps": None, "reason": codes["map"].get("reason", "")}
        if not codes["map"]["available"]:
            return context
        t = results["tsne"]
        names = t.meta["class_names"]
        colours = categories(max(len(names), 1))
        # Each map fills its own box (the old one is already turned to lie over the new one).
        new_xy, old_xy = layout(t.arrays["xy"].astype(np.float64)), layout(a["tsne.old_xy"].astype(np.float64))
        k = codes["neighbours"]
        shared = shared_counts(a["codes.shared"], k)[a["tsne.rows"]]
        maps = []
        for label, pos in (("new", new_xy), ("old", old_xy)):
            dots = []
            for j, (n, cls) in enumerate(zip(t.arrays["images"].tolist(), t.arrays["classes"].tolist())):
                rel = shown(ctx.images.records[n].rel)
                dots.append({"x": round(float(pos[j, 0]), 1), "y": round(float(pos[j, 1]), 1),
                             "colour": colours[int(cls) % len(colours)],
                             "title": f"{rel} · {_name(names, int(cls))} · {int(shared[j])}/{k} "
                                      "neighbours shared"})
            maps.append({"label": label, "checkpoint": meta[label]["checkpoint"], "dots": dots})
        from .tsne import VIEW_H, VIEW_W

        context["maps"] = maps
        context["view_w"], context["view_h"] = VIEW_W, VIEW_H
        context["legend"] = [{"name": _name(names, c), "colour": colours[c % len(colours)]}
                             for c in sorted(set(t.arrays["classes"].tolist()))]
        context["colour_by"] = t.meta["colour_by"]
        return context

    def _by_change_pages(self, atlas: dict, results: dict, li: int, layer: dict, opts) -> list[Page]:
        name = layer["name"]
        f = self._figures(results, li)
        order = self._order(results, li)
        fmt = opts.image_format
        tiles = [{"c": c, "url": channel_url(name, c).rsplit("/", 1)[-1],
                  "sprite": f"img/{slug(name)}/{c}.{fmt}", "old_sprite": old_sprite_url(name, c, fmt),
                  "r": float(f["corr"][c]), "jaccard": float(f["jaccard"][c]),
                  "status": self._status(bool(f["dead_new"][c]), bool(f["dead_old"][c])),
                  "dead": bool(f["dead_new"][c])} for c in order]
        count = max(1, -(-len(order) // TILES_PER_PAGE))
        paging = [{"number": q + 1, "url": by_change_url(name, q + 1).rsplit("/", 1)[-1],
                   "first": q * TILES_PER_PAGE + 1, "last": min((q + 1) * TILES_PER_PAGE, len(order))}
                  for q in range(count)]
        pages = []
        for q in range(count):
            pages.append(Page(by_change_url(name, q + 1), "layer_by_change.html", {
                "layer": {key: layer[key] for key in ("name", "caffe", "shape")}, "k": atlas["k"],
                "tiles": tiles[q * TILES_PER_PAGE:(q + 1) * TILES_PER_PAGE], "patch": opts.patch_size,
                "tile_scale": 1 / 3, "old": results["compare"].meta["old"]["checkpoint"],
                "paging": [{**g, "current": g["number"] == q + 1} for g in paging],
            }, title=f"{name} sorted by change · {opts.title}",
                crumbs=[("index.html", "atlas"), (layer_url(name), name)]))
        return pages

    def _public(self, ctx, atlas: dict, results: dict) -> dict[str, Any]:
        """The ``compare`` section of data/atlas.json (docs/atlas-json.md)."""
        meta = results["compare"].meta
        a = results["topk"].arrays
        old_fv = results.get("featurevis_old")
        fv_layers = old_fv.meta.get("layers", []) if old_fv is not None else []
        layers = []
        for li, l in enumerate(meta["layers"]):
            f = self._figures(results, li)
            objective = old_fv.arrays[f"L{fv_layers.index(l['name'])}.objective"] if l["name"] in fv_layers else None
            channels = []
            for c in range(l["channels"]):
                top = self._old_top(results, atlas, li, c)
                channels.append({
                    "channel": c, "jaccard": round(float(f["jaccard"][c]), 6), "shared": int(f["shared"][c]),
                    "correlation": round(float(f["corr"][c]), 6), "match": int(f["match"][c]),
                    "match_correlation": round(float(f["match_corr"][c]), 6),
                    "dead_new": bool(f["dead_new"][c]), "dead_old": bool(f["dead_old"][c]),
                    "old_stats": {key: float(a[f"old.L{li}.{key}"][c]) for key in ("mean", "std", "max", "fire_rate")},
                    "old_top": [{"image": shown(ctx.images.records[e["index"]].rel), "value": round(e["value"], 6),
                                 "fmap_yx": e["fmap_yx"]} for e in top],
                })
                if objective is not None:  # what the channel page's old feature-vis caption says
                    channels[-1]["old_featurevis"] = {"image": old_featurevis_url(l["name"], c),
                                                      "objective": round(float(objective[c]), 6),
                                                      "excited": bool(objective[c] > 0)}
            layers.append({key: l[key] for key in ("name", "change", "mean_jaccard", "mean_correlation",
                                                     "matched_correlation", "fits", "moved", "newly_dead",
                                                     "newly_alive", "dead_both", "most_changed", "unchanged")}
                          | {"channels": channels})
        p = {k: v for k, v in meta["predictions"].items() if k != "output_names"}
        if p["available"]:
            names = meta["predictions"]["output_names"]
            r = results["compare"].arrays
            rows, probs = r["pred.changed"], r["pred.changed_prob"]
            p["changed_images"] = [{"image": shown(ctx.images.records[int(n)].rel),
                                    "label": shown(ctx.images.label_name(int(n))),
                                    "new": _name(names, int(new)), "old": _name(names, int(old)),
                                    "new_prob": round(float(pn), 6), "old_prob": round(float(po), 6)}
                                   for (n, new, old), (pn, po) in zip(rows.tolist(), probs.tolist())]
            p["listed_images"] = [int(j) for j in r["pred.listed"]]  # the ones changes.html shows
        codes = {k: v for k, v in meta["codes"].items() if k != "map"}
        if codes["available"]:  # per image, in the t-SNE sample's order: as the map's point titles say
            r = results["compare"].arrays
            codes["images"] = [shown(ctx.images.records[int(n)].rel) for n in r["codes.images"]]
            codes["shared"] = shared_counts(r["codes.shared"], codes["neighbours"]).tolist()
        return {"old": meta["old"], "same_file": meta["same_file"], "nothing_changed": meta["nothing_changed"],
                "sample": meta["sample"], "ranking": meta["ranking"], "layers": layers,
                "predictions": p, "codes": codes}

    # -------------------------------------------------------------- size estimate

    def estimate(self, ctx, sizes) -> list[SiteItem]:
        """Per layer: the old model's sprites (one row of top-k patches a channel, each the bytes of
        the new model's row: the same kind of windows of the same images), its feature-vis images
        (tagged ``featurevis``: the size budget draws them smaller with the new model's), the
        channel pages' and the layer page's sections, the tiles sorted by change and the layer's
        share of data/atlas.json; then changes.html and changes-tsne.html.  The images whose
        prediction changed are counted from the share that changed on the size sample (both models
        run on it).  Not counted: the permutation list of a layer whose channels were reordered (about
        45 bytes a moved channel, and the link of a moved channel's page to its match, about 150; a
        fine-tuned checkpoint keeps the order)."""
        from ...passes.sampling import stratified_sample
        from ...passes.tsne import classifier_name
        from ..sizing import changed_share, row0_bytes, texts
        from .featurevis import measured_image_bytes

        cfg = ctx.config
        if not cfg.compare.checkpoint or ctx.compare is None or not ctx.layers:
            return []
        fmt = cfg.site.image_format
        k = min(cfg.topk.k, max(1, len(ctx.images)))
        t = texts(ctx, sizes)
        old = len(ctx.compare.path.name.encode("utf-8", "surrogateescape"))
        fv = cfg.featurevis.enabled
        if fv:
            png = measured_image_bytes(ctx, sizes)
        items: list[SiteItem] = []
        changes = 0.0
        for l in ctx.layers:
            c, name, s = l.channels, len(l.name.encode("utf-8", "surrogateescape")), len(slug(l.name))
            items.append(SiteItem("compare", "old sprites", c, c * row0_bytes(ctx, sizes, l), l.name,
                                  example=old_sprite_url(l.name, c - 1, fmt)))
            if fv:
                items.append(SiteItem("compare", "old feature-vis images", c, c * png, l.name, tag="featurevis",
                                      example=old_featurevis_url(l.name, c - 1)))
            cell = SIZES["cell"] + 2 * t.name + t.rel + t.label + s
            section = SIZES["section"] + old + k * cell + (SIZES["featurevis"] + s if fv else 0)
            items.append(SiteItem("compare", "channel pages", 0, c * section, l.name))
            pages = max(1, -(-c // TILES_PER_PAGE))
            items.append(SiteItem("compare", "layer pages", 0, pages * (SIZES["layer"] + old), l.name))
            items.append(SiteItem("compare", "by-change pages", pages, pages * (SIZES["by_change"] + 5 * name + old)
                                  + c * (SIZES["tile"] + 3 * name), l.name, example=by_change_url(l.name, pages)))
            entry = SIZES["json_entry"] + t.rel
            listed = min(cfg.compare.channels, c)
            items.append(SiteItem("compare", "data/atlas.json", 0, SIZES["json_layer"] + 2 * name
                                  + listed * SIZES["json_number"]
                                  + c * (SIZES["json_channel"] + k * entry + (SIZES["json_featurevis"] + s if fv else 0)),
                                  l.name))
            items.append(SiteItem("compare", "changes pages", 0, SIZES["changes_layer"] + 4 * name
                                  + listed * (SIZES["changes_channel"] + s), l.name))
        classes = sum(len(n.encode("utf-8", "surrogateescape")) for n in ctx.images.classes)
        changed = changed_share(ctx, sizes) * len(ctx.images)
        shown = min(changed, cfg.compare.changed_images)
        changes = SIZES["changes"] + 3 * old + len(ctx.images.classes) * SIZES["changes_class"] + classes \
            + shown * (SIZES["changes_image"] + 3 * t.rel + 2 * t.name + 3 * t.label)
        items.append(SiteItem("compare", "changes pages", 1, changes, example=CHANGES))
        items.append(SiteItem("compare", "data/atlas.json", 0, SIZES["json"] + 2 * classes
                              + len(ctx.images.classes) * SIZES["json_class"]
                              + changed * (SIZES["json_changed"] + t.rel + 3 * t.label)
                              + shown * SIZES["json_number"]))
        if classifier_name(ctx.net, cfg.tsne.layer) is not None:
            points = len(stratified_sample(ctx.images.labels, cfg.tsne.max_points, cfg.tsne.seed))
            items.append(SiteItem("compare", "data/atlas.json", 0, points * (SIZES["json_point"] + t.rel)))
            dots = 2 * points * (SIZES["dot"] + t.rel + 2 * t.label) if cfg.tsne.enabled and points >= 5 else 0
            items.append(SiteItem("compare", "changes pages", 1, SIZES["changes_tsne"] + 2 * old + dots,
                                  example=CHANGES_TSNE))
        return items

    # -------------------------------------------------------------- pictures

    def draw_jobs(self, ctx, atlas: dict, results: dict, out: Path, opts) -> list:
        """One job per channel (its old top-k sprite), then one per layer (its old feature-vis images)."""
        # Decoded images are cached per process: each worker gets its share of the budget.
        pixels = PixelCache(lambda i: safe_pixels(ctx, i), budget_bytes=max(64 << 20, (512 << 20) // resolve(opts.workers)))
        fmt = opts.image_format

        def old_sprite(li: int, name: str, c: int) -> None:
            info = ctx.layers[li]
            patches = [crop_box(pixels(e["index"]), display_box(info.rf.box(*e["fmap_yx"]), ctx.input_size))
                       for e in self._old_top(results, atlas, li, c)]
            save_sprite([patches], opts.patch_size, max(atlas["k"], 1), out / old_sprite_url(name, c, fmt), fmt)

        jobs = [functools.partial(old_sprite, li, layer["name"], c)
                for li, layer in enumerate(atlas["layers"]) for c in range(len(layer["channels"]))]
        old_fv = results.get("featurevis_old")
        if old_fv is None:
            return jobs

        def old_featurevis(name: str, fi: int) -> None:
            for c, img in enumerate(old_fv.arrays[f"L{fi}.images"]):
                save_image(np.ascontiguousarray(img), out / old_featurevis_url(name, c), "png")

        names = old_fv.meta.get("layers", [])
        return jobs + [functools.partial(old_featurevis, layer["name"], names.index(layer["name"]))
                       for layer in atlas["layers"] if layer["name"] in names]
