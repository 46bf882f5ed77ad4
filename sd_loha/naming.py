"""Adapter key names: kohya/LyCORIS module names <-> diffusers/transformers module paths.

A LoHA file stores one entry per adapted layer and parameter:

    <prefix>_<module path with '.' replaced by '_'>.<param>

(see docs/FORMAT.md, "Key names"). Two facts make this more than a string replace:

* SDXL files use the original LDM/SGM UNet paths (``input_blocks.4.1...``), because kohya trains
  SDXL on its own port of that UNet and A1111 only swaps the prefix; SD1/SD2 files use diffusers
  paths. Readers see both, so we map every diffusers UNet layer to its LDM path too.
* transformers 5's ``CLIPTextModel`` dropped the ``text_model`` wrapper that every existing file
  names (``lora_te_text_model_encoder_...``), while ``CLIPTextModelWithProjection`` kept it.
  We always write the ``text_model_`` form and accept both on read.

Underscores are ambiguous once the dots are gone (``down_blocks`` vs ``down.blocks``), so we never
parse a kohya name back into a path: we enumerate the model's layers, build every name that may
refer to each one, and look names up in that table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

__all__ = [
    "Part",
    "PARTS",
    "PART",
    "PART_LABELS",
    "SD3_PARTS",
    "SD3_PART",
    "parts_of_family",
    "UNET_PREFIX",
    "LYCORIS_PREFIX",
    "TE_PREFIX",
    "TE1_PREFIX",
    "TE2_PREFIX",
    "kohya_name",
    "split_key",
    "name_part",
    "is_sdxl_unet_config",
    "unet_ldm_path",
    "unet_module_names",
    "unet_save_name",
    "text_encoder_canonical_path",
    "text_encoder_module_names",
    "text_encoder_save_name",
]


@dataclass(frozen=True)
class Part:
    """One model of a pipeline that adapter files patch, and how files and pipelines name it.

    The one place the kohya prefixes are spelled: every reader and writer of module names (naming,
    merge, network, and later formats) takes them from :data:`PARTS`, so a new naming scheme is a new
    field here rather than new spellings elsewhere.
    """

    name: str  # sd-loha's part name: "unet" | "te" | "te1" | "te2"
    prefix: str  # kohya module-name prefix, written and read: "lora_unet", "lora_te", ...
    pipeline_attr: str  # the diffusers pipeline attribute holding the model
    families: tuple[str, ...]  # ModelFamily.name values that have this part
    label: str  # how messages and reports name the part
    read_prefixes: tuple[str, ...] = ()  # further prefixes accepted on read only

    @property
    def all_prefixes(self) -> tuple[str, ...]:
        return (self.prefix, *self.read_prefixes)


# LyCORIS's generic (non-kohya) wrapper names every module "lycoris_<path>", whatever model it wrapped.
# Almost always that is the UNet, so name_part() counts it there; merge also tries it on the text encoders.
LYCORIS_PREFIX = "lycoris"

PARTS: tuple[Part, ...] = (
    Part("unet", "lora_unet", "unet", ("sd1", "sd2", "sdxl"), "UNet", read_prefixes=(LYCORIS_PREFIX,)),
    Part("te", "lora_te", "text_encoder", ("sd1", "sd2"), "text encoder"),
    Part("te1", "lora_te1", "text_encoder", ("sdxl",), "text encoder 1 (CLIP-L)"),
    Part("te2", "lora_te2", "text_encoder_2", ("sdxl",), "text encoder 2 (CLIP-G)"),
)
PART: dict[str, Part] = {p.name: p for p in PARTS}

# The models of an SD3 / SD3.5 pipeline that files adapt (sd_loha.sd3_names). The transformer keeps kohya's
# lora_unet and the CLIPs SDXL's lora_te1 / lora_te2, T5 is lora_te3 (kohya sd-scripts networks/lora_sd3.py:
# LORA_PREFIX_SD3 = "lora_unet" "to make ComfyUI compatible", LORA_PREFIX_TEXT_ENCODER_T5 = "lora_te3"; LyCORIS's
# kohya module numbers text encoders the same way). A separate table: name_part() answers for SD1/SD2/SDXL names.
SD3_PARTS: tuple[Part, ...] = (
    Part("transformer", PART["unet"].prefix, "transformer", ("sd3",), "transformer (MMDiT)"),
    replace(PART["te1"], families=("sd3",)),
    replace(PART["te2"], families=("sd3",)),
    Part("te3", "lora_te3", "text_encoder_3", ("sd3",), "text encoder 3 (T5-XXL)"),
)
SD3_PART: dict[str, Part] = {p.name: p for p in SD3_PARTS}
PART_LABELS: dict[str, str] = {p.name: p.label for p in (*PARTS, *SD3_PARTS)}  # part -> how messages name it

UNET_PREFIX = PART["unet"].prefix
TE_PREFIX = PART["te"].prefix  # SD1/SD2 text encoder
TE1_PREFIX = PART["te1"].prefix  # SDXL CLIP-L
TE2_PREFIX = PART["te2"].prefix  # SDXL CLIP-G

# Matched with the trailing "_" so that "lora_te_" can never swallow "lora_te1_..." or "lora_te2_...".
_PARTS: dict[str, str] = {prefix + "_": p.name for p in PARTS for prefix in p.all_prefixes}


def parts_of_family(family: str) -> tuple[Part, ...]:
    """The parts a model family (``ModelFamily.name``: "sd1", "sd2", "sdxl") has, UNet first."""
    return tuple(p for p in PARTS if family in p.families)


def kohya_name(prefix: str, module_path: str) -> str:
    """kohya module name of ``module_path``: ``("lora_unet", "a.b_c.0") -> "lora_unet_a_b_c_0"``."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def split_key(key: str) -> tuple[str, str]:
    """Split a state-dict key into (module name, param) at the first dot.

    ``"lora_unet_x.hada_w1_a" -> ("lora_unet_x", "hada_w1_a")``,
    ``"lora_unet_x.lora_up.weight" -> ("lora_unet_x", "lora_up.weight")``.
    kohya module names never contain dots, so the first dot is the boundary even for
    dotted params. Raises ``ValueError`` for a key without one.
    """
    name, dot, param = key.partition(".")
    if not dot or not name or not param:
        raise ValueError(f"not a '<module>.<param>' adapter key: {key!r}")
    return name, param


def name_part(name: str) -> str | None:
    """Which model a kohya module name (or full key) belongs to.

    Returns ``"unet"`` (``lora_unet_``, ``lycoris_``), ``"te"`` (``lora_te_``), ``"te1"``
    (``lora_te1_``), ``"te2"`` (``lora_te2_``), or ``None`` for anything else.
    """
    for prefix, part in _PARTS.items():
        if name.startswith(prefix):
            return part
    return None


# ---------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    # diffusers' FrozenDict is a Mapping (and also has attributes); accept plain dicts and
    # attribute-style objects alike.
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def is_sdxl_unet_config(config: Any) -> bool:
    """True for an SDXL-style UNet config (``addition_embed_type == "text_time"``)."""
    return _cfg(config, "addition_embed_type") == "text_time"


# Top-level layers outside the block structure. add_embedding -> label_emb is SDXL's
# added-conditioning MLP (the only user of label_emb among SD1/SD2/SDXL).
_LDM_TOP: dict[str, str] = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}

# diffusers ResnetBlock2D layer -> LDM ResBlock layer (indices are positions inside the LDM
# nn.Sequential's: in_layers = [norm, SiLU, conv], emb_layers = [SiLU, linear],
# out_layers = [norm, SiLU, dropout, conv]).
_LDM_RESNET: dict[str, str] = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

_BLOCK_RE = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID_RE = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _layers_per_block(config: Any) -> list[int]:
    # diffusers allows an int or one value per down block; LDM's num_res_blocks likewise.
    n_blocks = len(_cfg(config, "down_block_types"))
    layers = _cfg(config, "layers_per_block", 2)
    if isinstance(layers, int):
        return [layers] * n_blocks
    return [int(n) for n in layers]


def _resnet_or_attention(kind: str, rest: str) -> str | None:
    """LDM sub-path inside one input/middle/output block for a resnet or transformer layer."""
    if kind == "resnets":
        part = _LDM_RESNET.get(rest)
        return None if part is None else f"0.{part}"
    # Transformer2DModel and LDM's SpatialTransformer name their layers identically.
    return f"1.{rest}"


def unet_ldm_path(diffusers_path: str, config: Any) -> str | None:
    """LDM/SGM path (kohya SDXL / A1111 naming) of a diffusers ``UNet2DConditionModel`` layer.

    ``diffusers_path`` names a Linear/Conv2d, e.g. ``down_blocks.1.attentions.0.proj_in``;
    ``config`` is the UNet's config (FrozenDict or dict). Block indices are derived from
    ``down_block_types``/``up_block_types``/``layers_per_block``, so SD1.x/SD2.x (4 blocks),
    SDXL (3) and small test UNets all work. Returns ``None`` when the layer has no LDM
    equivalent (norms, unusual embeddings, non-cross-attention mid blocks, ...).
    """
    top = _LDM_TOP.get(diffusers_path)
    if top is not None:
        return top

    m = _BLOCK_RE.fullmatch(diffusers_path)
    if m is not None:
        side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        layers = _layers_per_block(config)
        if i >= len(layers):
            return None
        if side == "down_blocks":
            # LDM input_blocks: [conv_in] then per level n resnet(+attn) blocks, then a
            # downsampler block on every level but the last (diffusers' add_downsample rule).
            start = 1 + sum(n + 1 for n in layers[:i])
            if kind == "downsamplers":
                # The last level has no downsampler in either layout.
                if j != 0 or rest != "conv" or i == len(layers) - 1:
                    return None
                return f"input_blocks.{start + layers[i]}.0.op"
            if kind not in ("resnets", "attentions") or j >= layers[i]:
                return None
            inner = _resnet_or_attention(kind, rest)
            return None if inner is None else f"input_blocks.{start + j}.{inner}"

        # LDM output_blocks: per level (deepest first) n+1 blocks; the upsampler is appended
        # to the level's last block, after its resnet and (if any) attention.
        up_layers = list(reversed(layers))
        start = sum(n + 1 for n in up_layers[:i])
        if kind == "upsamplers":
            if j != 0 or rest != "conv" or i == len(layers) - 1:
                return None
            has_attention = "Attn" in _cfg(config, "up_block_types")[i]
            return f"output_blocks.{start + up_layers[i]}.{2 if has_attention else 1}.conv"
        if kind not in ("resnets", "attentions") or j > up_layers[i]:
            return None
        inner = _resnet_or_attention(kind, rest)
        return None if inner is None else f"output_blocks.{start + j}.{inner}"

    m = _MID_RE.fullmatch(diffusers_path)
    if m is not None:
        # LDM's middle_block is (ResBlock, SpatialTransformer, ResBlock): only the cross-attention
        # mid block of SD1/SD2/SDXL has that shape.
        if _cfg(config, "mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            return None
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        index = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((kind, j))
        if index is None:
            return None
        inner = _resnet_or_attention(kind, rest)
        if inner is None:
            return None
        # inner starts with the position inside a down/up block ("0." or "1."), which the
        # middle block does not have: its index *is* the position.
        return f"middle_block.{index}.{inner.split('.', 1)[1]}"

    return None


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def _add_names(table: dict[str, str], names: Iterable[str], path: str) -> None:
    for name in names:
        other = table.setdefault(name, path)
        if other != path:
            # Two layers flattening to the same name would make a file ambiguous: fail loudly.
            raise ValueError(f"kohya name {name!r} refers to both {other!r} and {path!r}")


def unet_module_names(
    unet: nn.Module, prefixes: Iterable[str] = PART["unet"].all_prefixes
) -> dict[str, str]:
    """Every kohya module name that may refer to a Linear/Conv2d of a diffusers UNet.

    Maps name -> diffusers module path. For each layer and prefix it holds the diffusers-style
    name (SD1/SD2 files, LyCORIS) and, where one exists, the LDM-style name (SDXL files), for
    every UNet type. Raises ``ValueError`` if two layers would share a name.
    """
    config = unet.config
    prefixes = tuple(prefixes)
    table: dict[str, str] = {}
    for path, module in unet.named_modules():
        if not _adaptable(module):
            continue
        paths = [path]
        ldm = unet_ldm_path(path, config)
        if ldm is not None:
            paths.append(ldm)
        _add_names(table, (kohya_name(p, q) for p in prefixes for q in paths), path)
    return table


def unet_save_name(path: str, config: Any, sdxl: bool | None = None) -> str:
    """The kohya name we write for UNet layer ``path``.

    LDM names for SDXL (what kohya, A1111, ComfyUI and diffusers expect there), diffusers names
    for SD1/SD2. ``sdxl=None`` decides from ``config`` (``addition_embed_type == "text_time"``).
    An SDXL layer without an LDM equivalent keeps its diffusers name.
    """
    if sdxl is None:
        sdxl = is_sdxl_unet_config(config)
    if sdxl:
        ldm = unet_ldm_path(path, config)
        if ldm is not None:
            return kohya_name(UNET_PREFIX, ldm)
    return kohya_name(UNET_PREFIX, path)


# ---------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------

_TEXT_MODEL = "text_model."


def text_encoder_canonical_path(path: str) -> str:
    """A CLIP text-encoder module path in the transformers-4 layout that files are written in.

    transformers 5's ``CLIPTextModel`` puts what used to be ``text_model.*`` at its root, so
    such paths gain ``text_model.``; paths already under ``text_model`` and the top-level
    ``text_projection`` of ``CLIPTextModelWithProjection`` are unchanged.
    """
    if path.startswith(_TEXT_MODEL) or path == "text_projection" or path.startswith("text_projection."):
        return path
    return _TEXT_MODEL + path


def text_encoder_module_names(text_encoder: nn.Module, prefix: str) -> dict[str, str]:
    """Every kohya name (with and without ``text_model_``) for each Linear of a CLIP text encoder.

    Maps name -> module path in ``text_encoder`` as installed (transformers 4 or 5,
    ``CLIPTextModel`` or ``CLIPTextModelWithProjection``). ``prefix`` is ``lora_te``,
    ``lora_te1`` or ``lora_te2``.
    """
    table: dict[str, str] = {}
    for path, module in text_encoder.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        canonical = text_encoder_canonical_path(path)
        short = canonical[len(_TEXT_MODEL):] if canonical.startswith(_TEXT_MODEL) else canonical
        _add_names(table, {kohya_name(prefix, canonical), kohya_name(prefix, short)}, path)
    return table


def text_encoder_save_name(path: str, prefix: str) -> str:
    """The kohya name we write for text-encoder layer ``path``: always the ``text_model_`` form.

    ``("encoder.layers.0.mlp.fc1", "lora_te1") -> "lora_te1_text_model_encoder_layers_0_mlp_fc1"``.
    """
    return kohya_name(prefix, text_encoder_canonical_path(path))
