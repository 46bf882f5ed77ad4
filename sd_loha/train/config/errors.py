"""What goes wrong in a config: a :class:`Problem` (where, what, how to fix), all of them raised together as one
:class:`ConfigError`, and how values and near-miss names read in the messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .writing import toml_value


@dataclass(frozen=True)
class Problem:
    """One problem: where it was set (file and table, ``--set k=v``, ...), what is wrong, how to fix it."""

    where: str | None
    message: str
    fix: str | None = None

    def __str__(self) -> str:
        s = f"{self.where}: {self.message}" if self.where else self.message
        if self.fix:
            fix = self.fix if self.fix.startswith("sd-loha") else self.fix[0].upper() + self.fix[1:]
            s += f". {fix}"
        return s if s.endswith((".", "?", ")")) else s + "."


class ConfigError(ValueError):
    """Invalid configuration; ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: Sequence[Problem | str], header: str | None = None):
        self.problems = [p if isinstance(p, Problem) else Problem(None, p) for p in problems]
        self.header = header
        super().__init__(str(self))

    @property
    def messages(self) -> list[str]:
        return [str(p) for p in self.problems]

    def __str__(self) -> str:
        n = len(self.problems)
        head = self.header or f"invalid training config ({n} problem{'s' if n != 1 else ''})"
        return head + ":\n" + "\n".join(f"  - {m}" for m in self.messages)


class Invalid(Exception):
    """One value that cannot be used, with how to fix it (becomes a Problem located where the value was set)."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix


def show(v: Any) -> str:
    """A value as it appears in error messages: strings in single quotes, the rest as TOML."""
    if isinstance(v, str):
        return repr(v) if "'" not in v else '"' + v.replace('"', '\\"') + '"'
    try:
        return toml_value(v)
    except TypeError:
        return repr(v)


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to a mistyped word (case-insensitive), or None."""
    cands = list(candidates)
    lower = {c.lower(): c for c in cands}
    hit = difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=0.6)
    return lower[hit[0]] if hit else None
