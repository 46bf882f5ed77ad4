"""What the denoiser is trained on: the noise schedule, the noise, the timesteps, and the noisy latents built
from them.

Each is one function of the config, so a noise option (offset, multi-resolution noise, input perturbation, a
timestep range, ...) is a term inside one of them, not a branch in the training step. The formulas are kohya
sd-scripts' (library/train_util.py get_noise_noisy_latents_and_timesteps, library/custom_train_functions.py);
every random draw takes the caller's generator, so a seeded step is reproducible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .loss import PREDICTION_ONLY, prediction_mismatch

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from .config import TrainConfig

__all__ = ["OBJECTIVE_OPTIONS", "noisy_latents", "offset_strength", "plain_objective", "pyramid_noise", "sample_noise",
           "sample_timesteps", "training_scheduler"]

#: the options that shape the training objective (noise, timesteps, per-sample weights) but not the model, so a
#: held-out loss comparable between runs leaves them at their defaults; zero_terminal_snr is the schedule the
#: model is trained for and stays
OBJECTIVE_OPTIONS: tuple[str, ...] = (
    "noise_offset", "noise_offset_random_strength", "adaptive_noise_scale", "multires_noise_iterations",
    "ip_noise_gamma", "ip_noise_gamma_random_strength", "min_timestep", "max_timestep",
    "min_snr_gamma", "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss",
    "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "training_shift", "precondition_outputs",
)


def plain_objective(cfg: TrainConfig) -> TrainConfig:
    """A copy of ``cfg`` with :data:`OBJECTIVE_OPTIONS` at their defaults: the plain denoising objective (Gaussian
    noise, uniform timesteps, unweighted loss), for a validation loss that does not move with those options."""
    from .config import OPTIONS

    return dataclasses.replace(cfg, **{name: OPTIONS[name].default for name in OBJECTIVE_OPTIONS})


def _randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # drawn on the CPU so a CPU generator seeds it on any device
    return torch.randn(shape, generator=generator).to(device)


def _rand1(generator: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=generator))


def training_scheduler(cfg: TrainConfig, scheduler_config: Mapping[str, Any]) -> DDPMScheduler:
    """The DDPM schedule the training noise follows, from the base model's scheduler config; zero_terminal_snr
    rescales its betas so that ᾱ at the last timestep is 0 (diffusers' rescale_betas_zero_snr, Lin et al. 2023
    Algorithm 1, the same as kohya's fix_noise_scheduler_betas_for_zero_terminal_snr).

    Raises :class:`~sd_loha.train.config.ConfigError` when an option does not fit the model's prediction type
    or its number of timesteps, the part of the config that can only be checked once the model is known."""
    from diffusers import DDPMScheduler

    from .config import ConfigError, Problem

    extra = {"rescale_betas_zero_snr": True} if cfg.zero_terminal_snr else {}
    scheduler = DDPMScheduler.from_config(scheduler_config, **extra)
    kind, steps = scheduler.config.prediction_type, scheduler.config.num_train_timesteps
    source = (f"v_parameterization = {str(cfg.v_parameterization).lower()}" if cfg.v_parameterization is not None
              else f"the base model's scheduler (prediction_type = '{kind}')")
    problems = [Problem(None, *bad) for name in PREDICTION_ONLY
                if getattr(cfg, name) and (bad := prediction_mismatch(name, kind, source))]
    for name, limit in (("min_timestep", steps - 1), ("max_timestep", steps)):  # the range is [min, max)
        value = getattr(cfg, name)
        if value is not None and value > limit:
            problems.append(Problem(None, f"{name} = {value} is past the base model's {steps} training timesteps",
                                    f"use {name} <= {limit}"))
    if problems:
        raise ConfigError(problems, header=f"the training config does not fit the base model {cfg.pretrained_model}")
    return scheduler


def offset_strength(cfg: TrainConfig, latents: torch.Tensor,
                    generator: torch.Generator | None = None) -> float | torch.Tensor:
    """noise_offset's strength: the value itself, or uniform in [0, noise_offset) once per batch with
    noise_offset_random_strength; plus adaptive_noise_scale · |mean of each latent channel| per sample and
    channel, clamped at 0 (kohya's apply_noise_offset)."""
    strength: float | torch.Tensor = cfg.noise_offset
    if cfg.noise_offset_random_strength:
        strength = _rand1(generator) * cfg.noise_offset
    if cfg.adaptive_noise_scale is not None:
        channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        strength = torch.clamp(strength + cfg.adaptive_noise_scale * channel_mean, min=0.0)
    return strength


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """kohya's pyramid_noise_like (multi-resolution noise, Whitaker): add, for i = 0, 1, ..., noise drawn at the
    size divided by r^i (r uniform in [2, 4) per level), bilinearly upsampled and scaled by discount^i; stop after
    ``iterations`` levels or at a 1-pixel side; then divide by the std of the whole batch."""
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = _rand1(generator) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = _randn((b, c, hn, wn), generator, noise.device)
        noise = noise + F.interpolate(level, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def sample_noise(cfg: TrainConfig, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise the UNet must predict: Gaussian, plus noise_offset (one random value per sample and channel,
    Guttenberg's offset noise: lets the model learn overall brightness; strength from :func:`offset_strength`),
    then multi-resolution noise (:func:`pyramid_noise`), in kohya's order."""
    bsz, channels = latents.shape[:2]
    noise = _randn(latents.shape, generator, latents.device)
    if cfg.noise_offset:
        strength = offset_strength(cfg, latents, generator)
        noise = noise + strength * _randn((bsz, channels, 1, 1), generator, latents.device)
    if cfg.multires_noise_iterations:
        noise = pyramid_noise(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, generator)
    return noise


def sample_timesteps(cfg: TrainConfig, scheduler, batch_size: int, device: torch.device | str,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One training timestep per sample, uniform over [min_timestep, max_timestep) (defaults: 0 and the
    scheduler's number of timesteps); all equal to max_timestep when min_timestep = max_timestep (kohya's
    get_timesteps)."""
    low = cfg.min_timestep or 0
    high = scheduler.config.num_train_timesteps if cfg.max_timestep is None else cfg.max_timestep
    if low < high:
        return torch.randint(low, high, (batch_size,), generator=generator).to(device)
    return torch.full((batch_size,), high, dtype=torch.long, device=device)


def noisy_latents(cfg: TrainConfig, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The UNet's input: the latents noised to each sample's timestep by the scheduler. With ip_noise_gamma γ
    (input perturbation, Ning et al. 2023) the noise added is noise + γ · N(0, 1) while the target stays
    ``noise``; γ is drawn uniformly from [0, ip_noise_gamma) once per batch with ip_noise_gamma_random_strength."""
    if cfg.ip_noise_gamma:
        gamma = _rand1(generator) * cfg.ip_noise_gamma if cfg.ip_noise_gamma_random_strength else cfg.ip_noise_gamma
        noise = noise + gamma * _randn(latents.shape, generator, latents.device)
    return scheduler.add_noise(latents, noise, timesteps)
