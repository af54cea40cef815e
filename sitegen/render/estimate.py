"""The site's size and file count, estimated before any pass runs.

Every view answers :meth:`View.estimate` with the files it will write (:class:`SiteItem`); this
module adds the orchestrator's own files (index, layer and channel pages, row 0 of every sprite,
``data/``, assets, the output marker) and the marker's line for every file.

Pictures are measured, not assumed: a few of each kind are drawn with the very code that draws
them (the sprites from real crops of the user's images, at the layer's window) and encoded in
memory; the mean bytes times the file count is the estimate.  HTML pages are text whose size
follows their structure: each kind's bytes are ``base + per item × items`` with the constants
below, measured on real atlases (``bench/plan_check.py --calibrate SITE`` prints them for a built
site) plus the lengths of the names that appear in it (image paths, labels, layer names).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..context import BuildContext
from ..errors import SitegenError
from ..planning import SiteItem, SizeSamples
from .pages import TILES_PER_PAGE, channel_url, slug, sprite_url
from .sizing import row0_bytes, texts
from .views import registered

MARKER_BASE = 16
"""Bytes of the output marker (``.sitegen-atlas.json``) besides its one line per file."""

HTML = {
    # bytes of one page's fixed part, and per repeated item, measured on real atlases
    "channel": 2244, "channel_cell": 285,
    "layer": 1624, "layer_tile": 230,
    "index": 2874, "index_layer": 290,
    "atlas_json": 2000, "atlas_layer": 420, "atlas_channel": 130, "atlas_entry": 78,
    "search": 600, "search_layer": 95, "search_class": 60,
}
"""HTML and JSON sizes (bytes): ``base`` + per item.  Names (paths, labels, layers) are added apart."""


def _templates_assets() -> list[Path]:
    from .site import templates_dir  # the same lookup the renderer uses

    return [f for f in (templates_dir() / "assets").iterdir() if f.suffix in (".css", ".js", ".svg", ".png")]


def core_items(ctx: BuildContext, sizes: SizeSamples) -> list[SiteItem]:
    """The orchestrator's files: per layer its sprites (row 0; views add bytes for their rows),
    channel pages and tile pages, its share of atlas.json, the search index and the index page."""
    cfg = ctx.config
    k = min(cfg.topk.k, max(1, len(ctx.images)))
    t = texts(ctx, sizes)
    fmt = cfg.site.image_format
    items: list[SiteItem] = []
    for l in ctx.layers:
        c = l.channels
        name = len(l.name.encode("utf-8", "surrogateescape"))
        items.append(SiteItem("core", "sprites", c, c * row0_bytes(ctx, sizes, l), l.name,
                              example=sprite_url(l.name, c - 1, fmt)))
        cell = HTML["channel_cell"] + len(slug(l.name)) + 2 * t.name + t.rel + t.label
        items.append(SiteItem("core", "channel pages", c, c * (HTML["channel"] + 3 * name + k * cell), l.name,
                              example=channel_url(l.name, c - 1)))
        pages = max(1, math.ceil(c / TILES_PER_PAGE))
        items.append(SiteItem("core", "layer pages", pages,
                              pages * HTML["layer"] + c * (HTML["layer_tile"] + 2 * name), l.name,
                              example=f"layers/{slug(l.name)}/page-{pages}.html"))
        entry = HTML["atlas_entry"] + t.rel + t.label
        items.append(SiteItem("core", "data/atlas.json", 0, HTML["atlas_layer"] + c * (HTML["atlas_channel"] + k * entry),
                              l.name))
        items.append(SiteItem("core", "index and search", 0, HTML["index_layer"] + HTML["search_layer"] + 3 * name,
                              l.name))
    classes = sum(HTML["search_class"] + 2 * len(c.encode("utf-8", "surrogateescape")) for c in ctx.images.classes)
    items.append(SiteItem("core", "index and search", 2, HTML["index"] + HTML["search"] + classes,
                          example="data/search-index.js"))
    items.append(SiteItem("core", "data/atlas.json", 1, HTML["atlas_json"], example="data/atlas.json"))
    assets = _templates_assets()
    # the assets, .nojekyll and the output marker (whose lines every item adds for its files)
    items.append(SiteItem("core", "assets", 2 + len(assets), MARKER_BASE + sum(f.stat().st_size for f in assets),
                          example="assets/search.js"))
    return items


def estimate_site(ctx: BuildContext, sizes: SizeSamples) -> tuple[list[SiteItem], list[str]]:
    """Every file of the site (the orchestrator's and each view's), each item's bytes including its
    lines in the output marker; and the views that have no estimate (named, never counted as 0)."""
    items = core_items(ctx, sizes)
    missing: list[str] = []
    for v in registered():
        try:
            got = v.estimate(ctx, sizes)
        except SitegenError:
            raise  # bad input: said now, before any work
        except Exception as e:  # an estimate must never stop a build that would work
            missing.append(f"{v.name or type(v).__name__} (estimate failed: {type(e).__name__}: {str(e)[:80]})")
            continue
        if got is None:
            missing.append(v.name or type(v).__name__)
            continue
        items.extend(got)
    title = title_bytes(ctx)
    return [with_marker(i, title) for i in items], missing


def title_bytes(ctx: BuildContext) -> int:
    """Bytes of the site's title as the pages carry it (escaped), as the build names it."""
    from markupsafe import escape

    from ..images import shown

    title = ctx.config.site.title or f"{ctx.model.path.name} atlas"
    return len(str(escape(shown(title))).encode("utf-8"))


def with_marker(item: SiteItem, title: int = 0) -> SiteItem:
    """An item's bytes with what every file adds: its line in the output marker (one ``"path",``
    each) and, for a page, the site's title (twice: the page title and the header)."""
    if not item.files:
        return item
    example = item.example or "x" * 40
    line = len(example.encode("utf-8", "surrogateescape")) + 4
    page = 2 * title if example.endswith(".html") else 0
    return dataclasses.replace(item, bytes=item.bytes + item.files * (line + page))


def describe(items: list[SiteItem]) -> dict[str, Any]:
    """Bytes and files per view, for the plan's table."""
    out: dict[str, dict[str, float]] = {}
    for i in items:
        row = out.setdefault(i.view, {"files": 0, "bytes": 0.0})
        row["files"] += i.files
        row["bytes"] += i.bytes
    return out
