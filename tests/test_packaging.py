"""The wheel ships every subpackage and the templates (pyproject lists packages by hand)."""
from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_and_the_templates_are_in_the_wheel():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(tool["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "sitegen").rglob("__init__.py")}
    assert on_disk - listed == set(), "subpackages missing from [tool.setuptools] packages"
    assert tool["package-dir"]["sitegen.templates"] == "templates"
    assert (REPO / "templates" / "__init__.py").is_file() and any((REPO / "templates").glob("*.html"))
    data = tool["package-data"]
    assert "*.html" in data["sitegen.templates"] and data["sitegen.templates.assets"] == ["*"]
