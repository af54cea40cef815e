"""The comparison view on rendered atlases of the tiny CNN:

- data/atlas.json's ``compare`` section carries the figures the comparison pages show (each layer's
  most-changed channels, dead-in-both count and unchanged flag; each image's shared neighbours; which
  changed predictions the changes page lists; the old feature visualisation), read back against the
  pass's result and a brute-force recomputation, and the pages show those same figures;
- a checkpoint whose channels in one layer are permuted: the layer page says the channels were
  reordered and lists the permutation, and each moved channel's page links the page that shows its
  matched old channel's top images.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sitegen import progress
from sitegen.build import BuildReport, prepare, run_passes
from sitegen.config import from_dict
from sitegen.model_loading import build_architecture
from sitegen.passes.base import Cache
from sitegen.render.pages import RenderOptions
from sitegen.render.site import render

TINY = Path(__file__).resolve().parents[1] / "tiny_models.py"
OFF = {section: {"enabled": False} for section in ("attribution", "occlusion", "kernels", "activations")}
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # the config's defaults


def _images(folder: Path, n: int = 30, classes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"c{i % classes}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(sub / f"img{i:03d}.png")
    return folder


def _render(new: Path, old: Path, images: Path, arch: str, out: Path, **sections):
    compare = {"checkpoint": str(old), **sections.pop("compare", {})}
    cfg = from_dict({"model": {"arch": arch}, "compare": compare, "topk": {"k": 5}, **OFF,
                     "tsne": {"enabled": False}, "featurevis": {"enabled": False}, **sections})
    progress.set_quiet(True)
    try:
        ctx = prepare(new, images, cfg, None)
        results = run_passes(ctx, Cache(None), BuildReport(index=out / "index.html"))
        render(ctx, results, out, RenderOptions(title="t", patch_size=16, workers=1))
    finally:
        progress.set_quiet(False)
    return ctx, results


def _codes(model: torch.nn.Module, ctx) -> np.ndarray:
    """Every image's code (the classifier's input), normalised by hand (16 px PNGs used as they are)."""
    x = _pixels([ctx.images.path(i) for i in range(len(ctx.images))])
    codes = []
    h = model.fc.register_forward_pre_hook(lambda _m, inp: codes.append(inp[0].detach().double()))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        h.remove()
    return codes[0].numpy()


def _nearest(codes: np.ndarray, k: int) -> list[set[int]]:
    d = ((codes[:, None, :] - codes[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return [set(np.argsort(row, kind="stable")[:k].tolist()) for row in d]


# ------------------------------------------------------------------ a changed checkpoint


def _pixels(files: list[Path]) -> torch.Tensor:
    """The images normalised by hand (16 px PNGs used as they are: no resize, no crop)."""
    arrays = [np.asarray(Image.open(f).convert("RGB"), np.float64) / 255.0 for f in files]
    return torch.from_numpy((np.stack(arrays) - MEAN) / STD).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def changed_site(tmp_path_factory):
    """The tiny CNN (old) against a copy fine-tuned on the images' class folders (new), with t-SNE
    and feature visualisation on, 3 most-changed channels and 2 changed images listed."""
    root = tmp_path_factory.mktemp("compare-view")
    arch = f"{TINY}:tiny_cnn"
    images = _images(root / "imgs")
    base = build_architecture(arch, None)
    with torch.no_grad():
        base.conv2.bias[4] = -100.0  # never fires, before and after the fine-tune (no gradient reaches it)
    torch.save(base.state_dict(), root / "old.pt")
    files = sorted(images.rglob("*.png"))
    x, y = _pixels(files), torch.tensor([int(f.parent.name[1:]) for f in files])
    model = build_architecture(arch, None)
    model.load_state_dict(base.state_dict())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(25):  # a few steps of full-batch SGD: the random model predicts one class for every image
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), root / "new.pt")
    out = root / "site"
    ctx, results = _render(root / "new.pt", root / "old.pt", images, arch, out,
                           compare={"channels": 3, "changed_images": 2},
                           tsne={"enabled": True, "iterations": 250, "perplexity": 5.0},
                           featurevis={"enabled": True, "steps": 3, "classes": False})
    section = json.loads((out / "data" / "atlas.json").read_text(encoding="utf-8"))["compare"]
    return ctx, results, out, section


def test_layers_most_changed_dead_and_unchanged(changed_site):
    ctx, results, out, section = changed_site
    r = results["compare"]
    assert not all(l["unchanged"] for l in section["layers"]), "the noisy copy changed nothing: the test checks nothing"
    for li, layer in enumerate(section["layers"]):
        meta = r.meta["layers"][li]
        assert layer["name"] == meta["name"]
        assert layer["most_changed"] == meta["most_changed"] and layer["unchanged"] == meta["unchanged"]
        # Recomputed from the pass's per-channel arrays: the 3 channels of largest 1 − r, in order.
        change, jaccard = 1 - r.arrays[f"L{li}.corr"], r.arrays[f"L{li}.jaccard"]
        listed = layer["most_changed"]
        assert len(listed) == 3 and len(set(listed)) == 3
        assert all((change[a], -jaccard[a]) >= (change[b], -jaccard[b]) for a, b in zip(listed, listed[1:]))
        assert min(change[listed]) >= max(np.delete(change, listed))
        dead_new, dead_old = r.arrays[f"L{li}.dead_new"], r.arrays[f"L{li}.dead_old"]
        assert layer["dead_both"] == int((dead_new & dead_old).sum())
        # The channels' own entries agree with it.
        assert layer["dead_both"] == sum(ch["dead_new"] and ch["dead_old"] for ch in layer["channels"])
        assert layer["unchanged"] == (min(ch["jaccard"] for ch in layer["channels"]) == 1
                                      and min(ch["correlation"] for ch in layer["channels"]) >= 1 - 1e-6
                                      and not (dead_new != dead_old).any())

    # changes.html lists those channels, in that order, and the dead-in-both total.
    page = (out / "changes.html").read_text(encoding="utf-8")
    listing = page.split('<ul class="changed-channels">', 1)[1].split("</ul>", 1)[0]
    items = re.findall(r'<li><a href="layers/([^/]+)/index.html">[^<]*</a>:(.*?)</li>', listing, re.S)
    by_layer = {name: [int(c) for c in re.findall(r'<a href="layers/[^/]+/(\d+)\.html">', body)] for name, body in items}
    assert by_layer == {l["name"]: l["most_changed"] for l in section["layers"]}
    assert section["layers"][1]["dead_both"] == 1 and section["layers"][1]["channels"][4]["dead_old"]
    assert f"{sum(l['dead_both'] for l in section['layers'])} channels are dead in both checkpoints" in page


def test_each_images_shared_neighbours_against_brute_force(changed_site):
    ctx, results, out, section = changed_site
    codes = section["codes"]
    ids = results["compare"].arrays["codes.images"]
    assert codes["images"] == [ctx.images.records[int(n)].rel for n in ids] and codes["points"] == len(ids) == 30
    assert codes["neighbours"] == 10
    new, old = _nearest(_codes(ctx.net, ctx), 10), _nearest(_codes(ctx.compare.model, ctx), 10)
    expected = [len(new[int(n)] & old[int(n)]) for n in ids]
    assert codes["shared"] == expected
    assert min(expected) < 10, "every image kept its neighbours: the test checks nothing"
    assert codes["shared_mean"] == pytest.approx(np.mean(expected) / 10)
    # Both maps of changes-tsne.html title each point with the same count.
    page = (out / "changes-tsne.html").read_text(encoding="utf-8")
    titles = re.findall(r"<title>([^<]*) · [^<]* · (\d+)/10 neighbours shared</title>", page)
    assert len(titles) == 2 * len(ids)
    by_image = dict(zip(codes["images"], codes["shared"]))
    assert all(by_image[rel] == int(n) for rel, n in titles)


def test_listed_predictions_and_old_feature_visualisation(changed_site):
    ctx, results, out, section = changed_site
    r = results["compare"]
    p = section["predictions"]
    assert p["changed"] >= 2, "the noisy copy changed too few predictions: the test checks little"
    assert p["listed_images"] == r.arrays["pred.listed"].tolist() and len(p["listed_images"]) == p["listed"] == 2
    page = (out / "changes.html").read_text(encoding="utf-8")
    shown = re.findall(r'<a class="changed-image"[^>]*>.*?<span class="mono" title="([^"]*)"', page, re.S)
    assert shown == [p["changed_images"][j]["image"] for j in p["listed_images"]]

    fv = results["featurevis_old"]
    for layer in section["layers"]:
        objective = fv.arrays[f"L{fv.meta['layers'].index(layer['name'])}.objective"]
        for c, ch in enumerate(layer["channels"]):
            entry = ch["old_featurevis"]
            assert entry["objective"] == pytest.approx(float(objective[c]), abs=1e-6)
            assert entry["excited"] == bool(objective[c] > 0) and (out / entry["image"]).is_file()
        html = (out / "layers" / layer["name"] / "0.html").read_text(encoding="utf-8")
        assert f"mean activation {float(objective[0]):.4g}" in html


# ------------------------------------------------------------------ permuted channels


def test_permuted_channels_on_the_layer_and_channel_pages(tmp_path):
    """The permuted copy of tests/passes/test_compare.py, rendered: new channel c of conv1 is old
    channel perm[c], the next layer reads them in the new order, so the outputs are the same."""
    arch = f"{TINY}:wide_tiny_cnn"
    model = build_architecture(arch, None)
    torch.save(model.state_dict(), tmp_path / "old.pt")
    perm = [2, 0, 5, 1, 3, 4]  # new channel c is old channel perm[c]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["conv1.weight"], sd["conv1.bias"] = sd["conv1.weight"][perm], sd["conv1.bias"][perm]
    sd["conv2.weight"] = sd["conv2.weight"][:, perm]
    torch.save(sd, tmp_path / "new.pt")
    out = tmp_path / "site"
    _render(tmp_path / "new.pt", tmp_path / "old.pt", _images(tmp_path / "imgs", n=24), arch, out)
    atlas = json.loads((out / "data" / "atlas.json").read_text(encoding="utf-8"))
    section = atlas["compare"]

    layer = (out / "layers" / "conv1" / "index.html").read_text(encoding="utf-8")
    assert "Channels reordered:" in layer and "It pairs 6 of 6 channels with another index" in layer
    listing = layer.split('<details class="permutation"', 1)[1].split("</details>", 1)[0]
    pairs = re.findall(r'<a href="(\d+)\.html">(\d+)</a> ← (\d+) \(1\.00 / ', listing)
    assert [(int(a), int(b), int(o)) for a, b, o in pairs] == [(c, c, perm[c]) for c in range(6)]
    conv2 = (out / "layers" / "conv2" / "index.html").read_text(encoding="utf-8")
    assert "Channel order kept" in conv2 and 'class="permutation"' not in conv2

    def cells(html: str, marker: str) -> list[str]:
        chunk = html.split(marker, 1)[1].split("</div>", 1)[0]
        return re.findall(r'<span class="mono" title="([^"]*)"', chunk)

    for c in range(6):
        page = (out / "layers" / "conv1" / f"{c}.html").read_text(encoding="utf-8")
        link = re.search(r'<a class="old-match" href="(\d+)\.html#compare"><b>(\d+)</b></a>', page)
        assert link and int(link.group(1)) == int(link.group(2)) == perm[c], c
        target = (out / "layers" / "conv1" / f"{perm[c]}.html").read_text(encoding="utf-8")
        assert 'id="compare"' in target
        # The linked page's old row holds the very images of this channel's own row (same unit values).
        own = cells(page, '<div class="cells" ')
        assert own and cells(target, '<div class="cells compare-cells"') == own
        new_top = [e["image"] for e in atlas["layers"][0]["channels"][c]["top"]]
        assert [e["image"] for e in section["layers"][0]["channels"][perm[c]]["old_top"]] == new_top == own
        assert section["layers"][0]["channels"][c]["match"] == perm[c]
    # conv2 kept its order: its channel pages name their own index, with no link.
    page = (out / "layers" / "conv2" / "0.html").read_text(encoding="utf-8")
    assert "old channel 0, its own index" in page and "old-match" not in page
