"""What every view needs to describe its pages: the page model, the render options and the URLs of
the site's files, all relative to the site root (so the site works from ``file://`` and any sub-path).

The orchestrator (:mod:`sitegen.render.site`) and the views both import this module; it imports
neither, so no import loop runs between them.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def slug(name: str) -> str:
    """A file-name-safe, collision-free version of a layer or class name."""
    cleaned = _SAFE.sub("_", name)
    if cleaned == name and name not in ("", ".", ".."):
        return name
    return f"{cleaned.strip('.') or 'x'}-{hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def layer_url(layer: str) -> str:
    return f"layers/{slug(layer)}/index.html"


def channel_url(layer: str, channel: int) -> str:
    return f"layers/{slug(layer)}/{channel}.html"


TILES_PER_PAGE = 512
"""Channels per layer page: a layer page's HTML stays far below 500 KB (a 2048-channel layer of
ResNet-50 has four pages) and the browser lays out a bounded number of tiles."""


def class_anchor(name: str) -> str:
    """The ``id`` of a class's entry in the index page's class list (the data summary): ``class-<slug>``,
    so any class folder name, whatever its characters, gives a valid, unique, stable fragment."""
    return f"class-{slug(name)}"


def class_url(name: str, own_pages: dict[str, str]) -> str:
    """Where a class's search entry leads: the class's own page where the build has one (a page whose
    context names it as ``for_class``), otherwise its entry in the index page's class list."""
    return own_pages.get(name) or f"index.html#{class_anchor(name)}"


def tile_page_url(layer: str, channel: int) -> str:
    """The layer page whose tiles include ``channel``: ``index.html``, then ``page-2.html``, ..."""
    number = channel // TILES_PER_PAGE + 1
    return layer_url(layer) if number == 1 else f"layers/{slug(layer)}/page-{number}.html"


def tile_pages(layer: str, channels: int) -> list[dict[str, Any]]:
    """Every page of a layer's tiles: path, file name (for links between them), channel range."""
    out = []
    for first in range(0, max(channels, 1), TILES_PER_PAGE):
        path = tile_page_url(layer, first)
        out.append({"number": first // TILES_PER_PAGE + 1, "path": path, "url": path.rsplit("/", 1)[-1],
                    "first": first, "last": min(first + TILES_PER_PAGE, channels) - 1})
    return out


def sprite_url(layer: str, channel: int, fmt: str) -> str:
    return f"img/{slug(layer)}/{channel}.{fmt}"


@dataclass
class Page:
    """One output file: its path in the site, its template and its context."""

    path: str
    template: str
    context: dict[str, Any]
    title: str
    crumbs: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class RenderOptions:
    title: str
    patch_size: int
    image_format: str = "png"
    left_out: list[dict[str, Any]] = field(default_factory=list)
    """What the size budget left out (group, what, restore), listed on the index page."""
    build: dict[str, Any] | None = None
    """The build's plan beside what it measured: ``data/atlas.json``'s ``build`` record."""
    workers: int = 0
    """Processes drawing pictures and writing pages (``site.render_workers``); 0 uses every core."""


def relative_root(path: str) -> str:
    depth = path.count("/")
    return "../" * depth


SANITY_PAGE = "sanity.html"


def sanity_url(layer: str | None = None, method: str | None = None) -> str:
    """The sanity page ("Can I trust these pictures?"), or a layer's row in a method's table there."""
    if layer is None:
        return SANITY_PAGE if method is None else f"{SANITY_PAGE}#{method}"
    return f"{SANITY_PAGE}#{method or 'm'}-{slug(layer)}"
