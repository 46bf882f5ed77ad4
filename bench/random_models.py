"""Full-size Stable Diffusion pipelines with random weights, built from the real configs (no download).

The real-size smoke (bench/smoke_real_size.py) and the GPU script (bench/gpu_configs.py) train on these, so
size-dependent failures (attention shapes, memory) show without a checkpoint. Each pipeline is a diffusers
folder written once into a cache and reused while its configs are unchanged:

    python bench/random_models.py sd15 sdxl            # prints the folders (builds what is missing)
    python bench/random_models.py sd15 --size small    # same layout, tiny widths: for dry runs

The configs are diffusers' own for runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0
(the fields that differ from the classes' defaults). Text encoders get the vocabulary of the tokenizer kept in
sd_loha/assets (984 tokens, not CLIP's 49408): the embedding table is the only part smaller than the real one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sd_loha.architectures import (
    CLIP_G,
    CLIP_L,
    SD15_SCHEDULER,
    SD15_UNET,
    SD_VAE,
    SD35_MEDIUM_TRANSFORMER,
    SDXL_SCHEDULER,
    SDXL_UNET,
    T5_XXL,
    build_model,
)
from sd_loha.models import (
    SD3_VAE,
    T5_TOKENIZER_DIR,
    _tiny_tokenizer,  # the repo's tokenizer, as the tiny models use it
)

DEFAULT_CACHE = Path(os.environ.get("SD_LOHA_BENCH_CACHE", Path.home() / ".cache" / "sd-loha" / "random-models"))

VAE = SD_VAE

# One table: model -> component -> (class, config). The "small" size overrides widths and depths only.
MODELS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "sd15": {
        "unet": ("UNet2DConditionModel", SD15_UNET),
        "text_encoder": ("CLIPTextModel", CLIP_L),
        "vae": ("AutoencoderKL", dict(VAE, sample_size=512, scaling_factor=0.18215)),
    },
    "sdxl": {
        "unet": ("UNet2DConditionModel", SDXL_UNET),
        "text_encoder": ("CLIPTextModel", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
        "vae": ("AutoencoderKL", dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)),
    },
    # SD3.5 Medium: MMDiT-X (2.5 B), CLIP-L and CLIP-G with projections, T5-XXL's encoder (4.8 B), the 16-channel VAE
    "sd35m": {
        "transformer": ("SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER),
        "text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
        "text_encoder_3": ("T5EncoderModel", T5_XXL),
        "vae": ("AutoencoderKL", dict(VAE, sample_size=1024, **SD3_VAE)),
    },
}
SCHEDULERS = {"sd15": SD15_SCHEDULER, "sdxl": SDXL_SCHEDULER,
              "sd35m": ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0))}
SMALL = {
    "sd15": {"unet": dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=32, norm_num_groups=8),
             "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  projection_dim=32)},
    "sdxl": {"unet": dict(block_out_channels=(32, 64, 128), transformer_layers_per_block=(1, 2, 2),
                          attention_head_dim=(2, 4, 8), cross_attention_dim=96, norm_num_groups=8,
                          addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 64),
             "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  projection_dim=32),
             "text_encoder_2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    projection_dim=64)},
    "sd35m": {"transformer": dict(num_layers=2, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128,
                                  pooled_projection_dim=64, pos_embed_max_size=64, dual_attention_layers=(0,)),
              "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   projection_dim=32),
              "text_encoder_2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     projection_dim=32),
              "text_encoder_3": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)},
}
SMALL_VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd35m": "StableDiffusion3Pipeline"}


def component_configs(model: str, size: str = "full") -> dict[str, tuple[str, dict[str, Any]]]:
    """The (class name, config) of each weighted component of `model` at `size` ("full" or "small")."""
    if model not in MODELS:
        raise SystemExit(f"unknown model {model!r}: choose from {', '.join(MODELS)}")
    parts = {name: (cls, dict(cfg)) for name, (cls, cfg) in MODELS[model].items()}
    if size == "small":
        for name, extra in SMALL[model].items():
            parts[name][1].update(extra)
        parts["vae"][1].update(SMALL_VAE)
    elif size != "full":
        raise SystemExit(f"unknown size {size!r}: full or small")
    return parts


def _build(cls_name: str, config: dict[str, Any], tokenizer, *, meta: bool = False) -> torch.nn.Module:
    if cls_name.startswith("CLIP"):
        config = dict(config, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return build_model(cls_name, config, meta=meta)


def folder_for(model: str, size: str, cache: Path = DEFAULT_CACHE) -> Path:
    """The cache folder of `model` at `size`; its name changes whenever the configs do."""
    spec = json.dumps([component_configs(model, size), SCHEDULERS[model]], sort_keys=True, default=list)
    return cache / f"{model}-{size}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


def ensure_pipeline(model: str, size: str = "full", cache: Path = DEFAULT_CACHE, dtype: torch.dtype = torch.float16,
                    seed: int = 0) -> Path:
    """A diffusers folder of `model` with random weights (built once; later calls return the cached one)."""
    folder = folder_for(model, size, cache)
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers

    tokenizer = _tiny_tokenizer()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(seed)
    if model == "sd35m":
        _save_by_component(model, size, tmp, tokenizer)
        tmp.rename(folder)
        return folder
    components: dict[str, Any] = {}
    for name, (cls_name, config) in component_configs(model, size).items():
        t0 = time.perf_counter()
        module = _build(cls_name, config, tokenizer).to(dtype).eval()
        n = sum(p.numel() for p in module.parameters())
        print(f"  {model} {name}: {cls_name}, {n / 1e6:.0f}M parameters, built in {time.perf_counter() - t0:.0f} s",
              flush=True)
        components[name] = module
    sched_cls, sched_cfg = SCHEDULERS[model]
    components["scheduler"] = getattr(diffusers, sched_cls)(**sched_cfg)
    components["tokenizer"] = tokenizer
    if model == "sdxl":
        components["tokenizer_2"] = _tiny_tokenizer()
    else:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, PIPELINES[model])(**components)
    pipe.save_pretrained(tmp, safe_serialization=True)
    del pipe, components
    tmp.rename(folder)  # complete folders only: an interrupted build leaves a .tmp that the next one replaces
    return folder


def _save_by_component(model: str, size: str, tmp: Path, tokenizer) -> None:
    """Write an SD 3.x pipeline folder one component at a time, each built straight in bf16 (T5-XXL alone is 19 GB in
    fp32, 9.5 GB in bf16): never more than one model in memory, as a 24 GB machine needs."""
    import diffusers
    from transformers import T5TokenizerFast

    index: dict[str, Any] = {"_class_name": PIPELINES[model], "_diffusers_version": diffusers.__version__,
                             "image_encoder": [None, None], "feature_extractor": [None, None]}
    for name, (cls_name, config) in component_configs(model, size).items():
        t0 = time.perf_counter()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32 if name == "vae" else torch.bfloat16)  # the VAE trains in fp32
        try:
            module = _build(cls_name, config, tokenizer).eval()
        finally:
            torch.set_default_dtype(previous)
        n = sum(p.numel() for p in module.parameters())
        module.save_pretrained(tmp / name, safe_serialization=True)
        index[name] = ["transformers" if cls_name.startswith(("CLIP", "T5")) else "diffusers", cls_name]
        print(f"  {model} {name}: {cls_name}, {n / 1e6:.0f}M parameters, built and saved in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        del module
    sched_cls, sched_cfg = SCHEDULERS[model]
    getattr(diffusers, sched_cls)(**sched_cfg).save_pretrained(tmp / "scheduler")
    index["scheduler"] = ["diffusers", sched_cls]
    for name in ("tokenizer", "tokenizer_2"):
        _tiny_tokenizer().save_pretrained(tmp / name)
        index[name] = ["transformers", "CLIPTokenizer"]
    T5TokenizerFast.from_pretrained(str(T5_TOKENIZER_DIR)).save_pretrained(tmp / "tokenizer_3")
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))


def prepare(model: str, size: str = "full", cache: Path = DEFAULT_CACHE) -> Path:
    """ensure_pipeline in a child process: the 10 GB a full SDXL build touches stay out of the caller (the heap
    keeps freed memory), whose peak memory is what the benchmarks measure."""
    folder = folder_for(model, size, cache)
    if not (folder / "model_index.json").is_file():
        subprocess.run([sys.executable, __file__, model, "--size", size, "--cache", str(cache)], check=True)
    return folder


def parameter_counts(model: str, size: str = "full") -> dict[str, int]:
    """Parameters per component (built on the meta device: no memory, no time)."""
    tokenizer = _tiny_tokenizer()
    return {name: sum(p.numel() for p in _build(cls_name, config, tokenizer, meta=True).parameters())
            for name, (cls_name, config) in component_configs(model, size).items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", choices=sorted(MODELS))
    ap.add_argument("--size", default="full", choices=("full", "small"))
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args(argv)
    for model in args.models:
        print(ensure_pipeline(model, args.size, args.cache), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
