"""A file's module names matched to a pipeline's layers: the one place it is done (apply_loha, convert, PEFT).

naming.py builds every name a file may give each layer of a model; this module puts those tables together for
a whole pipeline (:class:`ModelLayers`), tells which part a LyCORIS ``lycoris_<path>`` name may belong to
(:func:`name_candidates`), which architecture a file was made for (:func:`file_architecture`), and tells which layers' weights cannot take an
exact merge (quantized or float8-stored: :func:`weight_problem`; apply_loha adds adapters to those in the forward,
sd_loha.bypass; what needs the weight itself, such as convert, refuses them before anything changes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .io import ParsedFile
from .models import text_encoders
from .naming import LYCORIS_PREFIX, PART, PARTS, name_part, text_encoder_module_names, unet_module_names
from .sd3_names import sd3_file_architecture

# The dtypes sd-loha merges into (in place, through an fp32 copy). float8 dtypes are floating point to torch
# but are storage formats: a merge rounded to them would lose most of ΔW.
MERGEABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# bitsandbytes layer class -> what it stores, for messages.
_BNB_KINDS = {"Linear4bit": "4-bit quantized", "LinearFP4": "4-bit (FP4) quantized", "LinearNF4": "4-bit (NF4) quantized",
              "Linear8bitLt": "8-bit (LLM.int8) quantized"}


class UnsupportedWeightError(ValueError):
    """A pipeline layer that a file adapts stores its weight in a form the operation cannot use (convert needs
    the weight itself; apply_loha refuses only what even its bypass cannot do, such as DoRA on a weight it
    cannot read). Raised before any weight changes."""


def pipeline_models(pipe: Any) -> dict[str, nn.Module]:
    """part name -> the pipeline's model for it (unet, te or te1/te2)."""
    return {"unet": pipe.unet, **text_encoders(pipe)}


def module_name_tables(models: Mapping[str, nn.Module]) -> dict[str, dict[str, str]]:
    """part -> {kohya module name: module path} for each model (the names files use)."""
    tables = {}
    for part, model in models.items():
        if part == "unet":
            tables[part] = unet_module_names(model)
        else:
            tables[part] = text_encoder_module_names(model, PART[part].prefix)
    return tables


def name_candidates(mod_name: str) -> list[tuple[str, str]]:
    """(part, name to look up) pairs for a file module name, in the order to try them. LyCORIS's generic wrapper
    writes `lycoris_<path>` for whatever model it wrapped: usually the UNet, so that is tried first."""
    if mod_name.startswith(LYCORIS_PREFIX + "_"):
        rest = mod_name[len(LYCORIS_PREFIX) + 1:]
        return [(p.name, f"{p.prefix}_{rest}") for p in PARTS]
    return [(name_part(mod_name), mod_name)]


def file_architecture(parsed: ParsedFile) -> str | None:
    """The architecture a file was made for ("SD 1.x", "SD 2.x", "SDXL", "SD3 Medium", "SD3.5 Medium", "SD3.5 Large":
    architectures.ARCHITECTURES' labels; sd3_names.sd3_file_architecture for SD3 sizes its names cannot tell
    apart), from its keys and shapes (metadata as a fallback); None when nothing says."""
    sd3 = sd3_file_architecture(parsed)  # first: SD3 files use SDXL's lora_te1 / lora_te2 too
    if sd3 is not None:
        return sd3
    parts = {name_part(n) for n in parsed.modules}
    if parts & {"te1", "te2"}:
        return "SDXL"
    dims = {
        m.in_features()
        for n, m in parsed.modules.items()
        if n.endswith(("attn2_to_k", "attn2_to_v")) and not m.tucker
    }
    by_dim = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
    for d in dims:
        if d in by_dim:
            return by_dim[d]
    version = parsed.metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "SDXL"
    if version.startswith("sd_v2"):
        return "SD 2.x"
    if version.startswith("sd_v1"):
        return "SD 1.x"
    return None


def weight_problem(module: nn.Module) -> str | None:
    """Why sd-loha cannot merge exactly into this layer's weight (None when it can): a bitsandbytes 4/8-bit layer,
    a quantized tensor subclass, or a weight stored in a dtype that is not fp32/fp16/bf16 (e.g. float8 from
    diffusers' enable_layerwise_casting). apply_loha takes such layers through the bypass path instead."""
    cls = type(module)
    if cls.__module__.split(".")[0] == "bitsandbytes":
        kind = _BNB_KINDS.get(cls.__name__, "quantized")
        return f"is a bitsandbytes {cls.__name__} ({kind})"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return f"is a {cls.__name__} without a weight tensor"
    if type(weight) not in (torch.Tensor, nn.Parameter):
        return f"stores its weight as {type(weight).__name__} (a quantized tensor type)"
    if weight.dtype not in MERGEABLE_DTYPES:
        return f"stores its weight as {str(weight.dtype).removeprefix('torch.')}"
    return None


@dataclass(frozen=True)
class LayerMatch:
    """The layer of a pipeline a file module adapts."""

    part: str  # "unet" | "te" | "te1" | "te2"
    path: str  # the layer's module path in that model
    module: nn.Module

    @property
    def key(self) -> tuple[str, str]:
        return self.part, self.path

    @property
    def weight(self) -> torch.Tensor:
        """The layer's weight, for what needs the weight itself (convert); an UnsupportedWeightError when it is
        not a plain fp32/fp16/bf16 tensor."""
        problem = weight_problem(self.module)
        if problem is not None:
            raise UnsupportedWeightError(
                f"{PART[self.part].label} layer {self.path} {problem}; this needs the weight itself, which a quantized "
                "or float8-stored layer does not give exactly (apply_loha adds adapters to such layers in the forward "
                "instead). Load the pipeline without quantization (no BitsAndBytesConfig / "
                "quantization_config, no enable_layerwise_casting) in fp32, fp16 or bf16. Nothing was changed.")
        return self.module.weight


class ModelLayers:
    """The adaptable layers of a pipeline's models (`pipe`: anything with .unet and text_encoder[_2]) and every
    name files give them."""

    def __init__(self, pipe: Any) -> None:
        self.models = pipeline_models(pipe)
        self.tables = module_name_tables(self.models)

    def match(self, mod_name: str) -> LayerMatch | None:
        """The layer a file's module name (kohya, LDM or diffusers paths, text_model_ or not, lycoris_) refers
        to, or None when this pipeline has no such layer."""
        for part, lookup in name_candidates(mod_name):
            path = self.tables.get(part, {}).get(lookup)
            if path is not None:
                return LayerMatch(part, path, self.models[part].get_submodule(path))
        return None
