"""Attribution speed: the attribution pass against a bare forward pass and the naive way.

For the shared ResNet-56 over N CIFAR-10 test images, in one process and one run:

- ``bare_forward``: decode + normalise + a full forward of every image, batch size as the pass's,
  in inference mode; measured before *and* after the attribution pass (the machine is shared and
  its load drifts), and the mean of the two is the reference;
- ``attribution``: :class:`sitegen.passes.attribution.AttributionPass` over the top-k units of every
  selected layer (all 82 by default), all configured methods, decoding and display crops included;
- ``naive``: one call per (channel, method) with a full forward each time, i.e. what a loop over
  channels calling an attribution on that channel's k images does: the channel's images decoded,
  the whole model run (not stopped at the layer), one backward from the k units, the same crops.
  It is timed on ``naive_per_layer`` evenly spaced channels of every layer and extrapolated
  linearly to all channels of that layer (time per channel × channels), layer by layer, since the
  cost depends on the layer's depth.  The sampled naive crops are also compared with the pass's.

Wall-clock and process CPU seconds are both reported; on a loaded shared machine the CPU-time
ratios are the steadier ones.  The goal is stated over 10,000 images: the bare
forward grows with the image count while the attribution work does not (k units per channel
whatever the count), so ``ratio_at_10000_images`` scales the measured forward linearly.

    python bench/attribution_bench.py --images 1000 --out bench/attribution.json

``measure(ctx, topk)`` is the entry point for ``bench/bench.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models" / "resnet56-4bfd9763.th"
CIFAR = SHARED / "data" / "cifar10-test"
ARCH = f"{REPO / 'tests' / 'cifar_resnet.py'}:resnet56"

from sitegen import progress  # noqa: E402
from sitegen.attribution import METHODS, _rule  # noqa: E402  (_rule: the naive way's own forward)
from sitegen.config import AttributionConfig, TopKConfig  # noqa: E402
from sitegen.context import BuildContext  # noqa: E402
from sitegen.hooks import capture_outputs, model_guard  # noqa: E402
from sitegen.images import load_pixels, normalise  # noqa: E402
from sitegen.passes.attribution import AttributionPass, crop_windows, display_crop, plan_layer  # noqa: E402
from sitegen.passes.base import Result  # noqa: E402
from sitegen.passes.topk import TopKPass  # noqa: E402


@dataclass
class Timing:
    wall: float
    cpu: float

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall, "cpu_s": self.cpu}


def timed(fn: Callable[[], Any]) -> tuple[Any, Timing]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, Timing(time.perf_counter() - w, time.process_time() - c)


def bare_forward(ctx: BuildContext, batch_size: int) -> None:
    with model_guard(ctx.net), torch.inference_mode():
        for batch in ctx.batches(batch_size=batch_size):
            ctx.net(batch.inputs)


def naive_attribute(model: torch.nn.Module, inputs: torch.Tensor, layer: str,
                    units: Sequence[tuple[int, int, int]], method: str) -> torch.Tensor:
    """sitegen.attribution.attribute without its early stop: the whole model runs every time."""
    with model_guard(model):
        x = inputs.detach().clone().requires_grad_(True)
        with capture_outputs(model, [layer]) as store, _rule(method):
            model(x.clone())
        out = store[layer]
        onehot = torch.zeros_like(out)
        c, y, xx = (torch.tensor(v) for v in zip(*units))
        onehot[torch.arange(len(units)), c, y, xx] = 1.0
        (grad,) = torch.autograd.grad(out, x, onehot)
    return grad


def naive_channel(ctx: BuildContext, plan, rows: np.ndarray, methods: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """The naive way for one channel (its pairs ``rows`` of the layer plan): decode its images,
    then per method one full forward and one backward, and the same display crops as the pass."""
    pixels = np.stack([load_pixels(ctx.images, int(i), ctx.config.data) for i in plan.image[rows]])
    inputs = normalise(torch.from_numpy(pixels).to(ctx.device), ctx.config.data)
    units = list(zip(plan.c[rows].tolist(), plan.y[rows].tolist(), plan.x[rows].tolist()))
    out = {}
    for m in methods:
        grads = naive_attribute(ctx.net, inputs, plan.name, units, m)
        crops = crop_windows(grads, plan.x0[rows], plan.y0[rows], plan.window)
        out[m] = [display_crop(cr, plan.side) for cr in crops]
    return out


def measure_naive(ctx: BuildContext, topk: Result, result: Result, methods: Sequence[str],
                  per_layer: int, max_side: int) -> dict[str, Any]:
    layers = []
    total = Timing(0.0, 0.0)
    sampled = Timing(0.0, 0.0)
    diffs = []
    for li, name in enumerate(topk.meta["layers"]):
        plan = plan_layer(ctx, topk, li, max_side)
        channels = sorted(set(plan.c.tolist()))
        if not channels:
            continue
        pick = sorted({channels[int(round(q))] for q in np.linspace(0, len(channels) - 1, per_layer)})
        t_layer = Timing(0.0, 0.0)
        for c in pick:
            rows = np.nonzero(plan.c == c)[0]
            crops, t = timed(lambda: naive_channel(ctx, plan, rows, methods))
            t_layer.wall += t.wall
            t_layer.cpu += t.cpu
            for m in methods:
                stored = result.arrays[f"L{li}.{m}"]
                for r, img in zip(rows, crops[m]):
                    diffs.append(np.abs(stored[plan.c[r], plan.j[r]].astype(np.int16) - img.astype(np.int16)))
        scale = len(channels) / len(pick)
        layers.append({"layer": name, "channels": len(channels), "sampled": len(pick), **t_layer.as_dict()})
        sampled.wall += t_layer.wall
        sampled.cpu += t_layer.cpu
        total.wall += t_layer.wall * scale
        total.cpu += t_layer.cpu * scale
    flat = np.concatenate([d.ravel() for d in diffs]) if diffs else np.zeros(0)
    return {
        "how": f"{per_layer} evenly spaced channels per layer timed, extrapolated linearly to every channel "
               "of that layer (time per channel x channels), layer by layer",
        "sampled_channels": sum(l["sampled"] for l in layers),
        "sampled": sampled.as_dict(),
        "extrapolated": total.as_dict(),
        "agreement_with_pass": {"pixels": int(flat.size), "max_abs_diff": int(flat.max()) if flat.size else 0,
                                "fraction_equal": float((flat == 0).mean()) if flat.size else 1.0},
        "layers": layers,
    }


def mac_floor(ctx: BuildContext, topk: Result, methods: Sequence[str], batch: int, max_side: int) -> dict[str, Any]:
    """The pass's work in multiply-accumulates, as ``bench/featurevis_bench.py``'s ``macs_until``
    counts them (a forward up to a layer; the backward to the input pixels costs as many, since it
    runs the same convolutions transposed), over the bare forward's (every image, the whole model):

    - ``per_pair``: one forward and one backward per method for every (image, unit) pair: the
      floor of computing each unit from its own forward (the pass before it shared forwards);
    - ``floor``: one forward per distinct image of each batch, one backward per pair and method:
      the least the pass's way can do;
    - ``executed``: what the pass runs, idle rows of its backward rounds included (a round's
      backward covers every image of the batch, with or without a unit in that round).

    Where deconvnet's picture is proved the same on every image and the pass shares it
    (``AttributionPass._sharing``), ``floor`` and ``executed`` count one deconvnet backward per
    picture computed instead of one per pair, and the shared pictures' own forwards and rounds
    (``_shared``: ``ROUNDS`` rounds of one unit per row per forward of ``batch`` images);
    ``floor_unshared`` is the floor without that.
    """
    sys.path.insert(0, str(REPO / "bench"))
    from featurevis_bench import macs_until

    from sitegen.crops import PixelCache
    from sitegen.images import load_pixels
    from sitegen.passes.attribution import ROUNDS, SHARED, AttributionPass

    names = list(topk.meta["layers"])
    macs = macs_until(ctx.net, names, ctx.input_size)
    m = len(methods)
    plans = [plan_layer(ctx, topk, li, max_side) for li in range(len(names))]
    pixels = PixelCache(lambda i: load_pixels(ctx.images, i, ctx.config.data), budget_bytes=64 << 20)
    sharing = AttributionPass(AttributionConfig(methods=tuple(methods), max_side=max_side))._sharing(
        ctx, plans, list(methods), pixels) if SHARED in methods else {}
    totals = {"per_pair": 0, "floor_unshared": 0, "floor": 0, "executed": 0}
    layers = []
    for li, name in enumerate(names):
        plan = plans[li]
        shared = sharing.get(li)
        inline = m - 1 if shared is not None else m  # methods computed in the layer's batches
        forwards = rows = 0
        for s in plan.batches(batch):
            images, counts = np.unique(plan.image[s], return_counts=True)
            forwards += len(images)
            rows += len(images) * int(counts.max())
        pairs = len(plan)
        floor = forwards + inline * pairs
        executed = forwards + inline * rows
        if shared is not None:
            pictures = shared.computed
            floor += pictures
            for lo in range(0, pictures, batch * ROUNDS):
                n = min(pictures - lo, batch * ROUNDS)
                width = min(batch, n)
                executed += width * (1 + -(-n // width))  # one forward and ceil(n / width) rounds of its rows
        layer = {"layer": name, "pairs": pairs, "forwards": forwards, "backward_rows": rows,
                 "shared_pictures": shared.computed if shared is not None else None,
                 "per_pair": pairs * (1 + m) * macs[name], "floor_unshared": (forwards + m * pairs) * macs[name],
                 "floor": floor * macs[name], "executed": executed * macs[name]}
        for key in totals:
            totals[key] += layer[key]
        layers.append(layer)
    bare = len(ctx.images) * macs["<logits>"]
    return {"methods": m, "batch_images": batch, "bare_forward_macs": bare, "macs": totals,
            "over_bare_forward": {k: v / bare for k, v in totals.items()},
            "over_bare_forward_at_10000": {k: v / bare * len(ctx.images) / 10_000 for k, v in totals.items()},
            "pairs": sum(l["pairs"] for l in layers), "forwards": sum(l["forwards"] for l in layers),
            "layers": layers}


def result_bytes(result: Result) -> dict[str, int]:
    with tempfile.TemporaryDirectory(prefix="attr-bench-") as tmp:
        result.save(Path(tmp))
        on_disk = sum(p.stat().st_size for p in Path(tmp).iterdir())
    return {"arrays_bytes": int(sum(a.nbytes for a in result.arrays.values())), "cache_entry_bytes": on_disk}


def measure(ctx: BuildContext, topk: Result | None = None, *, methods: Sequence[str] = METHODS,
            batch_size: int = 0, max_side: int = 64, naive_per_layer: int = 2,
            log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Time the bare forward, the attribution pass and the naive way over ``ctx``'s images and layers.

    ``topk`` is the dataset pass's result for ``ctx`` (computed here when None).  Returns the
    figures as a JSON-able dict (see the module docstring)."""
    bs = ctx.batch_size(batch_size)
    n = len(ctx.images)
    if topk is None:
        topk, t_topk = timed(lambda: TopKPass(TopKConfig(batch_size=bs)).run(ctx))
        log(f"dataset pass: {t_topk.wall:.1f} s")
    ctx.results["topk"] = topk
    _, fwd1 = timed(lambda: bare_forward(ctx, bs))
    log(f"bare forward (before): {fwd1.wall:.1f} s wall, {fwd1.cpu:.1f} s CPU")
    config = AttributionConfig(methods=tuple(methods), batch_size=batch_size, max_side=max_side)
    result, attr = timed(lambda: AttributionPass(config).run(ctx))
    log(f"attribution pass: {attr.wall:.1f} s wall, {attr.cpu:.1f} s CPU ({result.meta['units']} units x {len(methods)} methods)")
    _, fwd2 = timed(lambda: bare_forward(ctx, bs))
    log(f"bare forward (after): {fwd2.wall:.1f} s wall, {fwd2.cpu:.1f} s CPU")
    naive = measure_naive(ctx, topk, result, methods, naive_per_layer, max_side)
    log(f"naive (extrapolated): {naive['extrapolated']['wall_s']:.1f} s wall")
    fwd = Timing((fwd1.wall + fwd2.wall) / 2, (fwd1.cpu + fwd2.cpu) / 2)
    ratio = {k: getattr(attr, k) / getattr(fwd, k) for k in ("wall", "cpu")}
    floor = mac_floor(ctx, topk, methods, bs, max_side)
    log(f"MAC floor: {floor['over_bare_forward']['floor']:.2f} x the bare forward "
        f"(per pair: {floor['over_bare_forward']['per_pair']:.2f} x); time: {ratio['cpu']:.2f} x (CPU)")
    speedup = {k: naive["extrapolated"][f"{k}_s"] / getattr(attr, k) for k in ("wall", "cpu")}
    return {
        "images": n, "layers": len(topk.meta["layers"]),
        "channels": int(sum(ctx.layer(l).channels for l in topk.meta["layers"])),
        "units": result.meta["units"], "methods": list(methods), "k": topk.meta["k"],
        "batch_size": bs, "device": str(ctx.device), "threads": torch.get_num_threads(),
        "bare_forward": {"before": fwd1.as_dict(), "after": fwd2.as_dict(), "mean": fwd.as_dict()},
        "attribution": attr.as_dict(),
        "naive": naive,
        "attribution_over_bare_forward": ratio,
        "ratio_at_10000_images": {k: v * n / 10_000 for k, v in ratio.items()},
        "naive_over_attribution": speedup,
        "mac_floor": floor,
        "attribution_over_mac_floor": {k: v / floor["over_bare_forward"]["floor"] for k, v in ratio.items()},
        "goals": {"attribution_le_1.5x_forward_at_10000": ratio["cpu"] * n / 10_000 <= 1.5,
                  "naive_ge_3x_slower": speedup["cpu"] >= 3.0},
        "storage": result_bytes(result),
    }


def image_folder(n: int, root: Path) -> Path:
    """Symlinks to the first n/10 images of each CIFAR class (balanced, real files)."""
    folder = root / f"cifar{n}"
    per_class = max(1, n // 10)
    for cls in sorted(os.listdir(CIFAR)):
        (folder / cls).mkdir(parents=True)
        for name in sorted(os.listdir(CIFAR / cls))[:per_class]:
            (folder / cls / name).symlink_to(CIFAR / cls / name)
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "attribution.json")
    ap.add_argument("--layers", nargs="*", default=[], help="layer names or globs (default: every layer)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--naive-per-layer", type=int, default=2)
    args = ap.parse_args(argv)
    if not MODEL.is_file() or not CIFAR.is_dir():
        sys.exit(f"the attribution bench needs {MODEL} and {CIFAR}")
    from sitegen.build import prepare
    from sitegen.config import from_dict

    progress.set_quiet(True)
    with tempfile.TemporaryDirectory(prefix="attr-bench-") as tmp:
        cfg = from_dict({"layers": list(args.layers), "model": {"arch": ARCH}})
        ctx = prepare(MODEL, image_folder(args.images, Path(tmp)), cfg, None)
        figures = measure(ctx, methods=args.methods, batch_size=args.batch_size,
                          naive_per_layer=args.naive_per_layer)
    figures["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "loadavg_at_end": os.getloadavg(), "torch": torch.__version__}
    figures["command"] = "python bench/attribution_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    summary = {k: figures[k] for k in ("attribution_over_bare_forward", "ratio_at_10000_images",
                                       "naive_over_attribution", "goals")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
