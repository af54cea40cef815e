"""Safe HTML: an atlas built from hostile names — image files, class folders, the checkpoint's
file name, the model's own layer names — shows them as text everywhere, in pages, attributes, URLs
and JavaScript data; every page carries a Content-Security-Policy; and in headless Chromium no
injected code runs.

One atlas is built (through the CLI) for the whole module, with every view switched on at its
cheapest settings, so every template is exercised.  The browser part uses /usr/bin/chromium with
--dump-dom (no driver needed) and is skipped without it.  Its controls prove the check can fail:
the same payload, unescaped, does run in a page without the policy.
"""
from __future__ import annotations

import html
import json
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch




import hardening_corpus as corpus  # noqa: E402  (tests/ is on the import path: pyproject's pythonpath)
CANARY = corpus.CANARY
CHROMIUM = Path(os.environ.get("SITEGEN_CHROMIUM", "/usr/bin/chromium"))

# Every payload would set document.title to CANARY if it ran.  Names cannot hold "/" (files, folders)
# or "." (module names), so none does.
XSS_FILE = corpus.XSS_FILE                                   # image file names
XSS_CLASS = corpus.XSS_CLASS                                 # a class folder
XSS_QUOTE = corpus.XSS_QUOTE                                 # breaks out of a '-quoted attribute
XSS_LAYER = "<svg onload=document['title']='PWNED'>"         # a module name in the model
XSS_CKPT = "\"><img src=x onerror=document['title']='PWNED'>"  # the checkpoint file (and default title)
HOSTILE = [XSS_FILE, XSS_CLASS, XSS_QUOTE, XSS_LAYER, XSS_CKPT]

ARCH = f'''
import torch
import torch.nn as nn
import torch.nn.functional as F

class Hostile(nn.Module):
    """conv -> relu -> conv -> relu -> linear, the first conv registered under a hostile name."""
    def __init__(self, num_classes=3):
        super().__init__()
        self.add_module({XSS_LAYER!r}, nn.Conv2d(3, 4, 3, padding=1))
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, num_classes)

    def forward(self, x):
        x = F.relu(getattr(self, {XSS_LAYER!r})(x))
        x = F.relu(self.conv2(F.max_pool2d(x, 2)))
        return self.fc(x.mean((2, 3)))

def hostile(num_classes=3):
    torch.manual_seed(0)
    return Hostile(num_classes)
'''

# Every optional view on, as cheap as its config allows (only keys this Config has are set).
CHEAP = {"featurevis": {"enabled": True, "steps": 2, "batch_size": 8, "classes": True},
         "attribution": {"enabled": True}, "sanity": {"enabled": True}, "occlusion": {"enabled": True},
         "tsne": {"enabled": True, "max_points": 10, "pca_dims": 2, "perplexity": 2.0},
         "kernels": {"enabled": True}, "activations": {"enabled": True},
         "samples": {"per_class": 1, "max_images": 3}, "topk": {"k": 3}}


def _cheap_tables() -> dict:
    from sitegen import config

    defaults = config.Config()
    tables = {}
    for section, keys in CHEAP.items():
        have = getattr(defaults, section, None)
        if have is not None:
            tables[section] = {k: v for k, v in keys.items() if hasattr(have, k)}
    return tables


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    (root / "net.py").write_text(ARCH)
    arch = f"{root / 'net.py'}:hostile"
    from sitegen.model_loading import build_architecture

    ckpt = root / f"{XSS_CKPT}.pt"
    torch.save(build_architecture(arch, None).state_dict(), ckpt)
    images = root / "images"
    for ci, cls in enumerate([XSS_CLASS, "plain", corpus.NON_UTF8]):
        corpus.write_good_images(images / cls, 4, seed=ci)
        for j, name in enumerate([XSS_FILE, XSS_QUOTE]):
            (images / cls / f"{name}.png").write_bytes(corpus.png_bytes(seed=10 * ci + j))
    (images / "plain" / f"{XSS_FILE}.txt").write_text("a skipped file with a hostile name")
    cfg = corpus.fast_config(root / "cfg.toml", **_cheap_tables())
    out = root / "site"
    from sitegen.cli import main

    try:
        main(["-q", "build", str(ckpt), "--images", str(images), "--arch", arch, "-o", str(out),
              "--config", str(cfg), "--no-cache"])
    except SystemExit as e:
        pytest.fail(f"the build of the hostile atlas failed with exit code {e.code}")
    return out


class Page(HTMLParser):
    """Tags, attributes, script elements and text of one page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.inline_scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script" and not dict(attrs).get("src")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.inline_scripts.append(data)
        self.text.append(data)


def _parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if p.name != "harness.html")


def test_every_page_has_a_strict_content_security_policy(site):
    for path in _pages(site):
        page = _parse(path)
        csp = [a.get("content", "") for t, a in page.tags
               if t == "meta" and (a.get("http-equiv") or "").lower() == "content-security-policy"]
        assert len(csp) == 1, f"{path.relative_to(site)}: no CSP meta tag"
        rules = {r.split()[0]: r.split()[1:] for r in csp[0].split(";") if r.strip()}
        assert rules["default-src"] == ["'self'"]
        script = rules.get("script-src", rules["default-src"])
        assert "'unsafe-inline'" not in script and "'unsafe-eval'" not in script and "*" not in script
        for sources in rules.values():  # no remote resource of any kind
            assert not any(s.startswith(("http:", "https:", "ws:", "wss:", "*")) for s in sources), csp[0]
        assert page.inline_scripts == [], f"{path.relative_to(site)} has an inline script"


def test_no_markup_from_names_reaches_a_page(site):
    for path in _pages(site):
        page = _parse(path)
        rel = path.relative_to(site)
        for tag, attrs in page.tags:
            assert tag not in ("iframe", "object", "embed", "base", "form"), f"{rel}: injected <{tag}>"
            assert not any(name.startswith("on") for name in attrs), f"{rel}: <{tag} {attrs}>"
            assert tag != "img" or attrs.get("src") != "x", f"{rel}: injected <img src=x>"
        raw = path.read_text(encoding="utf-8")
        for payload in ("<img src=x", "<svg onload", "<script>document", "<b>x", "' onmouseover='"):
            assert payload not in raw, f"{rel} holds {payload!r} unescaped"


def test_hostile_names_are_shown_as_text(site):
    """Escaped, not dropped: each name is readable on the pages that show it."""
    text = {p.relative_to(site).as_posix(): html.unescape("".join(_parse(p).text)) for p in _pages(site)}
    everything = "\n".join(text.values())
    for name in (XSS_FILE + ".png", XSS_QUOTE + ".png", XSS_LAYER, XSS_CKPT + ".pt", "caf\ufffd-\ufffd"):
        assert name in everything, f"{name!r} is shown on no page"
    assert XSS_CLASS in text["index.html"] and f"plain/{XSS_FILE}.txt" in text["index.html"]


SAFE_URL = re.compile(r"^[A-Za-z0-9._~/#%?=&+-]*$")


def test_urls_are_built_from_slugs(site):
    """Every link and source is relative and uses only URL-safe characters: names never reach a URL
    raw (no quotes, spaces, angle brackets, javascript:)."""
    for path in _pages(site):
        for tag, attrs in _parse(path).tags:
            for key in ("href", "src", "action", "poster", "srcset"):
                url = attrs.get(key)
                if url is None:
                    continue
                if url.startswith("data:") and tag in ("img", "link"):
                    continue  # inline images / an empty icon are data, not script
                assert not urlsplit(url).scheme and not url.startswith("//"), f"{path}: {key}={url!r}"
                assert SAFE_URL.match(url), f"{path.relative_to(site)}: {key}={url!r}"


def test_json_and_javascript_data_escape_markup(site):
    atlas_text = (site / "data" / "atlas.json").read_text(encoding="utf-8")
    assert not set("<>&") & set(atlas_text)
    atlas = json.loads(atlas_text)
    assert XSS_CLASS in atlas["data"]["classes"]
    assert XSS_LAYER in [l["name"] for l in atlas["layers"]]
    assert atlas["model"]["checkpoint"] == XSS_CKPT + ".pt"
    for js in sorted((site / "data").glob("*.js")):
        text = js.read_text(encoding="utf-8")
        assert not set("<>") & set(text), f"{js.name} holds < or >"
        m = re.fullmatch(r"window\.[A-Za-z_]+ = (.*);\n", text, re.S)
        assert m, f"{js.name} is not one window.NAME = JSON; assignment"
        json.loads(m.group(1))
    search = (site / "data" / "search-index.js").read_text(encoding="utf-8")
    assert json.dumps(XSS_CLASS).replace("<", "\\u003c").replace(">", "\\u003e") in search


def test_svg_charts_hold_names_as_text(site):
    """The sanity charts (SVG files shown through <img>) write layer names as escaped text: they
    parse as XML, with no script, no event handler and no reference to another file."""
    import xml.etree.ElementTree as ET

    charts = sorted(site.rglob("*.svg"))
    assert charts, "the build drew no SVG chart"
    shown = ""
    for path in charts:
        root = ET.parse(path).getroot()
        for el in root.iter():
            tag = el.tag.rsplit("}", 1)[-1]
            assert tag not in ("script", "foreignObject", "image", "a", "use"), f"{path.name}: <{tag}>"
            assert not any(k.rsplit("}", 1)[-1].startswith("on") or "href" in k for k in el.attrib), f"{path.name}: {el.attrib}"
            shown += "".join(el.itertext()) if tag == "text" else ""
    assert XSS_LAYER in shown


# ----------------------------------------------------------------------------- in Chromium

def _dump_dom(page: Path, profile: Path) -> str:
    """The page's DOM after load and 3 s of virtual time (timers, deferred scripts), from Chromium."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom", page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    return done.stdout


def _title(dom: str) -> str:
    m = re.search(r"<title>(.*?)</title>", dom, re.S)
    return html.unescape(m.group(1)) if m else ""


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    if not CHROMIUM.is_file():
        if os.environ.get("SITEGEN_REQUIRE_BROWSER"):  # set by .ci/run
            pytest.fail(f"SITEGEN_REQUIRE_BROWSER is set but there is no Chromium at {CHROMIUM}")
        pytest.skip(f"no Chromium at {CHROMIUM}")
    profile = tmp_path_factory.mktemp("chromium-profile")
    return lambda page: _dump_dom(page, profile)


def _csp_of(site: Path) -> str:
    return next(a["content"] for t, a in _parse(site / "index.html").tags
                if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")


def test_controls_prove_the_browser_check_can_fail(site, chromium, tmp_path):
    """The payloads do run when pasted raw into a page without the policy, and the policy alone
    (with the site's own CSP) still stops them: so a clean title below means something."""
    body = "".join(f"<p>{p}</p>" for p in HOSTILE)
    (tmp_path / "raw.html").write_text(f"<!doctype html><title>ok</title><body>{body}</body>")
    assert _title(chromium(tmp_path / "raw.html")) == CANARY
    csp = html.escape(_csp_of(site))
    (tmp_path / "csp.html").write_text(f'<!doctype html><meta http-equiv="Content-Security-Policy" '
                                       f'content="{csp}"><title>ok</title><body>{body}</body>')
    assert _title(chromium(tmp_path / "csp.html")) == "ok"


def test_no_injected_code_runs_in_chromium(site, chromium):
    atlas = json.loads((site / "data" / "atlas.json").read_text())
    from sitegen.render.pages import layer_url

    hostile_layer = layer_url(XSS_LAYER)
    pages = {"index.html", hostile_layer, hostile_layer.replace("index.html", "0.html")}
    pages |= _one_page_per_view(site)
    assert (site / hostile_layer).is_file() and atlas["layers"][0]["name"] == XSS_LAYER
    for rel in sorted(pages):
        dom = chromium(site / rel)
        assert _title(dom) != CANARY, f"injected code ran on {rel}"  # (the name itself shows in titles)
        dumped = Page()
        dumped.feed(dom)
        for tag, attrs in dumped.tags:
            assert not any(n.startswith("on") for n in attrs), f"{rel}: <{tag} {attrs}> in the live DOM"
            assert tag != "iframe" and not (tag == "img" and attrs.get("src") == "x"), f"{rel}: <{tag}> in the live DOM"


def _one_page_per_view(site: Path) -> set[str]:
    """Per top-level folder (a view: images/, tsne/, classes/...), the first page that shows one of
    the hostile names (escaped), else its index: one Chromium start per page is ~2 s."""
    chosen = set()
    for folder in sorted(p for p in site.iterdir() if p.is_dir()):
        pages = sorted(folder.glob("*.html"))
        hostile = [p for p in pages if any(m in p.read_text(encoding="utf-8")
                                           for m in ("&lt;img src=x", "&lt;svg onload", "&#39; onmouseover"))]
        pick = hostile[:1] or [p for p in pages if p.name == "index.html"] or pages[:1]
        chosen |= {p.relative_to(site).as_posix() for p in pick}
    return chosen


HARNESS_JS = """
// Type each hostile name into the header's search box, as a user would, and record the results.
(function () {
  var box = document.querySelector(".search-box");
  var seen = [];
  window.HOSTILE.forEach(function (q) {
    box.value = q;
    box.dispatchEvent(new Event("input"));
    var items = document.querySelectorAll("#search-results li");
    for (var i = 0; i < items.length; i++) seen.push(items[i].textContent);
  });
  document.body.setAttribute("data-results", JSON.stringify(seen));
  document.body.setAttribute("data-harness", "done");
})();
"""


def test_search_box_shows_hostile_names_as_text(site, chromium):
    """The search results are built by script from data/search-index.js: the JavaScript-data path."""
    (site / "harness.js").write_text(HARNESS_JS)
    (site / "harness-data.js").write_text(f"window.HOSTILE = {json.dumps([XSS_CLASS, XSS_LAYER, 'caf'])};")
    index = (site / "index.html").read_text(encoding="utf-8")
    harness = index.replace("</body>", '<script src="harness-data.js"></script>'
                                       '<script src="harness.js" defer></script></body>')
    (site / "harness.html").write_text(harness, encoding="utf-8")
    try:
        dom = chromium(site / "harness.html")
    finally:
        for name in ("harness.js", "harness-data.js", "harness.html"):
            (site / name).unlink()
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-harness="done"' in body, "the harness (a 'self' script) did not run"
    results = json.loads(html.unescape(re.search(r'data-results="([^"]*)"', body).group(1)))
    assert any(XSS_CLASS in r for r in results) and any(XSS_LAYER in r for r in results), results
    assert _title(dom) != CANARY
    dumped = Page()
    dumped.feed(dom)
    assert not any(n.startswith("on") for _, attrs in dumped.tags for n in attrs)
    assert not any(t == "img" and a.get("src") == "x" for t, a in dumped.tags)
