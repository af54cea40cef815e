"""Hostile and broken checkpoints: one readable message naming the file and the fix, exit
code 2, no traceback — and a pickle that would run code is refused without running it.

Every file is made in tmp_path.  The same cases run at unit level (load_model) and through the CLI.
"""
from __future__ import annotations

import builtins
import collections
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sitegen.errors import ModelLoadError
from sitegen.model_loading import build_architecture, load_model, logits




import hardening_corpus as corpus  # noqa: E402  (tests/ is on the import path: pyproject's pythonpath)
TINY = corpus.TINY_ARCH


class RunsCode:
    """Unpickling this runs ``exec``: it creates the file named in ``marker`` (the proof it ran)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _tiny_sd() -> dict[str, torch.Tensor]:
    return build_architecture(TINY, None).state_dict()


def _other_arch(folder: Path) -> str:
    """An architecture file whose layers differ from tiny_cnn's (names and one shape)."""
    path = folder / "other_net.py"
    path.write_text(
        "import torch.nn as nn\n"
        "class Other(nn.Module):\n"
        "    def __init__(self, num_classes=3):\n"
        "        super().__init__()\n"
        "        self.stem = nn.Conv2d(3, 8, 3)\n"
        "        self.conv2 = nn.Conv2d(8, 5, 3)\n"
        "        self.fc = nn.Linear(5, num_classes)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.conv2(self.stem(x)).mean((2, 3)))\n"
        "def other(num_classes=3):\n"
        "    return Other(num_classes)\n")
    return f"{path}:other"


# Each case: (id, make(folder) -> checkpoint path, arch, phrases the message must hold).
def _truncated(folder):
    torch.save({"state_dict": _tiny_sd()}, folder / "full.pt")
    data = (folder / "full.pt").read_bytes()
    (folder / "half.pt").write_bytes(data[: len(data) // 2])
    return folder / "half.pt"


def _head_only(folder):
    torch.save(_tiny_sd(), folder / "full.pt")
    (folder / "head.pt").write_bytes((folder / "full.pt").read_bytes()[:100])
    return folder / "head.pt"


def _write(name, data):
    def make(folder):
        (folder / name).write_bytes(data)
        return folder / name
    return make


def _npy(folder):
    np.save(folder / "weights.npy", np.zeros(4))
    return folder / "weights.npy"


def _zip(folder):
    with zipfile.ZipFile(folder / "archive.pt", "w") as z:
        z.writestr("weights.txt", "1 2 3")
    return folder / "archive.pt"


def _folder(folder):
    (folder / "ckpt.pt").mkdir()
    return folder / "ckpt.pt"


def _fifo(folder):
    corpus.need_fifo()
    os.mkfifo(folder / "pipe.pt")
    return folder / "pipe.pt"


def _evil_zip(folder):
    torch.save({"state_dict": _tiny_sd(), "extra": RunsCode(folder / "PWNED")}, folder / "evil.pt")
    return folder / "evil.pt"


def _evil_raw(protocol):
    def make(folder):
        with open(folder / f"evil{protocol}.pkl", "wb") as f:
            pickle.dump({"state_dict": RunsCode(folder / "PWNED")}, f, protocol=protocol)
        return folder / f"evil{protocol}.pkl"
    return make


def _whole_module(folder):
    torch.save(build_architecture(TINY, None), folder / "module.pt")
    return folder / "module.pt"


def _nan(folder):
    sd = _tiny_sd()
    sd["conv2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, folder / "diverged.pt")
    return folder / "diverged.pt"


def _inf(folder):
    sd = _tiny_sd()
    sd["fc.bias"][1] = float("-inf")
    torch.save({"model_state_dict": sd}, folder / "inf.pt")
    return folder / "inf.pt"


def _save(name, obj):
    def make(folder):
        torch.save(obj() if callable(obj) else obj, folder / name)
        return folder / name
    return make


CASES = [
    ("missing", lambda f: f / "nope.pt", TINY, ["nope.pt", "does not exist"]),
    ("folder", _folder, TINY, ["ckpt.pt", "is a folder"]),
    ("fifo", _fifo, TINY, ["pipe.pt", "not a regular file"]),
    ("empty", _write("empty.pt", b""), TINY, ["empty.pt", "not a readable PyTorch checkpoint", "torch.save"]),
    ("truncated", _truncated, TINY, ["half.pt", "not a readable PyTorch checkpoint", "truncated", "complete"]),
    ("truncated-header", _head_only, TINY, ["head.pt", "not a readable PyTorch checkpoint"]),
    ("text-file", _write("notes.pt", b"these are not weights\n"), TINY,
     ["notes.pt", "not a readable PyTorch checkpoint", "a text file", "'these are not weights'"]),
    ("csv-file", _write("log.pt", b"epoch,loss\n1,0.5\n"), TINY, ["log.pt", "a text file", "'epoch,loss'"]),
    ("short-text-file", _write("hello.pt", b"hello\n"), TINY, ["hello.pt", "a text file"]),
    ("git-lfs-pointer", _write("lfs.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:"
                                         + b"0" * 64 + b"\nsize 46827520\n"), TINY,
     ["lfs.pt", "Git LFS pointer", "git lfs pull"]),
    ("png-file", _write("picture.pt", corpus.png_bytes()), TINY, ["picture.pt", "torch.save"]),
    ("numpy-file", _npy, TINY, ["weights.npy", "NumPy", "torch.save"]),
    ("foreign-zip", _zip, TINY, ["archive.pt", "not a readable PyTorch checkpoint"]),
    ("pickle-runs-code-zip", _evil_zip, TINY, ["evil.pt", "runs code", "--trust-pickle"]),
    ("pickle-runs-code-raw-p2", _evil_raw(2), TINY, ["evil2.pkl", "--trust-pickle"]),
    ("pickle-runs-code-raw-p4", _evil_raw(4), TINY, ["evil4.pkl", "raw pickle", "--trust-pickle"]),
    ("whole-module-pickle", _whole_module, "", ["module.pt", "runs code", "--trust-pickle"]),
    ("nan-weights", _nan, TINY, ["diverged.pt", "NaN or infinite", "conv2.weight", "earlier checkpoint"]),
    ("inf-weights", _inf, TINY, ["inf.pt", "NaN or infinite", "fc.bias"]),
    ("other-architecture", _save("tiny.pt", _tiny_sd), "OTHER",
     ["tiny.pt", "do not fit", "missing 2 keys (stem.weight, stem.bias)", "unexpected 2 keys (conv1.weight, conv1.bias)",
      "conv2.weight (5, 4, 3, 3) vs (5, 8, 3, 3)", "--arch"]),
    ("state-dict-without-arch", _save("tiny.pt", _tiny_sd), "", ["tiny.pt", "--arch"]),
    ("list-object", _save("list.pt", [1, 2, 3]), TINY, ["list.pt", "holds a list", "state_dict()"]),
    ("int-object", _save("int.pt", 3), TINY, ["int.pt", "holds an int,"]),
    ("one-key-missing", _save("tiny.pt", lambda: {k: v for k, v in _tiny_sd().items() if k != "fc.bias"}), TINY,
     ["tiny.pt", "missing 1 key (fc.bias)"]),
    ("dict-of-non-tensors", _save("cfg.pt", {"state_dict": {"w": [1, 2]}, "epoch": 3}), TINY,
     ["cfg.pt", "without a state dict", "'state_dict', 'epoch'"]),
    ("integer-keys", _save("ints.pt", {1: torch.zeros(2)}), TINY, ["ints.pt", "without a state dict"]),
    ("arch-without-colon", _save("tiny.pt", _tiny_sd), "tiny_models", ["SOURCE:NAME"]),
    ("arch-file-missing", _save("tiny.pt", _tiny_sd), "missing/net.py:build", ["missing/net.py", "does not exist"]),
    ("arch-name-missing", _save("tiny.pt", _tiny_sd), TINY.replace(":tiny_cnn", ":nothing"),
     ["no callable 'nothing'", "tiny_cnn"]),
    ("arch-unknown-torchvision", _save("tiny.pt", _tiny_sd), "torchvision:resnet9000", ["resnet9000"]),
    ("arch-module-missing", _save("tiny.pt", _tiny_sd), "no_such_pkg.models:net", ["no_such_pkg.models"]),
]


def _arch(arch: str, folder: Path) -> str:
    return _other_arch(folder) if arch == "OTHER" else arch


@pytest.mark.parametrize("case, make, arch, phrases", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoint_unit(tmp_path, case, make, arch, phrases):
    path = make(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load_model(path, _arch(arch, tmp_path))
    text = str(e.value)
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in {text!r}"
    assert not (tmp_path / "PWNED").exists(), "unpickling ran code from the file"


@pytest.mark.parametrize("case, make, arch, phrases", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoint_cli(tmp_path, capfd, case, make, arch, phrases):
    images = tmp_path / "imgs"
    corpus.write_good_images(images, 2)
    path = make(tmp_path)
    argv = ["build", str(path), "--images", str(images), "-o", str(tmp_path / "site"), "--no-cache"]
    arch = _arch(arch, tmp_path)
    if arch:
        argv += ["--arch", arch]
    code, _, err = corpus.run_cli(argv, capfd)
    corpus.assert_clean_failure(code, err, *phrases)
    assert "hint:" in err  # the fix, on its own line
    assert not (tmp_path / "PWNED").exists(), "unpickling ran code from the file"
    assert not (tmp_path / "site").exists()


def test_refused_pickle_would_really_have_run(tmp_path):
    """The control for the cases above: the same file, unpickled without weights_only, does run its
    code — so the marker's absence there means refusal, not a payload that never worked."""
    path = _evil_raw(2)(tmp_path)
    with open(path, "rb") as f:
        pickle.load(f)
    assert (tmp_path / "PWNED").read_text() == "pwned"


def test_debug_shows_the_traceback(tmp_path, capfd):
    """No traceback is a choice the CLI makes; --debug shows it."""
    path = _nan(tmp_path)
    images = tmp_path / "imgs"
    corpus.write_good_images(images, 1)
    code, _, err = corpus.run_cli(["--debug", "build", str(path), "--images", str(images), "--arch", TINY,
                                   "-o", str(tmp_path / "site")], capfd)
    assert code == 2 and "Traceback" in err and "NaN or infinite" in err
    code, _, err = corpus.run_cli(["build", str(path), "--images", str(images), "--arch", TINY,
                                   "-o", str(tmp_path / "site")], capfd)
    assert code == 2 and "Traceback" not in err  # --debug does not stick to the next call


# ----------------------------------------------------------------------------- model outputs

OUTPUT_ARCH = """
import torch
import torch.nn as nn
import torch.nn.functional as F

class Net(nn.Module):
    def __init__(self, kind, num_classes=3):
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3)
        self.fc = nn.Linear(5, num_classes)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        z = self.fc(h.mean((2, 3)))
        if self.kind == "tuple":
            return z, h
        if self.kind == "dict":
            return {"features": h, "logits": z}
        return None

def as_tuple(num_classes=3):
    torch.manual_seed(0)
    return Net("tuple", num_classes)

def as_dict(num_classes=3):
    torch.manual_seed(0)
    return Net("dict", num_classes)
"""


@pytest.mark.parametrize("factory", ["as_tuple", "as_dict"])
def test_model_returning_tuple_or_dict_builds(tmp_path, capfd, factory):
    """The atlas hooks layers, so what the forward returns does not matter to it."""
    (tmp_path / "outnet.py").write_text(OUTPUT_ARCH)
    arch = f"{tmp_path / 'outnet.py'}:{factory}"
    ckpt = tmp_path / "net.pt"
    torch.save(build_architecture(arch, None).state_dict(), ckpt)
    images = tmp_path / "imgs"
    corpus.write_good_images(images, 6)
    cfg = corpus.fast_config(tmp_path / "fast.toml", topk={"k": 2})
    code, _, err = corpus.run_cli(["-q", "build", str(ckpt), "--images", str(images), "--arch", arch,
                                   "-o", str(tmp_path / "site"), "--config", str(cfg), "--no-cache"], capfd)
    assert code == 0, err
    assert "Traceback" not in err
    assert (tmp_path / "site" / "layers" / "conv2" / "4.html").is_file()


@pytest.mark.parametrize("factory", ["as_tuple", "as_dict"])
def test_model_returning_tuple_or_dict_builds_with_every_pass(tmp_path, capfd, factory):
    """The passes that read the model's output (occlusion, t-SNE predictions, class visualisations)."""
    (tmp_path / "outnet.py").write_text(OUTPUT_ARCH)
    arch = f"{tmp_path / 'outnet.py'}:{factory}"
    ckpt = tmp_path / "net.pt"
    torch.save(build_architecture(arch, None).state_dict(), ckpt)
    for cls in ("a", "b"):
        corpus.write_good_images(tmp_path / "imgs" / cls, 5, seed=len(cls))
    tables = {"topk": {"k": 2}, "occlusion": {"enabled": True},
              "tsne": {"enabled": True, "max_points": 10, "pca_dims": 2, "perplexity": 2.0},
              "featurevis": {"enabled": True, "steps": 2}}
    cfg = corpus.fast_config(tmp_path / "c.toml", **tables)
    code, _, err = corpus.run_cli(["-q", "build", str(ckpt), "--images", str(tmp_path / "imgs"), "--arch", arch,
                                   "-o", str(tmp_path / "site"), "--config", str(cfg), "--no-cache"], capfd)
    assert code == 0, err


def test_logits_extracts_the_class_scores():
    z = torch.randn(2, 3)
    feats = torch.randn(2, 5, 4, 4)
    Out = collections.namedtuple("InceptionOutputs", ["logits", "aux_logits"])
    assert logits(z) is z
    assert logits((z, feats)) is z
    assert logits([z]) is z
    assert logits(Out(z, torch.randn(2, 3))) is z
    assert logits({"features": feats, "logits": z}) is z
    assert logits({"out": z, "aux": torch.randn(2, 3)}) is z
    assert logits({"scores": z}) is z  # one tensor: no doubt which


@pytest.mark.parametrize("output, phrase", [
    (None, "returns NoneType, not a tensor"),
    ("text", "returns str"),
    ((), "returns tuple"),
    (({"a": 1},), "returns tuple"),
    ({"a": torch.randn(2, 3), "b": torch.randn(2, 3)}, "dict without class scores (keys: 'a', 'b')"),
    ({}, "dict without class scores"),
    (torch.randn(2, 3, 4, 4), "shape (2, 3, 4, 4), not (batch, classes)"),
    (torch.randn(3), "shape (3,)"),
])
def test_logits_says_why_not(output, phrase):
    with pytest.raises(ModelLoadError) as e:
        logits(output)
    assert phrase in str(e.value) and "hint:" in str(e.value)


def test_messages_from_torch_are_not_cut_mid_sentence(tmp_path):
    """torch's own messages run to several sentences; what sitegen quotes of them ends where one does."""
    with pytest.raises(ModelLoadError) as e:
        load_model(_truncated(tmp_path), TINY)
    quoted = e.value.message.split("(", 1)[1]
    assert quoted.endswith(")") and quoted[-2] not in " ,;:" and "If you are seeing this error" not in quoted
