"""The denoising loss: prediction target from the scheduler, L2 or pseudo-Huber per sample (with kohya's
per-timestep Huber threshold), then the per-sample weights (min-SNR-γ).

Every per-sample weighting scheme goes through :func:`loss_weights`, so a new one (debiased estimation,
...) is one more term there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "HUBER_SCHEDULES",
    "LOSS_TYPES",
    "diffusion_loss",
    "huber_threshold",
    "loss_weights",
    "masked_mean",
    "min_snr_weights",
    "per_sample_loss",
    "snr",
    "target_for",
]

LOSS_TYPES: tuple[str, ...] = ("l2", "huber", "smooth_l1")
#: kohya sd-scripts' huber_schedule values; the first is its default
HUBER_SCHEDULES: tuple[str, ...] = ("snr", "exponential", "constant")


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} in the base model's scheduler (epsilon or v_prediction)")


def _alphas_cumprod(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = _alphas_cumprod(scheduler, timesteps)
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Hang et al. 2023: weight = min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v-prediction."""
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def loss_weights(scheduler, timesteps: torch.Tensor, *, min_snr_gamma: float | None = None) -> torch.Tensor:
    """The weight of each sample's loss, shape (batch,): ones, times min-SNR-γ's weight when it is set."""
    weights = torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    if min_snr_gamma:
        weights = weights * min_snr_weights(scheduler, timesteps, min_snr_gamma)
    return weights


def huber_threshold(scheduler, timesteps: torch.Tensor, *, huber_c: float, schedule: str = "snr",
                    huber_scale: float = 1.0) -> torch.Tensor:
    """The pseudo-Huber threshold c of each sample, shape (batch,), as kohya sd-scripts' huber_schedule defines it.

    - snr: c(t) = (1 - huber_c) / (1 + σ_t)² + huber_c, σ_t = sqrt((1 - ᾱ_t) / ᾱ_t): near 1 (almost L2 for
      latent-sized errors) where little noise was added, near huber_c (robust) where the image is mostly noise.
      Like kohya, huber_scale does not enter.
    - exponential: c(t) = huber_c^(t / T) · huber_scale, T = num_train_timesteps: from huber_scale at t = 0 to
      huber_c · huber_scale at t = T.
    - constant: c = huber_c · huber_scale.
    """
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, dtype=torch.float32, device=timesteps.device)
    if schedule == "exponential":
        rate = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-rate * timesteps.float()) * huber_scale
    if schedule == "snr":
        alphas_cumprod = _alphas_cumprod(scheduler, timesteps)
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
        return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    raise ValueError(f"unknown huber_schedule {schedule!r} (one of {', '.join(HUBER_SCHEDULES)})")


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    huber_c: float | torch.Tensor = 0.1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean elementwise loss of each sample, shape (batch,). ``huber_c``: one c, or one per sample. ``mask``:
    per-pixel weights at the latents' size (batch, 1, h, w), see :func:`masked_mean`."""
    pred, target = pred.float(), target.float()
    if isinstance(huber_c, torch.Tensor):
        huber_c = huber_c.float().view(-1, *([1] * (pred.dim() - 1)))
    if loss_type == "l2":
        elem = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "huber":
        elem = 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    elif loss_type == "smooth_l1":
        elem = 2 * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (one of {', '.join(LOSS_TYPES)})")
    return masked_mean(elem, mask)


def masked_mean(elem: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each sample's mean of the elementwise loss, the pixels weighted by the mask (1 everywhere without one)."""
    if mask is not None:
        elem = elem * mask.to(elem.device, elem.dtype)
    return elem.mean(dim=tuple(range(1, elem.dim())))


def diffusion_loss(scheduler, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, *,
                   loss_type: str = "l2", huber_c: float = 0.1, huber_schedule: str = HUBER_SCHEDULES[0],
                   huber_scale: float = 1.0, min_snr_gamma: float | None = None, mask: torch.Tensor | None = None,
                   sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's training loss: per-sample loss against the scheduler's target (over the mask's pixels), times
    the scheme's per-sample weights and the batch's own (prior_loss_weight of regularization images), averaged."""
    c: float | torch.Tensor = huber_c
    if loss_type in ("huber", "smooth_l1"):
        c = huber_threshold(scheduler, timesteps, huber_c=huber_c, schedule=huber_schedule, huber_scale=huber_scale)
    losses = per_sample_loss(pred, target_for(scheduler, latents, noise, timesteps), loss_type, c, mask)
    weights = loss_weights(scheduler, timesteps, min_snr_gamma=min_snr_gamma)
    if sample_weights is not None:
        weights = weights * sample_weights.to(weights.device, weights.dtype)
    return (losses * weights).mean()
