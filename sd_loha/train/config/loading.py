"""Loading a config from layers, lowest first: option defaults, base settings (a dict from Python or the web UI),
a TOML file, ``--set key=value`` overrides. A later layer wins; every problem of every layer is collected and
raised together as one :class:`~.errors.ConfigError`.

The result of loading is explicit data, a :class:`LoadedConfig`: the validated :class:`~.options.TrainConfig`,
where each value came from (so later checks can say which file or ``--set`` to fix) and the warnings.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .coerce import coerce, coerce_dict, parse_arg_value, parse_literal, parse_option_text
from .errors import ConfigError, Invalid, Problem, show, suggest
from .options import EXCLUSIVE_PAIRS, GROUPS, OPTIONS, TrainConfig
from .rules import cross_check

logger = logging.getLogger(__name__)

KOHYA_HINTS: dict[str, str] = {
    "pretrained_model_name_or_path": "this is kohya's name; sd-loha calls it 'pretrained_model'",
    "network_module": "sd-loha always trains LoHA; delete this line",
    "network_args": (
        "LyCORIS network_args are separate options here: preset, conv_dim, conv_alpha, use_tucker, "
        "rank_dropout, module_dropout, network_reg_dims, network_reg_lrs (and algo is always LoHA)"
    ),
    "network_train_unet_only": "use train_text_encoder = false",
    "network_train_text_encoder_only": "not supported; sd-loha always trains the UNet",
    "xformers": "sd-loha uses PyTorch scaled-dot-product attention; delete this line",
    "sdpa": "sd-loha always uses PyTorch scaled-dot-product attention; delete this line",
    "mem_eff_attn": "sd-loha always uses PyTorch scaled-dot-product attention; delete this line",
    "save_model_as": "sd-loha always writes .safetensors; delete this line",
    "full_fp16": "the adapter always trains in fp32 under mixed_precision; delete this line",
    "full_bf16": "the adapter always trains in fp32 under mixed_precision; delete this line",
    "dataset_config": "point train_data_dir at the image folder (it may hold kohya '10_name' subfolders)",
    "in_json": "point train_data_dir at the image folder; captions are read from caption files or metadata.jsonl",
    "persistent_data_loader_workers": "not needed; delete this line",
    "lr_warmup": "the option is lr_warmup_steps (a step count, or a fraction of the run below 1)",
    "optimizer": "the option is optimizer_type",
    "sample_prompt": "the option is sample_prompts (a list of prompts, or a kohya prompts file: \"prompts.txt\")",
    "network_rank": "the option is network_dim (kohya's name for the rank)",
    "rank": "the option is network_dim (kohya's name for the rank)",
    "alpha": "the option is network_alpha",
    "conv_rank": "the option is conv_dim",
    "resume": "resuming is a command-line flag: sd-loha train --config FILE --resume [STATE_DIR]",
    "clip_l": "SD 3.x's text encoders come with the base model (its diffusers folder); delete this line",
    "clip_g": "SD 3.x's text encoders come with the base model (its diffusers folder); delete this line",
    "apply_lg_attn_mask": "sd-loha masks no text states, as diffusers' StableDiffusion3Pipeline; delete this line",
    "apply_t5_attn_mask": "sd-loha masks no text states, as diffusers' StableDiffusion3Pipeline; delete this line",
}


def _unknown_option(key: str, table: bool = False) -> tuple[str, str | None]:
    what = f"unknown table [{key}]" if table else f"unknown option '{key}'"
    if key in KOHYA_HINTS:
        return what, KOHYA_HINTS[key]
    pool = list(OPTIONS) + (list(GROUPS) if table else [])
    s = suggest(key, pool)
    if s:
        return f"{what} (did you mean '{s}'?)", None
    if table:
        return what, f"tables are optional; the known ones are {', '.join(GROUPS)}"
    return what, "see docs/config.md for the list of options"


@dataclass
class _Layer:
    values: dict[str, Any]  # option -> raw value (None = unset)
    where: dict[str, str | None]
    problems: list[Problem]
    arg_updates: dict[str, Any] = dataclasses.field(default_factory=dict)  # optimizer_args.x=...
    arg_where: str | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str | None) -> "_Layer":
        layer = cls({}, {}, [])
        if not isinstance(data, Mapping):
            layer.problems.append(Problem(source, f"expected a table of options, got {show(data)}"))
            return layer

        def loc(table: str | None) -> str | None:
            if source is None:
                return f"[{table}]" if table else None
            return f"{source} [{table}]" if table else source

        def add(key: str, value: Any, table: str | None) -> None:
            if key in layer.values:
                first = layer.where[key]
                layer.problems.append(
                    Problem(loc(table), f"{key} is set twice (also in {first or 'the top level'})",
                            "keep one of the two")
                )
                return
            layer.values[key] = value
            layer.where[key] = loc(table)

        for key, value in data.items():
            key = str(key)
            if key in OPTIONS:
                add(key, value, None)
            elif key in GROUPS:
                if not isinstance(value, Mapping):
                    layer.problems.append(
                        Problem(loc(None), f"'{key}' is a table name, not an option",
                                f"put options under a [{key}] header, e.g. [{key}] then one option per line")
                    )
                    continue
                for k2, v2 in value.items():
                    k2 = str(k2)
                    if k2 in OPTIONS:
                        add(k2, v2, key)
                    elif k2 in GROUPS:
                        layer.problems.append(
                            Problem(loc(key), f"tables do not nest: [{key}.{k2}]",
                                    f"make [{k2}] a top-level table")
                        )
                    else:
                        msg, fix = _unknown_option(k2)
                        layer.problems.append(Problem(loc(key), msg, fix))
            else:
                msg, fix = _unknown_option(key, table=isinstance(value, Mapping))
                layer.problems.append(Problem(loc(None), msg, fix))
        return layer

    @classmethod
    def from_overrides(cls, overrides: Sequence[str]) -> "_Layer":
        layer = cls({}, {}, [])
        if isinstance(overrides, str):
            overrides = [overrides]
        for raw in overrides:
            where = f"--set {raw}"
            key, eq, text = str(raw).partition("=")
            key = key.strip()
            if not eq or not key:
                layer.problems.append(
                    Problem(where, f"expected key=value, got {show(raw)}", "write e.g. --set max_train_steps=500")
                )
                continue
            head, dot, tail = key.partition(".")
            if dot and head in GROUPS:
                key = tail
                head, dot, tail = key.partition(".")
            if dot and head == "optimizer_args" and tail.isidentifier():
                try:
                    layer.arg_updates[tail] = parse_literal(text.strip())
                except ValueError:
                    layer.arg_updates[tail] = parse_arg_value(text.strip())
                layer.arg_where = where
                continue
            if key not in OPTIONS:
                msg, fix = _unknown_option(key)
                layer.problems.append(Problem(where, msg, fix))
                continue
            layer.values[key] = parse_option_text(OPTIONS[key], text)
            layer.where[key] = where
        return layer




def _merge(layers: Sequence[_Layer]) -> tuple[dict[str, Any], dict[str, str | None], list[Problem]]:
    merged: dict[str, Any] = {}
    where: dict[str, str | None] = {}
    problems: list[Problem] = []
    for layer in layers:
        problems += layer.problems
        for a, b in EXCLUSIVE_PAIRS:
            for x, y in ((a, b), (b, a)):
                if layer.values.get(x) is not None and y not in layer.values and y in merged:
                    merged.pop(y)
                    where.pop(y)
        for k, v in layer.values.items():
            if v is None:
                merged.pop(k, None)
                where.pop(k, None)
            else:
                merged[k] = v
                where[k] = layer.where.get(k)
        if layer.arg_updates:
            base = merged.get("optimizer_args", {})
            try:
                base = coerce_dict(OPTIONS["optimizer_args"], base)
            except Invalid as e:
                problems.append(Problem(where.get("optimizer_args"), e.message, e.fix))
                base = {}
            merged["optimizer_args"] = {**base, **layer.arg_updates}
            where["optimizer_args"] = layer.arg_where
    return merged, where, problems


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config, where each of its values was set, and what its rules warn about."""

    config: TrainConfig
    #: option -> where its value was set (file and table, ``--set k=v``, base settings); options at their
    #: default, or set from Python without a named source, are absent
    origins: Mapping[str, str]
    #: settings that are legal but probably not what was meant (training can run)
    warnings: tuple[str, ...]


def _resolve(layers: Sequence[_Layer]) -> LoadedConfig:
    merged, where, problems = _merge(layers)
    values: dict[str, Any] = {}
    invalid: set[str] = set()
    for key, raw in merged.items():
        try:
            values[key] = coerce(OPTIONS[key], raw)
        except Invalid as e:
            problems.append(Problem(where.get(key), e.message, e.fix))
            invalid.add(key)
    cfg = TrainConfig(**values)
    rule_problems, warnings = cross_check(cfg, where, invalid)
    problems += rule_problems
    if problems:
        raise ConfigError(problems)
    for w in warnings:
        logger.warning("config: %s", w)
    return LoadedConfig(cfg, {k: w for k, w in where.items() if w}, tuple(warnings))


_TOML_HINT = (
    "common causes: a string without quotes (write output_dir = \"out\"), a Windows path with backslashes "
    "in double quotes (use single quotes: 'C:\\data'), or a missing ] or \""
)


def _path_layers(path: str | os.PathLike[str] | None, overrides: Sequence[str],
                 base: Mapping[str, Any] | None) -> list[_Layer]:
    layers = []
    if base is not None:
        layers.append(_Layer.from_mapping(base, "base settings"))
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError([Problem(str(p), "config file not found", "check the --config path")]) from None
        except IsADirectoryError:
            raise ConfigError([Problem(str(p), "is a folder, not a config file", "pass the .toml file")]) from None
        except UnicodeDecodeError:
            raise ConfigError([Problem(str(p), "config file is not UTF-8 text", "save it as UTF-8")]) from None
        layers.append(_file_layer(text, str(p)))
    layers.append(_Layer.from_overrides(overrides))
    return layers


def _file_layer(text: str, source: str) -> _Layer:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([Problem(source, f"not valid TOML: {e}", _TOML_HINT)]) from None
    return _Layer.from_mapping(data, source)


def load(
    config: TrainConfig | Mapping[str, Any] | str | os.PathLike[str], overrides: Sequence[str] = ()
) -> LoadedConfig:
    """Validate a config given as a TrainConfig (e.g. built directly), a flat or grouped dict, or a TOML path,
    with ``key=value`` overrides on top: the config, where each value was set, and the warnings.
    Raises :class:`ConfigError` with every problem found."""
    if isinstance(config, TrainConfig):
        return _resolve([_Layer.from_mapping(config.to_dict(include_none=False), None),
                         _Layer.from_overrides(overrides)])
    if isinstance(config, Mapping):
        if not overrides:
            return _resolve([_Layer.from_mapping(config, None)])
        return _resolve(_path_layers(None, overrides, config))
    if isinstance(config, (str, os.PathLike)):
        return _resolve(_path_layers(config, overrides, None))
    raise TypeError(f"expected a TrainConfig, a dict or a path to a TOML file, got {type(config).__name__}")


def load_layers(layers: Sequence[tuple[str | Mapping[str, Any], str]]) -> LoadedConfig:
    """Validate settings given as layers, lowest first: each a TOML text or a flat or grouped mapping, with
    the name its problems are reported under. A later layer wins; ``None`` in a mapping unsets.

    The checks and messages are load_config's, so a UI's TOML box fails exactly as the same text in a
    ``--config`` file does (invalid TOML, a key set twice, unknown keys, wrong types)."""
    return _resolve([_file_layer(d, src) if isinstance(d, str) else _Layer.from_mapping(d, src) for d, src in layers])


# The entry points that want only the validated config (its warnings are logged).


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Read a TOML config (or none), apply ``key=value`` overrides, validate everything.

    Layers, lowest first: option defaults, ``base`` (a flat or grouped dict, e.g. from a UI), the
    file, the overrides. Override values are TOML literals, or bare strings when they do not parse
    (``output_dir=out``); ``none`` unsets an optional option. Raises :class:`ConfigError` with every
    problem found. Relative paths in the config are relative to the current directory."""
    return _resolve(_path_layers(path, overrides, base)).config


def loads_config(
    text: str, overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None, source: str = "<config>"
) -> TrainConfig:
    """Like :func:`load_config` for TOML text (e.g. from an editor box in the web UI)."""
    layers = [_Layer.from_mapping(base, "base settings")] if base is not None else []
    layers += [_file_layer(text, source), _Layer.from_overrides(overrides)]
    return _resolve(layers).config


def config_from_kwargs(**kwargs: Any) -> TrainConfig:
    """Python entry point: ``config_from_kwargs(pretrained_model="tiny-sd1", train_data_dir=..., ...)``."""
    return load(kwargs).config


def as_config(
    config: TrainConfig | Mapping[str, Any] | str | os.PathLike[str], overrides: Sequence[str] = ()
) -> TrainConfig:
    """:func:`load`'s config: a TrainConfig, a dict or a TOML path, validated, overrides applied."""
    return load(config, overrides).config


def config_from_layers(layers: Sequence[tuple[str | Mapping[str, Any], str]]) -> TrainConfig:
    """:func:`load_layers`'s config."""
    return load_layers(layers).config
