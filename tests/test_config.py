"""Config loading: defaults, the documented site_config.toml, and errors that name the TOML key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sitegen import config
from sitegen.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _fields(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_documented_config_equals_the_defaults():
    documented = config.load(REPO / "site_config.toml")
    assert documented == config.Config()
    text = (REPO / "site_config.toml").read_text()
    for key in _fields(config.Config()):
        leaf = key.rsplit(".", 1)[-1]
        assert f"\n{leaf} =" in text, f"site_config.toml does not document {key}"


def test_unknown_key_names_the_closest(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[data]\nresise = 32\n")
    with pytest.raises(ConfigError, match=r"'data.resise'.*did you mean 'resize'"):
        config.load(p)


@pytest.mark.parametrize("text, key", [
    ("[data]\nresize = 'big'\n", "data.resize"),
    ("[data]\nmean = [0.5, 0.5]\n", "data.mean"),
    ("[data]\nstd = [0.5, 0.0, 0.5]\n", "data.std"),
    ("[topk]\nk = 0\n", "topk.k"),
    ("[model]\ntrust_pickle = 1\n", "model.trust_pickle"),
    ("layers = 'layer1'\n", "layers"),
    ("data = 3\n", "data"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert repr(key) in str(e.value)


def test_invalid_toml_and_missing_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[data\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(p)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_overrides_replace_only_given_keys():
    cfg = config.with_overrides(config.Config(), "data", resize=40, crop=None, mean=(0.5, 0.5, 0.5))
    assert cfg.data.resize == 40 and cfg.data.crop == -1 and cfg.data.mean == (0.5, 0.5, 0.5)
    assert cfg.data.std == config.DataConfig().std
    with pytest.raises(ConfigError, match="data.crop"):
        config.with_overrides(cfg, "data", crop=-2)


def test_integers_accepted_for_floats(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[data]\nmean = [0, 1, 0]\n")
    assert config.load(p).data.mean == (0.0, 1.0, 0.0)
