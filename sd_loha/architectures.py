"""The real base models' architectures: the diffusers config fields that shape their module trees.

Public facts from the models' config.json files (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0, openai/clip-vit-large-patch14,
stabilityai/stable-diffusion-3-medium-diffusers, stabilityai/stable-diffusion-3.5-medium and -large,
google/t5-v1_1-xxl), the fields that differ from the classes' defaults. The SD3 transformer sizes agree with
what diffusers' single-file loader reads off an original checkpoint (loaders/single_file_utils.py: pos_embed of
192² patches for SD3 Medium and 384² for SD3.5 Medium, a joint block 37 for SD3.5 Large) and with kohya
sd-scripts' ``sd3_utils.analyze_state_dict_state`` (width = 64 x depth, qk-norm on both SD3.5 models, attn2 only
on SD3.5 Medium). The one table of them (:data:`ARCHITECTURES`) and the one
builder of their module trees (:func:`build_model`; on the meta device: shapes only, no memory) serve naming a
file's layers without a model (convert, PEFT), block ids, the key-name tests and the benchmarks
(bench/random_models.py). Real models bring their own configs: nothing here shapes a user's pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

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

# SD3 / SD3.5 MMDiT (diffusers SD3Transformer2DModel). Width = 64 x depth (heads of 64), which ComfyUI's
# fused-qkv offsets (comfy/utils.py mmdit_to_diffusers: offset = depth * 64) rely on.
SD3_MEDIUM_TRANSFORMER: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
# SD3.5 Medium (MMDiT-X): a second x-stream self-attention (attn2) in blocks 0-12, RMS qk-norm, 384² positions.
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = dict(SD3_MEDIUM_TRANSFORMER, pos_embed_max_size=384,
                                               dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE_TRANSFORMER: dict[str, Any] = dict(SD3_MEDIUM_TRANSFORMER, num_layers=38, num_attention_heads=38,
                                              caption_projection_dim=2432, qk_norm="rms_norm")

CLIP_L: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                              max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")  # SDXL text_encoder_2
# SD 2.x's text encoder: OpenCLIP ViT-H/14's text tower in transformers' CLIP layout (stable-diffusion-2-1's
# text_encoder/config.json; the last of OpenCLIP's 24 layers is dropped, hence 23).
OPENCLIP_H: dict[str, Any] = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                  num_attention_heads=16, max_position_embeddings=77, projection_dim=512,
                                  hidden_act="gelu")
# SD3's third text encoder: T5 v1.1 XXL's encoder (text_encoder_3 of the SD3 pipelines).
T5_XXL: dict[str, Any] = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                              tie_word_embeddings=False)
SD_VAE: dict[str, Any] = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                              block_out_channels=(128, 256, 512, 512),
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_SCHEDULER: tuple[str, dict[str, Any]] = ("PNDMScheduler", dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1))
SDXL_SCHEDULER: tuple[str, dict[str, Any]] = ("EulerDiscreteScheduler", dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear"))


@dataclass(frozen=True)
class Architecture:
    """One released base-model architecture: how files and pipelines name it and its models' configs."""

    label: str  # what sd_loha.model_names.file_architecture answers and messages say: "SD 1.x", "SDXL", "SD3.5 Large"
    family: str  # ModelFamily.name: "sd1" | "sd2" | "sdxl" | "sd3"
    unet_kind: str | None  # its key in UNETS; None for an MMDiT model
    text_encoders: Mapping[str, tuple[str, dict[str, Any]]]  # pipeline attribute -> (transformers class, config)
    transformer: Mapping[str, Any] | None = None  # SD3Transformer2DModel config of an MMDiT model

    @property
    def unet(self) -> dict[str, Any]:
        if self.unet_kind is None:
            raise ValueError(f"{self.label} has no UNet (its denoiser is an MMDiT transformer)")
        return UNETS[self.unet_kind]

    @property
    def denoiser(self) -> tuple[str, str, Mapping[str, Any]]:
        """(pipeline attribute, diffusers class, config) of the denoising model."""
        if self.transformer is not None:
            return "transformer", "SD3Transformer2DModel", self.transformer
        return "unet", "UNet2DConditionModel", self.unet


_SD3_TEXT_ENCODERS = {"text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
                      "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
                      "text_encoder_3": ("T5EncoderModel", T5_XXL)}
ARCHITECTURES: dict[str, Architecture] = {a.label: a for a in (
    Architecture("SD 1.x", "sd1", "sd15", {"text_encoder": ("CLIPTextModel", CLIP_L)}),
    Architecture("SD 2.x", "sd2", "sd21", {"text_encoder": ("CLIPTextModel", OPENCLIP_H)}),
    Architecture("SDXL", "sdxl", "sdxl", {"text_encoder": ("CLIPTextModel", CLIP_L),
                                          "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G)}),
    Architecture("SD3 Medium", "sd3", None, _SD3_TEXT_ENCODERS, SD3_MEDIUM_TRANSFORMER),
    Architecture("SD3.5 Medium", "sd3", None, _SD3_TEXT_ENCODERS, SD35_MEDIUM_TRANSFORMER),
    Architecture("SD3.5 Large", "sd3", None, _SD3_TEXT_ENCODERS, SD35_LARGE_TRANSFORMER),
)}
# The UNet architectures (SD 1.x, SD 2.x, SDXL): what UNet-only code (block weights, LDM names) iterates.
UNET_ARCHITECTURES: dict[str, Architecture] = {k: a for k, a in ARCHITECTURES.items() if a.unet_kind is not None}
# The MMDiT architectures, smallest first.
SD3_ARCHITECTURES: dict[str, Architecture] = {k: a for k, a in ARCHITECTURES.items() if a.transformer is not None}
# family -> its architecture, for the families with one (sd3 has three sizes: SD3_ARCHITECTURES).
ARCHITECTURE_OF_FAMILY: dict[str, Architecture] = {a.family: a for a in UNET_ARCHITECTURES.values()}


def build_model(cls_name: str, config: Mapping[str, Any], *, meta: bool = False) -> nn.Module:
    """A diffusers (UNet2DConditionModel, SD3Transformer2DModel, AutoencoderKL, ...) or transformers (CLIP text,
    T5 encoder) model of class `cls_name` from its config fields, with random weights; `meta=True` builds it on
    the meta device: the module tree and every weight's shape, no memory and no time, which is all naming and
    shape checks need."""
    import diffusers
    import transformers

    with torch.device("meta") if meta else nullcontext():
        if cls_name.startswith("CLIP"):
            return getattr(transformers, cls_name)(transformers.CLIPTextConfig(**config))
        if cls_name.startswith("T5"):
            return getattr(transformers, cls_name)(transformers.T5Config(**config))
        return getattr(diffusers, cls_name)(**config)


def meta_unet(config: Mapping[str, Any]) -> nn.Module:
    """A diffusers UNet2DConditionModel of `config` on the meta device."""
    return build_model("UNet2DConditionModel", config, meta=True)


def meta_pipeline(label: str) -> SimpleNamespace:
    """The denoiser and text encoders of a real architecture (an :data:`ARCHITECTURES` label) on the meta device,
    as pipeline attributes (``.unet`` or ``.transformer``, ``.text_encoder``[, ``_2``, ``_3``]): for naming a
    file's layers and reading their shapes without a model."""
    arch = ARCHITECTURES[label]
    attr, cls, config = arch.denoiser
    models = {attr: build_model(cls, config, meta=True)}
    models.update({attr: build_model(cls, cfg, meta=True) for attr, (cls, cfg) in arch.text_encoders.items()})
    return SimpleNamespace(**models)
