"""Render the atlas: pass results in, a static site out.

Collect first (one plain-data model of the whole atlas, also written as ``data/atlas.json``), then
draw the pictures, then fill the templates.  Templates receive one explicit context per page and
compute nothing; every URL in it is relative, so the site works from ``file://`` and any sub-path.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import jinja2
import numpy as np

from .. import __version__
from ..context import BuildContext
from ..crops import PixelCache, crop_box, display_box
from ..images import display_pixels, shown
from ..layers import ReceptiveField
from ..passes.base import Result
from ..passes.topk import channel_top
from .pages import (Page, RenderOptions, channel_url, class_anchor, class_url, layer_url, relative_root,
                    slug, sprite_url, tile_page_url, tile_pages)
from .patches import save_sprite
from . import workers
from .views import registered
from .workers import Job

ATLAS_SCHEMA_VERSION = 1


def templates_dir() -> Path:
    """The installed ``sitegen.templates`` package, or the repository's ``templates/`` folder."""
    try:
        p = Path(str(resources.files("sitegen.templates")))
        if (p / "base.html").is_file():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "templates"


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=True,  # every user string (class folders, file names, layer names) is escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


# ---------------------------------------------------------------- collect

def _reason(rel: str, message: str) -> str:
    """A decoding failure's message as listed beside its path: without the path it starts with
    (the terminal needs it, the list has it already) and with the hint on the same line."""
    head = f"{rel}: "
    message = message[len(head):] if message.startswith(head) else message
    return message.replace("\n  hint: ", " — ")


def collect_atlas(ctx: BuildContext, topk: Result) -> dict[str, Any]:
    """The machine-readable atlas (``data/atlas.json``, schema in docs/atlas-json.md)."""
    failed = set(int(i) for i in topk.arrays["failed"])
    # shown(): file and folder names may hold bytes that are not UTF-8; pages and JSON must stay UTF-8.
    skipped = [{"path": shown(p), "reason": shown(r)} for p, r in ctx.images.skipped]
    skipped += [{"path": shown(ctx.images.records[i].rel), "reason": shown(_reason(ctx.images.records[i].rel, reason))}
                for i, reason in zip(topk.arrays["failed"].tolist(), topk.meta["failed_reasons"])]
    layers = []
    for li, info in enumerate(ctx.layers):
        a = lambda key: topk.arrays[f"L{li}.{key}"]  # noqa: E731
        channels = []
        for c in range(info.channels):
            top = channel_top(topk, info.name, c)
            entries = []
            for v, i, y, x in zip(top.values.tolist(), top.images.tolist(), top.y.tolist(), top.x.tolist()):
                entries.append({
                    "image": shown(ctx.images.records[i].rel),
                    "label": shown(ctx.images.label_name(i)),
                    "value": round(float(v), 6),
                    "fmap_yx": [int(y), int(x)],
                    "box_xyxy": list(info.rf.box(int(y), int(x))),
                    "index": int(i),
                })
            channels.append({
                "channel": c,
                "top": entries,
                "stats": {"mean": float(a("mean")[c]), "std": float(a("std")[c]),
                          "max": float(a("max")[c]), "fire_rate": float(a("fire_rate")[c])},
            })
        layers.append({
            "name": info.name, "kind": info.kind, "shape": list(info.shape),
            "receptive_field": info.rf.to_json(),
            "stage": info.stage, "block": info.block, "caffe": info.caffe, "branch": info.branch,
            "channels": channels,
        })
    return {
        "schema": ATLAS_SCHEMA_VERSION,
        "generator": f"sitegen {__version__}",
        "model": {"checkpoint": shown(ctx.model.path.name), "arch": shown(ctx.model.arch),
                  "weights_sha256": ctx.model.weights_hash, "num_classes": ctx.model.num_classes},
        "data": {"images": len(ctx.images), "used": len(ctx.images) - len(failed),
                 "classes": [shown(c) for c in ctx.images.classes], "skipped": skipped,
                 "input_size": list(ctx.input_size), "channels": ctx.channels,
                 "mean": list(ctx.config.data.mean), "std": list(ctx.config.data.std),
                 "resize": ctx.config.data.resize, "crop": ctx.config.data.crop,
                 "notes": [shown(n) for n in (*ctx.images.notes, *ctx.input_notes)]},
        "k": topk.meta["k"],
        "layers": layers,
    }


def _neighbours(ctx: BuildContext, layer_index: int) -> list[dict[str, Any]]:
    """The same layer role in the other blocks of its residual stage (same width only)."""
    info = ctx.layers[layer_index]
    if not info.stage:
        return []
    # Each block's module name, by its index in the stage (RegNet's blocks are ``block2-0``, ...).
    owners = {l.block: l.name for l in ctx.all_layers if l.kind == "block" and l.stage == info.stage}
    if info.block not in owners:
        return []
    suffix = info.name[len(owners[info.block]):]
    out = []
    for other in ctx.layers:
        if other.stage == info.stage and other.block in owners and other.name == f"{owners[other.block]}{suffix}" \
                and other.channels == info.channels:
            out.append({"name": other.name, "caffe": other.caffe, "block": other.block,
                        "current": other.name == info.name})
    return out if len(out) > 1 else []


def field_text(rf: dict[str, int]) -> str:
    """A layer's field in words for the tables: ``35 px, stride 8``, ``whole image (pooled)``."""
    return ReceptiveField(**rf).describe()


def field_context(rf: dict[str, int]) -> dict[str, Any]:
    """What the layer and channel pages say about a layer's field and its patches."""
    f = ReceptiveField(**rf)
    if f.pooled:
        return {"pooled": True, "text": f.describe(), "box": "", "note": "",
                "crop": "whole (the layer runs on a globally pooled map: one value per channel and image)"}
    note = "" if f.size == f.size_x else \
        f" The field is {f.size_x} px wide and {f.size} px high; the patch is the square around it."
    return {"pooled": False, "text": f.describe(), "box": f"{f.size_x}×{f.size} px", "note": note,
            "crop": "cropped to the receptive field"}


def dull_channels(channels: list[dict[str, Any]], ratio: float) -> list[int]:
    """Channels that barely vary: the std over images of their spatial mean is below ``ratio`` times
    the median std of the layer's live channels (``site.dull_ratio``).  Dead channels (max ≤ 0) are
    reported as dead only, and left out of the median, so a mostly dead layer still has a scale."""
    live = [ch for ch in channels if ch["stats"]["max"] > 0]
    typical = float(np.median([ch["stats"]["std"] for ch in live])) if live else 0.0
    return [ch["channel"] for ch in live if ch["stats"]["std"] < ratio * typical]


def collect_pages(ctx: BuildContext, atlas: dict[str, Any], opts: RenderOptions,
                  results: dict[str, Result] | None = None, views: list | None = None) -> list[Page]:
    results, views = results or {}, views or []
    pages: list[Page] = []
    nav = [{"url": url, "text": text} for v in views for url, text in v.nav()]
    fmt = opts.image_format
    k = atlas["k"]
    layer_rows = []
    dead_rows = []
    dull_rows = []
    for li, layer in enumerate(atlas["layers"]):
        dead = [ch["channel"] for ch in layer["channels"] if ch["stats"]["max"] <= 0]
        dull = dull_channels(layer["channels"], ctx.config.site.dull_ratio)
        layer_rows.append({**{key: layer[key] for key in ("name", "kind", "shape", "caffe", "stage")},
                           "rf": layer["receptive_field"], "rf_text": field_text(layer["receptive_field"]),
                           "url": layer_url(layer["name"]),
                           "dead": len(dead), "dull": len(dull), "channels": layer["shape"][0]})
        if dead:
            dead_rows.append({"name": layer["name"], "url": layer_url(layer["name"]), "count": len(dead),
                              "channels": layer["shape"][0],
                              "list": [{"c": c, "url": channel_url(layer["name"], c)} for c in dead[:64]]})
        if dull:
            dull_rows.append({"name": layer["name"], "url": layer_url(layer["name"]), "count": len(dull),
                              "channels": layer["shape"][0],
                              "list": [{"c": c, "url": channel_url(layer["name"], c)} for c in dull[:64]]})
    pages.append(Page("index.html", "index.html", {
        "model": atlas["model"], "data": atlas["data"], "layers": layer_rows, "dead": dead_rows, "k": k,
        "dull": dull_rows, "dull_ratio": ctx.config.site.dull_ratio,
        "views": nav, "classes": [{"name": c, "id": class_anchor(c)} for c in atlas["data"]["classes"]],
        "left_out": list(opts.left_out),
        "partials": [v.index_partial for v in views if v.index_partial],
        "extras": {v.name: v.index_context(ctx, atlas, results) for v in views if v.index_partial},
    }, title=opts.title))
    for v in views:
        pages.extend(v.pages(ctx, atlas, results, opts))
    for li, layer in enumerate(atlas["layers"]):
        name = layer["name"]
        n = len(layer["channels"])
        neighbours = _neighbours(ctx, li)
        dull = set(dull_channels(layer["channels"], ctx.config.site.dull_ratio))
        tiles = [{"c": ch["channel"], "url": channel_url(name, ch["channel"]).split("/")[-1],
                  "sprite": sprite_url(name, ch["channel"], fmt), "dead": ch["stats"]["max"] <= 0,
                  "dull": ch["channel"] in dull,
                  "max": ch["stats"]["max"], "fire_rate": ch["stats"]["fire_rate"]} for ch in layer["channels"]]
        crumbs = [("index.html", "atlas")]
        field = field_context(layer["receptive_field"])
        paging = tile_pages(name, n)
        for part in paging:
            shown_range = "" if part["number"] == 1 else f" channels {part['first']}–{part['last']}"
            pages.append(Page(part["path"], "layer.html", {
                "layer": layer, "tiles": tiles[part["first"]:part["last"] + 1], "k": k, "patch": opts.patch_size,
                "field": field,
                "tile_scale": 1 / 3, "paging": [{**q, "current": q is part,
                                                 "rel": {-1: "prev", 1: "next"}.get(q["number"] - part["number"])}
                                                for q in paging],
                "neighbours": [{**nb, "url": f"../{slug(nb['name'])}/index.html"} for nb in neighbours],
                "partials": [v.layer_partial for v in views if v.layer_partial],
                "extras": {v.name: v.layer_context(ctx, atlas, results, li) for v in views if v.layer_partial},
            }, title=f"{name}{shown_range} · {opts.title}", crumbs=crumbs))
        for ch in layer["channels"]:
            c = ch["channel"]
            cells = [{**e, "col": j, "name": e["image"].rsplit("/", 1)[-1]} for j, e in enumerate(ch["top"])]
            pages.append(Page(channel_url(name, c), "channel.html", {
                "layer": {key: layer[key] for key in ("name", "kind", "shape", "caffe", "receptive_field")},
                "channel": c, "channels": n, "cells": cells, "stats": ch["stats"], "k": k, "field": field,
                "patch": opts.patch_size, "sprite": sprite_url(name, c, fmt).split("/")[-1],
                "sprite_dir": f"../../img/{slug(name)}/",
                "prev": f"{c - 1}.html" if c > 0 else None,
                "next": f"{c + 1}.html" if c + 1 < n else None,
                "dead": ch["stats"]["max"] <= 0,
                "neighbours": [{**nb, "url": f"../{slug(nb['name'])}/{c}.html"} for nb in neighbours],
                "partials": [v.channel_partial for v in views if v.channel_partial],
                "extras": {v.name: v.channel_context(ctx, atlas, results, li, c) for v in views if v.channel_partial},
            }, title=f"{name}:{c} · {opts.title}",
                crumbs=[("index.html", "atlas"), (f"{tile_page_url(name, c)}#c{c}", name)]))
    return pages


# ---------------------------------------------------------------- draw

def sprite_jobs(ctx: BuildContext, atlas: dict[str, Any], out: Path, opts: RenderOptions,
                extra_rows: Callable[[int, int, list], list[list[np.ndarray]]] | None = None) -> list[Job]:
    """One job per channel, each drawing that channel's sprite: row 0 the top-k receptive-field
    patches (plus rows from other passes)."""
    # Decoded images are cached per process: each worker gets its share of the budget.
    pixels = PixelCache(lambda i: display_pixels(ctx.images, i, ctx.config.data),
                        budget_bytes=max(64 << 20, (512 << 20) // workers.resolve(opts.workers)))

    def draw(li: int, layer: dict[str, Any], ch: dict[str, Any]) -> int:
        boxes = [display_box(tuple(e["box_xyxy"]), ctx.input_size) for e in ch["top"]]
        patches = [crop_box(pixels(e["index"]), box) for e, box in zip(ch["top"], boxes)]
        rows = [patches] + (extra_rows(li, ch["channel"], boxes) if extra_rows else [])
        return save_sprite(rows, opts.patch_size, max(atlas["k"], 1),
                           out / sprite_url(layer["name"], ch["channel"], opts.image_format), opts.image_format)

    return [functools.partial(draw, li, layer, ch)
            for li, layer in enumerate(atlas["layers"]) for ch in layer["channels"]]


def draw_sprites(ctx: BuildContext, atlas: dict[str, Any], out: Path, opts: RenderOptions,
                 extra_rows: Callable[[int, int, list], list[list[np.ndarray]]] | None = None) -> None:
    """Every channel's sprite (:func:`sprite_jobs`), on ``opts.workers`` processes."""
    workers.run(sprite_jobs(ctx, atlas, out, opts, extra_rows), opts.workers, "drawing patches", "channels")


# ---------------------------------------------------------------- write

def page_jobs(pages: list[Page], out: Path, site_title: str) -> list[Job]:
    """One job per page, each filling its template and writing the file.  The templates are
    compiled here, once, before any worker starts."""
    env = environment()
    templates = {name: env.get_template(name) for name in dict.fromkeys(p.template for p in pages)}

    def write(page: Page) -> int:
        root = relative_root(page.path)
        html = templates[page.template].render(page=page.context, root=root, title=page.title,
                                               site_title=site_title,
                                               crumbs=[(root + url, text) for url, text in page.crumbs])
        dest = out / page.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        # errors="replace": a name that escaped shown() (a view's own string) costs a "?", not the build
        dest.write_text(html, encoding="utf-8", errors="replace")
        return 1

    return [functools.partial(write, page) for page in pages]


def write_pages(pages: list[Page], out: Path, site_title: str, n_workers: int = 1) -> None:
    workers.run(page_jobs(pages, out, site_title), n_workers, "writing pages", "pages")


SEARCH_INDEX = "data/search-index.js"


def js_assign(name: str, data: Any) -> str:
    """``window.NAME = <data>;`` as a script file: the way to ship data that works from file://,
    where browsers refuse fetch() of local JSON.  ``<``, ``>`` and ``&`` are escaped so user
    strings (class folders, layer names) cannot close a script element if the text is ever inlined."""
    return f"window.{name} = {safe_json(data)};\n"


def safe_json(data: Any) -> str:
    """JSON (ASCII) with ``<``, ``>`` and ``&`` as ``\\u`` escapes: the same data once parsed, but no
    user string in it can close a script element or open a tag wherever the text ends up."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def search_index(atlas: dict[str, Any], pages: list[Page], site_title: str) -> dict[str, Any]:
    """What the header's search box searches, offline (templates/assets/search.js).

    Channels get no entry each (ResNet-50 has ~26,000): a ``layer3.8:41`` query is parsed against
    the layer list, which holds each layer's folder and channel count.  The views' own front pages
    (top-level pages and folder indexes: t-SNE, occlusion, stages, ...) are listed by title; their
    per-image and per-channel pages are not, as they would be thousands on a large model and this
    file loads with every page.  Each class names the page it leads to (``url``, relative to the site
    root, perhaps with a ``#fragment``) and what that is (``where``).
    """
    layers = [{"name": l["name"], "caffe": l["caffe"], "kind": l["kind"], "channels": l["shape"][0],
               "dir": f"layers/{slug(l['name'])}/"} for l in atlas["layers"]]
    suffix = f" · {site_title}"
    listed = [{"title": p.title[:-len(suffix)] if p.title.endswith(suffix) else p.title, "url": p.path}
              for p in pages if p.template not in ("layer.html", "channel.html") and p.path != "index.html"
              and ("/" not in p.path or p.path.endswith("/index.html"))]
    # A class leads to the most specific place this build has about it: its own page (a view's page
    # whose context says ``for_class``), else its anchor in the index page's class list.
    own = {p.context["for_class"]: p.path for p in pages
           if isinstance(p.context, dict) and isinstance(p.context.get("for_class"), str)}
    classes = [{"name": c, "url": class_url(c, own), "where": "class page" if c in own else "data summary"}
               for c in atlas["data"]["classes"]]
    return {"layers": layers, "classes": classes, "pages": listed}


def write_search_index(out: Path, atlas: dict[str, Any], pages: list[Page], site_title: str) -> None:
    dest = out / SEARCH_INDEX
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(js_assign("SITEGEN_SEARCH", search_index(atlas, pages, site_title)), encoding="utf-8")


ASSET_SUFFIXES = (".css", ".js", ".svg", ".png")


def asset_files() -> list[str]:
    """The files :func:`copy_assets` writes under ``assets/`` (paths relative to the site): known
    before any work, so a --force folder holding one of them is refused at once."""
    return sorted(f"assets/{f.name}" for f in (templates_dir() / "assets").iterdir() if f.suffix in ASSET_SUFFIXES)


def copy_assets(out: Path) -> None:
    src = templates_dir() / "assets"
    dest = out / "assets"
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix in ASSET_SUFFIXES:
            shutil.copyfile(f, dest / f.name)
    (out / ".nojekyll").write_text("", encoding="utf-8")  # GitHub Pages: serve every file as is


def render(ctx: BuildContext, results: dict[str, Result], out: Path, opts: RenderOptions) -> dict[str, Any]:
    opts = dataclasses.replace(opts, title=shown(opts.title))  # the default title is the checkpoint's name
    atlas = collect_atlas(ctx, results["topk"])
    views = [v for v in registered() if v.available(results)]
    pages = collect_pages(ctx, atlas, opts, results, views)
    copy_assets(out)

    def extra_rows(li: int, c: int, boxes: list) -> list[list[np.ndarray]]:
        return [row for v in views for row in v.sprite_rows(ctx, atlas, results, li, c, boxes)]

    # Every picture, then every page, each on opts.workers processes; the jobs are listed before
    # the workers start, so they inherit all they read.  The views' jobs (fewer, larger) go first,
    # so the many small sprite jobs even out the workers' loads at the end.
    drawing = [job for v in views for job in v.draw_jobs(ctx, atlas, results, out, opts)]
    drawing += sprite_jobs(ctx, atlas, out, opts, extra_rows)
    workers.run(drawing, opts.workers, "drawing pictures", "pictures")
    workers.run(page_jobs(pages, out, opts.title), opts.workers, "writing pages", "pages")
    write_search_index(out, atlas, pages, opts.title)
    public = {**atlas, "layers": [{**l, "channels": [{k: v for k, v in ch.items()} for ch in l["channels"]]}
                                  for l in atlas["layers"]]}
    for l in public["layers"]:
        for ch in l["channels"]:
            ch["top"] = [{k: v for k, v in e.items() if k != "index"} for e in ch["top"]]
    if opts.build is not None:
        public["build"] = opts.build
    (out / "data" / "atlas.json").write_text(safe_json(public), encoding="utf-8")
    return atlas
