"""Training configuration: one flat namespace of options, shared by TOML files, ``--set`` and Python.

Every option is a field of :class:`TrainConfig`; its metadata drives parsing, validation, :meth:`TrainConfig.to_toml`
and the generated reference ``docs/config.md`` (sd_loha/train/config_docs.py). The package's modules:

- ``options``: the option table (:class:`OptionSpec`, the :class:`TrainConfig` fields, :data:`OPTIONS`);
- ``coerce``: reading one value (types, ranges, kohya's string forms, ``--set`` text);
- ``loading``: layers (defaults < base dict < TOML file < ``--set``) and the entry points below;
- ``rules``: the cross-option rules, a table of named checks (:data:`RULES`);
- ``errors``: :class:`Problem` and :class:`ConfigError`; ``writing``: TOML output through tomli-w.

Entry points::

    cfg = load_config("style.toml", ["max_train_steps=50", "output_dir=out"])
    cfg = config_from_kwargs(pretrained_model="tiny-sd1", train_data_dir="data", output_dir="out")
    cfg = as_config({...})                       # flat or grouped in tables, like the TOML file
    loaded = load("style.toml", ["seed=1"])      # loaded.config, loaded.origins, loaded.warnings

The file-system checks that run before any model loads are in :mod:`sd_loha.train.checks`.
All problems are collected and raised together as one :class:`ConfigError`.
"""

from __future__ import annotations

from .coerce import parse_option_text
from .errors import ConfigError, Problem, suggest
from .loading import (
    KOHYA_HINTS,
    LoadedConfig,
    as_config,
    config_from_kwargs,
    config_from_layers,
    load,
    load_config,
    load_layers,
    loads_config,
)
from .options import (
    BUILTIN_MODELS,
    DEFAULT_MAX_TRAIN_STEPS,
    GROUP_TITLES,
    GROUPS,
    LR_SCHEDULERS,
    OPTIONS,
    PRESETS,
    OptionSpec,
    TrainConfig,
)
from .rules import RULES, Rule, tensorboard_installed, wandb_installed
from .writing import toml_value

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MAX_TRAIN_STEPS",
    "GROUPS",
    "GROUP_TITLES",
    "KOHYA_HINTS",
    "LR_SCHEDULERS",
    "OPTIONS",
    "PRESETS",
    "RULES",
    "ConfigError",
    "LoadedConfig",
    "OptionSpec",
    "Problem",
    "Rule",
    "TrainConfig",
    "as_config",
    "config_from_kwargs",
    "config_from_layers",
    "load",
    "load_config",
    "load_layers",
    "loads_config",
    "parse_option_text",
    "suggest",
    "tensorboard_installed",
    "toml_value",
    "wandb_installed",
]
