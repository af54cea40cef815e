"""`make bench`: build the atlas of the shared ResNet-56 over the shared CIFAR-10 test images and
write figures to bench/results.json.

Timings are reported as ratios to a bare forward pass over the same images with the same batch size
and input pipeline, measured in the same process right before and right after the build, the mean
of the two being the reference (these machines are noisy: only side-by-side ratios mean much).  The
build's time (``total``) is its preparation, passes and render, without those reference forwards.
The two usually differ: in a fresh process glibc's allocator hands memory back to the
OS between batches and faults it in again until its dynamic thresholds have grown, so the forward
after the build runs faster, as most of the build does (both are reported).  The atlas
section also times a channels-last bare forward (the layout the attribution, sanity and
feature-vis passes feed the model on the CPU), for the ratios against that layout.  Every build runs in its own child process, so each peak RSS is
that build's own:

- ``dataset_pass``: the dataset (top-k) pass and the render, with 1,000 and with 10,000 images,
  for the dataset pass's ratio to the bare forward and the peak-memory comparison;
- ``atlas``: the whole atlas at the default settings over 10,000 images, every pass timed (its
  ratio to the same run's bare forward), the site's size and file count, the render again on 1
  and 2 processes (its scaling), and the attribution pass's multiply-accumulate floor beside its
  time (``attribution_bench.mac_floor`` on this run's own top-k units);
- ``featurevis``: the default ascent against the full-length one it replaced, side by side on a
  sample of channels (``featurevis_bench.py --quality``): the distribution of the per-channel
  objective ratio and the ratio of the CPU times;
- ``scale``: checkpointing overhead, 1 process against 2 gloo ranks;
- ``sanity``: the sanity checks of the attribution pictures against the attribution pass, both over
  the same ``--small`` images in one child process (wall and CPU seconds; goal: sanity ≤ 30 % of
  attribution; neither pass's work grows with the image count: both look at top-k units);
- ``attribution``, ``occlusion``, ``tsne``: the per-view benches (their own scripts, their own
  baselines: the naive attribution, plain forwards of as many images, scikit-learn against openTSNE);
- ``demo``: `sitegen demo` from a fresh cache, training included (goal: under 3 minutes).
- ``compare``: `--compare`, the shared ResNet-56 against a copy of it fine-tuned for one epoch on half
  of the images (the first half of each class: 5,000 of the 10,000), made here (``finetuned_copy``).
  The dataset pass of the comparison build (both models, one read of the images) against a one-model
  build's, and each build's peak RSS, the two builds run alternately twice each (best of two); goals:
  ≤ 2.2× the time, ≤ 1.3× the memory.

    python bench/bench.py [--images 10000] [--small 1000] [--out bench/results.json] [--skip ...]
    python bench/bench.py --device cuda      # the GPU bench (bench/gpu_bench.py), `make bench-gpu`
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


def bare_forward(ctx, channels_last: bool = False) -> float:
    """Decode, normalise and run the whole model on every image, in inference mode, as the build's
    batches come (channels-first on the CPU); with ``channels_last``, each batch converted to NHWC,
    the layout the attribution and feature-vis passes feed the model on the CPU."""
    import torch

    from sitegen.hooks import model_guard

    t = time.perf_counter()
    with model_guard(ctx.net), torch.inference_mode():
        for batch in ctx.batches():
            x = batch.inputs.contiguous(memory_format=torch.channels_last) if channels_last else batch.inputs
            ctx.net(x)
    return time.perf_counter() - t


def site_stats(site: Path) -> dict:
    files = [p for p in site.rglob("*") if p.is_file()]
    by_ext: dict[str, int] = {}
    for p in files:
        by_ext[p.suffix] = by_ext.get(p.suffix, 0) + p.stat().st_size
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files), "bytes_by_type": by_ext}


def child(n: int, work: Path, topk_only: bool, compare: Path | None = None) -> dict:
    """One build in this process (every default pass, or the dataset pass alone; with ``compare``, a
    comparison build against that checkpoint): the figures, and this process's peak RSS."""
    sys.path.insert(0, str(REPO))
    from sitegen import progress
    from sitegen.build import BuildReport, prepare, run_passes
    from sitegen.config import from_dict
    from sitegen.output import publish, staging_dir
    from sitegen.passes.base import Cache
    from sitegen.render.pages import RenderOptions
    from sitegen.render.site import render
    from sitegen.workpool import keep_freed_memory

    progress.set_quiet(True)
    table = {"model": {"arch": ARCH}}
    if topk_only:
        table.update({section: {"enabled": False} for section in OTHER_PASSES})
    model = MODEL
    if compare is not None:  # the fine-tuned copy is the new model, the shared one the old
        table["compare"] = {"checkpoint": str(MODEL)}
        model = compare
    cfg = from_dict(table)
    images = image_folder(n, work)
    keep_freed_memory()  # as sitegen.build.build does (the reference forwards too)
    t0 = time.perf_counter()
    ctx = prepare(model, images, cfg, work / "layer-cache")
    prepare_s = time.perf_counter() - t0
    # The reference is measured before and after the build (the machine's speed drifts) and is not
    # part of the build's own time.
    bare_before = bare_forward(ctx)
    report = BuildReport(index=work / "site" / "index.html")
    t = time.perf_counter()
    results = run_passes(ctx, Cache(None), report)  # no cache: every pass computes
    passes_s = time.perf_counter() - t
    t = time.perf_counter()
    out = work / f"site{n}{'-topk' if topk_only else ''}{'-compare' if compare else ''}"
    staged = staging_dir(out)
    render(ctx, results, staged, RenderOptions(title="bench", patch_size=cfg.site.patch_size,
                                               image_format=cfg.site.image_format,
                                               workers=cfg.site.render_workers))
    publish(staged, out)
    render_s = time.perf_counter() - t
    total_s = prepare_s + passes_s + render_s
    bare_after = bare_forward(ctx)
    bare_s = (bare_before + bare_after) / 2
    extra = {"bare_forward_runs": [bare_before, bare_after]}
    if not topk_only and compare is None:  # the whole atlas of one model
        extra["bare_forward_channels_last"] = bare_forward(ctx, channels_last=True)
        extra["render_by_workers"] = render_scaling(ctx, results, cfg, work, render_s)
        if "attribution" in results:
            sys.path.insert(0, str(REPO / "bench"))
            from attribution_bench import mac_floor

            floor = mac_floor(ctx, results["topk"], list(cfg.attribution.methods),
                              ctx.batch_size(cfg.attribution.batch_size), cfg.attribution.max_side)
            floor.pop("layers")
            time_ratio = report.timings["pass:attribution"] / bare_s
            extra["attribution_mac_floor"] = {**floor, "time_over_bare_forward": time_ratio,
                                              "time_over_floor": time_ratio / floor["over_bare_forward"]["floor"]}
    return {**extra,
        "images": len(ctx.images),
        "layers": len(ctx.layers),
        "channels": sum(l.channels for l in ctx.layers),
        "batch_size": ctx.batch_size(cfg.topk.batch_size),
        "device": ctx.device.type,
        "seconds": {"prepare": prepare_s, "bare_forward": bare_s, "passes": passes_s, "render": render_s,
                    "total": total_s, **{k: v for k, v in report.timings.items()}},
        "ratio_to_bare_forward": {k.replace("pass:", ""): v / bare_s for k, v in report.timings.items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # The largest of its worker processes (the passes' pools, the render's), each its own peak.
        "peak_rss_workers_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "site": site_stats(out),
    }


def render_scaling(ctx, results, cfg, work: Path, all_cores_s: float) -> dict[str, float]:
    """The same site rendered again on 1 and 2 processes, beside the default's (every core)."""
    from sitegen.render.pages import RenderOptions
    from sitegen.render.site import render
    from sitegen.render.workers import available_cores

    times = {str(available_cores()): all_cores_s}
    for workers in (2, 1):
        if str(workers) in times:
            continue
        site = work / f"site-render-{workers}"
        t = time.perf_counter()
        render(ctx, results, site, RenderOptions(title="bench", patch_size=cfg.site.patch_size,
                                                 image_format=cfg.site.image_format, workers=workers))
        times[str(workers)] = time.perf_counter() - t
    return times
def cpu_seconds() -> float:
    """CPU seconds of this process and of its ended children (the passes' worker pools, which are
    joined when each pass ends)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def sanity_child(n: int, work: Path) -> dict:
    """The top-k, attribution and sanity passes at the default settings over ``n`` images, in this
    process; the sanity pass's time as a share of the attribution pass's (wall and CPU)."""
    sys.path.insert(0, str(REPO))
    from sitegen import progress
    from sitegen.build import prepare
    from sitegen.config import from_dict
    from sitegen.passes.attribution import AttributionPass
    from sitegen.passes.sanity import SanityPass
    from sitegen.passes.topk import TopKPass

    progress.set_quiet(True)
    cfg = from_dict({"model": {"arch": ARCH}})
    ctx = prepare(MODEL, image_folder(n, work), cfg, work / "layer-cache")
    seconds: dict[str, dict[str, float]] = {}
    for p in (TopKPass(cfg.topk), AttributionPass(cfg.attribution), SanityPass(cfg.sanity)):
        wall, cpu = time.perf_counter(), cpu_seconds()
        ctx.results[p.name] = p.run(ctx)
        seconds[p.name] = {"wall": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu}
    sanity = ctx.results["sanity"]
    pairs = sum(len(sanity.arrays[f"L{i}.units"]) * (3 + sanity.meta["images"]) for i in range(len(sanity.meta["layers"])))
    return {"images": len(ctx.images), "layers": len(ctx.layers), "units_attributed": ctx.results["attribution"].meta["units"],
            "sanity_pairs": pairs, "seconds": seconds,
            "sanity_over_attribution": {k: seconds["sanity"][k] / seconds["attribution"][k] for k in ("wall", "cpu")}}


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


OTHER_PASSES = ("attribution", "sanity", "featurevis", "occlusion", "tsne", "kernels", "activations")
TOPK_ONLY = "".join(f"[{section}]\nenabled = false\n" for section in OTHER_PASSES)


def finetuned_copy(n: int, work: Path, epochs: int = 1) -> tuple[Path, dict]:
    """The shared ResNet-56 fine-tuned for one epoch on the first half of each class's images among
    the bench's ``n`` (5,000 of 10,000): SGD, learning rate 0.01, momentum 0.9, weight decay 5e-4,
    batches of 128 in shuffled order (seed 0), BatchNorm in training mode, no augmentation; the
    atlas's preprocessing (CIFAR mean and std).  Saved as a plain state dict."""
    sys.path.insert(0, str(REPO))
    import torch

    from sitegen.build import prepare
    from sitegen.config import from_dict

    cfg = from_dict({"model": {"arch": ARCH}, **{s: {"enabled": False} for s in OTHER_PASSES}})
    ctx = prepare(MODEL, image_folder(n, work), cfg, work / "layer-cache")
    labels = ctx.images.labels
    chosen = [i for c in sorted(set(labels.tolist())) for i in
              (lambda members: members[: len(members) // 2])([int(j) for j in (labels == c).nonzero()[0]])]
    inputs, targets = [], []
    for batch in ctx.batches(chosen, batch_size=256):
        inputs.append(batch.inputs[batch.ok])
        targets.append(torch.from_numpy(labels[batch.indices.numpy()])[batch.ok])
    x, y = torch.cat(inputs), torch.cat(targets)
    net = ctx.net
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    seconds = time.perf_counter() - t
    with torch.no_grad():
        accuracy = float(torch.cat([net(part).argmax(1) for part in x.split(256)]).eq(y).float().mean())
    path = work / "resnet56-finetuned.pt"
    torch.save(net.state_dict(), path)
    return path, {"train_images": len(x), "epochs": epochs, "seconds": seconds, "train_accuracy_after": accuracy,
                  "recipe": "SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 128, shuffled (seed 0), "
                            "BatchNorm in training mode, no augmentation"}


def compare_bench(n: int, work: Path) -> dict:
    """The comparison build's dataset pass and peak RSS against a one-model build's, alternately."""
    copy, made = finetuned_copy(n, work)
    log(f"fine-tuned copy: {json.dumps(made)}")
    runs: dict[str, list[dict]] = {"single": [], "compare": []}
    for _ in range(2):
        runs["single"].append(run_child(n, work, topk_only=True))
        runs["compare"].append(run_child(n, work, topk_only=True, compare=copy))
    best = {k: min(v, key=lambda r: r["seconds"]["pass:topk"]) for k, v in runs.items()}
    rss = {k: min(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    single, both = best["single"]["seconds"], best["compare"]["seconds"]
    return {
        "images": n, "finetuned_copy": made,
        "seconds_dataset_pass": {k: [r["seconds"]["pass:topk"] for r in v] for k, v in runs.items()},
        "seconds_compare_figures": [r["seconds"].get("pass:compare") for r in runs["compare"]],
        "seconds_bare_forward": {k: [r["seconds"]["bare_forward"] for r in v] for k, v in runs.items()},
        "peak_rss_mib": {k: [r["peak_rss_mib"] for r in v] for k, v in runs.items()},
        "dataset_pass_ratio": both["pass:topk"] / single["pass:topk"],
        "peak_rss_ratio": rss["compare"] / rss["single"],
        "peak_rss_ratio_worst": max(r["peak_rss_mib"] for r in runs["compare"]) /
        max(r["peak_rss_mib"] for r in runs["single"]),
        "goals": {"dataset_pass_ratio": 2.2, "peak_rss_ratio": 1.3},
    }


def run_child(n: int, work: Path, topk_only: bool = False, compare: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), "--work", str(work)] + (["--topk-only"] if topk_only else [])
    if compare is not None:
        cmd += ["--compare", str(compare)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_script(name: str, args: list[str], work: Path) -> dict:
    """One of the per-view benches in its own process; its JSON figures."""
    out = work / f"{name}.json"
    t = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), *args, "--out", str(out)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    figures = json.loads(out.read_text())
    figures["bench_wall_s"] = time.perf_counter() - t
    return figures


SECTIONS = ("dataset_pass", "atlas", "featurevis", "scale", "sanity", "attribution", "occlusion", "tsne", "demo", "compare")


def demo_time(work: Path) -> dict:
    """`sitegen demo` from nothing (a fresh cache: training included), as `make demo` runs it; the
    goal is under 3 minutes on 2 CPU cores."""
    cmd = [sys.executable, "-m", "sitegen", "-q", "demo", "--out", str(work / "demo-atlas"),
           "--cache-dir", str(work / "demo-cache")]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return {"seconds": time.perf_counter() - t, "site": site_stats(work / "demo-atlas")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    if "--device" in sys.argv[1:] or any(a.startswith("--device=") for a in sys.argv[1:]):
        # The GPU bench has its own builds and figures (bench/gpu_bench.py): --device hands over to it.
        sys.path.insert(0, str(REPO / "bench"))
        import gpu_bench

        gpu_bench.main(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=1_000, help="image count for the memory comparison")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--topk-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sanity-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--compare", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.topk_only, args.compare)))
        return
    if args.sanity_child:
        print(json.dumps(sanity_child(args.sanity_child, args.work)))
        return
    if not MODEL.is_file() or not CIFAR.is_dir():
        sys.exit(f"bench needs {MODEL} and {CIFAR}")
    run = [s for s in SECTIONS if s not in args.skip]
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version(), "load_average_at_start": os.getloadavg()},
                     "model": "shared ResNet-56 (CIFAR-10)", "command": " ".join(["python", *sys.argv])}
    summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="sitegen-bench-") as tmp:
        work = Path(tmp)
        if "dataset_pass" in run:
            small = run_child(args.small, work, topk_only=True)
            log(f"dataset pass, {args.small} images: {json.dumps(small['seconds'])}")
            large = run_child(args.images, work, topk_only=True)
            log(f"dataset pass, {args.images} images: {json.dumps(large['seconds'])}")
            results["dataset_pass"] = {"small": small, "large": large}
            summary.update({
                "dataset_pass_over_bare_forward": large["seconds"]["pass:topk"] / large["seconds"]["bare_forward"],
                "dataset_pass_over_bare_forward_small": small["seconds"]["pass:topk"] / small["seconds"]["bare_forward"],
                "peak_rss_mib_small_large": [small["peak_rss_mib"], large["peak_rss_mib"]],
                "peak_rss_large_over_small": large["peak_rss_mib"] / small["peak_rss_mib"],
            })
        if "atlas" in run:
            atlas = run_child(args.images, work)
            log(f"whole atlas, {args.images} images: {json.dumps(atlas['seconds'])}")
            results["atlas"] = atlas
            s = atlas["seconds"]
            fv = s.get("pass:featurevis")
            summary.update({
                "atlas_build_over_bare_forward": s["total"] / s["bare_forward"],
                # Against the forward after the build alone: the allocator then in the state most
                # of the build ran in (the stricter reference).
                "atlas_build_over_bare_forward_after": s["total"] / atlas["bare_forward_runs"][1],
                "bare_forward_runs_s": atlas.get("bare_forward_runs"),
                "atlas_build_over_bare_forward_channels_last":
                    s["total"] / atlas["bare_forward_channels_last"] if atlas.get("bare_forward_channels_last") else None,
                "attribution_pass_over_bare_forward_channels_last":
                    s.get("pass:attribution", float("nan")) / atlas["bare_forward_channels_last"]
                    if atlas.get("bare_forward_channels_last") else None,
                "passes_over_bare_forward": atlas["ratio_to_bare_forward"],
                "attribution_pass_over_bare_forward": s.get("pass:attribution", float("nan")) / s["bare_forward"],
                "sanity_over_attribution_in_atlas": s.get("pass:sanity", float("nan")) / s.get("pass:attribution", float("nan")),
                "featurevis_s_per_channel": fv / (atlas["channels"] + 10) if fv else None,
                "render_s_by_workers": atlas.get("render_by_workers"),
                "render_speedup_2_over_1": atlas["render_by_workers"]["1"] / atlas["render_by_workers"]["2"]
                if {"1", "2"} <= set(atlas.get("render_by_workers", {})) else None,
                "attribution_mac_floor_over_bare_forward":
                    atlas.get("attribution_mac_floor", {}).get("over_bare_forward", {}).get("floor"),
                "attribution_mac_floor_unshared_over_bare_forward":
                    atlas.get("attribution_mac_floor", {}).get("over_bare_forward", {}).get("floor_unshared"),
                "attribution_over_mac_floor": atlas.get("attribution_mac_floor", {}).get("time_over_floor"),
                "atlas_peak_rss_mib": atlas["peak_rss_mib"],
                "atlas_peak_rss_workers_mib": atlas.get("peak_rss_workers_mib"),
                "site_mib": atlas["site"]["bytes"] / 2**20,
                "site_files": atlas["site"]["files"],
            })
        if "featurevis" in run:
            q = run_script("featurevis_bench", ["--quality"], work)
            log(f"feature visualisation: objective ratio {json.dumps(q['ratio'])}, "
                f"time ratio {q['time_ratio_default_over_full']:.2f}")
            q.pop("units_detail")
            results["featurevis_quality"] = q
            summary.update({"featurevis_objective_ratio": {k: q["ratio"][k] for k in ("median", "p5", "min")},
                            "featurevis_time_ratio_to_full_length": q["time_ratio_default_over_full"]})
        if "scale" in run:
            scale = {"checkpoint": checkpoint_overhead(args.images, work)}
            log(f"checkpoints: {json.dumps(scale['checkpoint'])}")
            scale["workers"] = workers_comparison(args.images, work)
            log(f"workers: {json.dumps(scale['workers'])}")
            results["scale"] = scale
            summary.update({"checkpoint_overhead": scale["checkpoint"]["overhead"],
                            "two_processes_speedup": scale["workers"]["speedup_2_over_1"]})
        if "sanity" in run:
            cmd = [sys.executable, __file__, "--sanity-child", str(args.small), "--work", str(work)]
            sanity = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            log(f"sanity over attribution, {args.small} images: {json.dumps(sanity['sanity_over_attribution'])}")
            results["sanity"] = sanity
            summary["sanity_over_attribution"] = sanity["sanity_over_attribution"]
        if "attribution" in run:
            # The top-9 units (hence the attribution work) do not grow with the image count; 1,000
            # images give the same number of units and the script scales the forward to 10,000.
            a = run_script("attribution_bench", ["--images", str(args.small)], work)
            log(f"attribution: {json.dumps(a['naive_over_attribution'])} x faster than naive")
            results["attribution"] = a
            summary.update({"attribution_naive_over_pass": a["naive_over_attribution"],
                            "attribution_over_bare_forward_at_10000": a["ratio_at_10000_images"],
                            "attribution_mac_floor_over_bare_forward_at_10000":
                                a["mac_floor"]["over_bare_forward_at_10000"],
                            "attribution_over_mac_floor": a["attribution_over_mac_floor"]})
        if "occlusion" in run:
            o = run_script("occlusion_bench", ["--model", "resnet56", "--threads", "1"], work)
            log(f"occlusion: {o['ratio']} x plain forwards")
            results["occlusion"] = o
            summary["occlusion_over_plain_forwards"] = o["ratio"]
        if "tsne" in run:
            t = run_script("tsne_bench", ["--points", str(args.images), "--model", "resnet56"], work)
            log(f"t-SNE: {json.dumps(t.get('sklearn'))}")
            results["tsne"] = t
            summary.update({"tsne_whole_pass_over_tsne": t["sklearn"]["ratio_whole_to_tsne"],
                            "opentsne_speedup": t.get("speedup_tsne")})
        if "demo" in run:
            d = demo_time(work)
            log(f"demo: {d['seconds']:.1f} s")
            results["demo"] = d
            summary["demo_seconds"] = d["seconds"]
        if "compare" in run:
            c = compare_bench(args.images, work)
            log(f"compare: dataset pass {c['dataset_pass_ratio']:.2f}x, peak RSS {c['peak_rss_ratio']:.2f}x")
            results["compare"] = c
            summary.update({"compare_dataset_pass_over_single": c["dataset_pass_ratio"],
                            "compare_peak_rss_over_single": c["peak_rss_ratio"]})
    results["summary"] = summary
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
