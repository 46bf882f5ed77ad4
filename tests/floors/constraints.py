"""The oldest versions pyproject.toml allows, as exact pins for the floor run (scripts/floors).

Every runtime dependency must declare a `>=` floor; the floor run installs exactly that version, so a floor
in pyproject.toml is one CI has tested. Test tools come from the `test` extra by name (only those the fast
subset needs). Usage: python tests/floors/constraints.py [TEST_EXTRA_NAME ...] > constraints.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# name, optional extras in brackets, then the specifier list (environment markers are not used here)
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def floor_of(requirement: str) -> tuple[str, str]:
    """(name, version) of a requirement's `>=` or `==` bound; ValueError naming it when it has none."""
    m = _REQ.match(requirement)
    if not m:
        raise ValueError(f"pyproject.toml: cannot read requirement {requirement!r}")
    name, spec = m.group(1), m.group(3)
    bound = re.search(r"(>=|==)\s*([0-9][A-Za-z0-9.+!-]*)", spec)
    if not bound:
        raise ValueError(f"pyproject.toml: {requirement!r} has no floor; declare the oldest tested version "
                         f"as {name}>=X and run scripts/floors")
    return name.lower(), bound.group(2)


def python_floor(project: dict) -> str:
    m = re.fullmatch(r">=\s*(3\.[0-9]+)", project["requires-python"].strip())
    if not m:
        raise ValueError(f"pyproject.toml: requires-python {project['requires-python']!r} is not of the form >=3.N")
    return m.group(1)


def floor_pins(project: dict, test_tools: list[str]) -> dict[str, str]:
    """name -> exact floor version: every runtime dependency, plus the named packages of the test extra."""
    pins = dict(floor_of(r) for r in project["dependencies"])
    extra = dict(floor_of(r) for r in project["optional-dependencies"]["test"])
    missing = [t for t in test_tools if t.lower() not in extra]
    if missing:
        raise ValueError(f"pyproject.toml: {missing} not in the test extra; add them there with a floor")
    pins.update({t.lower(): extra[t.lower()] for t in test_tools})
    return pins


def main(argv: list[str]) -> int:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    try:
        pins = floor_pins(project, argv)
        py = python_floor(project)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# generated from pyproject.toml by tests/floors/constraints.py; python floor {py}")
    print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
