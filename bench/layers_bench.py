"""Layer discovery speed: the field arithmetic on one traced forward, per torchvision architecture,
against the gradient probe measuring the same layers, in one run.

For each architecture (random weights, built before timing starts):

- ``discover``: :func:`sitegen.layers.discover` at the given input size: one traced forward that
  gives every layer's shape, kind and receptive field (wall and process CPU seconds);
- ``probe``: :func:`sitegen.fields.probe_field` (the fallback the arithmetic replaced as the
  default: a backward per layer, doubling the input until the field fits) on ``--probe-layers``
  layers spread over the model, extrapolated linearly to all layers (time per layer × layers; the
  deep layers, which need the largest inputs, are in the sample), and the probe's fields compared
  with the arithmetic's on those layers.

Wall-clock and CPU seconds are both written; on a loaded shared machine the CPU-time ratio is the
steadier one.

    python bench/layers_bench.py --out bench/layers.json
    python bench/layers_bench.py --archs densenet121 --size 64 --probe-layers 6
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch
import torchvision

from sitegen.fields import probe_field, probe_model
from sitegen.layers import discover

DEFAULT_ARCHS = ["alexnet", "vgg11_bn", "resnet50", "densenet121", "googlenet", "inception_v3", "mobilenet_v3_large",
                 "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0", "squeezenet1_1", "mnasnet1_0",
                 "convnext_tiny"]


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def measure(name: str, size: int, probe_layers: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
    side = max(size, 75) if name == "inception_v3" else size
    layers, wall, cpu = timed(lambda: discover(model, (3, side, side)))
    spatial = [l for l in layers if l.kind != "pooled"]
    row = {"arch": name, "input": side, "layers": len(layers), "pooled": len(layers) - len(spatial),
           "discover_wall_s": round(wall, 3), "discover_cpu_s": round(cpu, 3)}
    if probe_layers and spatial:
        step = max(1, (len(spatial) - 1) // max(1, probe_layers - 1))
        chosen = spatial[::step][:probe_layers - 1] + [spatial[-1]]
        probe = probe_model(model)
        fields, pwall, pcpu = timed(lambda: [probe_field(probe, l.name, 3, (side, side)) for l in chosen])
        scale = len(layers) / len(chosen)
        row.update({"probe_layers_sampled": len(chosen), "probe_wall_s_est": round(pwall * scale, 1),
                    "probe_cpu_s_est": round(pcpu * scale, 1),
                    "probe_agrees": all(f == l.rf for f, l in zip(fields, chosen)),
                    "cpu_ratio_probe_over_discover": round(pcpu * scale / max(cpu, 1e-9), 1)})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="*", default=DEFAULT_ARCHS)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--probe-layers", type=int, default=4, help="layers per model timed with the probe (0: none)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for name in args.archs:
        row = measure(name, args.size, args.probe_layers)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                          "torch": torch.__version__}, "size": args.size, "results": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
