"""The package's layers point down: analysis passes never import the renderer, and no module of
sitegen imports itself back through others (no import loop, lazy imports inside functions included).

The import graph is read from the source with ``ast`` (nothing is imported), so a lazy
``from ..site import Page`` inside a view's method counts like a top-level one; imports under
``if TYPE_CHECKING:`` are left out, as they never run.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sitegen"


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def _imports(name: str, path: Path, is_pkg: bool, known: set[str]) -> set[str]:
    """The sitegen modules that ``name`` imports anywhere in its file."""
    package = name if is_pkg else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                for a in child.names:  # `from . import progress` imports the module sitegen.progress
                    found.add(f"{module}.{a.name}" if f"{module}.{a.name}" in known else module)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, is_pkg, set(mods)) for name, (path, is_pkg) in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_the_graph_is_read_at_all():
    graph = import_graph()
    assert "sitegen.render.site" in graph and "sitegen.passes.attribution" in graph
    assert "sitegen.render.pages" in graph["sitegen.render.site"]
    assert "sitegen.crops" in graph["sitegen.passes.attribution"]


def test_passes_never_import_the_renderer():
    graph = import_graph()
    up = sorted((a, b) for a, deps in graph.items() for b in deps
                if a.startswith("sitegen.passes") and b.startswith("sitegen.render"))
    assert not up, f"analysis passes import the renderer (move what both need below both): {up}"


def test_views_never_import_the_orchestrator():
    graph = import_graph()
    back = sorted((a, b) for a, deps in graph.items() for b in deps
                  if a.startswith("sitegen.render.views") and b == "sitegen.render.site")
    assert not back, f"views import the site orchestrator back: {back}"


def test_no_import_loops():
    assert cycles(import_graph()) == []


def test_a_loop_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
