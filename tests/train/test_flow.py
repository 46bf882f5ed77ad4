"""SD 3.x flow matching against diffusers: the timestep draw is diffusers' training_utils density, the noisy input,
target and loss weights are those of diffusers' SD3 training example (computed here independently), each
weighting scheme moves the σ distribution as it should, and a bf16 loss step on tiny-sd3's transformer trains a
plain parameter."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sd_loha.models import build_tiny_pipeline, detect_family
from sd_loha.train.config import OPTIONS, ConfigError, config_from_kwargs
from sd_loha.train.flow import (WEIGHTING_SCHEMES, flow_input, flow_target, flow_weights, sample_flow_sigmas,
                                shift_sigmas)
from sd_loha.train.objective import DenoisingObjective, FlowObjective, training_objective

DEFAULTS = {n: OPTIONS[n].default for n in ("weighting_scheme", "logit_mean", "logit_std", "mode_scale",
                                             "training_shift", "min_timestep", "max_timestep", "precondition_outputs",
                                             "loss_type", "huber_c", "huber_schedule", "huber_scale", "noise_offset",
                                             "multires_noise_iterations", "noise_offset_random_strength",
                                             "adaptive_noise_scale")}


def flow_cfg(**kw):
    return SimpleNamespace(**{**DEFAULTS, **kw})


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none", "cosmap"])
def test_sigmas_are_diffusers_density_then_kohya_shift(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    cfg = flow_cfg(weighting_scheme=scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.1, training_shift=3.0)
    drawn = sample_flow_sigmas(cfg, 64, "cpu", torch.Generator().manual_seed(5))
    u = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.3, logit_std=0.8, mode_scale=1.1,
                                              generator=torch.Generator().manual_seed(5))
    want = 3.0 * u / (1 + 2.0 * u)  # kohya's sd3_train_utils: u = (u * shift) / (1 + (shift - 1) * u)
    torch.testing.assert_close(shift_sigmas(u, 3.0), want)
    torch.testing.assert_close(drawn.sigmas, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(drawn.timesteps, want * 1000, rtol=1e-6, atol=1e-4)


def test_timestep_range_is_kohyas():
    cfg = flow_cfg(weighting_scheme="none", min_timestep=200, max_timestep=400)
    drawn = sample_flow_sigmas(cfg, 2000, "cpu", torch.Generator().manual_seed(0))
    assert drawn.timesteps.min() >= 200 and drawn.timesteps.max() < 400
    assert drawn.sigmas.min() >= 0.2 and drawn.sigmas.max() < 0.4
    fixed = sample_flow_sigmas(flow_cfg(min_timestep=500, max_timestep=500), 3, "cpu")
    assert fixed.sigmas.tolist() == [0.5, 0.5, 0.5]


def _draw(n: int = 40000, **kw) -> torch.Tensor:
    return sample_flow_sigmas(flow_cfg(**kw), n, "cpu", torch.Generator().manual_seed(1)).sigmas


def test_each_scheme_moves_the_sigma_distribution():
    """Statistics of 40000 draws against values computed here from each density's definition."""
    uniform = _draw(weighting_scheme="none")
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(uniform.var() - 1 / 12) < 0.003
    # logit-normal(0, 1): P(0.25 < σ < 0.75) = P(|z| < logit(0.75)) = erf(ln 3 / sqrt 2)
    ln = _draw(weighting_scheme="logit_normal")
    middle = ((ln > 0.25) & (ln < 0.75)).float().mean()
    assert abs(middle - math.erf(math.log(3) / math.sqrt(2))) < 0.01
    assert abs(ln.median() - 0.5) < 0.01
    assert _draw(weighting_scheme="logit_normal", logit_mean=1.0).median() > 0.7  # sigmoid(1) = 0.731: noisier
    assert _draw(weighting_scheme="logit_normal", logit_std=0.3).std() < 0.5 * ln.std()
    # mode: σ = 1 - u - s(cos²(πu/2) - 1 + u), symmetric about 1/2; s > 0 gathers σ in the middle, s < 0 at the ends
    spread = {s: _draw(weighting_scheme="mode", mode_scale=s).std() for s in (-0.8, 0.0, 1.29)}
    assert spread[1.29] < spread[0.0] < spread[-0.8]
    assert abs(spread[0.0] - math.sqrt(1 / 12)) < 0.005  # s = 0 is uniform
    # cosmap and sigma_sqrt weight the loss but draw uniformly
    assert abs(_draw(weighting_scheme="cosmap").mean() - 0.5) < 0.01
    # training_shift 3 on uniform σ: E[3u / (1 + 2u)] = 3/2 - 3 ln(3) / 4
    assert abs(_draw(weighting_scheme="none", training_shift=3.0).mean() - (1.5 - 0.75 * math.log(3))) < 0.01


def test_input_target_and_weights_are_diffusers_sd3_example():
    """diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py, written out here."""
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(4, 16, 8, 8, generator=g) for _ in range(3))
    sigmas = torch.tensor([0.05, 0.3, 0.6, 0.95])
    s = sigmas.view(-1, 1, 1, 1)
    noisy = flow_input(x0, noise, sigmas)
    torch.testing.assert_close(noisy, (1.0 - s) * x0 + s * noise)
    p, t = flow_target(pred, x0, noise, noisy, sigmas, precondition=False)
    torch.testing.assert_close(p, pred)
    torch.testing.assert_close(t, noise - x0)
    p, t = flow_target(pred, x0, noise, noisy, sigmas, precondition=True)
    torch.testing.assert_close(p, pred * (-s) + noisy)
    torch.testing.assert_close(t, x0)
    # preconditioned = the velocity loss weighted by σ²
    pre = ((p - t) ** 2).mean(dim=(1, 2, 3))
    plain = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(pre, sigmas**2 * plain, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(flow_weights("cosmap", sigmas), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)))
    torch.testing.assert_close(flow_weights("sigma_sqrt", sigmas), sigmas**-2.0)
    for scheme in ("none", "logit_normal", "mode"):
        assert flow_weights(scheme, sigmas).tolist() == [1.0] * 4
    assert torch.isfinite(flow_weights("sigma_sqrt", torch.zeros(2))).all()  # floored at SD3's smallest σ
    assert set(WEIGHTING_SCHEMES) == {"none", "logit_normal", "mode", "cosmap", "sigma_sqrt"}


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_pipeline("tiny-sd3")


def test_objective_is_chosen_by_family(sd3):
    sd1 = build_tiny_pipeline("tiny-sd1")
    base = dict(train_data_dir=".", output_dir="unused")
    cfg1 = config_from_kwargs(pretrained_model="tiny-sd1", **base)
    assert isinstance(training_objective(cfg1, detect_family(sd1), sd1.scheduler.config), DenoisingObjective)
    cfg3 = config_from_kwargs(pretrained_model="tiny-sd3", **base)
    assert isinstance(training_objective(cfg3, detect_family(sd3), sd3.scheduler.config), FlowObjective)
    # a UNet-only option that a hub id could not be checked for before loading is refused once the model is known
    hub = config_from_kwargs(pretrained_model="org/some-sd3", min_snr_gamma=5.0, **base)
    with pytest.raises(ConfigError, match="min_snr_gamma is for SD 1.x"):
        training_objective(hub, detect_family(sd3), sd3.scheduler.config)


def test_bf16_loss_step_on_tiny_sd3_transformer_trains_a_plain_parameter(sd3):
    """One flow-matching step through the bf16 transformer with an fp32 trainable bias added to its output
    projection; the loss equals diffusers' example formula computed here from the same draw."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    transformer = sd3.transformer.to(torch.bfloat16).requires_grad_(False)
    proj = transformer.proj_out
    extra = torch.nn.Parameter(torch.zeros(proj.out_features))
    hook = proj.register_forward_hook(lambda m, i, o: o + extra.to(o.dtype))
    try:
        cfg = flow_cfg(weighting_scheme="cosmap", training_shift=3.0)
        objective = FlowObjective(cfg, sd3.scheduler.config)
        g = torch.Generator().manual_seed(3)
        latents = torch.randn(2, 16, 8, 8, generator=g)
        cond = {"encoder_hidden_states": torch.randn(2, 20, 96, generator=g).to(torch.bfloat16),
                "pooled_projections": torch.randn(2, 64, generator=g).to(torch.bfloat16)}
        draw = objective.draw(cfg, latents, torch.Generator().manual_seed(4))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = objective.predict(transformer, draw.noisy.to(torch.bfloat16), draw.timesteps, cond)
        loss = objective.loss(cfg, pred, latents, draw)
        loss.backward()
    finally:
        hook.remove()
        sd3.transformer.to(torch.float32)
    s = draw.sigmas.view(-1, 1, 1, 1)
    weighting = compute_loss_weighting_for_sd3("cosmap", s)
    model_pred = pred.float() * (-s) + draw.noisy
    want = torch.mean((weighting * (model_pred - latents) ** 2).reshape(2, -1), 1).mean()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    assert pred.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert extra.grad is not None and torch.isfinite(extra.grad).all() and extra.grad.abs().sum() > 0


def test_flow_loss_with_huber_mask_and_sample_weights(sd3):
    """The flow loss keeps the trainer's per-sample terms: kohya's exponential Huber threshold of the timestep, the
    loss mask's pixel weights and the batch's sample weights (prior_loss_weight), written out here."""
    cfg = flow_cfg(loss_type="huber", huber_c=0.2, huber_schedule="exponential", huber_scale=1.5,
                   precondition_outputs=False, weighting_scheme="cosmap")
    objective = FlowObjective(cfg, sd3.scheduler.config)
    g = torch.Generator().manual_seed(7)
    latents, pred = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    mask = (torch.rand(3, 1, 4, 4, generator=g) > 0.5).float()
    sample_weights = torch.tensor([1.0, 0.5, 2.0])
    draw = objective.draw(cfg, latents, torch.Generator().manual_seed(8))
    loss = objective.loss(cfg, pred, latents, draw, mask=mask, sample_weights=sample_weights)
    c = (0.2 ** (draw.timesteps / 1000) * 1.5).view(-1, 1, 1, 1)
    d = pred - (draw.noise - latents)
    per_sample = (2 * c * (torch.sqrt(d**2 + c**2) - c) * mask).mean(dim=(1, 2, 3))
    s = draw.sigmas
    want = (per_sample * 2 / (math.pi * (1 - 2 * s + 2 * s**2)) * sample_weights).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
