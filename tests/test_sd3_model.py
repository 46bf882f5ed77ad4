"""The tiny SD 3.x pipeline and the SD 3.x family: built offline from the repo's tokenizers, it is the model its
description says, diffusers' StableDiffusion3Pipeline generates with it (with and without T5), and the family,
its kohya metadata ids and the file-form detection come out right."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from sd_loha.assets import make_t5_tokenizer
from sd_loha.models import (T5_TOKENIZER_DIR, ModelFamily, ModelLoadError, build_tiny_pipeline, detect_family,
                            load_pipeline, peek_is_sd3, sd3_variant, single_file_pipeline, text_encoders)


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_pipeline("tiny-sd3")


def test_tiny_sd3_is_an_sd35_medium_style_mmdit(sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    assert isinstance(sd3, StableDiffusion3Pipeline)
    cfg = sd3.transformer.config
    blocks = cfg.num_layers
    # the width rule hidden = 64 x blocks with 64-wide heads, one per block
    assert cfg.attention_head_dim == 64 and cfg.num_attention_heads == blocks
    assert sd3.transformer.transformer_blocks[0].attn.to_q.out_features == 64 * blocks
    assert cfg.qk_norm == "rms_norm" and tuple(cfg.dual_attention_layers) == tuple(range(blocks - 1))
    assert sd3.transformer.transformer_blocks[0].attn2 is not None
    assert sd3.transformer.transformer_blocks[-1].context_pre_only  # diffusers' last block
    assert getattr(sd3.transformer.transformer_blocks[-1].attn, "to_add_out", None) is None
    assert isinstance(sd3.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(sd3.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(sd3.text_encoder_3, T5EncoderModel)
    assert cfg.joint_attention_dim == sd3.text_encoder_3.config.d_model
    assert cfg.pooled_projection_dim == sd3.text_encoder.config.projection_dim + sd3.text_encoder_2.config.projection_dim
    vae = sd3.vae.config
    assert (vae.latent_channels, vae.shift_factor, vae.scaling_factor) == (16, 0.0609, 1.5305)
    assert isinstance(sd3.scheduler, FlowMatchEulerDiscreteScheduler) and sd3.scheduler.config.shift == 3.0


def test_tiny_sd3_is_seeded(sd3):
    again, other = build_tiny_pipeline("tiny-sd3"), build_tiny_pipeline("tiny-sd3", seed=1)
    w = sd3.transformer.transformer_blocks[0].attn.to_q.weight
    assert torch.equal(w, again.transformer.transformer_blocks[0].attn.to_q.weight)
    assert not torch.equal(w, other.transformer.transformer_blocks[0].attn.to_q.weight)


def test_t5_tokenizer_is_rebuilt_identically_and_reads_as_t5(tmp_path):
    from transformers import T5TokenizerFast

    make_t5_tokenizer.build(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (T5_TOKENIZER_DIR / name).read_bytes(), name
    tok = T5TokenizerFast.from_pretrained(str(T5_TOKENIZER_DIR))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)  # T5's ids
    ids = tok("a photo of a red dog").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁a", "▁red", "▁dog", "</s>"]
    # an unknown word falls back to characters; a character outside the vocabulary is <unk>
    assert tok.convert_ids_to_tokens(tok("zq").input_ids) == ["▁", "z", "q", "</s>"]
    assert tok.unk_token_id in tok("é").input_ids
    padded = tok(["a dog"], padding="max_length", max_length=8, truncation=True).input_ids[0]
    assert len(padded) == 8 and padded[-1] == tok.pad_token_id


def _generate(pipe, prompt: str = "a photo of a red dog") -> np.ndarray:
    out = pipe(prompt, num_inference_steps=3, height=64, width=64, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return out.images[0]


def test_tiny_sd3_generates_with_and_without_t5(sd3):
    from diffusers import StableDiffusion3Pipeline

    with_t5 = _generate(sd3)
    assert with_t5.shape == (64, 64, 3) and np.isfinite(with_t5).all()
    assert not np.array_equal(with_t5, _generate(sd3, "sdlohastyle, a blue cat"))  # the prompt conditions it
    no_t5 = StableDiffusion3Pipeline(**{**sd3.components, "text_encoder_3": None, "tokenizer_3": None})
    without = _generate(no_t5)
    assert without.shape == (64, 64, 3) and np.isfinite(without).all()
    assert not np.array_equal(with_t5, without)  # T5's part of the context is zeros now


def test_sd3_family_and_kohya_ids(sd3):
    fam = detect_family(sd3)
    assert fam == ModelFamily("sd3", "flow", "5-medium") and fam.is_sd3 and not fam.is_sdxl
    # kohya sd-scripts: ss_base_model_version = the MMDiT's model_type, modelspec "stable-diffusion-3-<type>/lora"
    assert fam.ss_base_model_version == "5-medium"
    assert fam.modelspec_architecture == "stable-diffusion-3-5-medium/lora"
    assert fam.label == "SD 3.x"
    assert sd3_variant({"qk_norm": None, "dual_attention_layers": ()}) == "medium"
    assert sd3_variant({"qk_norm": "rms_norm", "dual_attention_layers": ()}) == "5-large"
    assert ModelFamily("sd3", "flow", "5-large").modelspec_architecture == "stable-diffusion-3-5-large/lora"
    assert list(text_encoders(sd3)) == ["te1", "te2", "te3"]
    assert text_encoders(sd3)["te3"] is sd3.text_encoder_3
    from diffusers import StableDiffusion3Pipeline
    no_t5 = StableDiffusion3Pipeline(**{**sd3.components, "text_encoder_3": None, "tokenizer_3": None})
    assert list(text_encoders(no_t5)) == ["te1", "te2"]


def _header_only_safetensors(path, keys):
    header = {k: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, k in enumerate(keys)}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * len(keys)))
    return path


def test_single_file_and_folder_family_without_loading(tmp_path, sd3):
    sd3_file = _header_only_safetensors(tmp_path / "sd35m.safetensors", [
        "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias", "first_stage_model.x"])
    bare = _header_only_safetensors(tmp_path / "mmdit.safetensors", ["joint_blocks.0.context_block.attn.qkv.weight"])
    xl = _header_only_safetensors(tmp_path / "xl.safetensors", ["conditioner.embedders.1.model.x"])
    sd1 = _header_only_safetensors(tmp_path / "sd1.safetensors", ["model.diffusion_model.input_blocks.0.0.weight"])
    assert [single_file_pipeline(p) for p in (sd3_file, bare, xl, sd1)] == [
        "StableDiffusion3Pipeline", "StableDiffusion3Pipeline", "StableDiffusionXLPipeline", "StableDiffusionPipeline"]
    assert [peek_is_sd3(str(p)) for p in (sd3_file, xl, sd1)] == [True, False, False]
    assert peek_is_sd3("tiny-sd3") is True and peek_is_sd3("tiny-sdxl") is False
    assert peek_is_sd3("stabilityai/stable-diffusion-3.5-medium") is None  # a hub id shows nothing before loading
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(b"\x01\x02")
    assert peek_is_sd3(str(truncated)) is None  # unreadable: left to the loader, which names the file
    with pytest.raises(ModelLoadError, match="cut.safetensors: not a valid safetensors file"):
        load_pipeline(str(truncated))
    folder = tmp_path / "folder"
    sd3.save_pretrained(folder)
    assert peek_is_sd3(str(folder)) is True


def test_load_pipeline_reads_an_sd3_folder(tmp_path, sd3):
    folder = tmp_path / "sd3"
    sd3.save_pretrained(folder)
    pipe = load_pipeline(str(folder), dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert detect_family(pipe) == detect_family(sd3)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder_3.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    ref = sd3.transformer.transformer_blocks[1].ff.net[0].proj.weight
    torch.testing.assert_close(pipe.transformer.transformer_blocks[1].ff.net[0].proj.weight.float(),
                               ref.to(torch.bfloat16).float(), rtol=0, atol=0)


def _original_layout(transformer) -> dict:
    """The transformer's weights in SD3's original (MMDiT) layout, as SAI's single files hold them: diffusers'
    convert_sd3_transformer_checkpoint_to_diffusers run backwards (q|k|v fused, the last context block's and the
    final layer's adaLN halves swapped); diffusers' own loader reading it back to every tensor checks it."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    out = {}
    def swap(t):
        a, b = t.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)
    n = transformer.config.num_layers
    out["pos_embed"] = sd["pos_embed.pos_embed"]
    for o, d in (("x_embedder.proj", "pos_embed.proj"), ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                 ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"), ("context_embedder", "context_embedder"),
                 ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                 ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"), ("final_layer.linear", "proj_out")):
        for p in ("weight", "bias"):
            out[f"{o}.{p}"] = sd[f"{d}.{p}"]
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap(sd[f"norm_out.linear.{p}"])
    for i in range(n):
        b, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == n - 1
        for p in ("weight", "bias"):
            out[f"{j}.x_block.attn.qkv.{p}"] = torch.cat([sd[f"{b}.attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{j}.context_block.attn.qkv.{p}"] = torch.cat([sd[f"{b}.attn.add_{x}_proj.{p}"] for x in "qkv"])
            out[f"{j}.x_block.attn.proj.{p}"] = sd[f"{b}.attn.to_out.0.{p}"]
            out[f"{j}.x_block.adaLN_modulation.1.{p}"] = sd[f"{b}.norm1.linear.{p}"]
            ctx = sd[f"{b}.norm1_context.linear.{p}"]
            out[f"{j}.context_block.adaLN_modulation.1.{p}"] = swap(ctx) if last else ctx
            out[f"{j}.x_block.mlp.fc1.{p}"] = sd[f"{b}.ff.net.0.proj.{p}"]
            out[f"{j}.x_block.mlp.fc2.{p}"] = sd[f"{b}.ff.net.2.{p}"]
            if not last:
                out[f"{j}.context_block.attn.proj.{p}"] = sd[f"{b}.attn.to_add_out.{p}"]
                out[f"{j}.context_block.mlp.fc1.{p}"] = sd[f"{b}.ff_context.net.0.proj.{p}"]
                out[f"{j}.context_block.mlp.fc2.{p}"] = sd[f"{b}.ff_context.net.2.{p}"]
            if f"{b}.attn2.to_q.{p}" in sd:
                out[f"{j}.x_block.attn2.qkv.{p}"] = torch.cat([sd[f"{b}.attn2.to_{x}.{p}"] for x in "qkv"])
                out[f"{j}.x_block.attn2.proj.{p}"] = sd[f"{b}.attn2.to_out.0.{p}"]
        for o, d in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                     ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
                     ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")):
            if f"{b}.{d}.weight" in sd:
                out[f"{j}.{o}.weight"] = sd[f"{b}.{d}.weight"]
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}


def test_load_pipeline_reads_an_sd3_single_file_offline_with_a_config_folder(tmp_path, sd3):
    from safetensors.torch import save_file

    folder = tmp_path / "sd3"
    sd3.save_pretrained(folder)
    single = tmp_path / "sd35m.safetensors"  # the MMDiT alone, as SAI ships files without text encoders
    save_file(_original_layout(sd3.transformer), str(single))
    with pytest.raises(ModelLoadError, match="SD 3.x file without text_encoder, text_encoder_2, text_encoder_3, vae"):
        load_pipeline(str(single))
    pipe = load_pipeline(str(single), config=str(folder), dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert detect_family(pipe) == detect_family(sd3)
    ours, theirs = pipe.transformer.state_dict(), sd3.transformer.state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k].float(), theirs[k].to(torch.bfloat16).float(), rtol=0, atol=0, msg=k)
    assert pipe.vae.dtype == torch.float32 and pipe.text_encoder_3.dtype == torch.bfloat16
    torch.testing.assert_close(pipe.vae.decoder.conv_out.weight, sd3.vae.decoder.conv_out.weight, rtol=0, atol=0)
    torch.testing.assert_close(pipe.text_encoder_2.text_projection.weight.float(),
                               sd3.text_encoder_2.text_projection.weight.to(torch.bfloat16).float(), rtol=0, atol=0)
