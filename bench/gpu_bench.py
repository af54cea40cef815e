"""`make bench-gpu` (= ``python bench/bench.py --device cuda``): the atlas on one GPU, figures to
bench/results-gpu.json.

Two builds, each in a child process of its own (its own CUDA context, so each peak memory is its
own), every pass computed (no cache):

- ``resnet50``: ``torchvision:resnet50`` with random weights (seed 0; timing does not need trained
  ones) at 224 px, over the shared CIFAR-10 test images resized to 224 (``data.resize = 224``), the
  last block of each stage (``layer1.2``, ``layer2.3``, ``layer3.5``, ``layer4.2``: 3,840 channels)
  and the 1,000 class visualisations.  Every layer (about 26,000 channels) would not fit the time;
- ``resnet56``: the shared ResNet-56 at 32 px over the same images, every layer (3,040 channels),
  as ``make bench`` builds it on the CPU; its site is then rendered again on 1 and 2 processes
  (the render's scaling: 1, 2 and every core), while the time allows.

Per pass: seconds, throughput (images/s for the dataset, t-SNE, occlusion and activation passes,
units/s for attribution, channels/s for feature visualisation), the ratio to a bare forward over the
same images on the same GPU (measured in the same process right before, after a warm-up batch), and
the peak GPU memory allocated during the pass.  Per build: the render's seconds, the site's bytes
and files.  Settings recorded: the GPU, its memory, the precision (the dataset pass asks for bf16
autocast where the GPU supports it, else fp16, and keeps it only if the top-k sets agree with fp32),
the TF32 switches, and the batch sizes the memory gave each pass.

Sized to finish in under 8 minutes on one H100/H200-class GPU: 10,000 images for ResNet-56, 5,000
for ResNet-50.  Each build gets a share of ``--budget-s`` (default 450 s) as a hard timeout; a build
that runs over is reported as such rather than hanging the bench.

``--device cpu --smoke`` runs the same code on the CPU with tiny settings (a few images, one layer,
two ascent steps): tests/test_gpu_bench.py uses it to check the script end to end without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESNET56 = SHARED / "models" / "resnet56-4bfd9763.th"
CIFAR = SHARED / "data" / "cifar10-test"
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
BUDGET_S = 450
"""Default wall-clock budget of the whole bench (goal: under 8 minutes)."""


@dataclass(frozen=True)
class ModelPlan:
    """One build of the GPU bench."""

    name: str
    arch: str
    images: int
    layers: tuple[str, ...] = ()
    """Layer names (empty: every layer)."""
    resize: int = 0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    share: float = 0.5
    """Share of the bench's budget this build may take (its timeout)."""
    render_scaling: bool = False
    """Render the site again on 1 and 2 processes (and report every core's time beside them)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Extra config sections laid over the defaults (the smoke run's tiny settings)."""


def default_plans(images: int | None = None) -> list[ModelPlan]:
    """The two builds; ``images`` overrides both image counts."""
    return [
        ModelPlan("resnet56", f"{REPO / 'tests' / 'cifar_resnet.py'}:resnet56", images or 10_000,
                  mean=tuple(CIFAR_MEAN), std=tuple(CIFAR_STD), share=0.4, render_scaling=True),
        ModelPlan("resnet50", "torchvision:resnet50", images or 5_000,
                  layers=("layer1.2", "layer2.3", "layer3.5", "layer4.2"), resize=224, share=0.6),
    ]


def smoke_plans() -> list[ModelPlan]:
    """Tiny versions of the same builds, for a CPU run of the whole script (tests)."""
    tiny = {"featurevis": {"steps": 2, "classes": False}, "samples": {"per_class": 1, "max_images": 2},
            "tsne": {"iterations": 250, "perplexity": 3.0, "grid_max": 16}, "occlusion": {"stride": 16},
            "attribution": {"methods": ["guided"]}}
    return [replace(p, images=10, layers=layers, resize=resize, config=tiny)
            for p, layers, resize in zip(default_plans(), [("layer1.0",), ("layer1.0.conv1",)], [0, 64])]


# ------------------------------------------------------------------ settings that follow the device

def choose_device(requested: str):
    """``cuda`` (a GPU, or a clear error), ``cpu``, or ``auto`` (the GPU when PyTorch sees one)."""
    import torch

    if requested == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench-gpu: PyTorch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                             "run it on a GPU machine, or use `make bench` for the CPU figures")
        return torch.device("cuda")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    raise SystemExit(f"bench-gpu: unknown device {requested!r}; use cuda, cpu or auto")


def precision(device) -> dict[str, Any]:
    """The dataset pass's autocast request and the TF32 switches, as this device will run them.

    bf16 where the GPU has it (Ampere and later), fp16 on older GPUs, fp32 on the CPU (where
    autocast would slow the pass down).  The pass keeps a reduced precision only where a sample's
    top-k sets agree with fp32 (``topk.min_agreement``); the result records which it used.
    """
    import torch

    if device.type != "cuda":
        return {"topk": "fp32", "tf32_matmul": False, "tf32_cudnn": False}
    return {"topk": "bf16" if torch.cuda.is_bf16_supported() else "fp16",
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32)}


def batch_sizes(ctx, cfg) -> dict[str, int]:
    """The batch each pass will use on ``ctx.device`` (what the free memory gives it)."""
    from sitegen.passes.featurevis import FeatureVisPass
    from sitegen.passes.occlusion import default_batch

    return {"topk": ctx.batch_size(cfg.topk.batch_size), "attribution": ctx.batch_size(cfg.attribution.batch_size),
            "featurevis": FeatureVisPass(cfg.featurevis).batch_size(ctx),
            "occlusion": cfg.occlusion.batch_size or default_batch(ctx)}


def config_table(plan: ModelPlan, device) -> dict[str, Any]:
    table: dict[str, Any] = {"model": {"arch": plan.arch},
                             "data": {"resize": plan.resize, "mean": list(plan.mean), "std": list(plan.std)},
                             "topk": {"precision": precision(device)["topk"]}}
    if plan.layers:
        table["layers"] = list(plan.layers)
    for section, values in plan.config.items():
        table[section] = {**table.get(section, {}), **values}
    return table


def throughput(name: str, seconds: float, *, images: int, result) -> dict[str, float]:
    """What one pass did per second, in the unit that pass works in."""
    if seconds <= 0:
        return {}
    meta, arrays = result.meta, result.arrays
    if name == "attribution":
        return {"units_per_s": meta.get("units", 0) / seconds}
    if name == "featurevis":
        channels = sum(len(arrays[k]) for k in arrays if k.endswith(".objective"))
        return {"channels_per_s": channels / seconds}
    if name in ("occlusion", "activations", "tsne"):
        n = len(arrays.get("images", ())) if "skipped" not in meta else 0
        return {"images_per_s": n / seconds}
    if name == "topk":
        return {"images_per_s": images / seconds}
    return {}


# ------------------------------------------------------------------ one build (child process)

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def bare_forward(ctx) -> float:
    """Seconds of a forward over every image (decode, normalise, copy, forward), after a warm-up batch."""
    import torch

    from sitegen.hooks import model_guard

    with model_guard(ctx.net), torch.inference_mode():
        for batch in ctx.batches(list(range(min(len(ctx.images), 64)))):
            ctx.net(batch.inputs)
        _sync(ctx.device)
        t = time.perf_counter()
        for batch in ctx.batches():
            ctx.net(batch.inputs)
        _sync(ctx.device)
    return time.perf_counter() - t


def random_resnet50(path: Path) -> Path:
    import torch
    import torchvision

    if not path.is_file():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


def image_folder(n: int, root: Path) -> Path:
    """The first n/10 images of each CIFAR-10 class, as symlinks."""
    folder = root / f"cifar{n}"
    if folder.exists():
        return folder
    for cls in sorted(os.listdir(CIFAR)):
        (folder / cls).mkdir(parents=True)
        for name in sorted(os.listdir(CIFAR / cls))[:max(1, n // 10)]:
            (folder / cls / name).symlink_to(CIFAR / cls / name)
    return folder


def build_one(plan: ModelPlan, device_name: str, work: Path, deadline: float) -> dict[str, Any]:
    """Build ``plan``'s atlas on the device, every pass timed; the figures."""
    import torch

    sys.path.insert(0, str(REPO))
    from sitegen import progress
    from sitegen.build import prepare, site_size
    from sitegen.config import from_dict
    from sitegen.output import publish, staging_dir
    from sitegen.passes import default_passes
    from sitegen.passes.base import Cache, run_cached
    from sitegen.render.pages import RenderOptions
    from sitegen.render.site import render
    from sitegen.render.workers import available_cores

    progress.set_quiet(True)
    device = choose_device(device_name)
    cfg = from_dict(config_table(plan, device))
    checkpoint = RESNET56 if plan.name == "resnet56" else random_resnet50(work / "resnet50-random.pt")
    t0 = time.perf_counter()
    ctx = prepare(checkpoint, image_folder(plan.images, work), cfg, work / "layer-cache", device=device)
    out: dict[str, Any] = {
        "model": plan.name, "arch": plan.arch, "images": len(ctx.images), "input_size": list(ctx.input_size),
        "layers": len(ctx.layers), "channels": sum(l.channels for l in ctx.layers),
        "device": str(device), "precision_requested": precision(device), "batch_sizes": batch_sizes(ctx, cfg),
        "seconds": {"prepare": time.perf_counter() - t0},
    }
    out["seconds"]["bare_forward"] = bare = bare_forward(ctx)
    out["bare_forward_images_per_s"] = len(ctx.images) / bare
    results: dict = {}
    ctx.results = results
    passes: dict[str, Any] = {}
    for p in default_passes(cfg):
        _sync(device)
        _peak_reset(device)
        t = time.perf_counter()
        results[p.name], _ = run_cached(p, ctx, Cache(None))
        _sync(device)
        s = time.perf_counter() - t
        passes[p.name] = {"seconds": s, "over_bare_forward": s / bare, "peak_gpu_mib": _peak_mib(device),
                          **throughput(p.name, s, images=len(ctx.images), result=results[p.name])}
    topk_meta = results["topk"].meta
    out["precision_used"] = topk_meta.get("precision")
    out["passes"] = passes
    site = work / f"site-{plan.name}"
    cores = available_cores()
    renders: dict[str, float | None] = {}
    for n in dict.fromkeys([cores, 2, 1] if plan.render_scaling else [cores]):
        if renders and time.perf_counter() + renders[str(cores)] * cores / n > deadline:
            renders[str(n)] = None  # would run past this build's share of the budget
            continue
        staged = staging_dir(site)
        t = time.perf_counter()
        render(ctx, results, staged, RenderOptions(title=plan.name, patch_size=cfg.site.patch_size,
                                                   image_format=cfg.site.image_format, workers=n))
        publish(staged, site)
        renders[str(n)] = time.perf_counter() - t
    out["seconds"]["render_by_workers"] = renders
    out["seconds"]["render"] = renders[str(cores)]
    out["seconds"]["passes"] = sum(v["seconds"] for v in passes.values())
    out["seconds"]["total"] = time.perf_counter() - t0
    out["atlas_over_bare_forward"] = (out["seconds"]["passes"] + out["seconds"]["render"]) / bare
    files, size = site_size(site)
    out["site"] = {"files": files, "bytes": size, "mib": size / 2**20}
    if device.type == "cuda":
        out["gpu_peak_mib_overall"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out


# ------------------------------------------------------------------ the bench

def machine(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30,
                     "gpu_count": torch.cuda.device_count(), "cuda": torch.version.cuda})
    return info


def run(device_name: str, out_path: Path, plans: Sequence[ModelPlan], budget_s: float) -> dict[str, Any]:
    device = choose_device(device_name)
    if not RESNET56.is_file() or not CIFAR.is_dir():
        raise SystemExit(f"bench-gpu needs {RESNET56} and {CIFAR}")
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(device), "device": device_name,
                               "command": " ".join(["python", *sys.argv]), "budget_s": budget_s, "builds": {}}
    with tempfile.TemporaryDirectory(prefix="sitegen-bench-gpu-") as tmp:
        work = Path(tmp)
        for plan in plans:
            left = budget_s - (time.perf_counter() - start)
            timeout = max(30.0, min(left, budget_s * plan.share if plan is not plans[-1] else left))
            cmd = [sys.executable, __file__, "--child", json.dumps(asdict(plan)), "--device", device_name,
                   "--work", str(work), "--timeout", str(timeout)]
            t = time.perf_counter()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)
            except subprocess.TimeoutExpired:
                results["builds"][plan.name] = {"timed_out_after_s": time.perf_counter() - t}
                continue
            if done.returncode != 0:
                results["builds"][plan.name] = {"failed": done.stderr[-4000:]}
                continue
            results["builds"][plan.name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"[{time.perf_counter() - start:6.1f} s] {plan.name}: "
                  f"{json.dumps(results['builds'][plan.name]['seconds'])}", file=sys.stderr, flush=True)
    results["seconds"] = time.perf_counter() - start
    results["summary"] = {name: {"atlas_over_bare_forward": b.get("atlas_over_bare_forward"),
                                 **{f"{p}_over_bare_forward": v["over_bare_forward"] for p, v in b.get("passes", {}).items()},
                                 "render_by_workers": b.get("seconds", {}).get("render_by_workers"),
                                 "site_mib": b.get("site", {}).get("mib")}
                          for name, b in results["builds"].items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cpu or auto")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results-gpu.json")
    ap.add_argument("--images", type=int, default=None, help="images per build (default 10,000 and 5,000)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S)
    ap.add_argument("--smoke", action="store_true", help="tiny settings (a CPU check of the script)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        raw = json.loads(args.child)
        plan = ModelPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        deadline = time.perf_counter() + (args.timeout or BUDGET_S)
        print(json.dumps(build_one(plan, args.device, args.work, deadline)))
        return
    plans = smoke_plans() if args.smoke else default_plans(args.images)
    results = run(args.device, args.out, plans, args.budget_s)
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
