"""Base models: the built-in tiny pipelines, loading real checkpoints, and family detection.

Real checkpoints are whatever users bring (a diffusers folder, a single .safetensors/.ckpt file, a hub
id); we load them through diffusers' own loaders. The tiny pipelines are real diffusers pipelines with
random weights from a fixed seed and the tokenizer kept in sd_loha/assets, so tests, the demo and CI
never need a download.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Built-in models, loaded offline: the random tiny ones (fast tests) and `toy-sd1`, pretrained on a procedural world
# and shipped in sd_loha/assets (docs/toy-model.md). The tiny-sd1 default stays first.
TOY_MODELS: dict[str, Path] = {"toy-sd1": Path(__file__).parent / "assets" / "toy-sd1"}
TINY_MODELS = ("tiny-sd1", "tiny-sd2", "tiny-sdxl", *TOY_MODELS)
TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"


class ModelLoadError(RuntimeError):
    """A base model could not be found or loaded; the message says what was tried and what to do."""


@dataclass(frozen=True)
class ModelFamily:
    """What an adapter file and a trainer need to know about a base model."""

    name: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"

    @property
    def ss_base_model_version(self) -> str:
        if self.name == "sdxl":
            return "sdxl_base_v1-0"
        if self.name == "sd2":
            return "sd_v2_v" if self.prediction_type == "v_prediction" else "sd_v2"
        return "sd_v1"

    @property
    def modelspec_architecture(self) -> str:
        if self.name == "sdxl":
            return "stable-diffusion-xl-v1-base/lora"
        if self.name == "sd2":
            return "stable-diffusion-v2-768-v/lora" if self.prediction_type == "v_prediction" else "stable-diffusion-v2-512/lora"
        return "stable-diffusion-v1/lora"

    @property
    def label(self) -> str:
        names = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
        suffix = " (v-prediction)" if self.prediction_type == "v_prediction" else ""
        return names[self.name] + suffix


def unet_family_name(unet_config: Any) -> str:
    """SDXL has the text_time additional embedding; SD2 swapped the conv proj_in/out for linear ones."""
    cfg = dict(unet_config)
    if cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    if cfg.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def detect_family(pipe: Any) -> ModelFamily:
    """Family of a diffusers pipeline (or anything with .unet and .scheduler)."""
    prediction = getattr(getattr(pipe, "scheduler", None), "config", {}).get("prediction_type", "epsilon")
    return ModelFamily(unet_family_name(pipe.unet.config), prediction)


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------

def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _tiny_text_encoder(tokenizer, *, with_projection: bool, hidden_act: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _tiny_vae():
    from diffusers import AutoencoderKL

    # Four levels like the real VAE, so latents are 1/8 of the image as the bucketing assumes.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
    ).eval()


def _tiny_scheduler(prediction_type: str):
    from diffusers import EulerDiscreteScheduler

    # The Stable Diffusion noise schedule, so training code paths see realistic timesteps and SNRs.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )


def load_toy_pipeline(name: str = "toy-sd1"):
    """The pretrained toy pipeline shipped in the package (fp16 safetensors, read as fp32; offline)."""
    from diffusers import StableDiffusionPipeline

    folder = TOY_MODELS[name]
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"built-in model {name!r}: its weights are missing from {folder}; reinstall sd-loha "
                             f"or rebuild them with `python -m sd_loha.toy.pretrain --out {folder}`")
    return StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)


def build_tiny_pipeline(name: str = "tiny-sd1", seed: int = 0):
    """A real diffusers pipeline of the given family with random weights from `seed` (offline); for a toy
    name, the pretrained toy pipeline (`seed` does not apply)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    if name not in TINY_MODELS:
        raise ModelLoadError(f"unknown built-in model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    if name in TOY_MODELS:
        return load_toy_pipeline(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _tiny_tokenizer()
        common = dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            norm_num_groups=8,
        )
        if name == "tiny-sdxl":
            text_encoder = _tiny_text_encoder(tokenizer, with_projection=False, hidden_act="quick_gelu")
            text_encoder_2 = _tiny_text_encoder(tokenizer, with_projection=True, hidden_act="gelu")
            unet = UNet2DConditionModel(
                **common,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2),
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                cross_attention_dim=64,  # CLIP-L hidden (32) + CLIP-G hidden (32), as in SDXL
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32,
            ).eval()
            return StableDiffusionXLPipeline(
                vae=_tiny_vae(),
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizer,
                tokenizer_2=_tiny_tokenizer(),
                unet=unet,
                scheduler=_tiny_scheduler("epsilon"),
            )
        sd2 = name == "tiny-sd2"
        unet = UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4) if sd2 else 8,
            use_linear_projection=sd2,
            cross_attention_dim=32,
        ).eval()
        return StableDiffusionPipeline(
            vae=_tiny_vae(),
            text_encoder=_tiny_text_encoder(tokenizer, with_projection=False, hidden_act="gelu" if sd2 else "quick_gelu"),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_tiny_scheduler("v_prediction" if sd2 else "epsilon"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


# ---------------------------------------------------------------------------------------------
# Real checkpoints
# ---------------------------------------------------------------------------------------------

def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names from a safetensors header, without reading tensors (checkpoints are GBs)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise ModelLoadError(f"{path}: not a valid safetensors file (header size {n})")
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


def single_file_is_sdxl(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        return any(k.startswith("conditioner.embedders.1") for k in _safetensors_keys(path))
    # .ckpt: diffusers' loader can tell; SDXL checkpoints are essentially never shipped as .ckpt.
    return False


def load_pipeline(model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  vae: str | None = None, vae_dtype: torch.dtype | None = None):
    """Load a base pipeline from a built-in tiny name, a diffusers folder, a single file, or a hub id.

    `dtype` is the UNet's and text encoders' dtype, `vae_dtype` the VAE's (default: `dtype`). Each component is
    read from the checkpoint in its own dtype, so a half-precision run with an fp32 VAE never holds the whole
    model in fp32 (SDXL: 14.6 GiB instead of 10.5 at its peak; bench/RESULTS.md, real-size smoke).
    """
    from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    vae_dtype = vae_dtype or dtype
    vae_model = None
    if vae:
        vae_model = (AutoencoderKL.from_single_file(vae, torch_dtype=vae_dtype) if Path(vae).is_file()
                     else AutoencoderKL.from_pretrained(vae, torch_dtype=vae_dtype))
    if model in TINY_MODELS:
        pipe = build_tiny_pipeline(model)
    else:
        path = Path(model).expanduser()
        try:
            if path.is_dir() or (model.count("/") == 1 and not model.startswith((".", "/", "~")) and not path.exists()):
                if path.is_dir() and not (path / "model_index.json").is_file():
                    raise ModelLoadError(
                        f"pretrained_model {model!r} is a folder without model_index.json: point it at a diffusers "
                        "pipeline folder, a single .safetensors/.ckpt checkpoint, a hub id, or a built-in tiny model "
                        f"({', '.join(TINY_MODELS)})"
                    )
                source = str(path) if path.is_dir() else model
                if vae_model is None and vae_dtype != dtype:
                    vae_model = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype)
                extra = {"vae": vae_model} if vae_model is not None else {}
                pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, safety_checker=None, **extra)
            elif path.is_file():
                if path.suffix.lower() not in (".safetensors", ".ckpt"):
                    raise ModelLoadError(f"pretrained_model {model!r}: single-file checkpoints must be .safetensors or .ckpt")
                if vae_model is None and vae_dtype != dtype:  # the checkpoint's own VAE, read in its dtype
                    vae_model = AutoencoderKL.from_single_file(str(path), torch_dtype=vae_dtype)
                cls = StableDiffusionXLPipeline if single_file_is_sdxl(path) else StableDiffusionPipeline
                extra = {"vae": vae_model} if vae_model is not None else {}
                pipe = cls.from_single_file(str(path), torch_dtype=dtype, **extra)
            else:
                raise ModelLoadError(
                    f"pretrained_model {model!r} not found: give a diffusers folder, a .safetensors/.ckpt file, "
                    f"a hub id (org/name), or a built-in tiny model ({', '.join(TINY_MODELS)})"
                )
        except ModelLoadError:
            raise
        except Exception as e:  # diffusers raises many kinds; keep its message, add what we tried
            raise ModelLoadError(f"could not load pretrained_model {model!r}: {e}") from e
    if vae_model is not None:
        pipe.vae = vae_model
    pipe.to(device=device)
    for name, component in pipe.components.items():
        target = vae_dtype if name == "vae" else dtype
        if isinstance(component, torch.nn.Module) and getattr(component, "dtype", None) != target:
            component.to(dtype=target)
    return pipe


def text_encoders(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by adapter part name: {"te": ...} or {"te1": ..., "te2": ...}."""
    te2 = getattr(pipe, "text_encoder_2", None)
    te1 = getattr(pipe, "text_encoder", None)
    if te2 is not None:
        return {k: v for k, v in (("te1", te1), ("te2", te2)) if v is not None}
    return {"te": te1} if te1 is not None else {}
