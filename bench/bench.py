"""`make bench`: build the atlas of the shared ResNet-56 over the shared CIFAR-10 test images and
write figures to bench/results.json.

Timings are reported as ratios to a bare forward pass over the same images with the same batch size
and input pipeline, measured in the same process right before (these machines are noisy: only
side-by-side ratios mean much).  Peak memory is measured in separate child processes, one per
image count, so each figure is that build's own peak.

    python bench/bench.py [--images 10000] [--small 1000] [--out bench/results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models" / "resnet56-4bfd9763.th"
CIFAR = SHARED / "data" / "cifar10-test"
ARCH = f"{REPO / 'tests' / 'cifar_resnet.py'}:resnet56"


def image_folder(n: int, root: Path) -> Path:
    """A folder of symlinks to the first n/10 images of each class (balanced, real files)."""
    folder = root / f"cifar{n}"
    if folder.exists():
        return folder
    per_class = max(1, n // 10)
    for cls in sorted(os.listdir(CIFAR)):
        (folder / cls).mkdir(parents=True)
        for name in sorted(os.listdir(CIFAR / cls))[:per_class]:
            (folder / cls / name).symlink_to(CIFAR / cls / name)
    return folder


def bare_forward(ctx) -> float:
    import torch

    from sitegen.hooks import model_guard

    t = time.perf_counter()
    with model_guard(ctx.net), torch.inference_mode():
        for batch in ctx.batches():
            ctx.net(batch.inputs)
    return time.perf_counter() - t


def site_stats(site: Path) -> dict:
    files = [p for p in site.rglob("*") if p.is_file()]
    by_ext: dict[str, int] = {}
    for p in files:
        by_ext[p.suffix] = by_ext.get(p.suffix, 0) + p.stat().st_size
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files), "bytes_by_type": by_ext}


def child(n: int, work: Path) -> dict:
    """One full build in this process: the figures, and this process's peak RSS."""
    sys.path.insert(0, str(REPO))
    from sitegen import progress
    from sitegen.build import BuildReport, prepare, run_passes
    from sitegen.config import from_dict
    from sitegen.output import publish, staging_dir
    from sitegen.passes.base import Cache
    from sitegen.render.site import RenderOptions, render

    progress.set_quiet(True)
    cfg = from_dict({"model": {"arch": ARCH}})
    images = image_folder(n, work)
    t0 = time.perf_counter()
    ctx = prepare(MODEL, images, cfg, work / "layer-cache")
    prepare_s = time.perf_counter() - t0
    bare_s = bare_forward(ctx)
    report = BuildReport(index=work / "site" / "index.html")
    t = time.perf_counter()
    results = run_passes(ctx, Cache(None), report)  # no cache: every pass computes
    passes_s = time.perf_counter() - t
    t = time.perf_counter()
    out = work / f"site{n}"
    staged = staging_dir(out)
    render(ctx, results, staged, RenderOptions(title="bench", patch_size=cfg.site.patch_size))
    publish(staged, out)
    render_s = time.perf_counter() - t
    total_s = time.perf_counter() - t0
    return {
        "images": len(ctx.images),
        "layers": len(ctx.layers),
        "channels": sum(l.channels for l in ctx.layers),
        "batch_size": ctx.batch_size(cfg.topk.batch_size),
        "device": ctx.device.type,
        "seconds": {"prepare": prepare_s, "bare_forward": bare_s, "passes": passes_s, "render": render_s,
                    "total": total_s, **{k: v for k, v in report.timings.items()}},
        "ratio_to_bare_forward": {k.replace("pass:", ""): v / bare_s for k, v in report.timings.items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "site": site_stats(out),
    }


def checkpoint_overhead(n: int, work: Path) -> dict:
    """The dataset pass with checkpoints every 4096 images against none, side by side, twice each
    (alternating, to spread the machine's noise over both)."""
    sys.path.insert(0, str(REPO))
    from sitegen import progress
    from sitegen.build import prepare
    from sitegen.config import from_dict
    from sitegen.passes.topk import TopKPass

    progress.set_quiet(True)
    cfg = from_dict({"model": {"arch": ARCH}})
    ctx = prepare(MODEL, image_folder(n, work), cfg, work / "layer-cache")
    times = {"off": [], "on": []}
    for _ in range(2):
        for mode, every in (("off", 0), ("on", 4096)):
            ctx.scratch = work / f"ckpt-{mode}"
            p = TopKPass(from_dict({"topk": {"checkpoint_every": every}}).topk)
            t = time.perf_counter()
            p.run(ctx)
            times[mode].append(time.perf_counter() - t)
    off, on = min(times["off"]), min(times["on"])
    return {"images": n, "seconds_without": off, "seconds_with_every_4096": on, "overhead": on / off - 1}


def workers_comparison(n: int, work: Path) -> dict:
    """`sitegen build` with 1 process against 2 gloo ranks (the dataset pass only, no cache)."""
    images = image_folder(n, work)
    cfg = work / "topk-only.toml"
    cfg.write_text(TOPK_ONLY)
    out = {}
    for workers in (1, 2):
        cmd = [sys.executable, "-m", "sitegen", "-q", "build", str(MODEL), "--images", str(images), "--arch", ARCH,
               "--config", str(cfg), "--no-cache", "-o", str(work / f"site-w{workers}"), "--workers", str(workers)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
        out[f"seconds_{workers}_process"] = time.perf_counter() - t
    out["speedup_2_over_1"] = out["seconds_1_process"] / out["seconds_2_process"]
    return out


TOPK_ONLY = "".join(f"[{section}]\nenabled = false\n" for section in
                    ("attribution", "featurevis", "occlusion", "tsne", "kernels", "activations"))


def run_child(n: int, work: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(n), "--work", str(work)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=1_000, help="image count for the memory comparison")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    ap.add_argument("--skip-scale", action="store_true", help="skip the checkpoint and 1-vs-2-process figures")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work)))
        return
    if not MODEL.is_file() or not CIFAR.is_dir():
        sys.exit(f"bench needs {MODEL} and {CIFAR}")
    with tempfile.TemporaryDirectory(prefix="sitegen-bench-") as tmp:
        work = Path(tmp)
        small = run_child(args.small, work)
        print(f"{args.small} images: {json.dumps(small['seconds'])}", file=sys.stderr)
        large = run_child(args.images, work)
        print(f"{args.images} images: {json.dumps(large['seconds'])}", file=sys.stderr)
        scale = {}
        if not args.skip_scale:
            scale["checkpoint"] = checkpoint_overhead(args.images, work)
            print(f"checkpoints: {json.dumps(scale['checkpoint'])}", file=sys.stderr)
            scale["workers"] = workers_comparison(args.images, work)
            print(f"workers: {json.dumps(scale['workers'])}", file=sys.stderr)
    s = large["seconds"]
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": "shared ResNet-56 (CIFAR-10)",
        "large": large,
        "small": small,
        "scale": scale,
        "summary": {
            "dataset_pass_over_bare_forward": s.get("pass:topk", float("nan")) / s["bare_forward"],
            "atlas_build_over_bare_forward": s["total"] / s["bare_forward"],
            "peak_rss_large_over_small": large["peak_rss_mib"] / small["peak_rss_mib"],
            "site_mib": large["site"]["bytes"] / 2**20,
            "site_files": large["site"]["files"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
