"""File-system checks of a training config, run before any model is loaded: the base model, the data
and output folders exist (or can be made) and a finished run is not overwritten by accident."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from .config import BUILTIN_MODELS, ConfigError, Problem, TrainConfig, suggest

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _looks_like_hub_id(s: str) -> bool:
    return bool(_HUB_ID.fullmatch(s)) and ".." not in s and not s.lower().endswith(_MODEL_SUFFIXES)


def _check_exists(add: Callable[[str, str, str | None], None], key: str, value: str, *, folder: bool,
                  missing_fix: str, wrong_kind_fix: str) -> None:
    """Report `key` when its path does not exist, or is a file where a folder is wanted (or the reverse)."""
    p = Path(value).expanduser()
    if not p.exists():
        add(key, f"{key} '{value}' does not exist", missing_fix)
    elif folder and not p.is_dir():
        add(key, f"{key} '{value}' is a file, not a folder", wrong_kind_fix)
    elif not folder and not p.is_file():
        add(key, f"{key} '{value}' is a folder, not a file", wrong_kind_fix)


def check_paths(cfg: TrainConfig, origins: Mapping[str, str | None] | None = None) -> None:
    """Check the paths named by the config; raises :class:`ConfigError` listing every problem, each located
    where ``origins`` (a :class:`~sd_loha.train.config.LoadedConfig`'s) says its option was set."""
    where = origins or {}
    problems: list[Problem] = []

    def add(key: str, msg: str, fix: str | None = None) -> None:
        problems.append(Problem(where.get(key), msg, fix))

    # training data
    if cfg.train_data_dir:
        _check_exists(add, "train_data_dir", cfg.train_data_dir, folder=True,
                      missing_fix="point it at the folder that holds your images (or their kohya '10_name' subfolders)",
                      wrong_kind_fix="point it at the folder that holds your images")
    if cfg.reg_data_dir:
        _check_exists(add, "reg_data_dir", cfg.reg_data_dir, folder=True,
                      missing_fix="point it at the folder of regularization images (or their '1_class' subfolders)",
                      wrong_kind_fix="point it at the folder that holds the regularization images")
    if cfg.masked_loss and cfg.conditioning_data_dir:
        _check_exists(add, "conditioning_data_dir", cfg.conditioning_data_dir, folder=True,
                      missing_fix="point it at the folder of mask images (same file names as the training images)",
                      wrong_kind_fix="point it at the folder that holds the mask images")

    # base model
    m = cfg.pretrained_model
    if m and m not in BUILTIN_MODELS:
        p = Path(m).expanduser()
        if p.is_dir():
            if not (p / "model_index.json").is_file() and not (p / "unet" / "config.json").is_file():
                add("pretrained_model",
                    f"pretrained_model '{m}' is a folder but not a diffusers model (no model_index.json)",
                    "point it at the folder that holds model_index.json, or at a single .safetensors checkpoint")
        elif p.is_file():
            if p.suffix.lower() not in _MODEL_SUFFIXES:
                add("pretrained_model", f"pretrained_model '{m}' is not a model file (expected .safetensors or .ckpt)",
                    "point it at a .safetensors/.ckpt checkpoint or a diffusers folder")
        elif _looks_like_hub_id(m):
            parent = p.parent
            if str(parent) not in ("", ".") and parent.is_dir():
                add("pretrained_model",
                    f"pretrained_model '{m}' does not exist, though the folder '{parent}' does",
                    "fix the local path (or, for a Hugging Face id, make sure no local folder of that name exists)")
        else:
            hint = ", ".join(BUILTIN_MODELS)
            if m.lower().endswith(_MODEL_SUFFIXES) or os.sep in m or "/" in m or m.startswith(("~", ".")):
                add("pretrained_model", f"pretrained_model '{m}' does not exist", "check the path")
            else:
                s = suggest(m, BUILTIN_MODELS)
                add("pretrained_model",
                    f"pretrained_model '{m}' is not an existing file or folder, a built-in model ({hint}) or a "
                    f"Hugging Face id (org/name)" + (f" (did you mean '{s}'?)" if s else ""),
                    "give a local path, a hub id like stable-diffusion-v1-5/stable-diffusion-v1-5, or a built-in name")

    # what completes a single-file base
    if cfg.base_config:
        p = Path(cfg.base_config).expanduser()
        if not p.exists() and not _looks_like_hub_id(cfg.base_config):
            add("base_config", f"base_config '{cfg.base_config}' does not exist",
                "give the diffusers folder (with model_index.json) of the model the single file is, or a hub id")
        elif p.exists() and not (p / "model_index.json").is_file():
            add("base_config", f"base_config '{cfg.base_config}' is not a diffusers model folder (no model_index.json)",
                "give the folder that holds model_index.json")
        if cfg.pretrained_model and not Path(cfg.pretrained_model).expanduser().is_file():
            add("base_config", f"base_config completes a single-file pretrained_model; '{cfg.pretrained_model}' is "
                "not a file", "remove base_config (a folder, hub id or built-in model brings its own components)")

    # VAE
    if cfg.vae:
        p = Path(cfg.vae).expanduser()
        if not p.exists() and not _looks_like_hub_id(cfg.vae):
            add("vae", f"vae '{cfg.vae}' does not exist", "give a VAE file, a diffusers VAE folder or a hub id")

    # starting weights
    if cfg.network_weights:
        _check_exists(add, "network_weights", cfg.network_weights, folder=False,
                      missing_fix="point it at an existing LoHA .safetensors file, or remove the option",
                      wrong_kind_fix="point it at the LoHA .safetensors file")

    # writable output folders
    for key in ("output_dir", "logging_dir"):
        value = getattr(cfg, key)
        if value:
            msg = _unwritable(Path(value).expanduser())
            if msg:
                add(key, f"{key} '{value}' {msg}", "choose a folder you can write to")

    if problems:
        raise ConfigError(problems, header=f"config paths have {len(problems)} problem{'s' * (len(problems) != 1)}")


def _unwritable(p: Path) -> str | None:
    if p.exists():
        if not p.is_dir():
            return "is a file, not a folder"
        return None if os.access(p, os.W_OK | os.X_OK) else "is not writable"
    anc = p.absolute().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        return f"cannot be created: '{anc}' is a file"
    if not os.access(anc, os.W_OK | os.X_OK):
        return f"cannot be created: '{anc}' is not writable"
    return None


def find_previous_outputs(output_dir: str | os.PathLike[str], output_name: str) -> list[Path]:
    """Files and folders in output_dir that a run named output_name writes: LoHA files
    ``<name>.safetensors`` / ``<name>[-_.]*.safetensors`` and state folders (``<name>*state*`` or ``state*``)."""
    d = Path(output_dir).expanduser()
    if not d.is_dir():
        return []
    stem = re.escape(output_name)
    file_re = re.compile(rf"{stem}([-_.].*)?\.safetensors", re.IGNORECASE)
    dir_re = re.compile(rf"({stem}([-_.].*)?[-_.]state([-_.].*)?|states?([-_.].*)?)", re.IGNORECASE)
    found = []
    for child in sorted(d.iterdir()):
        if child.is_file() and file_re.fullmatch(child.name):
            found.append(child)
        elif child.is_dir() and dir_re.fullmatch(child.name):
            found.append(child)
    return found


def check_output_dir(cfg: TrainConfig, resume: str | os.PathLike[str] | bool | None = None,
                     origins: Mapping[str, str | None] | None = None) -> None:
    """Refuse an output_dir that already holds this run name's outputs (two runs writing to one folder)
    unless ``overwrite = true`` or the run resumes. ``origins`` locates the problem as in :func:`check_paths`."""
    if cfg.overwrite or resume or not cfg.output_dir:
        return
    found = find_previous_outputs(cfg.output_dir, cfg.output_name)
    if not found:
        return
    names = ", ".join(f.name + ("/" if f.is_dir() else "") for f in found[:5])
    if len(found) > 5:
        names += f", ... ({len(found)} in all)"
    raise ConfigError(
        [
            Problem(
                (origins or {}).get("output_dir"),
                f"output_dir '{cfg.output_dir}' already holds outputs of a run named '{cfg.output_name}' ({names}); "
                "two runs writing to one folder would overwrite each other's files",
                "use a new output_dir or output_name, continue that run with --resume, or set overwrite = true "
                "(--set overwrite=true) to replace them",
            )
        ],
        header="output folder in use",
    )


def config_preflight(cfg: TrainConfig, *, folder: str | os.PathLike | None = None, num_processes: int = 1):
    """The dataset preflight with the config's dataset settings (the trainer's and the web UI's one call).
    `folder` replaces train_data_dir when the caller resolved it already (the web UI's allowed folders)."""
    from ..data.preflight import run_preflight

    return run_preflight(
        folder if folder is not None else cfg.train_data_dir, resolution=cfg.resolution,
        enable_bucket=cfg.enable_bucket, min_bucket_reso=cfg.min_bucket_reso, max_bucket_reso=cfg.max_bucket_reso,
        bucket_reso_steps=cfg.bucket_reso_steps, bucket_no_upscale=cfg.bucket_no_upscale,
        caption_extension=cfg.caption_extension, batch_size=cfg.train_batch_size,
        validation_split=cfg.validation_split, seed=cfg.seed, trigger_word=cfg.trigger_word or None,
        num_processes=num_processes, reg_data_dir=cfg.reg_data_dir or None, prior_loss_weight=cfg.prior_loss_weight,
        alpha_mask=cfg.alpha_mask, conditioning_data_dir=(cfg.conditioning_data_dir or None) if cfg.masked_loss else None,
    )
