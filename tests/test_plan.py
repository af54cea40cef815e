"""The build's plan: its estimates against real builds of small models, the time model's arithmetic,
the size budget end to end (the index page, atlas.json), the refusal, and `sitegen plan`.

Tolerances.  File counts are structural and must match exactly.  Bytes: pictures are measured on a
few files drawn from the user's images and HTML follows constants measured on real atlases, so the
estimate of a whole site lands within a few per cent on these builds; the test allows ±20 % (the
random sample of channels a layer's sprites are measured on, and the content of the pictures,
differ from build to build).  Time: the machine running the tests is shared and noisy, so no test
compares a timing with a timing; the estimates' arithmetic is checked against the probe's own
measurements (a probe that returns fixed fits), and a real probe is only required to give every
pass a finite, positive estimate.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from sitegen import progress
from sitegen.build import build, load_config, prepare
from sitegen.cli import main
from sitegen.config import from_dict
from sitegen.passes import default_passes
from sitegen.passes.base import AnalysisPass
from sitegen.plan import BudgetError, Plan, estimate_passes, make_plan
from sitegen.planning import Fit, PassPlan, Probe, total

TESTS = Path(__file__).resolve().parent
RESNET_ARCH = f"{TESTS / 'tiny_models.py'}:tiny_resnet"
# Every view on, each with its work cut down (as the small atlas of the site tests).
SMALL = {"samples": {"per_class": 1, "max_images": 3}, "tsne": {"iterations": 250, "perplexity": 5.0},
         "featurevis": {"steps": 2}}


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return e.value.code or 0, captured.out, captured.err


@pytest.fixture(scope="module")
def resnet_setup(tmp_path_factory):
    import numpy as np
    from PIL import Image

    from sitegen.model_loading import build_architecture

    root = tmp_path_factory.mktemp("plan")
    images = root / "imgs"
    rng = np.random.default_rng(0)
    for i in range(12):  # random 16-px images in three class folders
        (images / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"c{i % 3}" / f"{i:02d}.png")
    ckpt = root / "tiny_resnet.pt"
    torch.save(build_architecture(RESNET_ARCH, None).state_dict(), ckpt)
    return root, ckpt, images


@pytest.fixture(scope="module")
def resnet_build(resnet_setup):
    """A real build of the tiny residual network (stages, inner convolutions, a projection shortcut)
    with every view, and its report (which carries the plan made before the passes ran)."""
    root, ckpt, images = resnet_setup
    cfg = from_dict({"model": {"arch": RESNET_ARCH}, **SMALL})
    progress.set_quiet(True)
    try:
        report = build(ckpt, images, root / "site", cfg, cache_dir=None)
    finally:
        progress.set_quiet(False)
    return report, root / "site"


def site_files(site: Path) -> list[Path]:
    return [p for p in site.rglob("*") if p.is_file()]


def test_the_site_estimate_matches_a_real_build(resnet_build):
    report, site = resnet_build
    plan = report.plan
    files = site_files(site)
    assert plan.site_files == len(files) == report.site_files  # every file foreseen, none extra
    measured = sum(p.stat().st_size for p in files)
    assert 0.8 <= measured / plan.site_bytes <= 1.2, (measured, plan.site_bytes)
    # the views are all estimated, and each file kind is foreseen in number
    assert plan.missing_views == []
    by_kind: dict[str, int] = {}
    for i in plan.items:
        by_kind[i.what] = by_kind.get(i.what, 0) + i.files
    assert by_kind["sprites"] == len(list((site / "img").glob("layer*/[0-9]*.webp"))) \
        + len(list((site / "img" / "conv1").glob("[0-9]*.webp")))
    assert by_kind["stage pages"] == len(list((site / "stages").glob("*/*.html")))
    assert by_kind["feature-vis images"] == len(list(site.rglob("*.fv.png")))


def test_a_comparison_build_is_estimated_too(resnet_setup, tmp_path):
    """With --compare the old model's sprites, feature-vis images, sections, by-change pages and the
    changes pages are foreseen as well: every file, and the bytes within the same ±20 %; the
    comparison and the sanity checks have their own time estimates."""
    root, ckpt, images = resnet_setup
    from sitegen.model_loading import build_architecture

    torch.manual_seed(1)  # another set of weights of the same architecture
    old = tmp_path / "old.pt"
    torch.save(build_architecture(RESNET_ARCH, None).state_dict(), old)
    cfg = from_dict({"model": {"arch": RESNET_ARCH}, "compare": {"checkpoint": str(old)}, **SMALL})
    progress.set_quiet(True)
    try:
        report = build(ckpt, images, tmp_path / "site", cfg, cache_dir=None)
    finally:
        progress.set_quiet(False)
    plan, files = report.plan, site_files(tmp_path / "site")
    assert plan.missing_views == []
    assert plan.site_files == len(files), (plan.site_files, len(files))
    measured = sum(p.stat().st_size for p in files)
    assert 0.8 <= measured / plan.site_bytes <= 1.2, (measured, plan.site_bytes)
    by_kind: dict[str, int] = {}
    for i in plan.items:
        by_kind[i.what] = by_kind.get(i.what, 0) + i.files
    assert by_kind["old sprites"] == len(list((tmp_path / "site").rglob("*.old.webp")))
    seconds = {p.name: p.seconds for p in plan.passes}
    assert {"compare", "sanity"} <= set(seconds)
    assert all(s is not None and 0 < s < 3600 for s in seconds.values()), seconds


def test_every_pass_has_an_estimate_and_the_build_records_it(resnet_build):
    report, site = resnet_build
    plan = report.plan
    names = [p.name for p in default_passes(plan.config)]
    assert [p.name for p in plan.passes] == names
    for p in plan.passes:
        assert p.seconds is not None and 0 < p.seconds < 3600, p
    record = json.loads((site / "data" / "atlas.json").read_text())["build"]
    assert [r["name"] for r in record["passes"]] == names
    for r in record["passes"]:
        assert r["seconds"] is not None and r["measured_seconds"] is not None and r["measured_seconds"] >= 0
    assert record["site"]["estimated_files"] == plan.site_files
    assert record["site"]["max_bytes"] == 10 ** 9 and record["left_out"] == []
    # nothing left out: the index page says nothing about a budget
    assert "Left out to fit" not in (site / "index.html").read_text()


class FixedProbe(Probe):
    """A probe whose every fit is the same known line and whose every timed call takes 0.1 s (it never
    runs the function): the estimates must then be the work multiplied out."""

    FIT = Fit(0.5, 0.25)

    def fit(self, key, fn, cap, target=None, warm=True, workers=1):
        self.keys.append(key)
        return self.FIT.scaled(1 / workers)

    def time(self, fn):
        return 0.1

    def decode_seconds(self):
        return 0.01

    def depth(self, layer):
        names = [l.name for l in self.ctx.all_layers]
        return 1.0 if layer is None else (names.index(layer) + 1) / len(names)


@pytest.mark.usefixtures("inline_items")
def test_pass_estimates_multiply_the_probe_out_over_the_work(resnet_setup):
    _root, ckpt, images = resnet_setup
    ctx = prepare(ckpt, images, from_dict({"model": {"arch": RESNET_ARCH}, **SMALL}), None)
    probe = FixedProbe(ctx)
    probe.keys = []
    plans = {p.name: p for p in estimate_passes(ctx, None, probe)}
    f, n = FixedProbe.FIT, len(ctx.images)
    batch = ctx.batch_size(0)
    assert plans["topk"].seconds == pytest.approx(f.batched(n, batch))
    k = min(ctx.config.topk.k, n)
    units = {l.name: l.channels * k for l in ctx.layers}
    assert plans["attribution"].work["units"] == sum(units.values())
    # The tiny residual network has no max-pooling: deconvnet's pictures (a third of the batch time)
    # are computed once per channel inside the image and per unit at the border.
    from sitegen.attribution import image_independent

    h, w = ctx.input_size
    expected = 0.0
    for l in ctx.layers:
        u = units[l.name]
        assert image_independent(ctx.net, l.name, "deconvnet", (3, h, w))
        fields = [l.rf.box(y, x) for y in range(l.shape[1]) for x in range(l.shape[2])]
        inside = sum(x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h for x0, y0, x1, y1 in fields)
        shared = min(u, round(u * (1 - inside / len(fields))) + (l.channels if inside else 0))
        if shared <= 0.9 * u:  # computed apart only when that leaves out a tenth of the units
            expected += f.batched(u, batch) * 2 / 3 + f.batched(shared, batch) / 3
        else:
            expected += f.batched(u, batch)
    assert plans["attribution"].seconds == pytest.approx(expected + min(n, sum(units.values())) * 0.01)
    from sitegen.passes.featurevis import MEASURE_STEPS, PROBE_STEPS

    steps = ctx.config.featurevis.steps
    scaled = f.scaled((steps + MEASURE_STEPS) / (PROBE_STEPS + MEASURE_STEPS))
    per_layer = sum(scaled.batched(l.channels, 64) for l in ctx.layers)
    classes = plans["featurevis"].work["classes"]
    assert classes == 3
    assert plans["featurevis"].seconds == pytest.approx(per_layer + scaled.batched(classes, 64) + n * 0.01)
    samples = plans["occlusion"].work["images"]
    assert samples == 3
    assert plans["occlusion"].seconds == pytest.approx(
        f.batched(plans["occlusion"].work["copies"], 256) + f.batched(samples, batch) + samples * 0.01)
    assert plans["activations"].seconds == pytest.approx(f.batched(samples, batch) + samples * 0.01)
    # the layers between measured ones are interpolated, not measured: at most three per pass
    assert sum(key.startswith("attribution@") for key in probe.keys) <= 3


def test_passes_on_a_pool_are_estimated_at_its_throughput(resnet_setup, monkeypatch):
    """With their batches on a pool of 2 one-thread workers, the attribution and feature-vis
    estimates are the inline ones halved (decoding, which the build does, is not)."""
    from sitegen.context import BuildContext

    _root, ckpt, images = resnet_setup
    ctx = prepare(ckpt, images, from_dict({"model": {"arch": RESNET_ARCH}, **SMALL}), None)
    plans = {}
    for workers in (1, 2):
        monkeypatch.setattr(BuildContext, "pass_workers", lambda self, batch, w=workers: w)
        probe = FixedProbe(ctx)
        probe.keys = []
        plans[workers] = {p.name: p.seconds for p in estimate_passes(ctx, None, probe)}
    n = len(ctx.images)
    for name in ("attribution", "featurevis"):
        assert plans[2][name] - n * 0.01 == pytest.approx((plans[1][name] - n * 0.01) / 2), name
    assert plans[2]["topk"] == plans[1]["topk"]  # the dataset pass runs on threads


def test_a_pooled_fit_is_the_one_thread_fit_over_the_workers(resnet_setup):
    _root, ckpt, images = resnet_setup
    ctx = prepare(ckpt, images, from_dict({"model": {"arch": RESNET_ARCH}, **SMALL}), None)
    probe = Probe(ctx)
    threads, seen = torch.get_num_threads(), []

    def run(n: int) -> None:
        seen.append(torch.get_num_threads())
        time.sleep(0.01 * n)

    pooled = probe.fit("sleep", run, cap=4, workers=2)
    one = probe.remember("sleep:one thread")
    assert set(seen) == {1} and torch.get_num_threads() == threads
    assert pooled.per_item == pytest.approx(one.per_item / 2) and pooled.fixed == pytest.approx(one.fixed / 2)
    assert one.per_item == pytest.approx(0.01, rel=0.5)


def test_a_real_probe_times_each_pass_with_its_own_code(resnet_setup):
    _root, ckpt, images = resnet_setup
    ctx = prepare(ckpt, images, from_dict({"model": {"arch": RESNET_ARCH}, **SMALL}), None)
    probe = Probe(ctx)
    with progress.silenced():
        plans = estimate_passes(ctx, None, probe)
    assert all(p.seconds is not None and p.seconds >= 0 for p in plans), plans
    for key in ("topk", "occlusion", "activations"):
        fit = probe.remember(key)
        assert fit is not None and fit.per_item > 0
    anchors = probe.anchors([l.name for l in ctx.layers], 3)
    assert anchors[0] == "conv1" and anchors[-1] == "layer2.0" and len(anchors) == 3
    assert probe.seconds_spent > 0


class Unplanned(AnalysisPass):
    name = "unplanned"


def test_a_pass_or_view_without_an_estimate_is_said_to_have_none(resnet_setup, monkeypatch):
    assert Unplanned().plan(None, None).seconds is None
    import sitegen.plan as plan_mod
    from sitegen.render.views.base import View

    real = plan_mod.default_passes
    monkeypatch.setattr(plan_mod, "default_passes", lambda cfg: real(cfg) + [Unplanned()])
    import sitegen.render.estimate as estimate_mod

    def broken(self, ctx, sizes):
        raise RuntimeError("a bug in an estimate")

    registered = estimate_mod.registered
    extra = [type("Silent", (View,), {"name": "silent"})(), type("Broken", (View,), {"name": "broken", "estimate": broken})()]
    monkeypatch.setattr(estimate_mod, "registered", lambda: registered() + extra)
    _root, ckpt, images = resnet_setup
    cfg = from_dict({"model": {"arch": RESNET_ARCH}, **SMALL})
    plan, _ = make_plan(prepare(ckpt, images, cfg, None), None)
    text = "\n".join(plan.lines())
    assert "unplanned" in text and "no estimate" in text
    assert "(+ unplanned: no estimate)" in text  # the total says what it does not count
    assert "no estimate for the views: silent, broken (estimate failed: RuntimeError: a bug in an estimate)" in text


def test_a_build_over_the_budget_leaves_out_rows_and_says_so(resnet_setup, tmp_path, capsys):
    """Not given layers, the build drops the deconvnet and gradient rows to fit, and says so on the
    terminal, on the index page and in atlas.json; the real site is under the budget."""
    _root, ckpt, images = resnet_setup
    cfg = from_dict({"model": {"arch": RESNET_ARCH}, **SMALL})
    full, _ = make_plan(prepare(ckpt, images, cfg, None), None, timed=False)
    rows = sum(i.bytes for i in full.items if i.tag in ("attribution:deconvnet", "attribution:gradient"))
    limit = int(full.site_bytes - rows / 2)  # under the full site, well over the site without the rows
    out = tmp_path / "site"
    code, _, err = run_cli(["build", str(ckpt), "--images", str(images), "--arch", RESNET_ARCH, "-o", str(out),
                            "--no-cache", "--max-bytes", str(limit), "-c", str(_toml(tmp_path))], capsys)
    assert code == 0, err
    assert "the build leaves out:" in err and "attribution rows (2): the gradient row, the deconvnet row" in err
    assert "--max-bytes 0" in err
    size = sum(p.stat().st_size for p in site_files(out))
    assert size <= limit
    index = (out / "index.html").read_text()
    assert "Left out to fit the size budget" in index and "the gradient row" in index
    assert "attribution.methods" in index
    record = json.loads((out / "data" / "atlas.json").read_text())["build"]
    assert record["left_out"][0]["group"] == "attribution rows"
    assert record["site"]["max_bytes"] == limit
    from PIL import Image

    with Image.open(out / "img" / "conv1" / "0.webp") as im:
        assert im.height == 2 * 3  # the patches and one attribution row, at conv1's 3-px windows


def _toml(tmp_path: Path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text('[samples]\nper_class = 1\nmax_images = 3\n[tsne]\niterations = 250\nperplexity = 5.0\n'
                    '[featurevis]\nsteps = 2\n', encoding="utf-8")
    return path


def test_a_build_given_layers_over_the_budget_is_refused_before_any_work(resnet_setup, tmp_path, capsys):
    _root, ckpt, images = resnet_setup
    out, cache = tmp_path / "site", tmp_path / "cache"
    code, _, err = run_cli(["build", str(ckpt), "--images", str(images), "--arch", RESNET_ARCH, "-o", str(out),
                            "--cache-dir", str(cache), "--layer", "layer*", "--max-bytes", "20000"], capsys)
    assert code == 2
    assert "over site.max_bytes (20 kB)" in err and "nothing was computed" in err
    assert "attribution.methods = [\"guided\"] saves about" in err and "--max-bytes 0" in err
    assert "convolutions inside residual blocks" in err
    assert not out.exists()
    assert not [p for p in cache.rglob("*") if p.is_dir() and "-" in p.name and not p.name.startswith("layers-")]


def test_plan_prints_the_plan_and_writes_nothing(resnet_setup, tmp_path, capsys):
    _root, ckpt, images = resnet_setup
    out = tmp_path / "site"
    code, stdout, err = run_cli(["plan", str(ckpt), "--images", str(images), "--arch", RESNET_ARCH, "-o", str(out),
                                 "--no-cache", "-c", str(_toml(tmp_path))], capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("plan: 12 images, 8 layers")
    for name in ("topk", "attribution", "occlusion", "tsne", "kernels", "activations", "featurevis", "correspondence"):
        assert any(line.split()[:1] == [name] for line in lines), name
    assert any(line.strip().startswith("total") for line in lines)
    assert any(line.startswith("site: about") and "files" in line for line in lines)
    assert not out.exists()


def test_plan_refuses_what_the_build_would_refuse(resnet_setup, tmp_path, capsys):
    """`sitegen plan` tells what `build` with the same flags would do: an output folder inside the
    images folder, or a folder of other files without --force, is refused the same way."""
    _root, ckpt, images = resnet_setup
    for out, words in ((images / "atlas", "is inside the images folder"), (tmp_path, "is not empty")):
        (tmp_path / "mine.txt").write_text("the user's file")
        code, stdout, err = run_cli(["plan", str(ckpt), "--images", str(images), "--arch", RESNET_ARCH,
                                     "-o", str(out), "--no-cache"], capsys)
        assert code == 2 and words in err and "hint:" in err and stdout == "", err
    assert not (images / "atlas").exists() and (tmp_path / "mine.txt").read_text() == "the user's file"


def test_plain_progress_lines_carry_an_eta(capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with progress.bar("work", 10, "items") as advance:
        for _ in range(10):
            advance(1)
    err = capsys.readouterr().err.splitlines()
    assert "ETA" in err[0] and err[0].startswith("work: 1/10 items")
    assert "ETA" not in err[-1]  # done: nothing left to wait for
    assert progress.clock(3725) == "1:02:05" and progress.clock(65) == "1:05"


def test_the_plan_lines_and_record_round_trip():
    from sitegen.budget import Fitted

    plan = Plan(passes=[PassPlan("topk", 12.0, {"images": 10}, "10 images"), PassPlan("x", None, note="why")],
                items=[], fitted=Fitted([], [], 0.0, 0, 10 ** 9), missing_views=[], config=load_config(None))
    text = "\n".join(plan.lines())
    assert "topk" in text and "12 s" in text and "no estimate (why)" in text
    record = plan.record({"topk": 11.0}, {"topk": False})
    assert record["passes"][0]["measured_seconds"] == 11.0 and record["passes"][1]["seconds"] is None
    assert total([]) == (0, 0.0)
