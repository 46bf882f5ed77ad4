"""SD 3.x conditioning equals StableDiffusion3Pipeline.encode_prompt (with T5, without it, clip_skip, T5's length),
the trained CLIPs get gradients and T5 only with train_t5xxl; the SD 3.x options are refused on other families and
the UNet-only ones on SD 3.x, before any model loads."""

from __future__ import annotations

import pytest
import torch

from sd_loha.models import build_tiny_pipeline
from sd_loha.train.conditioning import SD3Conditioner, make_conditioner
from sd_loha.train.config import ConfigError, config_from_kwargs
from sd_loha.train.config.rules import SD3_ONLY, UNET_ONLY

PROMPTS = ["sdlohastyle, poster, red circle", "a second, longer prompt about teal stripes on a cream background"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_pipeline("tiny-sd3")


def _no_t5(pipe):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})


@pytest.mark.parametrize("clip_skip, t5_length, with_t5", [(1, 256, True), (2, 40, True), (1, 77, False)])
def test_sd3_conditioning_matches_encode_prompt(sd3, clip_skip, t5_length, with_t5):
    pipe = sd3 if with_t5 else _no_t5(sd3)
    with torch.no_grad():
        ours = SD3Conditioner(pipe, clip_skip=clip_skip, train_text_encoder=False, t5_length=t5_length)(PROMPTS, CPU)
        # diffusers counts clip_skip from the penultimate layer (None = penultimate); ours from the last (1)
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device=CPU, do_classifier_free_guidance=False,
                                                  clip_skip=None if clip_skip == 1 else clip_skip - 1,
                                                  max_sequence_length=t5_length)
    assert ours["encoder_hidden_states"].shape == embeds.shape == (2, 77 + t5_length, 96)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["pooled_projections"], pooled, rtol=0, atol=0)
    assert (ours["encoder_hidden_states"][:, 77:].abs().sum() == 0) == (not with_t5)


def test_clip_skip_and_t5_length_change_the_conditioning(sd3):
    with torch.no_grad():
        one = SD3Conditioner(sd3, clip_skip=1, train_text_encoder=False)(PROMPTS, CPU)["encoder_hidden_states"]
        two = SD3Conditioner(sd3, clip_skip=2, train_text_encoder=False)(PROMPTS, CPU)["encoder_hidden_states"]
        short = SD3Conditioner(sd3, clip_skip=1, train_text_encoder=False, t5_length=16)(PROMPTS, CPU)
    assert not torch.equal(one[:, :77], two[:, :77]) and torch.equal(one[:, 77:], two[:, 77:])
    assert short["encoder_hidden_states"].shape[1] == 77 + 16


@pytest.mark.parametrize("train_t5", [False, True])
def test_trained_clips_get_gradients_and_t5_only_when_trained(sd3, train_t5):
    sd3.text_encoder.requires_grad_(True)
    sd3.text_encoder_3.requires_grad_(True)
    try:
        cond = SD3Conditioner(sd3, clip_skip=1, train_text_encoder=True, train_t5=train_t5, t5_length=32)(PROMPTS, CPU)
        (cond["encoder_hidden_states"].sum() + cond["pooled_projections"].sum()).backward()
        clip_grad = sd3.text_encoder.text_model.encoder.layers[0].mlp.fc1.weight.grad
        t5_grad = sd3.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q.weight.grad
        assert clip_grad is not None and clip_grad.abs().sum() > 0
        assert (t5_grad is not None) == train_t5
    finally:
        for te in (sd3.text_encoder, sd3.text_encoder_3):
            te.requires_grad_(False)
            te.zero_grad(set_to_none=True)


def test_make_conditioner_follows_the_family_and_options(sd3):
    cfg = config_from_kwargs(pretrained_model="tiny-sd3", train_data_dir=".", output_dir="unused", clip_skip=2,
                             t5xxl_max_token_length=64, train_text_encoder=True, train_t5xxl=True)
    c = make_conditioner(sd3, "sd3", cfg)
    assert isinstance(c, SD3Conditioner)
    assert (c.clip_skip, c.t5_length, c.train_text_encoder, c.train_t5) == (2, 64, True, True)
    assert c.keys == ("encoder_hidden_states", "pooled_projections")


BASE = dict(train_data_dir=".", output_dir="unused")
SD3_SETTINGS = dict(t5xxl=False, t5xxl_max_token_length=128, train_t5xxl=True, weighting_scheme="cosmap",
                    logit_mean=0.5, logit_std=0.5, mode_scale=1.0, training_shift=3.0, precondition_outputs=False,
                    sd3_file_form="simpletuner")
UNET_SETTINGS = dict(v_parameterization=True, zero_terminal_snr=True, min_snr_gamma=5.0, debiased_estimation_loss=True,
                     scale_v_pred_loss_like_noise_pred=True, v_pred_like_loss=0.1, ip_noise_gamma=0.1,
                     ip_noise_gamma_random_strength=True)


@pytest.mark.parametrize("name", sorted(SD3_SETTINGS))
def test_sd3_options_are_refused_for_other_families(name):
    assert set(SD3_SETTINGS) == set(SD3_ONLY)
    extra = {"train_text_encoder": True} if name == "train_t5xxl" else {}
    for model in ("tiny-sd1", "tiny-sdxl"):
        with pytest.raises(ConfigError, match=f"{name} is for SD 3.x"):
            config_from_kwargs(pretrained_model=model, **{name: SD3_SETTINGS[name]}, **extra, **BASE)
    cfg = config_from_kwargs(pretrained_model="tiny-sd3", **{name: SD3_SETTINGS[name]},
                             **({"t5xxl": True} if name == "train_t5xxl" else {}), **extra, **BASE)
    assert getattr(cfg, name) == SD3_SETTINGS[name]


@pytest.mark.parametrize("name", sorted(UNET_SETTINGS))
def test_unet_options_are_refused_for_sd3(name):
    assert set(UNET_SETTINGS) == set(UNET_ONLY)
    extra = {"ip_noise_gamma": 0.1} if name == "ip_noise_gamma_random_strength" else {}
    with pytest.raises(ConfigError, match=f"{name} is for SD 1.x / 2.x / SDXL"):
        config_from_kwargs(pretrained_model="tiny-sd3", **{name: UNET_SETTINGS[name]}, **extra, **BASE)


def test_huber_snr_schedule_and_t5_rules():
    with pytest.raises(ConfigError, match='huber_schedule = "snr" needs the DDPM'):
        config_from_kwargs(pretrained_model="tiny-sd3", loss_type="huber", **BASE)
    cfg = config_from_kwargs(pretrained_model="tiny-sd3", loss_type="huber", huber_schedule="exponential", **BASE)
    assert cfg.huber_schedule == "exponential"
    with pytest.raises(ConfigError, match="there is no T5 to train"):
        config_from_kwargs(pretrained_model="tiny-sd3", t5xxl=False, train_t5xxl=True, **BASE)
    with pytest.raises(ConfigError, match="train_t5xxl = true needs train_text_encoder = true"):
        config_from_kwargs(pretrained_model="tiny-sd3", train_text_encoder=False, train_t5xxl=True, **BASE)
    assert config_from_kwargs(pretrained_model="tiny-sd3", weighting_scheme="uniform", **BASE).weighting_scheme == "none"


def test_sd3_training_needs_diffusers_with_seeded_timestep_draws(monkeypatch):
    from sd_loha.train.config import rules

    monkeypatch.setattr(rules, "diffusers_at_least", lambda release: release < (0, 33))
    with pytest.raises(ConfigError, match=r'needs diffusers 0\.33 or newer.*pip install -U "diffusers>=0\.33"'):
        config_from_kwargs(pretrained_model="tiny-sd3", **BASE)
    config_from_kwargs(pretrained_model="tiny-sd1", **BASE)  # the UNet families train on older diffusers


def test_text_cache_with_trained_clips_only_for_sd3_with_frozen_t5():
    cfg = config_from_kwargs(pretrained_model="tiny-sd3", train_text_encoder=True, cache_text_encoder_outputs=True,
                             **BASE)
    assert cfg.cache_text_encoder_outputs and cfg.train_text_encoder
    with pytest.raises(ConfigError, match="cache_text_encoder_outputs = true needs a frozen text encoder"):
        config_from_kwargs(pretrained_model="tiny-sd3", train_text_encoder=True, train_t5xxl=True,
                           cache_text_encoder_outputs=True, **BASE)
    with pytest.raises(ConfigError, match="cache_text_encoder_outputs = true needs a frozen text encoder"):
        config_from_kwargs(pretrained_model="tiny-sdxl", train_text_encoder=True, cache_text_encoder_outputs=True,
                           **BASE)


def test_kohyas_sd3_paths_and_masks_get_hints():
    for key, hint in (("clip_l", "come with the base model"), ("apply_t5_attn_mask", "masks no text states")):
        with pytest.raises(ConfigError, match=f"unknown option '{key}'.*{hint}"):
            config_from_kwargs(pretrained_model="tiny-sd3", **{key: "x"}, **BASE)
