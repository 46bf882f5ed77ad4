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
TINY_MODELS = ("tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-sd3", *TOY_MODELS)
TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"
#: the tiny SD3's T5 tokenizer (built by sd_loha/assets/make_t5_tokenizer.py)
T5_TOKENIZER_DIR = Path(__file__).parent / "assets" / "t5_tokenizer"
#: SD 3.x's variants as kohya sd-scripts names them (library/sd3_utils.py analyze_state_dict_state): its
#: ss_base_model_version, and the end of its modelspec architecture "stable-diffusion-3-<variant>"
SD3_VARIANTS: tuple[str, ...] = ("medium", "5-medium", "5-large")


class ModelLoadError(RuntimeError):
    """A base model could not be found or loaded; the message says what was tried and what to do."""


@dataclass(frozen=True)
class ModelFamily:
    """What an adapter file and a trainer need to know about a base model."""

    name: str  # "sd1" | "sd2" | "sdxl" | "sd3"
    prediction_type: str  # "epsilon" | "v_prediction" | "flow" (SD 3.x: rectified flow, the velocity noise - x0)
    variant: str = ""  # SD 3.x: one of SD3_VARIANTS

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"

    @property
    def is_sd3(self) -> bool:
        return self.name == "sd3"

    @property
    def ss_base_model_version(self) -> str:
        if self.name == "sd3":  # kohya writes the bare variant here (sd3_train_network.py: mmdit.model_type)
            return self.variant
        if self.name == "sdxl":
            return "sdxl_base_v1-0"
        if self.name == "sd2":
            return "sd_v2_v" if self.prediction_type == "v_prediction" else "sd_v2"
        return "sd_v1"

    @property
    def modelspec_architecture(self) -> str:
        if self.name == "sd3":
            return f"stable-diffusion-3-{self.variant}/lora"
        if self.name == "sdxl":
            return "stable-diffusion-xl-v1-base/lora"
        if self.name == "sd2":
            return "stable-diffusion-v2-768-v/lora" if self.prediction_type == "v_prediction" else "stable-diffusion-v2-512/lora"
        return "stable-diffusion-v1/lora"

    @property
    def label(self) -> str:
        names = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD 3.x"}
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


def sd3_variant(transformer_config: Any) -> str:
    """kohya's name of an SD 3.x transformer: SD3 Medium has no qk-norm, SD3.5 Medium has RMS qk-norm and dual
    attention (a second self-attention in its first blocks), SD3.5 Large qk-norm alone."""
    cfg = dict(transformer_config)
    if not cfg.get("qk_norm"):
        return "medium"
    return "5-medium" if cfg.get("dual_attention_layers") else "5-large"


def detect_family(pipe: Any) -> ModelFamily:
    """Family of a diffusers pipeline (anything with .unet and .scheduler, or SD 3.x's .transformer)."""
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
        if type(pipe.transformer).__name__ != "SD3Transformer2DModel":
            raise ModelLoadError(f"{type(pipe).__name__} with a {type(pipe.transformer).__name__}: sd-loha supports "
                                 "SD 1.x, SD 2.x, SDXL and SD 3.x (SD3Transformer2DModel) base models")
        return ModelFamily("sd3", "flow", sd3_variant(pipe.transformer.config))
    prediction = getattr(getattr(pipe, "scheduler", None), "config", {}).get("prediction_type", "epsilon")
    return ModelFamily(unet_family_name(pipe.unet.config), prediction)


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------

def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _tiny_text_encoder(tokenizer, *, with_projection: bool, hidden_act: str, hidden_size: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
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


def _tiny_vae(**sd3: Any):
    """``sd3``: SD 3.x's VAE settings (16 latent channels, no quant convs, its shift and scaling factors)."""
    from diffusers import AutoencoderKL

    # Four levels like the real VAE, so latents are 1/8 of the image as the bucketing assumes.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
        **{"latent_channels": 4, **sd3},
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


#: SD 3.x's VAE (stabilityai/stable-diffusion-3.5-medium vae/config.json): 16 channels, latents shifted then scaled
SD3_VAE: dict[str, Any] = dict(latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
                               use_post_quant_conv=False)


def _tiny_t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1's layout (gated-GELU feed-forward), as in SD3's T5-XXL
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def _tiny_sd3():
    """An SD3.5-Medium-style pipeline: dual attention in the first blocks, RMS qk-norm, the last block's context
    stream pre-only (diffusers builds it so), and SD3's width rule hidden = 64 x blocks (64-wide heads, one per
    block), which keeps ComfyUI's fixed qkv offsets valid. CLIP-L and CLIP-G differ in width (32, 48) so that
    their order in the joint context shows; T5 (96 wide) sets the joint width, as T5-XXL's 4096 does."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5TokenizerFast

    blocks, clip_l_width, clip_g_width, t5_width = 3, 32, 48, 96
    t5_tokenizer = T5TokenizerFast.from_pretrained(str(T5_TOKENIZER_DIR))
    clip_l = _tiny_text_encoder(_tiny_tokenizer(), with_projection=True, hidden_act="quick_gelu",
                                hidden_size=clip_l_width)
    clip_g = _tiny_text_encoder(_tiny_tokenizer(), with_projection=True, hidden_act="gelu", hidden_size=clip_g_width)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=blocks, attention_head_dim=64,
        num_attention_heads=blocks, joint_attention_dim=t5_width, caption_projection_dim=64 * blocks,
        pooled_projection_dim=clip_l.config.projection_dim + clip_g.config.projection_dim, pos_embed_max_size=64,
        dual_attention_layers=tuple(range(blocks - 1)), qk_norm="rms_norm",
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_tiny_vae(**SD3_VAE),
        text_encoder=clip_l, tokenizer=_tiny_tokenizer(),
        text_encoder_2=clip_g, tokenizer_2=_tiny_tokenizer(),
        text_encoder_3=_tiny_t5(t5_tokenizer, t5_width), tokenizer_3=t5_tokenizer,
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
        if name == "tiny-sd3":
            return _tiny_sd3()
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
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= 100_000_000:
            raise ModelLoadError(f"{path}: not a valid safetensors file (no header); point pretrained_model at a "
                                 "complete .safetensors checkpoint")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ModelLoadError(f"{path}: not a valid safetensors file (unreadable header)") from None
    return [k for k in header if k != "__metadata__"]


#: single-file checkpoints: the pipeline class of the first family whose marker begins one of the file's keys (SD 3.x:
#: diffusers' own marker, single_file_utils.CHECKPOINT_KEY_NAMES["sd3"], with or without the model prefix)
SINGLE_FILE_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("StableDiffusion3Pipeline", ("joint_blocks.0.context_block.", "model.diffusion_model.joint_blocks.0.context_block.")),
    ("StableDiffusionXLPipeline", ("conditioner.embedders.1",)),
)


def single_file_pipeline(path: Path) -> str:
    """The diffusers pipeline class that reads this single-file checkpoint (StableDiffusionPipeline unless its keys
    say SDXL or SD 3.x). A .ckpt is taken for SD 1.x/2.x: diffusers' loader tells those apart, and SDXL and SD 3.x
    checkpoints are essentially never shipped as .ckpt."""
    if path.suffix.lower() == ".safetensors":
        keys = _safetensors_keys(path)
        for cls, markers in SINGLE_FILE_MARKERS:
            if any(k.startswith(markers) for k in keys):
                return cls
    return "StableDiffusionPipeline"


def peek_is_sd3(model: str) -> bool | None:
    """Whether a base model is SD 3.x, where that shows without loading it: a built-in name, a local diffusers
    folder (its model_index.json's pipeline class), a single .safetensors file (its keys); None when it does not
    (a hub id, a .ckpt, an unreadable file: the loaded model is checked instead)."""
    if model in TINY_MODELS:
        return model == "tiny-sd3"
    path = Path(model).expanduser()
    try:
        if (path / "model_index.json").is_file():
            return json.loads((path / "model_index.json").read_text()).get("_class_name", "").startswith(
                "StableDiffusion3")
        if path.is_file() and path.suffix.lower() == ".safetensors":
            return single_file_pipeline(path) == "StableDiffusion3Pipeline"
    except (OSError, ValueError, ModelLoadError):
        return None
    return None


def _is_repo(model: str, path: Path) -> bool:
    """A diffusers folder, or a hub id (org/name) that is no local path."""
    return path.is_dir() or (model.count("/") == 1 and not model.startswith((".", "/", "~")) and not path.exists())


def _from_folder(model: str, path: Path, dtype: torch.dtype, vae_dtype: torch.dtype, vae_model: Any):
    from diffusers import AutoencoderKL, DiffusionPipeline

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
    # SD 1.x/2.x pipelines load without their safety checker; a local folder whose pipeline has none (SDXL, SD 3.x)
    # is not handed one to ignore with a warning
    if not path.is_dir() or "safety_checker" in json.loads((path / "model_index.json").read_text()):
        extra["safety_checker"] = None
    return DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, **extra)


#: the components an SD 3.x single file may hold besides the MMDiT: pipeline component -> (its key prefix in the
#: file, its class); SAI's files come with or without the text encoders (and T5), and diffusers loads a missing one
#: only when it is handed in
SD3_FILE_PARTS: dict[str, tuple[str, str]] = {
    "text_encoder": ("text_encoders.clip_l.", "transformers.CLIPTextModelWithProjection"),
    "text_encoder_2": ("text_encoders.clip_g.", "transformers.CLIPTextModelWithProjection"),
    "text_encoder_3": ("text_encoders.t5xxl.", "transformers.T5EncoderModel"),
    "vae": ("first_stage_model.", "diffusers.AutoencoderKL"),
}


def _sd3_parts(model: str, path: Path, config: str | None, dtype: torch.dtype, vae_dtype: torch.dtype) -> dict[str, Any]:
    """The SD3_FILE_PARTS the file lacks, read from the diffusers folder (or hub id) ``config``; without one, an
    error naming them (diffusers loads nothing a single SD 3.x file lacks by itself)."""
    import importlib

    keys = _safetensors_keys(path)
    missing = [name for name, (prefix, _) in SD3_FILE_PARTS.items() if not any(k.startswith(prefix) for k in keys)]
    if missing and not config:
        raise ModelLoadError(
            f"pretrained_model {model!r} is an SD 3.x file without {', '.join(missing)}: set base_config (the "
            "training option; --base-config for generate and merge; load_pipeline's config) to the model's diffusers "
            "folder or hub id, which completes the file, or load that folder instead")
    parts = {}
    for name, (_, cls_path) in SD3_FILE_PARTS.items():
        if name in missing:
            module, cls = cls_path.split(".")
            loader = getattr(importlib.import_module(module), cls)
            parts[name] = loader.from_pretrained(config, subfolder=name, torch_dtype=vae_dtype if name == "vae" else dtype)
    return parts


def _from_single_file(model: str, path: Path, dtype: torch.dtype, vae_dtype: torch.dtype, vae_model: Any,
                      config: str | None):
    import diffusers
    from diffusers import AutoencoderKL

    if path.suffix.lower() not in (".safetensors", ".ckpt"):
        raise ModelLoadError(f"pretrained_model {model!r}: single-file checkpoints must be .safetensors or .ckpt")
    cls = single_file_pipeline(path)
    # A config folder completes the file offline: its configs, and (SD 3.x) the components the file lacks
    local = {"config": config} if config else {}
    extra = {}
    if cls == "StableDiffusion3Pipeline":
        extra = _sd3_parts(model, path, config, dtype, vae_dtype)
    if vae_model is None and vae_dtype != dtype and "vae" not in extra:  # the file's own VAE, read in its dtype
        vae_model = AutoencoderKL.from_single_file(str(path), torch_dtype=vae_dtype,
                                                   **({**local, "subfolder": "vae"} if config else {}))
    if vae_model is not None:
        extra["vae"] = vae_model
    return getattr(diffusers, cls).from_single_file(str(path), torch_dtype=dtype, **local, **extra)


def load_pipeline(model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  vae: str | None = None, vae_dtype: torch.dtype | None = None, config: str | None = None):
    """Load a base pipeline from a built-in tiny name, a diffusers folder, a single file, or a hub id.

    `dtype` is the denoiser's and text encoders' dtype, `vae_dtype` the VAE's (default: `dtype`). Each component
    is read from the checkpoint in its own dtype, so a half-precision run with an fp32 VAE never holds the whole
    model in fp32 (SDXL: 14.6 GiB instead of 10.5 at its peak; bench/RESULTS.md, real-size smoke). `config`: for a
    single file, the diffusers folder (or hub id) whose configs and missing components complete it, as
    diffusers' ``from_single_file(config=...)`` takes it (a local folder works offline).
    """
    from diffusers import AutoencoderKL

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
            if _is_repo(model, path):
                pipe = _from_folder(model, path, dtype, vae_dtype, vae_model)
            elif path.is_file():
                pipe = _from_single_file(model, path, dtype, vae_dtype, vae_model, config)
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
    """The pipeline's text encoders by adapter part name: {"te": ...}, {"te1": ..., "te2": ...}, or SD 3.x's
    {"te1": CLIP-L, "te2": CLIP-G, "te3": T5} (kohya's lora_te1/2/3; T5 only while the pipeline has it)."""
    te1, te2, te3 = (getattr(pipe, f"text_encoder{s}", None) for s in ("", "_2", "_3"))
    if te2 is not None:
        return {k: v for k, v in (("te1", te1), ("te2", te2), ("te3", te3)) if v is not None}
    return {"te": te1} if te1 is not None else {}
