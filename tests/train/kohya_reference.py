"""kohya sd-scripts' noise and loss-weighting functions as kohya writes them, the reference the tests compare
sd_loha.train.noise and sd_loha.train.loss with.

Copied from kohya-ss/sd-scripts (Apache-2.0) at commit 48d368fa, library/custom_train_functions.py
(prepare_scheduler_for_custom_training, apply_snr_weight, scale_v_prediction_loss_like_noise_prediction,
get_snr_scale, add_v_prediction_like_loss, apply_debiased_estimation, pyramid_noise_like, apply_noise_offset),
train_network.py (post_process_loss, here a function of `args`) and library/train_util.py (get_timesteps,
get_noise_noisy_latents_and_timesteps, get_huber_threshold_if_needed, conditional_loss). Only logging, some
type annotations and the imports are left out; the arithmetic, the order of the draws and their sources
(Python's `random` for the pyramid's scale, torch's global generator for the rest) are kohya's.

:func:`routed_draws` replaces those two sources for the duration of a `with` by one seeded torch generator,
in the order kohya's code asks for them, so a test can compare exact values with sd-loha (which draws every
value from the caller's generator) while the formula that turns the draws into noise stays kohya's text.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import types
from collections.abc import Iterator
from types import SimpleNamespace

import torch

_torch = torch  # the real module, for the routed draws while this module's `torch` is replaced

# ------------------------------------------------------------------------ library/custom_train_functions.py


def prepare_scheduler_for_custom_training(noise_scheduler, device):
    if hasattr(noise_scheduler, "all_snr"):
        return

    alphas_cumprod = noise_scheduler.alphas_cumprod
    sqrt_alphas_cumprod = torch.sqrt(alphas_cumprod)
    sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - alphas_cumprod)
    alpha = sqrt_alphas_cumprod
    sigma = sqrt_one_minus_alphas_cumprod
    all_snr = (alpha / sigma) ** 2

    noise_scheduler.all_snr = all_snr.to(device)


def apply_snr_weight(loss, timesteps, noise_scheduler, gamma, v_prediction=False):
    snr = torch.stack([noise_scheduler.all_snr[t] for t in timesteps])
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    if v_prediction:
        snr_weight = torch.div(min_snr_gamma, snr + 1).float().to(loss.device)
    else:
        snr_weight = torch.div(min_snr_gamma, snr).float().to(loss.device)
    loss = loss * snr_weight
    return loss


def scale_v_prediction_loss_like_noise_prediction(loss, timesteps, noise_scheduler):
    scale = get_snr_scale(timesteps, noise_scheduler)
    loss = loss * scale
    return loss


def get_snr_scale(timesteps, noise_scheduler):
    snr_t = torch.stack([noise_scheduler.all_snr[t] for t in timesteps])  # batch_size
    snr_t = torch.minimum(snr_t, torch.ones_like(snr_t) * 1000)  # if timestep is 0, snr_t is inf, so limit it to 1000
    scale = snr_t / (snr_t + 1)
    return scale


def add_v_prediction_like_loss(loss, timesteps, noise_scheduler, v_pred_like_loss):
    scale = get_snr_scale(timesteps, noise_scheduler)
    loss = loss + loss / scale * v_pred_like_loss
    return loss


def apply_debiased_estimation(loss, timesteps, noise_scheduler, v_prediction=False):
    snr_t = torch.stack([noise_scheduler.all_snr[t] for t in timesteps])  # batch_size
    snr_t = torch.minimum(snr_t, torch.ones_like(snr_t) * 1000)  # if timestep is 0, snr_t is inf, so limit it to 1000
    if v_prediction:
        weight = 1 / (snr_t + 1)
    else:
        weight = 1 / torch.sqrt(snr_t)
    loss = weight * loss
    return loss


def pyramid_noise_like(noise, device, iterations=6, discount=0.4) -> torch.FloatTensor:
    b, c, w, h = noise.shape  # EDIT: w and h get over-written, rename for a different variant!
    u = torch.nn.Upsample(size=(w, h), mode="bilinear").to(device)
    for i in range(iterations):
        r = random.random() * 2 + 2  # Rather than always going 2x,
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn).to(device)) * discount**i
        if wn == 1 or hn == 1:
            break  # Lowest resolution is 1x1
    return noise / noise.std()  # Scaled back to roughly unit variance


def apply_noise_offset(latents, noise, noise_offset, adaptive_noise_scale) -> torch.FloatTensor:
    if noise_offset is None:
        return noise
    if adaptive_noise_scale is not None:
        # latent shape: (batch_size, channels, height, width)
        # abs mean value for each channel
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))

        # multiply adaptive noise scale to the mean value and add it to the noise offset
        noise_offset = noise_offset + adaptive_noise_scale * latent_mean
        noise_offset = torch.clamp(noise_offset, 0.0, None)  # in case of adaptive noise scale is negative

    noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    return noise


# ----------------------------------------------------------------------------------------- train_network.py


def post_process_loss(loss, args, timesteps, noise_scheduler):
    if args.min_snr_gamma:
        loss = apply_snr_weight(loss, timesteps, noise_scheduler, args.min_snr_gamma, args.v_parameterization)
    if args.scale_v_pred_loss_like_noise_pred:
        loss = scale_v_prediction_loss_like_noise_prediction(loss, timesteps, noise_scheduler)
    if args.v_pred_like_loss:
        loss = add_v_prediction_like_loss(loss, timesteps, noise_scheduler, args.v_pred_like_loss)
    if args.debiased_estimation_loss:
        loss = apply_debiased_estimation(loss, timesteps, noise_scheduler, args.v_parameterization)
    return loss


# --------------------------------------------------------------------------------------- library/train_util.py


def get_huber_threshold_if_needed(args, timesteps: torch.Tensor, noise_scheduler):
    if not (args.loss_type == "huber" or args.loss_type == "smooth_l1"):
        return None

    b_size = timesteps.shape[0]
    if args.huber_schedule == "exponential":
        alpha = -math.log(args.huber_c) / noise_scheduler.config.num_train_timesteps
        result = torch.exp(-alpha * timesteps) * args.huber_scale
    elif args.huber_schedule == "snr":
        if not hasattr(noise_scheduler, "alphas_cumprod"):
            raise NotImplementedError("Huber schedule 'snr' is not supported with the current model.")
        alphas_cumprod = torch.index_select(noise_scheduler.alphas_cumprod, 0, timesteps.cpu())
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        result = (1 - args.huber_c) / (1 + sigmas) ** 2 + args.huber_c
        result = result.to(timesteps.device)
    elif args.huber_schedule == "constant":
        result = torch.full((b_size,), args.huber_c * args.huber_scale, device=timesteps.device)
    else:
        raise NotImplementedError(f"Unknown Huber loss schedule {args.huber_schedule}!")

    return result


def conditional_loss(model_pred: torch.Tensor, target: torch.Tensor, loss_type: str, reduction: str, huber_c=None):
    if loss_type == "l2":
        loss = torch.nn.functional.mse_loss(model_pred, target, reduction=reduction)
    elif loss_type == "l1":
        loss = torch.nn.functional.l1_loss(model_pred, target, reduction=reduction)
    elif loss_type == "huber":
        if huber_c is None:
            raise NotImplementedError("huber_c not implemented correctly")
        # Reshape huber_c to broadcast with model_pred (supports 4D and 5D tensors)
        huber_c = huber_c.view(-1, *([1] * (model_pred.ndim - 1)))
        loss = 2 * huber_c * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)
        if reduction == "mean":
            loss = torch.mean(loss)
        elif reduction == "sum":
            loss = torch.sum(loss)
    elif loss_type == "smooth_l1":
        if huber_c is None:
            raise NotImplementedError("huber_c not implemented correctly")
        # Reshape huber_c to broadcast with model_pred (supports 4D and 5D tensors)
        huber_c = huber_c.view(-1, *([1] * (model_pred.ndim - 1)))
        loss = 2 * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)
        if reduction == "mean":
            loss = torch.mean(loss)
        elif reduction == "sum":
            loss = torch.sum(loss)
    else:
        raise NotImplementedError(f"Unsupported Loss Type: {loss_type}")
    return loss


def get_timesteps(min_timestep: int, max_timestep: int, b_size: int, device: torch.device) -> torch.Tensor:
    if min_timestep < max_timestep:
        timesteps = torch.randint(min_timestep, max_timestep, (b_size,), device="cpu")
    else:
        timesteps = torch.full((b_size,), max_timestep, device="cpu")
    timesteps = timesteps.long().to(device)
    return timesteps


def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents):
    # Sample noise that we'll add to the latents
    noise = torch.randn_like(latents, device=latents.device)
    if args.noise_offset:
        if args.noise_offset_random_strength:
            noise_offset = torch.rand(1, device=latents.device) * args.noise_offset
        else:
            noise_offset = args.noise_offset
        noise = apply_noise_offset(latents, noise, noise_offset, args.adaptive_noise_scale)
    if args.multires_noise_iterations:
        noise = pyramid_noise_like(
            noise, latents.device, args.multires_noise_iterations, args.multires_noise_discount
        )

    # Sample a random timestep for each image
    b_size = latents.shape[0]
    min_timestep = 0 if args.min_timestep is None else args.min_timestep
    max_timestep = noise_scheduler.config.num_train_timesteps if args.max_timestep is None else args.max_timestep
    timesteps = get_timesteps(min_timestep, max_timestep, b_size, latents.device)

    # Add noise to the latents according to the noise magnitude at each timestep
    # (this is the forward diffusion process)
    if args.ip_noise_gamma:
        if args.ip_noise_gamma_random_strength:
            strength = torch.rand(1, device=latents.device) * args.ip_noise_gamma
        else:
            strength = args.ip_noise_gamma
        noisy_latents = noise_scheduler.add_noise(latents, noise + strength * torch.randn_like(latents), timesteps)
    else:
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

    # This moves the alphas_cumprod back to the CPU after it is moved in noise_scheduler.add_noise
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.cpu()

    return noise, noisy_latents, timesteps


# ------------------------------------------------------------------------------------------- the draws


def kohya_args(**options) -> SimpleNamespace:
    """kohya's argparse defaults for the options these functions read, with `options` on top."""
    defaults = dict(noise_offset=None, noise_offset_random_strength=False, adaptive_noise_scale=None,
                    multires_noise_iterations=None, multires_noise_discount=0.3, ip_noise_gamma=None,
                    ip_noise_gamma_random_strength=False, min_timestep=None, max_timestep=None,
                    min_snr_gamma=None, scale_v_pred_loss_like_noise_pred=False, v_pred_like_loss=None,
                    debiased_estimation_loss=False, v_parameterization=False,
                    loss_type="l2", huber_schedule="snr", huber_c=0.1, huber_scale=1.0)
    return SimpleNamespace(**{**defaults, **options})


class _RoutedTorch(types.ModuleType):
    """torch, except that randn / randn_like / rand / randint draw from one generator (on the CPU, as sd-loha
    draws)."""

    def __init__(self, gen: _torch.Generator) -> None:
        super().__init__("torch")
        self._gen = gen

    def __getattr__(self, name: str):
        return getattr(_torch, name)

    def randn(self, *size, device=None):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, _torch.Size)) else size
        return _torch.randn(tuple(shape), generator=self._gen).to(device or "cpu")

    def randn_like(self, t, device=None):
        return _torch.randn(t.shape, generator=self._gen).to(device or t.device)

    def rand(self, *size, device=None):
        return _torch.rand(*size, generator=self._gen).to(device or "cpu")

    def randint(self, low, high, size, device=None):
        return _torch.randint(low, high, size, generator=self._gen).to(device or "cpu")


@contextlib.contextmanager
def routed_draws(gen: torch.Generator) -> Iterator[None]:
    """Within the block, kohya's `random.random()` is one torch.rand(1) from `gen` (the same uniform on [0, 1)),
    and its torch.randn / randn_like / rand / randint draw from `gen` too, each in the order kohya's code asks
    for it."""
    module = sys.modules[__name__]
    saved = module.torch, module.random
    module.torch = _RoutedTorch(gen)
    module.random = SimpleNamespace(random=lambda: float(_torch.rand(1, generator=gen)))
    try:
        yield
    finally:
        module.torch, module.random = saved
