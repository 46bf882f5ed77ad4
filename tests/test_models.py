"""Loading base pipelines: each component in its own dtype."""

from __future__ import annotations

import torch

from sd_loha.models import build_tiny_pipeline, load_pipeline


def test_folder_loads_unet_and_text_encoder_in_half_and_the_vae_in_fp32_unrounded(tmp_path):
    """A bf16 run reads the VAE from the checkpoint in fp32 (its weights exact, never rounded through bf16)."""
    saved = build_tiny_pipeline("tiny-sd1")
    with torch.no_grad():
        for p in saved.vae.parameters():  # values bf16 cannot hold
            p.add_(torch.randn_like(p) * 1e-3)
    saved.save_pretrained(tmp_path / "pipe", safe_serialization=True)

    pipe = load_pipeline(str(tmp_path / "pipe"), dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    for (name, a), b in zip(saved.vae.state_dict().items(), pipe.vae.state_dict().values()):
        assert torch.equal(a, b), name
    rounded = load_pipeline(str(tmp_path / "pipe"), dtype=torch.bfloat16)  # no vae_dtype: the VAE in bf16 too
    assert rounded.vae.dtype == torch.bfloat16


def test_tiny_models_take_the_dtypes_too():
    pipe = load_pipeline("tiny-sdxl", dtype=torch.float16, vae_dtype=torch.float32)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.float16
    assert pipe.vae.dtype == torch.float32
