"""The size budget as a pure function over synthetic plans: which steps apply, in which order, and
what they leave out (sitegen/budget.py and the reduction order of sitegen/plan.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from sitegen.budget import Reduction, apply, describe, fit, summary
from sitegen.config import from_dict
from sitegen.layers import LayerInfo, ReceptiveField
from sitegen.plan import inner_convolutions, reductions
from sitegen.planning import SiteItem, total

RF = ReceptiveField(3, 1, -1)


def conv(name: str, stage: str = "", block: int = -1, c: int = 8) -> LayerInfo:
    return LayerInfo(name, "conv", (c, 4, 4), RF, stage=stage, block=block)


def block(name: str, stage: str, i: int, branch: str, c: int = 8) -> LayerInfo:
    return LayerInfo(name, "block", (c, 4, 4), RF, stage=stage, block=i, branch=branch)


def bottleneck_net() -> list[LayerInfo]:
    """A two-stage bottleneck ResNet, in execution order as discovery lists it."""
    layers = [conv("conv1")]
    for s, stage in enumerate(("layer1", "layer2")):
        for b in range(2):
            p = f"{stage}.{b}"
            layers += [conv(f"{p}.conv1", stage, b), conv(f"{p}.conv2", stage, b), conv(f"{p}.conv3", stage, b)]
            if b == 0:
                layers.append(conv(f"{p}.downsample.0", stage, b))
            layers.append(block(p, stage, b, f"{p}.conv3"))
    return layers


def items_for(layers: list[LayerInfo], methods=("guided", "deconvnet", "gradient")) -> list[SiteItem]:
    """Per layer: sprites (100 bytes), one 50-byte row per method, 30 bytes of pages; 10 bytes of
    whole-model files."""
    out = [SiteItem("core", "index", 1, 10)]
    for l in layers:
        out.append(SiteItem("core", "sprites", 1, 100, l.name))
        out.append(SiteItem("core", "channel pages", 1, 30, l.name))
        for m in methods:
            out.append(SiteItem("attribution", "sprites", 0, 50, l.name, tag=f"attribution:{m}"))
    return out


def fake_ctx(net: list[LayerInfo], **config) -> SimpleNamespace:
    cfg = from_dict({"featurevis": {"enabled": False}, **config})
    return SimpleNamespace(config=cfg, layers=net, all_layers=net, input_size=(32, 32))


def test_fit_applies_steps_in_order_and_stops_as_soon_as_it_fits():
    items = [SiteItem("v", "a", 1, 100, "A"), SiteItem("v", "b", 1, 100, "B"), SiteItem("v", "c", 1, 100, "C")]
    steps = [Reduction("layers", "C", "--layer C", layers=("C",)), Reduction("layers", "B", "--layer B", layers=("B",)),
             Reduction("layers", "A", "--layer A", layers=("A",))]
    got = fit(items, steps, limit=200)
    assert [s.label for s in got.applied] == ["C"]  # 200 fits: B and A stay
    assert got.fits and got.bytes == 200 and got.files == 2 and got.before == 300
    assert [s.label for s in fit(items, steps, limit=150).applied] == ["C", "B"]
    assert fit(items, steps, limit=0).applied == []  # 0 lifts the limit
    assert not fit(items, steps[:1], limit=50).fits  # out of steps: the caller refuses


def test_a_step_that_saves_nothing_is_skipped_and_not_listed():
    items = [SiteItem("v", "a", 1, 100, "A")]
    steps = [Reduction("layers", "Z", "--layer Z", layers=("Z",)), Reduction("layers", "A", "", layers=("A",))]
    got = fit(items, steps, limit=50)
    assert [s.label for s in got.applied] == ["A"]


def test_a_smaller_replacement_never_brings_back_what_an_earlier_step_left_out():
    big = [SiteItem("fv", "images", 4, 400, "A", tag="featurevis"), SiteItem("fv", "images", 4, 400, "B", tag="featurevis")]
    small = tuple(SiteItem("fv", "images", 4, 40, name, tag="featurevis") for name in ("A", "B", "C"))
    after = apply(apply(big, Reduction("layers", "B", "", layers=("B",))), Reduction("fv", "64 px", "", replace=small))
    assert after == [small[0]]


def test_inner_convolutions_go_shortcuts_first_then_inner_then_branch_outputs_deepest_first():
    layers = bottleneck_net()
    order = [l.name for l in inner_convolutions(layers, "conv1")]
    assert order == [
        "layer2.0.downsample.0", "layer1.0.downsample.0",
        "layer2.1.conv2", "layer2.1.conv1", "layer2.0.conv2", "layer2.0.conv1",
        "layer1.1.conv2", "layer1.1.conv1", "layer1.0.conv2", "layer1.0.conv1",
        "layer2.1.conv3", "layer2.0.conv3", "layer1.1.conv3", "layer1.0.conv3",
    ]
    # the stem and the block outputs (the residual stream) are never among them
    assert not {"conv1", "layer1.0", "layer2.1"} & set(order)


def test_the_reduction_order_rows_then_inner_convolutions_then_the_last_row_then_layers():
    layers = bottleneck_net()
    steps = reductions(fake_ctx(layers), None, items_for(layers))
    groups = [s.group for s in steps]
    assert groups == (["attribution rows"] * 2 + ["convolutions inside residual blocks"] * 14
                      + ["attribution"] + ["layers"] * 4)
    assert [s.label for s in steps[:2]] == ["the gradient row", "the deconvnet row"]
    assert steps[0].setting == ("attribution.methods", ("guided", "deconvnet"))
    assert steps[1].setting == ("attribution.methods", ("guided",))
    assert [s.label for s in steps if s.group == "layers"] == ["layer2.1", "layer2.0", "layer1.1", "layer1.0"]
    assert all("conv1" not in s.layers for s in steps)  # the stem stays whatever the budget


def test_settings_the_user_changed_are_never_reduced():
    """(A build given layers is refused over the budget rather than reduced at all: sitegen.plan.choose;
    these steps then only list the options.)"""
    layers = bottleneck_net()
    chosen_layers = reductions(fake_ctx(layers, layers=["layer*"]), None, items_for(layers))
    assert {s.group for s in chosen_layers} == {"attribution rows", "attribution"}
    chosen_methods = reductions(fake_ctx(layers, attribution={"methods": ["guided", "gradient"]}), None,
                                items_for(layers))
    assert {s.group for s in chosen_methods} == {"convolutions inside residual blocks", "layers"}


def test_a_synthetic_plan_loses_rows_first_then_inner_convolutions_and_keeps_the_stream():
    layers = bottleneck_net()
    items = items_for(layers)
    full = total(items)[1]  # 10 + 19 layers × (100 + 30 + 150) = 5330
    steps = reductions(fake_ctx(layers), None, items)
    # Dropping the deconvnet and gradient rows saves 19 × 100 = 1900: 3430 is not enough, so the
    # inner convolutions go next, shortcuts first, until 2500 fits.
    got = fit(items, steps, limit=2500)
    assert full == 5330 and got.fits and got.bytes <= 2500
    assert [s.label for s in got.applied[:2]] == ["the gradient row", "the deconvnet row"]
    left = set(got.left_out_layers)
    assert {"layer2.0.downsample.0", "layer1.0.downsample.0"} <= left
    assert not left & {"conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1"}
    assert got.settings() == {"attribution.methods": ("guided",)}
    groups = summary(items, got.applied)
    assert [g["group"] for g in groups] == ["attribution rows", "convolutions inside residual blocks"]
    assert groups[0]["what"] == ["the gradient row", "the deconvnet row"] and groups[0]["bytes"] == 1900
    assert groups[1]["bytes"] == sum(180 for _ in groups[1]["what"])  # 100 + 30 + one 50-byte row each
    line = describe(groups[1])
    assert line.startswith(f"convolutions inside residual blocks ({len(groups[1]['what'])}): layer2.0.downsample.0")


@pytest.mark.parametrize("limit", [1, 100])
def test_nothing_fits_below_the_stem(limit):
    layers = bottleneck_net()
    items = items_for(layers)
    got = fit(items, reductions(fake_ctx(layers), None, items), limit=limit)
    assert not got.fits  # every step taken, the stem and whole-model files remain
    assert {i.layer for i in got.items} == {"", "conv1"}


def test_a_smaller_size_chosen_twice_is_listed_once_at_its_final_size():
    items = [SiteItem("fv", "images", 4, 400, "A", tag="featurevis")]
    steps = [Reduction("feature-visualisation images", f"{s} px", "featurevis.image_size = 224",
                       replace=(SiteItem("fv", "images", 4, b, "A", tag="featurevis"),), setting=("featurevis.image_size", s))
             for s, b in ((128, 200), (64, 50))]
    got = fit(items, steps, limit=100)
    assert got.settings() == {"featurevis.image_size": 64}
    (group,) = summary(items, got.applied)
    assert group["what"] == ["64 px"] and group["bytes"] == 350
