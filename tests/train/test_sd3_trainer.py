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

from .helpers import base_config, sd3_transformer_output


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


# ---- the MMDiT network: targets, the fused kohya form, the split form -------------------------------------------

def _sd3_pipe():
    from sd_loha.models import build_tiny_pipeline

    return build_tiny_pipeline("tiny-sd3")


def _unet_names(net) -> set[str]:
    """The file's transformer modules by their original-layout layer kind (attn_qkv, mlp_fc1, ...) and stream."""
    out = set()
    for m in net.modules:
        if m.part == "unet":
            stream = "x" if "_x_block_" in m.key else "context"
            out.add(f"{stream}:{m.key.split('_block_', 1)[1]}")
    return out


def test_mmdit_presets_include_exclude_and_t5(caplog):
    from sd_loha.network import add_loha

    pipe = _sd3_pipe()
    expected = {
        "attn-only": {f"{s}:{k}" for s in ("x", "context") for k in ("attn_qkv", "attn_proj")},
        "attn-mlp": {f"{s}:{k}" for s in ("x", "context") for k in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2")},
    }
    expected["full"] = expected["attn-mlp"] | {"x:adaLN_modulation_1", "context:adaLN_modulation_1", "x:attn2_qkv",
                                               "x:attn2_proj"}
    for preset, names in expected.items():
        net = add_loha(pipe, preset=preset, rank=2)
        assert _unet_names(net) == names, preset
        assert {m.part for m in net.modules} == {"unet", "te1", "te2"}  # T5 frozen by default
        net.remove()
    # include / exclude by the names files use (kohya's original layout)
    net = add_loha(pipe, rank=2, include=["lora_unet_joint_blocks_1_x_block_adaLN_modulation_1"],
                   exclude=["*context_block_mlp*"])
    keys = {m.key for m in net.modules}
    assert "lora_unet_joint_blocks_1_x_block_adaLN_modulation_1" in keys
    assert "lora_unet_joint_blocks_0_x_block_adaLN_modulation_1" not in keys
    assert not any("context_block_mlp" in k for k in keys) and any("x_block_mlp" in k for k in keys)
    net.remove()
    net = add_loha(pipe, rank=2, text_encoder=False, include=["*x_block_attn2_*"])
    assert _unet_names(net) == expected["attn-mlp"] | {"x:attn2_qkv", "x:attn2_proj"}
    net.remove()
    net = add_loha(pipe, rank=2, train_t5xxl=True)
    t5 = [m.key for m in net.modules if m.part == "te3"]
    assert t5 and all(k.startswith("lora_te3_encoder_block_") for k in t5)
    assert net.metadata()["ss_network_args"].count('"train_t5xxl": "True"') == 1
    net.remove()
    # a fused qkv is one module: excluding one of its three diffusers layers is refused before anything changes
    import pytest

    with pytest.raises(ValueError, match="to_k.*simpletuner"):
        add_loha(pipe, rank=2, exclude=["transformer_blocks.0.attn.to_k"])
    assert not any(type(m).__name__ in ("LoHALayer", "RowSlice") for m in pipe.transformer.modules())


def _randomize(net, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules:
            for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
                p = getattr(m.layer, name)
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_fused_qkv_and_swapped_adaln_train_one_loha_each_exactly():
    """One file module per fused qkv / swapped adaLN; the rows each diffusers layer computes are the rows of the
    module's ΔW as LyCORIS's functional LoHA computes it (halves exchanged for the adaLN), and a layer's gradient
    reaches only its rows of the shared A factors."""
    from lycoris.functional import loha as ly_loha

    from sd_loha.network import add_loha
    from sd_loha.sd3_network import FusedLoHA, RowSlice

    pipe = _sd3_pipe()
    t = pipe.transformer
    net = add_loha(pipe, preset="full", rank=3, alpha=1.5, text_encoder=False)
    _randomize(net)
    by_key = {m.key: m for m in net.modules}
    width = t.config.num_attention_heads * t.config.attention_head_dim
    last = t.config.num_layers - 1
    cases = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                                      "transformer_blocks.0.attn.to_v"],
        "lora_unet_joint_blocks_1_context_block_attn_qkv": [f"transformer_blocks.1.attn.add_{c}_proj" for c in "qkv"],
        "lora_unet_joint_blocks_0_x_block_attn2_qkv": [f"transformer_blocks.0.attn2.to_{c}" for c in "qkv"],
        f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1": [f"transformer_blocks.{last}.norm1_context.linear"],
    }
    for key, paths in cases.items():
        m = by_key[key]
        assert isinstance(m.layer, FusedLoHA) and [t.get_submodule(p) for p in paths] == [s for _, _, s in m.slices]
        f = m.layer.factors()
        whole = ly_loha.diff_weight(f["hada_w1_b"], f["hada_w1_a"], f["hada_w2_b"], f["hada_w2_a"], None, None,
                                    gamma=1.5 / 3, backend="torch")
        if len(paths) == 1:  # the file keeps (shift, scale), the model (scale, shift)
            half = whole.shape[0] // 2
            expected = [torch.cat([whole[half:], whole[:half]])]
        else:
            assert whole.shape[0] == 3 * width
            expected = list(whole.split(width))
        for path, want in zip(paths, expected):
            layer = t.get_submodule(path)
            assert isinstance(layer, RowSlice) and layer.owner is m.layer
            eye = torch.eye(layer.in_features)
            with torch.no_grad():
                got = (layer(eye) - layer.base(eye)).T
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # shared parameters, not copies: k's gradient lands in rows [w, 2w) of the one w1_a
    m = by_key["lora_unet_joint_blocks_0_x_block_attn_qkv"]
    to_k = t.get_submodule("transformer_blocks.0.attn.to_k")
    to_k(torch.randn(2, width)).sum().backward()
    grad = m.layer.hada_w1_a.grad
    assert grad[width:2 * width].abs().sum() > 0 and grad[:width].abs().sum() == 0 and grad[2 * width:].abs().sum() == 0
    # remove() puts the three original Linears back
    net.remove()
    assert type(t.get_submodule("transformer_blocks.0.attn.to_k")).__name__ == "Linear"


def test_both_file_forms_load_strictly_and_compute_what_training_computed(tmp_path):
    """The kohya file (fused qkv, swapped adaLN halves) and the simpletuner file (split) of one network load
    strictly in apply_loha on a fresh pipeline and give the transformer the output training gave it; the split
    file is what sd3_convert makes of the fused one, and the real LyCORIS loads it on the diffusers transformer."""
    from lycoris import create_lycoris_from_weights

    from sd_loha import apply_loha
    from sd_loha.io import parse_state_dict, read_safetensors
    from sd_loha.network import add_loha
    from sd_loha.sd3_convert import to_form
    from sd_loha.sd3_names import SD3Names

    outs, files = {}, {}
    for form in ("kohya", "simpletuner"):
        pipe = _sd3_pipe()
        base_out = sd3_transformer_output(pipe)
        net = add_loha(pipe, preset="full", rank=3, alpha=1.5, text_encoder=False, sd3_file_form=form)
        _randomize(net, seed=4)  # the same factors: both forms' modules come in the same order of rows
        outs[form] = sd3_transformer_output(pipe)
        assert not torch.allclose(outs[form], base_out)
        files[form] = net.save(tmp_path / f"{form}.safetensors", dtype=torch.float32)
        tensors = read_safetensors(files[form])[0]
        prefix = "lora_unet_joint_blocks_" if form == "kohya" else "lycoris_transformer_blocks_"
        assert all(k.startswith(prefix) for k in tensors)
        fresh = _sd3_pipe()
        report = apply_loha(fresh, files[form], strict=True)
        assert report.unmatched == [] and report.patched["transformer"] == sum(len(m.slices) or 1 for m in net.modules)
        torch.testing.assert_close(sd3_transformer_output(fresh), outs[form], rtol=1e-4, atol=1e-5)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.hada_w1_a" in read_safetensors(files["kohya"])[0]
    # the fused file converted to the split form (sd3_convert, exact) computes what training computed
    names = SD3Names.from_pipeline(_sd3_pipe())
    converted = to_form(parse_state_dict(read_safetensors(files["kohya"])[0]), names, "simpletuner")
    assert "lycoris_transformer_blocks_0_attn_to_k.hada_w1_a" in converted
    fresh = _sd3_pipe()
    apply_loha(fresh, converted, strict=True)
    torch.testing.assert_close(sd3_transformer_output(fresh), outs["kohya"], rtol=1e-4, atol=1e-5)
    # the real LyCORIS reads the split file on the diffusers transformer (its own module names)
    lyco_pipe = _sd3_pipe()
    lyco, _ = create_lycoris_from_weights(1.0, str(files["simpletuner"]), lyco_pipe.transformer)
    lyco.apply_to()
    assert len(lyco.loras) == len({k.split(".")[0] for k in read_safetensors(files["simpletuner"])[0]})
    torch.testing.assert_close(sd3_transformer_output(lyco_pipe), outs["simpletuner"], rtol=1e-4, atol=1e-5)


def test_memory_estimate_counts_the_transformer_and_its_fused_adapter(tmp_path):
    """The estimate names the MMDiT transformer as the denoiser ("unet"): its weights, the adapter (one set of
    factors per fused qkv, not three) and AdamW's state are exact; its activations are not measured ("?")."""
    t = _trainer(tmp_path, mixed_precision="bf16", optimizer_type="AdamW", cache_text_encoder_outputs=True)
    t._setup_network()
    t._estimate_memory()
    inputs = t.memory.inputs
    weights = sum(p.numel() * p.element_size() for n, p in t.unet.named_parameters() if "hada_" not in n) + sum(
        b.numel() * b.element_size() for n, b in t.unet.named_buffers() if not n.endswith(".alpha"))
    assert sum(inputs.weights["unet"].values()) == weights
    params = t.network.parameters()
    assert len({id(p) for p in params}) == len(params)  # shared, not copied
    factors = sum(p.numel() * 4 for p in params)
    assert inputs.gradients == factors and inputs.optimizer == 2 * factors + 4 * len(params)  # moments + step counts
    assert inputs.adapter == factors + 4 * len(t.network.modules)  # + one fp32 alpha each
    assert inputs.activations is None and "activations" in t.memory.format() and "?" in t.memory.format()
    fused = [m for m in t.network.modules if m.slices]
    assert fused and all(m.layer.hada_w1_a.shape[0] == sum(s.out_features for _, _, s in m.slices) for m in fused)


def test_simpletuner_form_with_trained_clips_and_t5_end_to_end(tmp_path):
    """sd3_file_form = "simpletuner" writes LyCORIS's split diffusers names, train_t5xxl adds T5's modules, the run
    changes them, and the file loads strictly; the options are refused where they cannot apply."""
    import pytest

    from sd_loha import apply_loha
    from sd_loha.models import build_tiny_pipeline
    from sd_loha.train.config import ConfigError
    from sd_loha.train.loop import train

    from .helpers import read_file

    out = tmp_path / "out"
    train(base_config(out, pretrained_model="tiny-sd3", sd3_file_form="simpletuner", train_t5xxl=True,
                      max_train_steps=2, mixed_precision="bf16"), progress=False)
    path = next(out.glob("*.safetensors"))
    tensors, meta = read_file(path)
    modules = {k.split(".")[0] for k in tensors}
    assert any(m.startswith("lycoris_transformer_blocks_0_attn_to_q") for m in modules)
    assert not any("joint_blocks" in m for m in modules)
    assert {m.split("_")[1] for m in modules if m.startswith("lora_")} == {"te1", "te2", "te3"}
    assert any(tensors[k].abs().sum() > 0 for k in tensors if k.startswith("lora_te3_") and "hada_w2_a" in k)
    variant = meta["ss_base_model_version"]  # kohya writes the bare SD 3.x variant here
    assert variant and meta["modelspec.architecture"] == f"stable-diffusion-3-{variant}/lora"
    assert '"train_t5xxl": "True"' in meta["ss_network_args"]
    report = apply_loha(build_tiny_pipeline("tiny-sd3"), path, strict=True)
    assert report.unmatched == [] and report.patched["te3"] > 0 and report.patched["transformer"] > 0
    with pytest.raises(ConfigError, match="sd3_file_form is for SD 3.x"):
        load(base_config(tmp_path, sd3_file_form="simpletuner"))
    with pytest.raises(ConfigError, match="dora_wd.*simpletuner"):
        load(base_config(tmp_path, pretrained_model="tiny-sd3", dora_wd=True))
    assert load(base_config(tmp_path, pretrained_model="tiny-sd3", dora_wd=True, sd3_file_form="simpletuner")).config


def test_sd3_validation_loss_with_the_fused_network(tmp_path):
    """Held-out images get a flow-matching validation loss through the fused network; without validation_split none."""
    from sd_loha.train.loop import train

    result = train(base_config(tmp_path / "a", pretrained_model="tiny-sd3", validation_split=0.25,
                               validation_every_n_steps=1, max_train_steps=2, train_text_encoder=False),
                   progress=False)
    assert [step for step, _ in result.val_losses] == [1, 2]
    assert all(0 < loss < 10 for _, loss in result.val_losses)
    plain = train(base_config(tmp_path / "b", pretrained_model="tiny-sd3", max_train_steps=1,
                              train_text_encoder=False), progress=False)
    assert plain.val_losses == []


def test_module_dropout_drops_a_fused_qkv_as_one_module():
    """kohya drops a whole qkv module: q, k and v of one fused LoHA are adapted together or not at all."""
    from sd_loha.network import add_loha

    pipe = _sd3_pipe()
    net = add_loha(pipe, rank=2, text_encoder=False, module_dropout=0.5)
    _randomize(net)
    attn = pipe.transformer.transformer_blocks[0].attn
    attn.train()
    x = torch.randn(1, 3, attn.to_q.in_features)
    seen = set()
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(20):
            changed = tuple(not torch.equal(layer(x), layer.base(x)) for layer in (attn.to_q, attn.to_k, attn.to_v))
            seen.add(changed)
    assert seen == {(True, True, True), (False, False, False)}
