"""Feature-visualisation speed: seconds per channel for the shared ResNet-56 at the default
``[featurevis]`` settings, and the estimated time of the whole atlas (all 3040 channels + 10 classes).

One batch of each measured layer is optimised exactly as the pass does it (``visualise_channels``
with the pass's own settings: default steps, jitter, Fourier parameterisation, batch of up to 64
channels).  The measured layers are the first and the last layer of each stage (its cheapest and
dearest), the stem and the logits; every other layer's time per channel is interpolated linearly,
within its stage, in the forward multiply-accumulates up to the layer (the forward stops after the
layer, and the backward costs about as much as the forward), counted with hooks.  Scaling from one
layer per stage by MACs alone underestimated other layers by 15-40 % (a per-step cost that does not
grow with depth: the image parameterisation, jitter, small batches).

Wall-clock and process CPU seconds are both reported.  On a shared, loaded machine use
``--threads 1``: with more OpenMP threads than free cores, torch's threads wait on each other and
a step can take 10-25x longer than with one thread (measured here), so multi-thread figures from a
loaded machine say more about the load than about sitegen.

    python bench/featurevis_bench.py [--threads 1] [--steps 64] [--out bench/results-featurevis.json]

``measure(...)`` is the entry point for ``bench/bench.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models" / "resnet56-4bfd9763.th"
ARCH = f"{REPO / 'tests' / 'cifar_resnet.py'}:resnet56"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

sys.path.insert(0, str(REPO))
from sitegen.config import FeatureVisConfig  # noqa: E402
from sitegen.hooks import model_guard  # noqa: E402
from sitegen.layers import discover  # noqa: E402
from sitegen.model_loading import load_model  # noqa: E402
from sitegen.context import channels_last_works  # noqa: E402
from sitegen.passes.featurevis import IMAGENET_COLOUR, Ascent, precision, visualise_channels, visualise_classes  # noqa: E402


def macs_until(model: torch.nn.Module, names: list[str], size: tuple[int, int]) -> dict[str, int]:
    """Multiply-accumulates of the forward up to (and including) each named layer, in execution order."""
    total = 0
    seen: dict[str, int] = {}
    handles = []

    def conv_hook(m, _i, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, _i, out):
        nonlocal total
        total += out.numel() * m.in_features

    def mark(name):
        def hook(_m, _i, _o):
            seen.setdefault(name, total)
        return hook

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    for n in names:  # registered after the conv hooks: a conv's own MACs are counted before its mark
        handles.append(model.get_submodule(n).register_forward_hook(mark(n)))
    try:
        with model_guard(model), torch.no_grad():
            model(torch.zeros((1, 3, *size)))
    finally:
        for h in handles:
            h.remove()
    seen["<logits>"] = total
    return seen


def time_batch(fn) -> dict[str, float]:
    t, c = time.perf_counter(), time.process_time()
    fn()
    return {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}


def measure(steps: int | None = None, batch: int | None = None, threads: int | None = None,
            check_layers: tuple[str, ...] = ("layer2.4", "layer3.0.conv2")) -> dict[str, Any]:
    """Time one batch per stage of the shared ResNet-56 at the default settings; estimate the atlas."""
    if threads:
        torch.set_num_threads(threads)
    cfg = FeatureVisConfig()
    steps = steps or cfg.steps
    batch = batch or cfg.batch_size or 64
    size = (32, 32)
    jitter = cfg.jitter if cfg.jitter >= 0 else max(1, round(32 / 16))
    model = load_model(MODEL, ARCH, False).model
    a = Ascent(steps=steps, lr=cfg.lr, lr_end=cfg.lr_end, jitter=jitter, size=size, mean=CIFAR_MEAN, std=CIFAR_STD,
               decorrelate=cfg.decorrelate, colour=tuple(map(tuple, IMAGENET_COLOUR.tolist())), seed=cfg.seed,
               precision=precision(cfg.precision, torch.device("cpu")), fast_steps=True,
               channels_last=channels_last_works(model, size, torch.device("cpu")))
    layers = discover(model, (3, *size))
    macs = macs_until(model, [l.name for l in layers], size)
    stages: dict[str, list] = {}
    for l in layers:
        stages.setdefault(l.stage or f"stem:{l.name}", []).append(l)
    measured: dict[str, dict[str, float]] = {}

    def run(l) -> None:
        chans = list(range(min(batch, l.channels)))
        t = time_batch(lambda: visualise_channels(model, l.name, chans, a))
        measured[l.name] = {**t, "channels": len(chans), "per_channel_wall_s": t["wall_s"] / len(chans),
                            "per_channel_cpu_s": t["cpu_s"] / len(chans)}
        print(f"{l.name}: {len(chans)} channels in {t['wall_s']:.1f} s wall, {t['cpu_s']:.1f} s CPU", file=sys.stderr)

    for ls in stages.values():
        for l in {id(x): x for x in (ls[0], ls[-1])}.values():
            run(l)
    t = time_batch(lambda: visualise_classes(model, list(range(10)), a))
    measured["<logits>"] = {**t, "channels": 10, "per_channel_wall_s": t["wall_s"] / 10, "per_channel_cpu_s": t["cpu_s"] / 10}
    def per_channel(l, key: str) -> float:
        ls = next(g for g in stages.values() if l in g)
        lo, hi = measured[ls[0].name], measured[ls[-1].name]
        span = macs[ls[-1].name] - macs[ls[0].name]
        f = (macs[l.name] - macs[ls[0].name]) / span if span else 0.0
        return lo[f"per_channel_{key}"] + f * (hi[f"per_channel_{key}"] - lo[f"per_channel_{key}"])

    est = {"wall_s": measured["<logits>"]["wall_s"], "cpu_s": measured["<logits>"]["cpu_s"]}
    for l in layers:
        for key in ("wall_s", "cpu_s"):
            est[key] += l.channels * per_channel(l, key)
    # How good the interpolation is: layers in the middle of a stage, measured and estimated.
    check = {}
    for name in check_layers:
        l = next(x for x in layers if x.name == name)
        predicted = per_channel(l, "cpu_s")
        run(l)
        check[name] = {"estimated_cpu_s_per_channel": predicted,
                       "measured_cpu_s_per_channel": measured[name]["per_channel_cpu_s"],
                       "error": predicted / measured[name]["per_channel_cpu_s"] - 1}
    channels = sum(l.channels for l in layers)
    return {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average": os.getloadavg(), "platform": platform.platform(), "torch": torch.__version__},
        "model": "shared ResNet-56 (CIFAR-10), 32x32 images", "device": "cpu",
        "settings": {"steps": steps, "batch": batch, "lr": a.lr, "jitter": a.jitter, "decorrelate": a.decorrelate},
        "measured": measured,
        "interpolation_check": check,
        "atlas_estimate": {"layers": len(layers), "channels": channels, "classes": 10, **est,
                           "per_channel_wall_s": est["wall_s"] / (channels + 10),
                           "per_channel_cpu_s": est["cpu_s"] / (channels + 10)},
        "gpu": "not measured: no GPU machine was lent to this task",
    }


FULL_LENGTH = {"steps": 64, "lr": 0.05}
"""The ascent the pass ran before its current defaults: 64 steps at a constant 0.05, fp32."""


def quality(per_layer: int = 32, threads: int | None = None,
            layers: tuple[str, ...] = ("conv1", "layer1.4", "layer1.8.conv2", "layer2.0.conv1", "layer2.8",
                                       "layer3.4.conv2", "layer3.8"),
            full_steps: int = FULL_LENGTH["steps"], steps: int | None = None) -> dict[str, Any]:
    """The pass's default ascent against the full-length run it replaces (``FULL_LENGTH``), side by
    side on the same channels of the shared ResNet-56: per channel the final objective's ratio to
    the full-length run's, its distribution, and the ratio of the CPU times.

    ``per_layer`` evenly spaced channels of each of ``layers`` (each kind of layer: the stem, block
    outputs, first and second convolutions of blocks, in every stage; the second convolutions of
    the last stage climb the slowest) and the 10 classes.  Channels whose full-length objective is
    ≤ 0 (never excited) have no ratio; they are counted, with how many of them the new run excites."""
    import numpy as np

    if threads:
        torch.set_num_threads(threads)

    cfg = FeatureVisConfig()
    size = (32, 32)
    jitter = cfg.jitter if cfg.jitter >= 0 else max(1, round(32 / 16))
    common = dict(jitter=jitter, size=size, mean=CIFAR_MEAN, std=CIFAR_STD, decorrelate=cfg.decorrelate,
                  colour=tuple(map(tuple, IMAGENET_COLOUR.tolist())), seed=cfg.seed)
    full = Ascent(steps=full_steps, lr=FULL_LENGTH["lr"], **common)
    model = load_model(MODEL, ARCH, False).model
    # The pass's ascent (FeatureVisPass.ascent) against the recipe it replaces, which ran its steps
    # exactly (real BatchNorm, NCHW, float32).
    default = Ascent(steps=steps or cfg.steps, lr=cfg.lr, lr_end=cfg.lr_end,
                     precision=precision(cfg.precision, torch.device("cpu")),
                     fast_steps=True, channels_last=channels_last_works(model, size, torch.device("cpu")),
                     stop_window=cfg.stop_window if cfg.stop_gain > 0 else 0, stop_gain=cfg.stop_gain, **common)
    found = {l.name: l for l in discover(model, (3, *size))}
    rows = []
    times = {"full": 0.0, "default": 0.0}
    for name in [*layers, "<logits>"]:
        if name == "<logits>":
            units = list(range(10))
            run = lambda a: visualise_classes(model, units, a)  # noqa: E731
        else:
            n = found[name].channels
            units = sorted({int(round(q)) for q in np.linspace(0, n - 1, min(per_layer, n))})
            run = lambda a, name=name, units=units: visualise_channels(model, name, units, a)  # noqa: E731
        # Alternating which goes first spreads the machine's drift over both.
        order = ("full", "default") if len(rows) % 2 == 0 else ("default", "full")
        got = {}
        for which in order:
            t = time.process_time()
            got[which] = run(full if which == "full" else default)
            times[which] += time.process_time() - t
        for u, f, s_, steps in zip(units, got["full"].objective, got["default"].objective, got["default"].steps):
            rows.append({"layer": name, "unit": u, "full": float(f), "default": float(s_), "steps": int(steps)})
        print(f"{name}: {len(units)} units, {np.mean(got['default'].steps):.1f} steps on average",
              file=sys.stderr, flush=True)
    excited = [r for r in rows if r["full"] > 0]
    ratio = np.array([r["default"] / r["full"] for r in excited])
    per_layer_median = {}
    for name in [*layers, "<logits>"]:
        rs = [r["default"] / r["full"] for r in excited if r["layer"] == name]
        per_layer_median[name] = float(np.median(rs)) if rs else None
    return {
        "settings": {"full_length": {"steps": full.steps, "lr": full.lr, "precision": full.precision},
                     "default": {"steps": default.steps, "lr": default.lr, "lr_end": default.lr_end,
                                 "precision": default.precision, "fast_steps": default.fast_steps,
                                 "channels_last": default.channels_last, "stop_window": default.stop_window,
                                 "stop_gain": default.stop_gain},
                     "per_layer": per_layer, "layers": list(layers), "threads": torch.get_num_threads()},
        "units": len(rows), "with_ratio": len(excited),
        "never_excited_full": len(rows) - len(excited),
        "never_excited_full_but_default_excited": sum(1 for r in rows if r["full"] <= 0 < r["default"]),
        "ratio": {"median": float(np.median(ratio)), "p5": float(np.percentile(ratio, 5)),
                  "p1": float(np.percentile(ratio, 1)), "min": float(ratio.min()), "mean": float(ratio.mean()),
                  "histogram": {f"{lo:.2f}-{hi:.2f}": int(((ratio >= lo) & (ratio < hi)).sum())
                                for lo, hi in zip([0, .8, .9, .95, .97, 1.0, 1.03], [.8, .9, .95, .97, 1.0, 1.03, 99])}},
        "ratio_median_by_layer": per_layer_median,
        "mean_steps": float(np.mean([r["steps"] for r in rows])),
        "cpu_s": times, "time_ratio_default_over_full": times["default"] / times["full"],
        "goals": {"median_ge_0.97": bool(np.median(ratio) >= 0.97), "p5_ge_0.90": bool(np.percentile(ratio, 5) >= 0.90),
                  "time_le_0.4": bool(times["default"] / times["full"] <= 0.4)},
        "units_detail": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="ascent steps (default: the config's)")
    ap.add_argument("--batch", type=int, default=None, help="channels per batch (default: 64 on the CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a loaded machine)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results-featurevis.json")
    ap.add_argument("--quality", action="store_true",
                    help="only the default ascent against the full-length run (objective ratios, time ratio)")
    ap.add_argument("--per-layer", type=int, default=32, help="channels per layer for --quality")
    args = ap.parse_args()
    if not MODEL.is_file():
        sys.exit(f"the bench needs {MODEL}")
    if args.quality:
        results = quality(args.per_layer, args.threads, steps=args.steps)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(json.dumps({k: results[k] for k in ("ratio", "mean_steps", "time_ratio_default_over_full", "goals")},
                         indent=2))
        return
    results = measure(args.steps, args.batch, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["atlas_estimate"], indent=2))


if __name__ == "__main__":
    main()
