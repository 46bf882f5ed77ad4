"""Every training option has its effect: each test builds a Trainer from a config that sets the option, and checks
what the option changes (the learning rates against diffusers' formulas, the network's layers and factor shapes
against FORMAT.md, the loss against the textbook denoising loss, the sample pipeline's calls, the files written),
not only that a run finishes. docs/testing.md maps every option to its test, here or elsewhere.

Most tests stop after `Trainer.setup()` and at most a few `loss_step()`s on the tiny SD1 model: no full runs.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_loha.models import build_tiny_pipeline
from sd_loha.train.config import OPTIONS, ConfigError, config_from_kwargs
from sd_loha.train.loop import Trainer, train

from .helpers import REPO, base_config, read_file


def _config(out: Path, **overrides):
    # No latent cache unless a test is about it: setup then costs a fraction of a second.
    return config_from_kwargs(**base_config(out, **{"cache_latents": False, **overrides}))


def _trainer(tmp_path: Path, **overrides) -> Trainer:
    out = tmp_path / "out"
    t = Trainer(_config(out, **overrides), out, progress=False)
    t.setup()
    return t


def _first_batch(t: Trainer) -> dict:
    t.sampler.set_epoch(0)
    return next(iter(t.loader))


def _randomize(params, seed: int = 0, scale: float = 0.3) -> None:
    """Non-zero factors (w2_a starts at 0, so ΔW = 0 and the adapter would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------------------------
# Learning rates, optimizer arguments, steps
# ---------------------------------------------------------------------------------------------

TOTAL = 10  # max_train_steps of the schedule tests


def _diffusers_factor(name: str, s: int, *, warmup: int, cycles: int, power: float, lr: float) -> float:
    """diffusers.optimization's schedules as written in its docstrings: the factor on the base LR at step s."""
    if name == "constant":
        return 1.0
    if s < warmup:
        return s / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    progress = (s - warmup) / max(1, TOTAL - warmup)
    if name == "linear":
        return max(0.0, 1 - progress)
    if name == "cosine":  # half a cosine wave (num_cycles is only for the restarts schedule)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    if name == "cosine_with_restarts":
        return 0.0 if progress >= 1 else max(0.0, 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0))))
    if name == "polynomial":  # decays to lr_end = 1e-7, not to 0
        end = 1e-7
        return ((lr - end) * (1 - progress) ** power + end) / lr
    raise AssertionError(name)


@pytest.mark.parametrize("name, warmup, cycles, power", [
    ("constant", 0, 1, 1.0),
    ("constant_with_warmup", 3, 1, 1.0),
    ("linear", 0.2, 1, 1.0),  # a warmup below 1 is a fraction of the run: 2 of 10 steps
    ("cosine", 2, 1, 1.0),
    ("cosine_with_restarts", 1, 3, 1.0),
    ("polynomial", 2, 1, 2.5),
])
def test_lr_schedule_options_follow_diffusers_formula(tmp_path, name, warmup, cycles, power):
    """lr_scheduler, lr_warmup_steps, lr_scheduler_num_cycles and lr_scheduler_power, with unet_lr and
    text_encoder_lr: both groups follow the schedule, each from its own rate."""
    lrs = {"unet": 2e-3, "text_encoder": 5e-4}
    t = _trainer(tmp_path, lr_scheduler=name, lr_warmup_steps=warmup, lr_scheduler_num_cycles=cycles,
                 lr_scheduler_power=power, max_train_steps=TOTAL, learning_rate=1e-3, unet_lr=lrs["unet"],
                 text_encoder_lr=lrs["text_encoder"])
    warmup_steps = round(warmup * TOTAL) if isinstance(warmup, float) else warmup
    groups = t.optimizer.param_groups
    for s in range(TOTAL):
        for g in groups:
            expected = lrs[g["name"]] * _diffusers_factor(name, s, warmup=warmup_steps, cycles=cycles, power=power,
                                                          lr=1e-3)
            assert g["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15), (name, s, g["name"])
        t.optimizer.step()  # no gradients: the weights stay, the schedule advances
        t.lr_scheduler.step()


def test_unet_and_text_encoder_lrs_land_in_their_groups(tmp_path):
    t = _trainer(tmp_path, learning_rate=1e-3, unet_lr=3e-3, text_encoder_lr=2e-4)
    by_name = {g["name"]: g for g in t.optimizer.param_groups}
    assert by_name["unet"]["lr"] == 3e-3 and by_name["text_encoder"]["lr"] == 2e-4
    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}
    assert ids["unet"] == {id(p) for p in t.network.parameters("unet")}
    assert ids["text_encoder"] == {id(p) for p in t.network.parameters("te")} and ids["text_encoder"]
    # not set: both follow learning_rate (kohya's rule)
    plain = _trainer(tmp_path / "plain", learning_rate=7e-4)
    assert [g["lr"] for g in plain.optimizer.param_groups] == [7e-4, 7e-4]


def test_optimizer_args_reach_every_param_group(tmp_path):
    t = _trainer(tmp_path, optimizer_args={"weight_decay": 0.05, "betas": [0.8, 0.95], "eps": 1e-6})
    for g in t.optimizer.param_groups:
        assert (g["weight_decay"], tuple(g["betas"]), g["eps"]) == (0.05, (0.8, 0.95), 1e-6)
    # kohya-style strings mean the same
    k = _trainer(tmp_path / "k", optimizer_args=["weight_decay=0.05", "betas=0.8,0.95"])
    assert all(g["weight_decay"] == 0.05 and tuple(g["betas"]) == (0.8, 0.95) for g in k.optimizer.param_groups)


def test_run_length_and_batch_options(tmp_path):
    """train_batch_size sizes the batches; max_train_steps / max_train_epochs and gradient_accumulation_steps
    set the number of optimizer steps (16 demo images)."""
    t = _trainer(tmp_path, train_batch_size=4, max_train_steps=5)
    assert _first_batch(t)["pixel_values"].shape[0] == 4 and len(t.sampler) == 4 and t.total_steps == 5
    # 8 batches of 2 per epoch, 3 batches per optimizer step: 3 steps per epoch (the last takes 2 batches)
    e = _trainer(tmp_path / "e", train_batch_size=2, max_train_epochs=2, max_train_steps=None,
                 gradient_accumulation_steps=3)
    assert (e.batches_per_epoch, e.steps_per_epoch, e.total_steps) == (8, 3, 6)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_max_grad_norm_clips_the_update(tmp_path):
    """The gradient the optimizer sees has norm max_grad_norm when it was larger; 0 turns clipping off."""
    norms = {}
    for clip in (1e-3, 0.0):
        t = _trainer(tmp_path / str(clip), max_grad_norm=clip, train_text_encoder=False)
        (t.loss_step(_first_batch(t), torch.Generator().manual_seed(0)) * 100).backward()
        real_step = t.optimizer.optimizer.step

        def spy(*a, _params=t.params, _real=real_step, _clip=clip, **kw):
            norms[_clip] = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in _params])))
            return _real(*a, **kw)

        t.optimizer.optimizer.step = spy
        t.optimizer_step()
    assert norms[0.0] > 0.01, "the unclipped gradient must be larger than the clip norm for this test to mean anything"
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-3)


def test_seed_fixes_initialisation_data_order_and_noise(tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        t = _trainer(tmp_path / name, seed=seed, flip_aug=True)
        with torch.no_grad():  # generator=None: the run's own noise, from the global RNG setup() seeded
            loss = float(t.loss_step(_first_batch(t)))
        runs[name] = ([p.detach().clone() for p in t.params], t.sampler.batches(0), loss)
    (pa, ba, la), (pb, bb, lb), (pc, bc, lc) = runs["a"], runs["b"], runs["c"]
    assert all(torch.equal(p, q) for p, q in zip(pa, pb)) and not all(torch.equal(p, q) for p, q in zip(pa, pc))
    assert ba == bb != bc
    assert la == lb != lc


def test_data_loader_workers(tmp_path):
    """max_data_loader_n_workers: the batches come from worker processes, and are the same batches."""
    t = _trainer(tmp_path, max_data_loader_n_workers=2)
    assert t.loader.num_workers == 2
    plain = _trainer(tmp_path / "plain")
    t.sampler.set_epoch(0)
    plain.sampler.set_epoch(0)
    for x, y in zip(t.loader, plain.loader):
        assert x["keys"] == y["keys"] and torch.equal(x["pixel_values"], y["pixel_values"])


# ---------------------------------------------------------------------------------------------
# The network: which layers, which shapes (FORMAT.md), dropout
# ---------------------------------------------------------------------------------------------

def _expected_unet_paths(preset: str, *, kxk: bool) -> set[str]:
    """The UNet layers a preset selects, found independently of targets.py: the Linear/Conv2d layers inside
    the preset's block classes (k×k convs only with conv_dim > 0)."""
    blocks = {"attn-only": ("Attention",), "attn-mlp": ("Transformer2DModel",),
              "full": ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")}[preset]
    unet = build_tiny_pipeline("tiny-sd1").unet
    out = set()
    for block_path, block in unet.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for sub_path, sub in block.named_modules():
            is_kxk = isinstance(sub, torch.nn.Conv2d) and sub.kernel_size != (1, 1)
            if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)) and (kxk or not is_kxk):
                out.add(f"{block_path}.{sub_path}")
    return out


def _check_format_shapes(t: Trainer, *, rank: int, alpha: float, conv_rank: int, conv_alpha: float,
                         tucker: bool) -> set[str]:
    """Every module's file tensors have FORMAT.md's shapes and alpha; returns the kinds seen."""
    sd = t.network.state_dict(torch.float32)
    kinds = set()
    for m in t.network.modules:
        base = m.layer.base
        w = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".", 1)[0] == m.key}
        out_dim, in_dim = base.weight.shape[:2]
        kxk = isinstance(base, torch.nn.Conv2d) and base.kernel_size != (1, 1)
        r, a = (conv_rank, conv_alpha) if kxk else (rank, alpha)
        assert float(w["alpha"]) == pytest.approx(a), m.key
        if kxk and tucker:
            kh, kw = base.kernel_size
            kinds.add("tucker")
            assert w["hada_w1_a"].shape == w["hada_w2_a"].shape == (r, out_dim), m.key
            assert w["hada_w1_b"].shape == w["hada_w2_b"].shape == (r, in_dim), m.key
            assert w["hada_t1"].shape == w["hada_t2"].shape == (r, r, kh, kw), m.key
        else:
            k = base.kernel_size[0] * base.kernel_size[1] if kxk else 1
            kinds.add("flat kxk" if kxk else "linear")
            assert w["hada_w1_a"].shape == w["hada_w2_a"].shape == (out_dim, r), m.key
            assert w["hada_w1_b"].shape == w["hada_w2_b"].shape == (r, in_dim * k), m.key
            assert "hada_t1" not in w
    return kinds


@pytest.mark.parametrize("preset, conv_dim, tucker", [("attn-only", 0, False), ("attn-mlp", 0, False),
                                                      ("full", 0, False), ("full", 2, False), ("full", 3, True)])
def test_preset_ranks_alphas_and_tucker_shape_the_network(tmp_path, preset, conv_dim, tucker):
    t = _trainer(tmp_path, preset=preset, network_dim=3, network_alpha=1.5, conv_dim=conv_dim, conv_alpha=0.5,
                 use_tucker=tucker, train_text_encoder=False)
    paths = {m.path for m in t.network.modules}
    assert all(m.part == "unet" for m in t.network.modules)
    assert paths == _expected_unet_paths(preset, kxk=conv_dim > 0)
    kinds = _check_format_shapes(t, rank=3, alpha=1.5, conv_rank=conv_dim, conv_alpha=0.5, tucker=tucker)
    assert kinds == {"linear"} | ({"tucker" if tucker else "flat kxk"} if conv_dim else set())
    # the forward scale is alpha / rank
    scales = {round(m.layer.scale, 6) for m in t.network.modules}
    assert scales == {0.5} | ({round(0.5 / conv_dim, 6)} if conv_dim else set())


def test_include_exclude_and_text_encoder(tmp_path):
    t = _trainer(tmp_path, preset="attn-only", network_include=["time_embedding.*"], network_exclude=["*attn2*"],
                 train_text_encoder=True)
    unet = {m.path for m in t.network.modules if m.part == "unet"}
    attn_only = _expected_unet_paths("attn-only", kxk=False)
    expected = {p for p in attn_only if "attn2" not in p}
    assert unet == expected | {"time_embedding.linear_1", "time_embedding.linear_2"}
    te = [m for m in t.network.modules if m.part == "te"]
    # attn-only in CLIP: q, k, v and out projections of every layer, in the file as lora_te_text_model_...
    n_layers = t.text_encoders[0].config.num_hidden_layers
    assert sorted({m.path.rsplit(".", 1)[1] for m in te}) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert len(te) == 4 * n_layers and all(m.key.startswith("lora_te_text_model_encoder_layers_") for m in te)
    # kohya names work as patterns too
    k = _trainer(tmp_path / "k", preset="attn-only", network_exclude=["lora_unet_down_blocks_*"],
                 train_text_encoder=False)
    assert {m.path for m in k.network.modules} == {p for p in attn_only if not p.startswith("down_blocks.")}


def test_patterns_that_match_no_layer_are_reported(tmp_path, caplog):
    """A pattern without its globs ('attn1' for '*.attn1.*') matches nothing and would change nothing silently."""
    with caplog.at_level("WARNING", logger="sd_loha.network"):
        t = _trainer(tmp_path, network_include=["time_embedding.*"], network_exclude=["attn1", "*attn2*"],
                     train_text_encoder=False)
    said = [r.getMessage() for r in caplog.records]
    assert any("exclude pattern 'attn1' matches no layer" in m for m in said), said
    assert not any("time_embedding" in m or "attn2" in m for m in said)  # those matched
    assert any(m.path.endswith("attn1.to_q") for m in t.network.modules)  # and 'attn1' indeed excluded nothing


def test_rank_and_module_dropout_change_training_steps_only(tmp_path):
    """With dropout, the same batch, noise and timesteps give a different loss on every training step (the
    dropped rows / modules are drawn anew) but one loss in eval mode, which equals the loss without dropout."""
    losses = {}
    for name, kw in {"none": {}, "rank": {"rank_dropout": 0.5}, "module": {"module_dropout": 0.5}}.items():
        t = _trainer(tmp_path / name, train_text_encoder=False, **kw)
        assert {(m.layer.rank_dropout, m.layer.module_dropout) for m in t.network.modules} == {
            (kw.get("rank_dropout", 0.0), kw.get("module_dropout", 0.0))}
        _randomize(t.params)
        batch = _first_batch(t)
        with torch.no_grad():
            train_mode = [float(t.loss_step(batch, torch.Generator().manual_seed(0))) for _ in range(4)]
            t.unet.eval()
            eval_mode = [float(t.loss_step(batch, torch.Generator().manual_seed(0))) for _ in range(2)]
        losses[name] = (train_mode, eval_mode)
    none_train, none_eval = losses["none"]
    assert len(set(none_train)) == 1 and none_train[0] == none_eval[0]
    for name in ("rank", "module"):
        train_mode, eval_mode = losses[name]
        assert len(set(train_mode)) > 1, f"{name} dropout must change training steps"
        assert eval_mode == [none_eval[0]] * 2, f"{name} dropout must be off in eval mode"


# ---------------------------------------------------------------------------------------------
# The loss step: model, noise, target, conditioning
# ---------------------------------------------------------------------------------------------

def _textbook_loss(t: Trainer, batch: dict, seed: int, *, noise_offset: float = 0.0, v: bool = False,
                   min_snr_gamma: float | None = None) -> float:
    """MSE of the UNet's prediction on x_t = √ᾱ x0 + √(1-ᾱ) ε, against ε or v = √ᾱ ε - √(1-ᾱ) x0, with
    ε = N(0, 1) + noise_offset · N(0, 1) per (sample, channel); with min-SNR-γ each sample's MSE weighted by
    min(SNR, γ) / SNR (ε) or min(SNR, γ) / (SNR + 1) (v), SNR = ᾱ / (1 - ᾱ) (Hang et al. 2023). Draws from a
    generator seeded like the one handed to loss_step, in loss_step's order (noise, offset, timesteps)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = t.encode_pixels(batch["pixel_values"])
    b, c = x0.shape[:2]
    eps = torch.randn(x0.shape, generator=gen)
    if noise_offset:
        eps = eps + noise_offset * torch.randn((b, c, 1, 1), generator=gen)
    ts = torch.randint(0, t.noise_scheduler.config.num_train_timesteps, (b,), generator=gen)
    ab = t.noise_scheduler.alphas_cumprod[ts].view(b, 1, 1, 1)
    noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    pred = t.unet(noisy, ts, t.conditioning(batch)["encoder_hidden_states"]).sample
    target = ab.sqrt() * eps - (1 - ab).sqrt() * x0 if v else eps
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = (ab / (1 - ab)).view(b)
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / (snr + 1 if v else snr)
    return float(per_sample.mean())


@torch.no_grad()
def test_noise_offset_is_in_the_noise(tmp_path):
    t = _trainer(tmp_path, noise_offset=0.5, train_text_encoder=False)
    _randomize(t.params)
    batch = _first_batch(t)
    loss = float(t.loss_step(batch, torch.Generator().manual_seed(7)))
    assert loss == pytest.approx(_textbook_loss(t, batch, 7, noise_offset=0.5), rel=1e-5)
    assert loss != pytest.approx(_textbook_loss(t, batch, 7), rel=1e-2)


@torch.no_grad()
@pytest.mark.parametrize("model, setting, v", [("tiny-sd1", None, False), ("tiny-sd1", True, True),
                                               ("tiny-sd2", None, True), ("tiny-sd2", False, False)])
def test_v_parameterization_sets_the_target(tmp_path, model, setting, v):
    """Not set: the model's own prediction type (tiny-sd2 is a v-model); true/false override it, for the loss
    target and for the sample pipeline's scheduler."""
    t = _trainer(tmp_path, pretrained_model=model, v_parameterization=setting, train_text_encoder=False)
    kind = "v_prediction" if v else "epsilon"
    assert t.noise_scheduler.config.prediction_type == kind and t.pipe.scheduler.config.prediction_type == kind
    _randomize(t.params)
    batch = _first_batch(t)
    loss = float(t.loss_step(batch, torch.Generator().manual_seed(3)))
    assert loss == pytest.approx(_textbook_loss(t, batch, 3, v=v), rel=1e-5)
    assert loss != pytest.approx(_textbook_loss(t, batch, 3, v=not v), rel=1e-2)


@torch.no_grad()
@pytest.mark.parametrize("model, v", [("tiny-sd1", False), ("tiny-sd2", True)])
def test_min_snr_gamma_weights_the_trainer_loss(tmp_path, model, v):
    """The weights themselves are checked against the formula in test_loss.py; here: the option reaches the
    trainer's loss, with the weighting of the model's prediction type."""
    t = _trainer(tmp_path, pretrained_model=model, min_snr_gamma=0.5, train_batch_size=4, train_text_encoder=False)
    _randomize(t.params)
    batch = _first_batch(t)
    loss = float(t.loss_step(batch, torch.Generator().manual_seed(11)))
    assert loss == pytest.approx(_textbook_loss(t, batch, 11, v=v, min_snr_gamma=0.5), rel=1e-5)
    assert loss != pytest.approx(_textbook_loss(t, batch, 11, v=v), rel=1e-2)


@torch.no_grad()
def test_clip_skip_conditions_on_an_earlier_layer(tmp_path):
    """clip_skip 2: the penultimate layer's hidden states through the final layer norm (A1111 and kohya)."""
    t = _trainer(tmp_path, clip_skip=2, train_text_encoder=False)
    te, tok = t.pipe.text_encoder, t.pipe.tokenizer
    captions = ["sdlohastyle, a red circle", "a blue square"]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    hidden = te(ids, output_hidden_states=True).hidden_states
    final_norm = getattr(te, "final_layer_norm", None) or te.text_model.final_layer_norm
    cond = t.conditioning({"captions": captions})["encoder_hidden_states"]
    torch.testing.assert_close(cond, final_norm(hidden[-2]), rtol=0, atol=0)
    last = _trainer(tmp_path / "one", clip_skip=1, train_text_encoder=False).conditioning({"captions": captions})
    torch.testing.assert_close(last["encoder_hidden_states"], te(ids)[0], rtol=0, atol=0)
    assert not torch.allclose(cond, last["encoder_hidden_states"])


def _calls_of_first(module: torch.nn.Module, cls_name: str) -> list[int]:
    """Counts the calls of the first `cls_name` submodule: an attention layer inside a checkpointed block
    (transformers 5 recomputes a layer's `forward`, so hooks on the layer itself do not see the recomputation)."""
    block = next(m for m in module.modules() if type(m).__name__ == cls_name)
    calls = [0]
    # a pre-hook: the recomputation in backward stops once it has what backward needs, before forward hooks run
    block.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tmp_path):
    """UNet and text-encoder blocks run twice per step (forward, then again in backward) and the gradients
    equal those of a run without checkpointing."""
    grads, calls = {}, {}
    for on in (False, True):
        t = _trainer(tmp_path / str(on), gradient_checkpointing=on, seed=1)
        assert t.unet.is_gradient_checkpointing is on
        unet_calls = _calls_of_first(t.unet, "Attention")
        te_calls = _calls_of_first(t.text_encoders[0], "CLIPAttention")
        _randomize(t.params)
        t.loss_step(_first_batch(t), torch.Generator().manual_seed(0)).backward()
        grads[on] = [p.grad.clone() for p in t.params]
        calls[on] = (unet_calls[0], te_calls[0])
    assert calls[False] == (1, 1) and calls[True] == (2, 2), calls
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_cached_latents_skip_the_vae_and_give_the_same_loss(tmp_path, monkeypatch):
    cached = _trainer(tmp_path / "c", cache_latents=True, train_text_encoder=False)
    plain = _trainer(tmp_path / "p", cache_latents=False, train_text_encoder=False)
    cb, pb = _first_batch(cached), _first_batch(plain)
    assert "latents" in cb and "pixel_values" not in cb and "latents" not in pb
    _randomize(cached.params)
    _randomize(plain.params)

    def no_vae(*a, **k):
        raise AssertionError("the VAE ran although the latents are cached")

    monkeypatch.setattr(cached.vae, "encode", no_vae)
    with torch.no_grad():
        a = float(cached.loss_step(cb, torch.Generator().manual_seed(0)))
        b = float(plain.loss_step(pb, torch.Generator().manual_seed(0)))
    # The cache encodes in batches of 4, the plain run the training batch: fp32 convolution kernels may sum in
    # another order per batch size and CPU (oneDNN picks by shape and instruction set), about 1e-7 relative per
    # latent; 1e-5 on the loss leaves room for that, while a wrong cache (another image, a sample of the latent
    # distribution instead of its mode) moves the loss by percents.
    assert a == pytest.approx(b, rel=1e-5)


def test_latents_cached_to_disk_are_reused(tmp_path, capsys):
    _trainer(tmp_path, cache_latents=True, cache_latents_to_disk=True)
    assert "16 encoded, 0 reused" in capsys.readouterr().out
    files = list((tmp_path / "out" / ".cache" / "latents").rglob("*"))
    assert any(f.is_file() for f in files)
    _trainer(tmp_path, cache_latents=True, cache_latents_to_disk=True)
    assert "0 encoded, 16 reused" in capsys.readouterr().out
    _trainer(tmp_path / "mem", cache_latents=True)
    assert not (tmp_path / "mem" / "out" / ".cache").exists()


def test_replacement_vae_is_used(tmp_path):
    from diffusers import AutoencoderKL

    own = build_tiny_pipeline("tiny-sd1").vae
    other = AutoencoderKL.from_config(own.config)
    _randomize(other.parameters(), seed=9, scale=0.05)
    other.save_pretrained(tmp_path / "vae")
    t = _trainer(tmp_path, vae=str(tmp_path / "vae"))
    for (name, p), q in zip(t.vae.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
    plain = _trainer(tmp_path / "plain")
    assert not torch.equal(next(t.vae.parameters()), next(plain.vae.parameters()))


# ---------------------------------------------------------------------------------------------
# The dataset: buckets, augmentation, captions (the algorithms are tested in tests/data; here the options
# reach them through the config)
# ---------------------------------------------------------------------------------------------

CAPTION = "a, b, c, d, e, f"


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """Four images: square, wide (2:1), tall (1:2) and small (80 px), each captioned twice (.txt and .caption)."""
    root = tmp_path / "data"
    root.mkdir()
    sizes = {"square": (128, 128), "wide": (256, 128), "tall": (128, 256), "small": (80, 80)}
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(CAPTION)
        (root / f"{name}.caption").write_text(f"{name} from .caption")
    return root


def _buckets(t: Trainer) -> dict[str, tuple[int, int]]:
    return {Path(it.path).stem: tuple(it.bucket) for it in t.preflight.items}


def _square_64(data_dir: Path) -> dict:
    return {"train_data_dir": str(data_dir), "resolution": 64, "enable_bucket": False, "train_batch_size": 1}


def _index_of(t: Trainer, stem: str) -> int:
    return next(i for i in range(len(t.dataset)) if Path(t.dataset.item_for(i).path).stem == stem)


def test_bucket_options_shape_the_batches(tmp_path, data_dir):
    kw = dict(train_data_dir=str(data_dir), resolution=128, train_batch_size=1)
    bucketing = dict(enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=32)
    off = _trainer(tmp_path / "off", **{**kw, **bucketing, "enable_bucket": False})
    assert set(_buckets(off).values()) == {(128, 128)}
    # buckets of 32-px steps between 64 and 256 at 128x128 px area: the wide image is wide, the tall one tall
    on = _trainer(tmp_path / "on", **kw, **bucketing)
    b = _buckets(on)
    assert b["wide"][0] > b["wide"][1] and b["tall"][0] < b["tall"][1] and b["square"] == (128, 128)
    assert all(s % 32 == 0 and 64 <= s <= 256 for wh in b.values() for s in wh)
    w, h = b["wide"]
    assert on.dataset[_index_of(on, "wide")]["pixel_values"].shape == (3, h, w)  # what the VAE gets

    def buckets_with(**changed) -> dict[str, tuple[int, int]]:
        return _buckets(_trainer(tmp_path / "-".join(map(str, changed.values())), **kw, **{**bucketing, **changed}))

    # 64-px steps: no bucket within the area is nearer 2:1 than the square one
    assert buckets_with(bucket_reso_steps=64)["wide"] == (128, 128)
    # max_bucket_reso 128: no side above 128; min_bucket_reso 128: no side below, so every bucket is square
    capped = buckets_with(max_bucket_reso=128)
    assert all(s <= 128 for wh in capped.values() for s in wh) and capped["tall"] != b["tall"]
    assert set(buckets_with(min_bucket_reso=128).values()) == {(128, 128)}
    # bucket_no_upscale: the 80-px image keeps (about) its own size instead of being upscaled to 128
    assert b["small"] == (128, 128) and buckets_with(bucket_no_upscale=True)["small"] == (64, 64)


def test_resolution_sets_the_training_size(tmp_path):
    t = _trainer(tmp_path, resolution=128, max_bucket_reso=256, enable_bucket=False)
    assert _first_batch(t)["pixel_values"].shape[-2:] == (128, 128)
    assert t.encode_pixels(_first_batch(t)["pixel_values"]).shape[-2:] == (16, 16)


def test_crop_and_flip_augmentation(tmp_path, data_dir):
    kw = _square_64(data_dir)
    plain = _trainer(tmp_path / "plain", **kw)
    aug = _trainer(tmp_path / "aug", random_crop=True, flip_aug=True, **kw)
    i, j = _index_of(plain, "wide"), _index_of(aug, "wide")
    plain_ex = [plain.dataset[(i, e)] for e in range(16)]
    aug_ex = [aug.dataset[(j, e)] for e in range(16)]
    # 256x128 resized to 128x64, 64 px to crop: centre (32) every epoch, or anywhere with random_crop
    assert {ex["crop_top_left"] for ex in plain_ex} == {(0, 32)} and not any(ex["flipped"] for ex in plain_ex)
    assert len({ex["crop_top_left"] for ex in aug_ex}) > 3
    assert {ex["flipped"] for ex in aug_ex} == {True, False}


def test_caption_options_reach_the_dataset(tmp_path, data_dir):
    kw = _square_64(data_dir)
    plain = _trainer(tmp_path / "plain", **kw)
    assert sorted(Path(it.path).name for it in plain.preflight.items) == [
        "small.png", "square.png", "tall.png", "wide.png"]  # train_data_dir's images, nothing else
    assert {plain.dataset[(i, e)]["caption"] for i in range(4) for e in range(5)} == {CAPTION}
    ext = _trainer(tmp_path / "ext", caption_extension=".caption", **kw)
    assert {ext.dataset[(i, 0)]["caption"] for i in range(4)} == {f"{n} from .caption"
                                                                  for n in ("square", "wide", "tall", "small")}

    t = _trainer(tmp_path / "aug", shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.3,
                 caption_dropout_rate=0.2, trigger_word="sks", **kw)
    captions = [t.dataset[(i, e)]["caption"] for i in range(4) for e in range(30)]
    kept = [c for c in captions if c]
    tag_lists = [[s.strip() for s in c.split(",")] for c in kept]
    assert all(tags[:2] == ["sks", "a"] for tags in tag_lists)  # the trigger, then keep_tokens, in front
    assert all(set(tags[2:]) <= set("bcdef") for tags in tag_lists)
    assert len({tuple(tags) for tags in tag_lists if len(tags) == 7}) > 1  # shuffled
    assert any(len(tags) < 7 for tags in tag_lists)  # tags dropped
    assert 0 < captions.count("") < len(captions) // 2  # whole captions dropped at about 0.2


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                              ("float", torch.float32)])
def test_save_precision_is_the_files_dtype(tmp_path, precision, dtype):
    t = _trainer(tmp_path, save_precision=precision, train_text_encoder=False)
    _randomize(t.params)
    tensors, _ = read_file(t.save_adapter("check"))
    factors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    assert factors and {v.dtype for v in factors.values()} == {dtype}
    sd = t.network.state_dict(torch.float32)
    assert all(torch.equal(v, sd[k].to(dtype)) for k, v in factors.items())


def test_output_name_and_save_state_name_the_files(tmp_path):
    t = _trainer(tmp_path, output_name="mystyle", save_state=False, train_text_encoder=False)
    t.checkpoint(["step000001"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mystyle-step000001.safetensors"]
    s = _trainer(tmp_path / "s", output_name="mystyle", save_state=True, train_text_encoder=False)
    s.checkpoint(["step000001"])
    names = sorted(p.name for p in (tmp_path / "s" / "out").iterdir())
    assert names == ["mystyle-step000001.safetensors", "state-00000000"]
    assert (tmp_path / "s" / "out" / "state-00000000" / "progress.json").is_file()


# ---------------------------------------------------------------------------------------------
# Samples: the pipeline's UNet calls show steps, size, guidance, negative prompt, sampler
# ---------------------------------------------------------------------------------------------

class _UNetCalls:
    """What the sample pipeline hands the UNet: latent shape, batch, the scheduler in use, conditioning."""

    def __init__(self, t: Trainer) -> None:
        self.t, self.calls = t, []
        t.unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.calls.append(dict(shape=tuple(args[0].shape), scheduler=self.t.pipe.scheduler, states=states.detach()))

    def take(self) -> list[dict]:
        out, self.calls = self.calls, []
        return out


SAMPLING = dict(train_text_encoder=False, sample_prompts=["a red circle", "a blue square"], sample_steps=2,
                sample_sampler="euler", sample_guidance_scale=7.0)


@pytest.fixture
def sampler_trainer(tmp_path):
    t = _trainer(tmp_path, **SAMPLING)
    return t, _UNetCalls(t)


def _set_sampling(t: Trainer, tmp_path: Path, **kw) -> None:
    """Sample options changed on a set-up trainer (make_samples reads them from t.cfg each time)."""
    t.cfg = _config(tmp_path / "out", **{**SAMPLING, **kw})


def test_sample_prompts_steps_size_and_guidance(tmp_path, sampler_trainer):
    t, unet = sampler_trainer
    grid = Image.open(t.make_samples("a"))
    calls = unet.take()
    # two prompts x two steps, each a CFG batch of 2 at 64x64 px (8x8 latents), for the base model and for the
    # adapter; each row of the grid is one prompt: base | adapter
    assert [c["shape"] for c in calls] == [(2, 4, 8, 8)] * 8
    assert grid.size == (2 * 128, 14 + 2 * (128 + 14))  # a header row, then per prompt a label and 64 px at 2x
    t.make_samples("again")
    assert len(unet.take()) == 4  # the base images are made once per sampling settings
    _set_sampling(t, tmp_path, sample_steps=3, sample_width=96, sample_height=64, sample_guidance_scale=1.0)
    grid = Image.open(t.make_samples("b"))
    # guidance 1: no unconditional half (new settings: the base images again)
    assert [c["shape"] for c in unet.take()] == [(1, 4, 8, 12)] * 12
    assert grid.size[0] == 2 * 96 * 2


@torch.no_grad()
def test_sample_negative_prompt_is_the_unconditional_half(tmp_path, sampler_trainer):
    from sd_loha.train.conditioning import Conditioner

    t, unet = sampler_trainer
    encode = Conditioner(t.pipe, sdxl=False, clip_skip=1, train_text_encoder=False)
    _set_sampling(t, tmp_path, sample_negative_prompt="blurry, lowres", sample_prompts=["a red circle"])
    t.make_samples("neg")
    states = unet.take()[0]["states"]
    torch.testing.assert_close(states[0], encode(["blurry, lowres"], t.device)["encoder_hidden_states"][0])
    torch.testing.assert_close(states[1], encode(["a red circle"], t.device)["encoder_hidden_states"][0])
    _set_sampling(t, tmp_path, sample_prompts=["a red circle"])
    t.make_samples("plain")
    torch.testing.assert_close(unet.take()[0]["states"][0], encode([""], t.device)["encoder_hidden_states"][0])


def test_sample_seed_fixes_the_images(tmp_path, sampler_trainer):
    t, _ = sampler_trainer
    _randomize(t.params)
    grids = {}
    for tag, seed in (("a", 5), ("b", 5), ("c", 6)):
        _set_sampling(t, tmp_path, sample_seed=seed)
        grids[tag] = np.asarray(Image.open(t.make_samples(tag)))
    assert np.array_equal(grids["a"], grids["b"]) and not np.array_equal(grids["a"], grids["c"])


SAMPLER_CLASSES = {  # docs/config.md's sampler table, as diffusers names the classes
    "euler_a": "EulerAncestralDiscreteScheduler", "euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler", "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def test_sample_sampler_is_the_scheduler_the_pipeline_uses(tmp_path, sampler_trainer):
    t, unet = sampler_trainer
    original = t.pipe.scheduler
    names = [n for n in SAMPLER_CLASSES if n != "lms" or importlib.util.find_spec("scipy")]  # lms needs scipy
    for name in names:
        # 4 steps: PNDM's PLMS warm-up needs them (fewer are refused: see the test below)
        _set_sampling(t, tmp_path, sample_sampler=name, sample_prompts=["a red circle"], sample_steps=4)
        t.make_samples(name)
        used = {type(c["scheduler"]).__name__ for c in unet.take()}
        assert used == {SAMPLER_CLASSES[name]}, name
    assert t.pipe.scheduler is original  # training's own scheduler is back after sampling
    _set_sampling(t, tmp_path, sample_sampler="dpmpp_2m_karras", sample_prompts=["a red circle"])
    t.make_samples("karras")
    sched = unet.take()[0]["scheduler"]
    assert sched.config.algorithm_type == "dpmsolver++" and sched.config.use_karras_sigmas


def test_lms_sampler_without_scipy_is_refused_before_training(tmp_path):
    if importlib.util.find_spec("scipy"):
        pytest.skip("scipy is installed here: lms samples are tested above")
    with pytest.raises(ConfigError, match="scipy"):
        _config(tmp_path / "out", sample_sampler="lms", sample_prompts=["a"], sample_every_n_steps=100)


def test_pndm_with_too_few_steps_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="sample_steps"):
        _config(tmp_path / "out", sample_sampler="pndm", sample_steps=2, sample_prompts=["a"], sample_every_n_steps=100)


def test_sample_and_save_intervals_in_a_run(tmp_path):
    """16 images, batch 8: 2 steps per epoch. Samples every 3 steps and every epoch, over 4 steps: epoch 1 ends
    at step 2, step 3 is due, step 4 ends the run (the final sample)."""
    result = train(base_config(tmp_path / "out", train_batch_size=8, max_train_steps=4, sample_every_n_steps=3,
                               sample_every_n_epochs=1, sample_prompts=["a red circle"], sample_steps=1,
                               sample_width=64, sample_height=64, train_text_encoder=False, preset="attn-only"),
                   progress=False)
    assert [p.name for p in result.samples] == ["epoch0001.png", "step000003.png", "final.png", "progress.png"]
    assert sorted(p.name for p in (tmp_path / "out" / "samples").iterdir()) == sorted(p.name for p in result.samples)


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------

def test_log_with_none_and_logging_dir(tmp_path):
    t = _trainer(tmp_path, log_with="none", logging_dir=str(tmp_path / "logs"))
    assert t.accelerator.log_with == [] and t.accelerator.trackers == []
    assert Path(t.accelerator.project_dir) == tmp_path / "logs"
    assert Path(_trainer(tmp_path / "d", log_with="none").accelerator.project_dir) == tmp_path / "d" / "out" / "logs"


def test_tensorboard_logs_land_in_logging_dir(tmp_path):
    pytest.importorskip("tensorboard")
    t = _trainer(tmp_path, log_with="tensorboard", logging_dir=str(tmp_path / "logs"))
    t.accelerator.log({"loss": 0.5}, step=1)
    t.accelerator.end_training()
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_tensorboard_asked_for_but_not_installed_is_refused(tmp_path, monkeypatch):
    import sd_loha.train.config.rules as config

    monkeypatch.setattr(config, "tensorboard_installed", lambda: False)  # the test extra installs it
    for value in ("tensorboard", "all"):
        with pytest.raises(ConfigError, match="tensorboard"):
            _config(tmp_path / "out", log_with=value)


# ---------------------------------------------------------------------------------------------
# docs/testing.md: every option listed, every test it names exists
# ---------------------------------------------------------------------------------------------

def _testing_md_rows() -> dict[str, list[str]]:
    """option -> the `file::test` entries of its row in docs/testing.md's option tables."""
    rows = {}
    for line in (REPO / "docs" / "testing.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = [t.strip() for t in cells[1].split(";")]
    return rows


def test_docs_testing_md_names_a_test_for_every_option():
    rows = _testing_md_rows()
    assert sorted(set(OPTIONS) - set(rows)) == [], "options missing from docs/testing.md"
    assert sorted(set(rows) - set(OPTIONS)) == [], "docs/testing.md lists options that do not exist"
    missing = []
    for option, tests in rows.items():
        for entry in tests:
            file, _, name = entry.partition("::")
            path = REPO / (f"tests/train/{file}" if file == "test_options.py" else file)
            if not path.is_file() or f"def {name}(" not in path.read_text(encoding="utf-8"):
                missing.append(f"{option}: {entry}")
    assert missing == [], missing
