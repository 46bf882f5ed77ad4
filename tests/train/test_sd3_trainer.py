"""The trainer's SD 3.x path up to the adapter (whose MMDiT targets come with the SD 3.x names layer): the model
loads as SD 3.x with the flow objective, latents get the VAE's shift and scale, the conditioning is the
pipeline's, T5 is dropped with t5xxl = false and its outputs are cached and parked with the CLIPs', and a bf16
loss step on tiny-sd3 trains a plain parameter."""

from __future__ import annotations

import torch

from sd_loha.data.dataset import collate_examples
from sd_loha.train.config import load
from sd_loha.train.flow import FLOW_TIMESTEPS
from sd_loha.train.loop import Trainer
from sd_loha.train.objective import FlowObjective
from sd_loha.train.runtime import make_accelerator

from .helpers import base_config


def _trainer(tmp_path, **overrides) -> Trainer:
    """A Trainer on tiny-sd3 set up to its text conditioning: dataset, models, caches (no adapter network)."""
    cfg = load(base_config(tmp_path / "out", **{"pretrained_model": "tiny-sd3", "train_text_encoder": False,
                                                 **overrides})).config
    t = Trainer(cfg, tmp_path / "out", progress=False)
    t.accelerator = make_accelerator(cfg)
    t.main, t.device = True, t.accelerator.device
    t._setup_dataset()
    t._setup_models()
    t._setup_caches()
    return t


def _batch(t: Trainer) -> dict:
    return collate_examples([t.dataset[(0, 0)], t.dataset[(1, 0)]])


def test_sd3_trainer_setup_and_a_bf16_loss_step(tmp_path):
    t = _trainer(tmp_path, mixed_precision="bf16", weighting_scheme="sigma_sqrt", precondition_outputs=False,
                 cache_text_encoder_outputs=True)
    assert t.family.is_sd3 and isinstance(t.objective, FlowObjective)
    assert t.unet is t.pipe.transformer and t.unet.dtype == torch.bfloat16
    assert t.te_trained == [False, False, False] and len(t.text_encoders) == 3
    # the latents carry SD3's VAE shift and scale (cached ones too: the cache holds what encode_pixels makes)
    batch = _batch(t)
    vae = t.vae.config
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        raw = t.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(t.encode_pixels(pixels), (raw - vae.shift_factor) * vae.scaling_factor)
    assert batch["latents"].shape == (2, 16, 8, 8)
    # text outputs cached: the text encoders, T5 included, wait on the CPU; the conditioning is encode_prompt's
    assert set(t.offload.idle) >= {"text_encoder", "text_encoder_2", "text_encoder_3"}
    cond = t.conditioning(batch)
    with torch.no_grad():
        embeds, _, pooled, _ = t.pipe.encode_prompt(batch["captions"], None, None, device=t.device,
                                                    do_classifier_free_guidance=False, max_sequence_length=256)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds.to(torch.bfloat16), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(cond["pooled_projections"], pooled.to(torch.bfloat16))
    assert cond["added_cond_kwargs"] is None
    # one step: a plain fp32 parameter on the transformer's output gets a finite gradient from the bf16 forward
    extra = torch.nn.Parameter(torch.zeros(t.unet.proj_out.out_features))
    seen = []
    hook = t.unet.proj_out.register_forward_hook(lambda m, i, o: o + extra.to(o.dtype))
    pre = t.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        loss = t.loss_step(batch, torch.Generator().manual_seed(0))
        loss.backward()
    finally:
        hook.remove()
        pre.remove()
    assert torch.isfinite(loss) and extra.grad is not None and extra.grad.abs().sum() > 0
    timesteps = seen[0]["timestep"]
    assert timesteps.shape == (2,) and ((timesteps > 0) & (timesteps < FLOW_TIMESTEPS)).all()
    assert seen[0]["hidden_states"].dtype == torch.bfloat16


def test_t5xxl_false_drops_t5_from_the_pipeline(tmp_path):
    t = _trainer(tmp_path, t5xxl=False)
    assert t.pipe.text_encoder_3 is None and t.pipe.tokenizer_3 is None
    assert len(t.text_encoders) == 2
    cond = t.conditioning(_batch(t))
    assert cond["encoder_hidden_states"].shape[1] == 77 + 256
    assert cond["encoder_hidden_states"][:, 77:].abs().sum() == 0  # T5's part is zeros, as diffusers does
    with_t5 = _trainer(tmp_path / "b")
    assert with_t5.conditioning(_batch(with_t5))["encoder_hidden_states"][:, 77:].abs().sum() > 0


def test_validation_objective_resets_the_flow_options(tmp_path):
    from sd_loha.train.noise import plain_objective

    t = _trainer(tmp_path, weighting_scheme="mode", training_shift=3.0, precondition_outputs=False)
    plain = plain_objective(t.cfg)
    assert (plain.weighting_scheme, plain.training_shift, plain.precondition_outputs) == ("logit_normal", 1.0, True)
    batch = _batch(t)
    with torch.no_grad():
        a = t.loss_step(batch, torch.Generator().manual_seed(0), objective=plain)
        b = t.loss_step(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(a) and torch.isfinite(b) and not torch.equal(a, b)


def test_sd3_samples_use_the_flow_scheduler_and_t5_length(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sd_loha.models import build_tiny_pipeline
    from sd_loha.train.sampling import sample_images

    loaded = load(base_config(tmp_path / "out", pretrained_model="tiny-sd3", train_text_encoder=False,
                              sample_prompts=["a red dog --d 3 --s 3"], sample_every_n_steps=2, sample_sampler="ddim",
                              t5xxl_max_token_length=24))
    assert any("sample_sampler = 'ddim' is not used for SD 3.x" in w for w in loaded.warnings)
    pipe = build_tiny_pipeline("tiny-sd3")
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((type(pipe.scheduler), kw["encoder_hidden_states"].shape[1])), with_kwargs=True)
    try:
        images = sample_images(pipe, loaded.config)
    finally:
        hook.remove()
    assert len(images) == 1 and images[0].size == (64, 64)
    assert seen and all(s == (FlowMatchEulerDiscreteScheduler, 77 + 24) for s in seen)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)


def test_sd3_runs_write_kohyas_sd3_metadata_keys(tmp_path):
    from sd_loha.train.metadata import training_metadata

    t = _trainer(tmp_path, weighting_scheme="mode", mode_scale=1.1, logit_mean=0.2, logit_std=0.9)
    meta = training_metadata(t.cfg, t.preflight, step=1, epoch=1, started=0.0, num_processes=1,
                             sd3=t.family.is_sd3)
    assert {k: meta[k] for k in ("ss_weighting_scheme", "ss_logit_mean", "ss_logit_std", "ss_mode_scale",
                                 "ss_apply_lg_attn_mask", "ss_apply_t5_attn_mask")} == {
        "ss_weighting_scheme": "mode", "ss_logit_mean": 0.2, "ss_logit_std": 0.9, "ss_mode_scale": 1.1,
        "ss_apply_lg_attn_mask": False, "ss_apply_t5_attn_mask": False}
    plain = training_metadata(t.cfg, t.preflight, step=1, epoch=1, started=0.0, num_processes=1)
    assert "ss_weighting_scheme" not in plain


def test_trained_clips_with_a_cached_frozen_t5(tmp_path):
    """kohya's partial cache: the CLIPs train, T5's outputs come from the cache (T5 parked on the CPU and not run
    by a step) and equal what T5 computes."""
    t = _trainer(tmp_path, train_text_encoder=True, cache_text_encoder_outputs=True)
    assert t.te_trained == [True, True, False] and t.text_cache is None
    assert t.conditioner.t5_cache is not None and t.offload.idle == ("vae", "text_encoder_3")
    batch = _batch(t)
    calls = []
    hook = t.pipe.text_encoder_3.register_forward_hook(lambda *a: calls.append(1))
    try:
        cond = t.conditioning(batch)
    finally:
        hook.remove()
    assert calls == []  # cached: T5 does not run in a step
    with torch.no_grad():
        fresh = t.conditioner.encode_t5(batch["captions"], t.device)
    torch.testing.assert_close(cond["encoder_hidden_states"][:, 77:].float(), fresh.float())
    uncached = _trainer(tmp_path / "b", train_text_encoder=True)
    assert uncached.conditioner.t5_cache is None and uncached.offload.idle == ("vae",)
