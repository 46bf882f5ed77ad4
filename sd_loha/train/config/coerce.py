"""Reading one option's value: type checks and normalisation (enum case, resolution to (w, h), kohya's
"key=value" strings, ...), each failure an :class:`~.errors.Invalid` with a fix, and the text form that
``--set NAME=TEXT`` and the web UI's text widgets use."""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

from ..optim import OptimizerError, resolve_optimizer
from .errors import Invalid, show, suggest
from .options import STRINGY_KINDS, OptionSpec
from .writing import plain


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def coerce(spec: OptionSpec, v: Any) -> Any:
    """Check the type of a (non-None) value and normalise it; raises Invalid."""
    k, name = spec.kind, spec.name
    if isinstance(v, str) and v.strip().lower() in spec.none_words:
        return None
    if k == "int":
        if is_number(v) and math.isfinite(v) and float(v).is_integer():
            v = int(v)
        else:
            fix = f"write a whole number without quotes, e.g. {name} = {spec.example_value()}"
            raise Invalid(f"{name} must be an integer, got {show(v)}", fix)
    elif k == "float":
        if not is_number(v):
            fix = f"write a number without quotes, e.g. {name} = {spec.example_value()}"
            raise Invalid(f"{name} must be a number, got {show(v)}", fix)
        v = float(v)
        if not math.isfinite(v):
            raise Invalid(f"{name} must be a finite number, got {show(v)}")
    elif k == "bool":
        if not isinstance(v, bool):
            fix = f"write {name} = true or {name} = false (no quotes)"
            raise Invalid(f"{name} must be true or false, got {show(v)}", fix)
    elif k in ("str", "optimizer", "enum"):
        if not isinstance(v, str):
            raise Invalid(f"{name} must be a string, got {show(v)}", f'put it in quotes, e.g. {name} = "{_plain_str(v)}"')
        if k == "enum":
            v = _canonical_choice_or_file(spec, v)
        elif k == "optimizer":
            v = _canonical_optimizer(v)
    elif k == "path":
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if not isinstance(v, str):
            raise Invalid(
                f"{name} must be a path (a string), got {show(v)}",
                f"put it in quotes, e.g. {name} = {spec.example_value()}",
            )
    elif k == "list":
        if isinstance(v, str):
            v = [v] if v else []
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise Invalid(
                f"{name} must be a list of strings, got {show(v)}",
                f"write e.g. {name} = {spec.example_value()}",
            )
        v = list(v)
    elif k == "numbers":
        v = _coerce_numbers(spec, v)
    elif k == "dict":
        v = coerce_dict(spec, v)
    elif k in ("int_patterns", "float_patterns"):
        v = _coerce_patterns(spec, v, integer=k == "int_patterns")
    elif k == "resolution":
        v = _coerce_resolution(spec, v)
    elif k == "warmup":
        if is_number(v) and math.isfinite(v) and v >= 0:
            if float(v).is_integer():
                v = int(v)
            elif v > 1:
                raise Invalid(
                    f"{name} must be a whole number of steps or a fraction below 1, got {show(v)}",
                    f"write e.g. {name} = 100 (steps) or {name} = 0.05 (5 % of the run)",
                )
            else:
                v = float(v)
        else:
            raise Invalid(
                f"{name} must be a number of steps (>= 0) or a fraction below 1, got {show(v)}",
                f"write e.g. {name} = 100 or {name} = 0.05",
            )
    check_range(spec, v)
    return v


def _plain_str(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _coerce_numbers(spec: OptionSpec, v: Any) -> list[float]:
    """A list of finite numbers; "0, 0.5, 1" (the CLI's --set, a form field) reads as [0, 0.5, 1]."""
    if isinstance(v, str):
        try:
            v = [float(x) for x in v.replace(",", " ").split()]
        except ValueError:
            raise Invalid(f"{spec.name} must be a list of numbers, got {show(v)}",
                       f"write e.g. {spec.name} = {spec.example_value()}") from None
    if not isinstance(v, (list, tuple)) or not v or not all(is_number(x) and math.isfinite(x) for x in v):
        raise Invalid(f"{spec.name} must be a non-empty list of numbers, got {show(v)}",
                   f"write e.g. {spec.name} = {spec.example_value()}")
    out = [float(x) for x in v]
    for x in out:
        check_range(spec, x)
    return out


def check_range(spec: OptionSpec, v: Any) -> None:
    if not is_number(v):
        return
    lo, hi = spec.min, spec.max
    bad = (
        (lo is not None and (v <= lo if spec.min_open else v < lo))
        or (hi is not None and (v >= hi if spec.max_open else v > hi))
    )
    if bad:
        raise Invalid(f"{spec.name} must be {spec.range_text()}, got {show(v)}")
    if spec.multiple_of and spec.kind == "int" and v % spec.multiple_of:
        m = spec.multiple_of
        near = max(m, int(round(v / m)) * m)
        raise Invalid(f"{spec.name} must be a multiple of {m}, got {v}", f"use {near}")


def _canonical_choice(spec: OptionSpec, v: str) -> str:
    low = v.strip().lower()
    for c in spec.choices:
        if c.lower() == low:
            return c
    for a, c in spec.aliases.items():
        if a.lower() == low:
            return c
    s = suggest(v, list(spec.choices) + list(spec.aliases))
    s = spec.aliases.get(s, s) if s else None
    msg = f"{spec.name} must be one of {', '.join(spec.choices)}; got {show(v)}"
    if s:
        msg += f" (did you mean '{s}'?)"
    raise Invalid(msg)


def _canonical_choice_or_file(spec: OptionSpec, v: str) -> str:
    if spec.file_suffix and v.strip().lower().endswith(spec.file_suffix):
        return v.strip()  # a file: read by the cross-option checks, where its problems are reported
    try:
        return _canonical_choice(spec, v)
    except Invalid as e:
        if not spec.file_suffix:
            raise
        raise Invalid(e.message, f"or give a {spec.name} file, a path ending in {spec.file_suffix}") from None


def _canonical_optimizer(v: str) -> str:
    try:
        return resolve_optimizer(v).name  # imports the class's package now, not after the model loaded
    except OptimizerError as e:
        raise Invalid(e.message, e.fix) from None


def parse_literal(text: str) -> Any:
    """A TOML literal (number, bool, string, array, inline table); raises ValueError."""
    try:
        doc = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError as e:
        raise ValueError(str(e)) from None
    if set(doc) != {"v"}:
        raise ValueError("more than one value")
    return doc["v"]


def coerce_dict(spec: OptionSpec, v: Any) -> dict[str, Any]:
    if isinstance(v, str):
        v = [v] if v.strip() else []
    if isinstance(v, Mapping):
        bad_keys = [k for k in v if not isinstance(k, str)]
        if bad_keys:
            raise Invalid(f"{spec.name} keys must be strings, got {show(bad_keys[0])}")
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        out: dict[str, Any] = {}
        for item in v:
            if not isinstance(item, str) or "=" not in item:
                raise Invalid(
                    f"{spec.name} entries must be \"key=value\" strings, got {show(item)}",
                    f"write {spec.name} = {{ weight_decay = 0.01 }} or {spec.name} = [\"weight_decay=0.01\"]",
                )
            key, _, text = item.partition("=")
            key = key.strip()
            if not key.isidentifier():
                raise Invalid(f"{spec.name}: '{key}' is not a valid argument name")
            out[key] = parse_arg_value(text.strip())
        return out
    raise Invalid(
        f"{spec.name} must be a table of optimizer arguments, got {show(v)}",
        f"write {spec.name} = {{ weight_decay = 0.01, betas = [0.9, 0.99] }}",
    )


def _coerce_patterns(spec: OptionSpec, v: Any, *, integer: bool) -> dict[str, int | float]:
    """Regular expression -> number, in order: a TOML table, kohya's network_args string "re=N,re=N" (split at
    commas, each at its last '='), or a list of "re=N" strings."""
    what = "an integer" if integer else "a number"
    fix = f'write e.g. {spec.name} = {spec.example_value()}, or kohya\'s form {spec.name} = "pattern=value,pattern=value"'
    if isinstance(v, str):
        v = [item for item in v.split(",") if item.strip()]
    if isinstance(v, (list, tuple)):
        pairs = {}
        for item in v:
            if not isinstance(item, str) or "=" not in item:
                raise Invalid(f"{spec.name} entries must be \"pattern=value\", got {show(item)}", fix)
            key, _, text = item.rpartition("=")
            try:
                pairs[key.strip()] = float(text)
            except ValueError:
                raise Invalid(f"{spec.name}: the value of {show(key.strip())} must be {what}, got {show(text.strip())}",
                           fix) from None
        v = pairs
    if not isinstance(v, Mapping):
        raise Invalid(f"{spec.name} must be a table of regular expression = value ({what}), got {show(v)}", fix)
    out: dict[str, int | float] = {}
    for pattern, x in v.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise Invalid(f"{spec.name}: {show(pattern)} is not a regular expression ({e})",
                       "escape a literal character with a backslash (\\. for a dot, in a TOML literal string '...')") from None
        if not is_number(x) or not math.isfinite(x) or (integer and not float(x).is_integer()):
            raise Invalid(f"{spec.name}: the value of {show(pattern)} must be {what}, got {show(x)}", fix)
        try:
            check_range(spec, x)
        except Invalid as e:
            raise Invalid(f"{e.message} (pattern {show(pattern)})", fix) from None
        out[pattern] = int(x) if integer else float(x)
    return out


def parse_arg_value(text: str) -> Any:
    """kohya-style optimizer argument value: a TOML/Python literal, a comma list, or a bare string."""
    for t in (text, text.replace("True", "true").replace("False", "false")):
        try:
            return parse_literal(t)
        except ValueError:
            pass
        if "," in t:
            try:
                return parse_literal("[" + t.strip("()[] ") + "]")
            except ValueError:
                pass
    if text == "None":
        return None
    return text


def _coerce_resolution(spec: OptionSpec, v: Any) -> tuple[int, int]:
    fix = f'write e.g. {spec.name} = 512, {spec.name} = "768,512" or {spec.name} = [768, 512] (width, height)'
    wh: list[Any]
    if isinstance(v, str):
        parts = [p.strip() for p in re.split(r"[,xX*]", v.strip())]
        try:
            wh = [int(p) for p in parts]
        except ValueError:
            raise Invalid(f"{spec.name} must be a size in pixels, got {show(v)}", fix) from None
    elif is_number(v):
        wh = [v]
    elif isinstance(v, (list, tuple)):
        wh = list(v)
    else:
        raise Invalid(f"{spec.name} must be a size in pixels, got {show(v)}", fix)
    if len(wh) == 1:
        wh = wh * 2
    if len(wh) != 2 or not all(is_number(x) and float(x).is_integer() for x in wh):
        raise Invalid(f"{spec.name} must be one or two whole numbers (width, height), got {show(v)}", fix)
    w, h = (int(x) for x in wh)
    for side in (w, h):
        if side < 64 or side % 8:
            near = max(64, int(round(side / 8)) * 8)
            raise Invalid(
                f"{spec.name} sides must be multiples of 8 and at least 64, got {show(v)}",
                f"use e.g. {near}",
            )
    return (w, h)


def parse_option_text(spec: OptionSpec, text: str) -> Any:
    """One option's value from its text, as `--set NAME=TEXT` reads it (the web UI's text widgets use it too)."""
    t = text.strip()
    if spec.optional and t.lower() in ("none", "null", "", *spec.none_words):
        return None
    if spec.kind == "bool" and t.lower() in ("true", "false"):
        return t.lower() == "true"
    try:
        v = parse_literal(t)
    except ValueError:
        v = t
        if spec.kind in ("float", "int", "warmup") and t:
            try:
                v = float(t)  # ".5", "1E-4" and friends that TOML rejects
            except ValueError:
                v = t
        return v
    if spec.kind in STRINGY_KINDS and not isinstance(v, str):
        return t  # output_name=2024, trigger_word=true: the text itself
    return v
