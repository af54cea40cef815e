"""The activations on the pages and the terminal: the index page's table of kinds and rules, the notes
on the pages a kind without a rule affects, the `sitegen layers` listing, and sprites whose method
rows differ on a SiLU/GELU/Hardswish network."""
from __future__ import annotations

import importlib.util
import itertools
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sitegen.activation_rules import RULES
from sitegen.cli import main

TINY = Path(__file__).resolve().parents[1] / "tiny_models.py"


def _load_tiny_models():
    # tests/ is not a package: load the architecture file by path, as sitegen's --arch does.
    spec = importlib.util.spec_from_file_location("sitegen_test_tiny_models_act", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_models = _load_tiny_models()
PATCH = 16


ONLY_ATTRIBUTION = "".join(f"[{section}]\nenabled = false\n"
                           for section in ("occlusion", "tsne", "kernels", "activations", "featurevis"))
"""Config lines that leave out the passes these tests do not look at (they only cost time)."""


def config_file(folder: Path, extra: str = "") -> str:
    path = folder / "site.toml"
    path.write_text(ONLY_ATTRIBUTION + extra, encoding="utf-8")
    return str(path)


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return e.value.code or 0, captured.out, captured.err


class Text(HTMLParser):
    """The page's text, and the rows of its activation table."""

    def __init__(self):
        super().__init__()
        self.chunks: list[str] = []
        self.rows: list[list[str]] = []
        self._table = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table" and ("class", "activations") in attrs:
            self._table = True
        elif self._table and tag == "tr":
            self.rows.append([])
        elif self._table and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = False
        elif tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        self.chunks.append(data)
        if self._cell is not None:
            self._cell.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.chunks).split())


def read(path: Path) -> Text:
    t = Text()
    t.feed(path.read_text(encoding="utf-8"))
    return t


@pytest.fixture(scope="module")
def smooth_site(tmp_path_factory):
    """A built atlas of SmoothCNN with a softplus before conv3 (PNG sprites: no lossy compression)."""
    root = tmp_path_factory.mktemp("smooth")
    torch.save(tiny_models.smooth_cnn_softplus().state_dict(), root / "m.pt")
    rng = np.random.default_rng(0)
    for i in range(8):
        (root / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "imgs" / f"c{i % 2}" / f"{i}.png")
    config = config_file(root, f'[site]\nimage_format = "png"\npatch_size = {PATCH}\n')
    out = root / "site"
    code = None
    try:
        main(["-q", "build", str(root / "m.pt"), "--images", str(root / "imgs"), "--arch",
              f"{TINY}:smooth_cnn_softplus", "-o", str(out), "--no-cache", "--k", "4", "-c", config])
    except SystemExit as e:
        code = e.code
    assert not code
    return out


def test_method_rows_of_a_sprite_differ_behind_smooth_activations(smooth_site):
    """conv1 sees the input directly (the three methods agree exactly); conv2 lies behind SiLU,
    conv3 behind SiLU, GELU, max-pooling and Hardswish: the rules make their rows different pictures."""
    def row_differences(layer: str) -> list[float]:
        out = []
        for f in sorted((smooth_site / "img" / layer).glob("[0-9]*.png")):
            if ".fv." in f.name:
                continue
            a = np.asarray(Image.open(f).convert("RGB")).astype(float)
            side = a.shape[1] // 4  # k = 4 cells a row, at the windows' own pixels
            rows = [a[(1 + r) * side:(2 + r) * side] for r in range(3)]  # guided, deconvnet, gradient
            out.append(min(np.abs(rows[i] - rows[j]).mean() for i, j in itertools.combinations(range(3), 2)))
        return out

    assert max(row_differences("conv1")) == 0
    for layer in ("conv2", "conv3"):
        diffs = row_differences(layer)
        assert len(diffs) == {"conv2": 8, "conv3": 8}[layer]
        # Before the rules covered SiLU/GELU/Hardswish these rows differed by about 1 of 255.
        assert np.mean(diffs) > 5, (layer, diffs)


def test_index_lists_kinds_and_rules(smooth_site):
    page = read(smooth_site / "index.html")
    header, *rows = page.rows
    assert header == ["kind", "how called", "calls", "guided backprop", "deconvnet"]
    by_kind = {r[0]: r for r in rows}
    assert list(by_kind) == ["silu", "gelu", "softplus", "hardswish"]
    assert by_kind["silu"][1:3] == ["nn.SiLU (in place)", "1"] and by_kind["gelu"][1] == "F.gelu"
    for kind in ("silu", "gelu", "hardswish"):
        assert by_kind[kind][3:] == list(RULES[kind])
    assert by_kind["softplus"][3].startswith("none") and by_kind["softplus"][4].startswith("none")
    assert "Guided backprop and deconvnet have no rule for softplus" in page.text
    assert 'href="layers/conv3/index.html"' in (smooth_site / "index.html").read_text(encoding="utf-8")


def test_unruled_kind_is_named_on_the_channel_pages_it_affects(smooth_site):
    note = "have no rule for softplus"
    for c in (0, 7):
        assert note in read(smooth_site / "layers" / "conv3" / f"{c}.html").text
    for layer in ("conv1", "conv2"):
        assert note not in read(smooth_site / "layers" / layer / "0.html").text


def test_markup_in_a_kind_is_escaped_everywhere(tmp_path, make_images, capsys):
    torch.save(tiny_models.markup_cnn().state_dict(), tmp_path / "m.pt")
    make_images(tmp_path / "imgs", 6, size=16)
    out = tmp_path / "site"
    code, _, err = run_cli(["build", str(tmp_path / "m.pt"), "--images", str(tmp_path / "imgs"), "--arch",
                            f"{TINY}:markup_cnn", "-o", str(out), "--no-cache", "--k", "2",
                            "-c", config_file(tmp_path)], capsys)
    assert code == 0, err
    assert "warning: guided backprop and deconvnet have no rule for custom autograd.Function <b>Evil</b>" in err
    for page in (out / "index.html", out / "layers" / "conv2" / "0.html"):
        html = page.read_text(encoding="utf-8")
        assert "<b>Evil" not in html and "&lt;b&gt;Evil&lt;/b&gt;" in html, page
    assert "Evil" not in (out / "layers" / "conv1" / "0.html").read_text(encoding="utf-8")


def test_layers_command_lists_activations(tmp_path, capsys, monkeypatch):
    torch.save(tiny_models.smooth_cnn_softplus().state_dict(), tmp_path / "m.pt")
    argv = ["layers", str(tmp_path / "m.pt"), "--arch", f"{TINY}:smooth_cnn_softplus", "--size", "16"]
    code, stdout, err = run_cli(argv, capsys)  # piped: the activations are comment lines below the layers
    assert code == 0, err
    lines = stdout.splitlines()
    layer_rows = [line.split("\t") for line in lines if not line.startswith("#")]
    assert [r[0] for r in layer_rows] == ["layer", "conv1", "conv2", "conv3"]
    table = [line[2:].split("\t") for line in lines if line.startswith("# ") and "\t" in line]
    assert table[0] == ["activation", "how called", "calls", "guided backprop", "deconvnet"]
    assert [r[0] for r in table[1:]] == ["silu", "gelu", "softplus", "hardswish"]
    assert table[1][3:] == list(RULES["silu"])
    assert "warning: guided backprop and deconvnet have no rule for softplus" in err

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "hardswish" in stdout and "nn.Hardswish" in stdout and "σ(x)·(1 + x·(1 − σ(x)))" in stdout


def test_stage_pages_name_an_unruled_kind_of_any_block_shown(tmp_path, make_images, capsys):
    torch.save(tiny_models.softplus_resnet().state_dict(), tmp_path / "m.pt")
    make_images(tmp_path / "imgs", 6, size=16)
    out = tmp_path / "site"
    code, _, err = run_cli(["-q", "build", str(tmp_path / "m.pt"), "--images", str(tmp_path / "imgs"), "--arch",
                            f"{TINY}:softplus_resnet", "-o", str(out), "--no-cache", "--k", "2",
                            "-c", config_file(tmp_path)], capsys)
    assert code == 0, err
    stage = read(out / "stages" / "layer1" / "0.html").text
    assert "no rule for softplus" in stage  # layer1.1 (shown there) lies behind it
    assert "no rule for softplus" in read(out / "layers" / "layer1.1" / "0.html").text
    for layer in ("layer1.0", "layer1.1.conv1"):  # before the softplus runs
        assert "no rule" not in read(out / "layers" / layer / "0.html").text
