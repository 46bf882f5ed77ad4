"""Sample prompts with kohya sd-scripts' per-prompt options, from the config's list or a prompts file.

One prompt is a line of text with options after it, as in kohya's prompt files (`line_to_prompt_dict` in
sd-scripts' library/train_util.py)::

    a castle on a hill, my_style --n blurry, lowres --w 512 --h 768 --d 42 --l 6.5 --s 28 --ss dpmpp_2m

`--n` negative prompt, `--w`/`--h` size, `--d` seed, `--l` guidance scale, `--s` steps, `--ss` sampler.
Sizes are rounded down to a multiple of 8 (at least 64) and steps clamped to 1..1000, as kohya does.
A prompts file is `.txt` (one prompt a line, `#` comments, blank lines skipped), `.toml` (kohya's
`[prompt]` defaults with `[[prompt.subset]]` entries) or `.json` (a list of lines or of tables); tables use
kohya's keys (`prompt`, `negative_prompt`, `width`, `height`, `seed`, `sample_steps`, `scale`,
`sample_sampler`). Pure Python: the config check reads the files before any model loads.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .. import schedulers

__all__ = ["PROMPT_FILE_SUFFIXES", "PromptEntry", "PromptError", "is_prompts_file", "parse_prompt_line",
           "read_prompt_entries", "read_prompts_file"]

PROMPT_FILE_SUFFIXES: tuple[str, ...] = (".txt", ".toml", ".json")
MAX_STEPS = 1000  # kohya's clamp of --s


class PromptError(ValueError):
    """A prompt or prompts file that cannot be used; `where` names the file and line (or list entry)."""

    def __init__(self, where: str, message: str, fix: str | None = None) -> None:
        super().__init__(f"{where}: {message}")
        self.where, self.message, self.fix = where, message, fix


@dataclass(frozen=True)
class PromptEntry:
    """One sample prompt and the settings it sets itself (None: the sample_* option's value)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    steps: int | None = None
    sampler: str | None = None

    def own_settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "prompt" and getattr(self, f.name) is not None}


def _size(text: Any) -> int:
    return max(64, _whole(text, 1) // 8 * 8)  # kohya: max(64, x - x % 8)


def _steps(text: Any) -> int:
    return max(1, min(MAX_STEPS, _whole(text, None)))


def _whole(value: Any, minimum: int | None) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise ValueError("a whole number")
    n = int(value)
    if minimum is not None and n < minimum:
        raise ValueError(f"a whole number >= {minimum}")
    return n


def _seed(value: Any) -> int:
    return _whole(value, 0)


def _scale(value: Any) -> float:
    try:
        x = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        x = None
    if x is None or not x >= 0 or x == float("inf"):
        raise ValueError("a number >= 0")
    return x


def _sampler(value: Any) -> str:
    try:
        return schedulers.resolve(value) if isinstance(value, str) else schedulers.resolve("")
    except ValueError:
        raise ValueError("one of " + ", ".join(schedulers.SCHEDULERS)) from None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a string")
    return value.strip()


# One row per setting: (kohya's line flag, kohya's table key, PromptEntry field, parser). The table keys are what
# kohya's sample_image_inference reads from a prompt dict.
_SETTINGS: tuple[tuple[str, str, str, Callable[[Any], Any]], ...] = (
    ("n", "negative_prompt", "negative_prompt", _text),
    ("w", "width", "width", _size),
    ("h", "height", "height", _size),
    ("d", "seed", "seed", _seed),
    ("l", "scale", "guidance_scale", _scale),
    ("s", "sample_steps", "steps", _steps),
    ("ss", "sample_sampler", "sampler", _sampler),
)
_BY_FLAG = {flag: (flag, field, parse) for flag, _, field, parse in _SETTINGS}
_BY_KEY = {key: (key, field, parse) for _, key, field, parse in _SETTINGS}

#: kohya flags that have no meaning for SD 1.x/2.x/SDXL samples, with what they are for
_NOT_HERE = {
    "g": "FLUX/SD3's embedded guidance (the guidance scale of these models is --l)",
    "cn": "a ControlNet image",
    "ctr": "Lumina's CFG truncation",
    "rcfg": "Lumina's CFG renormalisation",
    "fs": "the flow-matching shift of FLUX/SD3",
}
_FLAGS_TEXT = " ".join(f"--{flag}" for flag, *_ in _SETTINGS)
_SPLIT = re.compile(r"(?:^|\s+)--(?=[A-Za-z])")


def parse_prompt_line(line: str, where: str) -> PromptEntry:
    """A kohya prompt line: the prompt, then `--flag value` options; raises PromptError naming `where`."""
    prompt, *options = _SPLIT.split(line.strip())
    values: dict[str, Any] = {}
    for option in options:
        flag, _, value = option.partition(" ")
        flag, value = flag.lower(), value.strip()
        if flag in _NOT_HERE:
            raise PromptError(where, f"--{flag} is {_NOT_HERE[flag]} in kohya; SD 1.x/2.x/SDXL samples do not use it",
                              f"delete --{flag} {value}".rstrip())
        if flag not in _BY_FLAG:
            raise PromptError(where, f"unknown option --{flag}", f"the per-prompt options are {_FLAGS_TEXT}")
        _set(values, _BY_FLAG[flag], value, where, f"--{flag}")
    return PromptEntry(prompt=prompt.strip(), **values)


def _set(values: dict[str, Any], row: tuple[str, str, Callable[[Any], Any]], value: Any, where: str,
         shown: str) -> None:
    _, field_name, parse = row
    try:
        values[field_name] = parse(value)
    except ValueError as e:
        raise PromptError(where, f"{shown} must be {e}, got {value!r}") from None


def _entry_from_table(table: Any, where: str) -> PromptEntry:
    if isinstance(table, str):
        return parse_prompt_line(table, where)
    if not isinstance(table, dict):
        raise PromptError(where, f"expected a prompt line or a table, got {type(table).__name__}")
    if not isinstance(table.get("prompt"), str):
        raise PromptError(where, "the table has no prompt (a string)", 'add prompt = "..."')
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "prompt":
            continue
        if key not in _BY_KEY:
            raise PromptError(where, f"unknown key {key!r}", "the keys are prompt, " + ", ".join(_BY_KEY))
        _set(values, _BY_KEY[key], value, where, key)
    return PromptEntry(prompt=table["prompt"].strip(), **values)


def is_prompts_file(entry: str) -> bool:
    """An entry of sample_prompts that names a prompts file (ends in .txt, .toml or .json) rather than a prompt."""
    return entry.strip().lower().endswith(PROMPT_FILE_SUFFIXES)


def read_prompts_file(path: str) -> list[PromptEntry]:
    """The prompts of a kohya prompts file; PromptError names the file and line (or entry) of a problem."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(path, "prompts file not found", "check the path (relative paths start at the current "
                                                          "folder)") from None
    except IsADirectoryError:
        raise PromptError(path, "is a folder, not a prompts file") from None
    except UnicodeDecodeError:
        raise PromptError(path, "is not UTF-8 text", "save it as UTF-8") from None
    suffix = p.suffix.lower()
    if suffix == ".txt":
        return [parse_prompt_line(line, f"{path} line {n}") for n, line in enumerate(text.splitlines(), 1)
                if line.strip() and not line.strip().startswith("#")]
    try:
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise PromptError(path, f"not valid {suffix[1:].upper()}: {e}") from None
    if suffix == ".toml":
        return _toml_entries(data, path)
    if not isinstance(data, list):
        raise PromptError(path, "a JSON prompts file must hold a list of prompt lines or tables")
    return [_entry_from_table(item, f"{path} entry {n}") for n, item in enumerate(data, 1)]


def _toml_entries(data: dict[str, Any], path: str) -> list[PromptEntry]:
    """kohya's layout: [prompt] holds the defaults, each [[prompt.subset]] one prompt (its keys win)."""
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise PromptError(path, "a TOML prompts file needs a [prompt] table with [[prompt.subset]] entries",
                          'write [prompt] (shared settings, e.g. width = 512) then [[prompt.subset]] prompt = "..." '
                          "per prompt")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    return [_entry_from_table({**defaults, **sub} if isinstance(sub, dict) else sub, f"{path} [[prompt.subset]] {n}")
            for n, sub in enumerate(table["subset"], 1)]


def read_prompt_entries(sample_prompts: Sequence[str], where: str = "sample_prompts") -> list[PromptEntry]:
    """The sample prompts in order: each list entry is a prompt line, or a prompts file that stands for its
    prompts. Raises PromptError (the first problem) naming the entry or the file and line."""
    entries: list[PromptEntry] = []
    for n, item in enumerate(sample_prompts, 1):
        if is_prompts_file(item):
            entries += read_prompts_file(item.strip())
        else:
            entries.append(parse_prompt_line(item, f"{where} entry {n}"))
    return entries
