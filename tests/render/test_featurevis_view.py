"""Feature-visualisation and correspondence views on a real ResNet-20 site: images written and equal
to the pass's, shown on tiles and channel pages, class and stage-boundary pages linked and resolving."""
from __future__ import annotations

import copy
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlparse

import numpy as np
import pytest
from PIL import Image

from sitegen import progress
from sitegen.build import prepare
from sitegen.config import from_dict
from sitegen.passes.correspondence import CorrespondenceConfig, CorrespondencePass
from sitegen.passes.featurevis import FeatureVisPass
from sitegen.passes.topk import TopKPass
from sitegen.render.pages import RenderOptions
from sitegen.render.site import render

LAYERS = ["layer1.2", "layer2.0"]  # the last block of stage 1 and the first of stage 2: one boundary
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def built(resnet20_path, cifar_subset, paths, tmp_path_factory):
    progress.set_quiet(True)
    cfg = from_dict({"layers": LAYERS, "model": {"arch": f"{paths['cifar_arch']}:resnet20"}, "topk": {"k": 5},
                     "featurevis": {"steps": 4}})
    ctx = prepare(resnet20_path, cifar_subset(5), cfg, None)
    results = {"topk": TopKPass(cfg.topk).run(ctx)}
    ctx.results = results
    results["featurevis"] = FeatureVisPass(cfg.featurevis).run(ctx)
    results["correspondence"] = CorrespondencePass(CorrespondenceConfig(topk=cfg.topk)).run(ctx)
    progress.set_quiet(False)
    return ctx, results


def render_site(ctx, results, out: Path) -> dict:
    progress.set_quiet(True)
    try:
        return render(ctx, results, out, RenderOptions(title="test", patch_size=48))
    finally:
        progress.set_quiet(False)


@pytest.fixture(scope="module")
def site(built, tmp_path_factory):
    ctx, results = built
    out = tmp_path_factory.mktemp("fv-site")
    return ctx, results, out, render_site(ctx, results, out)


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        for key in ("href", "src"):
            if a.get(key):
                self.urls.append(a[key])


def parse(page: Path) -> Links:
    p = Links()
    p.feed(page.read_text(encoding="utf-8"))
    return p


def assert_local_links_resolve(out: Path, page: Path) -> None:
    for url in parse(page).urls:
        if urlparse(url).scheme in ("http", "https", "data", "mailto"):
            continue
        target = urljoin(page.relative_to(out).as_posix(), url.split("#")[0])
        if target:
            assert (out / target).is_file(), f"{page.relative_to(out)} links to missing {url}"


def test_images_written_equal_the_pass(site):
    ctx, results, out, _ = site
    a = results["featurevis"].arrays
    for li, name in enumerate(LAYERS):
        for c in range(ctx.layer(name).channels):
            img = np.asarray(Image.open(out / "img" / name / f"{c}.fv.png").convert("RGB"))
            np.testing.assert_array_equal(img, a[f"L{li}.images"][c])
    for k in range(10):
        img = np.asarray(Image.open(out / "img" / "featurevis-classes" / f"class-{k}.png").convert("RGB"))
        np.testing.assert_array_equal(img, a["classes.images"][k])


def test_tiles_and_channel_pages_show_the_image(site):
    ctx, results, out, _ = site
    a = results["featurevis"].arrays
    for li, name in enumerate(LAYERS):
        tiles = [t for tag, t in parse(out / "layers" / name / "index.html").tags if t.get("class") == "tile-fv"]
        assert [t["src"] for t in tiles] == [f"../../img/{name}/{c}.fv.png" for c in range(ctx.layer(name).channels)]
        for c in (0, ctx.layer(name).channels - 1):
            page = out / "layers" / name / f"{c}.html"
            html = page.read_text(encoding="utf-8")
            srcs = [t["src"] for tag, t in parse(page).tags if t.get("class") == "fv-image"]
            assert srcs == [f"../../img/{name}/{c}.fv.png"]
            assert f"mean activation {float(a[f'L{li}.objective'][c]):.4g}" in html
            assert_local_links_resolve(out, page)


def test_channel_page_lists_matches_in_the_previous_layer(site):
    ctx, results, out, _ = site
    r = results["correspondence"]
    for c in range(0, 32, 7):
        page = out / "layers" / "layer2.0" / f"{c}.html"
        html = page.read_text(encoding="utf-8")
        links = re.findall(r'href="\.\./\.\./layers/layer1\.2/(\d+)\.html">layer1\.2 : \d+</a> — overlap ([0-9.]+)', html)
        want = [(int(m), float(o)) for m, o in zip(r.arrays["L1.match"][c], r.arrays["L1.overlap"][c]) if m >= 0]
        assert [(int(m), float(o)) for m, o in links] == [(m, pytest.approx(o, abs=0.005)) for m, o in want]
        assert "Jaccard index" in html and "does not say that one feeds the other" in html


def test_boundary_table_links_the_carried_channel(site):
    ctx, results, out, _ = site
    page = out / "correspondence.html"
    html = page.read_text(encoding="utf-8")
    assert "layer1.2 (res2c) → layer2.0 (res3a)" in html and "c + 8" in html
    rows = re.findall(r"<tr>\s*<td><a href=\"layers/layer1\.2/(\d+)\.html\">\d+</a></td>(.*?)</tr>", html, re.S)
    assert len(rows) == 16
    for c, rest in rows:
        carried = re.findall(r'href="layers/layer2\.0/(\d+)\.html"', rest)
        assert str(int(c) + 8) == carried[-1]
    assert_local_links_resolve(out, page)


def test_class_page_names_and_nav(site):
    ctx, results, out, _ = site
    page = out / "classes" / "index.html"
    html = page.read_text(encoding="utf-8")
    names = re.findall(r"<figcaption><b>([^<]+)</b>", html)
    assert names == CLASSES  # the image folders' names, one per logit
    assert_local_links_resolve(out, page)
    index = parse(out / "index.html").urls
    for url in ("featurevis.html", "classes/index.html", "correspondence.html"):
        assert url in index
    assert_local_links_resolve(out, out / "featurevis.html")


def test_never_excited_channels_are_reported_and_linked(built, tmp_path):
    ctx, results = built
    results = dict(results)
    fv = copy.deepcopy(results["featurevis"])
    fv.arrays["L1.objective"][[3, 5]] = 0.0  # as if gradient ascent had left them at 0
    results["featurevis"] = fv
    atlas = render_site(ctx, results, tmp_path)
    never = [int(c) for c in np.nonzero(fv.arrays["L1.objective"] <= 0)[0]]  # 3, 5 and any truly stuck
    dead = {c for c in never if atlas["layers"][1]["channels"][c]["stats"]["max"] <= 0}
    html = (tmp_path / "featurevis.html").read_text(encoding="utf-8")
    entry = re.search(r'<a href="layers/layer2\.0/index\.html">layer2\.0</a>: (\d+) of 32 \((\d+) also dead on the data\)(.*?)</li>',
                      html, re.S)
    assert entry and int(entry.group(1)) == len(never) and int(entry.group(2)) == len(dead)
    assert re.findall(r'layers/layer2\.0/(\d+)\.html', entry.group(3)) == [str(c) for c in never]
    assert entry.group(3).count("†") == len(dead)
    page = (tmp_path / "layers" / "layer2.0" / "3.html").read_text(encoding="utf-8")
    assert "Never excited" in page and "featurevis.html#never-excited" in page
    assert ("dead-channel report" in page) == (3 in dead)
    live = next(c for c in range(32) if c not in never)
    assert "Never excited" not in (tmp_path / "layers" / "layer2.0" / f"{live}.html").read_text(encoding="utf-8")
    if any(ch["stats"]["max"] <= 0 for l in atlas["layers"] for ch in l["channels"]):
        assert "featurevis.html#never-excited" in (tmp_path / "index.html").read_text(encoding="utf-8")


def test_without_the_pass_no_image_and_no_broken_link(built, tmp_path):
    ctx, results = built
    results = {k: v for k, v in results.items() if k != "featurevis"}
    render_site(ctx, results, tmp_path)
    layer = tmp_path / "layers" / "layer2.0" / "index.html"
    assert "tile-fv" not in layer.read_text(encoding="utf-8")
    assert not (tmp_path / "featurevis.html").exists()
    assert "featurevis.html" not in parse(tmp_path / "index.html").urls
    for page in (layer, tmp_path / "layers" / "layer2.0" / "0.html", tmp_path / "correspondence.html"):
        assert_local_links_resolve(tmp_path, page)


@pytest.mark.parametrize("meta, said, unsaid", [
    ({"lr": 0.2, "lr_end": 0.01, "precision": "bf16", "stop_window": 8, "stop_gain": 0.01},
     ["(learning rate 0.2 falling linearly to 0.01)", "run in bfloat16", "last 8 steps", "less than 0.01 of"],
     []),
    ({"lr": 0.05, "lr_end": 0.05, "precision": "fp32", "stop_window": 0, "stop_gain": 0.0},
     ["(learning rate 0.05)"], ["falling linearly", "bfloat16", "stops early"]),
])
def test_the_page_states_the_schedule_the_precision_and_the_stopping(built, tmp_path, meta, said, unsaid):
    """What the pass recorded in its meta about how the images were made is on the summary page."""
    ctx, results = built
    fv = copy.deepcopy(results["featurevis"])
    fv.meta.update(meta)
    render_site(ctx, {**results, "featurevis": fv}, tmp_path)
    html = " ".join((tmp_path / "featurevis.html").read_text(encoding="utf-8").split())
    for text in said:
        assert text in html, text
    for text in unsaid:
        assert text not in html, text
