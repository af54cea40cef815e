"""Hostile-but-realistic uses of `sitegen build` as a whole: an atlas that would feed on itself,
architecture files that import their neighbours, input mistakes that must read as input mistakes
(one `error:` line, a hint, exit code 2), and what reaches the terminal.

Every case builds a tiny model over a dozen tiny images in tmp_path.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from sitegen.errors import ModelLoadError
from sitegen.images import discover
from sitegen.model_loading import build_architecture
from sitegen.output import MARKER




import hardening_corpus as corpus  # noqa: E402  (tests/ is on the import path: pyproject's pythonpath)


@pytest.fixture
def setup(tmp_path):
    """(checkpoint, images folder with 12 images, argv prefix of a fast build without --out)."""
    ckpt = tmp_path / "tiny.pt"
    torch.save(build_architecture(corpus.TINY_ARCH, None).state_dict(), ckpt)
    images = tmp_path / "D"
    corpus.write_good_images(images, 12)
    cfg = corpus.fast_config(tmp_path / "fast.toml", topk={"k": 2})
    argv = ["build", str(ckpt), "--images", str(images), "--arch", corpus.TINY_ARCH, "--config", str(cfg),
            "--no-cache"]
    return ckpt, images, argv


def _atlas(out: Path) -> dict:
    return json.loads((out / "data" / "atlas.json").read_text(encoding="utf-8"))


def _no_passes(monkeypatch):
    """Make reaching the analysis passes an internal error: a check meant to come before any work
    that comes after it turns the expected exit code 2 into 1."""
    import sitegen.build

    def boom(*args, **kwargs):
        raise AssertionError("the passes ran before the input was checked")

    monkeypatch.setattr(sitegen.build, "run_passes", boom)


# ----------------------------------------------------------------------------- an atlas is never data

@pytest.mark.parametrize("where", ["inside", "same", "holds-images"])
def test_atlas_is_never_written_into_or_over_its_images(tmp_path, capfd, setup, where):
    _, images, argv = setup
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    if where == "inside":
        out, extra = images / "atlas", []
    elif where == "same":
        out, extra = images, ["--force"]
    else:  # the images live in P/img and the atlas would be P itself
        out, extra = tmp_path, ["--force"]
    code, _, err = corpus.run_cli(["-q", *argv, "-o", str(out), *extra], capfd)
    corpus.assert_clean_failure(code, err, "images folder", "hint:")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


def test_an_atlas_inside_the_images_folder_is_not_read(tmp_path, capfd, setup):
    """An atlas moved (or built by an older sitegen) into the images folder is left out of the data,
    with a warning; so is a copy of one without its front page."""
    _, images, argv = setup
    first = tmp_path / "first"
    code, _, err = corpus.run_cli(["-q", *argv, "-o", str(first)], capfd)
    assert code == 0, err
    first.rename(images / "atlas")
    out = tmp_path / "second"
    code, _, err = corpus.run_cli([*argv, "-o", str(out)], capfd)
    assert code == 0, err
    atlas = _atlas(out)
    assert atlas["data"]["images"] == 12 and atlas["data"]["classes"] == []
    assert "atlas" in err and "sitegen atlas" in err
    assert [s["path"] for s in atlas["data"]["skipped"]] == ["atlas/"]
    tops = {e["image"] for layer in atlas["layers"] for ch in layer["channels"] for e in ch["top"]}
    assert all(not str(t).startswith("atlas/") for t in tops)


def test_discovery_skips_atlas_folders_and_the_output(tmp_path):
    root = tmp_path / "D"
    corpus.write_good_images(root / "a", 2)
    corpus.write_good_images(root / "b", 2)
    (root / "old").mkdir()
    (root / "old" / MARKER).write_text(json.dumps({"files": ["x.png"]}))
    corpus.write_good_images(root / "old" / "img", 3)
    corpus.write_good_images(root / "out", 3)
    found = discover(root, exclude=[root / "out"])
    assert [r.rel for r in found.records] == ["a/good00.png", "a/good01.png", "b/good00.png", "b/good01.png"]
    assert found.classes == ["a", "b"]  # neither the atlas nor the output folder is a class
    assert [rel for rel, _ in found.skipped] == ["old/", "out/"]


def test_images_folder_that_is_an_atlas_is_refused(tmp_path, capfd, setup):
    _, images, argv = setup
    atlas = tmp_path / "site"
    code, _, err = corpus.run_cli(["-q", *argv, "-o", str(atlas)], capfd)
    assert code == 0, err
    argv = [a if a != str(images) else str(atlas) for a in argv]
    code, _, err = corpus.run_cli(["-q", *argv, "-o", str(tmp_path / "again")], capfd)
    corpus.assert_clean_failure(code, err, "is a sitegen atlas", "hint:")


# ----------------------------------------------------------------------------- --arch files and their imports

def _write_arch_tree(root: Path) -> None:
    """A model file beside its helper module, and one inside a package using relative imports."""
    net = ("import torch.nn as nn\n"
           "def body():\n"
           "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n")
    (root / "flat").mkdir(parents=True)
    (root / "flat" / "blocks_for_sitegen_test.py").write_text(net)
    (root / "flat" / "model.py").write_text(
        "from blocks_for_sitegen_test import body\n"
        "def build(num_classes=2):\n    return body()\n")
    pkg = root / "proj_for_sitegen_test"
    (pkg / "nets").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "common.py").write_text(net)
    (pkg / "nets" / "__init__.py").write_text("")
    (pkg / "nets" / "layers.py").write_text("from ..common import body\n")
    (pkg / "nets" / "model.py").write_text(
        "from .layers import body\n"
        "def build(num_classes=2):\n    return body()\n")


@pytest.mark.parametrize("rel", ["flat/model.py", "proj_for_sitegen_test/nets/model.py"])
def test_arch_file_imports_its_neighbours(tmp_path, monkeypatch, rel):
    _write_arch_tree(tmp_path / "src")
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)  # not the model's folder: the file's own folder must be found
    monkeypatch.setattr(sys, "path", list(sys.path))
    model = build_architecture(f"{tmp_path / 'src' / rel}:build", None)
    assert isinstance(model[0], torch.nn.Conv2d)
    for name in [m for m in sys.modules if "for_sitegen_test" in m]:
        monkeypatch.delitem(sys.modules, name)


def test_arch_file_with_a_missing_import_names_it(tmp_path):
    (tmp_path / "model.py").write_text("from helpers_that_are_not_there import body\ndef build():\n    return body()\n")
    with pytest.raises(ModelLoadError) as e:
        build_architecture(f"{tmp_path / 'model.py'}:build", None)
    assert "helpers_that_are_not_there" in str(e.value) and str(tmp_path) in str(e.value)


# ----------------------------------------------------------------------------- input mistakes are exit 2

def test_cache_dir_that_is_a_file(tmp_path, capfd, setup):
    _, _, argv = setup
    argv = [a for a in argv if a != "--no-cache"]
    (tmp_path / "cachefile").write_text("not a folder")
    code, _, err = corpus.run_cli(["-q", *argv, "-o", str(tmp_path / "site"), "--cache-dir",
                                   str(tmp_path / "cachefile")], capfd)
    corpus.assert_clean_failure(code, err, "cachefile", "--cache-dir", "hint:")
    assert not (tmp_path / "site").exists()


def test_demo_cache_dir_that_is_a_file(tmp_path, capfd):
    (tmp_path / "cachefile").write_text("not a folder")
    code, _, err = corpus.run_cli(["-q", "demo", "-o", str(tmp_path / "site"), "--cache-dir",
                                   str(tmp_path / "cachefile")], capfd)
    corpus.assert_clean_failure(code, err, "cachefile", "hint:")


@pytest.mark.parametrize("flags, needles", [
    (["--size", "-5"], ["--size", "-5"]),
    (["--size", "0"], ["--size", "0"]),
    (["--size", "99999"], ["--size", "16384"]),
    (["--size", "16", "--images", "IMAGES"], ["--size", "--images"]),
])
def test_layers_size_mistakes(tmp_path, capfd, setup, flags, needles):
    ckpt, images, _ = setup
    flags = [str(images) if f == "IMAGES" else f for f in flags]
    code, _, err = corpus.run_cli(["layers", str(ckpt), "--arch", corpus.TINY_ARCH, *flags], capfd)
    corpus.assert_clean_failure(code, err, *needles)
    assert "hint:" in err


def test_layers_size_is_used(capfd, setup):
    ckpt, _, _ = setup
    code, out, err = corpus.run_cli(["layers", str(ckpt), "--arch", corpus.TINY_ARCH, "--size", "40"], capfd)
    assert code == 0, err
    assert "40×40 input" in out and "4×40×40" in out


def test_disk_errors_are_not_called_bugs(tmp_path, capfd, setup, monkeypatch):
    """A full disk while the site is written is the machine's problem, not a bug in sitegen."""
    import errno

    import sitegen.build

    _, _, argv = setup

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.webp"))

    monkeypatch.setattr(sitegen.build, "render", full)
    code, _, err = corpus.run_cli(["-q", *argv, "-o", str(tmp_path / "site")], capfd)
    corpus.assert_clean_failure(code, err, "No space left on device", "x.webp", "hint:")
    assert not (tmp_path / "site").exists()


def test_flag_values_are_named_by_their_flag(tmp_path, capfd, setup):
    _, _, argv = setup
    code, _, err = corpus.run_cli([*argv, "-o", str(tmp_path / "site"), "--k", "-3"], capfd)
    corpus.assert_clean_failure(code, err, "--k -3", "between 1 and 100")
    code, _, err = corpus.run_cli([*argv, "-o", str(tmp_path / "site"), "--resize", "-2"], capfd)
    corpus.assert_clean_failure(code, err, "--resize -2")


def _sequential_arch(folder: Path) -> str:
    path = folder / "seq_net.py"
    path.write_text(
        "import torch.nn as nn\n"
        "def seq(num_classes=3):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, num_classes))\n")
    return f"{path}:seq"


def test_layer_naming_a_module_that_is_not_shown(tmp_path, capfd, setup):
    _, images, _ = setup
    arch = _sequential_arch(tmp_path)
    ckpt = tmp_path / "seq.pt"
    torch.save(build_architecture(arch, None).state_dict(), ckpt)
    code, _, err = corpus.run_cli(["-q", "build", str(ckpt), "--images", str(images), "--arch", arch, "--no-cache",
                                   "-o", str(tmp_path / "site"), "--layer", "1"], capfd)
    corpus.assert_clean_failure(code, err, "'1'", "ReLU", "Conv2d", "0, 2")


def test_usage_line_names_the_argument(capfd):
    code, _, err = corpus.run_cli(["build"], capfd)
    assert code == 2
    assert "Usage: sitegen build [OPTIONS] MODEL" in err and "{" not in err


# ----------------------------------------------------------------------------- checks before any work

@pytest.mark.parametrize("key, value, needles", [
    ("occlusion", {"enabled": True, "layer": "no_such_layer"}, ["occlusion.layer", "no_such_layer"]),
    ("tsne", {"enabled": True, "layer": "no_such_module"}, ["tsne.layer", "no_such_module"]),
    ("samples", {"images": ["missing.png"]}, ["samples.images", "missing.png"]),
    ("occlusion", {"enabled": True, "size": 64}, ["occlusion.size", "64"]),
])
def test_config_values_needing_the_model_are_checked_before_the_passes(tmp_path, capfd, setup, monkeypatch,
                                                                       key, value, needles):
    ckpt, images, _ = setup
    cfg = corpus.fast_config(tmp_path / "c.toml", **{key: value})
    _no_passes(monkeypatch)
    code, _, err = corpus.run_cli(["-q", "build", str(ckpt), "--images", str(images), "--arch", corpus.TINY_ARCH,
                                   "--config", str(cfg), "--no-cache", "-o", str(tmp_path / "site")], capfd)
    corpus.assert_clean_failure(code, err, *needles)


@pytest.mark.parametrize("clash", ["index.html", "assets/style.css", "data", ".nojekyll"])
def test_force_clash_is_found_before_any_work(tmp_path, capfd, setup, monkeypatch, clash):
    _, _, argv = setup
    out = tmp_path / "site"
    (out / clash).parent.mkdir(parents=True, exist_ok=True)
    (out / clash).write_text("the user's own")
    _no_passes(monkeypatch)
    code, _, err = corpus.run_cli(["-q", *argv, "-o", str(out), "--force"], capfd)
    corpus.assert_clean_failure(code, err, clash, "not written by sitegen")
    assert (out / clash).read_text() == "the user's own"


# ----------------------------------------------------------------------------- what reaches the terminal

def test_stray_image_beside_class_folders_is_warned_about(tmp_path, capfd, setup):
    _, images, argv = setup
    root = tmp_path / "classes"
    corpus.write_good_images(root / "cat", 3)
    corpus.write_good_images(root / "dog", 3)
    (root / "stray.png").write_bytes((root / "cat" / "good00.png").read_bytes())
    argv = [str(root) if a == str(images) else a for a in argv]
    code, _, err = corpus.run_cli([*argv, "-o", str(tmp_path / "site")], capfd)
    assert code == 0, err
    assert "stray.png" in err and "class labels" in err
    assert "stray.png" in (tmp_path / "site" / "index.html").read_text(encoding="utf-8")


def test_control_characters_in_names_are_escaped_on_the_terminal(tmp_path, capfd, setup):
    _, images, argv = setup
    (images / "red\x1b[31mALERT.png").write_bytes(b"not an image")
    (images / "two\nerror: fake.png").write_bytes(b"not an image")
    code, _, err = corpus.run_cli([*argv, "-o", str(tmp_path / "site")], capfd)
    assert code == 0, err
    assert "\x1b" not in err and "\\x1b[31mALERT.png" in err
    assert "\nerror: fake" not in err and "two\\nerror: fake.png" in err


def test_declared_size_is_checked_before_decoding(tmp_path, capfd, setup):
    """A few hundred bytes declaring 9000×9000 pixels (under data.max_pixels): its size is read from the
    header, not decoded (a whole decode would find the data truncated). One image in 13 of another size
    is more than the 1 % the input decision skips quietly, so the build stops before any output, naming
    the image, its declared size and the fix."""
    _, images, argv = setup
    (images / "zz-huge.png").write_bytes(corpus.png_header_only(9000, 9000))
    out = tmp_path / "site"
    code, _, err = corpus.run_cli(["-q", *argv, "-o", str(out)], capfd)
    corpus.assert_clean_failure(code, err, "9000×9000", "zz-huge.png", "--resize", "hint:")
    assert "truncated" not in err
    assert not out.exists()


def test_workers_below_one_is_an_input_mistake(tmp_path, capfd, setup):
    _, _, argv = setup
    code, _, err = corpus.run_cli([*argv, "-o", str(tmp_path / "site"), "--workers", "0"], capfd)
    corpus.assert_clean_failure(code, err, "--workers 0", "hint:")
