"""The cross-option rules: settings that are each valid but do not fit together (errors), or that are legal but
probably not what was meant (warnings).

Each rule is a small named function of the config that yields :class:`Finding` s, registered with its level and
its documentation in :data:`RULES` (docs/config.md lists them from there). A finding names the options it is
about: they locate it (the file and table, or the ``--set`` argument, that set them), and a finding about an
option whose value was already refused is dropped, so one mistake is reported once.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from ...models import peek_is_sd3
from ...schedulers import sampler_problem
from ...targets import PresetError, is_preset_file, read_preset
from ..loss import PREDICTION_ONLY, prediction_mismatch
from ..flow import FLOW_DIFFUSERS
from ..lowmem import base_storage, diffusers_at_least, storage_unavailable
from ..optim import OptimizerError, check_optimizer_args, resolve_optimizer
from ..prompts import PromptError, read_prompt_entries
from .errors import Problem, show
from .options import OPTIONS, TrainConfig, number_text


@dataclass(frozen=True)
class Finding:
    """One thing a rule found: the options it is about, what is wrong, and (errors) how to fix it."""

    keys: tuple[str, ...]
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class Rule:
    """A named cross-option rule: ``check`` runs only when every option in ``needs`` holds a valid value."""

    check: Callable[[TrainConfig], Iterable[Finding]]
    level: Literal["error", "warning"]
    doc: str
    needs: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.check.__name__


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


# ---- errors ---------------------------------------------------------------------------------------

_REQUIRED_WHAT = {
    "pretrained_model": "the base model to train on",
    "train_data_dir": "the folder of training images",
    "output_dir": "where the LoHA files are written",
}


def required_options(cfg: TrainConfig) -> Iterator[Finding]:
    for name, what in _REQUIRED_WHAT.items():
        if getattr(cfg, name) in (None, ""):
            spec = OPTIONS[name]
            yield Finding((name,), f"missing required option {name} ({what})",
                          f"add {name} = {spec.example_value()} to the config file (under [{spec.group}] or at the "
                          f"top) or pass --set {name}=...")


def run_length_once(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.max_train_steps is not None and cfg.max_train_epochs is not None:
        yield Finding(("max_train_steps", "max_train_epochs"),
                      f"max_train_steps ({cfg.max_train_steps}) and max_train_epochs ({cfg.max_train_epochs}) are "
                      "both set", "keep only one: the run length is given either in steps or in epochs")


def text_cache_needs_frozen_encoder(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.cache_text_encoder_outputs and cfg.train_text_encoder and cfg.pretrained_model \
            and peek_is_sd3(cfg.pretrained_model) and not cfg.train_t5xxl:
        return  # SD 3.x: the frozen T5's outputs are cached while the CLIPs train
    if cfg.cache_text_encoder_outputs and cfg.train_text_encoder:
        yield Finding(("cache_text_encoder_outputs", "train_text_encoder"),
                      "cache_text_encoder_outputs = true needs a frozen text encoder, but train_text_encoder = true",
                      "set train_text_encoder = false, or cache_text_encoder_outputs = false")


def one_base_dtype(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.fp8_base and cfg.base_weight_dtype not in ("auto", "fp8"):
        yield Finding(("fp8_base", "base_weight_dtype"),
                      f"fp8_base = true asks for an fp8 base but base_weight_dtype = \"{cfg.base_weight_dtype}\"",
                      "keep one of them: fp8_base = true (or base_weight_dtype = \"fp8\"), or base_weight_dtype alone")


def _storage_unavailable(cfg: TrainConfig, kinds: tuple[str, ...], names: tuple[str, ...], subject: str,
                         alternative: str = "") -> Iterator[Finding]:
    storage = base_storage(cfg.fp8_base, cfg.base_weight_dtype)
    why = storage_unavailable(storage) if storage in kinds else None
    if why is not None:
        yield Finding(names, f"{subject} {why[0]}", why[1] + alternative)


def fp8_base_needs_layerwise_casting(cfg: TrainConfig) -> Iterator[Finding]:
    # fp8_base = true or base_weight_dtype = "fp8": the message names the storage, not one of the two options
    yield from _storage_unavailable(cfg, ("fp8",), ("fp8_base", "base_weight_dtype"), "a frozen base stored as")


def quantized_base_needs_bitsandbytes(cfg: TrainConfig) -> Iterator[Finding]:
    yield from _storage_unavailable(cfg, ("nf4", "int8"), ("base_weight_dtype",), "base_weight_dtype =",
                                    '; or use base_weight_dtype = "fp8"')


def optimizer_takes_its_args(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.optimizer_args:
        try:
            check_optimizer_args(resolve_optimizer(cfg.optimizer_type), cfg.optimizer_args, cfg.learning_rate)
        except OptimizerError as e:
            yield Finding(("optimizer_type", "optimizer_args"), e.message, e.fix)


def sampler_runs(cfg: TrainConfig) -> Iterator[Finding]:
    problem = sampler_problem(cfg.sample_sampler, cfg.sample_steps)
    if problem:
        yield Finding(("sample_sampler", "sample_steps"),
                      f"sample_sampler = {cfg.sample_sampler!r} with sample_steps = {cfg.sample_steps}: {problem[0]}",
                      problem[1])


def tracker_installed(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.log_with in ("tensorboard", "all") and not tensorboard_installed():
        yield Finding(("log_with",), f'log_with = "{cfg.log_with}" but tensorboard is not installed',
                      'pip install tensorboard, or log_with = "auto" (TensorBoard when installed) or "none"')
    if cfg.log_with in ("wandb", "all") and not wandb_installed():
        yield Finding(("log_with",), f'log_with = "{cfg.log_with}" but wandb is not installed',
                      'install it (pip install wandb), or set log_with = "tensorboard" or "none"')


def sample_prompts_readable(cfg: TrainConfig) -> Iterator[Finding]:
    try:
        entries = read_prompt_entries(cfg.sample_prompts)
    except PromptError as e:
        yield Finding(("sample_prompts",), str(e) if e.where.startswith("sample_prompts") else f"sample_prompts: {e}",
                      e.fix)
        return
    for n, e in enumerate(entries, 1):
        if e.sampler is None and e.steps is None:
            continue  # sample_sampler with sample_steps is checked on its own
        problem = sampler_problem(e.sampler or cfg.sample_sampler, e.steps or cfg.sample_steps)
        if problem:
            yield Finding(("sample_prompts",), f"sample_prompts: prompt {n} ({show(e.prompt)}): {problem[0]}",
                          problem[1])


def disk_cache_needs_cache(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.cache_latents_to_disk and not cfg.cache_latents:
        yield Finding(("cache_latents_to_disk", "cache_latents"),
                      "cache_latents_to_disk = true needs cache_latents = true",
                      "set cache_latents = true, or cache_latents_to_disk = false")


def bucket_range(cfg: TrainConfig) -> Iterator[Finding]:
    lo, hi, step = cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps
    if lo > hi:
        yield Finding(("min_bucket_reso", "max_bucket_reso"),
                      f"min_bucket_reso ({lo}) is larger than max_bucket_reso ({hi})", "swap them")
    for name, v in (("min_bucket_reso", lo), ("max_bucket_reso", hi)):
        if v % step:
            near = max(step, int(round(v / step)) * step)
            yield Finding((name, "bucket_reso_steps"), f"{name} ({v}) is not a multiple of bucket_reso_steps ({step})",
                          f"use {name} = {near}")
    if cfg.enable_bucket and lo <= hi:
        w, h = cfg.resolution
        if min(w, h) < lo or max(w, h) > hi:
            yield Finding(("resolution", "min_bucket_reso", "max_bucket_reso"),
                          f"resolution {w}x{h} does not fit the bucket range {lo}-{hi}",
                          f"set min_bucket_reso <= {min(w, h)} and max_bucket_reso >= {max(w, h)}")


def output_name_is_a_stem(cfg: TrainConfig) -> Iterator[Finding]:
    n = cfg.output_name
    if not n.strip():
        yield Finding(("output_name",), "output_name is empty", 'write e.g. output_name = "my_style"')
    elif any(c in n for c in '/\\:') or n in (".", ".."):
        yield Finding(("output_name",), f"output_name {show(n)} must be a file name stem, not a path",
                      "put the folder in output_dir and only the name in output_name")
    elif n.lower().endswith((".safetensors", ".ckpt", ".pt")):
        yield Finding(("output_name",), f"output_name {show(n)} must not include the file extension",
                      f'write output_name = "{n.rsplit(".", 1)[0]}"')


def caption_extension_has_dot(cfg: TrainConfig) -> Iterator[Finding]:
    if not cfg.caption_extension.startswith("."):
        yield Finding(("caption_extension",), f"caption_extension {show(cfg.caption_extension)} must start with a dot",
                      f'write caption_extension = ".{cfg.caption_extension}"')


def preset_file_readable(cfg: TrainConfig) -> Iterator[Finding]:
    if is_preset_file(cfg.preset):
        try:
            read_preset(cfg.preset)
        except PresetError as e:
            yield Finding(("preset",), e.message, e.fix)


def one_mask_source(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.masked_loss and not cfg.alpha_mask and not cfg.conditioning_data_dir:
        yield Finding(("masked_loss",),
                      "masked_loss = true needs masks, but neither conditioning_data_dir nor alpha_mask is set",
                      "set conditioning_data_dir to the folder of mask images, or alpha_mask = true to use the "
                      "images' alpha")
    if cfg.alpha_mask and cfg.conditioning_data_dir:
        yield Finding(("alpha_mask", "conditioning_data_dir"),
                      "alpha_mask = true and conditioning_data_dir are both set: the loss mask has one source",
                      "keep alpha_mask (masks from the images' alpha) or conditioning_data_dir (a folder of mask "
                      "images)")


def adaptive_noise_needs_offset(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.adaptive_noise_scale is not None and not cfg.noise_offset:
        yield Finding(("adaptive_noise_scale", "noise_offset"),
                      "adaptive_noise_scale is set but noise_offset = 0: it scales the noise offset, which is off",
                      "set noise_offset (e.g. 0.0357), or remove adaptive_noise_scale")


def timestep_range(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.min_timestep is not None and cfg.max_timestep is not None and cfg.min_timestep > cfg.max_timestep:
        yield Finding(("min_timestep", "max_timestep"),
                      f"min_timestep ({cfg.min_timestep}) is larger than max_timestep ({cfg.max_timestep})",
                      "swap them; timesteps are drawn from min_timestep up to max_timestep - 1")


def prediction_type_fits(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.v_parameterization is None:
        return  # checked against the model's own prediction type when it loads (noise.py)
    kind = "v_prediction" if cfg.v_parameterization else "epsilon"
    for name in PREDICTION_ONLY:
        bad_pair = getattr(cfg, name) and prediction_mismatch(
            name, kind, f"v_parameterization = {str(cfg.v_parameterization).lower()}")
        if bad_pair:
            yield Finding((name, "v_parameterization"), *bad_pair)


#: options that only SD 3.x's flow-matching trainer uses, and those only the UNet (DDPM) families use; each is "set"
#: when it differs from its default (v_parameterization: when it is not "auto")
SD3_ONLY: tuple[str, ...] = ("t5xxl", "t5xxl_max_token_length", "train_t5xxl", "weighting_scheme", "logit_mean",
                             "logit_std", "mode_scale", "training_shift", "precondition_outputs", "sd3_file_form")
UNET_ONLY: tuple[str, ...] = ("v_parameterization", "zero_terminal_snr", "min_snr_gamma", "debiased_estimation_loss",
                              "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "ip_noise_gamma",
                              "ip_noise_gamma_random_strength")


def _changed(cfg: TrainConfig, name: str) -> bool:
    return getattr(cfg, name) != OPTIONS[name].default


def family_findings(cfg: TrainConfig, sd3: bool) -> Iterator[Finding]:
    """The family-only options that do not fit an SD 3.x (``sd3``) or a UNet base model."""
    model = f"the base model {show(cfg.pretrained_model)}"
    if sd3 and not diffusers_at_least(FLOW_DIFFUSERS):
        yield Finding(("pretrained_model",), f"training {model} (SD 3.x) needs diffusers {FLOW_DIFFUSERS[0]}."
                      f"{FLOW_DIFFUSERS[1]} or newer (seeded flow-matching timesteps in its training_utils)",
                      f'update it: pip install -U "diffusers>={FLOW_DIFFUSERS[0]}.{FLOW_DIFFUSERS[1]}"')
    if sd3:
        for name in (n for n in UNET_ONLY if _changed(cfg, n)):
            yield Finding((name,), f"{name} is for SD 1.x / 2.x / SDXL (the DDPM schedule), but {model} is SD 3.x, "
                          "trained by flow matching", f"remove {name}; SD 3.x's timesteps and loss weights are "
                          "weighting_scheme, logit_mean, logit_std, mode_scale and training_shift")
        if cfg.loss_type != "l2" and cfg.huber_schedule == "snr":
            yield Finding(("huber_schedule", "loss_type"),
                          f'huber_schedule = "snr" needs the DDPM schedule\'s SNR, but {model} is SD 3.x',
                          'set huber_schedule = "exponential" or "constant"')
        if cfg.dora_wd and cfg.sd3_file_form == "kohya" and _fuses(cfg):
            yield Finding(("dora_wd", "sd3_file_form"),
                          "dora_wd on SD 3.x's attention qkv or adaLN layers: the kohya file form trains each fused "
                          "q|k|v as one module, whose weight norm would span the three diffusers layers",
                          'set sd3_file_form = "simpletuner" (one module per diffusers layer), or dora_wd = false')
        return
    for name in (n for n in SD3_ONLY if _changed(cfg, n)):
        yield Finding((name,), f"{name} is for SD 3.x (flow matching, T5-XXL), but {model} is not SD 3.x",
                      f"remove {name}, or train an SD 3.x model")


def _fuses(cfg: TrainConfig) -> bool:
    """Whether the run adapts a layer the kohya form fuses (any preset or include pattern does but a preset file
    or excludes could avoid them: those are checked when the network is built)."""
    return not is_preset_file(cfg.preset)


def family_problems(cfg: TrainConfig, family: str) -> list[Problem]:
    """family_findings for a loaded model (``family``: ModelFamily.name) as problems, unlocated."""
    return [Problem(None, f.message, f.fix) for f in family_findings(cfg, family == "sd3")]


def options_fit_the_family(cfg: TrainConfig) -> Iterator[Finding]:
    sd3 = peek_is_sd3(cfg.pretrained_model) if cfg.pretrained_model else None
    if sd3 is not None:
        yield from family_findings(cfg, sd3)


def t5_options_fit(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.train_t5xxl and not cfg.t5xxl:
        yield Finding(("train_t5xxl", "t5xxl"), "train_t5xxl = true but t5xxl = false: there is no T5 to train",
                      "set t5xxl = true, or train_t5xxl = false")
    if cfg.train_t5xxl and not cfg.train_text_encoder:
        yield Finding(("train_t5xxl", "train_text_encoder"),
                      "train_t5xxl = true needs train_text_encoder = true (it trains T5 along with the CLIPs)",
                      "set train_text_encoder = true, or train_t5xxl = false")


# ---- warnings -------------------------------------------------------------------------------------


def sd3_samples_use_flow_euler(cfg: TrainConfig) -> Iterator[Finding]:
    if _changed(cfg, "sample_sampler") and cfg.pretrained_model and peek_is_sd3(cfg.pretrained_model):
        yield Finding(("sample_sampler",),
                      f"sample_sampler = {show(cfg.sample_sampler)} is not used for SD 3.x: its samples use the "
                      "model's own flow-matching Euler scheduler (as kohya's SD3 sampling does)")


def random_crop_defeats_latent_cache(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.cache_latents and cfg.random_crop:
        yield Finding(("cache_latents", "random_crop"),
                      "cache_latents with random_crop: every step crops a different region, so latents are not "
                      "cached (slower); set random_crop = false to cache them")


def changing_captions_defeat_text_cache(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.cache_text_encoder_outputs and (cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0):
        yield Finding(("cache_text_encoder_outputs", "shuffle_caption", "caption_tag_dropout_rate"),
                      "cache_text_encoder_outputs with shuffle_caption or caption_tag_dropout_rate: captions change "
                      "every step, so their text-encoder outputs cannot be cached")


def warmup_fits_schedule(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps:
        yield Finding(("lr_scheduler", "lr_warmup_steps"),
                      "lr_warmup_steps is ignored by lr_scheduler = 'constant'; use 'constant_with_warmup'")
    if (isinstance(cfg.lr_warmup_steps, int) and cfg.max_train_steps is not None
            and cfg.lr_warmup_steps >= cfg.max_train_steps > 0):
        yield Finding(("lr_warmup_steps", "max_train_steps"),
                      f"lr_warmup_steps ({cfg.lr_warmup_steps}) is not shorter than max_train_steps "
                      f"({cfg.max_train_steps})")


def conv_options_used(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.conv_dim > 0 and cfg.preset in ("attn-only", "attn-mlp") and not cfg.network_include:
        yield Finding(("conv_dim", "preset"),
                      f"conv_dim = {cfg.conv_dim} has no effect with preset '{cfg.preset}' (k x k convs are only in "
                      "preset 'full')")
    if cfg.use_tucker and cfg.conv_dim == 0:
        yield Finding(("use_tucker", "conv_dim"), "use_tucker has no effect while conv_dim = 0")


def wd_on_output_loads_everywhere(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.wd_on_output and not cfg.dora_wd:
        yield Finding(("wd_on_output", "dora_wd"), "wd_on_output has no effect while dora_wd = false")
    elif cfg.wd_on_output:
        yield Finding(("wd_on_output",),
                      "wd_on_output = true writes an output-row dora_scale, which A1111 turns into noise and ComfyUI "
                      "scales by the wrong norm; set wd_on_output = false for files that load right in every tool")


def bf16_file_rounds_a1111_merges(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.save_precision == "bf16":
        yield Finding(("save_precision",),
                      'save_precision = "bf16": A1111 merges an adapter into the model in the file\'s dtype, so a '
                      "bf16 file rounds every patched base weight to bf16, even on an fp16 model (relative error "
                      "2.5e-2, against 2.4e-3 for an fp16 file, measured with A1111's Lora extension v1.10.1); "
                      'use save_precision = "fp16" (the default) for files meant for A1111')


def alpha_not_above_rank(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.network_alpha > cfg.network_dim:
        yield Finding(("network_alpha", "network_dim"),
                      f"network_alpha ({number_text(cfg.network_alpha)}) is larger than network_dim "
                      f"({cfg.network_dim}): updates are scaled up, which often diverges with LoHA; 1 to "
                      "network_dim/2 is typical")


def unused_options(cfg: TrainConfig) -> Iterator[Finding]:
    """Options set while what gives them an effect is off. Each row: the option, the option it depends on (both
    locate the finding), whether the setting is idle, the message."""
    has_interval = cfg.sample_every_n_steps is not None or cfg.sample_every_n_epochs is not None
    unused = (
        ("text_encoder_lr", "train_text_encoder", cfg.text_encoder_lr is not None and not cfg.train_text_encoder,
         "text_encoder_lr is set but train_text_encoder = false, so it is not used"),
        ("keep_tokens", None, cfg.keep_tokens > 0 and not cfg.shuffle_caption and cfg.caption_tag_dropout_rate == 0,
         "keep_tokens only matters with shuffle_caption or caption_tag_dropout_rate; it has no effect here"),
        ("validation_every_n_steps", "validation_split",
         cfg.validation_every_n_steps is not None and cfg.validation_split == 0,
         "validation_every_n_steps is set but validation_split = 0, so there is no validation set"),
        ("conditioning_data_dir", "masked_loss", bool(cfg.conditioning_data_dir) and not cfg.masked_loss,
         "conditioning_data_dir is set but masked_loss = false, so its masks are not used"),
        ("prior_loss_weight", "reg_data_dir", cfg.prior_loss_weight != 1.0 and not cfg.reg_data_dir,
         "prior_loss_weight is set but reg_data_dir is not: there are no regularization images to weight"),
        ("noise_offset_random_strength", "noise_offset", cfg.noise_offset_random_strength and not cfg.noise_offset,
         "noise_offset_random_strength is set but noise_offset is not, so it has no effect"),
        ("ip_noise_gamma_random_strength", "ip_noise_gamma",
         cfg.ip_noise_gamma_random_strength and not cfg.ip_noise_gamma,
         "ip_noise_gamma_random_strength is set but ip_noise_gamma is not, so it has no effect"),
        ("multires_noise_discount", None,
         cfg.multires_noise_discount != OPTIONS["multires_noise_discount"].default
         and not cfg.multires_noise_iterations,
         "multires_noise_discount is only used with multires_noise_iterations, which is not set"),
        ("sample_prompts", None, bool(cfg.sample_prompts) and not has_interval,
         "sample_prompts is set but neither sample_every_n_steps nor sample_every_n_epochs is: no samples are made "
         "during training"),
        ("sample_every_n_steps", "sample_every_n_epochs", has_interval and not cfg.sample_prompts,
         "sample_every_n_steps/epochs is set but sample_prompts is empty: no samples will be made"),
    )
    for name, needs, hit, message in unused:
        if hit:
            yield Finding((name,) + ((needs,) if needs else ()), message)


def saves_happen(cfg: TrainConfig) -> Iterator[Finding]:
    if cfg.save_last_n is not None and cfg.save_every_n_steps is None and cfg.save_every_n_epochs is None:
        yield Finding(("save_last_n",),
                      "save_last_n is set but neither save_every_n_steps nor save_every_n_epochs is: only the final "
                      "file is written")
    if (cfg.save_every_n_steps is not None and cfg.max_train_steps is not None
            and cfg.save_every_n_steps > cfg.max_train_steps):
        yield Finding(("save_every_n_steps", "max_train_steps"),
                      f"save_every_n_steps ({cfg.save_every_n_steps}) is larger than max_train_steps "
                      f"({cfg.max_train_steps}): no intermediate save will happen")


#: every cross-option rule, in the order its findings are reported (docs/config.md lists them in this order)
RULES: tuple[Rule, ...] = (
    Rule(required_options, "error", "pretrained_model, train_data_dir and output_dir must be set."),
    Rule(run_length_once, "error",
         "max_train_steps and max_train_epochs are both set (a later layer setting one unsets the other)."),
    Rule(text_cache_needs_frozen_encoder, "error",
         "cache_text_encoder_outputs = true while train_text_encoder = true (except for SD 3.x with train_t5xxl = "
         "false: T5's outputs are then cached alone)."),
    Rule(sampler_runs, "error",
         "sample_sampler needs a package that is not installed (lms: scipy), or more sample_steps than given "
         "(pndm: 4).", needs=("sample_sampler", "sample_steps")),
    Rule(tracker_installed, "error",
         'log_with = "tensorboard" or "all" while tensorboard is not installed; "wandb" or "all" while wandb is not '
         "installed."),
    Rule(sample_prompts_readable, "error",
         "sample_prompts names a prompts file (.txt/.toml/.json) that is missing or unreadable, or a prompt carries an "
         "unknown or malformed --option (the message names the file and line); a prompt's --ss/--s that its sampler "
         "cannot run (as for sample_sampler).", needs=("sample_prompts", "sample_sampler", "sample_steps")),
    Rule(one_base_dtype, "error", "fp8_base = true with base_weight_dtype other than auto / fp8."),
    Rule(fp8_base_needs_layerwise_casting, "error",
         "fp8_base = true or base_weight_dtype = fp8 with diffusers older than 0.33 (no layerwise casting)."),
    Rule(quantized_base_needs_bitsandbytes, "error",
         "base_weight_dtype = nf4 / int8 while bitsandbytes is not installed (the message gives the install "
         "command)."),
    Rule(optimizer_takes_its_args, "error",
         "optimizer_args that the optimizer class does not take (its signature) or refuses (it is built once on a "
         "dummy parameter), and lr or params in optimizer_args. (An optimizer_type that names no class, or whose "
         "package is not installed, is refused with the option itself: the class is imported while the config is "
         "checked.)", needs=("optimizer_type", "optimizer_args", "learning_rate")),
    Rule(disk_cache_needs_cache, "error", "cache_latents_to_disk = true while cache_latents = false."),
    Rule(bucket_range, "error",
         "min_bucket_reso > max_bucket_reso, or either is not a multiple of bucket_reso_steps; with enable_bucket, a "
         "side of resolution outside [min_bucket_reso, max_bucket_reso].",
         needs=("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")),
    Rule(output_name_is_a_stem, "error", "output_name is empty, holds a path separator, or ends in .safetensors.",
         needs=("output_name",)),
    Rule(caption_extension_has_dot, "error", "caption_extension does not start with a dot.",
         needs=("caption_extension",)),
    Rule(preset_file_readable, "error",
         "preset names a .toml file that does not exist, is not valid TOML, or holds a key or value sd-loha cannot "
         "honour (another algo than loha, LoKr's factor, DoRA per entry, the generic wrapper's target_module, a bad "
         "regular expression).", needs=("preset",)),
    Rule(one_mask_source, "error",
         "masked_loss = true without a mask source (conditioning_data_dir or alpha_mask), or both alpha_mask and "
         "conditioning_data_dir set."),
    Rule(adaptive_noise_needs_offset, "error",
         "adaptive_noise_scale set while noise_offset = 0 (kohya: adaptive_noise_scale requires noise_offset)."),
    Rule(timestep_range, "error", "min_timestep > max_timestep."),
    Rule(prediction_type_fits, "error",
         "zero_terminal_snr or scale_v_pred_loss_like_noise_pred with v_parameterization = false, or v_pred_like_loss "
         "with v_parameterization = true; with v_parameterization not set, the same is checked against the model's "
         "prediction type when it loads, and past the model's number of timesteps for min_timestep/max_timestep.",
         needs=("v_parameterization",)),
    Rule(options_fit_the_family, "error",
         "an SD 3.x option (" + ", ".join(SD3_ONLY) + ") changed from its default for a base model that is not SD "
         "3.x, or a UNet-only option (" + ", ".join(UNET_ONLY) + ") set, or huber_schedule = snr with loss_type "
         "huber / smooth_l1, for an SD 3.x one; SD 3.x with diffusers older than 0.33. Checked before loading where the model shows its family (a built-in "
         "name, a local folder, a .safetensors file), otherwise once it loads.",
         needs=("pretrained_model", *SD3_ONLY, *UNET_ONLY, "loss_type", "huber_schedule")),
    Rule(t5_options_fit, "error", "train_t5xxl = true with t5xxl = false or train_text_encoder = false.",
         needs=("train_t5xxl", "t5xxl", "train_text_encoder")),
    Rule(sd3_samples_use_flow_euler, "warning",
         "sample_sampler changed for an SD 3.x base model, whose samples always use its flow-matching Euler "
         "scheduler.", needs=("sample_sampler", "pretrained_model")),
    Rule(random_crop_defeats_latent_cache, "warning",
         "cache_latents with random_crop: every step crops a different region, so latents are not cached."),
    Rule(changing_captions_defeat_text_cache, "warning",
         "cache_text_encoder_outputs with shuffle_caption or caption_tag_dropout_rate: captions change every step, so "
         "their text-encoder outputs cannot be cached (caption_dropout_rate alone is fine)."),
    Rule(warmup_fits_schedule, "warning",
         "lr_warmup_steps > 0 with lr_scheduler = constant (which ignores warmup); lr_warmup_steps >= "
         "max_train_steps."),
    Rule(conv_options_used, "warning",
         "conv_dim > 0 with preset attn-only or attn-mlp, or use_tucker with conv_dim = 0 (no effect)."),
    Rule(wd_on_output_loads_everywhere, "warning",
         "wd_on_output = true without dora_wd (no effect), or with dora_wd (A1111 and ComfyUI load such files "
         "wrong)."),
    Rule(bf16_file_rounds_a1111_merges, "warning",
         'save_precision = "bf16": A1111 merges in the file\'s dtype, so every patched base weight is rounded to '
         "bf16, even on an fp16 model (relative error 2.5e-2 against 2.4e-3 for fp16, A1111's Lora extension "
         "v1.10.1)."),
    Rule(alpha_not_above_rank, "warning", "network_alpha > network_dim (updates scaled up; divergence risk)."),
    Rule(unused_options, "warning",
         "an option set while what gives it an effect is off: text_encoder_lr without train_text_encoder; "
         "keep_tokens without shuffle_caption or caption_tag_dropout_rate; validation_every_n_steps with "
         "validation_split = 0; conditioning_data_dir without masked_loss; prior_loss_weight other than 1 without "
         "reg_data_dir; noise_offset_random_strength with noise_offset = 0; ip_noise_gamma_random_strength without "
         "ip_noise_gamma; multires_noise_discount changed without multires_noise_iterations; sample_prompts without "
         "sample_every_n_steps/epochs, or the reverse."),
    Rule(saves_happen, "warning",
         "save_last_n set without save_every_n_steps/epochs; save_every_n_steps > max_train_steps."),
)


def cross_check(cfg: TrainConfig, origins: Mapping[str, str | None],
                invalid: set[str]) -> tuple[list[Problem], list[str]]:
    """Run every rule: (the errors, located where their options were set; the warnings). ``invalid``: options
    whose value was refused (they hold their default), about which nothing more is said."""
    problems: list[Problem] = []
    warnings: list[str] = []
    for rule in RULES:
        if invalid.intersection(rule.needs):
            continue
        for f in rule.check(cfg):
            if invalid.intersection(f.keys):
                continue
            if rule.level == "warning":
                warnings.append(f.message)
            else:
                problems.append(Problem(_where(origins, f.keys), f.message, f.fix))
    return problems, warnings


def _where(origins: Mapping[str, str | None], keys: Iterable[str]) -> str | None:
    seen: list[str] = []
    for k in keys:
        w = origins.get(k)
        if w and w not in seen:
            seen.append(w)
    return " and ".join(seen) or None
