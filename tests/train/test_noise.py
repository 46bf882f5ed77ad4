"""sd_loha.train.noise against kohya sd-scripts' formulas, recomputed here from the same seeded draws: pyramid
(multi-resolution) noise, the noise offset's random and adaptive strength, input perturbation (the UNet's input
gets the extra noise, the target does not), the timestep range, zero-terminal-SNR betas; and short runs through
train() with each group of options on."""

from __future__ import annotations

import math
import random

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from sd_loha.train import train
from sd_loha.train.config import ConfigError, config_from_kwargs, load
from sd_loha.train.loop import Trainer
from sd_loha.train.loss import LossWeighting, loss_weights, target_for
from sd_loha.train.noise import (
    OBJECTIVE_OPTIONS,
    noisy_latents,
    plain_objective,
    pyramid_noise,
    sample_noise,
    sample_timesteps,
    training_scheduler,
)

from . import kohya_reference as kohya
from .helpers import base_config

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _cfg(tmp_path, **overrides):
    return config_from_kwargs(**base_config(tmp_path / "out", **overrides))


def _kohya_pyramid(noise: torch.Tensor, gen: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's pyramid_noise_like, its r and its levels drawn from `gen` in kohya's order."""
    return kohya.multires_noise(noise, iterations, discount, kohya.SeededDraws(gen))


@pytest.mark.parametrize("iterations, discount", [(1, 0.3), (3, 0.3), (10, 0.8)])
def test_pyramid_noise_is_kohyas(iterations, discount):
    base = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    ours, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    got = pyramid_noise(base.clone(), iterations, discount, ours)
    torch.testing.assert_close(got, _kohya_pyramid(base, theirs, iterations, discount), rtol=1e-5, atol=1e-6)
    # as many draws as kohya's: 10 levels stop early, once a side reaches 1 pixel (r >= 2 per level)
    assert torch.equal(ours.get_state(), theirs.get_state())
    assert float(got.std()) == pytest.approx(1.0, rel=1e-5)
    # the coarse levels make neighbouring pixels correlate; one level is white noise (2 draws at full size)
    corr = float(torch.corrcoef(torch.stack([got[..., :-1].flatten(), got[..., 1:].flatten()]))[0, 1])
    assert corr > 0.15 if discount > 0.5 else abs(corr) < 0.05


def _neighbour_correlations(noise: torch.Tensor) -> list[float]:
    """Correlation of pixels 1, 2, 4 and 8 apart along the width: what the coarse levels and their sizes set."""
    return [float(torch.corrcoef(torch.stack([noise[..., :-d].flatten(), noise[..., d:].flatten()]))[0, 1])
            for d in (1, 2, 4, 8)]


def test_pyramid_noise_has_the_structure_of_kohyas_with_kohyas_own_randomness():
    """kohya draws the scale r with Python's random.random() and the levels from torch's global generator;
    sd-loha draws both from the caller's generator (a seeded step is reproducible). Exact values cannot match
    across the two sources, so compare what the draws produce: over 300 seeds, the mean correlation of pixels
    1..8 apart (set by r's distribution, the level sizes and the upsampling) agrees within 4 standard errors."""
    draws, shape = 300, (1, 4, 32, 32)
    theirs, ours = [], []
    state = random.getstate(), torch.random.get_rng_state()
    try:
        for seed in range(draws):
            random.seed(seed)
            torch.manual_seed(seed)
            kohyas = kohya.multires_noise(torch.randn(shape), 6, 0.8, kohya.GlobalDraws())
            theirs.append(_neighbour_correlations(kohyas))
            gen = torch.Generator().manual_seed(10_000 + seed)
            ours.append(_neighbour_correlations(pyramid_noise(torch.randn(shape, generator=gen), 6, 0.8, gen)))
    finally:
        random.setstate(state[0])
        torch.random.set_rng_state(state[1])
    theirs_t, ours_t = torch.tensor(theirs), torch.tensor(ours)
    se = ((theirs_t.var(0) + ours_t.var(0)) / draws).sqrt()
    assert ((theirs_t.mean(0) - ours_t.mean(0)).abs() < 4 * se).all(), (theirs_t.mean(0), ours_t.mean(0), se)
    assert float(theirs_t.mean(0)[0]) > 0.15  # the structure compared is there: neighbours correlate


def test_sample_noise_offset_random_and_adaptive_strength(tmp_path):
    """noise = ε + s · N(0,1) per (sample, channel) with s = U[0,1) · noise_offset (once per batch) +
    adaptive_noise_scale · |mean of the channel|, clamped at 0; then the pyramid, in kohya's order."""
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(9)) + torch.tensor([2.0, -1.0, 0.0, 0.5]).view(1, 4, 1, 1)
    cfg = _cfg(tmp_path, noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=-0.05,
               multires_noise_iterations=3, multires_noise_discount=0.4)
    got = sample_noise(cfg, latents, torch.Generator().manual_seed(4))

    gen = torch.Generator().manual_seed(4)
    eps = torch.randn(latents.shape, generator=gen)
    strength = torch.rand(1, generator=gen).item() * 0.1
    strength = (strength - 0.05 * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
    assert (strength == 0).any() and (strength > 0).any()  # the clamp is exercised: channel 0's mean is 2
    eps = eps + strength * torch.randn((3, 4, 1, 1), generator=gen)
    torch.testing.assert_close(got, _kohya_pyramid(eps, gen, 3, 0.4), rtol=1e-5, atol=1e-6)
    # and as kohya's get_noise_noisy_latents_and_timesteps computes it from the same draws
    options = kohya.Options(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=-0.05,
                            multires_noise_iterations=3, multires_noise_discount=0.4)
    theirs, _, _ = kohya.training_noise(options, DDPMScheduler(**SD_SCHEDULE), latents,
                                        kohya.SeededDraws(torch.Generator().manual_seed(4)))
    torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-6)

    # without the options: plain ε + 0.1 · N(0,1), the draws of before
    plain = sample_noise(_cfg(tmp_path, noise_offset=0.1), latents, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    want = torch.randn(latents.shape, generator=gen)
    torch.testing.assert_close(plain, want + 0.1 * torch.randn((3, 4, 1, 1), generator=gen))


@pytest.mark.parametrize("low, high", [(None, None), (200, None), (None, 300), (500, 505), (999, 1000)])
def test_timesteps_are_uniform_in_the_range(tmp_path, low, high):
    sched = DDPMScheduler(**SD_SCHEDULE)
    cfg = _cfg(tmp_path, min_timestep=low, max_timestep=high)
    t = sample_timesteps(cfg, sched, 4000, "cpu", torch.Generator().manual_seed(0))
    lo, hi = low or 0, 1000 if high is None else high
    assert t.dtype == torch.long and int(t.min()) == lo and int(t.max()) == hi - 1  # [lo, hi), both ends drawn
    want = torch.randint(lo, hi, (4000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, want)


def test_equal_min_and_max_timestep_train_one_timestep(tmp_path):
    cfg = _cfg(tmp_path, min_timestep=400, max_timestep=400)
    t = sample_timesteps(cfg, DDPMScheduler(**SD_SCHEDULE), 5, "cpu", torch.Generator().manual_seed(0))
    assert t.tolist() == [400] * 5


@pytest.mark.parametrize("random_strength", [False, True])
def test_ip_noise_perturbs_the_input_only(tmp_path, random_strength):
    sched = DDPMScheduler(**SD_SCHEDULE)
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    t = torch.tensor([100, 800])
    cfg = _cfg(tmp_path, ip_noise_gamma=0.3, ip_noise_gamma_random_strength=random_strength)
    got = noisy_latents(cfg, sched, latents, noise, t, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    gamma = torch.rand(1, generator=gen).item() * 0.3 if random_strength else 0.3
    extra = torch.randn(latents.shape, generator=gen)
    ab = torch.tensor([sched.alphas_cumprod[100], sched.alphas_cumprod[800]]).view(2, 1, 1, 1)
    torch.testing.assert_close(got, ab.sqrt() * latents + (1 - ab).sqrt() * (noise + gamma * extra), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(noisy_latents(_cfg(tmp_path), sched, latents, noise, t), sched.add_noise(latents, noise, t))


@torch.no_grad()
def test_trainer_step_with_the_noise_options_is_kohyas_formula(tmp_path):
    """One loss_step with every noise and timestep option on equals kohya's get_noise_noisy_latents_and_timesteps
    fed the same draws in its order (ε, offset strength, offset, pyramid, timesteps in [min, max), ip strength,
    ip noise): the UNet sees the perturbed input and is scored against ε."""
    cfg = _cfg(tmp_path, noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.02,
               multires_noise_iterations=4, multires_noise_discount=0.5, ip_noise_gamma=0.2,
               ip_noise_gamma_random_strength=True, min_timestep=300, max_timestep=700, train_text_encoder=False)
    t = Trainer(cfg, tmp_path / "out", progress=False)
    t.setup()
    batch = next(iter(t.loader))
    seen = []
    t.unet.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), args[1], out.sample.detach())))
    loss = float(t.loss_step(batch, torch.Generator().manual_seed(8)))

    options = kohya.Options(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.02,
                            multires_noise_iterations=4, multires_noise_discount=0.5, ip_noise_gamma=0.2,
                            ip_noise_gamma_random_strength=True, min_timestep=300, max_timestep=700)
    eps, x_t, steps = kohya.training_noise(options, t.noise_scheduler, batch["latents"].float(),
                                           kohya.SeededDraws(torch.Generator().manual_seed(8)))
    unet_in, unet_t, pred = seen[0]
    assert torch.equal(unet_t, steps)
    torch.testing.assert_close(unet_in, x_t, rtol=1e-5, atol=1e-5)
    assert loss == pytest.approx(float(((pred - eps) ** 2).mean()), rel=1e-5)


def _zero_snr_betas_by_hand(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1, in float64: shift sqrt(ᾱ) so the last is 0, scale so the first is kept."""
    sab = torch.cumprod(1 - betas.double(), 0).sqrt()
    sab = (sab - sab[-1]) * sab[0] / (sab[0] - sab[-1])
    ab = sab**2
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


def test_zero_terminal_snr_rescales_the_betas(tmp_path):
    config = DDPMScheduler(**SD_SCHEDULE, prediction_type="v_prediction").config
    plain = training_scheduler(_cfg(tmp_path, v_parameterization=True), config)
    zero = training_scheduler(_cfg(tmp_path, v_parameterization=True, zero_terminal_snr=True), config)
    torch.testing.assert_close(zero.betas, rescale_zero_terminal_snr(plain.betas))
    torch.testing.assert_close(zero.betas.double(), _zero_snr_betas_by_hand(plain.betas), rtol=1e-4, atol=1e-6)
    assert float(zero.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-9)
    assert float(plain.alphas_cumprod[-1]) > 1e-3
    assert float(zero.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-6)
    assert float(zero.betas[-1]) == pytest.approx(1.0)


def test_zero_terminal_snr_with_epsilon_is_refused(tmp_path):
    # known from the config: refused before any model loads
    with pytest.raises(ConfigError, match="zero_terminal_snr needs a v-prediction model but v_parameterization = false"):
        _cfg(tmp_path, zero_terminal_snr=True, v_parameterization=False)
    with pytest.raises(ConfigError, match="v_pred_like_loss needs a ε-prediction model but v_parameterization = true"):
        _cfg(tmp_path, v_pred_like_loss=0.1, v_parameterization=True)
    # known once the model loads: tiny-sd1 is an ε-model
    t = Trainer(_cfg(tmp_path, zero_terminal_snr=True, scale_v_pred_loss_like_noise_pred=True), tmp_path / "out",
                progress=False)
    with pytest.raises(ConfigError) as e:
        t.setup()
    text = str(e.value)
    assert "does not fit the base model tiny-sd1" in text and "prediction_type = 'epsilon'" in text
    assert "zero_terminal_snr" in text and "scale_v_pred_loss_like_noise_pred" in text and "v_parameterization" in text


def test_timesteps_past_the_models_schedule_are_refused(tmp_path):
    config = DDPMScheduler(**{**SD_SCHEDULE, "num_train_timesteps": 500}).config
    with pytest.raises(ConfigError, match="max_timestep = 800 is past the base model's 500 training timesteps"):
        training_scheduler(_cfg(tmp_path, max_timestep=800), config)


def test_config_checks_of_the_noise_options(tmp_path):
    with pytest.raises(ConfigError, match="adaptive_noise_scale is set but noise_offset = 0"):
        _cfg(tmp_path, adaptive_noise_scale=0.01)
    with pytest.raises(ConfigError, match=r"min_timestep \(600\) is larger than max_timestep \(200\)"):
        _cfg(tmp_path, min_timestep=600, max_timestep=200)
    with pytest.raises(ConfigError, match="min_timestep"):
        _cfg(tmp_path, min_timestep=1000)
    warns = load(base_config(tmp_path / "out", noise_offset_random_strength=True, ip_noise_gamma_random_strength=True,
                             multires_noise_discount=0.5)).warnings
    assert any("noise_offset_random_strength" in w for w in warns)
    assert any("ip_noise_gamma_random_strength" in w for w in warns)
    assert any("multires_noise_discount" in w for w in warns)


def test_train_uses_the_noise_options(tmp_path, monkeypatch):
    """Through train(), every step's noise and input carry the options (their values against kohya's formulas
    are tested above, on loss_step): the target noise went through the pyramid last (its std is 1 to fp32),
    the timesteps lie in [min_timestep, max_timestep), and the UNet's input is add_noise of the target plus the
    input perturbation γ·N(0, 1), γ in [0, ip_noise_gamma)."""
    import sd_loha.train.objective as objective_mod  # the UNet families' draw calls noisy_latents there

    seen = []
    real_noisy = objective_mod.noisy_latents

    def noisy_spy(cfg, scheduler, latents, noise, timesteps, generator=None):  # the real function, watched
        out = real_noisy(cfg, scheduler, latents, noise, timesteps, generator)
        seen.append((noise, timesteps, out, scheduler.add_noise(latents, noise, timesteps), scheduler))
        return out

    monkeypatch.setattr(objective_mod, "noisy_latents", noisy_spy)
    run = train(base_config(tmp_path / "noise", max_train_steps=2, train_text_encoder=False, noise_offset=0.05,
                            noise_offset_random_strength=True, adaptive_noise_scale=0.01, multires_noise_iterations=6,
                            multires_noise_discount=0.3, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
                            min_timestep=100, max_timestep=900), progress=False)
    assert run.steps == 2 and len(seen) == 2
    for noise, steps, noisy, unperturbed, scheduler in seen:
        assert float(noise.std()) == pytest.approx(1.0, rel=1e-5)
        assert ((steps >= 100) & (steps < 900)).all()
        sigma = (1 - scheduler.alphas_cumprod[steps]).sqrt().view(-1, 1, 1, 1)
        gamma = float(((noisy - unperturbed) / sigma).std())
        assert 0.0 < gamma < 0.1 * 1.2  # γ·N(0, 1) over a few hundred latent values: std within 20 % of γ


@torch.no_grad()
def test_zero_terminal_snr_trains_the_last_timestep_on_minus_x0(tmp_path):
    """zero_terminal_snr on a v-model: ᾱ_T = 0, so at t = T the UNet's input is the noise alone and the
    v-target sqrt(ᾱ)·ε - sqrt(1 - ᾱ)·x0 is -x0; loss_step scores the prediction against exactly that, and
    the weighting options give that timestep kohya's weights (min-SNR and the v-scale 0, debiased 1)."""
    options = dict(min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True, debiased_estimation_loss=True)
    cfg = _cfg(tmp_path, pretrained_model="tiny-sd2", zero_terminal_snr=True, min_timestep=999, max_timestep=1000,
               train_text_encoder=False)
    t = Trainer(cfg, tmp_path / "out", progress=False)
    t.setup()
    assert t.noise_scheduler.config.prediction_type == "v_prediction"
    assert float(t.noise_scheduler.alphas_cumprod[-1]) == 0.0
    batch = next(iter(t.loader))
    seen = []
    t.unet.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), args[1], out.sample.detach())))
    loss = float(t.loss_step(batch, torch.Generator().manual_seed(3)))

    x0 = batch["latents"].float()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))  # loss_step's first draw
    unet_in, steps, pred = seen[0]
    assert steps.tolist() == [999] * x0.shape[0]
    torch.testing.assert_close(unet_in.float(), eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(target_for(t.noise_scheduler, x0, eps, steps), -x0, rtol=0, atol=1e-6)
    assert loss == pytest.approx(float(((pred.float() + x0) ** 2).mean()), rel=1e-5)

    weights = loss_weights(t.noise_scheduler, steps, LossWeighting(**options))
    want = kohya.weighted(torch.ones(len(steps)), kohya.Options(v_parameterization=True, **options), t.noise_scheduler,
                          steps)
    assert torch.isfinite(want).all() and want.tolist() == [0.0] * len(steps)
    torch.testing.assert_close(weights, want)


def test_plain_objective_resets_the_noise_and_weighting_options(tmp_path):
    from sd_loha.train.config import OPTIONS

    cfg = _cfg(tmp_path, noise_offset=0.1, adaptive_noise_scale=0.01, multires_noise_iterations=6, ip_noise_gamma=0.1,
               min_timestep=100, max_timestep=900, min_snr_gamma=5.0, debiased_estimation_loss=True, network_dim=8)
    plain = plain_objective(cfg)
    assert all(getattr(plain, n) == OPTIONS[n].default for n in OBJECTIVE_OPTIONS)
    assert plain.network_dim == 8 and cfg.multires_noise_iterations == 6  # the rest kept, the original untouched
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample_noise(plain, latents, torch.Generator().manual_seed(1)),
                               torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)))
