"""The denoising loss: prediction target from the scheduler, L2/Huber per sample, min-SNR-γ weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} in the base model's scheduler (epsilon or v_prediction)")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Hang et al. 2023: weight = min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v-prediction."""
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.1) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        elem = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "huber":
        elem = 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    elif loss_type == "smooth_l1":
        elem = 2 * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return elem.mean(dim=tuple(range(1, elem.dim())))


def diffusion_loss(scheduler, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, *,
                   loss_type: str = "l2", huber_c: float = 0.1, min_snr_gamma: float | None = None) -> torch.Tensor:
    losses = per_sample_loss(pred, target_for(scheduler, latents, noise, timesteps), loss_type, huber_c)
    if min_snr_gamma:
        losses = losses * min_snr_weights(scheduler, timesteps, min_snr_gamma)
    return losses.mean()
