"""t-SNE of penultimate codes: the whole pass against the t-SNE inside it, with
scikit-learn and, when installed, openTSNE (``tsne.method = "opentsne"``, ``pip install openTSNE``).

The pass runs as a build runs it (``TsnePass.run``: decoding, the forward for the codes, PCA,
t-SNE, neighbour agreement in the map and in code space, the grid assignment) on ``--points``
CIFAR-10 test images (a class-stratified folder of symlinks) with the shared ResNet; its result
records the seconds of each part.  The same pass then runs with openTSNE, so both methods embed
the same codes with the same seed, iterations and perplexity; the neighbour agreement of each
map shows whether the faster one is as faithful.

``--threads 1`` (the default here) pins torch and the OpenMP pools of scikit-learn to one thread:
on a shared machine with fewer free cores than threads, scikit-learn's Barnes-Hut t-SNE was
measured 15× slower with 2 threads than with 1 (300 points: 17.6 s vs 1.2 s).

    python bench/tsne_bench.py [--points 10000] [--threads 1] [--out FILE]

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
from sitegen.passes.tsne import TsnePass  # noqa: E402


def cifar_folder(points: int) -> Path:
    """Symlinks to the first points/10 images of each CIFAR-10 class (all 10,000 for 10000)."""
    per_class = max(1, points // 10)
    root = Path(tempfile.mkdtemp(prefix="tsne-bench-"))
    for cls in sorted(os.listdir(CIFAR)):
        (root / cls).mkdir()
        for name in sorted(os.listdir(CIFAR / cls))[:per_class]:
            (root / cls / name).symlink_to(CIFAR / cls / name)
    return root


def has_opentsne() -> bool:
    try:
        import openTSNE  # noqa: F401
    except ImportError:
        return False
    return True


def run_pass(ctx, table: dict[str, Any]) -> dict[str, Any]:
    cfg = from_dict(table)
    t = time.perf_counter()
    result = TsnePass(cfg.tsne).run(ctx)
    whole = time.perf_counter() - t
    m = result.meta
    return {"whole_pass_s": round(whole, 2), "tsne_s": m["seconds"]["tsne"], "codes_and_pca_s": m["seconds"]["codes"],
            "neighbours_and_grid_s": m["seconds"]["after"], "ratio_whole_to_tsne": round(whole / m["seconds"]["tsne"], 3),
            "agreement_map": round(m["agreement_map"], 4), "agreement_codes": round(m["agreement_codes"], 4),
            "points": m["points"]}


def measure(points: int = 10000, model: str = "resnet20", threads: int = 1) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    if threads:
        torch.set_num_threads(threads)
    folder = cifar_folder(points)
    base = {"model": {"arch": f"{REPO / 'tests' / 'cifar_resnet.py'}:{model}"},
            "data": {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}}
    ctx = prepare(MODELS[model], folder, from_dict(base), None)
    ctx.workers = 0
    tsne = {"max_points": points, "seed": 0}
    figures: dict[str, Any] = {"model": model, "images": len(ctx.images), "threads": threads or torch.get_num_threads(),
                               "cpus": os.cpu_count(), "machine": platform.machine()}
    with threadpool_limits(threads or None):
        figures["sklearn"] = run_pass(ctx, {**base, "tsne": {**tsne, "method": "sklearn"}})
        if has_opentsne():
            import openTSNE

            figures["opentsne"] = run_pass(ctx, {**base, "tsne": {**tsne, "method": "opentsne"}})
            figures["opentsne_version"] = openTSNE.__version__
            figures["speedup_tsne"] = round(figures["sklearn"]["tsne_s"] / figures["opentsne"]["tsne_s"], 2)
        else:
            figures["opentsne"] = "not installed (pip install openTSNE)"
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=10000)
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads (0: libraries' defaults)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here too")
    args = ap.parse_args()
    if not CIFAR.is_dir():
        sys.exit(f"needs the shared CIFAR-10 images in {CIFAR}")
    text = json.dumps(measure(args.points, args.model, args.threads), indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
