"""What the activation rules cost: attributions with the rules against plain autograd, side by side.

For each model, one batch of inputs and one layer, in one process, alternating A/B ``--repeats``
times (the machine is shared; only side-by-side ratios mean much), CPU seconds of this process:

- ``rules``: ``attribute_methods`` for guided backprop, deconvnet and gradient (one forward with
  every activation and gate under its rule, three backwards);
- ``plain``: the floor: one forward in plain autograd up to the same layer, three plain backwards
  from the same one-hot units (what the three methods cost where no rule applies);
- ``before`` (with ``--before COMMIT``): the same ``attribute_methods`` call of that commit's
  ``sitegen/attribution.py`` (read with ``git show``), e.g. the ReLU-only rules;
- ``find_activations``: the extra forward the attribution pass runs once to list the kinds,
  against one plain forward of one image.

Models: the shared CIFAR ResNet-20 (ReLU via F.relu) on CIFAR-sized noise, and torchvision's
EfficientNet-B0 (SiLU, sigmoid gates) and MobileNetV3-small (Hardswish, ReLU, Hardsigmoid gates)
with random weights at 64 px.

    python bench/activation_rules_bench.py [--repeats 5] [--before 7a7e4c0] [--out bench/activation_rules.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

from sitegen.activation_rules import find_activations  # noqa: E402
from sitegen.attribution import METHODS, attribute_methods  # noqa: E402
from sitegen.hooks import capture_outputs, model_guard, run_until  # noqa: E402


def cpu_seconds(fn: Callable[[], object]) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def plain(model: torch.nn.Module, x: torch.Tensor, layer: str, units: list) -> None:
    with model_guard(model):
        inputs = x.detach().clone().requires_grad_(True)
        with capture_outputs(model, [layer], stop_after_last=True) as store:
            run_until(model, inputs.clone())
        out = store[layer]
        onehot = torch.zeros_like(out)
        for i, (c, y, xx) in enumerate(units):
            onehot[i, c, y, xx] = 1.0
        for i in range(len(METHODS)):
            torch.autograd.grad(out, inputs, onehot, retain_graph=i < len(METHODS) - 1)


def before_module(commit: str):
    """``sitegen/attribution.py`` as of ``commit``, loaded beside today's (relative imports resolve in sitegen)."""
    source = subprocess.run(["git", "show", f"{commit}:sitegen/attribution.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("sitegen._attribution_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "sitegen"
    sys.modules[spec.name] = module
    exec(compile(source, f"{commit}:sitegen/attribution.py", "exec"), module.__dict__)
    return module


def models() -> list[tuple[str, torch.nn.Module, torch.Tensor, str]]:
    import torchvision

    out = []
    checkpoint = SHARED / "models" / "resnet20-12fca82f.th"
    if checkpoint.is_file():
        from sitegen.model_loading import load_model

        loaded = load_model(checkpoint, f"{REPO / 'tests' / 'cifar_resnet.py'}:resnet20", False)
        out.append(("resnet20 (ReLU)", loaded.model, (3, 32, 32), "layer3.2.conv2"))
    torch.manual_seed(0)
    out.append(("efficientnet_b0 (SiLU, sigmoid gates)", torchvision.models.efficientnet_b0(), (3, 64, 64),
                "features.5.0.block.0.0"))
    out.append(("mobilenet_v3_small (Hardswish, ReLU, Hardsigmoid gates)", torchvision.models.mobilenet_v3_small(),
                (3, 64, 64), "features.6.block.0.0"))
    return [(name, m.eval(), torch.randn(16, *shape, generator=torch.Generator().manual_seed(1)), layer)
            for name, m, shape, layer in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", default=None, help="a commit whose attribution.py to time beside today's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "activation_rules.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    old = before_module(args.before) if args.before else None
    results = {"machine": platform.platform(), "threads": args.threads, "repeats": args.repeats,
               "before": args.before, "models": {}}
    for name, model, x, layer in models():
        with torch.no_grad():
            c = capture_outputs(model, [layer], stop_after_last=True)
            with c as store:
                run_until(model, x[:1])
            channels, h, w = store[layer].shape[1:]
        units = [(i % channels, h // 2, w // 2) for i in range(len(x))]
        runs: dict[str, Callable[[], object]] = {
            "rules": lambda: attribute_methods(model, x, layer, units),
            "plain": lambda: plain(model, x, layer, units),
        }
        if old is not None:
            def run_old(m=model, xx=x, u=units):
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return old.attribute_methods(m, xx, layer, u)
            runs["before"] = run_old
        runs["find_activations"] = lambda: find_activations(model, x[0])
        runs["one_forward"] = lambda: model(x[:1])
        for fn in runs.values():  # warm up
            fn()
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                times[k].append(cpu_seconds(fn))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        row = {"layer": layer, "batch": len(x), "cpu_s_median": med,
               "rules_over_plain": med["rules"] / med["plain"],
               "find_activations_over_one_forward": med["find_activations"] / med["one_forward"]}
        if old is not None:
            row["rules_over_before"] = med["rules"] / med["before"]
        results["models"][name] = row
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if k != "cpu_s_median"},
              flush=True)
    args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(args.out)


if __name__ == "__main__":
    main()
