"""End to end through the CLI: a site whose every reference resolves, escaped names, the cache."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from sitegen.cli import main
from sitegen.passes.topk import TopKPass


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return e.value.code or 0, captured.out, captured.err


class Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.refs.append(value)


def broken_references(site: Path) -> list[str]:
    broken = []
    for page in site.rglob("*.html"):
        parser = Refs()
        parser.feed(page.read_text(encoding="utf-8"))
        for ref in parser.refs:
            url = urlparse(ref)
            if url.scheme == "data":  # inline, e.g. the empty favicon that stops a /favicon.ico request
                continue
            if url.scheme or url.netloc:
                broken.append(f"{page}: external {ref}")
                continue
            if not url.path:
                continue
            target = (page.parent / unquote(url.path)).resolve()
            if not target.is_file():
                broken.append(f"{page.relative_to(site)} -> {ref}")
    return broken


HOSTILE = "<b>x<\u2044b>\"'&"  # a class folder name that is markup (no "/": not allowed in names)


@pytest.fixture
def hostile_images(tmp_path, make_images):
    root = tmp_path / "imgs"
    make_images(root, 12, size=16, classes=2)
    (root / "c1").rename(root / HOSTILE)  # '/' cannot be in a folder name; the rest of the markup can
    return root


def test_build_site_links_escaping_and_cache(tmp_path, tiny_checkpoint, hostile_images, paths, capsys):
    out, cache = tmp_path / "site", tmp_path / "cache"
    argv = ["-q", "build", str(tiny_checkpoint), "--images", str(hostile_images), "--arch", paths["tiny_arch"],
            "-o", str(out), "--cache-dir", str(cache), "--k", "4"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert stdout.strip().endswith("index.html") and (out / "index.html").is_file()
    assert (out / ".nojekyll").is_file()
    assert broken_references(out) == []

    # The hostile class folder shows as text, never as markup.
    pages = "".join(p.read_text() for p in out.rglob("*.html"))
    assert "<b>x" not in pages and "&lt;b&gt;x" in pages

    atlas = json.loads((out / "data" / "atlas.json").read_text())
    assert [l["name"] for l in atlas["layers"]] == ["conv1", "conv2"]
    assert atlas["data"]["classes"] == [HOSTILE, "c0"]
    entry = atlas["layers"][1]["channels"][0]["top"][0]
    assert set(entry) == {"image", "label", "value", "fmap_yx", "box_xyxy"}
    assert (hostile_images / entry["image"]).is_file()
    rf = atlas["layers"][1]["receptive_field"]
    y, x = entry["fmap_yx"]
    assert entry["box_xyxy"] == [rf["offset"] + x * rf["stride"], rf["offset"] + y * rf["stride"],
                                 rf["offset"] + x * rf["stride"] + rf["size"], rf["offset"] + y * rf["stride"] + rf["size"]]
    assert (out / "layers" / "conv2" / "4.html").is_file() and (out / "img" / "conv2" / "4.webp").is_file()

    # A second identical build recomputes nothing.
    def fail(*_a, **_k):
        raise AssertionError("the dataset pass ran again")

    original = TopKPass.run
    TopKPass.run = fail
    try:
        code, _, err = run_cli(argv, capsys)
    finally:
        TopKPass.run = original
    assert code == 0, err

    # A different config is a different cache key: the pass runs.
    calls = []
    TopKPass.run = lambda self, ctx: calls.append(1) or original(self, ctx)
    try:
        code, _, err = run_cli(argv[:-1] + ["3"], capsys)
    finally:
        TopKPass.run = original
    assert code == 0 and calls == [1], err


def test_errors_exit_nonzero_and_write_nothing(tmp_path, tiny_checkpoint, hostile_images, paths, capsys):
    out = tmp_path / "site"
    code, _, err = run_cli(["build", str(tiny_checkpoint), "--images", str(hostile_images), "-o", str(out)], capsys)
    assert code == 2 and "--arch" in err and "Traceback" not in err
    code, _, err = run_cli(["build", str(tiny_checkpoint), "--images", str(hostile_images), "--arch",
                            paths["tiny_arch"], "-o", str(out), "--layer", "layer5"], capsys)
    assert code == 2 and "no layer 'layer5'" in err and "sitegen layers" in err
    code, _, err = run_cli(["build", str(tiny_checkpoint), "--images", str(tmp_path / "empty"), "--arch",
                            paths["tiny_arch"], "-o", str(out)], capsys)
    assert code == 2 and "does not exist" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".site.building")]


def test_layers_command_lists_layers(tiny_checkpoint, paths, capsys):
    code, stdout, err = run_cli(["layers", str(tiny_checkpoint), "--arch", paths["tiny_arch"], "--size", "16"], capsys)
    assert code == 0, err
    assert re.search(r"conv1\s.*conv\s.*4\s", stdout) and "conv2" in stdout


def test_layers_lists_whole_names_piped_and_on_a_narrow_terminal(paths, capsys, monkeypatch):
    """Layer names are what users paste into `layers = [...]`: never cut short with an ellipsis."""
    import sys

    argv = ["layers", str(paths["resnet20"]), "--arch", f"{paths['cifar_arch']}:resnet20", "--size", "32"]
    code, stdout, err = run_cli(argv, capsys)  # captured: not a terminal
    assert code == 0, err
    rows = [line.split("\t") for line in stdout.splitlines() if not line.startswith("#")]
    assert rows[0][0] == "layer" and "layer3.2.conv2" in [r[0] for r in rows] and "…" not in stdout

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("COLUMNS", "60")
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "…" not in stdout and "layer3.2.conv2" in stdout.replace("│", "").replace(" ", "").replace("\n", "")


def test_build_reports_size_and_warns_over_the_pages_limit(tmp_path, tiny_checkpoint, hostile_images, paths,
                                                            capsys, monkeypatch):
    """The build says how big the site is, and warns (still succeeding) past GitHub Pages' limit."""
    import sitegen.build

    from sitegen.build import site_size

    out = tmp_path / "site"
    argv = ["build", str(tiny_checkpoint), "--images", str(hostile_images), "--arch", paths["tiny_arch"],
            "-o", str(out), "--no-cache", "--k", "2"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert site_size(out) == (len(files), sum(p.stat().st_size for p in files))
    assert f"{len(files)} files" in err and "GitHub Pages" not in err

    monkeypatch.setattr(sitegen.build, "PAGES_LIMIT", 1000)  # as if the atlas were over 1 GB
    code, _, err = run_cli(argv + ["--force"], capsys)
    assert code == 0, err
    assert "over GitHub Pages' 1 GB limit" in err and "docs/size.md" in err


def test_images_the_dataset_pass_cannot_use_are_named_on_the_terminal(tmp_path, tiny_checkpoint, make_images,
                                                                       paths, capsys):
    """A truncated file and an image of another size are listed with the reason, not dropped silently
    (one odd size in 102 images is under the 1 % that stops a build)."""
    from PIL import Image

    images = tmp_path / "imgs"
    make_images(images, 100, size=16, classes=2)
    good = sorted((images / "c0").iterdir())[0]
    data = good.read_bytes()
    (images / "c0" / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (20, 16), (200, 10, 10)).save(images / "c1" / "wide.png")
    argv = ["build", str(tiny_checkpoint), "--images", str(images), "--arch", paths["tiny_arch"],
            "-o", str(tmp_path / "site"), "--no-cache", "--k", "2"]
    (tmp_path / "c.toml").write_text("".join(f"[{section}]\nenabled = false\n" for section in (
        "attribution", "featurevis", "occlusion", "tsne", "kernels", "activations")))
    code, _, err = run_cli(argv + ["--config", str(tmp_path / "c.toml")], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping")]
    assert any("truncated.png" in w for w in warnings), err
    assert any("wide.png" in w and "20×16" in w for w in warnings), err
    assert "from 100 images (2 skipped)" in err
    # The index page and atlas.json list each once, path beside reason (not repeated inside it).
    skipped = {e["path"]: e["reason"] for e in json.loads((tmp_path / "site" / "data" / "atlas.json")
                                                          .read_text())["data"]["skipped"]}
    assert skipped["c1/wide.png"].startswith("size 20×16") and "\n" not in skipped["c1/wide.png"]
    assert "truncated.png" not in skipped["c0/truncated.png"]
