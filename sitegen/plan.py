"""A build that plans itself: what it will show, how big the site will be and how long each pass
will take, decided and printed before any pass runs.

1. **Size.** Every view estimates the files it will write (:func:`sitegen.render.estimate.estimate_site`).
   When the site is over ``site.max_bytes`` and the user has not chosen the layers, the steps of
   :func:`reductions` (in the order documented in docs/planning.md) are applied by the pure
   :func:`sitegen.budget.fit` until it fits; what they leave out is said on the terminal and on
   the index page, with the setting that brings it back.  When the user has chosen the layers, an
   over-budget plan is refused before any work (:class:`BudgetError`), with the options.
2. **Time.** Every pass estimates its own work (``AnalysisPass.plan``) from a short probe of real
   batches on this device (:class:`sitegen.planning.Probe`); cached results cost nothing.

``sitegen plan`` prints the plan and stops; ``sitegen build`` prints it, runs, and compares the
estimates with what it measured.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from . import progress
from .budget import Fitted, Reduction, apply, describe, fit, summary
from .config import AttributionConfig, Config
from .context import BuildContext
from .errors import SitegenError
from .layers import LayerInfo, select
from .passes import default_passes
from .passes.base import Cache, Result
from .planning import PassPlan, Probe, SiteItem, SizeSamples, human_bytes, human_seconds, total


class BudgetError(SitegenError):
    """The site would exceed ``site.max_bytes`` and the build may not leave anything out."""


DEFAULT_METHODS = AttributionConfig().methods
HEADROOM = 0.9
"""Parts are left out until the estimate is within this share of ``site.max_bytes``: the estimate is
within about ±15 % of real sites, and a site over GitHub Pages' limit does not publish at all."""
FEATUREVIS_SIDES = (128, 64, 32)
"""Smaller feature-visualisation sizes the budget may choose, largest first."""
REMOVE = "--max-bytes 0 (or site.max_bytes = 0) builds everything, whatever the size"


@dataclass
class Plan:
    passes: list[PassPlan]
    items: list[SiteItem]
    """The site's files as the build will write them (after the budget's choices)."""
    fitted: Fitted
    missing_views: list[str]
    config: Config
    """The settings the build runs with: the user's, with the budget's choices applied."""
    left_out: list[dict[str, Any]] = field(default_factory=list)
    probe_seconds: float = 0.0
    images: int = 0
    layers: int = 0
    channels: int = 0
    device: str = "cpu"

    @property
    def seconds(self) -> float:
        return sum(p.seconds or 0.0 for p in self.passes)

    @property
    def site_bytes(self) -> float:
        return total(self.items)[1]

    @property
    def site_files(self) -> int:
        return total(self.items)[0]

    def estimate_of(self, name: str) -> PassPlan | None:
        return next((p for p in self.passes if p.name == name), None)

    def lines(self) -> list[str]:
        """The plan as printed before the passes start (and by ``sitegen plan``)."""
        out = [f"plan: {self.images:,} images, {self.layers} layers ({self.channels:,} channels), "
               f"device {self.device}" + (f"; probe {self.probe_seconds:.1f} s" if self.probe_seconds else "")]
        width = max([len(p.name) for p in self.passes] + [5])
        work_w = max([len(_work(p)) for p in self.passes] + [4])
        for p in self.passes:
            out.append(f"  {p.name:<{width}}  {_work(p):<{work_w}}  {_estimate(p)}")
        unknown = [p.name for p in self.passes if not p.estimated]
        tail = f" (+ {', '.join(unknown)}: no estimate)" if unknown else ""
        out.append(f"  {'total':<{width}}  {'':<{work_w}}  {human_seconds(self.seconds)}{tail}")
        limit = self.fitted.limit
        budget = f" (site.max_bytes {human_bytes(limit)})" if limit else " (no size limit)"
        out.append(f"site: about {human_bytes(self.site_bytes)} in {self.site_files:,} files{budget}")
        views: dict[str, list[float]] = {}
        for i in self.items:
            row = views.setdefault(i.view, [0, 0.0])
            row[0] += i.files
            row[1] += i.bytes
        out.append("  " + "; ".join(f"{v} {human_bytes(b)} / {int(f):,} files"
                                     for v, (f, b) in sorted(views.items(), key=lambda kv: -kv[1][1])))
        if self.missing_views:
            out.append(f"  no estimate for the views: {', '.join(self.missing_views)} (not counted)")
        if self.left_out:
            out.append(f"to fit {human_bytes(limit)} (from about {human_bytes(self.fitted.before)}), "
                       "the build leaves out:")
            for g in self.left_out:
                out.append(f"  - {describe(g)}; bring back: {g['restore']}")
            out.append(f"  or {REMOVE}")
        return out

    def record(self, measured: dict[str, float] | None = None, cached: dict[str, bool] | None = None) -> dict[str, Any]:
        """The plan beside what the build measured, for data/atlas.json's ``build`` record."""
        measured, cached = measured or {}, cached or {}
        rows = []
        for p in self.passes:
            row = p.to_dict()
            row["measured_seconds"] = round(measured[p.name], 3) if p.name in measured else None
            row["cached"] = bool(cached.get(p.name, p.cached))
            rows.append(row)
        return {"passes": rows, "estimated_seconds": round(self.seconds, 3),
                "site": {"estimated_bytes": int(self.site_bytes), "estimated_files": self.site_files,
                         "max_bytes": self.fitted.limit, "views_without_estimate": list(self.missing_views)},
                "left_out": [{"group": g["group"], "what": list(g["what"]), "restore": g["restore"],
                              "estimated_bytes": int(g["bytes"])} for g in self.left_out]}

    def page_notes(self) -> list[dict[str, Any]]:
        """What the index page says was left out (no byte counts: the page stays the same between
        rebuilds that make the same choices)."""
        return [{"group": g["group"], "what": list(g["what"]), "restore": g["restore"]} for g in self.left_out] \
            + ([{"group": "everything", "what": [], "restore": REMOVE}] if self.left_out else [])


def _work(p: PassPlan) -> str:
    return p.detail or ", ".join(f"{v:,} {k}" for k, v in p.work.items())


def _estimate(p: PassPlan) -> str:
    if p.cached:
        return "cached"
    if p.seconds is None:
        return f"no estimate ({p.note})" if p.note and p.note != "this pass has no estimate" else "no estimate"
    return human_seconds(p.seconds) + (f"  ({p.note})" if p.note else "")


# ---------------------------------------------------------------- budget


def _stem(ctx: BuildContext) -> str | None:
    return next((l.name for l in ctx.all_layers if l.kind == "conv"), None)


def inner_convolutions(layers: list[LayerInfo], stem: str | None) -> list[LayerInfo]:
    """Convolutions inside residual blocks, in the order the budget leaves them out: shortcut
    projections first, then the branch's inner convolutions, then each block's last branch
    convolution (the one the stage views pair with the block); deepest first within each."""
    inside = [l for l in layers if l.kind == "conv" and l.stage and l.name != stem]
    branch_outputs = {l.branch for l in layers if l.kind == "block" and l.branch}

    def rank(l: LayerInfo) -> int:
        if "downsample" in l.name or "shortcut" in l.name:
            return 0
        return 2 if l.name in branch_outputs else 1

    order = {l.name: i for i, l in enumerate(layers)}
    return sorted(inside, key=lambda l: (rank(l), -order[l.name]))


def reductions(ctx: BuildContext, sizes: SizeSamples, items: list[SiteItem]) -> list[Reduction]:
    """The reduction order, as steps over the plan's items (docs/planning.md):

    1. attribution rows beyond the first method (the last method first), when
       ``attribution.methods`` is at its default;
    2. convolutions inside residual blocks (:func:`inner_convolutions`), when ``layers`` is not set;
    3. smaller feature-visualisation images (128, 64, 32 px), when ``featurevis.image_size`` is 0;
    4. the remaining attribution row (attribution off), when ``attribution.methods`` is at its default;
    5. the other layers, deepest first, keeping the stem (the first convolution), when ``layers``
       is not set.

    The residual stream (block outputs) and the stem go last: they are what the stage views follow.
    The sanity checks are no step of their own (a page and a chart per method, and a few lines on
    the pages: cheap beside the sprites): a method's figures go with its row, the rest with
    attribution.  In a comparison build the old checkpoint's sprites, sections and tiles go with
    their layer, and its feature-visualisation images are drawn smaller with the new model's.
    """
    cfg = ctx.config
    steps: list[Reduction] = []
    methods = tuple(cfg.attribution.methods)
    auto_methods = cfg.attribution.enabled and methods == DEFAULT_METHODS
    auto_layers = not cfg.layers
    restore_layers = "--layer NAME (repeatable) or layers = [...] in site_config.toml, with --max-bytes 0 if need be"
    if auto_methods:
        for i in range(len(methods) - 1, 0, -1):
            steps.append(Reduction("attribution rows", f"the {methods[i]} row", "attribution.methods = "
                                   + "[" + ", ".join(f'"{m}"' for m in methods) + "] in site_config.toml",
                                   tags=(f"attribution:{methods[i]}",), setting=("attribution.methods", methods[:i])))
    stem = _stem(ctx)
    if auto_layers:
        for l in inner_convolutions(ctx.layers, stem):
            steps.append(Reduction("convolutions inside residual blocks", l.name, restore_layers, layers=(l.name,)))
    if cfg.featurevis.enabled and cfg.featurevis.image_size == 0:
        from .render.views.featurevis import FeatureVisView

        from .render.views.compare import CompareView

        h, w = ctx.input_size
        for side in FEATUREVIS_SIDES:
            if side >= min(h, w):
                continue
            smaller = dataclasses.replace(ctx, config=_with(cfg, "featurevis.image_size", side))
            # The new model's images and, in a comparison build, the old model's: both drawn smaller.
            drawn = [i for v in (FeatureVisView(), CompareView()) for i in v.estimate(smaller, sizes) or []]
            new = [i for i in _marked(drawn) if i.tag == "featurevis"]
            steps.append(Reduction("feature-visualisation images", f"{side}×{side} px instead of {w}×{h} px",
                                   f"featurevis.image_size = {max(h, w)} in site_config.toml", replace=tuple(new),
                                   setting=("featurevis.image_size", side)))
    if auto_methods:
        checks = " and the sanity checks" if cfg.sanity.enabled else ""
        steps.append(Reduction("attribution", f"the {methods[0]} row, the stage pages{checks} (attribution off)",
                               "attribution.enabled = true in site_config.toml",
                               tags=(f"attribution:{methods[0]}", "attribution"), setting=("attribution.enabled", False)))
    if auto_layers:
        inner = {l.name for l in inner_convolutions(ctx.layers, stem)}
        for l in reversed(ctx.layers):
            if l.name != stem and l.name not in inner:
                steps.append(Reduction("layers", l.name, restore_layers, layers=(l.name,)))
    return steps


def _marked(items: list[SiteItem]) -> list[SiteItem]:
    from .render.estimate import with_marker

    return [with_marker(i) for i in items or []]


def _with(cfg: Config, key: str, value: Any) -> Config:
    section, name = key.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


def apply_choices(ctx: BuildContext, fitted: Fitted) -> BuildContext:
    """The context the build runs with: the layers left out removed, the settings changed."""
    cfg = ctx.config
    for key, value in fitted.settings().items():
        cfg = _with(cfg, key, value)
    gone = set(fitted.left_out_layers)
    if gone:
        cfg = dataclasses.replace(cfg, layers=tuple(l.name for l in ctx.layers if l.name not in gone))
    if cfg is ctx.config:
        return ctx
    return dataclasses.replace(ctx, config=cfg, layers=select(ctx.all_layers, cfg.layers) if gone else ctx.layers)


def refusal(items: list[SiteItem], steps: list[Reduction], limit: int) -> BudgetError:
    """The error for an over-budget plan the build may not reduce: the estimate and the options,
    each with what it would save on its own."""
    size = total(items)[1]
    groups: dict[str, list[Reduction]] = {}
    for s in steps:
        groups.setdefault(s.group, []).append(s)
    options = []
    for name, group in groups.items():
        current = list(items)
        for s in group:
            current = apply(current, s)
        saved = size - total(current)[1]
        if saved <= 0:
            continue
        setting = group[-1].setting
        if setting is not None:
            value = setting[1]
            shown = "[" + ", ".join(f'"{m}"' for m in value) + "]" if isinstance(value, tuple) else \
                str(value).lower() if isinstance(value, bool) else value
            options.append(f"{setting[0]} = {shown} saves about {human_bytes(saved)}")
        else:
            names = ", ".join(s.label for s in group[:3]) + (", …" if len(group) > 3 else "")
            options.append(f"leaving out the {len(group)} {name} ({names}) saves about {human_bytes(saved)}")
    hint = "; ".join(options)
    hint = (f"{hint}; or " if hint else "") + "choose fewer layers, or --max-bytes 0 to build it anyway"
    return BudgetError(f"the atlas would be about {human_bytes(size)} in {total(items)[0]:,} files, over "
                       f"site.max_bytes ({human_bytes(limit)}{', GitHub Pages’ limit' if limit == 10 ** 9 else ''}); "
                       "nothing was computed", hint)


def _as_if_unchosen(ctx: BuildContext) -> BuildContext:
    """The same context with the settings the budget may change put back to their defaults (for
    listing the options of a refused plan)."""
    cfg = dataclasses.replace(ctx.config, layers=())
    cfg = _with(cfg, "attribution.methods", DEFAULT_METHODS)
    cfg = _with(cfg, "featurevis.image_size", 0)
    return dataclasses.replace(ctx, config=cfg)


def choose(ctx: BuildContext, sizes: SizeSamples) -> tuple[BuildContext, list[SiteItem], Fitted, list[str],
                                                               list[dict[str, Any]]]:
    """The size half of the plan: estimate, fit into ``site.max_bytes``, or refuse."""
    from .render.estimate import estimate_site

    limit = ctx.config.site.max_bytes
    items, missing = estimate_site(ctx, sizes)
    # Given layers, the user has chosen what to show: nothing is left out behind their back.
    steps = reductions(ctx, sizes, items) if limit > 0 and not ctx.config.layers else []
    fitted = fit(items, steps, int(limit * HEADROOM))
    fitted.limit = limit
    if limit > 0 and fitted.bytes > limit:
        if ctx.config.layers:  # the user chose: refuse, with what each option would save
            listed = reductions(_as_if_unchosen(ctx), sizes, items)
            raise refusal(items, [s for s in listed if s.group != "layers"], limit)
        raise BudgetError(f"even with everything the size budget may leave out, the atlas would be about "
                          f"{human_bytes(fitted.bytes)}, over site.max_bytes ({human_bytes(limit)})",
                          "choose a few layers (--layer), lower topk.k or site.patch_size, or --max-bytes 0 "
                          "to build it anyway")
    left_out = summary(items, fitted.applied)
    return apply_choices(ctx, fitted), fitted.items, fitted, missing, left_out


# ---------------------------------------------------------------- time


def estimate_passes(ctx: BuildContext, cache: Cache | None, probe: Probe) -> list[PassPlan]:
    """Each pass's own estimate; a cached result costs nothing.  A pass whose estimate fails for a
    reason other than bad input is shown as "no estimate" with why, and the build goes on."""
    plans = []
    for p in default_passes(ctx.config):
        if cache is not None and _cached(p, ctx, cache):
            plans.append(PassPlan(p.name, 0.0, note="cached result", cached=True))
            continue
        try:
            plans.append(p.plan(ctx, probe))
        except SitegenError:
            raise
        except Exception as e:  # an estimate must never stop a build that would work
            plans.append(PassPlan(p.name, None, note=f"estimate failed: {type(e).__name__}: {str(e)[:80]}"))
    return plans


def _cached(p, ctx: BuildContext, cache: Cache) -> bool:
    """Whether the pass's result is in the cache.  A hit is read into ``ctx.results`` (the passes are
    asked in build order), so the keys of later passes that depend on earlier results come out as in
    the build: the attribution pass's on the dataset pass's result (read whole), the sanity checks'
    on both (the attribution result's metadata is all its key reads).  A key that needs a result
    not in the cache cannot be computed: the pass counts as not cached."""
    if cache.root is None:
        return False
    try:
        key = p.cache_key(ctx)
        folder = cache.folder(p, key)
        if folder is None or not (folder / "meta.json").is_file():
            return False
        if p.name == "topk":
            hit = cache.get(p, key)
            if hit is None:
                return False
        else:
            hit = Result(meta=json.loads((folder / "meta.json").read_text(encoding="utf-8")))
        ctx.results[p.name] = hit
        return True
    except Exception:  # a key that needs results not available yet
        return False


def make_plan(ctx: BuildContext, cache: Cache | None = None, *, timed: bool = True) -> tuple[Plan, BuildContext]:
    """Decide what the build shows (size budget) and estimate its passes; returns the plan and the
    context to build with.  Raises :class:`BudgetError` for a plan that may not be reduced."""
    t0 = time.perf_counter()
    sizes = SizeSamples(ctx)
    # Silenced: the probe runs passes' own code on a few images; what it would say (progress,
    # warnings about the model) the passes say themselves when they run.
    with progress.silenced(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chosen, items, fitted, missing, left_out = choose(ctx, sizes)
        probe = Probe(chosen)
        passes = estimate_passes(chosen, cache, probe) if timed and chosen.dist.is_main else []
    chosen.results.clear()  # cached results read for keys are read again by the build
    plan = Plan(passes=passes, items=items, fitted=fitted, missing_views=missing, config=chosen.config,
                left_out=left_out, probe_seconds=time.perf_counter() - t0, images=len(chosen.images),
                layers=len(chosen.layers), channels=sum(l.channels for l in chosen.layers), device=chosen.device.type)
    return plan, chosen


def announce(plan: Plan | None, name: str, elapsed: float) -> None:
    """Before a pass: its estimate and about how long the passes left will take: the plan's estimates,
    scaled by how the build has kept to the plan so far once a tenth of the planned time is done
    (before, one quick pass would say little about the others)."""
    if plan is None:
        return
    p = plan.estimate_of(name)
    if p is None or p.cached or p.seconds is None:
        return
    done = 0.0
    for q in plan.passes:
        if q.name == name:
            break
        done += q.seconds or 0.0
    pace = elapsed / done if done >= 0.1 * plan.seconds and done > 1.0 and elapsed > 0 else 1.0
    left = sum(q.seconds or 0.0 for q in plan.passes[plan.passes.index(p):]) * pace
    progress.info(f"{name}: estimated {human_seconds(p.seconds)}; about {human_seconds(left)} of passes left"
                  + (f" (the passes so far took {pace:.2g}× their estimates)" if pace != 1.0 else ""))


def comparison(plan: Plan, timings: dict[str, float], cached: dict[str, bool], site_bytes: int,
               site_files: int) -> list[str]:
    """After the build: the estimate of each pass beside what it took, and the site's."""
    width = max([len(p.name) for p in plan.passes] + [4])
    out = [f"  {'pass':<{width}}  {'estimated':>12}  {'measured':>12}  ratio"]
    for p in plan.passes:
        got = timings.get(f"pass:{p.name}")
        if got is None:
            continue
        est = "cached" if cached.get(p.name) else human_seconds(p.seconds)
        ratio = f"{got / p.seconds:.2f}" if p.seconds and not cached.get(p.name) else "—"
        out.append(f"  {p.name:<{width}}  {est:>12}  {human_seconds(got):>12}  {ratio}")
    ratio = f"{site_bytes / plan.site_bytes:.2f}" if plan.site_bytes else "—"
    out.append(f"  {'site':<{width}}  {human_bytes(plan.site_bytes):>12}  {human_bytes(site_bytes):>12}  {ratio}"
               f"  ({plan.site_files:,} files estimated, {site_files:,} written)")
    return ["estimated and measured:"] + out
