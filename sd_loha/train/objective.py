"""The training objective of each model family, one class each: what a step draws (noise, timesteps, the noisy
input), how the denoiser is called, and the loss against its target.

- :class:`DenoisingObjective`: SD 1.x / 2.x / SDXL, a UNet trained on the DDPM schedule (noise.py, loss.py).
- :class:`FlowObjective`: SD 3.x, an MMDiT trained by flow matching (flow.py).

:data:`OBJECTIVES` picks one by the family's prediction type, so the training step is the same three calls for
every family: ``draw``, ``predict``, ``loss``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .flow import flow_input, flow_target, flow_weights, sample_flow_sigmas
from .loss import LossWeighting, diffusion_loss, huber_threshold, per_sample_loss
from .noise import noisy_latents, sample_noise, sample_timesteps, training_scheduler

if TYPE_CHECKING:
    from ..models import ModelFamily
    from .config import TrainConfig

__all__ = ["OBJECTIVES", "DenoisingObjective", "Draw", "FlowObjective", "training_objective"]


@dataclass(frozen=True)
class Draw:
    """What one step drew: the noise, the denoiser's timesteps and input, and (flow matching) σ per sample."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    sigmas: torch.Tensor | None = None


class DenoisingObjective:
    """ε- or v-prediction on the DDPM schedule of the base model's scheduler config (a UNet)."""

    def __init__(self, cfg: TrainConfig, scheduler_config: Mapping[str, Any]) -> None:
        self.scheduler = training_scheduler(cfg, scheduler_config)

    def draw(self, cfg: TrainConfig, latents: torch.Tensor, generator: torch.Generator | None = None) -> Draw:
        noise = sample_noise(cfg, latents, generator)
        timesteps = sample_timesteps(cfg, self.scheduler, latents.shape[0], latents.device, generator)
        return Draw(noise, timesteps, noisy_latents(cfg, self.scheduler, latents, noise, timesteps, generator))

    @staticmethod
    def predict(model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Mapping[str, Any]) -> torch.Tensor:
        return model(noisy, timesteps, cond["encoder_hidden_states"], added_cond_kwargs=cond["added_cond_kwargs"]).sample

    def loss(self, cfg: TrainConfig, pred: torch.Tensor, latents: torch.Tensor, draw: Draw, *,
             mask: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        return diffusion_loss(self.scheduler, pred, latents, draw.noise, draw.timesteps, loss_type=cfg.loss_type,
                              huber_c=cfg.huber_c, huber_schedule=cfg.huber_schedule, huber_scale=cfg.huber_scale,
                              weighting=LossWeighting.from_config(cfg), mask=mask, sample_weights=sample_weights)


class FlowObjective:
    """Rectified flow (SD 3.x's MMDiT): see flow.py. The scheduler is the base model's FlowMatchEulerDiscrete one,
    used for its number of timesteps (huber_schedule exponential)."""

    def __init__(self, cfg: TrainConfig, scheduler_config: Mapping[str, Any]) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def draw(self, cfg: TrainConfig, latents: torch.Tensor, generator: torch.Generator | None = None) -> Draw:
        noise = sample_noise(cfg, latents, generator)  # Gaussian, with noise_offset / multires noise when set
        drawn = sample_flow_sigmas(cfg, latents.shape[0], latents.device, generator)
        return Draw(noise, drawn.timesteps, flow_input(latents, noise, drawn.sigmas), drawn.sigmas)

    @staticmethod
    def predict(model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Mapping[str, Any]) -> torch.Tensor:
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    def loss(self, cfg: TrainConfig, pred: torch.Tensor, latents: torch.Tensor, draw: Draw, *,
             mask: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        assert draw.sigmas is not None
        pred, target = flow_target(pred, latents, draw.noise, draw.noisy, draw.sigmas,
                                   precondition=cfg.precondition_outputs)
        c: float | torch.Tensor = cfg.huber_c
        if cfg.loss_type in ("huber", "smooth_l1"):
            c = huber_threshold(self.scheduler, draw.timesteps, huber_c=cfg.huber_c, schedule=cfg.huber_schedule,
                                huber_scale=cfg.huber_scale)
        weights = flow_weights(cfg.weighting_scheme, draw.sigmas).to(pred.device)
        if sample_weights is not None:
            weights = weights * sample_weights.to(weights.device, weights.dtype)
        return (per_sample_loss(pred, target, cfg.loss_type, c, mask) * weights).mean()


#: the objective of each prediction type (ModelFamily.prediction_type)
OBJECTIVES: dict[str, type[DenoisingObjective] | type[FlowObjective]] = {
    "epsilon": DenoisingObjective, "v_prediction": DenoisingObjective, "flow": FlowObjective,
}


def training_objective(cfg: TrainConfig, family: ModelFamily,
                       scheduler_config: Mapping[str, Any]) -> DenoisingObjective | FlowObjective:
    """The objective a run trains ``family`` with; raises ConfigError when the config's family-only options do not
    fit the model (checked here once the model is known, as a hub id is not known before it loads)."""
    from .config import ConfigError
    from .config.rules import family_problems

    problems = family_problems(cfg, family.name)
    if problems:
        raise ConfigError(problems, header=f"the training config does not fit the base model {cfg.pretrained_model} "
                                           f"({family.label})")
    return OBJECTIVES[family.prediction_type](cfg, scheduler_config)
