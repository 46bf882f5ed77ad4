"""sd-loha's version, as the installed package's metadata says it (pyproject.toml is the one place it is written)."""

from __future__ import annotations

import importlib.metadata
from importlib.metadata import PackageNotFoundError, version


def _installed_version() -> str:
    try:
        return version("sd-loha")
    except PackageNotFoundError:  # run from a source tree that was never installed (`pip install -e .` fixes it)
        return "0+unknown"


__version__ = _installed_version()


def diffusers_at_least(release: tuple[int, int]) -> bool:
    """Whether the installed diffusers is this (major, minor) release or newer (features sd-loha uses where they
    exist: layerwise casting, flow-matching samplers and training utilities came in 0.33)."""
    numbers = [int(p) for p in importlib.metadata.version("diffusers").split(".")[:2] if p.isdigit()]
    return tuple(numbers) >= release
