"""Every checkpoint form people save, and each error with its message."""
from __future__ import annotations

import pytest
import torch
import torchvision

from sitegen.errors import ModelLoadError
from sitegen.model_loading import load_model


def _tiny(paths):
    from sitegen.model_loading import build_architecture

    return build_architecture(paths["tiny_arch"], None)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "model_state_dict", "net", "dataparallel"])
def test_state_dict_forms(tmp_path, paths, wrap):
    model = _tiny(paths)
    with torch.no_grad():
        model.conv1.weight.add_(1.5)  # differs from a fresh factory call
    sd = model.state_dict()
    if wrap == "plain":
        obj = sd
    elif wrap == "dataparallel":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_prec1": 91.0}
    else:
        obj = {wrap: sd, "epoch": 7}
    path = tmp_path / "m.pt"
    torch.save(obj, path)
    loaded = load_model(path, paths["tiny_arch"])
    assert _same(loaded.model, model)
    assert loaded.num_classes == 3
    assert not loaded.model.training


def test_torchvision_arch_infers_num_classes(tmp_path):
    model = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, "torchvision:resnet18")
    assert loaded.num_classes == 7 and _same(loaded.model, model)


def test_module_factory_spec(tmp_path):
    from sitegen.demo import build  # a factory in an importable module

    model = build()
    path = tmp_path / "d.pt"
    torch.save(model.state_dict(), path)
    assert _same(load_model(path, "sitegen.demo:build").model, model)


def test_shared_resnet56(paths):
    if not paths["resnet56"].is_file():
        pytest.skip("../shared absent")
    loaded = load_model(paths["resnet56"], paths["cifar_arch"] + ":resnet56")
    assert loaded.num_classes == 10
    assert len(loaded.weights_hash) == 64


def test_pickled_module_needs_trust(tmp_path, paths):
    path = tmp_path / "whole.pt"
    torch.save(_tiny(paths), path)
    with pytest.raises(ModelLoadError, match="--trust-pickle"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    assert isinstance(loaded.model, torch.nn.Module)


@pytest.mark.parametrize("case, message", [
    ("no_arch", "holds a state dict; say which architecture built it with --arch"),
    ("wrong_arch", "do not fit the architecture"),
    ("torchscript", "TorchScript"),
    ("garbage", "not a readable PyTorch checkpoint"),
    ("missing", "does not exist"),
    ("bad_spec", "not of the form SOURCE:NAME"),
    ("unknown_tv", "torchvision has no model"),
    ("no_factory", "has no callable"),
    ("no_state_dict", "without a state dict"),
])
def test_errors_name_the_problem_and_fix(tmp_path, paths, case, message):
    path = tmp_path / "m.pt"
    arch = paths["tiny_arch"]
    model = _tiny(paths)
    if case == "no_arch":
        torch.save(model.state_dict(), path)
        arch = ""
    elif case == "wrong_arch":
        torch.save(model.state_dict(), path)
        arch = "torchvision:resnet18"
    elif case == "torchscript":
        torch.jit.script(model).save(str(path))
    elif case == "garbage":
        path.write_bytes(b"this is not a checkpoint at all")
    elif case == "missing":
        path = tmp_path / "nope.pt"
    elif case == "bad_spec":
        torch.save(model.state_dict(), path)
        arch = "resnet18"
    elif case == "unknown_tv":
        torch.save(model.state_dict(), path)
        arch = "torchvision:resnet9000"
    elif case == "no_factory":
        torch.save(model.state_dict(), path)
        arch = paths["tiny_arch"].rsplit(":", 1)[0] + ":nothing_here"
    elif case == "no_state_dict":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ModelLoadError) as e:
        load_model(path, arch)
    assert message in str(e.value)


def test_wrong_arch_names_keys(tmp_path, paths):
    path = tmp_path / "m.pt"
    torch.save(_tiny(paths).state_dict(), path)
    with pytest.raises(ModelLoadError) as e:
        load_model(path, "torchvision:resnet18")
    text = str(e.value)
    assert "missing" in text and "unexpected" in text and "conv1.weight" in text


def _tv(name, **kw):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GoogLeNet/Inception: "default weight initialization will change"
        return torchvision.models.get_model(name, weights=None, **kw)


def test_classifier_written_as_a_1x1_convolution_gives_the_class_count(tmp_path):
    path = tmp_path / "sq.pt"
    torch.save(_tv("squeezenet1_1", num_classes=10).state_dict(), path)
    loaded = load_model(path, "torchvision:squeezenet1_1")
    assert loaded.num_classes == 10 and loaded.model.classifier[1].out_channels == 10


@pytest.mark.parametrize("form", ["state_dict", "plain dict", "DataParallel", "checkpoint dict"])
def test_module_versions_are_kept_or_supplied(tmp_path, form):
    """MNASNet reads the version its state dict was saved with; a copy into a plain dict loses it."""
    model = _tv("mnasnet0_5")
    sd = model.state_dict()
    obj = {"state_dict": sd, "plain dict": dict(sd), "DataParallel": torch.nn.DataParallel(model).state_dict(),
           "checkpoint dict": {"model": dict(sd), "epoch": 1}}[form]
    path = tmp_path / "m.pt"
    torch.save(obj, path)
    loaded = load_model(path, "torchvision:mnasnet0_5")
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_batchnorm_without_its_counter_still_loads_from_a_plain_dict(tmp_path):
    sd = {k: v for k, v in _tv("resnet18").state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt", "torchvision:resnet18").num_classes == 1000


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
@pytest.mark.parametrize("aux", [True, False])
def test_inception_checkpoints_load_with_or_without_aux_heads(tmp_path, name, aux):
    model = _tv(name, aux_logits=aux, init_weights=False, num_classes=7)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = load_model(tmp_path / "w.pt", f"torchvision:{name}")
    assert loaded.model.aux_logits is aux and loaded.num_classes == 7
    assert set(loaded.model.state_dict()) == set(model.state_dict())
