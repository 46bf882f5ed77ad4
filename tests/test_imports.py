"""No import cycles among sd_loha's and webui's modules, counting every import statement.

A cycle works until someone imports the "wrong" module first, then fails as a half-initialised module; one
hidden in a function (a "lazy" import) or behind ``if TYPE_CHECKING:`` still ties two modules together: neither
can be understood, tested or moved without the other. So we read every Import/ImportFrom anywhere in each
module (top level, ``if``/``try`` blocks, functions, methods, nested functions) and require the graph to be
acyclic. Importing a submodule does run its packages' ``__init__`` first; that implicit edge is not counted
(a package that re-exports its submodules would otherwise always be a cycle), but an explicit
``from . import name`` of a package attribute is an edge to the package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sd_loha", "webui")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    found = {}
    for package in PACKAGES:
        for f in (ROOT / package).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (f, is_package)
    return found


def all_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, wherever it sits."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def _targets(name: str, is_package: bool, stmt: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The modules one import statement loads (`from . import x` may name a submodule or an attribute)."""
    if isinstance(stmt, ast.Import):
        return {a.name for a in stmt.names} & modules
    package = name.split(".") if is_package else name.split(".")[:-1]
    base_parts = package[: len(package) - stmt.level + 1] if stmt.level else []
    base = ".".join(base_parts + ([stmt.module] if stmt.module else []))
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in stmt.names} & modules


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {t for stmt in all_imports(ast.parse(f.read_text(encoding="utf-8")))
               for t in _targets(name, is_package, stmt, set(modules))} - {name}
        for name, (f, is_package) in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_walk_sees_every_import():
    graph = import_graph()
    assert "sd_loha.data.cache" in graph["sd_loha.data.dataset"]  # relative `from .cache import ...`
    assert "sd_loha.atomic" in graph["sd_loha.data.cache"]  # `from ..atomic import ...`
    assert "sd_loha.merge" in graph["sd_loha"]  # a package's __init__
    assert "sd_loha.train.loop" in graph["sd_loha.cli"]  # inside a function
    assert "webui.app" in graph["webui"]  # webui's __init__, inside a function
    assert "sd_loha.io" in graph["webui.runner"]  # webui, absolute, inside a function
    tree = ast.parse("import a\nclass C:\n    def f(self):\n        def g():\n            from .b import c\n")
    assert [type(s).__name__ for s in all_imports(tree)] == ["Import", "ImportFrom"]
    assert _targets("p.m", False, ast.parse("from . import x").body[0], {"p", "p.x"}) == {"p.x"}
    assert _targets("p.m", False, ast.parse("from . import attr").body[0], {"p", "p.x"}) == {"p"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or []) + " (move the shared piece so imports go one way)"


@pytest.mark.parametrize("first", ["sd_loha.data.cache", "sd_loha.data.dataset", "sd_loha.peft_format", "sd_loha.merge",
                                   "sd_loha.formats"])
def test_modules_import_first_in_a_fresh_interpreter(first):
    # Modules that used to import each other, each loaded first in a clean process.
    run = subprocess.run([sys.executable, "-c", f"import {first}"], capture_output=True, text=True, timeout=120,
                         check=False, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
