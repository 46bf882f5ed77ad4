"""SD 3.x adapter files for the tool tests, made with the names layer (sd_loha.sd3_names) on tiny-sd3's own
layers: a kohya-form LoHA on every original-layout transformer layer and on text-encoder layers, factors random."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sd_loha.formats import load_adapter
from sd_loha.sd3_convert import to_form
from sd_loha.sd3_names import SD3Names, form_name

# kohya's SD3 metadata, as its trainer writes it for an SD3.5 Medium LoHA
SD3_METADATA = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "loha"}',
                "ss_base_model_version": "5-medium", "modelspec.architecture": "stable-diffusion-3-5-medium/lora"}


def sd3_loha_tensors(pipe, *, seed: int = 0, rank: int = 2, alpha: float = 1.0, std: float = 0.3,
                     text_encoders: bool = True, dora: bool = False) -> dict[str, torch.Tensor]:
    """A kohya-form SD3 LoHA: every original-layout layer of the transformer (fused qkv, swapped adaLN halves
    included), the first attention's q/v of each text encoder (T5 too) when `text_encoders`; `dora`: an
    output-row dora_scale on the first fused qkv."""
    g = torch.Generator().manual_seed(seed)
    names = SD3Names.from_pipeline(pipe)
    sd: dict[str, torch.Tensor] = {}

    def loha(name: str, out: int, inn: int) -> None:
        for f in ("hada_w1_a", "hada_w2_a"):
            sd[f"{name}.{f}"] = torch.randn(out, rank, generator=g) * std
        for f in ("hada_w1_b", "hada_w2_b"):
            sd[f"{name}.{f}"] = torch.randn(rank, inn, generator=g) * std
        sd[f"{name}.alpha"] = torch.tensor(alpha)

    for original, targets in names.layout.items():
        w = pipe.transformer.get_submodule(targets[0].path).weight
        name = form_name("kohya", "transformer", original)
        loha(name, targets[-1].stop, w[0].numel())
        if dora and original == "joint_blocks.0.x_block.attn.qkv":
            sd[f"{name}.dora_scale"] = torch.rand(targets[-1].stop, 1, generator=g) + 0.5
    if text_encoders:
        for part, attr in (("te1", "text_encoder"), ("te2", "text_encoder_2"), ("te3", "text_encoder_3")):
            for path, module in getattr(pipe, attr).named_modules():
                if isinstance(module, nn.Linear) and ".0." in path and path.endswith(("q_proj", "v_proj", ".q", ".v")):
                    file_path = path if part == "te3" or path.startswith("text_model.") else "text_model." + path
                    loha(form_name("kohya", part, file_path), module.out_features, module.in_features)
    return sd


def write_sd3_loha(pipe, path: Path, *, form: str = "kohya", metadata: dict | None = None, **kwargs) -> Path:
    """:func:`sd3_loha_tensors` in `form` (an sd3_names.FORMS key) written to `path`."""
    sd = sd3_loha_tensors(pipe, **kwargs)
    if form != "kohya":
        sd = to_form(load_adapter(sd), SD3Names.from_pipeline(pipe), form)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={**SD3_METADATA, **(metadata or {})})
    return path
