"""The recipe's pieces one by one: samples in mixed precision, EMA (formula, and what samples, validation
and files use), the fp16 loss scaler across a resume, the text-encoder cache with caption dropout,
atomic writes of what a run leaves behind."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from sd_loha.train.config import config_from_kwargs
from sd_loha.train.ema import AdapterEMA
from sd_loha.train.loop import Trainer, train
from sd_loha.train.state import load_state

from .helpers import base_config, grid_cell, read_file, stop_at_step


def _trainer(tmp_path, **overrides) -> Trainer:
    cfg = config_from_kwargs(**base_config(tmp_path / "out", **overrides))
    trainer = Trainer(cfg, tmp_path / "out", progress=False)
    trainer.setup()
    return trainer


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float32)


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_samples_in_mixed_precision(tmp_path, model, precision):
    """The frozen model runs in half precision, the VAE in fp32: samples used to crash at the VAE
    ("Input type (c10::BFloat16) and bias type (float) should be the same")."""
    t = _trainer(tmp_path, pretrained_model=model, mixed_precision=precision, sample_prompts=["a red circle"],
                 sample_steps=2, sample_width=64, sample_height=64)
    assert t.unet.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert t.vae.dtype == torch.float32 and all(p.dtype == torch.float32 for p in t.params)
    path = t.make_samples("check")
    img = _pixels(path)
    assert img.shape[1] == 2 * 128  # base | now, 64 px pictures shown at 2x
    assert np.isfinite(img).all() and img.std() > 1.0  # a picture, not a flat (NaN) fill


def test_ema_equals_diffusers_ema_model():
    """Our EMA (warm-up included) is diffusers' EMAModel with use_ema_warmup=False, update after update."""
    from diffusers.training_utils import EMAModel

    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ours = AdapterEMA(params, decay=0.95)
    theirs = EMAModel([p.detach().clone() for p in params], decay=0.95, use_ema_warmup=False)
    gen = torch.Generator().manual_seed(0)
    decays = []
    for _ in range(200):  # (1 + t) / (10 + t) passes 0.95 at t = 171
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen))
        decays.append(ours.current_decay())
        ours.update()
        theirs.step(params)
        for s, d in zip(ours.shadow, theirs.shadow_params):
            torch.testing.assert_close(s, d, rtol=1e-6, atol=1e-6)
    # the warm-up: a copy first, then (1 + t) / (10 + t) until it reaches the configured decay
    assert decays[0] == 0.0 and decays[1] == pytest.approx(2 / 11) and decays[-1] == 0.95


def test_samples_validation_and_file_show_the_ema_weights(tmp_path):
    """With EMA on, samples and the validation loss use the averaged weights, as the saved file does."""
    t = _trainer(tmp_path, ema_decay=0.99, validation_split=0.25, sample_prompts=["a red circle"], sample_steps=2,
                 sample_width=64, sample_height=64, train_text_encoder=False)
    # The average is still the initialisation (w2_a = 0: no change to the model); move the raw weights far away.
    with torch.no_grad():
        for p in t.params:
            p.add_(torch.randn_like(p) * 0.5)
    raw = [p.detach().clone() for p in t.params]
    ema_grid = _pixels(t.make_samples("ema"))
    ema_val = t.validation_loss()
    saved, _ = read_file(t.save_adapter("ema"))
    assert all(torch.equal(p, r) for p, r in zip(t.params, raw)), "the raw weights must come back after each use"

    t.ema = None  # what the live (raw) weights show
    raw_grid = _pixels(t.make_samples("raw"))
    raw_val = t.validation_loss()
    t.network.remove()  # the base model alone: what a zero adapter shows
    t.pipe.unet.eval()
    base_grid = _pixels(t.make_samples("base"))
    base_val = t.validation_loss()

    assert np.abs(ema_grid - base_grid).max() <= 1.0  # ΔW = 0 in the average: the base model's picture
    assert np.abs(raw_grid - base_grid).mean() > 5.0
    assert ema_val == pytest.approx(base_val, rel=1e-5) and abs(raw_val - base_val) > 1e-3
    w2a = [k for k in saved if k.endswith("hada_w2_a")]
    assert w2a and all(float(saved[k].abs().max()) == 0.0 for k in w2a)  # the file holds the average too


def test_fp16_resume_restores_the_loss_scaler(tmp_path):
    """fp16 trains with a GradScaler (ours on the CPU, accelerate's on CUDA); its state is part of the resumable
    state, so a resumed fp16 run continues the uninterrupted one: same scaler counters, same file."""
    cfg = dict(mixed_precision="fp16", max_train_steps=4, save_state=True, save_every_n_steps=2, max_grad_norm=1.0)
    whole = train(base_config(tmp_path / "whole", **cfg), progress=False)
    stop, _, on_event = stop_at_step(2)
    part = base_config(tmp_path / "part", **cfg)
    assert train(part, progress=False, stop_event=stop, on_event=on_event).stopped
    resumed = train(part, resume=True, progress=False)

    s_whole = load_state(tmp_path / "whole" / "state-00000004")["scaler"]
    s_resumed = load_state(tmp_path / "part" / "state-00000004")["scaler"]
    assert s_whole is not None and s_whole["_growth_tracker"] == 4  # four unskipped steps since the last growth
    assert s_resumed == s_whole
    a, _ = read_file(whole.output)
    b, _ = read_file(resumed.output)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_text_encoder_cache_with_caption_dropout(tmp_path, monkeypatch):
    """Caption dropout only adds the empty caption: every variant is encoded once before training, no text
    encoder runs during the steps, and the adapter equals the one of an uncached run."""
    cfg = dict(train_text_encoder=False, caption_dropout_rate=0.5, max_train_steps=3)
    t = _trainer(tmp_path / "a", cache_text_encoder_outputs=True, **cfg)
    captions = {it.caption for it in t.preflight.items}
    assert t.text_cache is not None and len(t.text_cache) == len(captions) + 1 and "" in t.text_cache
    calls = []
    t.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    seen = set()
    for batch in t.loader:
        seen.update(batch["captions"])
        t.loss_step(batch)
    assert "" in seen and calls == [], "dropped captions must come from the cache"

    cached = train(base_config(tmp_path / "c", cache_text_encoder_outputs=True, **cfg), progress=False)
    plain = train(base_config(tmp_path / "p", cache_text_encoder_outputs=False, **cfg), progress=False)
    a, _ = read_file(cached.output)
    b, _ = read_file(plain.output)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_run_outputs_are_written_atomically(tmp_path, monkeypatch):
    """loss.csv, loss.png and sample grids reach their names by a rename of a complete temp file."""
    renamed = []
    real_replace = os.replace

    def spy(src, dst, *a, **kw):
        assert os.path.getsize(src) > 0
        renamed.append(os.path.basename(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", spy)
    out = tmp_path / "out"
    train(base_config(out, max_train_steps=2, sample_every_n_steps=1, sample_prompts=["a red circle"], sample_steps=1,
                      sample_width=64, sample_height=64), progress=False)
    for name in ("loss.csv", "loss.png", "step000001.png", "final.png", "loha.safetensors"):
        assert name in renamed, name
        assert not list(out.rglob(f".{name}.*.tmp"))


def test_validation_loss_recomputed_from_the_heldout_images(tmp_path):
    """validation_loss is the plain denoising loss over the held-out images, in order, with noise and timesteps
    from a generator seeded with seed + 1: recomputed here from the pipeline's own parts. The training
    objective's noise and weighting options do not apply (runs with different options stay comparable)."""
    from sd_loha.data.dataset import collate_examples

    t = _trainer(tmp_path, validation_split=0.25, train_text_encoder=False, min_snr_gamma=5.0, noise_offset=0.1,
                 min_timestep=500, debiased_estimation_loss=True)
    with torch.no_grad():
        for p in t.params:  # a network that changes the prediction
            p.add_(torch.randn_like(p) * 0.1)
    held_out = {it.path for it in t.preflight.validation_items}
    assert len(held_out) == 4 and not held_out & {it.path for it in t.preflight.items}

    pipe, sched = t.pipe, t.noise_scheduler
    gen = torch.Generator().manual_seed(t.cfg.seed + 1)
    expected = []
    t.unet.eval()
    with torch.no_grad():
        for i in range(len(t.val_dataset)):
            ex = collate_examples([t.val_dataset[(i, 0)]])
            latents = pipe.vae.encode(ex["pixel_values"]).latent_dist.mean * pipe.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=gen)
            step = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=gen)
            ids = pipe.tokenizer(ex["captions"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            pred = pipe.unet(sched.add_noise(latents, noise, step), step, pipe.text_encoder(ids)[0]).sample
            expected.append(float(torch.nn.functional.mse_loss(pred, noise)))
    assert t.validation_loss() == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_sample_grid_shows_the_adapter_at_each_sample_strength(tmp_path):
    """Each row is a prompt; the columns are sample_strengths: the base model (strength 0), then the live network
    at each strength, same prompt and seed. Halfway lies between the base and the full adapter."""
    from sd_loha.train.sampling import sample_images

    t = _trainer(tmp_path, sample_prompts=["a red circle", "a blue square"], sample_steps=2, sample_width=64,
                 sample_height=64, train_text_encoder=False, sample_strengths=[0, 0.5, 1])
    with torch.no_grad():
        for p in t.params:
            p.add_(torch.randn_like(p) * 0.5)
    grid = _pixels(t.make_samples("check"))
    assert grid.shape[1] == 3 * 128
    full = [np.asarray(im).astype(np.float32) for im in sample_images(t.pipe, t.cfg)]
    t.network.set_multiplier(0.5)
    half = [np.asarray(im).astype(np.float32) for im in sample_images(t.pipe, t.cfg)]
    t.network.remove()
    base = [np.asarray(im).astype(np.float32) for im in sample_images(t.pipe, t.cfg)]
    for row in range(2):
        for col, expected in enumerate((base, half, full)):
            assert np.array_equal(grid_cell(grid, row, col), expected[row]), (row, col)
        assert np.abs(base[row] - full[row]).mean() > 5.0
        assert 0 < np.abs(base[row] - half[row]).mean() < np.abs(base[row] - full[row]).mean()
