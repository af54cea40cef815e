"""The built atlas in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

One small atlas is built per session and opened twice: from ``file://`` and from ``python -m
http.server`` on 127.0.0.1 with the site under a sub-path (``/sub/path/``), the two ways users open
it.  Every page visited must log no console error, make no failed request and no request to any
other host, decode every ``<img>`` once scrolled into view (the tiles load lazily) and give every
image alt text.  Screenshots at 1280 px and at a 390 px phone width go to
``test-artifacts/screenshots/`` for a person to look at.

Playwright's Python package is the driver only: the browser is the system's Chromium (downloading
one at install time is impossible on the build machines), so ``playwright install`` is never run.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = Path(os.environ.get("SITEGEN_CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.is_file():
    if os.environ.get("SITEGEN_REQUIRE_BROWSER"):  # set by .ci/run: CI must not pass without them
        raise RuntimeError(f"SITEGEN_REQUIRE_BROWSER is set but there is no Chromium at {CHROMIUM}")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium) for the browser tests",
                allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the browser tests need Playwright's Python package: pip install playwright "
           "(the package only; it drives /usr/bin/chromium, no `playwright install`)")

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
SUB_PATH = "sub/path"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
def _small_atlas():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sitegen_small_atlas", Path(__file__).with_name("small_atlas.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = _small_atlas()


# ------------------------------------------------------------------ the atlas and the server

@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The small atlas (tests/e2e/small_atlas.py) built at ``<www>/sub/path``."""
    base = tmp_path_factory.getbasetemp()
    out = tmp_path_factory.mktemp("e2e") / "www" / SUB_PATH
    return SMALL.build_small_atlas(out, base / "small-atlas-work", base / "sitegen-pass-cache")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(site: Path):
    """``python -m http.server`` on 127.0.0.1 serving the folder above the site: the atlas lives
    at ``/sub/path/``, as on GitHub Pages under ``/<repository>/``."""
    www = site.parents[len(Path(SUB_PATH).parts) - 1]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("python -m http.server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/{SUB_PATH}/"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture(params=["file", "http"])
def base(request, site: Path) -> str:
    """The URL of the site's root folder, from file:// or from the local server."""
    if request.param == "file":
        return site.as_uri() + "/"
    return request.getfixturevalue("server")


# ------------------------------------------------------------------ watching a page

class Watch:
    """Everything a page did wrong: console errors, uncaught exceptions, failed requests, HTTP
    errors and requests that left the site (any host but 127.0.0.1, any scheme but file/data)."""

    def __init__(self, page, base: str):
        self.page, self.problems = page, []
        origin = urlsplit(base)
        self.allowed = ("file", "") if origin.scheme == "file" else ("http", origin.netloc)
        page.on("console", lambda m: m.type == "error" and self.problems.append(
            f"console error: {m.text} ({m.location.get('url')})"))
        page.on("pageerror", lambda e: self.problems.append(f"uncaught exception: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"failed request: {r.url} ({r.failure})"))
        page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        page.on("request", self._request)

    def _request(self, request) -> None:
        url = urlsplit(request.url)
        if url.scheme == "data":
            return
        if (url.scheme, url.netloc) != self.allowed:
            self.problems.append(f"request off the site: {request.url}")

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems)


def new_page(browser, base: str, viewport=DESKTOP, **context_args):
    context = browser.new_context(viewport=viewport, **context_args)
    page = context.new_page()
    return page, Watch(page, base)


_LOAD_ALL_IMAGES = """async () => {
  const bad = [];
  for (const img of Array.from(document.images)) {
    img.scrollIntoView({block: "center"});
    const t0 = performance.now();
    while (!(img.complete && img.naturalWidth > 0) && performance.now() - t0 < 10000) {
      await new Promise(r => setTimeout(r, 25));
    }
    if (!(img.naturalWidth > 0)) bad.push(img.getAttribute("src"));
  }
  window.scrollTo(0, 0);
  return {bad: bad, count: document.images.length,
          noAlt: Array.from(document.images).filter(i => !(i.getAttribute("alt") || "").trim())
                      .map(i => i.getAttribute("src"))};
}"""


def check_images(page) -> int:
    """Scroll every <img> into view (lazy tiles load only then); each must decode and have alt text."""
    report = page.evaluate(_LOAD_ALL_IMAGES)
    # Let requests still in flight finish: leaving the page now would abort them (ERR_ABORTED),
    # which says nothing about the atlas.
    page.wait_for_load_state("networkidle")
    assert not report["bad"], f"images that did not decode on {page.url}: {report['bad'][:5]}"
    assert not report["noAlt"], f"images without alt text on {page.url}: {report['noAlt'][:5]}"
    return report["count"]


def check_fits(page, width: int) -> None:
    """At a phone's width nothing may push the page sideways (tables scroll inside their box)."""
    scroll = page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= width + 1, f"{page.url} is {scroll} px wide on a {width} px screen"


def screenshot(page, name: str) -> None:
    """Full-page shots at desktop and phone widths, into test-artifacts/screenshots/."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for label, viewport in (("1280", DESKTOP), ("390", PHONE)):
        page.set_viewport_size(viewport)
        page.wait_for_timeout(50)
        if label == "390":
            check_fits(page, PHONE["width"])
        page.screenshot(path=str(SCREENSHOTS / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size(DESKTOP)


def mode(base: str) -> str:
    return "file" if base.startswith("file:") else "http"


def find_link(page, pattern: str) -> str | None:
    """The href of the first link whose address or text matches ``pattern`` (case-insensitive)."""
    return page.evaluate("""(pattern) => {
      const re = new RegExp(pattern, "i");
      const a = Array.from(document.querySelectorAll("main a[href]"))
        .find(a => re.test(a.getAttribute("href")) || re.test(a.textContent));
      return a ? a.href : null;
    }""", pattern)


# ------------------------------------------------------------------ tests

def test_walk_index_layer_channel_and_views(browser, base):
    """index → a layer → a channel → its stage view → t-SNE → an occlusion page."""
    page, watch = new_page(browser, base)
    tag = mode(base)
    page.goto(base + "index.html")
    assert page.title() == SMALL.TITLE  # the title was escaped in HTML, read back as text
    check_images(page)
    screenshot(page, f"{tag}-1-index")

    page.click('table.layers a:text-is("layer1.0")')
    page.wait_for_url(re.compile(r"/layers/layer1\.0/index\.html$"))
    assert page.locator("a.tile").count() == 16
    assert check_images(page) >= 16  # at least one lazily loaded sprite per channel
    screenshot(page, f"{tag}-2-layer")

    page.click("a.tile#c3")
    page.wait_for_url(re.compile(r"/layers/layer1\.0/3\.html$"))
    assert check_images(page) >= 1
    crumbs = page.locator("nav.crumbs a").all_inner_texts()
    assert crumbs == ["atlas", "layer1.0"]
    screenshot(page, f"{tag}-3-channel")
    watch.check()

    skipped = []
    for step, pattern, where in (("4-stage", r"stage", "channel"), ("5-tsne", r"t-?sne", "index"),
                                 ("6-occlusion", r"occlusion", "index")):
        if where == "index":
            page.goto(base + "index.html")
        href = find_link(page, pattern)
        if href is None:
            skipped.append(f"no link matching /{pattern}/ on the {where} page (view not in this build)")
            continue
        page.goto(href)
        check_images(page)  # (the t-SNE scatter is inline SVG: a page may have no <img>)
        # check_images scrolled every image into view: a sprite window that is a scroll container
        # (overflow: hidden) would have scrolled its sprite and now show halves of two cells.
        shifted = page.evaluate("() => Array.from(document.querySelectorAll('.sp, .tile-strip'))"
                                ".filter(e => e.scrollTop || e.scrollLeft).length")
        assert shifted == 0, f"{shifted} sprite windows scrolled on {page.url}"
        screenshot(page, f"{tag}-{step}")
        watch.check()
    watch.check()
    if skipped:
        pytest.skip("; ".join(skipped))


def test_every_layer_page_loads_cleanly(browser, base, site: Path):
    """Each layer page: all tiles decode (after scrolling), no error, nothing fetched off the site."""
    page, watch = new_page(browser, base)
    layer_pages = sorted(p.relative_to(site).as_posix() for p in (site / "layers").glob("*/index.html"))
    assert len(layer_pages) == len(SMALL.LAYERS)
    for rel in layer_pages:
        page.goto(base + rel)
        assert check_images(page) > 0
    watch.check()


def test_arrow_keys_walk_channels(browser, base):
    page, watch = new_page(browser, base)
    page.goto(base + "layers/layer1.0/3.html")
    page.keyboard.press("ArrowRight")
    page.wait_for_url(re.compile(r"/layer1\.0/4\.html$"))
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(re.compile(r"/layer1\.0/3\.html$"))
    page.goto(base + "layers/layer1.0/0.html")
    page.keyboard.press("ArrowLeft")  # no channel -1: stays
    page.wait_for_timeout(200)
    assert page.url.endswith("/layer1.0/0.html")
    page.goto(base + "layers/layer1.0/15.html")
    page.keyboard.press("ArrowRight")  # the last channel: stays
    page.wait_for_timeout(200)
    assert page.url.endswith("/layer1.0/15.html")
    watch.check()


def test_search_channel_layer_and_class(browser, base):
    page, watch = new_page(browser, base)
    page.goto(base + "layers/layer3.2/index.html")  # search from a page two folders deep
    page.wait_for_load_state("networkidle")  # leaving while visible tiles load would abort them
    page.keyboard.press("/")  # focuses the box
    page.keyboard.type("layer1.0:3")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/layers/layer1\.0/3\.html$"))
    assert page.locator("h1").inner_text().startswith("layer1.0")

    box = page.locator(".search-box")
    box.fill("layer1.")
    results = page.locator("#search-results li")
    texts = results.all_inner_texts()
    assert [t.split("\n")[0] for t in texts[:4]] == ["layer1.0.conv1", "layer1.0", "layer1.1", "layer1.2"]
    box.press("ArrowDown")  # second result: layer1.0
    box.press("Enter")
    page.wait_for_url(re.compile(r"/layers/layer1\.0/index\.html$"))

    box = page.locator(".search-box")
    box.fill("res2b")  # the Caffe-style alias of layer1.1
    assert page.locator("#search-results li").first.inner_text().startswith("layer1.1")

    box.fill("layer1.0:99")  # no such channel: says so, and Enter goes nowhere
    assert "no such channel" in page.locator("#search-results").inner_text()
    box.press("Enter")
    page.wait_for_timeout(200)
    assert page.url.endswith("/layers/layer1.0/index.html")

    box.fill("cat")
    first = page.locator("#search-results li").first
    assert first.inner_text().split("\n")[0] == "cat"
    assert first.inner_text().split("\n")[1] == "class · data summary"
    box.press("Enter")  # this build has no page per class: the class's entry in the index's class list
    page.wait_for_url(re.compile(r"/index\.html#class-cat$"))
    assert page.url == base + "index.html#class-cat"  # the atlas's own front page, from two folders deep
    target = page.locator(".summary :target")
    assert target.inner_text() == "cat" and target.is_visible()

    box = page.locator(".search-box")
    page.set_viewport_size(PHONE)
    box.fill("layer")
    page.screenshot(path=str(SCREENSHOTS / f"{mode(base)}-search-390.png"))
    page.set_viewport_size(DESKTOP)
    page.screenshot(path=str(SCREENSHOTS / f"{mode(base)}-search-1280.png"))
    box.press("Escape")
    assert page.locator("#search-results").is_hidden()
    watch.check()


def test_copy_link(browser, base):
    """The copy-link control is visible and hands over this page's own address."""
    extra = {} if mode(base) == "file" else {"permissions": ["clipboard-read", "clipboard-write"]}
    page, watch = new_page(browser, base, **extra)
    url = base + "layers/layer1.0/5.html"
    page.goto(url)
    button = page.locator(".copy-link")
    assert button.is_visible()
    # Record what reaches the clipboard API; where the browser refuses it (no permission, or not a
    # secure context) site.js offers the address in a prompt instead.
    page.evaluate("""() => {
      window.__copied = [];
      if (navigator.clipboard) {
        const write = navigator.clipboard.writeText.bind(navigator.clipboard);
        navigator.clipboard.writeText = t => { window.__copied.push(t); return write(t); };
      }
    }""")
    prompted = []
    page.on("dialog", lambda d: (prompted.append(d.default_value), d.accept()))
    button.click()
    page.wait_for_function("document.querySelector('.copy-link').textContent === 'copied'"
                           " || window.__copied.length > 0", timeout=5000)
    page.wait_for_timeout(300)  # a refused clipboard write falls back to the prompt
    copied = page.evaluate("window.__copied")
    assert copied == [url] or prompted == [url], (copied, prompted)
    if prompted:
        assert prompted == [url]
    if mode(base) == "http":  # 127.0.0.1 is a secure context and the test granted the permission
        page.wait_for_function("document.querySelector('.copy-link').textContent === 'copied'")
        assert page.evaluate("navigator.clipboard.readText()") == url
    watch.check()


def test_image_pages_have_stable_names_and_walk(browser, base, site: Path):
    """t-SNE scatter → an image page named after its file (not its index) → the next image by key."""
    from sitegen.render.views.image_files import image_url

    if not (site / "tsne/index.html").is_file():
        pytest.skip("no t-SNE view in this build")
    page, watch = new_page(browser, base)
    page.goto(base + "tsne/index.html")
    first = page.locator("svg.tsne-scatter a[data-j]").first
    rel = first.get_attribute("data-name")
    href = first.get_attribute("href")
    assert href == f"../{image_url(rel)}"
    assert re.fullmatch(r"\.\./images/[A-Za-z0-9._-]+-[0-9a-f]{8}\.html", href), href
    page.goto(base + image_url(rel))
    assert page.locator("h1").inner_text() == rel
    assert check_images(page) >= 1
    screenshot(page, f"{mode(base)}-7-image")
    pages = sorted((site / "images").glob("*.html"))
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+-[0-9a-f]{8}\.html", p.name) for p in pages)
    nxt = page.locator('a[rel="next"]')
    if nxt.count():
        want = nxt.evaluate("a => a.href")
        page.keyboard.press("ArrowRight")
        page.wait_for_url(want)
        assert re.search(r"/images/[A-Za-z0-9._-]+-[0-9a-f]{8}\.html$", page.url), page.url
        check_images(page)
    watch.check()


def test_sanity_page_and_lines_beside_the_method_switch(browser, base):
    """A channel page carries one sanity line per method beside the switch, linking to the sanity
    page, whose charts (static SVG through <img>) are visible and inside the screen at 390 px and
    1280 px, from file:// and over HTTP, with no console error."""
    page, watch = new_page(browser, base)
    tag = mode(base)
    page.goto(base + "layers/layer1.0/3.html")
    lines = page.locator("#attribution .sanity-lines li")
    assert lines.count() == len(SMALL.small_settings()["attribution"]["methods"])
    assert "weights" in lines.first.inner_text() and "images" in lines.first.inner_text()
    page.locator("#attribution .sanity-lines li a").first.click()
    page.wait_for_url(re.compile(r"/sanity\.html#guided-layer1\.0$"))
    assert page.locator("tr#guided-layer1\\.0").count() == 1
    assert page.title().startswith("Can I trust these pictures?")
    assert check_images(page) >= 1
    for label, viewport in (("1280", DESKTOP), ("390", PHONE)):
        page.set_viewport_size(viewport)
        page.wait_for_timeout(50)
        box = page.evaluate("""() => { const img = document.querySelector('.sanity-chart img');
            img.scrollIntoView(); const r = img.getBoundingClientRect();
            return {w: r.width, h: r.height, left: r.left, right: r.right, natural: img.naturalWidth}; }""")
        assert box["natural"] > 0 and box["w"] > 200 and box["h"] > 90, (label, box)
        assert box["left"] >= 0 and box["right"] <= viewport["width"] + 1, (label, box)
        if label == "390":
            check_fits(page, PHONE["width"])
    screenshot(page, f"{tag}-7-sanity")
    page.goto(base + "layers/layer1.0/index.html")
    assert page.locator(".sanity-lines li").count() >= 1
    watch.check()


# ------------------------------------------------------------------ a comparison build

@pytest.fixture(scope="session")
def compare_site(tmp_path_factory) -> Path:
    """The small atlas compared with a noisy copy of its model (every new-model pass from the cache)."""
    base = tmp_path_factory.getbasetemp()
    out = tmp_path_factory.mktemp("e2e-compare") / "atlas"
    return SMALL.build_small_atlas(out, base / "small-atlas-work", base / "sitegen-pass-cache", compare=True)


def test_comparison_pages_load_cleanly(browser, compare_site: Path):
    """index → changes.html → a layer sorted by change → a channel with the old top-k row → the layer
    page → an image whose prediction changed → both t-SNE maps; from file:// only (the pages use the
    same relative links as every other page, which the walk above checks over HTTP)."""
    base = compare_site.as_uri() + "/"
    page, watch = new_page(browser, base)
    page.goto(base + "index.html")
    page.click('a.view-link[href$="changes.html"]')
    page.wait_for_url(re.compile(r"/changes\.html$"))
    check_images(page)
    assert page.locator("table.changes tbody tr").count() == len(SMALL.LAYERS)
    screenshot(page, "compare-1-changes")

    page.locator("table.changes tbody tr").first.locator('a:text-is("sorted by change")').click()
    page.wait_for_url(re.compile(r"/layers/[^/]+/by-change\.html$"))
    tiles = page.locator("a.tile").count()
    assert tiles > 0 and check_images(page) == 2 * tiles  # the new and the old strip of every tile
    screenshot(page, "compare-2-by-change")

    page.locator("a.tile").first.click()
    page.wait_for_url(re.compile(r"/layers/[^/]+/\d+\.html$"))
    section = page.locator("section#compare")
    assert section.is_visible() and section.locator(".patch img").count() >= 1
    check_images(page)
    screenshot(page, "compare-3-channel")

    page.click('nav.crumbs a:nth-of-type(2)')  # the channel's layer
    page.wait_for_url(re.compile(r"/layers/[^/]+/index\.html(#c\d+)?$"))
    assert page.locator("section#compare").is_visible()
    check_images(page)
    watch.check()

    page.goto(base + "changes.html")
    changed = page.locator("a.changed-image")
    if changed.count():
        changed.first.click()
        page.wait_for_url(re.compile(r"/images/[^/]+\.html$"))
        assert "Prediction changed" in page.locator("main").inner_text()
        check_images(page)
        screenshot(page, "compare-4-image")
    page.goto(base + "changes-tsne.html")
    assert page.locator("svg.tsne-scatter").count() == 2
    screenshot(page, "compare-5-codes")
    watch.check()
    if not changed.count():
        pytest.skip("the noisy copy changed no prediction: the image page was not visited")
