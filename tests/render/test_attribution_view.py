"""The attribution view on a real ResNet-20 site: sprite rows, the channel-page switch, stage views."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sitegen import progress
from sitegen.build import prepare
from sitegen.config import from_dict
from sitegen.layers import LayerInfo, ReceptiveField
from sitegen.passes.attribution import AttributionPass, unit_crops
from sitegen.passes.topk import TopKPass
from sitegen.crops import display_box, resize_square
from sitegen.render.pages import RenderOptions
from sitegen.render.site import render
from sitegen.render.views import registered
from sitegen.render.views.attribution import AttributionView, find_stages

# Two blocks of layer1 (res2b, res2c), the branch conv of the first only, a conv that is neither,
# and layer2's first block alone in its stage.
LAYERS = ["layer1.1.conv1", "layer1.1", "layer1.1.conv2", "layer1.2", "layer2.0"]
PATCH = 32
K = 3


@pytest.fixture(scope="module")
def site(resnet20_path, cifar_subset, paths, tmp_path_factory):
    progress.set_quiet(True)
    cfg = from_dict({"layers": LAYERS, "model": {"arch": f"{paths['cifar_arch']}:resnet20"}, "topk": {"k": K}})
    ctx = prepare(resnet20_path, cifar_subset(10), cfg, None)
    results = {"topk": TopKPass(cfg.topk).run(ctx)}
    ctx.results = results
    results["attribution"] = AttributionPass(cfg.attribution).run(ctx)
    out = tmp_path_factory.mktemp("attr-site")
    atlas = render(ctx, results, out, RenderOptions(title="test", patch_size=PATCH))
    progress.set_quiet(False)
    return ctx, results, out, atlas


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.inputs: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("href", "src"):
            if a.get(key):
                self.urls.append(a[key])
        if tag == "input":
            self.inputs.append(a)


def parse(path: Path) -> Links:
    p = Links()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_sprite_rows_are_patches_then_one_row_per_method(site):
    ctx, results, out, atlas = site
    r = results["attribution"]
    methods = r.meta["methods"]
    others = [v for v in registered() if v.available(results) and not isinstance(v, AttributionView)]
    for li, layer in enumerate(LAYERS):
        for c in (0, ctx.layer(layer).channels - 1):
            sheet = np.asarray(Image.open(out / "img" / layer / f"{c}.png").convert("RGB"))
            boxes = [display_box(tuple(e["box_xyxy"]), ctx.input_size) for e in atlas["layers"][li]["channels"][c]["top"]]
            extra = sum(len(v.sprite_rows(ctx, atlas, results, li, c, boxes)) for v in others)
            w = boxes[0][2] - boxes[0][0]
            side = w if 3 * w <= PATCH else PATCH  # cells at the window's own pixels up to a third of the patch
            assert sheet.shape[:2] == ((1 + len(methods) + extra) * side, K * side)
            for row, m in enumerate(methods, start=1):
                for j, crop in enumerate(unit_crops(r, layer, c, m)):
                    cell = sheet[row * side:(row + 1) * side, j * side:(j + 1) * side]
                    np.testing.assert_array_equal(cell, resize_square(crop, side), err_msg=f"{layer}:{c} {m} {j}")


def test_channel_page_has_the_method_switch_and_the_normalisation(site):
    _, results, out, _ = site
    page = out / "layers" / "layer1.1" / "5.html"
    html = page.read_text(encoding="utf-8")
    radios = [i for i in parse(page).inputs if i.get("type") == "radio"]
    assert [(i["value"], i["data-attr-row"]) for i in radios] == [("guided", "1"), ("deconvnet", "2"), ("gradient", "3")]
    assert "checked" in radios[0] and not any("checked" in i for i in radios[1:])
    assert "99th percentile of its" in html and "Grey is zero" in html
    assert 'data-attr-rows style="--p:32px; --k:3; --r:1"' in html  # guided shown without JavaScript
    assert html.count('class="patch attr-img"') == K
    assert not re.search(r"<[^>]+\son[a-z]+\s*=", html)  # no inline handlers: the CSP would block them


def test_channel_page_says_when_deconvnet_was_computed_once_and_shared(site):
    """ResNet-20 has no max-pooling: the deconvnet note of every shown layer says its picture is the
    same on every image and how many were computed, with the pass's own counts."""
    _, results, out, _ = site
    shared = results["attribution"].meta["shared"]
    assert "layer1.1.conv1" in shared  # a 9-px field: most units lie inside the 32-px images
    for layer in LAYERS:
        html = (out / "layers" / layer / "0.html").read_text(encoding="utf-8")
        note = re.search(r'data-attr-note="deconvnet"[^>]*>(.*?)</p>', html, re.S).group(1)
        if layer not in shared:  # computed per unit: nothing to say
            assert "same on every image" not in note
            continue
        assert "the same on every image" in note and "proved from the model" in note
        assert f"{shared[layer]['computed']:,} pictures for {shared[layer]['units']:,} units" in note
        other = re.search(r'data-attr-note="guided"[^>]*>(.*?)</p>', html, re.S).group(1)
        assert "same on every image" not in other


def test_block_and_branch_pages_link_to_their_stage_view(site):
    _, _, out, _ = site
    for layer in ("layer1.1", "layer1.2", "layer1.1.conv2"):
        urls = parse(out / "layers" / layer / "7.html").urls
        assert "../../stages/layer1/7.html" in urls, layer
    assert "../../stages/layer2/30.html" in parse(out / "layers" / "layer2.0" / "30.html").urls
    assert not any("stages/" in u and not u.endswith("index.html") for u in parse(out / "layers" / "layer1.1.conv1" / "7.html").urls)


def test_stage_pages_follow_one_channel_across_blocks(site):
    _, _, out, _ = site
    assert sorted(int(p.stem) for p in (out / "stages" / "layer1").glob("*.html")) == list(range(16))
    assert sorted(int(p.stem) for p in (out / "stages" / "layer2").glob("*.html")) == list(range(32))
    page = out / "stages" / "layer1" / "4.html"
    html = page.read_text(encoding="utf-8")
    urls = parse(page).urls
    # Both names, in order, each block with its top-k and attributions, the branch where selected.
    assert html.index("layer1.1") < html.index("res2b") < html.index("layer1.2") < html.index("res2c")
    assert "res2b_branch2b" in html and "res2c_branch2b" not in html
    assert [u for u in urls if u.endswith(".png")] == ["../../img/layer1.1/4.png"] * 2 * K + \
        ["../../img/layer1.1.conv2/4.png"] * 2 * K + ["../../img/layer1.2/4.png"] * 2 * K
    assert "Only blocks of the same width are compared" in html
    assert {"3.html", "5.html", "../../layers/layer1.1/4.html", "../../layers/layer1.2/4.html",
            "../../layers/layer1.1.conv2/4.html", "../../stages/index.html"} <= set(urls)
    index = (out / "stages" / "index.html").read_text(encoding="utf-8")
    assert "res2" in index and "res3" in index and 'href="../stages/layer2/31.html"' in index
    assert 'href="stages/index.html"' in (out / "index.html").read_text(encoding="utf-8")


def test_every_link_and_image_in_stage_and_channel_pages_resolves(site):
    _, _, out, _ = site
    pages = list((out / "stages").rglob("*.html")) + [out / "layers" / l / "3.html" for l in LAYERS]
    checked = 0
    for page in pages:
        for url in parse(page).urls:
            if url.startswith(("#", "data:")):
                continue
            assert not re.match(r"^[a-z]+:", url), (page, url)  # relative only: works from file://
            target = (page.parent / url.split("#")[0]).resolve()
            assert target.is_file(), (page.relative_to(out), url)
            checked += 1
    assert checked > 48 * 10


def _block(name, stage, index, channels, branch=""):
    return LayerInfo(name, "block", (channels, 8, 8), ReceptiveField(9, 1, -4), stage=stage, block=index,
                     caffe=f"res4{'abc'[index]}", branch=branch)


def test_only_blocks_of_the_stage_width_are_compared():
    conv = lambda name, ch: LayerInfo(name, "conv", (ch, 8, 8), ReceptiveField(5, 1, -2), stage="layer3", block=int(name[7]))  # noqa: E731
    layers = [conv("layer3.0.conv1", 64), conv("layer3.0.conv2", 32), _block("layer3.0", "layer3", 0, 32, "layer3.0.conv2"),
              conv("layer3.1.conv1", 64), conv("layer3.1.conv2", 64), _block("layer3.1", "layer3", 1, 64, "layer3.1.conv2"),
              conv("layer3.2.conv1", 64), conv("layer3.2.conv2", 64), _block("layer3.2", "layer3", 2, 64, "layer3.2.conv2")]
    ctx = SimpleNamespace(all_layers=layers, layer=lambda n: next(l for l in layers if l.name == n))
    (stage,) = find_stages(ctx, ["layer3.0", "layer3.0.conv2", "layer3.1", "layer3.2", "layer3.2.conv2"])
    assert (stage.stage, stage.caffe, stage.width) == ("layer3", "res4", 64)
    assert [b.name for b in stage.blocks] == ["layer3.1", "layer3.2"]
    assert [b.name for b in stage.left_out] == ["layer3.0"]
    assert stage.branches == {"layer3.2": "layer3.2.conv2"}  # layer3.1.conv2 is not selected
    assert stage.branch_caffe == {"layer3.2": "res4c_branch2b"}


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = """document.addEventListener("DOMContentLoaded", function () { setTimeout(function () {
  var img = document.querySelector(".attr-img img"), patch = document.querySelector(".attr-pair .patch img");
  var at = function (el) { var s = getComputedStyle(el); return s.marginLeft + " " + s.marginTop + " " + s.width; };
  var before = at(img);
  document.querySelector('input[value="gradient"]').click();
  document.body.setAttribute("data-probe", [before, at(img), at(patch),
    document.querySelector('[data-attr-note="gradient"]').hidden].join("|"));
}, 50); });"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium")
def test_switch_changes_the_sprite_row_under_the_pages_csp(site, tmp_path):
    _, _, out, _ = site
    copy = tmp_path / "site"
    shutil.copytree(out, copy)
    (copy / "assets" / "probe.js").write_text(PROBE, encoding="utf-8")
    page = copy / "layers" / "layer1.1" / "2.html"
    html = page.read_text(encoding="utf-8")
    tag = '<script src="../../assets/site.js" defer></script>'
    assert tag in html
    page.write_text(html.replace(tag, tag + '<script src="../../assets/probe.js" defer></script>'), encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=3000",
                              "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    probe = re.search(r'data-probe="([^"]*)"', dom)
    assert probe, dom[-2000:]
    before, after, patch, hidden = probe.group(1).split("|")
    # Row 1 (guided), then row 3 (gradient); the patch stays on row 0; the sheet drawn K cells wide.
    assert (before, after, patch, hidden) == ("0px -32px 96px", "0px -96px 96px", "0px 0px 96px", "false")
