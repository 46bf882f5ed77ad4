"""kohya's formulas, written independently from their definitions in sd-scripts 48d368fa (Apache-2.0): the noise
and loss-weighting arithmetic of kohya-ss/sd-scripts, the reference the tests compare sd_loha.train.noise and
sd_loha.train.loss with. kohya's sd-scripts is not an installable package, so this module restates each
definition in its own code; every function names the file and function of sd-scripts it follows (paths at
commit 48d368fa) and comments the arithmetic details that decide the values.

Randomness: kohya draws the pyramid's scale r with Python's ``random.random()`` and everything else from torch's
global generator, each where its algorithm needs it. The functions here take a :class:`Draws` instead, asked in
kohya's order: :class:`SeededDraws` serves every draw from one seeded torch generator (the way sd-loha draws,
so a test can compare exact values), :class:`GlobalDraws` serves them from kohya's own sources.
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------- the draws


class Draws:
    """Where kohya's random values come from, one method per kind of draw kohya makes."""

    def scale(self) -> float:
        """A uniform value in [0, 1), as kohya's ``random.random()`` gives the pyramid's r."""
        raise NotImplementedError

    def uniform(self) -> torch.Tensor:
        """One uniform value in [0, 1), shape (1,): kohya's ``torch.rand(1)``."""
        raise NotImplementedError

    def normal(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal values on the CPU: kohya's ``torch.randn`` / ``torch.randn_like``."""
        raise NotImplementedError

    def integers(self, low: int, high: int, count: int) -> torch.Tensor:
        """``count`` integers uniform in [low, high) on the CPU: kohya's ``torch.randint``."""
        raise NotImplementedError


class SeededDraws(Draws):
    """Every draw from one torch generator, in the order the caller asks for them. The pyramid's r, a Python
    float in kohya, is one ``torch.rand(1)`` here: the same uniform law on [0, 1), with fp32's resolution."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def scale(self) -> float:
        return float(torch.rand(1, generator=self.generator))

    def uniform(self) -> torch.Tensor:
        return torch.rand(1, generator=self.generator)

    def normal(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=dtype)

    def integers(self, low: int, high: int, count: int) -> torch.Tensor:
        return torch.randint(low, high, (count,), generator=self.generator)


class GlobalDraws(Draws):
    """kohya's own sources: Python's ``random`` module for r, torch's global generator for the rest."""

    def scale(self) -> float:
        return random.random()

    def uniform(self) -> torch.Tensor:
        return torch.rand(1)

    def normal(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(tuple(shape), dtype=dtype)

    def integers(self, low: int, high: int, count: int) -> torch.Tensor:
        return torch.randint(low, high, (count,))


# ------------------------------------------------------------------------------------------------ the options


@dataclasses.dataclass
class Options:
    """The command-line options of sd-scripts these formulas read, with the defaults of its argparse
    (library/train_util.py add_training_arguments, v_parameterization from add_sd_models_arguments; min_snr_gamma
    and the other weightings from library/custom_train_functions.py add_custom_train_arguments)."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    v_parameterization: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0


# ------------------------------------------------------------------------------------------------- the noise


def multires_noise(noise: torch.Tensor, iterations: int, discount: float, draws: Draws) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise: library/custom_train_functions.py ``pyramid_noise_like``.

    Level i = 0, 1, ...: r = 2 + 2·U[0, 1) (a fresh r per level, drawn before the level's normals), a
    (batch, channels, int(H / r**i), int(W / r**i)) normal draw (each side at least 1), bilinearly resized to
    (H, W) and scaled by discount**i, added to the noise. After the level whose smaller side came out as 1 px the
    loop stops even if ``iterations`` is not reached. Finally the sum is divided by its std over the whole
    batch."""
    batch, channels, height, width = noise.shape
    total = noise
    for level in range(iterations):
        r = draws.scale() * 2 + 2
        # int() truncates H / r**i (not round, not H // round(r**i)); level 0 is r**0 = 1, full size
        coarse = (max(1, int(height / r**level)), max(1, int(width / r**level)))
        # kohya draws the level in fp32 on the CPU, then moves it to the noise's device
        level_noise = draws.normal((batch, channels, *coarse)).to(noise.device)
        # torch.nn.Upsample(size=(H, W), mode="bilinear"): align_corners False, as F.interpolate's default
        upsampled = F.interpolate(level_noise, size=(height, width), mode="bilinear", align_corners=False)
        # kohya adds in place (`noise += ...`), so the sum keeps the noise's dtype (and the caller's tensor changes)
        total = (total + upsampled * discount**level).to(noise.dtype)
        if 1 in coarse:  # the 1-px stop: a level reduced to a single row or column is the last
            break
    # torch's std: the unbiased (n - 1) estimate over every element of the batch, not per sample or channel
    return total / total.std()


def offset_noise(latents: torch.Tensor, noise: torch.Tensor, strength: float | torch.Tensor | None,
                 adaptive_scale: float | None, draws: Draws) -> torch.Tensor:
    """Offset noise: library/custom_train_functions.py ``apply_noise_offset``.

    With adaptive_scale, the strength becomes strength + adaptive_scale·|mean of each latent channel| (per sample
    and channel), clamped below at 0 (so a negative adaptive scale can switch a channel's offset off). Then one
    normal value per (sample, channel), broadcast over the pixels, times the strength is added."""
    if strength is None:
        return noise
    if adaptive_scale is not None:
        channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        strength = torch.clamp(strength + adaptive_scale * channel_mean, min=0.0)
    per_channel = draws.normal(latents.shape[:2] + (1, 1)).to(latents.device)
    return noise + strength * per_channel


def sample_timesteps(low: int, high: int, count: int, draws: Draws, device: torch.device | str) -> torch.Tensor:
    """Training timesteps: library/train_util.py ``get_timesteps``. Uniform integers in [low, high) (high
    excluded); when low >= high no draw is made and every sample gets ``high``. int64, drawn on the CPU."""
    if low < high:
        steps = draws.integers(low, high, count)
    else:
        steps = torch.full((count,), high)
    return steps.long().to(device)


def training_noise(options: Options, scheduler, latents: torch.Tensor,
                   draws: Draws) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target noise, noisy latents, timesteps) of one step: library/train_util.py
    ``get_noise_noisy_latents_and_timesteps``.

    The draws, in this order: the base noise (normal, the latents' shape and dtype: kohya's randn_like); with
    noise_offset_random_strength, the offset's strength U[0, 1)·noise_offset (once per batch, a tensor of shape
    (1,)); the offset's per-channel normals; the pyramid's levels; the timesteps; with
    ip_noise_gamma_random_strength, γ = U[0, 1)·ip_noise_gamma; the input perturbation's normals. The
    perturbation γ·N(0, 1) goes into the UNet's input only; the returned target noise is without it.
    (kohya also moves the scheduler's alphas_cumprod back to the CPU after add_noise: a device detail, the values
    are the same.)"""
    noise = draws.normal(latents.shape, latents.dtype).to(latents.device)
    if options.noise_offset:  # 0 and None both mean off
        strength = options.noise_offset
        if options.noise_offset_random_strength:
            strength = draws.uniform().to(latents.device) * options.noise_offset
        noise = offset_noise(latents, noise, strength, options.adaptive_noise_scale, draws)
    if options.multires_noise_iterations:
        noise = multires_noise(noise, options.multires_noise_iterations, options.multires_noise_discount, draws)

    low = options.min_timestep if options.min_timestep is not None else 0
    high = options.max_timestep if options.max_timestep is not None else scheduler.config.num_train_timesteps
    timesteps = sample_timesteps(low, high, latents.shape[0], draws, latents.device)

    unet_noise = noise
    if options.ip_noise_gamma:
        gamma = options.ip_noise_gamma
        if options.ip_noise_gamma_random_strength:
            gamma = draws.uniform().to(latents.device) * options.ip_noise_gamma
        unet_noise = noise + gamma * draws.normal(latents.shape, latents.dtype).to(latents.device)
    return noise, scheduler.add_noise(latents, unet_noise, timesteps), timesteps


# ------------------------------------------------------------------------------------------- loss weighting

#: where kohya caps the SNR (get_snr_scale, apply_debiased_estimation): SNR(t = 0) is about 1175 on SD's schedule
SNR_CAP = 1000.0


def snr_at(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Each timestep's signal-to-noise ratio as kohya tabulates it once per scheduler in
    library/custom_train_functions.py ``prepare_scheduler_for_custom_training`` (``noise_scheduler.all_snr``).

    Computed as (sqrt(ᾱ) / sqrt(1 - ᾱ))² in the dtype of the scheduler's alphas_cumprod (fp32), not as
    ᾱ / (1 - ᾱ): the two differ in the last bits. With zero-terminal-SNR betas the last entry is exactly 0."""
    alphas_cumprod = scheduler.alphas_cumprod
    table = (alphas_cumprod.sqrt() / (1.0 - alphas_cumprod).sqrt()) ** 2
    return table[timesteps.cpu()]


def _capped_snr_at(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    # get_snr_scale and apply_debiased_estimation cap at 1000 (kohya: "if timestep is 0, snr_t is inf");
    # apply_snr_weight does not
    return torch.clamp(snr_at(scheduler, timesteps), max=SNR_CAP)


def weighted(loss: torch.Tensor, options: Options, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """A per-sample loss times the weightings that are on, in kohya's order: train_network.py
    ``NetworkTrainer.post_process_loss`` calling, from library/custom_train_functions.py,

    1. ``apply_snr_weight`` (min_snr_gamma γ, uncapped SNR): min(SNR, γ)/SNR for ε-prediction,
       min(SNR, γ)/(SNR + 1) for v-prediction (v_parameterization);
    2. ``scale_v_prediction_loss_like_noise_prediction``: times ``get_snr_scale`` = SNR/(SNR + 1), SNR capped;
    3. ``add_v_prediction_like_loss`` (k = v_pred_like_loss): loss + loss / get_snr_scale · k;
    4. ``apply_debiased_estimation``: capped SNR, 1/sqrt(SNR) for ε-prediction, 1/(SNR + 1) for v-prediction.
    """
    v_prediction = options.v_parameterization
    if options.min_snr_gamma:
        s = snr_at(scheduler, timesteps)
        # v-prediction's loss is (SNR + 1) times ε's, hence the `+ 1` in its denominator
        denominator = s + 1 if v_prediction else s
        loss = loss * (torch.clamp(s, max=options.min_snr_gamma) / denominator).float().to(loss.device)
    if options.scale_v_pred_loss_like_noise_pred or options.v_pred_like_loss:
        capped = _capped_snr_at(scheduler, timesteps)
        v_scale = capped / (capped + 1)
        if options.scale_v_pred_loss_like_noise_pred:
            loss = loss * v_scale
        if options.v_pred_like_loss:
            # kohya divides the (already weighted) loss by the scale, then adds the share k of that
            loss = loss + loss / v_scale * options.v_pred_like_loss
    if options.debiased_estimation_loss:
        capped = _capped_snr_at(scheduler, timesteps)
        # the cap keeps 1/sqrt(SNR) at t = 0 at 1/sqrt(1000) rather than 1/sqrt(1175)
        loss = (1 / (capped + 1) if v_prediction else 1 / torch.sqrt(capped)) * loss
    return loss


# ---------------------------------------------------------------------------------------- the loss function


def huber_threshold(options: Options, scheduler, timesteps: torch.Tensor) -> torch.Tensor | None:
    """Each sample's pseudo-Huber threshold c: library/train_util.py ``get_huber_threshold_if_needed``; None
    unless loss_type is huber or smooth_l1. With c0 = huber_c, T = num_train_timesteps:

    - exponential: exp(-(-ln c0 / T)·t) · huber_scale, i.e. c0**(t/T) · huber_scale (fp32 from the int64 steps);
    - snr: (1 - c0) / (1 + σ_t)² + c0 with σ_t = sqrt((1 - ᾱ_t) / ᾱ_t); huber_scale is NOT applied here;
    - constant: c0 · huber_scale for every sample.
    An unknown schedule is an error (kohya: NotImplementedError)."""
    if options.loss_type not in ("huber", "smooth_l1"):
        return None
    c0, schedule = options.huber_c, options.huber_schedule
    if schedule == "exponential":
        rate = -math.log(c0) / scheduler.config.num_train_timesteps
        return torch.exp(-rate * timesteps) * options.huber_scale
    if schedule == "snr":
        alpha_bar = scheduler.alphas_cumprod[timesteps.cpu()]
        sigma = ((1.0 - alpha_bar) / alpha_bar) ** 0.5
        return ((1 - c0) / (1 + sigma) ** 2 + c0).to(timesteps.device)
    if schedule == "constant":
        return torch.full((timesteps.shape[0],), c0 * options.huber_scale, device=timesteps.device)
    raise NotImplementedError(f"huber_schedule {schedule!r}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     threshold: torch.Tensor | None = None) -> torch.Tensor:
    """The unreduced loss of each element: library/train_util.py ``conditional_loss`` with reduction "none".

    l2: (pred - target)²; l1: |pred - target|; huber: 2c·(sqrt(d² + c²) - c); smooth_l1: 2·(sqrt(d² + c²) - c),
    with d = pred - target and c the per-sample threshold broadcast over the other dimensions."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type not in ("huber", "smooth_l1"):
        raise NotImplementedError(f"loss_type {loss_type!r}")
    if threshold is None:
        raise NotImplementedError(f"loss_type {loss_type!r} needs a threshold")
    c = threshold.view(-1, *([1] * (pred.ndim - 1)))
    distance = torch.sqrt((pred - target) ** 2 + c**2) - c
    # the pseudo-Huber form: huber is ≈ d² near 0 (factor 2c), smooth_l1 ≈ 2|d| far out (factor 2)
    return (2 * c if loss_type == "huber" else 2) * distance


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, options: Options, scheduler,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """Each sample's loss as train_network.py ``NetworkTrainer.process_batch`` forms it (no masks, sample weights
    of 1): the elementwise loss of the fp32 prediction and target with the schedule's threshold, its mean over
    every dimension but the batch, then :func:`weighted`. The step's loss is the mean of these."""
    threshold = huber_threshold(options, scheduler, timesteps)
    elements = elementwise_loss(pred.float(), target.float(), options.loss_type, threshold)
    return weighted(elements.mean(dim=list(range(1, elements.ndim))), options, scheduler, timesteps)
