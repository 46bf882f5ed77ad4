"""The option table: every training option is a field of :class:`TrainConfig`, and its :class:`OptionSpec`
(group, type, default, allowed values, help) drives parsing (loading.py, coerce.py), the cross-option rules
(rules.py), :meth:`TrainConfig.to_toml` and the generated reference docs/config.md."""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...schedulers import ALIASES as SCHEDULER_ALIASES
from ...schedulers import SCHEDULERS
from ..flow import WEIGHTING_SCHEMES
from ..loss import HUBER_SCHEDULES, LOSS_TYPES
from ...sd3_network import SD3_FILE_FORMS
from ..lowmem import BASE_DTYPES
from .writing import Entry, plain, toml_document, toml_value

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

BUILTIN_MODELS: tuple[str, ...] = ("tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-sd3", "toy-sd1")  # = sd_loha.models.TINY_MODELS
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


#: how an option's value is read (coerce.py) and shown (OptionSpec.type_text)
KINDS = ("int", "float", "bool", "str", "path", "enum", "list", "numbers", "dict", "resolution", "warmup",
         "optimizer", "int_patterns", "float_patterns")
#: kinds whose value is text: --set output_name=2024 keeps the text, not the number
STRINGY_KINDS = ("str", "path", "enum", "optimizer")


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
    #: where kohya sd-scripts (or LyCORIS, for its network_args) has another default: theirs as docs/config.md
    #: shows it, and why ours differs (both or neither)
    kohya_default: str | None = None
    kohya_note: str | None = None
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
            return f"{'>' if self.min_open else '>='} {number_text(lo)}"
        if lo is None:
            return f"{'<' if self.max_open else '<='} {number_text(hi)}"
        return f"in {'(' if self.min_open else '['}{number_text(lo)}, {number_text(hi)}{')' if self.max_open else ']'}"

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


def number_text(x: float | None) -> str:
    """A number as messages and docs show it: 4.0 as 4."""
    if x is None:
        return ""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _opt(group: str, kind: str, default: Any = None, help: str = "", **kw: Any) -> Any:
    assert group in GROUPS and kind in KINDS, (group, kind)
    spec = OptionSpec(group=group, kind=kind, help=" ".join(help.split()), **kw)
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


@dataclass
class TrainConfig:
    """All training options, as plain values. Build it with :func:`load_config`, :func:`as_config` or
    :func:`config_from_kwargs` (which parse and validate); a directly constructed one is validated when
    it is passed through :func:`as_config` (as ``train`` does)."""

    # ---- model ---------------------------------------------------------------------------------
    pretrained_model: str | None = _opt(
        "model", "path", None,
        "Base model: a local diffusers folder (with model_index.json), a single .safetensors/.ckpt "
        "checkpoint, a Hugging Face hub id (org/name), or a built-in model: toy-sd1 (a small SD 1.x pretrained on "
        "a procedural world of shapes, docs/toy-model.md) or the random-weight test models tiny-sd1, tiny-sd2, "
        "tiny-sdxl, tiny-sd3 (SD3.5-Medium-style). SD 1.x, 2.x, SDXL or SD 3.x is detected from the model.",
        required=True, type_doc="path, hub id or built-in name",
        example='"stable-diffusion-v1-5/stable-diffusion-v1-5"',
    )
    base_config: str | None = _opt("model", "path", None, "For a single-file pretrained_model: the diffusers folder or "
        "hub id that completes it (from_single_file's config; offline with a local folder). SD 3.x files holding the "
        "MMDiT and VAE alone (sd3.5_medium.safetensors) need it.", optional=True, type_doc="path or hub id")
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
        kohya_default="`false`",
        kohya_note=("detected from the model's scheduler, so an SD 2.x 768-v model trains as v-prediction "
                   "without a flag that is easy to forget"),
    )
    t5xxl: bool = _opt(
        "model", "bool", True,
        "SD 3.x: condition on T5-XXL as well as the CLIPs. false: train and sample without it (its part of the "
        "context is zeros, as diffusers' StableDiffusion3Pipeline does without text_encoder_3), and it is not "
        "kept in memory. kohya's t5xxl is a path to its weights; here T5 comes with the base model.",
    )
    t5xxl_max_token_length: int = _opt(
        "model", "int", 256,
        "SD 3.x: T5-XXL's prompt length in tokens (kohya's t5xxl_max_token_length; diffusers' max_sequence_length). "
        "Samples use the same length.",
        min=1, max=512,
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
        kohya_default='`".caption"`',
        kohya_note=("most captioning tools and shared datasets write .txt (kohya's own WD14 tagger does; its "
                   "BLIP script writes .caption)"),
    )
    resolution: tuple[int, int] = _opt(
        "dataset", "resolution", (512, 512),
        "Training resolution, width and height (an integer for a square). With bucketing this sets the "
        "pixel area of every bucket. Multiples of 8. Stored as (width, height).",
        multiple_of=8, min=64, default_doc="`512`", example="512",
        kohya_default="not set (the dataset must give it)",
        kohya_note=("SD 1.x's native size, so a minimal config trains; SD 2.x 768 and SDXL configs set it "
                   "(train_configs/)"),
    )
    enable_bucket: bool = _opt(
        "dataset", "bool", True,
        "Aspect-ratio bucketing: group images by aspect ratio instead of resizing and cropping every image to "
        "resolution (center crop unless random_crop).",
        kohya_default="`false`",
        kohya_note="images of any aspect ratio train uncropped; square images train the same either way",
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
        "Word put in front of every training caption that does not already contain it; never shuffled or tag-dropped "
        "(caption_dropout_rate still empties the whole caption; empty: none). Images without a caption file get "
        "just this. Regularization images (reg_data_dir) keep their captions without it: prior preservation.",
    )
    cache_latents: bool = _opt(
        "dataset", "bool", True,
        "Encode every image with the VAE once before training and keep the latents (both flips with flip_aug); "
        "much faster: the VAE then only runs for validation images and samples. random_crop turns caching off "
        "(a warning says so).",
        kohya_default="`false`",
        kohya_note=("the same loss with the VAE run once per image instead of every step "
                   "(tests/train/test_options.py); random_crop turns it off with a warning"),
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
        "encoders). Needs train_text_encoder = false; for SD 3.x, or train_t5xxl = false: then T5-XXL's outputs "
        "alone are cached (and T5 kept on the CPU) while the CLIPs train. caption_dropout_rate is fine (the empty caption is cached "
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
        "extension) at the same path relative to train_data_dir (train/10_dogs/001.png: masks/10_dogs/001.png; a "
        "same-named file in another folder belongs to another image), the same size as its image; its red channel "
        "/ 255 is the weight. A training image without a mask is an error (as in kohya); "
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
        "MLP layers (attn-mlp, full) are added. SD 3.x (MMDiT): attn-only is the attention qkv/proj of both "
        "streams (x and context), attn-mlp adds their MLPs, full is every layer of the joint blocks (kohya's "
        "default: also the adaLN modulations and SD3.5 Medium's second attention attn2); the text encoders are "
        "the CLIPs, and T5-XXL with train_t5xxl. Or a LyCORIS preset file, a path ending in .toml (e.g. "
        "train_configs/presets/style_blocks.toml; docs/training.md): unet_target_module / "
        "text_encoder_target_module (block classes whose layers are adapted), unet_target_name / "
        "text_encoder_target_name (module paths, regular expressions matched from the start, or shell globs with "
        "use_fnmatch = true), exclude_name, enable_conv, and module_algo_map / name_algo_map tables of per-class / "
        "per-name dim, alpha and use_tucker (algo must be loha), with LyCORIS's kohya-network precedence.",
        choices=PRESETS, file_suffix=".toml", type_doc="string: a preset name or a .toml file",
        kohya_default='`"full"` (LyCORIS)',
        kohya_note=("attention and feed-forward layers are what style and character LoHAs train (LyCORIS's own "
                   "LoHA example uses attn-mlp); files stay small"),
    )
    network_dim: int = _opt(
        "network", "int", 8,
        "LoHA rank of linear and 1x1 conv layers (capacity grows like rank squared; 4-16 is typical).",
        min=1,
        kohya_default="not set: 4 (LyCORIS's and kohya's fallback)",
        kohya_note="LoHA's capacity grows with rank squared; 8 with alpha 4 is LyCORIS's LoHA example",
    )
    network_alpha: float = _opt(
        "network", "float", 4.0,
        "Scale numerator: the update is multiplied by network_alpha / network_dim. Lower = smaller "
        "effective learning rate; 1 to network_dim/2 is typical for LoHA.",
        min=0.0, min_open=True,
        kohya_default="`1`",
        kohya_note=("alpha 4 with rank 8 (scale 0.5) is LyCORIS's LoHA example; alpha 1 would scale updates by "
                   "1/8"),
    )
    conv_dim: int = _opt(
        "network", "int", 0,
        "LoHA rank of k x k convolutions (0 = do not adapt k x k convs). They are in preset full, or added by "
        "network_include.",
        min=0,
        kohya_default="network_dim (LyCORIS: k x k convs adapted under preset full)",
        kohya_note="k x k convolutions hold most of a full adapter's parameters: opt-in",
    )
    conv_alpha: float = _opt(
        "network", "float", 1.0, "Scale numerator of k x k convolutions (conv_alpha / conv_dim).",
        min=0.0, min_open=True,
        kohya_default="network_alpha (LyCORIS)",
        kohya_note="convolutions are off by default (conv_dim = 0); 1 is kohya's network_alpha default",
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
        kohya_default="`true` (LyCORIS)",
        kohya_note="only input-column dora_scale files load right in A1111 and ComfyUI (docs/format.md)",
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
    sd3_file_form: str = _opt(
        "network", "enum", "kohya",
        "SD 3.x: how the file names the transformer's modules. kohya: the original MMDiT layout kohya sd-scripts "
        "(with LyCORIS), ComfyUI and Forge read (lora_unet_joint_blocks_N_x_block_attn_qkv: each fused q|k|v "
        "trains as one LoHA over diffusers' to_q/to_k/to_v). simpletuner: LyCORIS on the diffusers transformer, "
        "as SimpleTuner writes (lycoris_transformer_blocks_N_attn_to_q: one LoHA per diffusers layer; needed for "
        "dora_wd on attention or adaLN layers). sd-loha loads both; `sd-loha convert` turns one into the other.",
        choices=SD3_FILE_FORMS,
    )
    train_t5xxl: bool = _opt(
        "network", "bool", False,
        "SD 3.x: with train_text_encoder, train T5-XXL too (kohya's train_t5xxl); false keeps it frozen, so its "
        "gradients are never computed. Needs t5xxl = true.",
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
        kohya_default='not set: `"last"`',
        kohya_note="the file says what it holds",
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
        kohya_default="`2e-6`",
        kohya_note="kohya's default is for full fine-tuning; LoRA/LoHA training uses about 1e-4",
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
    fp8_base: bool = _opt(
        "training", "bool", False,
        "Store the frozen UNet's Linear and Conv weights (and the text encoders', when not trained) in "
        "float8_e4m3fn, each layer cast to the mixed-precision dtype for its own forward: half the weight memory "
        "of bf16/fp16 for a small loss of precision. The same as base_weight_dtype = \"fp8\". The saved file is "
        "a normal LoHA file. kohya's --fp8_base.",
    )
    base_weight_dtype: str = _opt(
        "training", "enum", "auto",
        "How the frozen base's weights are stored on the training device: auto (the mixed_precision dtype), fp8 "
        "(= fp8_base), nf4 (4-bit) or int8: the frozen Linear layers become bitsandbytes Linear4bit / "
        "Linear8bitLt (needs bitsandbytes; >= 0.50 also on the CPU); convs stay in the mixed-precision dtype. The "
        "text encoders are stored so too when they are not trained. docs/training.md#low-memory-training.",
        choices=BASE_DTYPES, aliases={"float8": "fp8", "float8_e4m3fn": "fp8", "4bit": "nf4", "8bit": "int8"},
    )
    seed: int = _opt("training", "int", 42,
                     "Random seed of the run (LoHA initialisation, noise and timesteps, shuffling, dropout).", min=0,
        kohya_default="not set: a random seed per run",
        kohya_note="a run can be repeated exactly, and compared with another that changes one setting",
    )
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
    weighting_scheme: str = _opt(
        "training", "enum", "logit_normal",
        "SD 3.x: how flow-matching timesteps are drawn and losses weighted (diffusers' training_utils, kohya's "
        "weighting_scheme): logit_normal draws σ = sigmoid(N(logit_mean, logit_std²)), mode from the SD3 paper's "
        "mode density (mode_scale), none (kohya: uniform) uniformly; cosmap and sigma_sqrt draw uniformly and weight "
        "each loss by 2/(π(1 - 2σ + 2σ²)) or σ⁻².",
        choices=WEIGHTING_SCHEMES, aliases={"uniform": "none"},
        kohya_default='`"uniform"`',
        kohya_note="the SD3 paper's best and diffusers' SD3 training default",
    )
    logit_mean: float = _opt(
        "training", "float", 0.0,
        "SD 3.x, weighting_scheme logit_normal: the mean of the normal that sigmoid maps to σ (> 0: noisier).",
    )
    logit_std: float = _opt(
        "training", "float", 1.0, "SD 3.x, weighting_scheme logit_normal: the normal's standard deviation.",
        min=0.0, min_open=True,
    )
    mode_scale: float = _opt(
        "training", "float", 1.29,
        "SD 3.x, weighting_scheme mode: the SD3 paper's s (> 0: more middle timesteps, < 0: more at the ends; its "
        "density stays valid for -1 <= s <= 2/(π - 2)).",
        min=-1.0, max=1.75,
    )
    training_shift: float = _opt(
        "training", "float", 1.0,
        "SD 3.x: shift of the drawn σ, sσ/(1 + (s - 1)σ), the formula of the flow scheduler's shift (kohya's "
        "training_shift): > 1 trains noisier timesteps (composition), < 1 cleaner ones (detail).",
        min=0.0, min_open=True,
    )
    precondition_outputs: bool = _opt(
        "training", "bool", True,
        "SD 3.x: compare the x0 estimate x_σ - σ·prediction with the image latents (diffusers' "
        "precondition_outputs; kohya's SD3 trainer always does), i.e. the velocity loss weighted by σ²; false: "
        "compare the prediction with the velocity noise - x0.",
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
        kohya_default="`8` (at most the CPU count)",
        kohya_note=("with cached latents a batch is cheap to load; worker processes cost start-up time and "
                   "memory every epoch"),
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
        kohya_default="not set: the training dtype (fp32)",
        kohya_note=("half the file size and loads the same in every tool; fp16, not bf16, because A1111 merges "
                   "in the file's dtype (bf16 warns)"),
    )
    save_state: bool = _opt(
        "saving", "bool", True,
        "Write a resumable training state (adapter, optimizer, scheduler, EMA, loss scaler, RNG, step) next to "
        "every intermediate save and at the end (see save_last_n). A run that is stopped early always writes one.",
        kohya_default="`false`",
        kohya_note="a stopped or finished run can be continued with --resume; save_last_n bounds the disk use",
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
                            min=0,
        kohya_default="not set: a random seed per picture (unless --d)",
        kohya_note="each sample step draws the same noise, so the grids show what training changed",
    )
    sample_steps: int = _opt("sampling", "int", 20, "Denoising steps per sample image.", min=1,
        kohya_default="`30` (per prompt, --s)",
        kohya_note="euler_a draws a clear picture in 20 steps",
    )
    sample_guidance_scale: float = _opt(
        "sampling", "float", 7.0, "Classifier-free guidance scale of the samples.", min=0.0,
        kohya_default="`7.5` (per prompt, --l)",
        kohya_note="A1111's default CFG scale",
    )
    sample_width: int | None = _opt(
        "sampling", "int", None, "Sample width in pixels. Not set: the training resolution's width.",
        optional=True, min=64, multiple_of=8, default_doc="resolution width", example="512",
        kohya_default="`512` (per prompt, --w)",
        kohya_note="samples show the resolution the adapter trains at",
    )
    sample_height: int | None = _opt(
        "sampling", "int", None, "Sample height in pixels. Not set: the training resolution's height.",
        optional=True, min=64, multiple_of=8, default_doc="resolution height", example="512",
        kohya_default="`512` (per prompt, --h)",
        kohya_note="samples show the resolution the adapter trains at",
    )
    sample_sampler: str = _opt(
        "sampling", "enum", "euler_a",
        "Sampler of the sample images (see the sampler table below; kohya's k_* names are accepted).",
        choices=tuple(SCHEDULERS), aliases=SCHEDULER_ALIASES,  # the samplers of generation,
        kohya_default='`"ddim"`',
        kohya_note="Euler ancestral draws clear pictures at 20 sample_steps",
    )

    # ---- logging -------------------------------------------------------------------------------
    logging_dir: str | None = _opt(
        "logging", "path", None, "Folder for training logs. Not set: output_dir/logs.",
        optional=True, default_doc="output_dir/logs", example='"logs"',
        kohya_default="not set: no logs",
        kohya_note="every run keeps its loss curve next to its files",
    )
    log_with: str = _opt(
        "logging", "enum", "auto",
        "Where to log the loss, the learning rates (lr, and lr/<group> per parameter group), the validation loss "
        "and every sample grid (as an image at its step): tensorboard (event files in logging_dir), wandb (Weights "
        "& Biases; its files in logging_dir; WANDB_MODE=offline logs without an account or network), all (both), "
        "none, or auto (tensorboard when it is installed, otherwise none).",
        choices=("auto", "tensorboard", "wandb", "all", "none"),
        kohya_default="not set: tensorboard when logging_dir is set, otherwise none",
        kohya_note="logs whenever TensorBoard is installed, into output_dir/logs",
    )
    log_tracker_name: str = _opt(
        "logging", "str", "sd-loha",
        "Name of the run's log: the Weights & Biases project, and the TensorBoard subfolder of logging_dir.",
        kohya_default='not set: `"network_train"`',
        kohya_note="the run's log says which program wrote it",
    )
    wandb_run_name: str | None = _opt(
        "logging", "str", None, "Name of the Weights & Biases run. Not set: wandb picks one.",
        optional=True, default_doc="wandb's", example='"my_style-v1"',
    )

    # ---- behaviour -----------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if self.max_train_steps is None and self.max_train_epochs is None:
            self.max_train_steps = DEFAULT_MAX_TRAIN_STEPS

    def to_dict(self, *, grouped: bool = False, include_none: bool = True) -> dict[str, Any]:
        """Plain-Python copy of the options (lists instead of tuples), flat or grouped by table."""
        out: dict[str, Any] = {}
        for spec in OPTIONS.values():
            v = getattr(self, spec.name)
            if v is None and not include_none:
                continue
            v = plain(v)
            if grouped:
                out.setdefault(spec.group, {})[spec.name] = v
            else:
                out[spec.name] = v
        return out

    def to_toml(self, *, comments: bool = False) -> str:
        """The config as TOML, grouped in tables; loading it gives back an equal config.

        Options that are not set (None) are left out (with ``comments=True`` they appear commented,
        and every option gets its help text as a comment)."""
        tables = []
        for group in GROUPS:
            entries = []
            for spec in OPTIONS.values():
                if spec.group != group:
                    continue
                v = getattr(self, spec.name)
                if spec.kind == "resolution" and v is not None and v[0] == v[1]:
                    v = v[0]
                entries.append(Entry(spec.name, v, textwrap.wrap(spec.help, 98), spec.example_value()))
            tables.append((group, entries))
        return toml_document(tables, header=["sd-loha training config (options: docs/config.md)"], comments=comments)

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
EXCLUSIVE_PAIRS = (("max_train_steps", "max_train_epochs"),)
