"""Hostile and broken configuration: unknown keys named with the closest valid one, wrong
types and out-of-range values named by their TOML key, files that are not TOML — each one message
and exit code 2 through the CLI, before any work is done."""
from __future__ import annotations

from pathlib import Path

import pytest

from sitegen import config
from sitegen.errors import ConfigError




import hardening_corpus as corpus  # noqa: E402  (tests/ is on the import path: pyproject's pythonpath)

# (id, TOML text, phrases the message must hold)
CASES = [
    # unknown keys: named, with the closest valid key
    ("unknown-key", "[topk]\nkk = 3\n", ["'topk.kk'", "did you mean 'k'"]),
    ("unknown-section", "[dta]\nresize = 32\n", ["'dta'", "did you mean 'data'"]),
    ("unknown-top-level", "layer = ['conv1']\n", ["'layer'", "did you mean 'layers'"]),
    ("unknown-far-from-all", "[data]\nzzzz = 1\n", ["'data.zzzz'", "valid keys:", "max_pixels"]),
    ("misspelt-case", "[Data]\nresize = 32\n", ["'Data'", "did you mean 'data'"]),
    # wrong types
    ("string-for-int", "[topk]\nk = \"nine\"\n", ["'topk.k'", "whole number"]),
    ("float-for-int", "[data]\nresize = 32.5\n", ["'data.resize'", "whole number"]),
    ("bool-for-int", "[topk]\nk = true\n", ["'topk.k'", "whole number"]),
    ("int-for-bool", "[model]\ntrust_pickle = 1\n", ["'model.trust_pickle'", "true or false"]),
    ("string-for-bool", "[model]\ntrust_pickle = \"yes\"\n", ["'model.trust_pickle'", "true or false"]),
    ("string-for-list", "[data]\nmean = \"0.5\"\n", ["'data.mean'", "must be a list"]),
    ("string-in-list", "[data]\nmean = [0.5, \"a\", 0.5]\n", ["'data.mean[1]'", "must be a number"]),
    ("nested-list", "[data]\nstd = [[0.2], 0.2, 0.2]\n", ["'data.std[0]'", "must be a number"]),
    ("number-for-string", "[site]\ntitle = 3\n", ["'site.title'", "string in quotes"]),
    ("table-for-string", "[model]\narch = {x = 1}\n", ["'model.arch'", "string in quotes"]),
    ("value-for-table", "data = 3\n", ["'data'", "must be a table"]),
    ("list-of-tables-for-table", "[[topk]]\nk = 3\n", ["'topk'", "must be a table"]),
    ("string-for-layers", "layers = \"conv1\"\n", ["'layers'", "must be a list"]),
    ("date-for-int", "[topk]\nk = 2024-01-01\n", ["'topk.k'", "whole number"]),
    # out of range
    ("k-zero", "[topk]\nk = 0\n", ["'topk.k'", "between 1 and 100"]),
    ("k-huge", "[topk]\nk = 100000000000000000000\n", ["'topk.k'", "between 1 and 100"]),
    ("negative-resize", "[data]\nresize = -2\n", ["'data.resize'", "between 0", "-1 (automatic)"]),
    ("huge-resize", "[data]\nresize = 1000000\n", ["'data.resize'", "16384"]),
    ("huge-crop", "[data]\ncrop = 99999\n", ["'data.crop'", "16384"]),
    ("zero-std", "[data]\nstd = [0.2, 0, 0.2]\n", ["'data.std'", "> 0"]),
    ("two-means", "[data]\nmean = [0.5, 0.5]\n", ["'data.mean'", "one number", "three (one per RGB channel)"]),
    ("nan-mean", "[data]\nmean = [nan, 0.5, 0.5]\n", ["'data.mean[0]'", "finite number"]),
    ("inf-std", "[data]\nstd = [inf, 0.2, 0.2]\n", ["'data.std[0]'", "finite number"]),
    ("zero-max-pixels", "[data]\nmax_pixels = 0\n", ["'data.max_pixels'", "> 0"]),
    ("max-pixels-over-pillow", "[data]\nmax_pixels = 200000000\n", ["'data.max_pixels'", "decompression bombs"]),
    ("negative-max-images", "[data]\nmax_images = -5\n", ["'data.max_images'", "≥ 0"]),
    ("tiny-patch", "[site]\npatch_size = 4\n", ["'site.patch_size'", "between 8 and 512"]),
    ("negative-batch", "[topk]\nbatch_size = -1\n", ["'topk.batch_size'", "≥ 0"]),
    # not TOML at all
    ("invalid-toml", "[data\nresize = 3\n", ["not valid TOML"]),
    ("duplicate-key", "[topk]\nk = 3\nk = 4\n", ["not valid TOML"]),
    ("deep-nesting", "x = " + "[" * 5000 + "]" * 5000 + "\n", ["nests arrays or tables too deeply"]),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", ["cannot read config file"]),
    ("latin-1", "[site]\ntitle = \"caf\xe9\"\n".encode("latin-1"), ["cannot read config file", "utf-8"]),
]


def _write(tmp_path: Path, text) -> Path:
    p = tmp_path / "site_config.toml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("case, text, phrases", CASES, ids=[c[0] for c in CASES])
def test_bad_config_unit(tmp_path, case, text, phrases):
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, text))
    message = str(e.value)
    assert "site_config.toml" in message  # the file is named
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"


@pytest.mark.parametrize("case, text, phrases", CASES, ids=[c[0] for c in CASES])
def test_bad_config_cli(tmp_path, capfd, case, text, phrases):
    """Rejected before the checkpoint or the images are touched (neither exists here)."""
    code, _, err = corpus.run_cli(["build", str(tmp_path / "nope.pt"), "--images", str(tmp_path / "none"),
                                   "--arch", corpus.TINY_ARCH, "-o", str(tmp_path / "site"),
                                   "--config", str(_write(tmp_path, text))], capfd)
    corpus.assert_clean_failure(code, err, "site_config.toml", *phrases)
    assert not (tmp_path / "site").exists()


@pytest.mark.parametrize("where, phrases", [
    ("missing", ["does not exist", "--config"]),
    ("folder", ["cannot read config file"]),
])
def test_config_path_that_is_not_a_file(tmp_path, capfd, where, phrases):
    path = tmp_path / "cfg.toml"
    if where == "folder":
        path.mkdir()
    with pytest.raises(ConfigError):
        config.load(path)
    code, _, err = corpus.run_cli(["build", "x.pt", "--images", str(tmp_path), "--config", str(path)], capfd)
    corpus.assert_clean_failure(code, err, "cfg.toml", *phrases)


def test_empty_config_is_the_defaults(tmp_path):
    assert config.load(_write(tmp_path, "")) == config.Config()
    assert config.load(_write(tmp_path, "# only a comment\n")) == config.Config()


@pytest.mark.parametrize("flags, phrases", [
    (["--k", "0"], ["--k 0", "'topk.k'", "between 1 and 100"]),
    (["--k", "nine"], ["Invalid value for '--k'"]),
    (["--resize", "-3"], ["--resize -3", "'data.resize'"]),
    (["--max-images", "-1"], ["--max-images -1", "'data.max_images'"]),
    (["--mean", "a,b,c"], ["--mean", "not one number or three"]),
    (["--std", "0.2,0.2"], ["--std", "one number or three comma-separated numbers, got 2"]),
    (["--std", "0,1,1"], ["--std 0,1,1", "'data.std'", "> 0"]),
    (["--std", "nan,1,1"], ["--std nan,1,1", "'data.std[0]'", "finite"]),
    (["--no-such-flag"], ["No such option: --no-such-flag"]),
])
def test_bad_flags(tmp_path, capfd, flags, phrases):
    code, _, err = corpus.run_cli(["build", "x.pt", "--images", str(tmp_path), "--arch", corpus.TINY_ARCH,
                                   "-o", str(tmp_path / "site"), *flags], capfd)
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in {err!r}"


def test_misplaced_global_flag_is_a_usage_error(tmp_path, capfd):
    """-q belongs before the command; typer's vendored click used to escape main() as a traceback."""
    code, _, err = corpus.run_cli(["build", "x.pt", "--images", str(tmp_path), "-q"], capfd)
    assert code == 2 and "No such option: -q" in err and "Traceback" not in err
