"""The documentation: the MkDocs site builds with --strict, and the config reference cannot drift.

docs/config.md lists every key as a table row ``| `section.key` | `default` | meaning |``; the test
walks the Config dataclasses (the loader's own source of truth) and checks that every key is
there with its real default written as TOML, and that the page lists no key that does not exist.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sitegen.config import Config, from_dict

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
ROW = re.compile(r"^\| `([a-z_][a-z0-9_.]*)` \| `(.*?)` \|", re.M)


def toml_value(v) -> str:
    """A default as the TOML the reference shows (tuples as arrays, strings JSON-quoted)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def config_keys() -> dict[str, object]:
    """Every key a config file may set, with its default: ``layers`` and ``section.key``."""
    cfg = Config()
    keys: dict[str, object] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                keys[f"{f.name}.{g.name}"] = getattr(value, g.name)
        else:
            keys[f.name] = value
    return keys


def documented() -> dict[str, str]:
    return dict(ROW.findall((DOCS / "config.md").read_text(encoding="utf-8")))


def test_every_config_key_is_documented_with_its_default():
    rows = documented()
    keys = config_keys()
    missing = sorted(set(keys) - set(rows))
    assert not missing, f"docs/config.md lacks {missing}: add a row per key (see the section's table)"
    wrong = {k: (rows[k], toml_value(v)) for k, v in keys.items() if rows[k] != toml_value(v)}
    assert not wrong, f"docs/config.md shows stale defaults (shown, actual): {wrong}"
    unknown = sorted(set(rows) - set(keys))
    assert not unknown, f"docs/config.md documents keys that do not exist: {unknown}"


def test_documented_defaults_load_as_a_config_file():
    """The shown defaults are valid TOML and, loaded as a config file, give the default Config."""
    table: dict = {}
    for key, shown in documented().items():
        section, _, name = key.rpartition(".")
        target = table.setdefault(section, {}) if section else table
        target[name] = tomllib.loads(f"v = {shown}")["v"]
    assert from_dict(table) == Config()


def test_docs_examples_in_config_reference_are_valid():
    """The example config on the reference page loads without error."""
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    example = re.search(r"## Example\n\n```toml\n(.*?)```", text, re.S)
    assert example, "docs/config.md has no ## Example TOML block"
    cfg = from_dict(tomllib.loads(example.group(1)))
    assert cfg.model.arch == "torchvision:resnet50" and cfg.site.image_format == "webp"


def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (pip install mkdocs, or pip install -e '.[docs]')")
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    built = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("*.html")}
    for page in ("config.html", "config/index.html"):
        if page in built:
            break
    else:
        pytest.fail(f"the config reference was not built: {sorted(built)[:10]}")
    # The docs, like the atlases they describe, load nothing from another host.
    for page in (tmp_path / "site").rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        remote = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(?:https?:)?//[^"]+"', html)
        assert not remote, f"{page.name} loads {remote[:2]}"
