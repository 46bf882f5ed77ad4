"""Sample images during training: the live network, fixed seeds, one labelled grid per call.

The pipeline runs its UNet and text encoders in the training dtype (fp16/bf16 under mixed precision) and
stops at the latents; the VAE decodes them in its own dtype (fp32: fp16 VAEs overflow to NaN), so mixed
precision never feeds half-precision latents into fp32 convolutions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import schedulers
from ..atomic import save_image_atomic
from .conditioning import Conditioner
from .config import TrainConfig
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


def sample_images(pipe: Any, cfg: TrainConfig) -> list[Image.Image]:
    """One image per sample prompt from the pipeline as it is now (eval mode: no rank/module dropout)."""
    models = [m for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    pipe.set_progress_bar_config(disable=True)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    old_scheduler = pipe.scheduler
    pipe.scheduler, _ = schedulers.make_scheduler(cfg.sample_sampler, old_scheduler.config)
    w, h = cfg.sample_size
    images = []
    try:
        with torch.no_grad():
            for i, prompt in enumerate(cfg.sample_prompts):
                gen = torch.Generator().manual_seed(cfg.sample_seed + i)
                latents = pipe(**_prompt_kwargs(pipe, cfg, prompt), num_inference_steps=cfg.sample_steps,
                               guidance_scale=cfg.sample_guidance_scale, width=w, height=h, generator=gen,
                               output_type="latent").images
                pixels = decode_latents(pipe.vae, latents)
                images.append(pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0])
    finally:
        pipe.scheduler = old_scheduler
        for m, mode in zip(models, was_training):
            m.train(mode)
    return images


def sample_grid(pipe: Any, cfg: TrainConfig, path: Path, *, base: list[Image.Image] | None = None,
                label: str = "adapter") -> Path:
    """The sample prompts' images as one labelled PNG, written atomically: one row per prompt, and with `base`
    (the same prompts and seeds from the base model) a base column before the pipeline's."""
    columns = [("base", base)] if base is not None else []
    columns.append((label, sample_images(pipe, cfg)))
    return save_image_atomic(column_grid(columns, cfg.sample_prompts), path)


def strength_label(step: int, strength: float) -> str:
    return "base (strength 0)" if strength == 0 else f"step {step} @ {strength:g}"


def sampling_key(cfg: TrainConfig) -> tuple:
    """Everything the sample images depend on besides the weights (when the base images must be redone)."""
    return (tuple(cfg.sample_prompts), cfg.sample_negative_prompt, cfg.sample_seed, cfg.sample_steps,
            cfg.sample_guidance_scale, cfg.sample_size, cfg.sample_sampler, cfg.clip_skip)


def _prompt_kwargs(pipe: Any, cfg: TrainConfig, prompt: str) -> dict[str, Any]:
    """The pipeline's prompt arguments, with the clip_skip the adapter was trained with.

    clip_skip 1 is the pipelines' default. Above it, SDXL takes diffusers' own clip_skip (which counts skipped
    layers: ours minus one). The SD 1.x/2.x pipeline's clip_skip path reads `text_encoder.text_model`, which
    transformers 5's CLIPTextModel no longer has, so for those the embeddings come from the trainer's own
    encoder (prompt and negative prompt both skip layers, as in A1111).
    """
    negative = cfg.sample_negative_prompt or None
    if cfg.clip_skip <= 1:
        return {"prompt": prompt, "negative_prompt": negative}
    if getattr(pipe, "text_encoder_2", None) is not None:
        return {"prompt": prompt, "negative_prompt": negative, "clip_skip": cfg.clip_skip - 1}
    encode = Conditioner(pipe, sdxl=False, clip_skip=cfg.clip_skip, train_text_encoder=False)
    device = pipe.unet.device
    return {"prompt_embeds": encode([prompt], device)["encoder_hidden_states"],
            "negative_prompt_embeds": encode([negative or ""], device)["encoder_hidden_states"]}
