"""TOML writing, through tomli-w: one value on one line (a UI widget, an error message, the docs), and a whole
config file of tables with comments (TrainConfig.to_toml).

tomli-w writes no comments and has no one-line form of arrays and inline tables, so this module adds the
comment lines and joins the values tomli-w writes; every scalar, string escape and key is tomli-w's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tomli_w


def plain(v: Any) -> Any:
    """Tuples as lists and mappings as dicts, recursively: the types TOML writers and readers use."""
    if isinstance(v, (tuple, list)):
        return [plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: plain(x) for k, x in v.items()}
    return v


def _scalar(v: Any) -> str:
    return tomli_w.dumps({"v": v}).removeprefix("v = ").rstrip("\n")


def toml_key(key: str) -> str:
    """A key as TOML writes it: bare when it can be, quoted otherwise."""
    return tomli_w.dumps({key: 0}).rstrip("\n").removesuffix(" = 0")


def toml_value(v: Any) -> str:
    """A value as TOML writes it on one line, lists and tuples as arrays, mappings as inline tables."""
    v = plain(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    try:
        return _scalar(v)
    except TypeError:
        raise TypeError(f"cannot write {type(v).__name__} to TOML") from None


@dataclass(frozen=True)
class Entry:
    """One option of a TOML document: its value (None: not set, written commented out as `example`)."""

    key: str
    value: Any
    comment: Sequence[str] = ()  # lines written as '# ...' above the option
    example: str | None = None  # with value None: the '# key = example' line, when comments are wanted


def toml_document(tables: Sequence[tuple[str, Sequence[Entry]]], *, header: Sequence[str] = (),
                  comments: bool = False) -> str:
    """A TOML file of tables, lowest level first as given. Each value is written by tomli-w; a table-valued
    option becomes a sub-table ``[table.key]`` after the table's other options (TOML puts them there).
    ``comments``: every entry's comment lines, and options that are not set as commented examples."""
    lines = [f"# {h}" for h in header]
    for table, entries in tables:
        lines += ["", f"[{toml_key(table)}]"]
        subtables = []
        for e in entries:
            if isinstance(e.value, Mapping):
                subtables.append(e)
                continue
            if comments:
                lines += [f"# {c}" for c in e.comment]
            if e.value is None:
                if comments and e.example is not None:
                    lines.append(f"# {toml_key(e.key)} = {e.example}")
                continue
            lines += tomli_w.dumps({e.key: plain(e.value)}).rstrip("\n").split("\n")
        for e in subtables:
            lines.append("")
            if comments:
                lines += [f"# {c}" for c in e.comment]
            written = tomli_w.dumps({table: {e.key: plain(e.value)}}).rstrip("\n")
            lines += written.split("\n")
    return "\n".join(lines) + "\n"
