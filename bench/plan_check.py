"""Check the build's plan against what a build measures, and print the figures side by side.

    python bench/plan_check.py acceptance [--work DIR] [--images 1000] [--reduced-images 256]
    python bench/plan_check.py compare SITE MODEL --images DIR [build flags...]
    python bench/plan_check.py calibrate SITE

``acceptance`` runs the two checks of the planning work on ``torchvision:resnet50`` (random weights)
over crops of scikit-learn's two sample photographs:

1. ``sitegen plan`` at the defaults over 1,000 photographs (cheap: no pass runs): the site estimate
   must be ≤ 1 GB and the plan must name what it left out;
2. a real build of a reduced case (2 layers, 256 images) with ``--max-bytes 0``: every pass's
   measured time and the site's bytes beside the plan's estimates, and whether each lands within
   ±30 %.

Timings are only meaningful on a quiet machine (the probe and the passes must see the same CPU);
the script prints the machine's load average beside them.  Results go to ``bench/plan_check.json``.

``compare`` plans and builds any model (the flags are ``sitegen build``'s) and prints the same
table; ``calibrate`` prints, for a built site, the bytes per file kind, from which the HTML
constants of the estimates (``HTML`` in sitegen/render/estimate.py and in the views) are read.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.30


def kind(rel: str) -> str:
    """The kind of a site file, named as the estimates name their items (``SiteItem.what``)."""
    p = rel.split("/")
    if rel.endswith(".fv.png"):
        return "feature-vis images"
    if p[0] == "img" and len(p) > 1:
        sub = {"featurevis-classes": "class images", "images": "image pictures", "occlusion": "occlusion overlays",
               "activations": "activation pictures", "tsne": "t-SNE pictures", "kernels": "kernel pictures"}
        if p[1] in sub:
            return sub[p[1]]
        if rel == "img/colorbar.png":
            return "occlusion page"
        if p[1] == "sanity":
            return "sanity charts"
        if re.search(r"\.old\.[a-z]+$", rel):
            return "old sprites"
        if rel.endswith(".fv-old.png"):
            return "old feature-vis images"
        return "sprites"
    if p[0] == "layers":
        if p[-1].startswith("by-change"):
            return "by-change pages"
        return "channel pages" if re.fullmatch(r"\d+\.html", p[-1]) else "layer pages"
    if p[0] == "stages":
        return "stages index" if rel == "stages/index.html" else "stage pages"
    table = {"images": "image pages", "activations": "activation pages", "kernels": "kernel pages",
             "tsne": "t-SNE pages", "occlusion": "occlusion page", "classes": "feature-vis pages",
             "assets": "assets"}
    if p[0] in table and len(p) > 1:
        return table[p[0]]
    return {"featurevis.html": "feature-vis pages", "correspondence.html": "correspondence.html",
            "index.html": "index and search", "data/search-index.js": "index and search",
            "data/atlas.json": "data/atlas.json", "sanity.html": "sanity page", "changes.html": "changes pages",
            "changes-tsne.html": "changes pages"}.get(rel, "assets")


def measured_kinds(site: Path) -> dict[str, list[float]]:
    """Files and bytes per kind; each file also carries its line in the output marker."""
    out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for f in site.rglob("*"):
        if f.is_file():
            rel = f.relative_to(site).as_posix()
            if rel == ".sitegen-atlas.json":
                out["assets"][0] += 1
                out["assets"][1] += 16
                continue
            k = kind(rel)
            out[k][0] += 1
            out[k][1] += f.stat().st_size + len(rel.encode("utf-8", "surrogateescape")) + 4
    return out


def estimated_kinds(items) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for i in items:
        out[i.what][0] += i.files
        out[i.what][1] += i.bytes
    return out


def size_table(items, site: Path) -> list[str]:
    est, got = estimated_kinds(items), measured_kinds(site)
    lines = [f"  {'kind':<22} {'est. files':>10} {'files':>7} {'est. bytes':>12} {'bytes':>12}  ratio"]
    for k in sorted(set(est) | set(got), key=lambda k: -max(est.get(k, [0, 0])[1], got.get(k, [0, 0])[1])):
        ef, eb = est.get(k, [0, 0.0])
        gf, gb = got.get(k, [0, 0.0])
        ratio = f"{gb / eb:.2f}" if eb else "—"
        lines.append(f"  {k:<22} {int(ef):>10,} {int(gf):>7,} {int(eb):>12,} {int(gb):>12,}  {ratio}")
    return lines


def calibrate(site: Path) -> None:
    got = measured_kinds(site)
    for k, (n, b) in sorted(got.items(), key=lambda kv: -kv[1][1]):
        print(f"{k:<22} {int(n):>7,} files {int(b):>12,} bytes  {b / max(n, 1):>10,.0f} per file")


def photographs(folder: Path, n: int, side: int = 224, seed: int = 0) -> Path:
    """n square crops (random positions and sizes, resized to ``side``) of scikit-learn's two
    sample photographs, in two class folders."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if folder.is_dir() and len(list(folder.rglob("*.jpg"))) == n:
        return folder
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    names = ("china", "flower")
    for i in range(n):
        k = i % 2
        img = photos[k]
        h, w = img.shape[:2]
        s = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        crop = Image.fromarray(img[y:y + s, x:x + s]).resize((side, side), Image.Resampling.BILINEAR)
        (folder / names[k]).mkdir(parents=True, exist_ok=True)
        crop.save(folder / names[k] / f"{i:04d}.jpg", quality=92)
    return folder


def resnet50_checkpoint(path: Path) -> Path:
    import torch
    import torchvision

    if not path.is_file():
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model("resnet50", weights=None).state_dict(), path)
    return path


def run_plan(argv: list[str]):
    """The plan as `sitegen plan` makes it (in this process), and its context."""
    from sitegen.build import build
    from sitegen.cli import app  # noqa: F401 - the same flags

    args = _parse_build_flags(argv)
    report = build(args["model"], args["images"], args["out"], args["cfg"], cache_dir=None, plan_only=True)
    return report.plan


def _parse_build_flags(argv: list[str]) -> dict:
    """The few build flags this script passes (model, --images, --arch, --layer, --max-bytes, -o, --config)."""
    from sitegen.build import load_config

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--images", "-i", required=True)
    p.add_argument("--arch")
    p.add_argument("--layer", "-l", action="append", default=[])
    p.add_argument("--max-bytes", type=int)
    p.add_argument("--out", "-o", default="atlas")
    p.add_argument("--config", "-c")
    a = p.parse_args(argv)
    cfg = load_config(a.config, model={"arch": a.arch}, site={"max_bytes": a.max_bytes}, layers=a.layer)
    return {"model": a.model, "images": a.images, "out": a.out, "cfg": cfg}


def compare(argv: list[str], record: dict | None = None) -> dict:
    """Plan and build (each in this process, no cache) and print estimates beside measurements."""
    from sitegen import progress
    from sitegen.build import build

    args = _parse_build_flags(argv)
    t = time.perf_counter()
    report = build(args["model"], args["images"], args["out"], args["cfg"], cache_dir=None, force=True)
    wall = time.perf_counter() - t
    plan = report.plan
    rows = []
    print(f"load average before/after: {record.get('load_before') if record else '?'} / {os.getloadavg()}")
    print(f"{'pass':<16} {'estimated s':>12} {'measured s':>11}  ratio  within ±{TOLERANCE:.0%}")
    for p in plan.passes:
        got = report.timings.get(f"pass:{p.name}")
        ok = p.seconds is not None and got is not None and abs(got / max(p.seconds, 1e-9) - 1) <= TOLERANCE
        rows.append({"pass": p.name, "estimated": p.seconds, "measured": got, "within": ok})
        print(f"{p.name:<16} {p.seconds if p.seconds is not None else float('nan'):>12.2f} "
              f"{got if got is not None else float('nan'):>11.2f}  {(got or 0) / max(p.seconds or 1e-9, 1e-9):5.2f}  {ok}")
    site_ok = abs(report.site_bytes / plan.site_bytes - 1) <= TOLERANCE
    print(f"{'site bytes':<16} {plan.site_bytes:>12,.0f} {report.site_bytes:>11,}  "
          f"{report.site_bytes / plan.site_bytes:5.2f}  {site_ok}")
    print(f"{'site files':<16} {plan.site_files:>12,} {report.site_files:>11,}")
    print("\n".join(size_table(plan.items, Path(args["out"]))))
    progress.info(f"build took {wall:.1f} s (plan {report.timings.get('plan', 0):.1f} s)")
    return {"passes": rows, "site": {"estimated_bytes": plan.site_bytes, "bytes": report.site_bytes,
                                     "estimated_files": plan.site_files, "files": report.site_files,
                                     "within": site_ok},
            "plan_seconds": report.timings.get("plan"), "build_seconds": wall}


def acceptance(work: Path, images: int, reduced: int, build: bool = True) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    ckpt = resnet50_checkpoint(work / "resnet50-random.pt")
    full = photographs(work / f"photos{images}", images)
    small = photographs(work / f"photos{reduced}", reduced)
    record: dict = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}
    # 1. the plan at the defaults over 1,000 photographs
    t = time.perf_counter()
    plan = run_plan([str(ckpt), "--images", str(full), "--arch", "torchvision:resnet50", "-o", str(work / "unused")])
    lines = plan.lines()
    print("\n".join(lines))
    record["plan"] = {"seconds": time.perf_counter() - t, "site_bytes": plan.site_bytes, "site_files": plan.site_files,
                      "fits_1GB": plan.site_bytes <= 10 ** 9, "left_out": [g["group"] for g in plan.left_out],
                      "lines": lines}
    print(f"\nplan: site estimate {plan.site_bytes / 1e9:.3f} GB (≤ 1 GB: {plan.site_bytes <= 1e9}); "
          f"left out: {', '.join(g['group'] for g in plan.left_out) or 'nothing'}\n")
    if not build:
        return record
    # 2. a real build of the reduced case, every pass timed beside its estimate.  The class
    # visualisations are off: 1,000 ascents through the whole ResNet-50 at 224 px would take hours
    # on a CPU and say nothing more about the estimates than the channels' ascents do.
    config = work / "reduced.toml"
    config.write_text("[featurevis]\nclasses = false\n", encoding="utf-8")
    record["reduced"] = compare([str(ckpt), "--images", str(small), "--arch", "torchvision:resnet50",
                                 "--layer", "conv1", "--layer", "layer1.0", "--max-bytes", "0",
                                 "-c", str(config), "-o", str(work / "reduced-site")], record)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("acceptance")
    a.add_argument("--work", type=Path, default=Path("/tmp/plan-check"))
    a.add_argument("--images", type=int, default=1000)
    a.add_argument("--reduced-images", type=int, default=256)
    a.add_argument("--out", type=Path, default=REPO / "bench" / "plan_check.json")
    a.add_argument("--plan-only", action="store_true", help="only the plan over 1,000 photographs (no build)")
    c = sub.add_parser("compare")
    c.add_argument("rest", nargs=argparse.REMAINDER)
    k = sub.add_parser("calibrate")
    k.add_argument("site", type=Path)
    args = p.parse_args()
    if args.cmd == "calibrate":
        calibrate(args.site)
    elif args.cmd == "compare":
        compare(args.rest, {"load_before": os.getloadavg()})
    else:
        record = acceptance(args.work, args.images, args.reduced_images, build=not args.plan_only)
        args.out.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
        print(f"figures written to {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
