"""The GPU bench (bench/gpu_bench.py) without a GPU: the device it picks, the precision it asks
for, the batch sizes the memory gives each pass on a (mocked) GPU, and a whole run of the script
with tiny settings on the CPU."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from sitegen.build import prepare
from sitegen.config import from_dict
from sitegen.passes.featurevis import FeatureVisPass

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("sitegen_gpu_bench", REPO / "bench" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gpu_bench = _bench()


def test_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        gpu_bench.choose_device("cuda")
    assert gpu_bench.choose_device("auto") == torch.device("cpu")
    assert gpu_bench.choose_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match="unknown device"):
        gpu_bench.choose_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_bench.choose_device("cuda") == torch.device("cuda")
    assert gpu_bench.choose_device("auto") == torch.device("cuda")


def test_build_moves_the_model_to_the_chosen_device(tmp_path, tiny_checkpoint, make_images, paths, monkeypatch):
    """Every pass sends its batches to ctx.device, so the model's weights must be there too."""
    make_images(tmp_path / "imgs", 4, size=16)
    cfg = from_dict({"model": {"arch": paths["tiny_arch"]}})
    moved = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kw):
        moved.append(args[0] if args else kw.get("device"))
        return real_to(self, *args, **kw)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    ctx = prepare(tiny_checkpoint, tmp_path / "imgs", cfg, None, device=torch.device("cpu"))
    assert ctx.device == torch.device("cpu") and moved[:1] == [torch.device("cpu")]
    monkeypatch.setattr("sitegen.build.default_device", lambda: torch.device("cpu"))
    moved.clear()
    assert prepare(tiny_checkpoint, tmp_path / "imgs", cfg, None).device == torch.device("cpu")
    assert moved[:1] == [torch.device("cpu")]
    assert all(p.device.type == "cpu" for p in ctx.net.parameters())


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_precision_on_a_gpu(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    p = gpu_bench.precision(torch.device("cuda"))
    assert p["topk"] == expected
    assert p["tf32_cudnn"] == torch.backends.cudnn.allow_tf32
    assert gpu_bench.precision(torch.device("cpu")) == {"topk": "fp32", "tf32_matmul": False, "tf32_cudnn": False}
    # The request reaches the dataset pass's config (which checks agreement with fp32 before using it).
    plan = gpu_bench.default_plans()[1]
    table = gpu_bench.config_table(plan, torch.device("cuda"))
    cfg = from_dict({**table, "model": {"arch": "torchvision:resnet50"}})
    assert cfg.topk.precision == expected and cfg.data.resize == 224 and cfg.layers == plan.layers


def test_batch_sizes_follow_the_gpu_memory(tmp_path, tiny_checkpoint, make_images, paths, monkeypatch):
    make_images(tmp_path / "imgs", 4, size=16)
    cfg = from_dict({"model": {"arch": paths["tiny_arch"]}})
    cpu_ctx = prepare(tiny_checkpoint, tmp_path / "imgs", cfg, None, device=torch.device("cpu"))
    # The same build as a GPU would see it (no kernel runs: the sizes come from the memory alone).
    ctx = dataclasses.replace(cpu_ctx, device=torch.device("cuda"), _channels_last=False)
    per_image = ctx.bytes_per_image()
    free = {"bytes": 80 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free["bytes"], 141 << 30))
    big = gpu_bench.batch_sizes(ctx, cfg)
    assert big == {"topk": 256, "attribution": 256, "featurevis": 256, "occlusion": 256}
    free["bytes"] = 100 * per_image  # a GPU nearly full: half its free memory holds 50 images' passes
    small = gpu_bench.batch_sizes(ctx, cfg)
    assert small["topk"] == small["attribution"] == small["featurevis"] == 50
    assert FeatureVisPass(from_dict({"featurevis": {"batch_size": 8}}).featurevis).batch_size(ctx) == 8
    assert gpu_bench.batch_sizes(cpu_ctx, cfg)["featurevis"] == 64  # the CPU's cap


def test_throughput_units():
    from sitegen.passes.base import Result
    import numpy as np

    fv = Result(meta={}, arrays={"L0.objective": np.zeros(16), "L1.objective": np.zeros(32),
                                 "classes.objective": np.zeros(10), "L0.images": np.zeros((16, 1))})
    assert gpu_bench.throughput("featurevis", 2.0, images=100, result=fv) == {"channels_per_s": 29.0}
    assert gpu_bench.throughput("attribution", 4.0, images=100, result=Result(meta={"units": 400})) == \
        {"units_per_s": 100.0}
    assert gpu_bench.throughput("topk", 0.5, images=100, result=Result()) == {"images_per_s": 200.0}
    assert gpu_bench.throughput("tsne", 1.0, images=100, result=Result(meta={"skipped": "x"})) == {"images_per_s": 0.0}


def test_the_whole_script_runs_on_the_cpu_with_tiny_settings(tmp_path):
    if not (gpu_bench.RESNET56.is_file() and gpu_bench.CIFAR.is_dir()):
        pytest.skip("../shared (CIFAR-10 images and ResNet checkpoints) is not present")
    out = tmp_path / "results-gpu.json"
    gpu_bench.main(["--device", "cpu", "--smoke", "--out", str(out), "--budget-s", "3000"])
    r = json.loads(out.read_text())
    assert set(r["builds"]) == {"resnet56", "resnet50"}
    for name, b in r["builds"].items():
        assert "passes" in b, (name, b)
        assert {"topk", "attribution", "featurevis", "occlusion", "tsne"} <= set(b["passes"])
        assert b["passes"]["attribution"]["units_per_s"] > 0 and b["passes"]["featurevis"]["channels_per_s"] > 0
        assert b["passes"]["topk"]["images_per_s"] > 0 and b["seconds"]["bare_forward"] > 0
        assert all(v["over_bare_forward"] > 0 for v in b["passes"].values())
        assert b["site"]["files"] > 10 and b["site"]["bytes"] > 0
        assert b["batch_sizes"]["topk"] >= 1 and b["precision_requested"]["topk"] == "fp32"
    assert r["builds"]["resnet50"]["input_size"] == [64, 64]
    assert set(r["builds"]["resnet56"]["seconds"]["render_by_workers"]) >= {"1", "2"}
    assert r["summary"]["resnet56"]["atlas_over_bare_forward"] > 0
