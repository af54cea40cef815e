"""The sanity view: the sanity page and its SVG charts, the lines beside the method switch on
channel and layer pages, and the figures in data/atlas.json (read back against the pass's arrays)."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from sitegen import progress
from sitegen.config import from_dict

TINY = Path(__file__).resolve().parents[1] / "tiny_models.py"
OFF = {section: {"enabled": False} for section in ("featurevis", "occlusion", "tsne", "kernels", "activations")}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """An atlas of the tiny max-pooling CNN (conv1 above the pooling, conv2 below it) with the
    attribution and sanity passes, and their results."""
    from PIL import Image

    from sitegen.build import BuildReport, prepare, run_passes
    from sitegen.model_loading import build_architecture
    from sitegen.passes.base import Cache
    from sitegen.render.pages import RenderOptions
    from sitegen.render.site import render

    root = tmp_path_factory.mktemp("sanity-site")
    rng = np.random.default_rng(0)
    for i in range(24):
        (root / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "imgs" / f"c{i % 2}" / f"{i}.png")
    arch = f"{TINY}:tiny_cnn"
    torch.save(build_architecture(arch, None).state_dict(), root / "tiny.pt")
    cfg = from_dict({"model": {"arch": arch}, "topk": {"k": 4}, **OFF})
    progress.set_quiet(True)
    try:
        ctx = prepare(root / "tiny.pt", root / "imgs", cfg, None)
        results = run_passes(ctx, Cache(None), BuildReport(index=root / "site" / "index.html"))
        render(ctx, results, root / "site", RenderOptions(title="t <&>", patch_size=32))
    finally:
        progress.set_quiet(False)
    return root / "site", results


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()
        self.imgs: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag == "img":
            self.imgs.append(a)


def _parse(path: Path) -> Links:
    p = Links()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_labels_match_the_attribution_view():
    from sitegen.render.views.attribution import LABELS
    from sitegen.render.views.sanity import METHOD_LABELS

    assert METHOD_LABELS == LABELS


def test_atlas_json_carries_every_figure(site):
    out, results = site
    atlas = json.loads((out / "data" / "atlas.json").read_text())
    r = results["sanity"]
    assert atlas["sanity"]["methods"] == ["guided", "deconvnet", "gradient"]
    assert atlas["sanity"]["units"] == 16 and atlas["sanity"]["images"] == 4 and atlas["sanity"]["page"] == "sanity.html"
    for li, layer in enumerate(atlas["layers"]):
        s = layer["sanity"]
        assert s["layer"] == layer["name"] and s["units"] == len(r.arrays[f"L{li}.units"]) == layer["shape"][0]
        for m in atlas["sanity"]["methods"]:
            f = s["methods"][m]
            # The page's figures are the means of the pass's per-unit arrays.
            for key, arr in (("weights_cascade", "cascade"), ("weights_own", "own"), ("edge", "edge"),
                             ("images_measured", "images"), ("ssim_images", "ssim_images")):
                assert f[key] == pytest.approx(float(np.nanmean(r.arrays[f"L{li}.{m}.{arr}"])), abs=1e-12), (m, key)
            assert f["verdict"] in ("fixed", "input", "unit", "both", "unknown")
            assert f["url"] == f"sanity.html#{m}-{layer['name']}"
    by = {l["name"]: l["sanity"]["methods"] for l in atlas["layers"]}
    # conv1 is above the max-pooling (proved for deconvnet, and, before any ReLU, for every method);
    # conv2 is below it: nothing is proved, and the page names the pooling.
    assert all(by["conv1"][m]["images_proved"] and by["conv1"][m]["images"] == 1.0 for m in by["conv1"])
    assert not by["conv2"]["deconvnet"]["images_proved"] and "max_pool2d" in by["conv2"]["deconvnet"]["proof"]


def test_sanity_page_charts_and_tables(site):
    out, results = site
    page = out / "sanity.html"
    text = page.read_text(encoding="utf-8")
    links = _parse(page)
    assert "Can I trust these pictures?" in text and "Adebayo" in text and "Nie" in text
    for m in ("guided", "deconvnet", "gradient"):
        assert m in links.ids and f"{m}-conv1" in links.ids and f"{m}-conv2" in links.ids
        chart = out / "img" / "sanity" / f"{m}.svg"
        root = ET.parse(chart).getroot()
        assert root.tag.endswith("svg") and root.get("viewBox") == "0 0 640 330"
        texts = " ".join("".join(t.itertext()) for t in root.iter() if t.tag.endswith("text"))
        assert "conv1" in texts and "conv2" in texts
    imgs = [i for i in links.imgs if "sanity/" in i["src"]]
    assert len(imgs) == 3 and all(i["alt"].strip() and "conv1" in i["alt"] for i in imgs)
    assert (out / "index.html").read_text(encoding="utf-8").count('href="sanity.html"') >= 1
    assert "t &lt;&amp;&gt;" in text  # the title, escaped


def test_channel_and_layer_pages_carry_one_line_per_method(site):
    out, _ = site
    for rel in ("layers/conv2/0.html", "layers/conv2/index.html"):
        text = (out / rel).read_text(encoding="utf-8")
        block = re.search(r'<div class="sanity-lines">(.*?)</div>', text, re.S)
        assert block, rel
        assert len(re.findall(r"<li>", block.group(1))) == 3
        for label in ("guided backprop", "deconvnet", "gradient"):
            assert f"<b>{label}</b>" in block.group(1)
        assert "verdict-" in block.group(1)
    channel = (out / "layers/conv2/0.html").read_text(encoding="utf-8")
    # Beside the method switch: after the switch and its notes, before the pictures.
    assert channel.index("attr-switch") < channel.index("sanity-lines") < channel.index("attr-cells")
    sanity_ids = _parse(out / "sanity.html").ids
    for href in _parse(out / "layers/conv2/0.html").hrefs:
        if "sanity.html#" in href:
            assert href.startswith("../../sanity.html#") and href.split("#", 1)[1] in sanity_ids


@pytest.fixture(scope="module")
def stage_site(tmp_path_factory):
    """An atlas of a residual stage of two blocks (layer1.0, layer1.1) with the attribution and
    sanity passes, and their results."""
    from PIL import Image

    from sitegen.build import BuildReport, prepare, run_passes
    from sitegen.model_loading import build_architecture
    from sitegen.passes.base import Cache
    from sitegen.render.pages import RenderOptions
    from sitegen.render.site import render

    root = tmp_path_factory.mktemp("sanity-stage")
    rng = np.random.default_rng(1)
    (root / "imgs").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
    arch = f"{TINY}:two_block_resnet"
    torch.save(build_architecture(arch, None).state_dict(), root / "net.pt")
    cfg = from_dict({"model": {"arch": arch}, "layers": ["layer1.0", "layer1.1"], "topk": {"k": 3}, **OFF})
    progress.set_quiet(True)
    try:
        ctx = prepare(root / "net.pt", root / "imgs", cfg, None)
        results = run_passes(ctx, Cache(None), BuildReport(index=root / "site" / "index.html"))
        render(ctx, results, root / "site", RenderOptions(title="t", patch_size=16, workers=1))
    finally:
        progress.set_quiet(False)
    return root / "site", results


def test_stage_pages_carry_the_lines_of_the_stages_last_block(stage_site):
    """Each stage page shows one line per method with the figures of layer1.1 (the stage's last
    block), the means of the pass's per-unit arrays for that layer, not those of layer1.0."""
    out, results = stage_site
    r = results["sanity"]
    li = r.meta["layers"].index("layer1.1")
    labels = {"guided": "guided backprop", "deconvnet": "deconvnet", "gradient": "gradient"}

    def sim(key: str, m: str) -> str:
        v = np.asarray(r.arrays[f"L{li}.{m}.{key}"], np.float64)
        return "not measured" if not np.isfinite(v).any() else f"{float(np.nanmean(v)):.2f}"

    expected = []
    for m in r.meta["methods"]:
        proved = r.meta["proofs"]["layer1.1"][m][0]
        images = "1, proved" if proved else sim("images", m)
        expected.append(f"<b>{labels[m]}</b>: weights {sim('cascade', m)} (own layer only {sim('own', m)}) · "
                        f"images {images} · edges {sim('edge', m)} —")
    assert len(expected) == 3
    pages = sorted(p for p in (out / "stages").glob("*/*.html"))
    assert len(pages) == 4  # one per channel of the 4-wide stage
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "layer1.0" in text and "layer1.1" in text  # both blocks are on the page
        block = re.search(r'<div class="sanity-lines">(.*?)</div>', text, re.S)
        assert block, page
        lines = re.sub(r"\s+", " ", block.group(1))
        assert '<span class="mono">layer1.1</span>' in lines and "layer1.0" not in lines
        assert len(re.findall(r"<li>", lines)) == 3
        for line in expected:
            assert line in lines, (page.name, line, lines)
        # Beside the method switch, before the pictures; its links reach the sanity page's rows.
        assert text.index("attr-switch") < text.index("sanity-lines") < text.index("stage-strip")
        assert '<a href="../../sanity.html#guided-layer1.1">details</a>' in text


def test_chart_draws_gaps_and_proofs_and_escapes_names():
    from sitegen.render.views.sanity import chart_svg

    f = lambda **kw: {"weights_cascade": 0.5, "weights_own": 0.6, "images": 0.2, "edge": 0.1,  # noqa: E731
                      "images_proved": False, **kw}
    svg = chart_svg("guided <b>", [("a<script>", f()), ("b", f(weights_cascade=None)),
                                   ("c", f(images=1.0, images_proved=True)), ("d", f())])
    root = ET.fromstring(svg)  # well-formed
    assert "<script>" not in svg and "a&lt;script&gt;" in svg and "guided &lt;b&gt;" in svg
    assert svg.count("<path ") == 1  # the one proved image similarity: a diamond
    lines = [el for el in root.iter() if el.tag.endswith("polyline")]
    # The red line breaks at the gap: a lone point before it (a marker only), a segment of two after
    # it; the other three series are one line each.
    assert len(lines) == 4
    one = chart_svg("x", [("only", f())])
    assert ET.fromstring(one) is not None and "<polyline" not in one


def test_lines_for_a_layer_where_no_channel_fires():
    from sitegen.render.site import environment

    tpl = environment().from_string('{% include "_sanity_lines.html" %}')
    html = tpl.render(root="../../", sanity={"units": 0, "layer": "dead<1>", "url": "sanity.html", "methods": {}})
    assert "No channel of" in html and "dead&lt;1&gt;" in html and "<li>" not in html
