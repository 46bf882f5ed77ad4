"""No import cycles among sd_loha's modules.

A cycle works until someone imports the "wrong" module first, then fails as a half-initialised module; and one
hidden behind ``if TYPE_CHECKING:`` still ties two modules together. So we walk the import statements each module
runs when it loads (its top level, including ``if``/``try`` blocks such as TYPE_CHECKING; imports inside functions
are deliberate lazy loads and do not count) and require the graph to be acyclic.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sd_loha"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    found = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (f, is_package)
    return found


def _load_time_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    out: list[ast.Import | ast.ImportFrom] = []
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            out.append(stmt)
        elif isinstance(stmt, ast.If):
            out += _load_time_imports(stmt.body) + _load_time_imports(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            out += _load_time_imports(stmt.body) + _load_time_imports(stmt.orelse) + _load_time_imports(stmt.finalbody)
            for handler in stmt.handlers:
                out += _load_time_imports(handler.body)
    return out


def _targets(name: str, is_package: bool, stmt: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The sd_loha modules one import statement loads (`from . import x` may name a submodule or an attribute)."""
    if isinstance(stmt, ast.Import):
        return {a.name for a in stmt.names} & modules
    package = name.split(".") if is_package else name.split(".")[:-1]
    base_parts = package[: len(package) - stmt.level + 1] if stmt.level else []
    base = ".".join(base_parts + ([stmt.module] if stmt.module else []))
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in stmt.names} & modules


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {t for stmt in _load_time_imports(ast.parse(f.read_text(encoding="utf-8")).body)
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


def test_the_walk_sees_edges_and_cycles():
    graph = import_graph()
    assert "sd_loha.data.cache" in graph["sd_loha.data.dataset"]  # relative `from .cache import ...`
    assert "sd_loha.atomic" in graph["sd_loha.data.cache"]  # `from ..atomic import ...`
    assert "sd_loha.merge" in graph["sd_loha"]  # a package's __init__
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_sd_loha_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or []) + " (move the shared piece so imports go one way)"


@pytest.mark.parametrize("first", ["sd_loha.data.cache", "sd_loha.data.dataset"])
def test_data_modules_import_first_in_a_fresh_interpreter(first):
    # The two modules that used to import each other, each loaded first in a clean process.
    run = subprocess.run([sys.executable, "-c", f"import {first}"], capture_output=True, text=True, timeout=120, check=False,
                         cwd=PACKAGE.parent)
    assert run.returncode == 0, run.stderr[-2000:]
