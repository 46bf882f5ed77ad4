"""Flow matching (SD 3.x, rectified flow): the timesteps, the noisy input, the target and the loss weights.

The model sees x_σ = (1 - σ)·x0 + σ·noise and predicts the velocity noise - x0. σ comes from diffusers' own
``compute_density_for_timestep_sampling`` (weighting_scheme logit_normal / mode / uniform, with logit_mean,
logit_std, mode_scale), then kohya's training_shift σ' = sσ / (1 + (s - 1)σ) (the same shift the
FlowMatchEulerDiscreteScheduler applies at inference), then min_timestep / max_timestep, as kohya sd-scripts'
sd3_train_utils.get_noisy_model_input_and_timesteps does, except that the timestep stays a real number (kohya
truncates it to an integer; diffusers' schedule tables hold real timesteps too). The transformer's timestep is
1000σ. σ = 1 is pure noise, as in the SD3 paper and kohya; diffusers' training example instead reads its
descending schedule table at index 1000u, which is the same distribution for the symmetric schemes (uniform,
mode, logit_mean = 0) and the mirror image for logit_mean ≠ 0.

The loss weights are diffusers' ``compute_loss_weighting_for_sd3`` (sigma_sqrt: σ⁻², cosmap: 2/(π(1 - 2σ + 2σ²)),
otherwise 1). With precondition_outputs (diffusers' name; kohya always does it) the prediction becomes an x0
estimate, x_σ - σ·pred, compared with x0: that is the velocity loss weighted by σ².
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FLOW_DIFFUSERS", "FLOW_TIMESTEPS", "WEIGHTING_SCHEMES", "FlowDraw", "flow_input", "flow_target", "flow_weights",
           "sample_flow_sigmas", "shift_sigmas"]

#: weighting_scheme's values (diffusers' and kohya's; kohya's "uniform" is an alias of "none"): which draw σ
#: (logit_normal, mode) and which weight the loss (sigma_sqrt, cosmap); "none" does neither
WEIGHTING_SCHEMES: tuple[str, ...] = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
#: SD 3.x's timesteps per unit σ (its FlowMatchEulerDiscreteScheduler's num_train_timesteps)
FLOW_TIMESTEPS = 1000
#: compute_density_for_timestep_sampling takes a generator (seeded, resumable draws) from this diffusers on
FLOW_DIFFUSERS = (0, 33)


@dataclass(frozen=True)
class FlowDraw:
    """One batch's draw: σ per sample (batch,) and the transformer's timestep 1000σ."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """kohya's training_shift (diffusers' FlowMatchEulerDiscreteScheduler shift): sσ / (1 + (s - 1)σ); s > 1 moves
    σ towards noise (composition), s < 1 towards the image (detail)."""
    return sigmas * shift / (1 + (shift - 1) * sigmas)


def sample_flow_sigmas(cfg: Any, batch_size: int, device: torch.device | str,
                       generator: torch.Generator | None = None) -> FlowDraw:
    """σ and the timestep of each sample, from the config's weighting_scheme, logit_mean, logit_std, mode_scale,
    training_shift, min_timestep and max_timestep (see the module docstring)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(cfg.weighting_scheme, batch_size, logit_mean=cfg.logit_mean,
                                              logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
                                              generator=generator)
    u = shift_sigmas(u.float(), cfg.training_shift)
    low = cfg.min_timestep or 0
    high = FLOW_TIMESTEPS if cfg.max_timestep is None else cfg.max_timestep
    timesteps = (u * (high - low) + low).to(device)
    return FlowDraw(timesteps / FLOW_TIMESTEPS, timesteps)


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(like.device, torch.float32).view(-1, *([1] * (like.dim() - 1)))


def flow_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The transformer's input (1 - σ)·x0 + σ·noise, in fp32."""
    s = _per_sample(sigmas, latents)
    return (1.0 - s) * latents.float() + s * noise.float()


def flow_target(pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, noisy: torch.Tensor,
                sigmas: torch.Tensor, *, precondition: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) to compare: the velocity and noise - x0, or with ``precondition`` the x0 estimate
    noisy - σ·pred and x0 (diffusers' train_dreambooth_lora_sd3 precondition_outputs; kohya's SD3 trainer)."""
    if precondition:
        return noisy.float() - _per_sample(sigmas, pred) * pred.float(), latents.float()
    return pred.float(), noise.float() - latents.float()


def flow_weights(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """The per-sample loss weight (batch,) of diffusers' compute_loss_weighting_for_sd3. σ is floored at 1/1000
    (the smallest σ of SD3's schedule table) so that sigma_sqrt's σ⁻² stays finite at a draw of exactly 0."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    floored = sigmas.float().clamp(min=1.0 / FLOW_TIMESTEPS)
    return compute_loss_weighting_for_sd3(weighting_scheme, floored).float().flatten()
