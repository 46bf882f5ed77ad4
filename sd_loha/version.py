"""sd-loha's version, as the installed package's metadata says it (pyproject.toml is the one place it is written)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def _installed_version() -> str:
    try:
        return version("sd-loha")
    except PackageNotFoundError:  # run from a source tree that was never installed (`pip install -e .` fixes it)
        return "0+unknown"


__version__ = _installed_version()
