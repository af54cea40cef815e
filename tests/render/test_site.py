"""Site-wide properties of a built atlas, checked on the files themselves (no browser):

- every link, image, script and stylesheet of every page resolves to a file of the atlas, and no
  page, script or stylesheet refers to another host or fetches data at run time;
- user strings (the title, class folders) are escaped in HTML and in the search index;
- a layer page stays under 500 KB of HTML even with 2048 channels;
- the same model built twice gives the same set of page addresses (permalinks);
- the search index resolves ``layer:channel`` to the channel's page, as search.js does;
- sprites are written in ``site.image_format`` and hold the drawn grid.

The browser-level checks (console errors, lazy images decoding, keyboard, search box) are in
tests/e2e/test_browser.py; both open the same small atlas (tests/e2e/small_atlas.py).
"""
from __future__ import annotations

import importlib.util
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from sitegen.crops import display_box

REPO = Path(__file__).resolve().parents[2]
LAYER_PAGE_BUDGET = 500_000


def _small_atlas_module():
    spec = importlib.util.spec_from_file_location("sitegen_small_atlas", REPO / "tests" / "e2e" / "small_atlas.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = _small_atlas_module()


@pytest.fixture(scope="session")
def small_site(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return SMALL.build_small_atlas(tmp_path_factory.mktemp("site") / "atlas", base / "small-atlas-work",
                                   base / "sitegen-pass-cache")


# ------------------------------------------------------------------ parsing pages

class Refs(HTMLParser):
    """Every URL a page refers to (with the tag and attribute), and its element ids."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.urls: list[tuple[str, str, str]] = []
        self.ids: set[str] = set()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "id" in a:
            self.ids.add(a["id"])
        for attr in ("href", "src", "poster", "data"):
            if a.get(attr) is not None and not (tag == "meta"):
                self.urls.append((tag, attr, a[attr]))
        if a.get("srcset"):
            for part in a["srcset"].split(","):
                self.urls.append((tag, "srcset", part.strip().split(" ")[0]))
        for m in re.finditer(r"url\(\s*['\"]?([^'\")]+)", a.get("style") or ""):
            self.urls.append((tag, "style", m.group(1)))

    handle_startendtag = handle_starttag


def parse(page: Path) -> Refs:
    refs = Refs()
    refs.feed(page.read_text(encoding="utf-8"))
    return refs


def resolve(site: Path, page: Path, url: str) -> tuple[Path | None, str]:
    """The file a relative URL names (None for in-page anchors and data: URLs) and its fragment."""
    parts = urlsplit(url)
    if parts.scheme == "data" or url.startswith("#"):
        return None, parts.fragment
    assert not parts.scheme and not parts.netloc, f"{page.relative_to(site)} links off the site: {url}"
    assert not url.startswith("/"), f"{page.relative_to(site)} has a root-relative URL (breaks sub-paths): {url}"
    target = (page.parent / unquote(parts.path)).resolve()
    assert target.is_relative_to(site.resolve()), f"{page.relative_to(site)} leaves the atlas folder: {url}"
    return target, parts.fragment


# ------------------------------------------------------------------ the small atlas

def test_every_reference_of_every_page_resolves(small_site: Path):
    check_references(small_site)


def check_references(small_site: Path) -> None:
    pages = sorted(small_site.rglob("*.html"))
    assert len(pages) > 100
    ids: dict[Path, set[str]] = {}
    missing, anchors = [], []
    parsed = {p: parse(p) for p in pages}
    for page, refs in parsed.items():
        ids[page.resolve()] = refs.ids
    for page, refs in parsed.items():
        for tag, attr, url in refs.urls:
            if tag == "link" and url == "data:,":  # the empty favicon
                continue
            target, fragment = resolve(small_site, page, url)
            if target is None:
                if fragment and fragment not in refs.ids:
                    anchors.append(f"{page.relative_to(small_site)}: #{fragment}")
                continue
            if not target.is_file():
                missing.append(f"{page.relative_to(small_site)}: <{tag} {attr}={url!r}>")
            elif fragment and target.suffix == ".html" and fragment not in ids.get(target, set()):
                anchors.append(f"{page.relative_to(small_site)}: {url}")
    assert not missing, f"{len(missing)} broken references, e.g. {missing[:5]}"
    assert not anchors, f"{len(anchors)} links to missing anchors, e.g. {anchors[:5]}"


@pytest.fixture(scope="session")
def compare_site(tmp_path_factory) -> Path:
    """The small atlas compared with an older checkpoint (tests/e2e/small_atlas.py)."""
    base = tmp_path_factory.getbasetemp()
    return SMALL.build_small_atlas(tmp_path_factory.mktemp("site-compare") / "atlas", base / "small-atlas-work",
                                   base / "sitegen-pass-cache", compare=True)


def test_comparison_atlas_references_resolve_and_plain_atlas_has_no_comparison(small_site: Path, compare_site: Path):
    check_references(compare_site)
    atlas = json.loads((compare_site / "data" / "atlas.json").read_text(encoding="utf-8"))
    section = atlas["compare"]
    assert section["old"]["checkpoint"] == "older.pt" and not section["nothing_changed"]
    assert [l["name"] for l in section["layers"]] == SMALL.LAYERS
    assert sorted(section["ranking"]) == sorted(SMALL.LAYERS)
    for layer in section["layers"]:
        assert len(layer["channels"]) == len(next(l for l in atlas["layers"] if l["name"] == layer["name"])["channels"])
        assert (compare_site / "layers" / layer["name"] / "by-change.html").is_file()
    for name in ("changes.html", "changes-tsne.html"):
        html = (compare_site / name).read_text(encoding="utf-8")
        assert "e2e &lt;atlas&gt; &amp; " in html  # the title, escaped
    # Every new-model file is the plain build's, byte for byte, but the pages that link the comparison.
    differ = [p.relative_to(small_site).as_posix() for p in small_site.rglob("*") if p.is_file()
              and p.read_bytes() != (compare_site / p.relative_to(small_site)).read_bytes()]
    assert all(d.endswith(".html") or d.startswith("data/") or d == ".sitegen-atlas.json" for d in differ), differ[:5]
    # A build without --compare carries nothing of it.
    assert "compare" not in json.loads((small_site / "data" / "atlas.json").read_text(encoding="utf-8"))
    assert not (small_site / "changes.html").exists() and not list(small_site.rglob("*.old.*"))
    assert not list(small_site.rglob("by-change*.html")) and not list(small_site.rglob("*.fv-old.png"))


def test_every_page_has_the_shared_head_and_the_search_box(small_site: Path):
    for page in small_site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        name = page.relative_to(small_site)
        assert 'http-equiv="Content-Security-Policy"' in html, name
        assert "connect-src 'none'" in html, name  # no fetch()/XHR: they fail on file:// anyway
        assert re.search(r'<script src="(\.\./)*data/search-index\.js" defer>', html), name
        assert 'class="search-box"' in html and 'class="copy-link"' in html, name
        assert 'rel="icon" href="data:,"' in html, name  # no /favicon.ico request to the host root


def test_scripts_and_styles_stay_on_the_site(small_site: Path):
    """No script fetches data (file:// forbids it) and nothing names another host."""
    for f in list(small_site.rglob("*.js")) + list(small_site.rglob("*.css")):
        text = f.read_text(encoding="utf-8")
        name = f.relative_to(small_site)
        assert not re.search(r"\bfetch\s*\(|XMLHttpRequest|importScripts|new\s+WebSocket", text), name
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), f"{name} names another host"
        if f.suffix == ".css":
            for url in re.findall(r"url\(\s*['\"]?([^'\")]+)", text):
                assert url.startswith("data:") or (f.parent / url).is_file(), f"{name}: url({url})"
    for page in small_site.rglob("*.html"):
        for tag, attr, url in parse(page).urls:
            assert not re.match(r"(?:https?:)?//", url), f"{page.relative_to(small_site)}: {url}"


def test_user_strings_are_escaped(small_site: Path):
    """The title holds <, >, & and quotes: escaped in every page, \\u-escaped in the search index."""
    title = SMALL.TITLE
    raw = re.compile(re.escape(title.split(" ")[1]))  # "<atlas>"
    for page in small_site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        assert not raw.search(html), f"unescaped title in {page.relative_to(small_site)}"
    index = (small_site / "index.html").read_text(encoding="utf-8")
    assert "e2e &lt;atlas&gt; &amp; " in index
    js = (small_site / "data" / "search-index.js").read_text(encoding="utf-8")
    assert "<" not in js and ">" not in js and "&" not in js
    assert (small_site / ".nojekyll").is_file()


def load_search_index(site: Path) -> dict:
    text = (site / "data" / "search-index.js").read_text(encoding="utf-8")
    m = re.fullmatch(r"window\.SITEGEN_SEARCH = (.*);\n", text, re.S)
    assert m, "search-index.js must only assign window.SITEGEN_SEARCH"
    return json.loads(m.group(1))


def test_search_index_finds_every_layer_channel_and_class(small_site: Path):
    index = load_search_index(small_site)
    atlas = json.loads((small_site / "data" / "atlas.json").read_text(encoding="utf-8"))
    assert [l["name"] for l in index["layers"]] == [l["name"] for l in atlas["layers"]] == SMALL.LAYERS
    for entry, layer in zip(index["layers"], atlas["layers"]):
        assert entry["channels"] == len(layer["channels"])
        assert (small_site / entry["dir"] / "index.html").is_file()
        # search.js builds "<dir><c>.html" for a "layer:c" query: every channel's page is there.
        for c in range(entry["channels"]):
            assert (small_site / entry["dir"] / f"{c}.html").is_file()
        assert not (small_site / entry["dir"] / f"{entry['channels']}.html").exists()
    assert [c["name"] for c in index["classes"]] == atlas["data"]["classes"]
    assert len(index["classes"]) == 10
    # A class leads to something about it: this build has no page of its own per class, so its entry
    # in the index page's class list, an element whose text is the class name.
    home = parse(small_site / "index.html")
    for entry in index["classes"]:
        target, fragment = resolve(small_site, small_site / "index.html", entry["url"])
        assert target == (small_site / "index.html").resolve() and fragment, entry
        assert fragment in home.ids, entry
        assert entry["where"] == "data summary"
    html = (small_site / "index.html").read_text(encoding="utf-8")
    for name in atlas["data"]["classes"]:
        assert re.search(rf'<span class="class-name" id="class-{re.escape(name)}">{re.escape(name)}</span>', html)
    for page in index["pages"]:
        assert (small_site / page["url"]).is_file(), page
        assert "/" not in page["url"] or page["url"].endswith("/index.html")
    # The index loads with every page: it must stay small (no per-channel or per-image entries).
    assert (small_site / "data" / "search-index.js").stat().st_size < 20_000


def test_a_class_leads_to_its_own_page_else_its_index_anchor(tmp_path):
    """Without a build: a class with a page of its own (context ``for_class``) links there, the others to
    their anchor in the index's class list; odd folder names give a safe, stable fragment, and the
    index page (rendered from the same context) carries every anchor the search index names."""
    from sitegen.render.pages import Page, class_anchor, slug
    from sitegen.render.site import search_index, write_pages

    odd = 'a/b <c> & "d" #1'
    atlas = {"layers": [], "data": {"classes": ["dog", odd, "cat"]}}
    pages = [Page("index.html", "index.html", {}, title="t"),
             Page("classes/dog.html", "classes.html", {"for_class": "dog"}, title="dog · t"),
             Page("classes/index.html", "classes.html", {}, title="Class visualisations · t")]
    index = search_index(atlas, pages, "t")
    by_name = {c["name"]: c for c in index["classes"]}
    assert by_name["dog"] == {"name": "dog", "url": "classes/dog.html", "where": "class page"}
    assert by_name["cat"] == {"name": "cat", "url": "index.html#class-cat", "where": "data summary"}
    frag = by_name[odd]["url"].split("#", 1)[1]
    assert by_name[odd]["url"] == f"index.html#{class_anchor(odd)}" and frag == f"class-{slug(odd)}"
    assert re.fullmatch(r"class-[A-Za-z0-9._-]+", frag)  # no escaping needed in a URL or an id
    assert frag != class_anchor('a/b <c> & "d" #2')  # the slug's hash keeps look-alike names apart

    # The same anchors on the rendered index page, the class name escaped as text.
    (tmp_path / "site").mkdir()
    home = Page("index.html", "index.html", {
        "model": {"checkpoint": "m.pt", "arch": "a", "num_classes": 3, "weights_sha256": "0" * 64},
        "data": {"used": 3, "images": 3, "input_size": [8, 8], "classes": atlas["data"]["classes"], "skipped": [],
                 "channels": 3, "resize": 0, "crop": 0, "mean": [0.5], "std": [0.5], "notes": []},
        "classes": [{"name": c, "id": class_anchor(c)} for c in atlas["data"]["classes"]],
        "layers": [], "dead": [], "dull": [], "dull_ratio": 0.1, "k": 1, "views": [], "partials": [],
        "extras": {}}, title="t")
    write_pages([home], tmp_path / "site", "t")
    refs = parse(tmp_path / "site" / "index.html")
    for c in index["classes"]:
        if c["url"].startswith("index.html#"):
            assert c["url"].split("#", 1)[1] in refs.ids, c
    html = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert 'a/b &lt;c&gt; &amp; &#34;d&#34; #1</span>' in html and "<c>" not in html


def test_layer_pages_are_light(small_site: Path):
    for page in (small_site / "layers").glob("*/index.html"):
        assert page.stat().st_size < LAYER_PAGE_BUDGET, page


def test_sprites_in_the_configured_format(small_site: Path):
    """Default site.image_format: WebP sprites, each a grid of k patches per row."""
    from sitegen.config import Config

    fmt = Config().site.image_format
    atlas = json.loads((small_site / "data" / "atlas.json").read_text(encoding="utf-8"))
    sprites = sorted((small_site / "img").rglob(f"*.{fmt}"))
    channel_sprites = [s for s in sprites if re.fullmatch(r"\d+\." + fmt, s.name)]
    assert len(channel_sprites) == sum(len(l["channels"]) for l in atlas["layers"])
    patch = Config().site.patch_size
    dirs = {l["name"]: Path(l["dir"]).name for l in load_search_index(small_site)["layers"]}
    for layer in atlas["layers"]:
        # Cells at the windows' own pixels (the small site's 32 px images: under the patch size),
        # enlarged by the page; their WebP is lossless, so the enlargement shows no coding blocks.
        top = layer["channels"][0]["top"]
        side = display_box(tuple(top[0]["box_xyxy"]), tuple(atlas["data"]["input_size"]))
        cell = side[2] - side[0] if 3 * (side[2] - side[0]) <= patch else patch
        path = small_site / "img" / dirs[layer["name"]] / f"0.{fmt}"
        with Image.open(path) as im:
            assert im.format == {"webp": "WEBP", "png": "PNG"}[fmt]
            assert im.width == atlas["k"] * cell and im.height % cell == 0, (layer["name"], im.size)
        if fmt == "webp":  # the lossless bitstream where the page enlarges the cells
            assert path.read_bytes()[12:16] == (b"VP8L" if cell < patch else b"VP8 "), layer["name"]
    other = {"webp": "png", "png": "webp"}[fmt]
    layer_dirs = [small_site / "img" / Path(l["dir"]).name for l in load_search_index(small_site)["layers"]]
    assert not [s for d in layer_dirs for s in d.glob(f"*.{other}") if re.fullmatch(r"\d+\." + other, s.name)]


# ------------------------------------------------------------------ a wide layer, and rebuilds

class Wide(nn.Module):
    """conv → wide conv → classifier; the wide one is named like ResNet-50's widest layer."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.layer4 = nn.Sequential(nn.Identity(), nn.Identity(), nn.Module())
        self.layer4[2].conv3 = nn.Conv2d(8, width, 3, padding=1)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        x = F.relu(self.layer4[2].conv3(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def wide_2048() -> nn.Module:
    torch.manual_seed(0)
    return Wide(2048)


def wide_12() -> nn.Module:
    torch.manual_seed(0)
    return Wide(12)


def _images(folder: Path, n: int = 12, side: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"class{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(sub / f"{i:02d}.png")
    return folder


def _build_wide(tmp: Path, factory: str, out: Path, cache: Path | None, **site) -> Path:
    from sitegen.build import build
    from sitegen.config import from_dict

    checkpoint = tmp / f"{factory}.pt"
    if not checkpoint.exists():
        torch.save(globals()[factory]().state_dict(), checkpoint)
    images = tmp / "images" if (tmp / "images").is_dir() else _images(tmp / "images")
    off = {"enabled": False}
    cfg = from_dict({"model": {"arch": f"{Path(__file__).resolve()}:{factory}"},
                     "site": {"patch_size": 8, **site},
                     "featurevis": {"steps": 1, "classes": False},  # its tile image counts toward the weight
                     **{s: off for s in ("attribution", "occlusion", "tsne", "activations", "kernels")
                        if s in _sections()}})
    build(checkpoint, images, out, cfg, cache_dir=cache)
    return out


def _sections() -> set[str]:
    from sitegen.config import Config

    return set(Config.__dataclass_fields__)


def test_a_2048_channel_layer_stays_under_500_kb_a_page(tmp_path):
    """ResNet-50's widest layer: its tiles are split over pages of 512, each far under the budget,
    linked to each other (rel prev/next, so ← and → page through them), and every channel page's
    breadcrumb leads to the page holding its tile."""
    from sitegen.render.pages import TILES_PER_PAGE

    site = _build_wide(tmp_path, "wide_2048", tmp_path / "atlas", tmp_path / "cache")
    folder = site / "layers" / "layer4.2.conv3"
    pages = [folder / "index.html"] + [folder / f"page-{n}.html" for n in range(2, 2048 // TILES_PER_PAGE + 1)]
    assert sorted(folder.glob("page-*.html")) == sorted(pages[1:])
    seen = []
    for i, page in enumerate(pages):
        html = page.read_text(encoding="utf-8")
        size = page.stat().st_size
        assert size < LAYER_PAGE_BUDGET, f"{page.name}: {size} bytes"
        seen += [int(c) for c in re.findall(r'<a class="tile[^"]*" href="(\d+)\.html"', html)]
        imgs = re.findall(r"<img [^>]*>", html)  # lazy: only tiles scrolled into view are fetched
        assert imgs and all('loading="lazy"' in i for i in imgs)
        rels = dict((r, h) for h, r in re.findall(r'<a href="([^"]+)" rel="(prev|next)"', html))
        assert rels.get("prev") == (None if i == 0 else pages[i - 1].name)
        assert rels.get("next") == (None if i == len(pages) - 1 else pages[i + 1].name)
    assert seen == list(range(2048))
    crumb = re.search(r'<nav class="crumbs".*?</nav>', (folder / "1500.html").read_text(encoding="utf-8"), re.S)
    assert 'href="../../layers/layer4.2.conv3/page-3.html#c1500"' in crumb.group(0)


def test_rebuilds_keep_every_address(tmp_path):
    """Permalinks: the same model built twice (the second time recomputing everything) gives the
    same files at the same paths, and the same layer and channel pages."""
    first = _build_wide(tmp_path, "wide_12", tmp_path / "a", tmp_path / "cache")
    second = _build_wide(tmp_path, "wide_12", tmp_path / "b", None)

    def paths(site: Path) -> set[str]:
        return {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()}

    assert paths(first) == paths(second)
    assert {"layers/layer4.2.conv3/index.html", "layers/layer4.2.conv3/11.html", "layers/conv1/7.html",
            "data/search-index.js", "data/atlas.json", ".nojekyll"} <= paths(first)
    for rel in ("layers/layer4.2.conv3/index.html", "layers/conv1/3.html", "index.html"):
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel


def test_png_sprites_when_configured(tmp_path):
    site = _build_wide(tmp_path, "wide_12", tmp_path / "atlas", tmp_path / "cache", image_format="png")
    sprite = site / "img" / "conv1" / "0.png"
    with Image.open(sprite) as im:
        assert im.format == "PNG" and im.size == (9 * 8, im.height)  # conv1's 3-px windows: over a third of 8 px
    assert not list((site / "img").rglob("[0-9]*.webp"))
    assert 'src="../../img/conv1/0.png"' in (site / "layers" / "conv1" / "index.html").read_text(encoding="utf-8")
