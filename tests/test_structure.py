"""The size limits the code promises: no function (def or method, nested ones included) over 150 lines and no
module over 1,000 lines in sd_loha/ and webui/; and the version is read from the installed package's metadata,
written once in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sd_loha", "webui")
MAX_FUNCTION_LINES = 150
MAX_MODULE_LINES = 1000

def _sources() -> list[Path]:
    return sorted(f for package in PACKAGES for f in (ROOT / package).rglob("*.py"))


def function_lengths(source: str) -> dict[str, int]:
    """Qualified name -> lines (decorators included) of every def and async def, methods and nested ones too."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                found[prefix + child.name] = child.end_lineno - first + 1
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_the_measure_counts_nested_functions_and_methods():
    source = "class C:\n    def m(self):\n        def inner():\n            pass\n        return inner\n\n\nasync def f():\n    pass\n"
    assert function_lengths(source) == {"C.m": 4, "C.m.inner": 2, "f": 2}


def test_no_function_over_the_limit():
    too_long = {}
    for f in _sources():
        rel = f.relative_to(ROOT).as_posix()
        for name, lines in function_lengths(f.read_text(encoding="utf-8")).items():
            if lines > MAX_FUNCTION_LINES:
                too_long[f"{rel}:{name}"] = lines
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {too_long}"


def test_no_module_over_the_limit():
    too_long = {}
    for f in _sources():
        rel = f.relative_to(ROOT).as_posix()
        lines = len(f.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            too_long[rel] = lines
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them): {too_long}"


def test_version_comes_from_the_installed_metadata():
    import sd_loha

    assert sd_loha.__version__ == importlib.metadata.version("sd-loha")
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    written = [f.relative_to(ROOT).as_posix() for f in _sources() if f'"{declared}"' in f.read_text(encoding="utf-8")]
    assert not written, f"the version {declared} is written in {written}; read it from sd_loha.version"
