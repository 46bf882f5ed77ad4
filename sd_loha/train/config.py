"""Training configuration: one flat namespace of options, shared by TOML files, ``--set`` and Python.

Every option is a field of :class:`TrainConfig`; its metadata (group, type, default, allowed values,
help) drives parsing, validation, :meth:`TrainConfig.to_toml` and the generated reference
``docs/config.md`` (sd_loha/train/config_docs.py).

Entry points::

    cfg = load_config("style.toml", ["max_train_steps=50", "output_dir=out"])
    cfg = config_from_kwargs(pretrained_model="tiny-sd1", train_data_dir="data", output_dir="out")
    cfg = TrainConfig.from_dict({...})          # flat or grouped in tables, like the TOML file

The file-system checks that run before any model loads are in :mod:`sd_loha.train.checks`.

All problems are collected and raised together as one :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import logging
import math
import os
import re
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..schedulers import ALIASES as SCHEDULER_ALIASES
from ..schedulers import SCHEDULERS, sampler_problem
from ..targets import PresetError, is_preset_file, read_preset
from .loss import HUBER_SCHEDULES, LOSS_TYPES, PREDICTION_ONLY, prediction_mismatch
from .optim import OptimizerError, check_optimizer_args, resolve_optimizer

__all__ = [
    "ConfigError",
    "Problem",
    "TrainConfig",
    "OptionSpec",
    "OPTIONS",
    "GROUPS",
    "BUILTIN_MODELS",
    "PRESETS",
    "LR_SCHEDULERS",
    "DEFAULT_MAX_TRAIN_STEPS",
    "load_config",
    "loads_config",
    "config_from_kwargs",
    "as_config",
]

logger = logging.getLogger(__name__)

GROUPS: tuple[str, ...] = ("model", "dataset", "network", "training", "saving", "sampling", "logging")
GROUP_TITLES = {
    "model": "Base model",
    "dataset": "Dataset, captions and caching",
    "network": "LoHA network",
    "training": "Training",
    "saving": "Saving",
    "sampling": "Sample images during training",
    "logging": "Logging",
}

BUILTIN_MODELS: tuple[str, ...] = ("tiny-sd1", "tiny-sd2", "tiny-sdxl", "toy-sd1")  # = sd_loha.models.TINY_MODELS
PRESETS: tuple[str, ...] = ("attn-only", "attn-mlp", "full")
LR_SCHEDULERS: tuple[str, ...] = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
DEFAULT_MAX_TRAIN_STEPS = 1600


#: kohya sd-scripts / LyCORIS option names that sd-loha does not use, with what to do instead.
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
}


# --------------------------------------------------------------------------------------------------
# Option metadata
# --------------------------------------------------------------------------------------------------

_KINDS = ("int", "float", "bool", "str", "path", "enum", "list", "numbers", "dict", "resolution", "warmup",
          "optimizer", "int_patterns", "float_patterns")
_STRINGY = ("str", "path", "enum", "optimizer")


@dataclass(frozen=True)
class OptionSpec:
    """Metadata of one option (attached to each TrainConfig field as ``metadata['spec']``)."""

    group: str
    kind: str
    help: str
    optional: bool = False  # None is a legal value (written as "not set")
    required: bool = False  # must be given (no usable default)
    choices: tuple[str, ...] = ()
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # min is exclusive
    max_open: bool = False  # max is exclusive
    multiple_of: int | None = None
    none_words: tuple[str, ...] = ()  # strings that mean "not set" (e.g. "auto")
    default_doc: str | None = None  # how the default reads in docs ("same as learning_rate")
    type_doc: str | None = None
    example: str | None = None  # a valid TOML value, used in fix hints
    file_suffix: str | None = None  # an enum that also takes a path ending in this (preset = "my.toml")
    name: str = ""
    default: Any = None

    def type_text(self) -> str:
        if self.type_doc:
            return self.type_doc
        return {
            "int": "integer",
            "float": "number",
            "bool": "boolean",
            "str": "string",
            "path": "path",
            "enum": "string",
            "list": "list of strings",
            "numbers": "list of numbers",
            "dict": "table",
            "resolution": 'integer, "W,H" or [W, H]',
            "warmup": "integer, or number < 1",
            "optimizer": "string",
            "int_patterns": 'table of regex = integer, or "regex=N,..."',
            "float_patterns": 'table of regex = number, or "regex=x,..."',
        }[self.kind]

    def range_text(self) -> str | None:
        lo, hi = self.min, self.max
        if lo is None and hi is None:
            return None
        if hi is None:
            return f"{'>' if self.min_open else '>='} {_num(lo)}"
        if lo is None:
            return f"{'<' if self.max_open else '<='} {_num(hi)}"
        return f"in {'(' if self.min_open else '['}{_num(lo)}, {_num(hi)}{')' if self.max_open else ']'}"

    def example_value(self) -> str:
        if self.example is not None:
            return self.example
        if self.default is not None and not isinstance(self.default, (list, dict, tuple)):
            return toml_value(self.default)
        return {
            "int": "1",
            "float": "1.0",
            "bool": "true",
            "list": '["..."]',
            "numbers": "[0, 1]",
            "dict": "{ weight_decay = 0.01 }",
            "resolution": "512",
            "warmup": "100",
        }.get(self.kind, '"..."')


def _num(x: float | None) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _opt(group: str, kind: str, default: Any = None, help: str = "", **kw: Any) -> Any:
    assert group in GROUPS and kind in _KINDS, (group, kind)
    spec = OptionSpec(group=group, kind=kind, help=" ".join(help.split()), **kw)
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


# --------------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """All training options. Build it with :func:`load_config`, :meth:`from_dict` or
    :func:`config_from_kwargs` (which parse and validate); direct construction does not validate
    until :meth:`validate` is called."""

    # ---- model ---------------------------------------------------------------------------------
    pretrained_model: str | None = _opt(
        "model", "path", None,
        "Base model: a local diffusers folder (with model_index.json), a single .safetensors/.ckpt "
        "checkpoint, a Hugging Face hub id (org/name), or a built-in model: toy-sd1 (a small SD 1.x pretrained on "
        "a procedural world of shapes, docs/toy-model.md) or the random-weight test models tiny-sd1, tiny-sd2, "
        "tiny-sdxl. SD 1.x, 2.x or SDXL is detected from the model.",
        required=True, type_doc="path, hub id or built-in name",
        example='"stable-diffusion-v1-5/stable-diffusion-v1-5"',
    )
    vae: str | None = _opt(
        "model", "path", None,
        "Replacement VAE: a file, a diffusers folder or a hub id (e.g. madebyollin/sdxl-vae-fp16-fix "
        "to avoid NaNs with an fp16 SDXL VAE). Not set: the model's own VAE.",
        optional=True, type_doc="path or hub id", example='"madebyollin/sdxl-vae-fp16-fix"',
    )
    clip_skip: int = _opt(
        "model", "int", 1,
        "Use the output of the N-th text-encoder layer from the end (1 = last layer, 2 = the usual "
        "choice for anime-style SD 1.x models). Samples use the same value.",
        min=1, max=12,
    )
    v_parameterization: bool | None = _opt(
        "model", "bool", None,
        "Train on v-prediction. Not set: detected from the model's scheduler (prediction_type), "
        "which is right for SD 2.x 768 models; set true/false only to override a wrong detection "
        "(\"auto\" also means not set).",
        optional=True, default_doc="auto-detect", none_words=("auto",),
    )

    # ---- dataset -------------------------------------------------------------------------------
    train_data_dir: str | None = _opt(
        "dataset", "path", None,
        "Folder of training images with same-name caption files (or metadata.jsonl); kohya "
        "'10_name' subfolders repeat their images 10 times per epoch. Searched recursively.",
        required=True, example='"data/my_style"',
    )
    caption_extension: str = _opt(
        "dataset", "str", ".txt",
        "Extension of the caption file next to each image.",
    )
    resolution: tuple[int, int] = _opt(
        "dataset", "resolution", (512, 512),
        "Training resolution, width and height (an integer for a square). With bucketing this sets the "
        "pixel area of every bucket. Multiples of 8. Stored as (width, height).",
        multiple_of=8, min=64, default_doc="`512`", example="512",
    )
    enable_bucket: bool = _opt(
        "dataset", "bool", True,
        "Aspect-ratio bucketing: group images by aspect ratio instead of resizing and cropping every image to "
        "resolution (center crop unless random_crop).",
    )
    min_bucket_reso: int = _opt(
        "dataset", "int", 256, "Smallest bucket side in pixels.", min=64, multiple_of=8,
    )
    max_bucket_reso: int = _opt(
        "dataset", "int", 1024, "Largest bucket side in pixels.", min=64, multiple_of=8,
    )
    bucket_reso_steps: int = _opt(
        "dataset", "int", 64,
        "Bucket sides are multiples of this (64 is what kohya and most UIs use; 32 gives more buckets).",
        min=8, multiple_of=8,
    )
    bucket_no_upscale: bool = _opt(
        "dataset", "bool", False,
        "Never upscale: an image smaller than its nearest bucket gets a bucket of its own size (shrunk to the "
        "resolution's area and max_bucket_reso, rounded down to bucket_reso_steps). Only with enable_bucket.",
    )
    random_crop: bool = _opt(
        "dataset", "bool", False, "Crop at a random position instead of the center when an image must be cropped.",
    )
    flip_aug: bool = _opt(
        "dataset", "bool", False,
        "Randomly flip images horizontally (do not use for asymmetric subjects or text).",
    )
    shuffle_caption: bool = _opt(
        "dataset", "bool", False,
        "Shuffle comma-separated caption tags every step (the first keep_tokens tags stay in place).",
    )
    keep_tokens: int = _opt(
        "dataset", "int", 0,
        "Number of leading comma-separated caption tags that shuffling and tag dropout never touch "
        "(the trigger word is kept in front anyway and does not count).",
        min=0,
    )
    caption_dropout_rate: float = _opt(
        "dataset", "float", 0.0,
        "Probability of training an image with an empty caption (helps the adapter work without its trigger).",
        min=0.0, max=1.0,
    )
    caption_tag_dropout_rate: float = _opt(
        "dataset", "float", 0.0,
        "Probability of dropping each comma-separated tag (except the first keep_tokens).",
        min=0.0, max=1.0, max_open=True,
    )
    trigger_word: str = _opt(
        "dataset", "str", "",
        "Word put in front of every caption that does not already contain it; never shuffled or tag-dropped "
        "(caption_dropout_rate still empties the whole caption; empty: none). Images without a caption file get "
        "just this.",
    )
    cache_latents: bool = _opt(
        "dataset", "bool", True,
        "Encode every image with the VAE once before training and keep the latents (both flips with flip_aug); "
        "much faster: the VAE then only runs for validation images and samples. random_crop turns caching off "
        "(a warning says so).",
    )
    cache_latents_to_disk: bool = _opt(
        "dataset", "bool", False,
        "Also store cached latents on disk (output_dir/.cache/latents) so later runs reuse them; an entry is "
        "reused while the image file (path, size, modification time), its bucket and crop, the flip and the VAE "
        "are unchanged. Needs cache_latents.",
    )
    cache_text_encoder_outputs: bool = _opt(
        "dataset", "bool", False,
        "Encode each caption once and reuse its text-encoder output (saves time, mostly for SDXL's two "
        "encoders). Needs train_text_encoder = false. caption_dropout_rate is fine (the empty caption is cached "
        "too); with shuffle_caption or caption_tag_dropout_rate captions change every step and are encoded per "
        "step instead.",
    )
    validation_split: float = _opt(
        "dataset", "float", 0.0,
        "Fraction of images held out to compute a validation loss (at least one, chosen by seed; 0 = no "
        "validation). Held-out images use no caption shuffling or dropout, no flip and no rank/module dropout.",
        min=0.0, max=0.5, max_open=True,
    )
    validation_every_n_steps: int | None = _opt(
        "dataset", "int", None,
        "Compute the validation loss every N steps. Not set: at the end of every epoch. Either way the final "
        "adapter's validation loss is computed at the end of the run. Needs validation_split > 0.",
        optional=True, min=1, default_doc="once per epoch", example="100",
    )
    reg_data_dir: str | None = _opt(
        "dataset", "path", None,
        "Folder of regularization (prior-preservation) images, laid out like train_data_dir (captions, kohya "
        "'10_name' repeat folders). As in kohya, an epoch holds as many regularization samples as training "
        "samples (images x repeats): the images join in order with their folder repeats until that count is "
        "reached (the rest are not used), and if one pass is short each gets one more repeat, in order, until it "
        "is; an epoch is then twice as long. Never used for validation. Their loss is multiplied by "
        "prior_loss_weight. Not set: no regularization.",
        optional=True, example='"data/reg_woman"',
    )
    prior_loss_weight: float = _opt(
        "dataset", "float", 1.0,
        "Multiplier of the loss of every regularization image (reg_data_dir); training images weigh 1 (kohya's "
        "prior_loss_weight).",
        min=0.0,
    )
    masked_loss: bool = _opt(
        "dataset", "bool", False,
        "Weight each latent pixel's loss by a mask from conditioning_data_dir (its red channel; white = 1, black "
        "= 0, grey = partial), or from each image's alpha channel with alpha_mask. The mask follows the image's "
        "resize, crop and flip and is area-averaged to the latents' size; the loss is mean(loss x mask) over the "
        "pixels, as kohya computes it (not divided by the mask's area).",
    )
    alpha_mask: bool = _opt(
        "dataset", "bool", False,
        "Use each image's alpha channel / 255 as its loss mask (kohya's alpha_mask; turns masked_loss on by "
        "itself, as in kohya). Images without transparency weigh 1 everywhere; regularization images use their "
        "alpha too. The pixels under transparency are still composited on white for the VAE.",
    )
    conditioning_data_dir: str | None = _opt(
        "dataset", "path", None,
        "Folder of loss masks for masked_loss: one image per training image with the same file name (any image "
        "extension), at the same path relative to train_data_dir or directly in this folder, the same size as its "
        "image; its red channel / 255 is the weight. A training image without a mask is an error (as in kohya); "
        "regularization images weigh 1 everywhere. Not set: no mask folder.",
        optional=True, example='"data/my_style_masks"',
    )

    # ---- network -------------------------------------------------------------------------------
    preset: str = _opt(
        "network", "enum", "attn-mlp",
        "Which layers get LoHA modules: attn-only (UNet attention projections), attn-mlp (attention and "
        "feed-forward layers of the transformer blocks, incl. proj_in/proj_out), full (also the ResNet blocks' "
        "convolutions and time-embedding projections and the down/upsampler convolutions; k x k convs only when "
        "conv_dim > 0). With train_text_encoder the text encoders' attention layers (attn-only) or attention and "
        "MLP layers (attn-mlp, full) are added. Or a LyCORIS preset file, a path ending in .toml (e.g. "
        "train_configs/presets/style_blocks.toml; docs/training.md): unet_target_module / "
        "text_encoder_target_module (block classes whose layers are adapted), unet_target_name / "
        "text_encoder_target_name (module paths, regular expressions matched from the start, or shell globs with "
        "use_fnmatch = true), exclude_name, enable_conv, and module_algo_map / name_algo_map tables of per-class / "
        "per-name dim, alpha and use_tucker (algo must be loha), with LyCORIS's kohya-network precedence.",
        choices=PRESETS, file_suffix=".toml", type_doc="string: a preset name or a .toml file",
    )
    network_dim: int = _opt(
        "network", "int", 8,
        "LoHA rank of linear and 1x1 conv layers (capacity grows like rank squared; 4-16 is typical).",
        min=1,
    )
    network_alpha: float = _opt(
        "network", "float", 4.0,
        "Scale numerator: the update is multiplied by network_alpha / network_dim. Lower = smaller "
        "effective learning rate; 1 to network_dim/2 is typical for LoHA.",
        min=0.0, min_open=True,
    )
    conv_dim: int = _opt(
        "network", "int", 0,
        "LoHA rank of k x k convolutions (0 = do not adapt k x k convs). They are in preset full, or added by "
        "network_include.",
        min=0,
    )
    conv_alpha: float = _opt(
        "network", "float", 1.0, "Scale numerator of k x k convolutions (conv_alpha / conv_dim).",
        min=0.0, min_open=True,
    )
    use_tucker: bool = _opt(
        "network", "bool", False,
        "Tucker decomposition for k x k convolutions (fewer parameters; only matters when conv_dim > 0).",
    )
    rank_dropout: float = _opt(
        "network", "float", 0.0,
        "Training only: in every forward pass each output row of a layer's update ΔW (one output feature or "
        "channel) is dropped with this probability, a fresh mask per pass, not rescaled. This is LyCORIS's "
        "rank_dropout: despite the name it drops rows of ΔW, not ranks of the factorisation.",
        min=0.0, max=1.0, max_open=True,
    )
    module_dropout: float = _opt(
        "network", "float", 0.0,
        "Training only: probability that a LoHA module is skipped (the layer runs unadapted) in a forward pass, "
        "drawn per module and per pass (so per micro-batch with gradient accumulation).",
        min=0.0, max=1.0, max_open=True,
    )
    dora_wd: bool = _opt(
        "network", "bool", False,
        "LyCORIS's weight decomposition for LoHA (DoRA; network_args dora_wd): each adapted weight becomes "
        "W' = (W + ΔW) · m / ‖W + ΔW‖, the norm along the axis wd_on_output names, with a trainable magnitude m "
        "that starts at ‖W‖ and is saved as each module's dora_scale. A strength s gives W + s·(W' − W), in "
        "sd-loha's loader, A1111 and ComfyUI alike. LyCORIS advises a smaller learning rate than plain LoHA.",
    )
    wd_on_output: bool = _opt(
        "network", "bool", False,
        "With dora_wd: false takes the norm per input column (dora_scale of shape (1, in[, 1, 1])), true per "
        "output row ((out, 1[, 1, 1]), LyCORIS's default). The default here is false because only those files "
        "load right everywhere: A1111 always normalises per input column, so an output-row dora_scale "
        "broadcasts into a full matrix and the pictures turn to noise, and ComfyUI divides an output-row "
        "dora_scale by the norm of the original weight instead of ‖W + ΔW‖ (docs/format.md, LyCORIS issue 246).",
    )
    use_scalar: bool = _opt(
        "network", "bool", False,
        "LyCORIS's use_scalar: ΔW is multiplied by a trainable scalar that starts at 0, so hada_w2_a starts "
        "random (N(0, 0.1)) instead of zero and both factor pairs learn from the first step, while ΔW still "
        "starts at 0. The file stores hada_w1_a · scalar (LyCORIS's layout), so every loader reads it as usual.",
    )
    network_include: list[str] = _opt(
        "network", "list", [],
        "Extra layers to adapt on top of the preset: shell-style patterns (* ? [...]) matched against the whole "
        "module path (down_blocks.0.attentions.0.proj_in) or the kohya name (lora_unet_down_blocks_0_...), so "
        "wrap a name part in * (empty: the preset alone).",
        example='["*.attn1.*"]',
    )
    network_exclude: list[str] = _opt(
        "network", "list", [],
        "Layers never adapted, even when the preset or network_include selects them: patterns as in "
        "network_include.",
        example='["*time_emb_proj"]',
    )
    network_reg_dims: dict[str, int] = _opt(
        "network", "int_patterns", {},
        "Block-wise ranks (kohya sd-scripts' network_reg_dims): regular expressions searched anywhere in each "
        "adapted module's name in the file (lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q, "
        "lora_te_text_model_encoder_layers_0_mlp_fc1; SDXL UNet: LDM names, lora_unet_output_blocks_2_1_...), as a "
        "table { 'up_blocks_1_.*attn' = 16 } or kohya's string \"pattern=rank,pattern=rank\". The first pattern "
        "in order that matches sets the module's rank (over network_dim / conv_dim and a preset file's dim); 0 "
        "leaves the module out; a k x k conv in the preset is adapted at its pattern's rank even with conv_dim = "
        "0. The module keeps its alpha (network_alpha, or conv_alpha for k x k convs), so its scale is alpha / "
        "its own rank, as in kohya. A pattern that matches no module the preset selects is an error.",
        min=0, example="{ 'up_blocks_.*attentions' = 16 }",
    )
    network_reg_lrs: dict[str, float] = _opt(
        "network", "float_patterns", {},
        "Block-wise learning rates (kohya sd-scripts' network_reg_lrs): patterns as in network_reg_dims, each with "
        "a learning rate that replaces unet_lr / text_encoder_lr for the modules it matches first: as in kohya, one "
        "optimizer param group per part and pattern i, named unet_reg_lr_i / text_encoder_reg_lr_i (logged as "
        "lr/unet_reg_lr_i), which the lr schedule scales like the others. A pattern that matches no adapted "
        "module is an error.",
        min=0.0, min_open=True, example="{ 'lora_te_' = 5e-5 }",
    )
    train_text_encoder: bool = _opt(
        "network", "bool", True,
        "Also put LoHA modules in the text encoder(s) (both CLIP encoders for SDXL) and train them.",
    )
    network_weights: str | None = _opt(
        "network", "path", None,
        "Start from an existing LoHA .safetensors file: its factors and its alpha values (the file's alpha "
        "wins over network_alpha and conv_alpha, as in kohya); its ranks and targets must match this network. "
        "To continue an interrupted run with its optimizer state, resume instead.",
        optional=True, example='"old/loha.safetensors"',
    )

    # ---- training ------------------------------------------------------------------------------
    output_dir: str | None = _opt(
        "training", "path", None,
        "Folder for the LoHA files, resumable states, samples and logs (created if missing). A folder "
        "that already holds this output_name's files is refused unless overwrite is true or you resume.",
        required=True, example='"output/my_style"',
    )
    output_name: str = _opt(
        "training", "str", "loha",
        "File name stem of the saved LoHA files (output_name.safetensors at the end; output_name-step000400 and "
        "output_name-epoch0002.safetensors for intermediate saves; output_name-step000123 when stopped early).",
    )
    train_batch_size: int = _opt("training", "int", 1, "Images per batch.", min=1)
    max_train_steps: int | None = _opt(
        "training", "int", None,
        f"Length of the run in optimizer steps. Defaults to {DEFAULT_MAX_TRAIN_STEPS} when max_train_epochs "
        "is not set. Set max_train_steps or max_train_epochs, not both.",
        optional=True, min=1, default_doc=f"`{DEFAULT_MAX_TRAIN_STEPS}` if max_train_epochs is not set",
        example="1600",
    )
    max_train_epochs: int | None = _opt(
        "training", "int", None,
        "Length of the run in epochs (one epoch = every image times its folder repeats). Set "
        "max_train_steps or max_train_epochs, not both.",
        optional=True, min=1, example="10",
    )
    learning_rate: float = _opt(
        "training", "float", 1e-4,
        "Base learning rate; unet_lr and text_encoder_lr default to it. Use about 1.0 with Prodigy.",
        min=0.0, min_open=True,
    )
    unet_lr: float | None = _opt(
        "training", "float", None, "Learning rate of the UNet modules. Not set: learning_rate.",
        optional=True, min=0.0, min_open=True, default_doc="learning_rate", example="2e-4",
    )
    text_encoder_lr: float | None = _opt(
        "training", "float", None,
        "Learning rate of the text-encoder modules. Not set: learning_rate (as in kohya). A lower value "
        "(e.g. a quarter of unet_lr) often generalises better.",
        optional=True, min=0.0, min_open=True, default_doc="learning_rate", example="5e-5",
    )
    optimizer_type: str = _opt(
        "training", "optimizer", "AdamW",
        "AdamW; kohya's AdamW8bit, PagedAdamW8bit, PagedAdamW, PagedAdamW32bit, Lion8bit, PagedLion8bit "
        "(bitsandbytes), Lion (lion-pytorch), Prodigy (prodigyopt); any torch.optim class (SGD, RAdam, ...; "
        "Adafactor is torch's, not kohya's transformers one); or an import path module.Class, e.g. "
        "torch.optim.RAdam or transformers.optimization.Adafactor. Names are case-insensitive, import paths are "
        "not. The class is imported when the config is checked, so a missing package fails before any model "
        "loads. bitsandbytes keeps tensors under 4096 elements (its min_8bit_size) in 32 bits, which includes "
        "the LoHA factors of small layers.",
    )
    optimizer_args: dict[str, Any] = _opt(
        "training", "dict", {},
        "Extra optimizer keyword arguments, as a TOML table ({ weight_decay = 0.01, betas = [0.9, 0.99] }) "
        "or kohya-style strings ([\"weight_decay=0.01\", \"betas=0.9,0.99\"]). Checked against the "
        "optimizer's signature, and tried on it, when the config is checked; lr is set by learning_rate.",
        example="{ weight_decay = 0.01 }",
    )
    lr_scheduler: str = _opt(
        "training", "enum", "constant", "Learning-rate schedule (diffusers' get_scheduler).",
        choices=LR_SCHEDULERS,
    )
    lr_warmup_steps: int | float = _opt(
        "training", "warmup", 0,
        "Warmup steps of the schedule; a number below 1 is a fraction of the run (0.05 = 5 %). "
        "The plain constant schedule ignores warmup: use constant_with_warmup.",
        min=0,
    )
    lr_scheduler_num_cycles: int = _opt(
        "training", "int", 1,
        "Number of cosine cycles of cosine_with_restarts (1 = a plain cosine decay, N = N - 1 restarts to the "
        "full rate).",
        min=1,
    )
    lr_scheduler_power: float = _opt(
        "training", "float", 1.0, "Power of the polynomial schedule.", min=0.0, min_open=True,
    )
    gradient_accumulation_steps: int = _opt(
        "training", "int", 1,
        "Batches accumulated per optimizer step (effective batch = train_batch_size x this).",
        min=1,
    )
    max_grad_norm: float = _opt(
        "training", "float", 1.0, "Gradient clipping norm (0 = no clipping).", min=0.0,
    )
    mixed_precision: str = _opt(
        "training", "enum", "no",
        "Precision of the frozen model and the forward pass: no (fp32), fp16 or bf16. The LoHA "
        "weights always train in fp32. bf16 needs a GPU that supports it (or runs, slowly, on the CPU); fp16 "
        "uses loss scaling.",
        choices=("no", "fp16", "bf16"), aliases={"fp32": "no", "float": "no", "float32": "no", "none": "no",
                                                 "float16": "fp16", "bfloat16": "bf16"},
    )
    gradient_checkpointing: bool = _opt(
        "training", "bool", False, "Trade compute for memory: recompute activations in the backward pass.",
    )
    seed: int = _opt("training", "int", 42,
                     "Random seed of the run (LoHA initialisation, noise and timesteps, shuffling, dropout).", min=0)
    min_snr_gamma: float | None = _opt(
        "training", "float", None,
        "Min-SNR-gamma loss weighting (5.0 is typical; speeds up convergence). Not set: off.",
        optional=True, min=0.0, min_open=True, default_doc="off", example="5.0",
    )
    debiased_estimation_loss: bool = _opt(
        "training", "bool", False,
        "Debiased estimation loss (kohya's debiased_estimation_loss, Yu et al. 2024): weights each sample's loss by "
        "1/sqrt(SNR) for ε-prediction, 1/(SNR + 1) for v-prediction, SNR = ᾱ_t/(1 - ᾱ_t) capped at 1000 as in "
        "kohya. Multiplies with the other weightings.",
    )
    scale_v_pred_loss_like_noise_pred: bool = _opt(
        "training", "bool", False,
        "Weights each sample's v-prediction loss by SNR/(SNR + 1) (SNR capped at 1000), bringing it to the size "
        "of an ε-prediction loss (kohya's scale_v_pred_loss_like_noise_pred). v-prediction models only.",
    )
    v_pred_like_loss: float | None = _opt(
        "training", "float", None,
        "Adds this times a v-prediction-like loss to an ε-prediction loss: each sample's loss is multiplied by "
        "1 + v_pred_like_loss x (SNR + 1)/SNR (SNR capped at 1000; kohya's v_pred_like_loss). ε-prediction models "
        "only. Not set: off.",
        optional=True, min=0.0, min_open=True, default_doc="off", example="0.1",
    )
    noise_offset: float = _opt(
        "training", "float", 0.0,
        "Noise offset: adds this times a random constant per image and channel to the noise (0.05-0.1 helps "
        "very dark/bright images; 0 = off).", min=0.0, max=1.0,
    )
    noise_offset_random_strength: bool = _opt(
        "training", "bool", False,
        "Draw the noise offset's strength uniformly from [0, noise_offset) once per batch instead of using "
        "noise_offset itself (kohya's noise_offset_random_strength). Needs noise_offset > 0.",
    )
    adaptive_noise_scale: float | None = _opt(
        "training", "float", None,
        "Adds this times the absolute mean of each latent channel to noise_offset, per image and channel, the sum "
        "clamped at 0 (kohya's adaptive_noise_scale; may be negative). Needs noise_offset > 0. Not set: off.",
        optional=True, min=-1.0, max=1.0, default_doc="off", example="0.00357",
    )
    multires_noise_iterations: int | None = _opt(
        "training", "int", None,
        "Multi-resolution (pyramid) noise with this many levels (kohya's multires_noise_iterations; 6-10 is "
        "usual): level i adds Gaussian noise drawn at the latent size divided by r^i (r random in [2, 4)), "
        "upsampled bilinearly and scaled by multires_noise_discount^i; the sum is divided by its standard "
        "deviation. Applied after noise_offset. Not set: off.",
        optional=True, min=1, default_doc="off", example="6",
    )
    multires_noise_discount: float = _opt(
        "training", "float", 0.3,
        "Weight decay per level of multi-resolution noise (kohya's multires_noise_discount; lower = the coarse "
        "levels count less). Only used with multires_noise_iterations.",
        min=0.0, max=1.0,
    )
    ip_noise_gamma: float | None = _opt(
        "training", "float", None,
        "Input perturbation (kohya's ip_noise_gamma, Ning et al. 2023; about 0.1): the UNet's input is noised "
        "with noise + ip_noise_gamma x N(0, 1) while the target stays the noise. Not set: off.",
        optional=True, min=0.0, min_open=True, default_doc="off", example="0.1",
    )
    ip_noise_gamma_random_strength: bool = _opt(
        "training", "bool", False,
        "Draw the input perturbation's strength uniformly from [0, ip_noise_gamma) once per batch (kohya's "
        "ip_noise_gamma_random_strength). Needs ip_noise_gamma.",
    )
    min_timestep: int | None = _opt(
        "training", "int", None,
        "Lowest training timestep (kohya's min_timestep): timesteps are drawn uniformly from [min_timestep, "
        "max_timestep); min_timestep = max_timestep trains at that one timestep. Not set: 0.",
        optional=True, min=0, max=999, default_doc="0", example="100",
    )
    max_timestep: int | None = _opt(
        "training", "int", None,
        "End of the training timestep range, exclusive (kohya's max_timestep). Not set: the model's number of "
        "training timesteps (1000 for SD).",
        optional=True, min=1, max=1000, default_doc="1000 (the model's)", example="900",
    )
    zero_terminal_snr: bool = _opt(
        "training", "bool", False,
        "Rescale the noise schedule's betas to zero terminal SNR (kohya's zero_terminal_snr; diffusers' "
        "rescale_betas_zero_snr, Lin et al. 2023): the last timestep is pure noise, so the model learns to "
        "make very dark and very bright images. v-prediction models only (v_parameterization, or detected from "
        "the model). Samples during training keep the model's own sampling schedule.",
    )
    loss_type: str = _opt(
        "training", "enum", "l2",
        "Loss: l2 (mean squared error), huber (pseudo-Huber, 2c(sqrt(d² + c²) - c): quadratic for errors below c, "
        "linear above, so outliers pull less) or smooth_l1 (the same divided by c: 2(sqrt(d² + c²) - c)). c comes "
        "from huber_c and huber_schedule.",
        choices=LOSS_TYPES, aliases={"mse": "l2", "smooth-l1": "smooth_l1"},
    )
    huber_c: float = _opt(
        "training", "float", 0.1,
        "The Huber/smooth-L1 parameter c (kohya's huber_c). huber_schedule constant: c itself; snr: the value c "
        "falls to at high noise; exponential: the value at the last timestep. Only used by loss_type huber and "
        "smooth_l1.",
        min=0.0, min_open=True,
    )
    huber_schedule: str = _opt(
        "training", "enum", HUBER_SCHEDULES[0],
        "How c depends on each sample's timestep t (kohya's huber_schedule): snr: c = (1 - huber_c)/(1 + σ)² + "
        "huber_c with σ = sqrt((1 - ᾱ_t)/ᾱ_t), about 1 at low noise and huber_c at high noise; exponential: c = "
        "huber_c^(t/T) x huber_scale (T: the model's number of training timesteps, 1000 for SD); constant: "
        "c = huber_c x huber_scale. Only used by loss_type huber and smooth_l1.",
        choices=HUBER_SCHEDULES,
    )
    huber_scale: float = _opt(
        "training", "float", 1.0,
        "Multiplier of c for huber_schedule exponential and constant (kohya's huber_scale; like kohya, the snr "
        "schedule does not use it).",
        min=0.0, min_open=True,
    )
    ema_decay: float | None = _opt(
        "training", "float", None,
        "Keep an exponential moving average of the LoHA weights with this decay (e.g. 0.999), with diffusers' "
        "warm-up: the first update copies the weights, update t after it uses min(ema_decay, (1 + t)/(10 + t)). "
        "The saved files, samples and validation loss "
        "use the average; training continues on the raw weights. Not set: no EMA.",
        optional=True, min=0.0, max=1.0, min_open=True, max_open=True, default_doc="off", example="0.999",
    )
    max_data_loader_n_workers: int = _opt(
        "training", "int", 0, "Data-loader worker processes (0 = load in the main process).", min=0,
    )

    # ---- saving --------------------------------------------------------------------------------
    save_every_n_steps: int | None = _opt(
        "saving", "int", None, "Save the LoHA every N steps. Not set: no step-based saves.",
        optional=True, min=1, default_doc="off", example="400",
    )
    save_every_n_epochs: int | None = _opt(
        "saving", "int", None, "Save the LoHA every N epochs. Not set: no epoch-based saves.",
        optional=True, min=1, default_doc="off", example="1",
    )
    save_last_n: int | None = _opt(
        "saving", "int", None,
        "Keep only the newest N intermediate step saves and the newest N epoch saves; the final file is always "
        "kept. Resumable states are kept to the newest N too (2 when not set). Not set: keep every adapter file.",
        optional=True, min=1, default_doc="keep all", example="4",
    )
    save_precision: str = _opt(
        "saving", "enum", "fp16", "Precision of the saved LoHA weights.",
        choices=("fp16", "bf16", "float"),
        aliases={"fp32": "float", "float32": "float", "float16": "fp16", "bfloat16": "bf16"},
    )
    save_state: bool = _opt(
        "saving", "bool", True,
        "Write a resumable training state (adapter, optimizer, scheduler, EMA, loss scaler, RNG, step) next to "
        "every intermediate save and at the end (see save_last_n). A run that is stopped early always writes one.",
    )
    overwrite: bool = _opt(
        "saving", "bool", False,
        "Allow writing into an output_dir that already holds this output_name's files (they get replaced).",
    )

    # ---- sampling ------------------------------------------------------------------------------
    sample_prompts: list[str] = _opt(
        "sampling", "list", [],
        "Prompts for sample images during training and at the end of the run (a single string is one prompt), "
        "each with kohya's per-prompt options after it: --n negative prompt, --w/--h size (rounded down to a "
        "multiple of 8, at least 64), --d seed, --l guidance scale, --s steps (1-1000), --ss sampler; what a prompt "
        "does not set comes from the sample_* options. An entry ending in .txt, .toml or .json is a kohya prompts "
        "file standing for its prompts: .txt one prompt a line (# comments and blank lines skipped), .toml a "
        "[prompt] table of shared settings with [[prompt.subset]] entries, .json a list of prompt lines or tables "
        "(keys prompt, negative_prompt, width, height, seed, sample_steps, scale, sample_sampler). Files are read "
        "and checked with the config, before any model loads.",
        example='["a cat, my_style --n blurry --d 7"]',
    )
    sample_negative_prompt: str = _opt(
        "sampling", "str", "", "Negative prompt used for every sample image.",
    )
    sample_strengths: list[float] = _opt(
        "sampling", "numbers", [0.0, 1.0],
        "Adapter strengths drawn side by side in every sample grid, one column each, the same prompts and seeds: "
        "0 is the base model (drawn once and reused), 1 the adapter as trained. At the end of the run "
        "samples/progress.png shows each sample step at the last of these strengths.",
        min=-2.0, max=2.0, example="[0, 0.5, 1]",
    )
    sample_every_n_steps: int | None = _opt(
        "sampling", "int", None, "Make samples every N steps. Not set: no step-based samples.",
        optional=True, min=1, default_doc="off", example="200",
    )
    sample_every_n_epochs: int | None = _opt(
        "sampling", "int", None, "Make samples every N epochs. Not set: no epoch-based samples.",
        optional=True, min=1, default_doc="off", example="1",
    )
    sample_at_first: bool = _opt(
        "sampling", "bool", False,
        "Also make a sample grid before the first training step (samples/at_first.png, the first in name order): "
        "the starting point, e.g. of network_weights. Not on a resumed run.",
    )
    sample_seed: int = _opt("sampling", "int", 1234,
                            "Seed of the sample images: prompt i uses sample_seed + i, the same at every sample step.",
                            min=0)
    sample_steps: int = _opt("sampling", "int", 20, "Denoising steps per sample image.", min=1)
    sample_guidance_scale: float = _opt(
        "sampling", "float", 7.0, "Classifier-free guidance scale of the samples.", min=0.0,
    )
    sample_width: int | None = _opt(
        "sampling", "int", None, "Sample width in pixels. Not set: the training resolution's width.",
        optional=True, min=64, multiple_of=8, default_doc="resolution width", example="512",
    )
    sample_height: int | None = _opt(
        "sampling", "int", None, "Sample height in pixels. Not set: the training resolution's height.",
        optional=True, min=64, multiple_of=8, default_doc="resolution height", example="512",
    )
    sample_sampler: str = _opt(
        "sampling", "enum", "euler_a",
        "Sampler of the sample images (see the sampler table below; kohya's k_* names are accepted).",
        choices=tuple(SCHEDULERS), aliases=SCHEDULER_ALIASES,  # the samplers of generation
    )

    # ---- logging -------------------------------------------------------------------------------
    logging_dir: str | None = _opt(
        "logging", "path", None, "Folder for training logs. Not set: output_dir/logs.",
        optional=True, default_doc="output_dir/logs", example='"logs"',
    )
    log_with: str = _opt(
        "logging", "enum", "auto",
        "Where to log the loss, the learning rates (lr, and lr/<group> per parameter group), the validation loss "
        "and every sample grid (as an image at its step): tensorboard (event files in logging_dir), wandb (Weights "
        "& Biases; its files in logging_dir; WANDB_MODE=offline logs without an account or network), all (both), "
        "none, or auto (tensorboard when it is installed, otherwise none).",
        choices=("auto", "tensorboard", "wandb", "all", "none"),
    )
    log_tracker_name: str = _opt(
        "logging", "str", "sd-loha",
        "Name of the run's log: the Weights & Biases project, and the TensorBoard subfolder of logging_dir.",
    )
    wandb_run_name: str | None = _opt(
        "logging", "str", None, "Name of the Weights & Biases run. Not set: wandb picks one.",
        optional=True, default_doc="wandb's", example='"my_style-v1"',
    )

    # ---- behaviour -----------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if self.max_train_steps is None and self.max_train_epochs is None:
            self.max_train_steps = DEFAULT_MAX_TRAIN_STEPS

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> "TrainConfig":
        """Parse and validate a flat or table-grouped mapping (same shape as the TOML file).

        ``None`` values mean "not set". Raises :class:`ConfigError` listing every problem."""
        return _build([_Layer.from_mapping(data, source)])

    def to_dict(self, *, grouped: bool = False, include_none: bool = True) -> dict[str, Any]:
        """Plain-Python copy of the options (lists instead of tuples), flat or grouped by table."""
        out: dict[str, Any] = {}
        for spec in OPTIONS.values():
            v = getattr(self, spec.name)
            if v is None and not include_none:
                continue
            v = _plain(v)
            if grouped:
                out.setdefault(spec.group, {})[spec.name] = v
            else:
                out[spec.name] = v
        return out

    def to_toml(self, *, comments: bool = False) -> str:
        """The config as TOML, grouped in tables; ``load_config`` of it gives back an equal config.

        Options that are not set (None) are left out (with ``comments=True`` they appear commented,
        and every option gets its help text as a comment)."""
        lines = ["# sd-loha training config (options: docs/config.md)"]
        for group in GROUPS:
            lines += ["", f"[{group}]"]
            for spec in OPTIONS.values():
                if spec.group != group:
                    continue
                v = getattr(self, spec.name)
                if comments:
                    lines += ["# " + t for t in textwrap.wrap(spec.help, 98)]
                if v is None:
                    if comments:
                        lines.append(f"# {spec.name} = {spec.example_value()}")
                    continue
                if spec.kind == "resolution" and v[0] == v[1]:
                    v = v[0]
                lines.append(f"{spec.name} = {toml_value(v)}")
        return "\n".join(lines) + "\n"

    def validate(self) -> list[str]:
        """Check every option and every cross-option rule, normalising values in place (enum case,
        resolution to (w, h), ...). Returns the warnings; raises :class:`ConfigError` on errors."""
        problems: list[Problem] = []
        bad: set[str] = set()
        origins = getattr(self, "_origins", {})
        for spec in OPTIONS.values():
            v = getattr(self, spec.name)
            if v is None:
                continue
            try:
                setattr(self, spec.name, _coerce(spec, v))
            except _Bad as e:
                problems.append(Problem(origins.get(spec.name), e.message, e.fix))
                bad.add(spec.name)
        warns: list[str] = []
        problems += _cross_check(self, origins, bad, warns)
        if problems:
            raise ConfigError(problems)
        self._warnings = warns
        return list(warns)

    @property
    def warnings(self) -> list[str]:
        """Warnings found by the last validation (not errors: training can run)."""
        return list(getattr(self, "_warnings", []))

    # ---- resolved values for the trainer ------------------------------------------------------
    @property
    def effective_unet_lr(self) -> float:
        return self.unet_lr if self.unet_lr is not None else self.learning_rate

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate

    @property
    def sample_size(self) -> tuple[int, int]:
        """(width, height) of sample images."""
        return (self.sample_width or self.resolution[0], self.sample_height or self.resolution[1])

    @property
    def effective_logging_dir(self) -> str:
        return self.logging_dir if self.logging_dir is not None else os.path.join(self.output_dir or ".", "logs")

    def warmup_steps_for(self, total_steps: int) -> int:
        """lr_warmup_steps as a step count (a value below 1 is a fraction of total_steps)."""
        w = self.lr_warmup_steps
        if isinstance(w, float) and w < 1:
            return int(round(w * total_steps))
        return int(w)


def _build_options() -> dict[str, OptionSpec]:
    out = {}
    for f in dataclasses.fields(TrainConfig):
        spec: OptionSpec = f.metadata["spec"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = dataclasses.replace(spec, name=f.name, default=default)
    return out


#: option name -> metadata, in definition (and documentation) order
OPTIONS: dict[str, OptionSpec] = _build_options()

#: options of which at most one may be set; a higher layer (file over base, --set over file) that
#: sets one of them unsets the other from the lower layers.
_EXCLUSIVE_PAIRS = (("max_train_steps", "max_train_epochs"),)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


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


class _Bad(Exception):
    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix


def _show(v: Any) -> str:
    """A value as it appears in error messages: strings in single quotes, the rest as TOML."""
    if isinstance(v, str):
        return repr(v) if "'" not in v else '"' + v.replace('"', '\\"') + '"'
    try:
        return toml_value(v)
    except TypeError:
        return repr(v)


def _suggest(word: str, candidates: Iterable[str]) -> str | None:
    cands = list(candidates)
    lower = {c.lower(): c for c in cands}
    hit = difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=0.6)
    return lower[hit[0]] if hit else None


def _unknown_option(key: str, table: bool = False) -> tuple[str, str | None]:
    what = f"unknown table [{key}]" if table else f"unknown option '{key}'"
    if key in KOHYA_HINTS:
        return what, KOHYA_HINTS[key]
    pool = list(OPTIONS) + (list(GROUPS) if table else [])
    s = _suggest(key, pool)
    if s:
        return f"{what} (did you mean '{s}'?)", None
    if table:
        return what, f"tables are optional; the known ones are {', '.join(GROUPS)}"
    return what, "see docs/config.md for the list of options"


# --------------------------------------------------------------------------------------------------
# Coercion of one value
# --------------------------------------------------------------------------------------------------


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _coerce(spec: OptionSpec, v: Any) -> Any:
    """Check the type of a (non-None) value and normalise it; raises _Bad."""
    k, name = spec.kind, spec.name
    if isinstance(v, str) and v.strip().lower() in spec.none_words:
        return None
    if k == "int":
        if _is_num(v) and math.isfinite(v) and float(v).is_integer():
            v = int(v)
        else:
            fix = f"write a whole number without quotes, e.g. {name} = {spec.example_value()}"
            raise _Bad(f"{name} must be an integer, got {_show(v)}", fix)
    elif k == "float":
        if not _is_num(v):
            fix = f"write a number without quotes, e.g. {name} = {spec.example_value()}"
            raise _Bad(f"{name} must be a number, got {_show(v)}", fix)
        v = float(v)
        if not math.isfinite(v):
            raise _Bad(f"{name} must be a finite number, got {_show(v)}")
    elif k == "bool":
        if not isinstance(v, bool):
            fix = f"write {name} = true or {name} = false (no quotes)"
            raise _Bad(f"{name} must be true or false, got {_show(v)}", fix)
    elif k in ("str", "optimizer", "enum"):
        if not isinstance(v, str):
            raise _Bad(f"{name} must be a string, got {_show(v)}", f'put it in quotes, e.g. {name} = "{_plain_str(v)}"')
        if k == "enum":
            v = _canonical_choice_or_file(spec, v)
        elif k == "optimizer":
            v = _canonical_optimizer(v)
    elif k == "path":
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if not isinstance(v, str):
            raise _Bad(
                f"{name} must be a path (a string), got {_show(v)}",
                f"put it in quotes, e.g. {name} = {spec.example_value()}",
            )
    elif k == "list":
        if isinstance(v, str):
            v = [v] if v else []
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise _Bad(
                f"{name} must be a list of strings, got {_show(v)}",
                f"write e.g. {name} = {spec.example_value()}",
            )
        v = list(v)
    elif k == "numbers":
        v = _coerce_numbers(spec, v)
    elif k == "dict":
        v = _coerce_dict(spec, v)
    elif k in ("int_patterns", "float_patterns"):
        v = _coerce_patterns(spec, v, integer=k == "int_patterns")
    elif k == "resolution":
        v = _coerce_resolution(spec, v)
    elif k == "warmup":
        if _is_num(v) and math.isfinite(v) and v >= 0:
            if float(v).is_integer():
                v = int(v)
            elif v > 1:
                raise _Bad(
                    f"{name} must be a whole number of steps or a fraction below 1, got {_show(v)}",
                    f"write e.g. {name} = 100 (steps) or {name} = 0.05 (5 % of the run)",
                )
            else:
                v = float(v)
        else:
            raise _Bad(
                f"{name} must be a number of steps (>= 0) or a fraction below 1, got {_show(v)}",
                f"write e.g. {name} = 100 or {name} = 0.05",
            )
    _check_range(spec, v)
    return v


def _plain_str(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _coerce_numbers(spec: OptionSpec, v: Any) -> list[float]:
    """A list of finite numbers; "0, 0.5, 1" (the CLI's --set, a form field) reads as [0, 0.5, 1]."""
    if isinstance(v, str):
        try:
            v = [float(x) for x in v.replace(",", " ").split()]
        except ValueError:
            raise _Bad(f"{spec.name} must be a list of numbers, got {_show(v)}",
                       f"write e.g. {spec.name} = {spec.example_value()}") from None
    if not isinstance(v, (list, tuple)) or not v or not all(_is_num(x) and math.isfinite(x) for x in v):
        raise _Bad(f"{spec.name} must be a non-empty list of numbers, got {_show(v)}",
                   f"write e.g. {spec.name} = {spec.example_value()}")
    out = [float(x) for x in v]
    for x in out:
        _check_range(spec, x)
    return out


def _check_range(spec: OptionSpec, v: Any) -> None:
    if not _is_num(v):
        return
    lo, hi = spec.min, spec.max
    bad = (
        (lo is not None and (v <= lo if spec.min_open else v < lo))
        or (hi is not None and (v >= hi if spec.max_open else v > hi))
    )
    if bad:
        raise _Bad(f"{spec.name} must be {spec.range_text()}, got {_show(v)}")
    if spec.multiple_of and spec.kind == "int" and v % spec.multiple_of:
        m = spec.multiple_of
        near = max(m, int(round(v / m)) * m)
        raise _Bad(f"{spec.name} must be a multiple of {m}, got {v}", f"use {near}")


def _canonical_choice(spec: OptionSpec, v: str) -> str:
    low = v.strip().lower()
    for c in spec.choices:
        if c.lower() == low:
            return c
    for a, c in spec.aliases.items():
        if a.lower() == low:
            return c
    s = _suggest(v, list(spec.choices) + list(spec.aliases))
    s = spec.aliases.get(s, s) if s else None
    msg = f"{spec.name} must be one of {', '.join(spec.choices)}; got {_show(v)}"
    if s:
        msg += f" (did you mean '{s}'?)"
    raise _Bad(msg)


def _canonical_choice_or_file(spec: OptionSpec, v: str) -> str:
    if spec.file_suffix and v.strip().lower().endswith(spec.file_suffix):
        return v.strip()  # a file: read by the cross-option checks, where its problems are reported
    try:
        return _canonical_choice(spec, v)
    except _Bad as e:
        if not spec.file_suffix:
            raise
        raise _Bad(e.message, f"or give a {spec.name} file, a path ending in {spec.file_suffix}") from None


def _canonical_optimizer(v: str) -> str:
    try:
        return resolve_optimizer(v).name  # imports the class's package now, not after the model loaded
    except OptimizerError as e:
        raise _Bad(e.message, e.fix) from None


def _parse_literal(text: str) -> Any:
    """A TOML literal (number, bool, string, array, inline table); raises ValueError."""
    try:
        doc = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError as e:
        raise ValueError(str(e)) from None
    if set(doc) != {"v"}:
        raise ValueError("more than one value")
    return doc["v"]


def _coerce_dict(spec: OptionSpec, v: Any) -> dict[str, Any]:
    if isinstance(v, str):
        v = [v] if v.strip() else []
    if isinstance(v, Mapping):
        bad_keys = [k for k in v if not isinstance(k, str)]
        if bad_keys:
            raise _Bad(f"{spec.name} keys must be strings, got {_show(bad_keys[0])}")
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        out: dict[str, Any] = {}
        for item in v:
            if not isinstance(item, str) or "=" not in item:
                raise _Bad(
                    f"{spec.name} entries must be \"key=value\" strings, got {_show(item)}",
                    f"write {spec.name} = {{ weight_decay = 0.01 }} or {spec.name} = [\"weight_decay=0.01\"]",
                )
            key, _, text = item.partition("=")
            key = key.strip()
            if not key.isidentifier():
                raise _Bad(f"{spec.name}: '{key}' is not a valid argument name")
            out[key] = _parse_arg_value(text.strip())
        return out
    raise _Bad(
        f"{spec.name} must be a table of optimizer arguments, got {_show(v)}",
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
                raise _Bad(f"{spec.name} entries must be \"pattern=value\", got {_show(item)}", fix)
            key, _, text = item.rpartition("=")
            try:
                pairs[key.strip()] = float(text)
            except ValueError:
                raise _Bad(f"{spec.name}: the value of {_show(key.strip())} must be {what}, got {_show(text.strip())}",
                           fix) from None
        v = pairs
    if not isinstance(v, Mapping):
        raise _Bad(f"{spec.name} must be a table of regular expression = value ({what}), got {_show(v)}", fix)
    out: dict[str, int | float] = {}
    for pattern, x in v.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise _Bad(f"{spec.name}: {_show(pattern)} is not a regular expression ({e})",
                       "escape a literal character with a backslash (\\. for a dot, in a TOML literal string '...')") from None
        if not _is_num(x) or not math.isfinite(x) or (integer and not float(x).is_integer()):
            raise _Bad(f"{spec.name}: the value of {_show(pattern)} must be {what}, got {_show(x)}", fix)
        try:
            _check_range(spec, x)
        except _Bad as e:
            raise _Bad(f"{e.message} (pattern {_show(pattern)})", fix) from None
        out[pattern] = int(x) if integer else float(x)
    return out


def _parse_arg_value(text: str) -> Any:
    """kohya-style optimizer argument value: a TOML/Python literal, a comma list, or a bare string."""
    for t in (text, text.replace("True", "true").replace("False", "false")):
        try:
            return _parse_literal(t)
        except ValueError:
            pass
        if "," in t:
            try:
                return _parse_literal("[" + t.strip("()[] ") + "]")
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
            raise _Bad(f"{spec.name} must be a size in pixels, got {_show(v)}", fix) from None
    elif _is_num(v):
        wh = [v]
    elif isinstance(v, (list, tuple)):
        wh = list(v)
    else:
        raise _Bad(f"{spec.name} must be a size in pixels, got {_show(v)}", fix)
    if len(wh) == 1:
        wh = wh * 2
    if len(wh) != 2 or not all(_is_num(x) and float(x).is_integer() for x in wh):
        raise _Bad(f"{spec.name} must be one or two whole numbers (width, height), got {_show(v)}", fix)
    w, h = (int(x) for x in wh)
    for side in (w, h):
        if side < 64 or side % 8:
            near = max(64, int(round(side / 8)) * 8)
            raise _Bad(
                f"{spec.name} sides must be multiples of 8 and at least 64, got {_show(v)}",
                f"use e.g. {near}",
            )
    return (w, h)


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


# --------------------------------------------------------------------------------------------------
# Layers: base dict < TOML file < --set overrides
# --------------------------------------------------------------------------------------------------


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
            layer.problems.append(Problem(source, f"expected a table of options, got {_show(data)}"))
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
                    Problem(where, f"expected key=value, got {_show(raw)}", "write e.g. --set max_train_steps=500")
                )
                continue
            head, dot, tail = key.partition(".")
            if dot and head in GROUPS:
                key = tail
                head, dot, tail = key.partition(".")
            if dot and head == "optimizer_args" and tail.isidentifier():
                try:
                    layer.arg_updates[tail] = _parse_literal(text.strip())
                except ValueError:
                    layer.arg_updates[tail] = _parse_arg_value(text.strip())
                layer.arg_where = where
                continue
            if key not in OPTIONS:
                msg, fix = _unknown_option(key)
                layer.problems.append(Problem(where, msg, fix))
                continue
            layer.values[key] = parse_option_text(OPTIONS[key], text)
            layer.where[key] = where
        return layer


def parse_option_text(spec: OptionSpec, text: str) -> Any:
    """One option's value from its text, as `--set NAME=TEXT` reads it (the web UI's text widgets use it too)."""
    t = text.strip()
    if spec.optional and t.lower() in ("none", "null", "", *spec.none_words):
        return None
    if spec.kind == "bool" and t.lower() in ("true", "false"):
        return t.lower() == "true"
    try:
        v = _parse_literal(t)
    except ValueError:
        v = t
        if spec.kind in ("float", "int", "warmup") and t:
            try:
                v = float(t)  # ".5", "1E-4" and friends that TOML rejects
            except ValueError:
                v = t
        return v
    if spec.kind in _STRINGY and not isinstance(v, str):
        return t  # output_name=2024, trigger_word=true: the text itself
    return v


def _merge(layers: Sequence[_Layer]) -> tuple[dict[str, Any], dict[str, str | None], list[Problem]]:
    merged: dict[str, Any] = {}
    where: dict[str, str | None] = {}
    problems: list[Problem] = []
    for layer in layers:
        problems += layer.problems
        for a, b in _EXCLUSIVE_PAIRS:
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
                base = _coerce_dict(OPTIONS["optimizer_args"], base)
            except _Bad as e:
                problems.append(Problem(where.get("optimizer_args"), e.message, e.fix))
                base = {}
            merged["optimizer_args"] = {**base, **layer.arg_updates}
            where["optimizer_args"] = layer.arg_where
    return merged, where, problems


def _build(layers: Sequence[_Layer]) -> TrainConfig:
    merged, where, problems = _merge(layers)
    values: dict[str, Any] = {}
    bad: set[str] = set()
    for key, raw in merged.items():
        try:
            values[key] = _coerce(OPTIONS[key], raw)
        except _Bad as e:
            problems.append(Problem(where.get(key), e.message, e.fix))
            bad.add(key)
    cfg = TrainConfig(**values)
    cfg._origins = dict(where)  # type: ignore[attr-defined]
    warns: list[str] = []
    problems += _cross_check(cfg, where, bad, warns)
    if problems:
        raise ConfigError(problems)
    cfg._warnings = warns  # type: ignore[attr-defined]
    for w in warns:
        logger.warning("config: %s", w)
    return cfg


def tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def _sample_prompt_problems(cfg: TrainConfig) -> list[tuple[str, str | None]]:
    """A prompts file that cannot be read or a per-prompt option that is wrong (naming the file and line), or a
    prompt's --ss/--s that its sampler cannot run."""
    from .prompts import PromptError, prompt_entries

    try:
        entries = prompt_entries(cfg)
    except PromptError as e:
        return [(str(e) if e.where.startswith("sample_prompts") else f"sample_prompts: {e}", e.fix)]
    out = []
    for n, e in enumerate(entries, 1):
        if e.sampler is None and e.steps is None:
            continue  # sample_sampler with sample_steps is checked on its own
        problem = sampler_problem(e.sampler or cfg.sample_sampler, e.steps or cfg.sample_steps)
        if problem:
            out.append((f"sample_prompts: prompt {n} ({_show(e.prompt)}): {problem[0]}", problem[1]))
    return out


# --------------------------------------------------------------------------------------------------
# Cross-option rules
# --------------------------------------------------------------------------------------------------

#: documentation of the rules _cross_check enforces (kept next to the code that enforces them)
CHECKS_DOC: tuple[tuple[str, str], ...] = (
    ("error", "pretrained_model, train_data_dir and output_dir must be set."),
    ("error", "max_train_steps and max_train_epochs are both set (a later layer setting one unsets the other)."),
    ("error", "cache_text_encoder_outputs = true while train_text_encoder = true."),
    ("error", "optimizer_type names no optimizer class, or its package is not installed (it is imported while the "
              "config is checked)."),
    ("error", "optimizer_args that the optimizer class does not take (its signature) or refuses (it is built once on a "
              "dummy parameter), and lr or params in optimizer_args."),
    ("error", "sample_sampler needs a package that is not installed (lms: scipy), or more sample_steps than "
              "given (pndm: 4)."),
    ("error", 'log_with = "tensorboard" or "all" while tensorboard is not installed; "wandb" or "all" while wandb '
              "is not installed."),
    ("error", "sample_prompts names a prompts file (.txt/.toml/.json) that is missing or unreadable, or a prompt "
              "carries an unknown or malformed --option (the message names the file and line); a prompt's --ss/--s "
              "that its sampler cannot run (as for sample_sampler)."),
    ("error", "cache_latents_to_disk = true while cache_latents = false."),
    ("error", "min_bucket_reso > max_bucket_reso, or either is not a multiple of bucket_reso_steps."),
    ("error", "with enable_bucket, a side of resolution outside [min_bucket_reso, max_bucket_reso]."),
    ("error", "output_name is empty, holds a path separator, or ends in .safetensors."),
    ("error", "caption_extension does not start with a dot."),
    ("error", "preset names a .toml file that does not exist, is not valid TOML, or holds a key or value sd-loha "
              "cannot honour (another algo than loha, LoKr's factor, DoRA per entry, the generic wrapper's "
              "target_module, a bad regular expression)."),
    ("error", "masked_loss = true without a mask source (conditioning_data_dir or alpha_mask), or both "
              "alpha_mask and conditioning_data_dir set."),
    ("error", "adaptive_noise_scale set while noise_offset = 0 (kohya: adaptive_noise_scale requires noise_offset)."),
    ("error", "min_timestep > max_timestep."),
    ("error", "zero_terminal_snr or scale_v_pred_loss_like_noise_pred with v_parameterization = false, or "
              "v_pred_like_loss with v_parameterization = true; with v_parameterization not set, the same is "
              "checked against the model's prediction type when it loads, and past the model's number of timesteps "
              "for min_timestep/max_timestep."),
    ("warning", "cache_latents with random_crop: every step crops a different region, so latents are "
                "not cached."),
    ("warning", "cache_text_encoder_outputs with shuffle_caption or caption_tag_dropout_rate: captions "
                "change every step, so their text-encoder outputs cannot be cached (caption_dropout_rate "
                "alone is fine)."),
    ("warning", "lr_warmup_steps > 0 with lr_scheduler = constant (which ignores warmup)."),
    ("warning", "lr_warmup_steps >= max_train_steps."),
    ("warning", "conv_dim > 0 with preset attn-only or attn-mlp, or use_tucker with conv_dim = 0 (no effect)."),
    ("warning", "network_alpha > network_dim (updates scaled up; divergence risk)."),
    ("warning", "wd_on_output = true without dora_wd (no effect), or with dora_wd (A1111 and ComfyUI load such "
                "files wrong)."),
    ("warning", "text_encoder_lr set while train_text_encoder = false."),
    ("warning", "keep_tokens > 0 without shuffle_caption or caption_tag_dropout_rate (no effect)."),
    ("warning", "validation_every_n_steps set while validation_split = 0."),
    ("warning", "save_last_n set without save_every_n_steps/epochs; save_every_n_steps > max_train_steps."),
    ("warning", "sample_prompts without sample_every_n_steps/epochs, or the reverse."),
    ("warning", "conditioning_data_dir set without masked_loss (no effect); prior_loss_weight other than 1 without "
                "reg_data_dir (no effect)."),
    ("warning", "noise_offset_random_strength while noise_offset = 0, ip_noise_gamma_random_strength without "
                "ip_noise_gamma, multires_noise_discount changed without multires_noise_iterations (no effect)."),
)


_REQUIRED_WHAT = {
    "pretrained_model": "the base model to train on",
    "train_data_dir": "the folder of training images",
    "output_dir": "where the LoHA files are written",
}


def _cross_check(cfg: TrainConfig, where: Mapping[str, str | None], bad: set[str], warns: list[str]) -> list[Problem]:
    problems: list[Problem] = []

    def loc(*keys: str) -> str | None:
        seen = []
        for k in keys:
            w = where.get(k)
            if w and w not in seen:
                seen.append(w)
        return " and ".join(seen) or None

    def ok(*keys: str) -> bool:
        return not (set(keys) & bad)

    def err(keys: tuple[str, ...], msg: str, fix: str | None = None) -> None:
        if ok(*keys):
            problems.append(Problem(loc(*keys), msg, fix))

    def warn(keys: tuple[str, ...], msg: str) -> None:
        if ok(*keys):
            warns.append(msg)

    for name in ("pretrained_model", "train_data_dir", "output_dir"):
        if name in bad:
            continue
        if getattr(cfg, name) in (None, ""):
            spec = OPTIONS[name]
            problems.append(
                Problem(None, f"missing required option {name} ({_REQUIRED_WHAT[name]})",
                        f"add {name} = {spec.example_value()} to the config file (under [{spec.group}] or at the "
                        f"top) or pass --set {name}=...")
            )

    if cfg.max_train_steps is not None and cfg.max_train_epochs is not None:
        err(("max_train_steps", "max_train_epochs"),
            f"max_train_steps ({cfg.max_train_steps}) and max_train_epochs ({cfg.max_train_epochs}) are both set",
            "keep only one: the run length is given either in steps or in epochs")

    if cfg.cache_text_encoder_outputs and cfg.train_text_encoder:
        err(("cache_text_encoder_outputs", "train_text_encoder"),
            "cache_text_encoder_outputs = true needs a frozen text encoder, but train_text_encoder = true",
            "set train_text_encoder = false, or cache_text_encoder_outputs = false")

    if ok("sample_sampler", "sample_steps"):
        problem = sampler_problem(cfg.sample_sampler, cfg.sample_steps)
        if problem:
            err(("sample_sampler", "sample_steps"),
                f"sample_sampler = {cfg.sample_sampler!r} with sample_steps = {cfg.sample_steps}: {problem[0]}",
                problem[1])

    if cfg.log_with in ("tensorboard", "all") and not tensorboard_installed():
        err(("log_with",), f'log_with = "{cfg.log_with}" but tensorboard is not installed',
            'pip install tensorboard, or log_with = "auto" (TensorBoard when installed) or "none"')
    if cfg.log_with in ("wandb", "all") and not wandb_installed():
        err(("log_with",), f'log_with = "{cfg.log_with}" but wandb is not installed',
            'install it (pip install wandb), or set log_with = "tensorboard" or "none"')

    if ok("sample_prompts", "sample_sampler", "sample_steps"):
        for msg, fix in _sample_prompt_problems(cfg):
            err(("sample_prompts",), msg, fix)

    if cfg.optimizer_args and ok("optimizer_type", "optimizer_args", "learning_rate"):
        try:
            check_optimizer_args(resolve_optimizer(cfg.optimizer_type), cfg.optimizer_args, cfg.learning_rate)
        except OptimizerError as e:
            err(("optimizer_type", "optimizer_args"), e.message, e.fix)

    if cfg.cache_latents_to_disk and not cfg.cache_latents:
        err(("cache_latents_to_disk", "cache_latents"),
            "cache_latents_to_disk = true needs cache_latents = true",
            "set cache_latents = true, or cache_latents_to_disk = false")

    if ok("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        lo, hi, step = cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps
        if lo > hi:
            err(("min_bucket_reso", "max_bucket_reso"),
                f"min_bucket_reso ({lo}) is larger than max_bucket_reso ({hi})", "swap them")
        for name, v in (("min_bucket_reso", lo), ("max_bucket_reso", hi)):
            if v % step:
                near = max(step, int(round(v / step)) * step)
                err((name, "bucket_reso_steps"),
                    f"{name} ({v}) is not a multiple of bucket_reso_steps ({step})", f"use {name} = {near}")
        if cfg.enable_bucket and ok("resolution", "enable_bucket") and lo <= hi:
            w, h = cfg.resolution
            if min(w, h) < lo or max(w, h) > hi:
                err(("resolution", "min_bucket_reso", "max_bucket_reso"),
                    f"resolution {w}x{h} does not fit the bucket range {lo}-{hi}",
                    f"set min_bucket_reso <= {min(w, h)} and max_bucket_reso >= {max(w, h)}")

    if ok("output_name"):
        n = cfg.output_name
        if not n.strip():
            err(("output_name",), "output_name is empty", 'write e.g. output_name = "my_style"')
        elif any(c in n for c in '/\\:') or n in (".", ".."):
            err(("output_name",), f"output_name {_show(n)} must be a file name stem, not a path",
                "put the folder in output_dir and only the name in output_name")
        elif n.lower().endswith((".safetensors", ".ckpt", ".pt")):
            stem = n.rsplit(".", 1)[0]
            err(("output_name",), f"output_name {_show(n)} must not include the file extension",
                f'write output_name = "{stem}"')

    if ok("caption_extension") and not cfg.caption_extension.startswith("."):
        err(("caption_extension",), f"caption_extension {_show(cfg.caption_extension)} must start with a dot",
            f'write caption_extension = ".{cfg.caption_extension}"')

    if ok("preset") and is_preset_file(cfg.preset):
        try:
            read_preset(cfg.preset)
        except PresetError as e:
            err(("preset",), e.message, e.fix)

    if cfg.masked_loss and not cfg.alpha_mask and not cfg.conditioning_data_dir:
        err(("masked_loss",), "masked_loss = true needs masks, but neither conditioning_data_dir nor alpha_mask is set",
            "set conditioning_data_dir to the folder of mask images, or alpha_mask = true to use the images' alpha")
    if cfg.alpha_mask and cfg.conditioning_data_dir:
        err(("alpha_mask", "conditioning_data_dir"),
            "alpha_mask = true and conditioning_data_dir are both set: the loss mask has one source",
            "keep alpha_mask (masks from the images' alpha) or conditioning_data_dir (a folder of mask images)")

    if cfg.adaptive_noise_scale is not None and not cfg.noise_offset:
        err(("adaptive_noise_scale", "noise_offset"),
            "adaptive_noise_scale is set but noise_offset = 0: it scales the noise offset, which is off",
            "set noise_offset (e.g. 0.0357), or remove adaptive_noise_scale")
    if cfg.min_timestep is not None and cfg.max_timestep is not None and cfg.min_timestep > cfg.max_timestep:
        err(("min_timestep", "max_timestep"),
            f"min_timestep ({cfg.min_timestep}) is larger than max_timestep ({cfg.max_timestep})",
            "swap them; timesteps are drawn from min_timestep up to max_timestep - 1")
    if cfg.v_parameterization is not None and ok("v_parameterization"):
        kind = "v_prediction" if cfg.v_parameterization else "epsilon"
        for name in PREDICTION_ONLY:
            bad_pair = getattr(cfg, name) and prediction_mismatch(
                name, kind, f"v_parameterization = {str(cfg.v_parameterization).lower()}")
            if bad_pair:
                err((name, "v_parameterization"), *bad_pair)

    # ---- warnings -----------------------------------------------------------------------------
    if cfg.cache_latents and cfg.random_crop:
        warn(("cache_latents", "random_crop"),
             "cache_latents with random_crop: every step crops a different region, so latents are not "
             "cached (slower); set random_crop = false to cache them")
    if cfg.cache_text_encoder_outputs and (cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0):
        warn(("cache_text_encoder_outputs", "shuffle_caption", "caption_tag_dropout_rate"),
             "cache_text_encoder_outputs with shuffle_caption or caption_tag_dropout_rate: captions change "
             "every step, so their text-encoder outputs cannot be cached")
    if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps:
        warn(("lr_scheduler", "lr_warmup_steps"),
             "lr_warmup_steps is ignored by lr_scheduler = 'constant'; use 'constant_with_warmup'")
    if (isinstance(cfg.lr_warmup_steps, int) and cfg.max_train_steps is not None
            and cfg.lr_warmup_steps >= cfg.max_train_steps > 0):
        warn(("lr_warmup_steps", "max_train_steps"),
             f"lr_warmup_steps ({cfg.lr_warmup_steps}) is not shorter than max_train_steps ({cfg.max_train_steps})")
    if cfg.conv_dim > 0 and cfg.preset in ("attn-only", "attn-mlp") and not cfg.network_include:
        warn(("conv_dim", "preset"),
             f"conv_dim = {cfg.conv_dim} has no effect with preset '{cfg.preset}' (k x k convs are only in "
             "preset 'full')")
    if cfg.use_tucker and cfg.conv_dim == 0:
        warn(("use_tucker", "conv_dim"), "use_tucker has no effect while conv_dim = 0")
    if cfg.wd_on_output and not cfg.dora_wd:
        warn(("wd_on_output", "dora_wd"), "wd_on_output has no effect while dora_wd = false")
    elif cfg.wd_on_output:
        warn(("wd_on_output",),
             "wd_on_output = true writes an output-row dora_scale, which A1111 turns into noise and ComfyUI scales "
             "by the wrong norm; set wd_on_output = false for files that load right in every tool")
    if cfg.network_alpha > cfg.network_dim:
        warn(("network_alpha", "network_dim"),
             f"network_alpha ({_num(cfg.network_alpha)}) is larger than network_dim ({cfg.network_dim}): updates are "
             "scaled up, which often diverges with LoHA; 1 to network_dim/2 is typical")
    if cfg.text_encoder_lr is not None and not cfg.train_text_encoder:
        warn(("text_encoder_lr", "train_text_encoder"),
             "text_encoder_lr is set but train_text_encoder = false, so it is not used")
    if cfg.keep_tokens > 0 and not cfg.shuffle_caption and cfg.caption_tag_dropout_rate == 0:
        warn(("keep_tokens",),
             "keep_tokens only matters with shuffle_caption or caption_tag_dropout_rate; it has no effect here")
    if cfg.validation_every_n_steps is not None and cfg.validation_split == 0:
        warn(("validation_every_n_steps", "validation_split"),
             "validation_every_n_steps is set but validation_split = 0, so there is no validation set")
    if cfg.save_last_n is not None and cfg.save_every_n_steps is None and cfg.save_every_n_epochs is None:
        warn(("save_last_n",),
             "save_last_n is set but neither save_every_n_steps nor save_every_n_epochs is: only the final "
             "file is written")
    if (cfg.save_every_n_steps is not None and cfg.max_train_steps is not None
            and cfg.save_every_n_steps > cfg.max_train_steps):
        warn(("save_every_n_steps", "max_train_steps"),
             f"save_every_n_steps ({cfg.save_every_n_steps}) is larger than max_train_steps "
             f"({cfg.max_train_steps}): no intermediate save will happen")
    if cfg.conditioning_data_dir and not cfg.masked_loss:
        warn(("conditioning_data_dir", "masked_loss"),
             "conditioning_data_dir is set but masked_loss = false, so its masks are not used")
    if cfg.prior_loss_weight != 1.0 and not cfg.reg_data_dir:
        warn(("prior_loss_weight", "reg_data_dir"),
             "prior_loss_weight is set but reg_data_dir is not: there are no regularization images to weight")
    has_interval = cfg.sample_every_n_steps is not None or cfg.sample_every_n_epochs is not None
    if cfg.sample_prompts and not has_interval:
        warn(("sample_prompts",),
             "sample_prompts is set but neither sample_every_n_steps nor sample_every_n_epochs is: no samples "
             "are made during training")
    if has_interval and not cfg.sample_prompts:
        warn(("sample_every_n_steps", "sample_every_n_epochs"),
             "sample_every_n_steps/epochs is set but sample_prompts is empty: no samples will be made")
    for name, needs, on in (("noise_offset_random_strength", "noise_offset", cfg.noise_offset),
                            ("ip_noise_gamma_random_strength", "ip_noise_gamma", cfg.ip_noise_gamma)):
        if getattr(cfg, name) and not on:
            warn((name, needs), f"{name} is set but {needs} is not, so it has no effect")
    if cfg.multires_noise_discount != OPTIONS["multires_noise_discount"].default and not cfg.multires_noise_iterations:
        warn(("multires_noise_discount",),
             "multires_noise_discount is only used with multires_noise_iterations, which is not set")
    return problems


# --------------------------------------------------------------------------------------------------
# Public loading API
# --------------------------------------------------------------------------------------------------

_TOML_HINT = (
    "common causes: a string without quotes (write output_dir = \"out\"), a Windows path with backslashes "
    "in double quotes (use single quotes: 'C:\\data'), or a missing ] or \""
)


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
    return _build(layers)


def loads_config(
    text: str, overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None, source: str = "<config>"
) -> TrainConfig:
    """Like :func:`load_config` for TOML text (e.g. from an editor box in the web UI)."""
    layers = []
    if base is not None:
        layers.append(_Layer.from_mapping(base, "base settings"))
    layers += [_file_layer(text, source), _Layer.from_overrides(overrides)]
    return _build(layers)


def _file_layer(text: str, source: str) -> _Layer:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([Problem(source, f"not valid TOML: {e}", _TOML_HINT)]) from None
    return _Layer.from_mapping(data, source)


def config_from_kwargs(**kwargs: Any) -> TrainConfig:
    """Python entry point: ``config_from_kwargs(pretrained_model="tiny-sd1", train_data_dir=..., ...)``."""
    return TrainConfig.from_dict(kwargs)


def as_config(
    config: "TrainConfig | Mapping[str, Any] | str | os.PathLike[str]", overrides: Sequence[str] = ()
) -> TrainConfig:
    """Accept a TrainConfig (validated, then overrides applied), a dict, or a TOML path."""
    if isinstance(config, TrainConfig):
        if overrides:
            return load_config(None, overrides, base=config.to_dict(include_none=False))
        config.validate()
        return config
    if isinstance(config, Mapping):
        return load_config(None, overrides, base=config) if overrides else TrainConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides)
    raise TypeError(f"expected a TrainConfig, a dict or a path to a TOML file, got {type(config).__name__}")


# --------------------------------------------------------------------------------------------------
# TOML writing
# --------------------------------------------------------------------------------------------------

_CTRL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_str(s: str) -> str:
    if ("\\" in s or '"' in s) and "'" not in s and not _CTRL.search(s):
        return f"'{s}'"  # literal string: Windows paths stay readable
    out = []
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif _CTRL.match(ch):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    """A value as TOML writes it, lists and tuples as arrays (what TrainConfig.to_toml writes)."""
    v = _plain(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        if not v:
            return "{}"
        items = ", ".join(
            f"{k if _BARE_KEY.fullmatch(k) else _toml_str(k)} = {toml_value(x)}" for k, x in v.items()
        )
        return "{ " + items + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


# --------------------------------------------------------------------------------------------------
# Settings in layers (a UI's fields over its TOML box)
# --------------------------------------------------------------------------------------------------


def config_from_layers(layers: Sequence[tuple[str | Mapping[str, Any], str]]) -> TrainConfig:
    """Validate settings given as layers, lowest first: each a TOML text or a flat or grouped mapping, with
    the name its problems are reported under. A later layer wins; ``None`` in a mapping unsets.

    The checks and messages are load_config's, so a UI's TOML box fails exactly as the same text in a
    ``--config`` file does (invalid TOML, a key set twice, unknown keys, wrong types)."""
    return _build([_file_layer(d, src) if isinstance(d, str) else _Layer.from_mapping(d, src) for d, src in layers])
