"""Sample images during training: the live network, fixed seeds, one labelled grid per call.

The pipeline runs its UNet and text encoders in the training dtype (fp16/bf16 under mixed precision) and
stops at the latents; the VAE decodes them in its own dtype (fp32: fp16 VAEs overflow to NaN), so mixed
precision never feeds half-precision latents into fp32 convolutions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import schedulers
from ..atomic import save_image_atomic
from .conditioning import Conditioner
from .config import TrainConfig
from .prompts import PromptEntry, read_prompt_entries
from .report import column_grid


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Pipeline latents -> images in [-1, 1], undoing the scaling (and SDXL-style mean/std or FLUX-style shift)."""
    cfg = vae.config
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(shape)
        std_t = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(shape)
        latents = latents * std_t / cfg.scaling_factor + mean_t
    else:
        latents = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    with torch.no_grad():
        return vae.decode(latents).sample


@dataclass(frozen=True)
class SampleSpec:
    """One sample picture's settings: the prompt's own (a prompts file's --n/--w/--h/--d/--l/--s/--ss) over the
    sample_* options."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    steps: int
    guidance_scale: float
    sampler: str
    label: str = field(default="", compare=False)  # the grid's row: the prompt, then what it sets itself


def sample_specs(cfg: TrainConfig, prompts: Sequence[PromptEntry] | None = None) -> list[SampleSpec]:
    """The sample prompts with their settings resolved: prompt i defaults to seed sample_seed + i. ``prompts``:
    the entries of cfg.sample_prompts as read once (a run samples the prompts it checked, even if a prompts file
    changes later); None reads them now."""
    w, h = cfg.sample_size
    specs = []
    entries = read_prompt_entries(cfg.sample_prompts) if prompts is None else prompts
    for i, e in enumerate(entries):
        spec = SampleSpec(
            prompt=e.prompt, negative_prompt=_pick(e.negative_prompt, cfg.sample_negative_prompt),
            width=_pick(e.width, w), height=_pick(e.height, h), seed=_pick(e.seed, cfg.sample_seed + i),
            steps=_pick(e.steps, cfg.sample_steps), guidance_scale=_pick(e.guidance_scale, cfg.sample_guidance_scale),
            sampler=_pick(e.sampler, cfg.sample_sampler))
        specs.append(dataclasses.replace(spec, label=_label(spec, e)))
    return specs


def _pick(own: Any, default: Any) -> Any:
    return default if own is None else own


def _label(spec: SampleSpec, entry: PromptEntry) -> str:
    """The prompt, then what this prompt sets itself in brackets (the grid's header says nothing about them)."""
    own = entry.own_settings()
    parts = []
    if "width" in own or "height" in own:
        parts.append(f"{spec.width}x{spec.height}")
    for name, text in (("seed", f"seed {spec.seed}"), ("guidance_scale", f"cfg {spec.guidance_scale:g}"),
                       ("steps", f"{spec.steps} steps"), ("sampler", spec.sampler),
                       ("negative_prompt", f"neg: {spec.negative_prompt}")):
        if name in own:
            parts.append(text)
    return spec.prompt + (f" [{', '.join(parts)}]" if parts else "")


def row_labels(cfg: TrainConfig, prompts: Sequence[PromptEntry] | None = None) -> list[str]:
    return [s.label for s in sample_specs(cfg, prompts)]


def _is_flow(pipe: Any) -> bool:
    """An SD 3.x pipeline: a flow-matching transformer instead of a UNet."""
    return getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None


def _sampler(pipe: Any, name: str, base: Any) -> Any:
    """The scheduler of a sample: sample_sampler on the UNet families. SD 3.x samples with its own flow-matching
    Euler scheduler, as kohya's SD3 sampler does whatever sample_sampler says (the SD samplers do not integrate a
    flow)."""
    return base if _is_flow(pipe) else schedulers.make_scheduler(name, base.config)[0]


def sample_images(pipe: Any, cfg: TrainConfig, prompts: Sequence[PromptEntry] | None = None) -> list[Image.Image]:
    """One image per sample prompt from the pipeline as it is now (eval mode: no rank/module dropout)."""
    models = [m for m in (getattr(pipe, "unet", None), getattr(pipe, "transformer", None), pipe.text_encoder,
                          getattr(pipe, "text_encoder_2", None), getattr(pipe, "text_encoder_3", None)) if m is not None]
    pipe.set_progress_bar_config(disable=True)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    old_scheduler = pipe.scheduler
    images = []
    try:
        with torch.no_grad():
            for spec in sample_specs(cfg, prompts):
                pipe.scheduler = _sampler(pipe, spec.sampler, old_scheduler)
                gen = torch.Generator().manual_seed(spec.seed)
                latents = pipe(**_prompt_kwargs(pipe, cfg, spec), num_inference_steps=spec.steps,
                               guidance_scale=spec.guidance_scale, width=spec.width, height=spec.height,
                               generator=gen, output_type="latent").images
                pixels = decode_latents(pipe.vae, latents)
                images.append(pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0])
    finally:
        pipe.scheduler = old_scheduler
        for m, mode in zip(models, was_training):
            m.train(mode)
    return images


def same_size_columns(columns: Sequence[tuple[str, Sequence[Image.Image]]]) -> list[tuple[str, list[Image.Image]]]:
    """Prompts with their own --w/--h: every picture centred on a white cell of the largest size, so the grid
    shows each at its own aspect ratio instead of stretching it."""
    sizes = {im.size for _, images in columns for im in images}
    if len(sizes) <= 1:
        return [(label, list(images)) for label, images in columns]
    w, h = max(s[0] for s in sizes), max(s[1] for s in sizes)

    def pad(im: Image.Image) -> Image.Image:
        cell = Image.new("RGB", (w, h), "white")
        cell.paste(im.convert("RGB"), ((w - im.width) // 2, (h - im.height) // 2))
        return cell

    return [(label, [pad(im) for im in images]) for label, images in columns]


def sample_grid_image(columns: Sequence[tuple[str, Sequence[Image.Image]]], cfg: TrainConfig,
                      prompts: Sequence[PromptEntry] | None = None) -> Image.Image:
    """The labelled grid of sample columns: one row per prompt."""
    return column_grid(same_size_columns(columns), row_labels(cfg, prompts))


def strength_label(step: int, strength: float) -> str:
    return "base (strength 0)" if strength == 0 else f"step {step} @ {strength:g}"


def sampling_key(cfg: TrainConfig, prompts: Sequence[PromptEntry] | None = None) -> tuple:
    """Everything the sample images depend on besides the weights (when the base images must be redone): each
    prompt's resolved settings, and the clip_skip of the conditioning."""
    return (tuple(sample_specs(cfg, prompts)), cfg.clip_skip)


def _prompt_kwargs(pipe: Any, cfg: TrainConfig, spec: SampleSpec) -> dict[str, Any]:
    """The pipeline's prompt arguments, with the clip_skip the adapter was trained with.

    clip_skip 1 is the pipelines' default. Above it, SDXL takes diffusers' own clip_skip (which counts skipped
    layers: ours minus one). The SD 1.x/2.x pipeline's clip_skip path reads `text_encoder.text_model`, which
    transformers 5's CLIPTextModel no longer has, so for those the embeddings come from the trainer's own
    encoder (prompt and negative prompt both skip layers, as in A1111).
    """
    prompt, negative = spec.prompt, spec.negative_prompt or None
    # SD 3.x: T5's prompt length as trained
    extra = {"max_sequence_length": cfg.t5xxl_max_token_length} if _is_flow(pipe) else {}
    if cfg.clip_skip <= 1:
        return {"prompt": prompt, "negative_prompt": negative, **extra}
    if getattr(pipe, "text_encoder_2", None) is not None:
        return {"prompt": prompt, "negative_prompt": negative, "clip_skip": cfg.clip_skip - 1, **extra}
    encode = Conditioner(pipe, sdxl=False, clip_skip=cfg.clip_skip, train_text_encoder=False)
    device = pipe.unet.device  # SD 1.x / 2.x only
    return {"prompt_embeds": encode([prompt], device)["encoder_hidden_states"],
            "negative_prompt_embeds": encode([negative or ""], device)["encoder_hidden_states"]}


class RunSamples:
    """The sample grids of one run, in `folder`: at each sample event the prompts (rows) at each of
    sample_strengths (columns) with the weights the file will hold, and at the end the progress grid (the base,
    then every sample event at the last strength). The base pictures (strength 0) are made once per sampling
    settings. The settings are read from the config passed at each call, so they may change between calls."""

    def __init__(self, pipe: Any, network: Any, folder: Path,
                 file_weights: Callable[[], AbstractContextManager]) -> None:
        self.pipe, self.network, self.folder, self.file_weights = pipe, network, Path(folder), file_weights
        self._base: tuple[tuple, list[Image.Image]] | None = None  # (sampling settings, images)
        self._progress: list[tuple[str, list[Image.Image]]] = []  # (label, images at the last strength) per event
        self._prompts: tuple[tuple[str, ...], list[PromptEntry]] | None = None  # (sample_prompts, entries)

    def prompts(self, cfg: TrainConfig) -> list[PromptEntry]:
        """The entries of cfg.sample_prompts, prompts files read once per list of prompts (at the first samples),
        so a prompts file edited during the run neither changes nor breaks its later samples."""
        key = tuple(cfg.sample_prompts)
        if self._prompts is None or self._prompts[0] != key:
            self._prompts = (key, read_prompt_entries(key))
        return self._prompts[1]

    def base_images(self, cfg: TrainConfig) -> list[Image.Image]:
        """The sample prompts from the base model (the adapter at strength 0)."""
        key = sampling_key(cfg, self.prompts(cfg))
        if self._base is None or self._base[0] != key:
            self._base = (key, self._at_strength(cfg, 0.0))
        return self._base[1]

    def _at_strength(self, cfg: TrainConfig, strength: float) -> list[Image.Image]:
        self.network.set_multiplier(strength)
        try:
            return sample_images(self.pipe, cfg, self.prompts(cfg))
        finally:
            self.network.set_multiplier(1.0)

    def strength_columns(self, cfg: TrainConfig, step: int) -> list[tuple[str, list[Image.Image]]]:
        """The sample prompts at each of sample_strengths, with the weights the file will hold (EMA if on)."""
        with self.file_weights():
            return [(strength_label(step, strength),
                     self.base_images(cfg) if strength == 0 else self._at_strength(cfg, strength))
                    for strength in cfg.sample_strengths]

    def step_grid(self, cfg: TrainConfig, step: int, tag: str) -> tuple[Image.Image, Path] | None:
        """samples/<tag>.png, the grid of this step (None without sample prompts)."""
        if not cfg.sample_prompts:
            return None
        columns = self.strength_columns(cfg, step)
        grid = sample_grid_image(columns, cfg, self.prompts(cfg))
        path = save_image_atomic(grid, self.folder / f"{tag}.png")
        self._progress.append((f"step {step}", columns[-1][1]))
        return grid, path

    @property
    def has_progress(self) -> bool:
        """Two sample events or more: with one, the progress grid would repeat the last grid."""
        return len(self._progress) >= 2

    def progress_grid(self, cfg: TrainConfig) -> tuple[Image.Image, Path] | None:
        """samples/progress.png (None before two sample events: it would repeat the last grid)."""
        if not self.has_progress:
            return None
        grid = sample_grid_image([(strength_label(0, 0.0), self.base_images(cfg)), *self._progress], cfg,
                                 self.prompts(cfg))
        return grid, save_image_atomic(grid, self.folder / "progress.png")
