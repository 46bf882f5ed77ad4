"""The denoising loss: prediction target from the scheduler, L2 or pseudo-Huber per sample (with kohya's
per-timestep Huber threshold), then the per-sample weights.

Every per-sample weighting scheme (min-SNR-γ, debiased estimation, kohya's v-prediction-like scalings) goes
through :func:`loss_weights`, which turns a :class:`LossWeighting` (the schemes' settings), the scheduler and
the timesteps into one weight per sample, in the spirit of diffusers' ``compute_loss_weighting_for_sd3``; a new
scheme is one more factor there and one more field of :class:`LossWeighting`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "HUBER_SCHEDULES",
    "LOSS_TYPES",
    "PREDICTION_ONLY",
    "LossWeighting",
    "diffusion_loss",
    "huber_threshold",
    "loss_weights",
    "masked_mean",
    "min_snr_weights",
    "per_sample_loss",
    "prediction_mismatch",
    "snr",
    "target_for",
]

LOSS_TYPES: tuple[str, ...] = ("l2", "huber", "smooth_l1")
#: kohya sd-scripts' huber_schedule values; the first is its default
HUBER_SCHEDULES: tuple[str, ...] = ("snr", "exponential", "constant")
#: kohya caps the SNR at 1000 in its debiased and v-prediction-like weights (SNR(t = 0) is about 1175 on SD's
#: schedule, and infinite on a schedule whose ᾱ_0 is 1)
SNR_CAP = 1000.0

#: options that fit one prediction type only: option -> (the prediction type it needs, why). kohya refuses
#: scale_v_pred_loss_like_noise_pred without v_parameterization and v_pred_like_loss with it, and warns that
#: zero_terminal_snr without it "will be unexpected"; here all three are errors.
PREDICTION_ONLY: dict[str, tuple[str, str]] = {
    "zero_terminal_snr": (
        "v_prediction",
        "the rescaled schedule's last timestep is pure noise, where an ε-prediction model's input is its target "
        "(nothing to learn), the image it implies divides by sqrt(ᾱ) = 0 and its SNR weights by SNR = 0; Lin et "
        "al. 2023 pair it with v-prediction"),
    "scale_v_pred_loss_like_noise_pred": ("v_prediction", "it rescales a v-prediction loss to ε-prediction's size"),
    "v_pred_like_loss": ("epsilon", "it adds a v-prediction-sized copy of an ε-prediction loss"),
}
_PREDICTION_NAMES = {"epsilon": "ε-prediction", "v_prediction": "v-prediction"}


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


def prediction_mismatch(option: str, prediction_type: str, source: str) -> tuple[str, str] | None:
    """(message, fix) when ``option`` (a key of :data:`PREDICTION_ONLY`) does not fit ``prediction_type``,
    which ``source`` says where it comes from (``v_parameterization = false``, the base model's scheduler)."""
    needs, why = PREDICTION_ONLY[option]
    if prediction_type == needs:
        return None
    have, want = _PREDICTION_NAMES.get(prediction_type, prediction_type), _PREDICTION_NAMES[needs]
    if needs == "v_prediction":
        fix = (f"train a v-prediction model (v_parameterization = true, or a model whose scheduler says "
               f"prediction_type = 'v_prediction'), or remove {option}")
    else:
        fix = f"remove {option}, or set v_parameterization = false if the model really is an ε-prediction model"
    return f"{option} needs a {want} model but {source} makes this run {have}: {why}", fix


@dataclass(frozen=True)
class LossWeighting:
    """The settings of the per-sample weighting schemes, with kohya's option names; every one off by default.
    The weights multiply, as kohya applies them one after the other to the same per-sample loss."""

    min_snr_gamma: float | None = None
    debiased_estimation_loss: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> LossWeighting:
        """The settings from a TrainConfig (or anything with these attributes)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def _capped_snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    return torch.clamp(snr(scheduler, timesteps), max=SNR_CAP)


def loss_weights(scheduler, timesteps: torch.Tensor, weighting: LossWeighting | None = None) -> torch.Tensor:
    """The weight of each sample's loss, shape (batch,): the product of the schemes that are on (kohya's
    formulas; SNR = ᾱ_t/(1 - ᾱ_t) of the scheduler, capped at 1000 where kohya caps it):

    - min_snr_gamma γ: min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v-prediction (uncapped SNR).
    - scale_v_pred_loss_like_noise_pred: SNR/(SNR + 1), a v-prediction loss brought to ε-prediction's scale.
    - v_pred_like_loss k: 1 + k (SNR + 1)/SNR, kohya's loss + k · loss/scale.
    - debiased_estimation_loss: 1/sqrt(SNR) for ε-prediction, 1/(SNR + 1) for v-prediction.
    """
    w = weighting or LossWeighting()
    weights = torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    if w.min_snr_gamma:
        weights = weights * min_snr_weights(scheduler, timesteps, w.min_snr_gamma)
    if not (w.scale_v_pred_loss_like_noise_pred or w.v_pred_like_loss or w.debiased_estimation_loss):
        return weights
    s = _capped_snr(scheduler, timesteps)
    if w.scale_v_pred_loss_like_noise_pred:
        weights = weights * s / (s + 1.0)
    if w.v_pred_like_loss:
        weights = weights * (1.0 + w.v_pred_like_loss * (s + 1.0) / s)
    if w.debiased_estimation_loss:
        v = scheduler.config.prediction_type == "v_prediction"
        weights = weights * (1.0 / (s + 1.0) if v else 1.0 / s.sqrt())
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
    """Each sample's mean of the elementwise loss, the pixels weighted by the mask (1 everywhere without one).

    kohya's apply_masked_loss: a mask (batch, 1, H, W) of another size than the loss is first area-averaged to
    it, then mean(loss x mask) over channels and pixels; divided by the pixel count, not by the mask's sum, so
    a half-masked image contributes about half the loss of an unmasked one.
    """
    if mask is not None:
        mask = mask.to(elem.device, elem.dtype)
        if mask.shape[-2:] != elem.shape[-2:]:
            mask = F.interpolate(mask, size=elem.shape[-2:], mode="area")
        elem = elem * mask
    return elem.mean(dim=tuple(range(1, elem.dim())))


def diffusion_loss(scheduler, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, *,
                   loss_type: str = "l2", huber_c: float = 0.1, huber_schedule: str = HUBER_SCHEDULES[0],
                   huber_scale: float = 1.0, weighting: LossWeighting | None = None, mask: torch.Tensor | None = None,
                   sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's training loss: per-sample loss against the scheduler's target (over the mask's pixels), times
    the weighting schemes' per-sample weights (:func:`loss_weights`) and the batch's own (prior_loss_weight of
    regularization images), averaged."""
    c: float | torch.Tensor = huber_c
    if loss_type in ("huber", "smooth_l1"):
        c = huber_threshold(scheduler, timesteps, huber_c=huber_c, schedule=huber_schedule, huber_scale=huber_scale)
    losses = per_sample_loss(pred, target_for(scheduler, latents, noise, timesteps), loss_type, c, mask)
    weights = loss_weights(scheduler, timesteps, weighting)
    if sample_weights is not None:
        weights = weights * sample_weights.to(weights.device, weights.dtype)
    return (losses * weights).mean()
