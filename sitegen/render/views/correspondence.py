"""Layer correspondence: on each channel page, the previous layer's channels whose top-k images
overlap most with its own; and ``correspondence.html``, the stage-boundary tables ("does channel c
of res4f continue in res5a?").  The explanation of what overlap means is in the templates."""
from __future__ import annotations

from typing import Any

import numpy as np

from ...planning import SiteItem
from ..pages import Page, channel_url, layer_url
from .base import View

HTML = {"channel": 700, "match": 100, "page": 3124, "pair": 170, "boundary": 900, "row": 420}
"""Bytes of the correspondence section of a channel page (base + per listed match) and of
correspondence.html (base + per layer pair, per stage boundary and per row of its table), measured
on real atlases."""


def chance_shared(k: int, n: int) -> float:
    """Expected number of images two random k-image sets out of n share: k·k/n."""
    return k * k / n if n else 0.0


def _usable(results: dict) -> bool:
    r = results.get("correspondence")
    return r is not None and "layers" in r.meta


class CorrespondenceView(View):
    name = "correspondence"
    channel_partial = "_channel_correspondence.html"

    def available(self, results: dict) -> bool:
        return _usable(results)

    def nav(self) -> list[tuple[str, str]]:
        return [("correspondence.html", "Stage boundaries")]

    def channel_context(self, ctx, atlas: dict, results: dict, li: int, c: int) -> dict[str, Any]:

        r = results["correspondence"]
        name = atlas["layers"][li]["name"]
        names = r.meta["layers"]
        if name not in names:
            return {"present": False}
        i = names.index(name)
        prev = r.meta["previous"][i]
        a = r.arrays
        matches = [{"c": int(m), "url": channel_url(prev, int(m)), "overlap": float(o), "shared": int(s)}
                   for m, o, s in zip(a[f"L{i}.match"][c], a[f"L{i}.overlap"][c], a[f"L{i}.shared"][c]) if m >= 0]
        onward = []
        for j, b in enumerate(r.meta["boundaries"]):
            if b["from"] == name:
                onward.append(self._boundary_row(r, j, b, c))
        k, n = int(r.meta["k"]), int(r.meta["images"])
        return {"present": True, "previous": prev, "matches": matches, "onward": onward, "k": k,
                "chance": chance_shared(k, n), "images": n}

    def _boundary_row(self, r, j: int, b: dict, c: int) -> dict[str, Any]:

        a = r.arrays
        best, carried = int(a[f"B{j}.best"][c]), int(a[f"B{j}.carried"][c])
        return {
            "c": c, "url": channel_url(b["from"], c), "to": b["to"], "to_caffe": b["to_caffe"],
            "best": best, "best_url": channel_url(b["to"], best) if best >= 0 else None,
            "best_overlap": float(a[f"B{j}.best_overlap"][c]), "best_shared": int(a[f"B{j}.best_shared"][c]),
            "carried": carried, "carried_url": channel_url(b["to"], carried) if carried >= 0 else None,
            "carried_overlap": float(a[f"B{j}.carried_overlap"][c]),
            "carried_shared": int(a[f"B{j}.carried_shared"][c]),
            # Ties count: the carried channel continues when no channel overlaps more than it does.
            "continues": carried >= 0 and float(a[f"B{j}.carried_overlap"][c]) > 0
            and float(a[f"B{j}.carried_overlap"][c]) >= float(a[f"B{j}.best_overlap"][c]),
        }

    def estimate(self, ctx, sizes) -> list[SiteItem]:
        """The channel pages' section (each channel lists up to ``matches`` channels of the previous
        layer) and correspondence.html (a row per channel of each stage boundary's first layer)."""
        from ...passes.correspondence import CorrespondenceConfig, stage_boundaries

        matches = CorrespondenceConfig().matches
        names = [l.name for l in ctx.layers]
        items = []
        for i, l in enumerate(ctx.layers):
            if i:  # the first layer has no previous one: its pages have no section
                per = HTML["channel"] + matches * (HTML["match"] + 2 * len(names[i - 1]))
                items.append(SiteItem("correspondence", "channel pages", 0, l.channels * per, l.name))
            items.append(SiteItem("correspondence", "correspondence.html", 0, HTML["pair"] + 2 * len(l.name), l.name))
        for last, first in stage_boundaries(ctx.all_layers, names):
            items.append(SiteItem("correspondence", "correspondence.html", 0,
                                  HTML["boundary"] + last.channels * (HTML["row"] + 4 * len(first.name)), last.name))
        items.append(SiteItem("correspondence", "correspondence.html", 1, HTML["page"], example="correspondence.html"))
        return items

    def pages(self, ctx, atlas: dict, results: dict, opts) -> list:

        r = results["correspondence"]
        tables = []
        for j, b in enumerate(r.meta["boundaries"]):
            rows = [self._boundary_row(r, j, b, c) for c in range(len(r.arrays[f"B{j}.best"]))]
            carried = [row for row in rows if row["carried"] >= 0]
            tables.append({**b, "from_url": layer_url(b["from"]), "to_url": layer_url(b["to"]), "rows": rows,
                           "continues": sum(row["continues"] for row in rows), "carried_count": len(carried),
                           "median_carried": float(np.median([row["carried_overlap"] for row in carried]))
                           if carried else 0.0})
        pairs = []
        for i, name in enumerate(r.meta["layers"]):
            prev = r.meta["previous"][i]
            if prev is None:
                continue
            top1 = r.arrays[f"L{i}.overlap"][:, 0] if r.arrays[f"L{i}.overlap"].shape[1] else np.zeros(0)
            pairs.append({"name": name, "url": layer_url(name), "previous": prev, "previous_url": layer_url(prev),
                          "median": float(np.median(top1)) if len(top1) else 0.0,
                          "none": int((top1 <= 0).sum()), "channels": len(top1)})
        k, n = int(r.meta["k"]), int(r.meta["images"])
        return [Page("correspondence.html", "correspondence.html", {
            "tables": tables, "pairs": pairs, "k": k, "images": n, "chance": chance_shared(k, n),
        }, title=f"Stage boundaries · {opts.title}", crumbs=[("index.html", "atlas")])]
