"""The training options' reference, docs/config.md, generated from the option table (sd_loha/train/config/).

    python -m sd_loha.train.config_docs > docs/config.md
"""

from __future__ import annotations

import sys

from ..schedulers import ALIASES, SCHEDULERS
from .config import GROUP_TITLES, GROUPS, OPTIONS, RULES, OptionSpec, toml_value

_DOC_INTRO = """\
# Training configuration reference

<!-- Generated from the option table in sd_loha/train/config/options.py; do not edit by hand.
     Regenerate with: python -m sd_loha.train.config_docs > docs/config.md -->

Every training option has exactly one name (kohya sd-scripts' name wherever kohya users know it), and that
name means the same thing in a TOML config file, on the command line and in Python.

```bash
sd-loha train --config my_style.toml --set max_train_steps=50 --set output_dir=out
```

## Writing a config file

- Options can sit at the top level or in the tables `[model]`, `[dataset]`, `[network]`, `[training]`,
  `[saving]`, `[sampling]` and `[logging]`. Tables only help reading: **the option's name is what counts**,
  so an option placed in another table than the one listed below still works. Unknown tables, unknown
  options and an option set twice (e.g. in two tables) are errors.
- An option that is not set keeps its default. TOML has no null: to leave an optional option unset,
  leave it out.
- Relative paths are relative to the current directory (as in kohya), not to the config file.
- Names of choices (optimizers, schedulers, precisions, samplers) are case-insensitive: `adamw8bit` works.
- Mistyped option names get a suggestion, and kohya/LyCORIS options that sd-loha names differently or does
  not need (`pretrained_model_name_or_path`, `network_module`, `network_args`, `xformers`, ...) say what to
  write instead.

## `--set` on the command line

- `--set key=value`, repeatable. The value is read as a TOML literal (`50`, `1e-4`, `true`, `"a b"`,
  `["attn1", "attn2"]`, `{ weight_decay = 0.01 }`); if it is not valid TOML it is taken as a plain string,
  so `--set output_dir=out/run1` and `--set mixed_precision=bf16` need no quotes.
- A table prefix is allowed and ignored: `--set training.learning_rate=2e-4`.
- `--set optimizer_args.weight_decay=0.05` changes one optimizer argument and keeps the others.
- `--set key=none` unsets an optional option (one whose default below reads "not set" or similar).
- Precedence, lowest first: defaults, base settings (Python/web UI), the config file, `--set`.
  `max_train_steps` and `max_train_epochs` exclude each other: setting one in a later layer (say `--set
  max_train_epochs=10` over a file with `max_train_steps`) unsets the other; setting both in one layer is
  an error.

## Validation

Every problem is reported at once, each with where it was set (file and table, or the `--set` argument),
what is wrong and how to fix it. Warnings (settings that are legal but probably not what you meant) are
printed (`WARNING: config: ...`) and do not stop training. Paths are checked separately, before any model
is loaded; an `output_dir` that already holds files of the same `output_name` is refused unless
`overwrite = true` or the run resumes.

## From Python

```python
from sd_loha.train.config import as_config, config_from_kwargs, load, load_config

cfg = load_config("my_style.toml", ["max_train_steps=50"])
cfg = config_from_kwargs(pretrained_model="tiny-sd1", train_data_dir="data", output_dir="out")
cfg = as_config({"training": {"output_dir": "out"}, "pretrained_model": "tiny-sd1", ...})  # flat or in tables
print(cfg.to_toml())   # grouped TOML that loads back to an equal config

loaded = load("my_style.toml", ["seed=7"])  # the config, where each value was set, and the warnings
print(loaded.config.seed, loaded.origins["seed"], loaded.warnings)  # 7 --set seed=7 (...)
```
"""


def _md(s: str) -> str:
    return s.replace("|", "\\|")


def _default_text(spec: OptionSpec) -> str:
    if spec.required:
        return "**required**"
    if spec.default_doc is not None:
        return spec.default_doc
    if spec.default is None:
        return "not set"
    if isinstance(spec.default, (list, dict)) and not spec.default:
        return "`[]`" if isinstance(spec.default, list) else "`{}`"
    return f"`{toml_value(spec.default)}`"


def _allowed_text(spec: OptionSpec) -> str:
    parts = []
    if spec.choices:
        parts.append(", ".join(f"`{c}`" for c in spec.choices))
    if spec.aliases:
        parts.append("aliases: " + ", ".join(f"`{a}`→`{c}`" for a, c in spec.aliases.items()))
    r = spec.range_text()
    if r:
        parts.append(r)
    if spec.multiple_of:
        parts.append(f"multiple of {spec.multiple_of}")
    if spec.optional and not spec.required:
        parts.append(", ".join(f"`{w}`" for w in ("none", *spec.none_words)) + " unsets")
    return "; ".join(parts)


def kohya_differences_markdown() -> list[str]:
    """The one table of defaults that differ from kohya sd-scripts' (and LyCORIS's network_args), from the
    option table's kohya_default / kohya_note."""
    out = ["## Defaults that differ from kohya sd-scripts", "",
           "A kohya config that leaves these options out trains differently here. Options not listed have kohya's "
           "default (or are sd-loha's own). Set any of them to kohya's value to get kohya's behaviour.", "",
           "| Option | kohya's default | sd-loha's default | Why |", "|---|---|---|---|"]
    for spec in OPTIONS.values():
        if spec.kohya_default is not None:
            out.append(f"| `{spec.name}` | {_md(spec.kohya_default)} | {_md(_default_text(spec))} | "
                       f"{_md(spec.kohya_note or '')} |")
    return out + [""]


def config_reference_markdown() -> str:
    """The option reference (docs/config.md), generated from the TrainConfig metadata."""
    out = [_DOC_INTRO]
    for group in GROUPS:
        out += [f"## [{group}] — {GROUP_TITLES[group]}", ""]
        out += ["| Option | Type | Default | Allowed | Description |", "|---|---|---|---|---|"]
        for spec in OPTIONS.values():
            if spec.group == group:
                out.append(
                    f"| `{spec.name}` | {_md(spec.type_text())} | {_md(_default_text(spec))} | "
                    f"{_md(_allowed_text(spec))} | {_md(spec.help)} |"
                )
        out.append("")
    out += kohya_differences_markdown()
    out += ["## Samplers (`sample_sampler`)", "", "| Name | diffusers scheduler | A1111 name |", "|---|---|---|"]
    for name, (cls, kwargs, desc) in SCHEDULERS.items():
        extra = ", ".join(f"{k}={toml_value(v)}" for k, v in kwargs.items())
        out.append(f"| `{name}` | `{cls}`{f' ({extra})' if extra else ''} | {_md(desc)} |")
    aliases = ", ".join(f"`{a}`→`{c}`" for a, c in ALIASES.items())
    out += ["", f"Accepted aliases: {aliases}.", ""]
    out += ["## Cross-option checks", "", "Each check is a named rule (sd_loha/train/config/rules.py).", ""]
    for rule in RULES:
        out.append(f"- **{rule.level}** (`{rule.name}`): {rule.doc}")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # python -m sd_loha.train.config_docs > docs/config.md
    sys.stdout.write(config_reference_markdown())
