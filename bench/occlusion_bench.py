"""Occlusion sensitivity cost: the pass's time divided by the time of plain forward passes
of the same number of images, in one run on the same machine (goal: ≤ 1.2×).

The pass is run exactly as a build runs it (``OcclusionPass.run``: decoding the sample images, the
unoccluded forward, every occluded copy in batches, the map (c) hook).  The baseline is the model's
forward over as many images (sample images × positions + sample images) in batches of the same
size, with inputs already in memory.  Both are timed alternately ``--repeat`` times and the
fastest of each is kept, so load from other processes on a shared machine inflates neither side
more than the other.  ``--threads 1`` avoids OpenMP threads waiting on each other when the
machine has fewer free cores than torch has threads (see featurevis_bench.py).

    python bench/occlusion_bench.py [--model resnet20|resnet56] [--per-class 1] [--threads 1] [--out FILE]

``measure(...)`` is the entry point for ``bench/bench.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR = SHARED / "data" / "cifar10-test"
MODELS = {"resnet20": SHARED / "models" / "resnet20-12fca82f.th", "resnet56": SHARED / "models" / "resnet56-4bfd9763.th"}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

sys.path.insert(0, str(REPO))
from sitegen.build import prepare  # noqa: E402
from sitegen.config import from_dict  # noqa: E402
from sitegen.hooks import model_guard  # noqa: E402
from sitegen.passes.occlusion import OcclusionPass, default_batch, geometry  # noqa: E402


def sample_folder(per_class: int) -> Path:
    """A folder of symlinks to the first ``per_class`` CIFAR-10 test images of each class."""
    root = Path(tempfile.mkdtemp(prefix="occlusion-bench-"))
    for cls in sorted(os.listdir(CIFAR)):
        (root / cls).mkdir()
        for name in sorted(os.listdir(CIFAR / cls))[:per_class]:
            (root / cls / name).symlink_to(CIFAR / cls / name)
    return root


def plain_forward(model: torch.nn.Module, count: int, batch: int, shape: tuple[int, int, int]) -> float:
    """Seconds for ``count`` images through the model in batches of ``batch`` (inputs in memory)."""
    x = torch.randn(batch, *shape)
    t = time.perf_counter()
    with model_guard(model), torch.inference_mode():
        done = 0
        while done < count:
            n = min(batch, count - done)
            model(x[:n])
            done += n
    return time.perf_counter() - t


def measure(model: str = "resnet20", per_class: int = 1, repeat: int = 2, threads: int = 0,
            size: int = 0, stride: int = 0, batch_size: int = 0) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    folder = sample_folder(per_class)
    table = {"model": {"arch": f"{REPO / 'tests' / 'cifar_resnet.py'}:{model}"},
             "data": {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)},
             "samples": {"per_class": per_class, "max_images": 10 * per_class},
             "occlusion": {"size": size, "stride": stride, "batch_size": batch_size}}
    cfg = from_dict(table)
    ctx = prepare(MODELS[model], folder, cfg, None)
    ctx.workers = 0
    p = OcclusionPass(cfg.occlusion, cfg.samples)
    geo = geometry(ctx.input_size, cfg.occlusion.size, cfg.occlusion.stride)
    images = len(ctx.images)
    count = images * len(geo.boxes) + images
    batch = cfg.occlusion.batch_size or default_batch(ctx)
    plain_forward(ctx.net, batch, batch, (3, *ctx.input_size))  # warm-up (allocator, kernels)
    occ_times, plain_times = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        p.run(ctx)
        occ_times.append(time.perf_counter() - t)
        plain_times.append(plain_forward(ctx.net, count, batch, (3, *ctx.input_size)))
    occ, plain = min(occ_times), min(plain_times)
    return {
        "model": model, "images": images, "positions": len(geo.boxes), "square_px": geo.size,
        "stride_px": geo.stride, "forwards": count, "batch": batch,
        "occlusion_s": round(occ, 3), "plain_forward_s": round(plain, 3), "ratio": round(occ / plain, 3),
        "images_per_s": round(count / occ, 1), "all_occlusion_s": [round(v, 3) for v in occ_times],
        "all_plain_s": [round(v, 3) for v in plain_times], "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    ap.add_argument("--per-class", type=int, default=1, help="sample images per CIFAR class (10 classes)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--batch-size", type=int, default=0, help="occluded copies per forward (0: the pass's default)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here too")
    args = ap.parse_args()
    if not CIFAR.is_dir():
        sys.exit(f"needs the shared CIFAR-10 images in {CIFAR}")
    figures = measure(args.model, args.per_class, args.repeat, args.threads, batch_size=args.batch_size)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
