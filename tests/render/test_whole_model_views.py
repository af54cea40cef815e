"""The whole-model views rendered into a site: pages exist and link up, pictures hold what the
results say, user strings stay text.  Built from the passes' results directly (no other views)."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from sitegen.config import from_dict
from sitegen.context import BuildContext
from sitegen.images import discover as discover_images
from sitegen.images import load_pixels
from sitegen.layers import discover as discover_layers
from sitegen.model_loading import LoadedModel
from sitegen.passes.activations import ActivationsPass
from sitegen.passes.kernels import KernelsPass
from sitegen.passes.occlusion import OcclusionPass
from sitegen.passes.topk import TopKPass
from sitegen.passes.tsne import TsnePass
from sitegen.render.colormap import overlay, upscale, viridis
from sitegen.render.pages import RenderOptions
from sitegen.render.site import render
from sitegen.render.views.image_files import activations_url, display_factor, image_url, picture_url
from sitegen.render.views.activations import map_grid

CLASSES = ["c0", "c<1>", 'c"2']  # folder names a page must show as text


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


class Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        for key in ("href", "src"):
            if a.get(key):
                self.urls.append(a[key])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = root / "imgs" / CLASSES[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
    net = Net()
    cfg = from_dict({"topk": {"k": 3}, "samples": {"per_class": 2},
                     "tsne": {"iterations": 250, "grid_max": 16}, "kernels": {"block": 4}})
    layers = discover_layers(net, (3, 16, 16))
    ctx = BuildContext(config=cfg, model=LoadedModel(net, "0" * 64, "t", root / "m.pt", 3),
                       images=discover_images(root / "imgs"), layers=layers, all_layers=layers,
                       input_size=(16, 16), device=torch.device("cpu"), workers=0)
    results = {"topk": TopKPass(cfg.topk).run(ctx), "occlusion": OcclusionPass(cfg.occlusion, cfg.samples).run(ctx),
               "tsne": TsnePass(cfg.tsne).run(ctx), "kernels": KernelsPass(cfg.kernels).run(ctx),
               "activations": ActivationsPass(cfg.activations, cfg.samples).run(ctx)}
    out = root / "atlas"
    render(ctx, results, out, RenderOptions(title="views", patch_size=16))
    return out, ctx, results


def parse(path: Path) -> Refs:
    refs = Refs()
    refs.feed(path.read_text(encoding="utf-8"))
    return refs


def test_pages_exist_and_every_local_reference_resolves(site):
    out, ctx, results = site
    occ_ids = results["occlusion"].arrays["images"].tolist()
    tsne_ids = results["tsne"].arrays["images"].tolist()
    assert len(occ_ids) == 6 and len(tsne_ids) == 24
    expected = ["occlusion/index.html", "tsne/index.html", "tsne/grid.html", "kernels/index.html",
                "kernels/conv1/0.html", "kernels/conv2/0.html", "kernels/conv2/1.html", "activations/index.html"]
    rel = lambda n: ctx.images.records[n].rel  # noqa: E731
    expected += [activations_url(rel(n)) for n in occ_ids] + [image_url(rel(n)) for n in set(occ_ids + tsne_ids)]
    assert all(re.fullmatch(r"images/[A-Za-z0-9._-]+\.html", image_url(rel(n))) for n in tsne_ids)
    assert len(list(out.glob("images/*.html"))) == len(set(occ_ids + tsne_ids))
    for page in expected:
        assert (out / page).is_file(), page
    index = parse(out / "index.html")
    for link in ("occlusion/index.html", "tsne/index.html", "tsne/grid.html", "kernels/index.html",
                 "activations/index.html"):
        assert link in index.urls
    for page in expected:
        path = out / page
        for url in parse(path).urls:
            parts = urlsplit(url)
            if parts.scheme == "data":  # an inline placeholder (e.g. the empty favicon): no request
                continue
            assert not parts.scheme and not parts.netloc, (page, url)
            if parts.path:
                assert (path.parent / unquote(parts.path)).resolve().is_file(), (page, url)


def test_pages_run_no_inline_code_and_escape_names(site):
    out, _, _ = site
    for page in list(out.glob("tsne/*.html")) + list(out.glob("images/*.html")) + [out / "occlusion/index.html"]:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"\son[a-z]+\s*=", text), page
        for tag, attrs in parse(page).tags:
            if tag == "script":
                assert attrs.get("src"), page  # scripts only from files (the CSP forbids inline ones)
        assert "<1>" not in text and 'c"2' not in text, page  # Jinja escapes < > and " everywhere
    scatter = (out / "tsne/index.html").read_text(encoding="utf-8")
    assert "c&lt;1&gt;" in scatter and "assets/tsne.js" in scatter
    assert (out / "assets/tsne.js").is_file()


def test_scatter_has_one_linked_point_per_image(site):
    out, ctx, results = site
    refs = parse(out / "tsne/index.html")
    points = [a for tag, a in refs.tags if tag == "a" and "data-j" in a]
    ids = results["tsne"].arrays["images"].tolist()
    assert [int(a["data-j"]) for a in points] == list(range(len(ids)))
    assert [a["href"] for a in points] == [f"../{image_url(ctx.images.records[n].rel)}" for n in ids]
    assert sum(1 for tag, _ in refs.tags if tag == "circle") == len(ids)
    grid = parse(out / "tsne/grid.html")
    assert sum(1 for tag, a in grid.tags if tag == "a" and a.get("href", "").startswith("../images/")) == 16


def test_probability_picture_is_the_map_over_the_image(site):
    out, ctx, results = site
    r = results["occlusion"]
    s, n = 1, int(r.arrays["images"][1])
    factor = display_factor(ctx.input_size)
    drawn = np.asarray(Image.open(out / f"img/occlusion/{n}-prob.png").convert("RGB"))
    pixels = load_pixels(ctx.images, n, ctx.config.data)
    assert drawn.shape == (16 * factor, 16 * factor, 3)
    stride = r.meta["stride"]
    for (y, x) in [(0, 0), (5, 9), (15, 15)]:
        heat = viridis(r.arrays["prob"][s][y // stride, x // stride]).astype(float)
        want = np.round(pixels[y, x] * 0.4 + heat * 0.6)
        np.testing.assert_array_equal(drawn[y * factor, x * factor], want)
    np.testing.assert_array_equal(drawn, upscale(overlay(pixels, viridis(r.arrays["prob"][s]), stride), factor))


def test_activation_grid_marks_never_active_maps(site):
    out, ctx, results = site
    a = results["activations"].arrays
    n = int(a["images"][0])
    for li in range(2):
        picture = np.asarray(Image.open(out / f"img/activations/{n}/L{li}.png").convert("RGB"))
        never = a[f"L{li}.max"][0] <= 0
        # lossless: the file holds the drawn grid pixel for pixel (PNG here, WebP lossless by default)
        np.testing.assert_array_equal(picture, map_grid(a[f"L{li}.maps"][0], float(a[f"L{li}.max"][0].max()), never)[0])
        page = (out / activations_url(ctx.images.records[n].rel)).read_text(encoding="utf-8")
        if never.any():
            assert (picture == [200, 30, 30]).all(-1).any()
            assert "never active" in page
        else:
            assert not (picture == [200, 30, 30]).all(-1).any()


def test_image_pages_link_each_other_by_name_and_keep_the_image(site):
    """Prev/next, the activation page and the image page all use the stable names (no index)."""
    out, ctx, results = site
    ids = sorted(set(results["occlusion"].arrays["images"].tolist()) | set(results["tsne"].arrays["images"].tolist()))
    urls = [image_url(ctx.images.records[n].rel) for n in ids]
    for pos, (n, url) in enumerate(zip(ids, urls)):
        refs = parse(out / url)
        rels = {a.get("rel"): a["href"] for tag, a in refs.tags if tag == "a" and a.get("rel") in ("prev", "next")}
        if pos > 0:
            assert rels["prev"] == f"../{urls[pos - 1]}"
        if pos + 1 < len(ids):
            assert rels["next"] == f"../{urls[pos + 1]}"
        assert f"../{picture_url(ctx.images.records[n].rel)}" in refs.urls
    for n in results["activations"].arrays["images"].tolist():
        page = parse(out / activations_url(ctx.images.records[n].rel))
        assert f"../{image_url(ctx.images.records[n].rel)}" in page.urls


def test_activation_pictures_follow_the_image_format_losslessly(site, tmp_path):
    """With ``site.image_format = "webp"`` (the default) the pictures are WebP lossless: the same
    pixels as the drawn grid; the pages point at them."""
    from sitegen.render.views.activations import ActivationsView

    _, ctx, results = site
    a = results["activations"].arrays
    opts = RenderOptions(title="views", patch_size=16, image_format="webp")
    view = ActivationsView()
    for job in view.draw_jobs(ctx, {}, results, tmp_path, opts):
        job()
    n = int(a["images"][0])
    for li in range(2):
        with Image.open(tmp_path / f"img/activations/{n}/L{li}.webp") as img:
            assert img.format == "WEBP"
            picture = np.asarray(img.convert("RGB"))
        mx = a[f"L{li}.max"][0]
        np.testing.assert_array_equal(picture, map_grid(a[f"L{li}.maps"][0], float(mx.max()), mx <= 0)[0])
    page = next(p for p in view.pages(ctx, {}, results, opts) if p.template == "activations_image.html")
    assert all(layer["src"].endswith(".webp") for layer in page.context["layers"])
