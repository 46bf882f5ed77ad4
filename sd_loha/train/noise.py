"""What the denoiser is trained on: the noise, the timesteps, and the noisy latents built from them.

Each is one function of the config, so a noise option (offset, multi-resolution noise, input perturbation, a
timestep range, ...) is a term inside one of them, not a branch in the training step.
"""

from __future__ import annotations

import torch

from .config import TrainConfig

__all__ = ["noisy_latents", "sample_noise", "sample_timesteps"]


def sample_noise(cfg: TrainConfig, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise the UNet must predict: Gaussian, plus noise_offset (one random value per sample and channel,
    Guttenberg's offset noise: lets the model learn overall brightness)."""
    bsz, channels = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn((bsz, channels, 1, 1), generator=generator).to(latents.device)
    return noise


def sample_timesteps(cfg: TrainConfig, scheduler, batch_size: int, device: torch.device | str,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One training timestep per sample, uniform over the scheduler's range."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator).to(device)


def noisy_latents(cfg: TrainConfig, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The UNet's input: the latents noised to each sample's timestep by the scheduler."""
    return scheduler.add_noise(latents, noise, timesteps)
