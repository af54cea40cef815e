"""The attribution pass: guided backprop, deconvnet and gradient for every top-k unit.

For every selected layer, channel and top-k entry, the unit is the channel at the recorded position
in that image; :func:`sitegen.attribution.attribute` back-propagates from it alone to the input
pixels with each configured rule.

Speed
-----
All (image, unit) pairs of one layer are grouped by image (an image is often among the top-k of
several channels of a layer) and cut into batches of ``batch_size`` distinct images.  Each batch is
one forward of its images, stopped right after the layer, kept for the backward passes: per method,
one backward per round of one unit per image (``attribute_methods`` with ``rows``: the rule is
chosen as each backward runs).  So every image's forward serves all its units in the layer, and the
work is one forward per distinct image plus one backward per unit and method, against a forward
*and* a backward per unit before.  A batch's images all have the same number of units, so no
round's backward runs rows without a unit.  How much this saves depends on how often an image is
among the top-k of several channels of a layer: on the shared ResNet-56 over the 10,000 CIFAR-10
test images, 27,360 units need 23,674 forwards (13 % fewer), the multiply-accumulates 3.6 % fewer.  Under torchrun the
batches are shared out among the ranks and rank 0 gathers the crops.  Each image is decoded once
per layer at most (a byte-bounded pixel cache keeps it across the layer's batches and, when it
fits, across layers).  A forward cannot be shared between layers: the layer's output is where each
backward starts, and the forward stops right after it.

Where deconvnet's picture is proved the same on every image (:func:`image_independent`: no
max-pooling, gate or other forward-reading step before the layer), it is left out of the layer's
batches and computed once per channel for the units whose field lies inside the image and once per
channel and position at the border (:class:`Sharing`), several rounds of them on one forward of any
images; on the shared ResNet-56 this took the pass from 6.87 to 6.48 times the bare forward's
multiply-accumulates (``bench/attribution_bench.py``'s ``mac_floor``).

Every forward and backward folds eval-mode BatchNorm into the convolution before it where nothing
else reads that output (else runs it as its affine map) and, on the CPU where the model accepts it,
runs channels-last (:meth:`BuildContext.backward_channels_last`, :mod:`sitegen.fastops`): the same
pictures to float rounding, 13.7–14.7 s against 19.2–21.2 s before for 8 layers of the shared
ResNet-56 over 1,000 images (``native_batch_norm``'s backward is slow on channels-last maps, and
mixed layouts slower still, so these go together).

Storage
-------
The renderer only reads, so the pass stores what the page shows and nothing more: for each unit
and method, the attribution inside the unit's display window
(:func:`sitegen.crops.display_box`, the very crop of its top-k patch), already turned
into a display image by :func:`sitegen.attribution.normalise_for_display` (uint8 RGB, grey = 0).
Raw float maps of the whole input would cost ``3·H·W·4`` bytes per unit and method (12 KiB on
CIFAR, 588 KiB on 224-px images); the uint8 crop costs ``3·s²`` with ``s = min(window, max_side)``
(at most 3 KiB on CIFAR, whose windows are ≤ 32 px, so nothing is resampled there).  Windows wider
than ``max_side`` (64 by default) are shrunk with a box filter, as the sprite shrinks patches:
beside a 96-px patch, a 64-px attribution drawn at 96 px is a little softer, at 44 % of the bytes.
The arrays are ``Σ_layers C·k·methods·s²·3`` bytes: for the shared ResNet-56 with every layer
(82 layers, 3040 channels, k = 9, three methods) 223 MiB, against 0.47 GiB for whole float16 maps
and 2.1 GiB for patch-sized (96 px) copies; ``bench/attribution_bench.py`` reports the cache entry.

Meta ``activations``: :func:`sitegen.activation_rules.find_activations` on one of the atlas's images
(every activation kind, how it is called, the rule of each method, and for each selected layer the
kinds without a rule on its path), for the index page's table and the channel pages' notes.

Arrays: ``L{i}.{method}`` uint8 ``(C, k, s, s, 3)`` for layer ``i`` of ``meta["layers"]`` (the
top-k pass's order); slots of missing entries (fewer usable images than k) are plain grey.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import progress
from ..activation_rules import ActivationReport, find_activations
from ..attribution import AttributionWarning, attribute_methods, image_independent, normalise_many_for_display
from ..config import AttributionConfig
from ..context import BuildContext
from ..distributed import all_reduce, gather_to_main
from ..errors import SitegenError
from ..images import load_pixels, normalise
from ..crops import GREY, PixelCache, display_box, resize_square
from ..planning import Fit, PassPlan, Probe, count
from ..workpool import map_items
from .base import AnalysisPass, ItemStore, Result

PERCENTILE = 99.0
"""Per-image scale of the display normalisation (``normalise_for_display``'s default)."""


@dataclass
class LayerPlan:
    """The (image, unit) pairs of one layer, grouped by image (see :func:`plan_layer`)."""

    index: int
    name: str
    channels: int
    window: int
    """Side in input pixels of every unit's display window in this layer."""
    side: int
    """Side of the stored crops: ``min(window, max_side)``."""
    c: np.ndarray
    j: np.ndarray
    """Slot in the channel's top-k list."""
    image: np.ndarray
    y: np.ndarray
    x: np.ndarray
    x0: np.ndarray
    y0: np.ndarray
    """Top-left corner of each display window (may lie outside the image)."""

    def __len__(self) -> int:
        return len(self.c)

    def batches(self, images: int) -> list[slice]:
        """Consecutive runs of pairs covering at most ``images`` distinct images, each image whole,
        and all of a run's images with the same number of units: its backward rounds (one unit per
        image each) then leave no row idle."""
        if not len(self):
            return []
        starts = np.flatnonzero(np.r_[True, self.image[1:] != self.image[:-1]])
        units = np.diff(np.r_[starts, len(self)])
        edges, first = [0], 0
        for i in range(1, len(starts)):
            if units[i] != units[first] or i - first == images:
                edges.append(int(starts[i]))
                first = i
        edges.append(len(self))
        return [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]


def plan_layer(ctx: BuildContext, topk: Result, li: int, max_side: int) -> LayerPlan:
    name = topk.meta["layers"][li]
    info = ctx.layer(name)
    a = topk.arrays
    valid = np.isfinite(a[f"L{li}.values"])  # fewer usable images than k leaves -inf slots
    c, j = np.nonzero(valid)
    image, y, x = (a[f"L{li}.{key}"][c, j].astype(np.int64) for key in ("images", "y", "x"))
    # Grouped by image (an image's units share its forward), images with the most units first, so
    # images with as many units as each other are neighbours and share batches (LayerPlan.batches).
    _, inverse, counts = np.unique(image, return_inverse=True, return_counts=True)
    order = np.lexsort((np.arange(len(image)), image, -counts[inverse]))
    c, j, image, y, x = c[order], j[order], image[order], y[order], x[order]
    boxes = [display_box(info.rf.box(int(yy), int(xx)), ctx.input_size) for yy, xx in zip(y, x)]
    first = display_box(info.rf.box(0, 0), ctx.input_size)
    window = first[2] - first[0]  # the same for every unit of the layer
    x0 = np.array([b[0] for b in boxes], dtype=np.int64)
    y0 = np.array([b[1] for b in boxes], dtype=np.int64)
    return LayerPlan(li, name, info.channels, window, min(window, max_side), c, j, image, y, x, x0, y0)


def crop_windows(grads: torch.Tensor, x0: np.ndarray, y0: np.ndarray, window: int) -> np.ndarray:
    """``(P, C, window, window)`` float crops of ``grads`` ``(P, C, H, W)``; zero outside the image
    (an attribution is zero there, which the display turns into the patch's grey border)."""
    h, w = grads.shape[2:]
    lo = max(0, -int(min(x0.min(), y0.min())))
    hi = max(0, int(max((x0 + window).max() - w, (y0 + window).max() - h)))
    padded = torch.nn.functional.pad(grads, (lo, hi, lo, hi)) if lo or hi else grads
    crops = [padded[p, :, y + lo:y + lo + window, x + lo:x + lo + window] for p, (x, y) in enumerate(zip(x0, y0))]
    return torch.stack(crops).detach().float().cpu().numpy()


def display_crop(crop: np.ndarray, side: int) -> np.ndarray:
    """One float crop ``(C, w, w)`` as the stored ``(side, side, 3)`` uint8 image."""
    return display_crops(crop[None], side)[0]


def display_crops(crops: np.ndarray, side: int) -> np.ndarray:
    """Float crops ``(P, C, w, w)`` as the stored ``(P, side, side, 3)`` uint8 images (each
    normalised on its own, then resized when ``w != side``)."""
    imgs = normalise_many_for_display(crops, PERCENTILE)
    if imgs.shape[1] == side:
        return imgs
    return np.stack([resize_square(img, side) for img in imgs]) if len(imgs) else np.zeros((0, side, side, 3), np.uint8)


SHARED = "deconvnet"
"""The method whose picture can be proved the same for every image (see :func:`share_units`)."""
ROUNDS = 8
"""Backward rounds one forward serves when computing shared pictures (see ``_shared``)."""
WORTH = 0.9
"""Shared pictures are computed apart when at most this share of a layer's units needs one."""


@dataclass
class Sharing:
    """Which units of a layer take their deconvnet picture from another unit's.

    ``rep[i]`` is the pair whose picture pair ``i`` shows (``rep[i] == i`` for the pairs computed).
    Deconvnet's backward through a network without max-pooling reads no forward value (proved by
    :func:`sitegen.attribution.image_independent`), so a unit's picture is the same on every image:
    units of one channel at one position share it.  Convolutions, average pooling and the other
    linear steps are also the same at every position, so a unit whose receptive field lies wholly
    inside the image (its backward never reaches the zero padding) has the same picture, relative to
    its window, as every other such unit of its channel: one is computed per channel for all of
    them (``translated``; checked on the first unit that takes another position's picture, else
    only units at the same position share).  Units at the border are computed per position."""

    rep: np.ndarray
    translated: bool
    reason: str

    @property
    def computed(self) -> int:
        return int((self.rep == np.arange(len(self.rep))).sum())


def inside_image(box: tuple[int, int, int, int], size: tuple[int, int]) -> bool:
    """Whether a receptive field ``(x0, y0, x1, y1)`` lies wholly inside an image of ``(h, w)``: the
    unit's backward then never reaches the zero padding."""
    x0, y0, x1, y1 = box
    return x0 >= 0 and y0 >= 0 and x1 <= size[1] and y1 <= size[0]


def share_units(ctx: BuildContext, plan: LayerPlan, translated: bool) -> np.ndarray:
    """For each pair of ``plan``, the first pair with the same picture (see :class:`Sharing`): the
    same channel and position, or with ``translated`` the same channel for units whose receptive
    field lies inside the image."""
    info = ctx.layer(plan.name)
    h, w = ctx.input_size
    first: dict[tuple, int] = {}
    rep = np.empty(len(plan), dtype=np.int64)
    for i, (c, y, x) in enumerate(zip(plan.c.tolist(), plan.y.tolist(), plan.x.tolist())):
        inside = translated and not info.rf.pooled and inside_image(info.rf.box(y, x), (h, w))
        key = (c,) if inside else (c, y, x)
        rep[i] = first.setdefault(key, i)
    return rep


class AttributionPass(AnalysisPass):
    name = "attribution"
    version = 4  # BatchNorm as its affine map or folded, channels-last inputs
    distributed = True
    config: AttributionConfig

    def cache_key(self, ctx: BuildContext) -> str:
        """Also the top-k result's units: another k or other top images give other attributions."""
        h = hashlib.sha256(super().cache_key(ctx).encode("ascii"))
        topk = ctx.results.get("topk")
        if topk is not None:
            h.update(json.dumps([topk.meta["layers"], topk.meta["k"]]).encode("utf-8", "surrogateescape"))
            for key in sorted(topk.arrays):
                if key.endswith((".images", ".y", ".x")):
                    h.update(key.encode("utf-8", "surrogateescape"))
                    h.update(np.ascontiguousarray(topk.arrays[key]).tobytes())
                elif key.endswith(".values"):
                    h.update(np.isfinite(topk.arrays[key]).tobytes())
        return h.hexdigest()[:24]

    def run(self, ctx: BuildContext) -> Result:
        topk = ctx.results.get("topk")
        if topk is None:
            raise SitegenError("the attribution pass needs the top-k pass's result",
                               "run the topk pass first (sitegen.passes.default_passes does)")
        methods = list(self.config.methods)
        k = int(topk.meta["k"])
        plans = [plan_layer(ctx, topk, li, self.config.max_side) for li in range(len(topk.meta["layers"]))]
        batch = ctx.batch_size(self.config.batch_size)
        if ctx.dist.active:  # the default follows each rank's free memory; the items must be the same on all
            batch = int(all_reduce(torch.tensor([batch]), op=torch.distributed.ReduceOp.MIN).item())
        pixels = PixelCache(lambda i: load_pixels(ctx.images, i, ctx.config.data), budget_bytes=256 << 20)
        ctx.backward_channels_last()  # the layout's probe forward runs here, before any hooks
        # Which activations the rules meet, and which selected layers lie behind one without a rule:
        # the pages and the terminal say so (the warnings attribute_methods would give say less).
        report = find_activations(ctx.net, self._example(ctx, plans, pixels), [p.name for p in plans])
        out = {p.index: {m: np.full((p.channels, k, p.side, p.side, 3), GREY, dtype=np.uint8) for m in methods}
               for p in plans}
        # Work items: every batch of every layer, in order; under torchrun each rank takes its share
        # and rank 0 gathers the crops (one process takes them all).
        # Layers whose deconvnet picture is proved the same on every image: computed once per
        # channel and position (or per channel, inside the image) after the other methods.
        sharing = self._sharing(ctx, plans, methods, pixels) if SHARED in methods else {}
        if sharing and ctx.dist.is_main:
            units = sum(len(p) for p in plans if p.index in sharing)
            progress.info(f"attribution: deconvnet is proved the same on every image in {len(sharing)} of "
                          f"{len(plans)} layers (no max-pooling or gate before them): "
                          f"{sum(sh.computed for sh in sharing.values()):,} pictures computed for {units:,} units")
        items = [(p, s) for p in plans for s in p.batches(batch)]
        mine = ctx.dist.items(len(items))
        store = ItemStore(ctx.scratch)  # finished items survive a kill; the next run reads them back

        def item_methods(plan: LayerPlan) -> list[str]:
            return [m for m in methods if not (m == SHARED and plan.index in sharing)]

        total = sum(len(items[i][0].c[items[i][1]]) * len(item_methods(items[i][0])) for i in mine)
        total += sum(sh.computed for sh in sharing.values()) if ctx.dist.is_main else 0
        def span(i: int) -> tuple[int, int, int]:  # the same index may name other pairs
            plan, s = items[i]
            return plan.index, s.start, s.start + len(plan.c[s])

        def work(i: int) -> dict[str, np.ndarray]:
            """Item ``i``'s crops (in a pool worker, ``out`` is the worker's own copy)."""
            plan, s = items[i]
            todo, o = item_methods(plan), out[plan.index]
            self._batch(ctx, plan, s, todo, pixels, o)
            return {m: o[m][plan.c[s], plan.j[s]] for m in todo}

        def keep(i: int, crops: dict[str, np.ndarray]) -> None:
            plan, s = items[i]
            for m, crop in crops.items():
                out[plan.index][m][plan.c[s], plan.j[s]] = crop
            advance(len(plan.c[s]) * len(crops))

        with progress.bar("attribution", total, "units") as advance, warnings.catch_warnings():
            warnings.simplefilter("ignore", AttributionWarning)
            todo_items = []
            for i in mine:
                plan, s = items[i]
                todo = item_methods(plan)
                if not todo:
                    continue
                saved = store.load(i, todo, span(i))
                want = (len(plan.c[s]), plan.side, plan.side, 3)
                if saved is not None and all(saved[m].shape == want and saved[m].dtype == np.uint8 for m in todo):
                    keep(i, {m: saved[m] for m in todo})
                else:
                    todo_items.append(i)
            # A pool takes the deepest layers' batches first; a batch's crops do not depend on the
            # order nor on the worker.
            depth = lambda i: (items[i][0].index, len(items[i][0].c[items[i][1]]))  # noqa: E731
            for i, crops in map_items(work, todo_items, ctx.pass_workers(batch), cost=depth):
                store.save(i, crops, span(i))
                keep(i, crops)
            if ctx.dist.is_main:  # the shared pictures are few: rank 0 computes them all
                for p in plans:
                    if p.index in sharing:
                        self._shared(ctx, p, sharing[p.index], batch, pixels, out[p.index][SHARED], advance)
        if ctx.dist.active:
            self._gather(items, mine, item_methods, out)
        store.clear()
        arrays = {f"L{li}.{m}": out[li][m] for li in out for m in methods}
        meta = {"layers": list(topk.meta["layers"]), "methods": methods, "k": k,
                "windows": [p.window for p in plans], "sides": [p.side for p in plans],
                "units": int(sum(len(p) for p in plans)), "percentile": PERCENTILE,
                "activations": report.to_dict(),
                "shared": {p.name: {"method": SHARED, "units": len(p), "computed": sharing[p.index].computed,
                                    "translated": sharing[p.index].translated, "reason": sharing[p.index].reason}
                           for p in plans if p.index in sharing}}
        return Result(meta=meta, arrays=arrays)

    def plan(self, ctx: BuildContext, probe: Probe) -> PassPlan:
        """Every top-k unit of every layer: ``channels × min(k, images)`` pairs per layer, in batches.
        A batch is timed as the pass runs it (``_batch``: forward to the layer, one backward per
        method, crops) on 1 and on a few real units at up to three layers; the layers between are
        interpolated by depth.  Decoding is added once per image."""
        methods = list(self.config.methods)
        k = min(ctx.config.topk.k, len(ctx.images))
        names = [l.name for l in ctx.layers]
        batch = ctx.batch_size(self.config.batch_size)
        units = {l.name: l.channels * k for l in ctx.layers}
        fits = self.unit_fits(ctx, probe, batch)
        world = max(1, ctx.dist.world)
        seconds = 0.0
        for n, u in units.items():
            full = fits[n].batched(u, batch)
            shared = self._shared_estimate(ctx, n, u) if SHARED in methods else None
            if shared is None:
                seconds += full
            else:  # deconvnet's share of the batch time, for the pictures computed once instead of per unit
                seconds += full * (len(methods) - 1) / len(methods) + fits[n].batched(shared, batch) / len(methods)
        seconds /= world
        total = sum(units.values())
        seconds += min(len(ctx.images), total) * probe.decode_seconds() / world
        return PassPlan(self.name, seconds, {"units": total, "methods": len(methods), "layers": len(names),
                                             "batch": batch},
                        f"{count(total)} units × {len(methods)} method{'s' if len(methods) > 1 else ''}")

    @staticmethod
    def _shared_estimate(ctx: BuildContext, name: str, units: int) -> int | None:
        """Deconvnet pictures the pass will compute for ``units`` units of layer ``name`` when they are
        shared (None when deconvnet is not proved image-independent there): one per channel for the
        units inside the image, and one per unit at the border, counting the units as spread over the
        feature map (the share of positions whose field lies inside the image)."""
        info = ctx.layer(name)
        if info.rf.pooled or not image_independent(ctx.net, name, SHARED, (ctx.channels, *ctx.input_size)):
            return None
        h, w = ctx.input_size
        fh, fw = info.shape[1], info.shape[2]
        inside = sum(inside_image(info.rf.box(y, x), (h, w)) for y in range(fh) for x in range(fw))
        share = inside / max(1, fh * fw)
        computed = min(units, int(round(units * (1 - share))) + (info.channels if inside else 0))
        return computed if computed <= WORTH * units else None

    def unit_fits(self, ctx: BuildContext, probe: Probe, batch: int) -> dict[str, Fit]:
        """Per shown layer, seconds of a batch of n units (one forward to the layer, one backward per
        method, the crops): ``_batch`` timed at up to three layers, the others interpolated by depth.
        The sanity checks' pairs are the same computation and read the same fits.  Both passes run
        their batches on :meth:`BuildContext.pass_workers` processes: the fits are their throughput."""
        methods = list(self.config.methods)
        names = [l.name for l in ctx.layers]
        workers = ctx.pass_workers(batch)
        return probe.per_layer(f"attribution:{','.join(methods)}:{self.config.max_side}", names,
                               lambda name: probe.fit(f"attribution@{name}", self._prober(ctx, probe, name, methods),
                                                      cap=batch, workers=workers))

    def _prober(self, ctx: BuildContext, probe: Probe, name: str, methods: list[str]):
        """``run(m)``: one ``_batch`` of m units of layer ``name`` at seeded random positions of real
        images (already decoded: decoding is counted apart)."""
        info = ctx.layer(name)
        rng = np.random.default_rng(0)

        def run(m: int) -> None:
            pixels = probe.pixels(min(m, 8))
            units = [(j % len(pixels), j % info.channels, int(rng.integers(info.shape[1])),
                      int(rng.integers(info.shape[2]))) for j in range(m)]
            attribute_units(ctx, name, units, methods, self.config.max_side, lambda i: pixels[int(i)])

        return run

    def _sharing(self, ctx: BuildContext, plans: list[LayerPlan], methods: list[str],
                 pixels: PixelCache) -> dict[int, Sharing]:
        """The layers whose deconvnet picture :func:`image_independent` proves the same on every image,
        with the pairs that share a picture.  Sharing across positions inside the image follows from
        the linear steps being the same at every position; it is confirmed on the first unit that
        takes the picture of another position (both computed, compared crop by crop; a
        difference beyond one grey level turns it off for the layer)."""
        out: dict[int, Sharing] = {}
        shape = (ctx.channels, *ctx.input_size)
        for p in plans:
            if not len(p):
                continue
            proof = image_independent(ctx.net, p.name, SHARED, shape)
            if not proof:
                continue
            rep = share_units(ctx, p, translated=True)
            translated = False
            moved = np.flatnonzero((p.y != p.y[rep]) | (p.x != p.x[rep]))  # a picture shared across positions
            if len(moved):
                i = int(moved[0])
                r = int(rep[i])
                two = self._pictures(ctx, p, np.array(sorted((r, i))), 2, pixels)
                a, b = (two[(int(p.c[q]), int(p.j[q]))].astype(np.int16) for q in (r, i))
                translated = bool(np.abs(a - b).max() <= 1)
            if not translated:
                rep = share_units(ctx, p, translated=False)
            sharing = Sharing(rep, translated, proof.reason)
            # Apart, the pictures cost a forward per ROUNDS backward rounds that the other methods'
            # batches would have shared: worth it only when it leaves out a tenth of the units or more.
            if sharing.computed <= WORTH * len(p):
                out[p.index] = sharing
        return out

    def _pictures(self, ctx: BuildContext, plan: LayerPlan, picks: np.ndarray, batch: int,
                  pixels: PixelCache) -> dict[tuple[int, int], np.ndarray]:
        """Deconvnet crops of the pairs ``picks`` (indices into ``plan``, ascending), by (channel, slot)."""
        sub = LayerPlan(plan.index, plan.name, plan.channels, plan.window, plan.side, plan.c[picks], plan.j[picks],
                        plan.image[picks], plan.y[picks], plan.x[picks], plan.x0[picks], plan.y0[picks])
        got: dict[str, _Slots] = {SHARED: _Slots()}
        for s in sub.batches(batch):
            self._batch(ctx, sub, s, [SHARED], pixels, got)
        return got[SHARED]

    def _shared(self, ctx: BuildContext, plan: LayerPlan, sharing: Sharing, batch: int, pixels: PixelCache,
                out: np.ndarray, advance) -> None:
        """Compute each shared picture once and give it to every pair that shares it.

        The picture does not depend on the image, so a unit need not sit on its own image's row: one
        forward of ``batch`` images serves ``ROUNDS`` rounds of one unit per row (one backward each),
        however the units' own images fall.  Each unit is cropped at its own window."""
        reps = np.unique(sharing.rep)
        for lo in range(0, len(reps), batch * ROUNDS):
            picks = reps[lo:lo + batch * ROUNDS]
            rows = min(batch, len(picks))
            images = plan.image[picks[:rows]]
            stacked = torch.from_numpy(np.stack([pixels(int(i)) for i in images])).to(ctx.device)
            units = list(zip(plan.c[picks].tolist(), plan.y[picks].tolist(), plan.x[picks].tolist()))
            grads = attribute_methods(ctx.net, ctx.backward_inputs(normalise(stacked, ctx.config.data)), plan.name,
                                      units, [SHARED],
                                      rows=[q % rows for q in range(len(picks))])[SHARED]
            crops = crop_windows(grads, plan.x0[picks], plan.y0[picks], plan.window)
            out[plan.c[picks], plan.j[picks]] = display_crops(crops, plan.side)
            advance(len(picks))
        out[plan.c, plan.j] = out[plan.c[sharing.rep], plan.j[sharing.rep]]

    @staticmethod
    def _example(ctx: BuildContext, plans: list[LayerPlan], pixels: PixelCache) -> torch.Tensor | tuple[int, ...]:
        """One preprocessed image the atlas uses (the model's real input), for finding activations;
        a shape to fill with noise when no unit has an image."""
        first = next((p for p in plans if len(p)), None)
        if first is None:
            return tuple(ctx.input_size)
        stacked = torch.from_numpy(np.stack([pixels(int(first.image[0]))])).to(ctx.device)
        return normalise(stacked, ctx.config.data)

    @staticmethod
    def _gather(items: list[tuple[LayerPlan, slice]], mine: range, methods_of,
                out: dict[int, dict[str, np.ndarray]]) -> None:
        """Rank 0 receives every other rank's crops (of the methods ``methods_of(plan)`` each item
        computed) and writes them into its arrays."""
        pieces = [(i, {m: out[items[i][0].index][m][items[i][0].c[items[i][1]], items[i][0].j[items[i][1]]]
                       for m in methods_of(items[i][0])}) for i in mine]
        gathered = gather_to_main(pieces)
        for rank_pieces in gathered or []:
            for i, crops in rank_pieces:
                plan, s = items[i]
                for m, crop in crops.items():
                    out[plan.index][m][plan.c[s], plan.j[s]] = crop

    def _batch(self, ctx: BuildContext, plan: LayerPlan, s: slice, methods: list[str],
               pixels: PixelCache, out: dict[str, np.ndarray]) -> None:
        """One forward of the batch's distinct images (stopped at the layer) and, from it, the
        backward passes of every pair ``s``: one per method and per round of one unit per image."""
        images, rows = np.unique(plan.image[s], return_inverse=True)
        stacked = torch.from_numpy(np.stack([pixels(int(i)) for i in images])).to(ctx.device)
        inputs = ctx.backward_inputs(normalise(stacked, ctx.config.data))
        units = list(zip(plan.c[s].tolist(), plan.y[s].tolist(), plan.x[s].tolist()))
        cs, js = plan.c[s], plan.j[s]
        grads = attribute_methods(ctx.net, inputs, plan.name, units, methods, rows=rows.tolist())
        for m in methods:
            imgs = display_crops(crop_windows(grads.pop(m), plan.x0[s], plan.y0[s], plan.window), plan.side)
            if isinstance(out[m], np.ndarray):
                out[m][cs, js] = imgs
            else:  # a _Slots dict of some pairs' crops
                for p in range(len(imgs)):
                    out[m][cs[p], js[p]] = imgs[p]


def attribute_units(ctx: BuildContext, name: str, units: list[tuple[int, int, int, int]], methods: list[str],
                    max_side: int, pixels) -> tuple[LayerPlan, dict[str, np.ndarray]]:
    """Attributions of ``units`` (image, channel, y, x) of layer ``name`` exactly as the pass computes
    them (one ``_batch``; ``pixels(i)`` gives image i's pixels): what the estimates time and measure.
    Returns the units' plan (sorted by image, as the pass sorts) and ``{method: (m, s, s, 3)}``."""
    info = ctx.layer(name)
    m = len(units)
    image, c, y, x = (np.array([u[i] for u in units], dtype=np.int64) for i in range(4))
    j = np.arange(m, dtype=np.int64)  # each unit its own slot, so none overwrites another
    order = np.argsort(image, kind="stable")
    image, c, y, x, j = image[order], c[order], y[order], x[order], j[order]
    boxes = [display_box(info.rf.box(int(yy), int(xx)), ctx.input_size) for yy, xx in zip(y, x)]
    first = display_box(info.rf.box(0, 0), ctx.input_size)
    window = first[2] - first[0]
    plan = LayerPlan(0, name, info.channels, window, min(window, max_side), c, j, image, y, x,
                     np.array([b[0] for b in boxes], dtype=np.int64), np.array([b[1] for b in boxes], dtype=np.int64))
    out = {meth: _Slots() for meth in methods}  # not a (channels, m, ...) array: 2048 channels would be GBs
    AttributionPass(AttributionConfig(methods=tuple(methods), max_side=max_side))._batch(
        ctx, plan, slice(0, m), methods, pixels, out)
    return plan, {meth: np.stack([out[meth][(int(cc), int(jj))] for cc, jj in zip(plan.c, plan.j)])
                  for meth in methods}


class _Slots(dict):
    """Crops by (channel, slot), written as ``_batch`` writes into the pass's arrays."""

    def __setitem__(self, key, value) -> None:
        super().__setitem__((int(key[0]), int(key[1])), value)


def activation_report(result: Result) -> ActivationReport:
    """The activations the rules met (``find_activations``), as stored in the result's meta."""
    return ActivationReport.from_dict(result.meta.get("activations", {}))


def unit_crops(result: Result, layer: str, channel: int, method: str) -> np.ndarray:
    """``(k, s, s, 3)`` uint8 display crops of one channel's top-k units (for the view and tests)."""
    li = result.meta["layers"].index(layer)
    return result.arrays[f"L{li}.{method}"][channel]
