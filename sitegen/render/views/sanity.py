"""The sanity page (``sanity.html``, "Can I trust these pictures?") and its charts.

Reads the sanity pass's result (this view computes no figure): for each attribution method, the
weight and image similarities against layer depth drawn as a static SVG chart
(``img/sanity/<method>.svg``, readable without JavaScript and from ``file://``), a table per layer,
the verdicts, the structural proofs and the references.  Every shown layer's figures are also
recorded in its atlas entry (``layers[].sanity``, hence ``data/atlas.json`` and the layer page) and
the settings at the top level (``sanity``); the attribution view puts the same figures beside its
method switch through :func:`figures_for`.
"""
from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from ...passes.sanity import IMAGES_HIGH, WEIGHTS_HIGH, layer_figures
from ..pages import Page, layer_url, sanity_url
from .base import View

CHART_DIR = "img/sanity"
METHOD_LABELS = {"guided": "guided backprop", "deconvnet": "deconvnet", "gradient": "gradient"}
"""The attribution view's names of the methods (tests/render/test_sanity_view.py keeps them equal)."""

SERIES = (  # key in the figures, legend text, colour, dash pattern
    ("weights_cascade", "weights up to the layer re-initialised", "#d1495b", ""),
    ("weights_own", "only the layer's own weights re-initialised", "#edae49", "6 4"),
    ("images", "other images", "#00798c", ""),
    ("edge", "Sobel edges of the input", "#777777", "2 3"),
)


def chart_url(method: str) -> str:
    return f"{CHART_DIR}/{method}.svg"


def figures_for(results: dict, layer: str) -> dict[str, Any] | None:
    """A layer's figures per method (:func:`sitegen.passes.sanity.layer_figures`), each with its
    method's name and the link to its row on the sanity page; None without a sanity result for
    the layer.  The same dict is the layer's ``sanity`` entry in data/atlas.json."""
    r = results.get("sanity")
    f = layer_figures(r, layer) if r is not None else None
    if f is None:
        return None
    return {**f, "layer": layer, "url": sanity_url(),
            "methods": {m: {**v, "label": METHOD_LABELS.get(m, m), "url": sanity_url(layer, m)}
                        for m, v in f["methods"].items()}}


class SanityView(View):
    name = "sanity"

    def available(self, results: dict) -> bool:
        return "sanity" in results and "layers" in results["sanity"].meta

    def nav(self) -> list[tuple[str, str]]:
        return [(sanity_url(), "Can I trust these pictures?")]

    def _rows(self, atlas: dict, results: dict) -> list[dict[str, Any]]:
        rows = []
        for depth, layer in enumerate(atlas["layers"]):
            f = figures_for(results, layer["name"])
            if f is not None:
                rows.append({**f, "layer_url": layer_url(layer["name"])})
        return rows

    def pages(self, ctx, atlas: dict, results: dict, opts) -> list[Page]:
        r = results["sanity"]
        rows = self._rows(atlas, results)
        _annotate(atlas, rows, r.meta)
        methods = []
        for m in r.meta["methods"]:
            per_layer = [{"name": row["layer"], "url": row["layer_url"], "units": row["units"],
                          "own_modules": row["own_modules"], "cascade_modules": row["cascade_modules"],
                          "anchor": sanity_url(row["layer"], m).split("#", 1)[1],
                          **row["methods"][m]} for row in rows]
            proved = [x for x in per_layer if x["images_proved"]]
            verdicts = {v: sum(1 for x in per_layer if x["verdict"] == v)
                        for v in ("fixed", "input", "unit", "both", "unknown")}
            methods.append({"name": m, "label": METHOD_LABELS.get(m, m), "chart": chart_url(m),
                            "layers": per_layer, "proved": len(proved), "verdicts": verdicts,
                            "unproved_reason": next((x["proof"] for x in per_layer if not x["images_proved"]), ""),
                            "alt": _alt(METHOD_LABELS.get(m, m), per_layer)})
        context = {"methods": methods, "units": r.meta["units"], "images": r.meta["images"], "seed": r.meta["seed"],
                   "weights_reason": r.meta.get("weights_reason", ""), "fallback": r.meta.get("fallback_modules", []),
                   "thresholds": {"weights": WEIGHTS_HIGH, "images": IMAGES_HIGH}, "layers": len(rows)}
        return [Page(sanity_url(), "sanity.html", context, title=f"Can I trust these pictures? · {opts.title}",
                     crumbs=[("index.html", "atlas")])]

    def draw(self, ctx, atlas: dict, results: dict, out: Path, opts) -> None:
        rows = self._rows(atlas, results)
        for m in results["sanity"].meta["methods"]:
            points = [(row["layer"], row["methods"][m]) for row in rows]
            dest = out / chart_url(m)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(chart_svg(METHOD_LABELS.get(m, m), points), encoding="utf-8")


def _annotate(atlas: dict, rows: list[dict[str, Any]], meta: dict) -> None:
    """Record the figures in the atlas: each layer entry's ``sanity`` (the layer page reads it there,
    and it lands in data/atlas.json) and the settings at the top level.  ``pages`` runs before the
    layer pages are collected."""
    by_name = {row["layer"]: row for row in rows}
    for layer in atlas["layers"]:
        row = by_name.get(layer["name"])
        if row is None:
            continue
        layer["sanity"] = {k: v for k, v in row.items() if k != "layer_url"}
    atlas["sanity"] = {"page": sanity_url(), "methods": list(meta["methods"]), "units": meta["units"],
                       "images": meta["images"], "seed": meta["seed"],
                       "thresholds": {"weights": WEIGHTS_HIGH, "images": IMAGES_HIGH},
                       "weights_reason": meta.get("weights_reason", ""),
                       "fallback_modules": list(meta.get("fallback_modules", []))}


def _alt(label: str, per_layer: list[dict[str, Any]]) -> str:
    """The chart in words (its alt text): the first and last layer's figures."""
    if not per_layer:
        return f"{label}: no layer was measured"

    def say(x):
        fmt = lambda v: "not measured" if v is None else f"{v:.2f}"  # noqa: E731
        return (f"{x['name']}: weights re-initialised {fmt(x['weights_cascade'])}, other images {fmt(x['images'])}, "
                f"edges {fmt(x['edge'])}")
    ends = [per_layer[0]] + ([per_layer[-1]] if len(per_layer) > 1 else [])
    return f"{label}: similarities against layer depth; " + "; ".join(say(x) for x in ends)


# ---------------------------------------------------------------- the chart

W, H = 640, 330
LEFT, RIGHT, TOP, BOTTOM = 44, 80, 58, 100
"""The chart's size and margins: the right and bottom ones hold the layer names, slanted at 45°."""


def chart_svg(label: str, points: list[tuple[str, dict[str, Any]]]) -> str:
    """A line chart of the similarities (y from -1 to 1) against layer depth (x: the shown layers in
    execution order), one line per check, a marker per measured layer; a proved image similarity is
    drawn as a filled diamond.  Plain SVG 1.1, no script, no external reference; text escaped."""
    n = len(points)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    x_at = (lambda i: LEFT + pw / 2) if n <= 1 else (lambda i: LEFT + pw * i / (n - 1))
    y_at = lambda v: TOP + ph * (1 - (v + 1) / 2)  # noqa: E731
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
            f'font-family="sans-serif" font-size="12">'),
           f"<title>{escape(label)}: similarity against layer depth</title>",
           f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>']
    for v in (-1, -0.5, 0, 0.5, 1):
        y = y_at(v)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="{"#999" if v == 0 else "#e3e3e3"}"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{v:g}</text>')
    step = max(1, -(-n // 8))
    for i, (name, _) in enumerate(points):
        if i % step and i != n - 1:
            continue
        x = x_at(i)
        short = name if len(name) <= 18 else name[:8] + "…" + name[-9:]
        out.append(f'<line x1="{x:.1f}" y1="{TOP + ph}" x2="{x:.1f}" y2="{TOP + ph + 4}" stroke="#999"/>')
        full = f"<title>{escape(name)}</title>" if short != name else ""
        out.append(f'<text transform="translate({x:.1f},{TOP + ph + 8}) rotate(45)" fill="#555">{full}{escape(short)}</text>')
    out.append(f'<text x="{LEFT}" y="{H - 4}" fill="#555">layer depth → (the shown layers in execution order)</text>')
    for row, (key, text, colour, dash) in enumerate(SERIES):
        lx, ly = LEFT + (row % 2) * 290, 14 + (row // 2) * 18
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 24}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash_attr}/>')
        out.append(f'<text x="{lx + 30}" y="{ly + 4}" fill="#222">{escape(text)}</text>')
        segment: list[str] = []
        for i, (_, f) in enumerate(points):
            v = f.get(key)
            if v is None:
                if len(segment) > 1:
                    out.append(_polyline(segment, colour, dash_attr))
                segment = []
                continue
            segment.append(f"{x_at(i):.1f},{y_at(v):.1f}")
        if len(segment) > 1:
            out.append(_polyline(segment, colour, dash_attr))
        for i, (_, f) in enumerate(points):
            v = f.get(key)
            if v is None:
                continue
            x, y = x_at(i), y_at(v)
            if key == "images" and f.get("images_proved"):
                out.append(f'<path d="M{x:.1f},{y - 5:.1f} l5,5 l-5,5 l-5,-5 z" fill="{colour}"/>')
            else:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>')
    out.append(f'<text x="{LEFT}" y="{TOP - 8}" fill="#555">similarity (Spearman, |attribution|); ◆ proved 1</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _polyline(points: list[str], colour: str, dash_attr: str) -> str:
    return f'<polyline points="{" ".join(points)}" fill="none" stroke="{colour}" stroke-width="1.6"{dash_attr}/>'
