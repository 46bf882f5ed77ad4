"""The real base models' architectures: the diffusers config fields that shape their module trees.

Public facts from the models' config.json files (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0, openai/clip-vit-large-patch14),
the fields that differ from the classes' defaults. The key-name tests build these UNets on the meta device and
check every layer's kohya/LDM name; the benchmarks build them with random weights (bench/random_models.py).
Nothing here is loaded when a user trains or loads an adapter: real models bring their own configs.
"""

from __future__ import annotations

from typing import Any

SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
)
# SD 2.x: the SD 1 layout with linear projections, per-block head counts and OpenCLIP-H's 1024-wide context.
SD21_UNET: dict[str, Any] = dict(SD15_UNET, sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                                 use_linear_projection=True)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),  # diffusers' name for the head count
    cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 size/crop ids x 256 + CLIP-G's pooled 1280
)
UNETS: dict[str, dict[str, Any]] = {"sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET}

CLIP_L: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                              max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")  # SDXL text_encoder_2
SD_VAE: dict[str, Any] = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                              block_out_channels=(128, 256, 512, 512),
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_SCHEDULER: tuple[str, dict[str, Any]] = ("PNDMScheduler", dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1))
SDXL_SCHEDULER: tuple[str, dict[str, Any]] = ("EulerDiscreteScheduler", dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear"))
