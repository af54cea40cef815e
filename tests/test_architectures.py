"""Every torchvision classification CNN: layer discovery, receptive fields checked against gradient
supports, residual stages, pooled layers, and a small build.

A representative set runs always; the full sweep is marked ``slow`` and deselected by default
(``pytest -m slow tests/test_architectures.py`` runs it, see docs/architectures.md).
"""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torchvision

from hardening_corpus import run_cli

from sitegen.build import build, load_config
from sitegen.fields import ProbeMode, probe_model, trace
from sitegen.hooks import model_guard
from sitegen.layers import LayerInfo, discover

# (torchvision name, input side in pixels: the smallest convenient one the model accepts)
ARCHS = {
    "alexnet": 64, "vgg11": 32, "vgg11_bn": 32, "resnet18": 64, "resnext50_32x4d": 64, "wide_resnet50_2": 64,
    "densenet121": 64, "googlenet": 64, "inception_v3": 75, "mobilenet_v2": 64, "mobilenet_v3_small": 64,
    "mobilenet_v3_large": 64, "efficientnet_b0": 64, "efficientnet_v2_s": 64, "regnet_x_400mf": 64,
    "regnet_y_400mf": 64, "shufflenet_v2_x0_5": 64, "squeezenet1_0": 64, "squeezenet1_1": 64,
    "mnasnet0_5": 64, "convnext_tiny": 64,
}
# Always run: residual stages (resnet18), SE gates and flat stages (mobilenet_v3_small), ceil-mode pools,
# concatenation and a 1x1-convolution classifier (squeezenet1_1), channel shuffle (shufflenet).
ALWAYS = {"resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5"}
ALWAYS_BUILD = {"mobilenet_v3_small", "squeezenet1_1"}
"""Builds cost most: pooled layers and flat stages, and a convolution classifier, always; the rest slow."""
SAMPLE = 6
"""Layers whose fields the always-on run checks per model (the slow sweep checks every layer)."""


def arch_params(names=ARCHS, always=ALWAYS):
    return [pytest.param(n, marks=() if n in always else pytest.mark.slow) for n in names]


def field_params():
    """Every model with every layer checked (slow), and the always-on models with a sample."""
    params = [pytest.param(n, 0, marks=pytest.mark.slow, id=f"{n}-all") for n in ARCHS]
    return params + [pytest.param(n, SAMPLE, id=f"{n}-sample") for n in sorted(ALWAYS)]


def sample(layers: list[LayerInfo], n: int) -> list[LayerInfo]:
    """``n`` layers spread over the model, always including the deepest one (0: all)."""
    if not n or len(layers) <= n:
        return layers
    step = (len(layers) - 1) / (n - 1)
    return [layers[round(i * step)] for i in range(n)]


def make(name: str, **kw) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GoogLeNet/Inception: "default weight initialization will change"
        torch.manual_seed(0)
        return torchvision.models.get_model(name, weights=None, **kw).eval()


# ------------------------------------------------------------------ the independent check


def supports(probe, layers: list[LayerInfo], shape, units_of) -> dict[str, list]:
    """For each layer: the (row0, row1, col0, col1) extent of the input gradient of each of its units
    ``units_of(out_h, out_w)`` (None where no gradient reaches the input), in the probe copy (one
    forward, a backward per layer).

    Every gradient is finite and none is subnormal, or the measurement itself failed, and is
    reported as such instead of as a field mismatch.  A NaN is not > 0: an overflowed forward
    (squeeze-and-excitation gates left at their values square the magnitudes block after block)
    reads as a unit that sees nothing.  Underflow cuts a support short, and shows as subnormal
    gradients: with a float32 probe every DenseNet-121 and ConvNeXt-T layer whose support came
    out short (61 and 8) had gradients down to 1.4e-45, the smallest subnormal float32."""
    outs = {}
    handles = [probe.get_submodule(l.name).register_forward_hook(
        lambda m, i, o, n=l.name: outs.__setitem__(n, o)) for l in layers]
    dtype = next(probe.parameters()).dtype
    try:
        first = units_of(1, 1)
        x = (torch.rand((len(first), *shape), dtype=dtype, generator=torch.Generator().manual_seed(1))
             + 0.5).requires_grad_(True)
        with ProbeMode():
            probe(x)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for l in layers:
        o = outs[l.name]
        oh, ow = o.shape[-2:]
        g = torch.zeros_like(o)
        units = units_of(oh, ow)
        for n, (y, xx) in enumerate(units):
            g[n, :, y, xx] = 1.0
        (grad,) = torch.autograd.grad(o, x, g, retain_graph=True)
        assert torch.isfinite(grad).all(), (l.name, shape, "the probe's gradient is not finite")
        nonzero = grad.abs()[grad != 0]
        assert not len(nonzero) or float(nonzero.min()) >= torch.finfo(dtype).tiny, \
            (l.name, shape, "the probe's gradient underflows", float(nonzero.min()))
        nz = grad.abs().sum(1) > 0
        ext = []
        for n in range(len(units)):
            rows = torch.nonzero(nz[n].any(1)).flatten()
            cols = torch.nonzero(nz[n].any(0)).flatten()
            ext.append((int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1) if len(rows) else None)
        result[l.name] = (units, ext)
    return result


def strip_length(rf_size: int, stride: int, offset: int) -> int:
    """A length along one axis at which unit 0's field ends inside the input and the last two units'
    fields start inside it: then the supports fix size, stride and offset along that axis."""
    need = max(offset + rf_size, 3 * stride - offset) + stride + 8
    return int(math.ceil(need / 128) * 128)


def check_fields_against_gradient(model: torch.nn.Module, layers: list[LayerInfo], side: int) -> int:
    """Compare every spatial layer's field with gradient supports, along the rows on a tall strip
    and along the columns on a wide one, the strip just long enough to measure it.  Returns the
    number of layer-axis pairs checked."""
    probe = probe_model(model)
    checked = 0
    spatial = [l for l in layers if l.kind != "pooled"]
    for axis in ("rows", "cols"):
        buckets: dict[int, list[LayerInfo]] = {}
        for l in spatial:
            f = l.rf
            size, stride, off = (f.size, f.stride, f.offset) if axis == "rows" else (f.size_x, f.stride_x, f.offset_x)
            buckets.setdefault(max(strip_length(size, stride, off), side), []).append(l)
        for length, group in sorted(buckets.items()):
            shape = (3, length, side) if axis == "rows" else (3, side, length)

            def units_of(oh, ow, axis=axis):
                if axis == "rows":
                    return [(0, ow // 2), (max(oh - 2, 0), ow // 2), (oh - 1, ow // 2)]
                return [(oh // 2, 0), (oh // 2, max(ow - 2, 0)), (oh // 2, ow - 1)]

            found = supports(probe, group, shape, units_of)
            for l in group:
                units, ext = found[l.name]
                for n, ((y, x), e) in enumerate(zip(units, ext)):
                    # The probe's weights are at least 0.5 / fan-in and its activations the identity:
                    # every unit's gradient reaches the input.
                    assert e is not None, (l.name, axis, (y, x), "no gradient reaches the input")
                    r0, r1, c0, c1 = e
                    bx0, by0, bx1, by1 = l.rf.box(y, x)
                    (s0, s1), (b0, b1) = ((r0, r1), (by0, by1)) if axis == "rows" else ((c0, c1), (bx0, bx1))
                    # Starts are exact.  So is unit 0's end; the last units' fields pass the far
                    # border, where a strided convolution without padding (or a ceil-mode pool's
                    # last window) may leave the image's last rows unseen: their support ends at or
                    # before the clipped field.
                    assert s0 == max(b0, 0), (l.name, axis, (y, x), l.rf, (s0, s1))
                    if n == 0:
                        assert s1 == min(b1, length), (l.name, axis, (y, x), l.rf, (s0, s1))
                    else:
                        assert s0 < s1 <= min(b1, length), (l.name, axis, (y, x), l.rf, (s0, s1))
                # The strip was long enough: unit 0's field ends inside, the last two start inside,
                # so the three measured edges determine size, stride and offset.
                i = 1 if axis == "rows" else 0  # box = (x0, y0, x1, y1)
                b_first, b_prev = l.rf.box(*units[0]), l.rf.box(*units[1])
                assert b_first[2 + i] < length and b_prev[i] > 0 and units[1] != units[2], (l.name, axis)
                checked += 1
    return checked


# ------------------------------------------------------------------ discovery and fields


@pytest.mark.parametrize("name,n", field_params())
def test_fields_match_gradient_supports(name, n):
    model = make(name)
    side = ARCHS[name]
    layers = discover(model, (3, side, side))
    # Every field came from the arithmetic (no fallback to the probe).
    with model_guard(model):
        traced = trace(model, torch.zeros(1, 3, side, side))
    assert all(traced.tracks[l.name].kind in ("map", "global") for l in layers)
    spatial = sample([l for l in layers if l.kind != "pooled"], n)
    assert check_fields_against_gradient(model, spatial, side) == 2 * len(spatial)
    # Pooled layers: one value per channel; the gradient of it reaches the whole input.
    pooled = [l for l in layers if l.kind == "pooled"]
    if pooled:
        probe = probe_model(model)
        found = supports(probe, pooled, (3, side, side), lambda oh, ow: [(0, 0)])
        for l in pooled:
            assert l.shape[1:] == (1, 1) and l.rf.pooled and l.rf.box(0, 0) == (0, 0, side, side)
            assert found[l.name][1] == [(0, side, 0, side)], l.name


EXPECTED_POOLED = {"mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s",
                   "regnet_y_400mf"}


@pytest.mark.parametrize("name", arch_params())
def test_kinds_and_stages(name):
    model = make(name)
    layers = discover(model, (3, ARCHS[name], ARCHS[name]))
    kinds = {l.kind for l in layers}
    assert ("pooled" in kinds) == (name in EXPECTED_POOLED), kinds
    # torchvision's squeeze-and-excitation gates (SqueezeExcitation.fc1/fc2) are the pooled layers.
    assert all(l.name.endswith((".fc1", ".fc2")) for l in layers if l.kind == "pooled")
    blocks = [l for l in layers if l.kind == "block"]
    residual_families = ("resnet", "resnext", "wide_resnet", "mobilenet", "efficientnet", "regnet", "mnasnet",
                         "convnext")
    assert bool(blocks) == name.startswith(residual_families), name
    # Each stage's blocks share one width, and a block's branch layer lies inside it.
    stages: dict[str, list[LayerInfo]] = {}
    for b in blocks:
        stages.setdefault(b.stage, []).append(b)
        assert b.branch.startswith(b.name + "."), b
    for stage, members in stages.items():
        widths = {b.channels for b in members}
        if "[" in stage:
            assert len(widths) == 1, (stage, widths)
        assert [b.block for b in members] == sorted(b.block for b in members)
    caffe = [l.caffe for l in blocks if l.caffe]
    assert bool(caffe) == name.startswith(("resnet", "resnext", "wide_resnet"))


def test_stage_detection_by_structure():
    """Residual blocks are found by what they compute: the blocks that add their input back, and
    only those."""
    by = {l.name: l for l in discover(make("mobilenet_v2"), (3, 64, 64))}
    ir = [n for n, m in make("mobilenet_v2").named_modules() if type(m).__name__ == "InvertedResidual"]
    model = make("mobilenet_v2")
    residual = {n for n in ir if model.get_submodule(n).use_res_connect}
    assert {n for n, l in by.items() if l.kind == "block"} == residual
    # A flat container of blocks of several widths is cut into runs of one width.
    assert by["features.5"].stage == by["features.6"].stage == "features[5:7]"
    assert by["features.3"].stage == "features[3:4]"
    assert by["features.6"].block == 6 and by["features.6.conv.2"].stage == "features[5:7]"
    assert by["features.6"].branch == "features.6.conv.2" and by["features.6"].caffe == ""

    by = {l.name: l for l in discover(make("efficientnet_b0"), (3, 64, 64))}
    # The first MBConv of a stage changes the width: no residual connection, not a block.
    assert by["features.2.1"].kind == "block" and "features.2.0" not in by
    assert by["features.2.1"].stage == "features.2" and by["features.2.1"].block == 1
    assert by["features.2.1.block.2.fc1"].kind == "pooled"

    model = make("regnet_y_400mf")
    by = {l.name: l for l in discover(model, (3, 64, 64))}
    b = by["trunk_output.block2.block2-1"]
    assert (b.kind, b.stage, b.block, b.caffe) == ("block", "trunk_output.block2", 1, "")
    assert by["trunk_output.block2.block2-0"].kind == "block"  # a projection shortcut (proj) is a shortcut
    assert b.branch == "trunk_output.block2.block2-1.f.c.0"

    by = {l.name: l for l in discover(make("convnext_tiny"), (3, 32, 32))}
    assert by["features.1.2"].kind == "block" and by["features.1.2"].stage == "features.1"


def test_torchvision_resnets_unchanged():
    """The ResNet family keeps the layers, stages and Caffe names it always had."""
    for name in ("resnet18", "resnet50"):
        layers = discover(make(name), (3, 64, 64))
        blocks = [l for l in layers if l.kind == "block"]
        assert [b.name for b in blocks][:3] == ["layer1.0", "layer1.1", "layer1.2"][:3 if name == "resnet50" else 2] \
            or name == "resnet18"
        assert all(b.stage == b.name.rsplit(".", 1)[0] and b.block == int(b.name.rsplit(".", 1)[1]) for b in blocks)
        assert blocks[-1].caffe == ("res5b" if name == "resnet18" else "res5c")
        assert {l.kind for l in layers} == {"conv", "block"}


def test_densenet_fields_equal_the_former_probe(capsys):
    """DenseNet-121 at 64 px: the fields the former gradient probe listed (minutes of probing; the
    arithmetic's time is measured by bench/layers_bench.py), here without any probing."""
    layers = discover(make("densenet121"), (3, 64, 64))
    by = {l.name: l for l in layers}
    assert len(layers) == 120 and "gradient probe" not in capsys.readouterr().err
    assert (by["features.denseblock1.denselayer1.conv1"].rf.size, by["features.denseblock1.denselayer1.conv1"].rf.stride) == (11, 4)
    assert (by["features.denseblock1.denselayer1.conv2"].rf.size, by["features.denseblock1.denselayer1.conv2"].rf.stride) == (19, 4)
    assert (layers[-1].rf.size, layers[-1].rf.stride) == (2071, 32)


# ------------------------------------------------------------------ the `sitegen layers` command


@pytest.mark.parametrize("name", arch_params(always={"squeezenet1_1"}))
def test_layers_command_lists_what_discover_finds(name, tmp_path, capsys):
    """`sitegen layers` on a saved random-weights checkpoint, as a user runs it for a torchvision
    architecture: every layer discover() finds, in its order, with its kind, width, output shape,
    receptive field and Caffe name; nothing else."""
    side = ARCHS[name]
    model = make(name)
    ckpt = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), ckpt)
    code, out, err = run_cli(["layers", str(ckpt), "--arch", f"torchvision:{name}", "--size", str(side)], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    found = discover(model, (3, side, side))
    lines = out.splitlines()
    assert lines[0] == f"# {name}.pt: {len(found)} layers for {side}×{side} input"
    rows = [line.split("\t") for line in lines[1:] if not line.startswith("#")]
    assert rows[0] == ["layer", "kind", "channels", "output", "receptive field", "stride", "caffe"]
    listed = rows[1:]
    assert [r[0] for r in listed] == [l.name for l in found]
    for row, l in zip(listed, found):
        assert row == [l.name, l.kind, str(l.channels), "×".join(map(str, l.shape)), l.rf.size_text(),
                       l.rf.stride_text(), l.caffe], row


# ------------------------------------------------------------------ small builds


def tiny_config(layers: list[str], classes: bool = False):
    cfg = load_config(None, layers=layers)
    overrides = {
        # The images' own size: a torchvision architecture would otherwise get its 224-px evaluation transform.
        "data": {"resize": 0, "crop": 0},
        "topk": {"k": 1, "checkpoint_every": 0},
        # Every method: deconvnet adds one backward to the attribution and sanity passes' batches,
        # about 5 % of a small build's time (resnet18, mobilenet_v3_small measured side by side).
        "attribution": {"max_side": 16, "methods": ("guided", "deconvnet", "gradient")},
        "samples": {"max_images": 2},
        "occlusion": {"size": 16, "stride": 16},
        "tsne": {"perplexity": 2.0, "iterations": 250, "pca_dims": 4},
        "activations": {"max_side": 8},
        "featurevis": {"steps": 2, "classes": classes, "image_size": 32},
        "kernels": {"block": 16},
    }
    from sitegen import config as config_mod

    for section, values in overrides.items():
        cfg = config_mod.with_overrides(cfg, section, **values)
    return cfg


def build_layers(layers: list[LayerInfo]) -> list[str]:
    """The first convolution, a deep spatial layer (the deepest of at most 128 channels, to keep the
    per-channel passes short), a pooled layer if there is one; in execution order."""
    spatial = [l for l in layers if l.kind != "pooled"]
    late = [l for l in spatial[1:] if l.channels <= 128] or spatial[-1:]
    chosen = {spatial[0].name, late[-1].name, *[l.name for l in layers if l.kind == "pooled"][:1]}
    return [l.name for l in layers if l.name in chosen]


@pytest.mark.parametrize("name", arch_params(always=ALWAYS_BUILD))
def test_small_build(name, tmp_path, make_images):
    model = make(name)
    side = ARCHS[name]
    ckpt = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), ckpt)
    images = tmp_path / "imgs"
    make_images(images, 6, size=side, classes=2)
    chosen = build_layers(discover(model, (3, side, side)))
    out = tmp_path / "site"
    cfg = tiny_config(chosen)
    from sitegen import config as config_mod

    cfg = config_mod.with_overrides(cfg, "model", arch=f"torchvision:{name}")
    if side > 32:  # Inception v3's deep layers cannot run at 32 px: feature vis at the input size
        cfg = config_mod.with_overrides(cfg, "featurevis", image_size=0)
    report = build(ckpt, images, out, cfg, cache_dir=None)
    print(name, {k: round(v, 1) for k, v in report.timings.items()})  # shown with -s (the sweep's figures)
    atlas = json.loads((out / "data" / "atlas.json").read_text())
    assert [l["name"] for l in atlas["layers"]] == chosen
    assert report.images == 6 and report.skipped == 0
    for layer in atlas["layers"]:
        for ch in layer["channels"][:3]:
            assert len(ch["top"]) == 1
        if layer["kind"] == "pooled":
            assert layer["receptive_field"] == {"size": side, "stride": 0, "offset": 0}
            assert layer["channels"][0]["top"][0]["box_xyxy"] == [0, 0, side, side]
            page = (out / "layers" / layer["name"] / "0.html").read_text()
            assert "runs on a globally pooled map" in page
            maps = [p.read_text() for p in (out / "activations").glob("*.html") if p.name != "index.html"]
            assert maps and all("each square is one value per channel" in m for m in maps)
    assert (out / "kernels" / "index.html").is_file() and (out / "index.html").is_file()
    # Every attribution method ran, deconvnet included: its switch on the channel pages, its figures
    # on the sanity page.
    from sitegen.render.pages import slug

    first = atlas["layers"][0]
    assert atlas["sanity"]["methods"] == ["guided", "deconvnet", "gradient"]
    assert 'name="attr-method" value="deconvnet"' in (out / "layers" / slug(first["name"]) / "0.html").read_text()
    # The first convolution reads the input itself: nothing below it reads the forward in any
    # method's backward, so every method's picture of it is proved the same for every image.
    for m, f in first["sanity"]["methods"].items():
        assert f["images_proved"] and f["images"] == 1.0, (first["name"], m, f["proof"])


def test_stage_views_and_neighbours_beyond_resnet(tmp_path, make_images):
    """MobileNet v2's flat container: a run of blocks of one width gets a stage page following a
    channel across its blocks, and the channel pages link the same role in the other block."""
    name, side = "mobilenet_v2", 32
    torch.save(make(name).state_dict(), tmp_path / "m.pt")
    make_images(tmp_path / "imgs", 4, size=side, classes=2)
    chosen = ["features.5", "features.5.conv.2", "features.6", "features.6.conv.2"]
    from sitegen import config as config_mod

    cfg = tiny_config(chosen)
    for section in ("occlusion", "tsne", "activations", "featurevis", "kernels"):
        cfg = config_mod.with_overrides(cfg, section, enabled=False)
    cfg = config_mod.with_overrides(cfg, "model", arch=f"torchvision:{name}")
    build(tmp_path / "m.pt", tmp_path / "imgs", tmp_path / "site", cfg, cache_dir=None)
    site = tmp_path / "site"
    atlas = json.loads((site / "data" / "atlas.json").read_text())
    assert {l["stage"] for l in atlas["layers"]} == {"features[5:7]"}
    stage_pages = [p for p in (site / "stages").rglob("*.html") if p.name != "index.html"]
    assert len(stage_pages) == 32  # one per channel of the 32-wide stage
    page = next(p for p in stage_pages if p.name == "3.html").read_text()
    assert "features.5" in page and "features.6" in page and "features.6.conv.2" in page
    channel = (site / "layers" / "features.6.conv.2" / "3.html").read_text()
    assert 'href="../features.5.conv.2/3.html"' in channel  # the same role in the other block


def test_neighbours_follow_block_module_names():
    """RegNet's blocks are called ``block2-0``, ``block2-1``: the same role in the other blocks is
    found by the block's module name, not by ``<stage>.<index>``."""
    from types import SimpleNamespace

    from sitegen.render.site import _neighbours

    layers = [l for l in discover(make("regnet_x_400mf"), (3, 32, 32))
              if l.name.startswith("trunk_output.block2.")]
    ctx = SimpleNamespace(layers=layers, all_layers=layers)
    i = next(i for i, l in enumerate(layers) if l.name == "trunk_output.block2.block2-1.f.c.0")
    assert [n["name"] for n in _neighbours(ctx, i)] == ["trunk_output.block2.block2-0.f.c.0",
                                                       "trunk_output.block2.block2-1.f.c.0"]


def test_a_featurevis_size_the_model_cannot_run_at_is_a_config_error(tmp_path, make_images):
    """Inception v3 needs 75 px to reach Mixed_6a: featurevis.image_size = 32 stops the build before
    any pass with the key and the fix, not with an internal error in the feature-vis pass."""
    from sitegen import config as config_mod
    from sitegen.errors import ConfigError

    name, side = "inception_v3", 75
    model = make(name)
    ckpt = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), ckpt)
    make_images(tmp_path / "imgs", 2, size=side, classes=2)
    cfg = config_mod.with_overrides(tiny_config(["Conv2d_1a_3x3.conv", "Mixed_6a.branch3x3.conv"]), "model", arch=f"torchvision:{name}")
    with pytest.raises(ConfigError) as e:
        build(ckpt, tmp_path / "imgs", tmp_path / "site", cfg, cache_dir=None)
    assert "featurevis.image_size" in str(e.value) and "32×32" in str(e.value) and "Mixed_6a.branch3x3.conv" in str(e.value)
    assert "featurevis.image_size = 0" in e.value.hint
    assert not (tmp_path / "site").exists()
