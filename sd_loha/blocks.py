"""Block weights: a strength per UNet block, in the syntax of LoRA Block Weight (hako-mikan/sd-webui-lora-block-weight).

A block-weight list has 12, 17, 20 or 26 numbers (or names one of the :data:`PRESETS`). Each length is one list
of block ids (:data:`BLOCK_ID_FORMS`): 17 is SD 1.x/2.x's LoRA form (BASE, the six input blocks with attention,
the middle block, the nine output blocks with attention), 26 every block of SD 1.x/2.x, 12 and 20 the same two
forms for SDXL. As in LoRA Block Weight, any length may be used with any model: a list is spread over the 26 ids
of :data:`BLOCK_IDS`, and a block the list does not name gets weight 0 (so the 17-number ``ALL`` leaves conv_in
(IN00) and the downsamplers (IN03, IN06, IN09) out).

Which block a layer is in comes from its LDM path (``input_blocks.4.1.proj_in`` is IN04, ``middle_block.*`` M00,
``output_blocks.3.*`` OUT03), the names A1111 gives layers, whatever naming the file used; every text-encoder
layer is BASE. Layers outside those blocks (time embedding, conv_out, SDXL's label embedding, the text projection)
keep weight 1, as in LoRA Block Weight.

The merged change of a layer is then strength × block weight × ΔW (see :mod:`sd_loha.merge`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from .architectures import UNET_ARCHITECTURES
from .naming import name_part, unet_ldm_path

__all__ = [
    "BLOCK_IDS",
    "BLOCK_ID_FORMS",
    "PRESETS",
    "BlockWeights",
    "parse_block_weights",
    "ldm_block_id",
    "layer_block_id",
    "block_id_of_name",
    "file_block",
    "block_order",
    "OUTSIDE_BLOCKS",
    "STANDARD_UNET_CONFIGS",
]

BASE = "BASE"
BLOCK_IDS: tuple[str, ...] = (
    BASE, *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))
)


def _ids(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Number of weights -> the block ids they are for, in order (LoRA Block Weight's BLOCKID12/17/20/26).
BLOCK_ID_FORMS: dict[int, tuple[str, ...]] = {
    12: _ids("BASE IN04 IN05 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05"),
    17: _ids("BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11"),
    20: _ids("BASE IN00 IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05 OUT06 "
             "OUT07 OUT08"),
    26: BLOCK_IDS,
}

# LoRA Block Weight's built-in presets (its DEF_WEIGHT_PRESET), all in the 17-weight form.
PRESETS: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}


@dataclass(frozen=True)
class BlockWeights:
    """Per-block weights, spread over all 26 :data:`BLOCK_IDS`; ``text`` is how the user gave them (a preset
    name or the list), which is what `<lora:name:S:lbw=...>` writes back."""

    by_id: Mapping[str, float]
    text: str

    def weight(self, block_id: str | None) -> float:
        """The weight of a block; 1 for a layer outside every block (``None``)."""
        return 1.0 if block_id is None else self.by_id[block_id]

    def as_list(self) -> list[float]:
        """All 26 weights in :data:`BLOCK_IDS` order (for a UI's sliders)."""
        return [self.by_id[b] for b in BLOCK_IDS]


BlockWeightsLike = Union[BlockWeights, str, Sequence[float]]


def _fmt(x: float) -> str:
    return f"{x:g}"


def parse_block_weights(spec: BlockWeightsLike) -> BlockWeights:
    """Block weights from a preset name (``"INS"``), a comma string (``"1,0,0,..."``) or a list of 12, 17, 20 or
    26 numbers. Raises ``ValueError`` naming what is wrong and what is accepted."""
    if isinstance(spec, BlockWeights):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        preset = PRESETS.get(text) or PRESETS.get(text.upper())
        items = (preset or text).split(",")
        values = []
        for item in items:
            try:
                values.append(float(item))
            except ValueError:
                raise ValueError(_problem(spec, f"{item.strip()!r} is not a number")) from None
    else:
        text, values = "", [float(v) for v in spec]
    if len(values) not in BLOCK_ID_FORMS:
        raise ValueError(_problem(spec, f"it has {len(values)} weights"))
    if not all(math.isfinite(v) for v in values):
        raise ValueError(_problem(spec, "every weight must be a finite number"))
    by_id = dict.fromkeys(BLOCK_IDS, 0.0)  # blocks the form does not name get 0, as in LoRA Block Weight
    by_id.update(zip(BLOCK_ID_FORMS[len(values)], values))
    return BlockWeights(by_id, text or ",".join(_fmt(v) for v in values))


def _problem(spec: object, what: str) -> str:
    return (f"block weights {spec!r}: {what}. Give 12, 17, 20 or 26 comma-separated numbers "
            f"(LoRA Block Weight's forms; 17 = {','.join(BLOCK_ID_FORMS[17])}) or a preset: {', '.join(PRESETS)}")


_LDM_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.|middle_block\.")
_LDM_PREFIX = {"input_blocks": "IN", "output_blocks": "OUT"}


def ldm_block_id(ldm_path: str | None) -> str | None:
    """``input_blocks.4.1.proj_in`` -> ``IN04``, ``middle_block.*`` -> ``M00``, ``output_blocks.3.*`` -> ``OUT03``;
    None for a path outside those blocks (or None)."""
    m = _LDM_BLOCK.match(ldm_path or "")
    if m is None:
        return None
    if m.group(1) is None:
        return "M00"
    block = f"{_LDM_PREFIX[m.group(1)]}{int(m.group(2)):02d}"
    return block if block in BLOCK_IDS else None


def layer_block_id(part: str, module_path: str, unet_config: Any) -> str | None:
    """The block id of a pipeline layer: ``part`` is ``"unet"`` / ``"te"`` / ``"te1"`` / ``"te2"``, ``module_path``
    its path in that model (diffusers / transformers names), ``unet_config`` the pipeline UNet's config."""
    if part != "unet":
        return BASE if "encoder." in module_path else None
    return ldm_block_id(unet_ldm_path(module_path, unet_config))


# The UNet configs of the released models by family, for naming the blocks of a file without a pipeline.
STANDARD_UNET_CONFIGS: dict[str, dict[str, Any]] = {a.family: a.unet for a in UNET_ARCHITECTURES.values()}
# How reports and charts label the layers no block id covers (time embedding, conv_out, SDXL's label embedding,
# the text projection), which keep weight 1.
OUTSIDE_BLOCKS = "other"

_KOHYA_LDM = re.compile(r"_(input_blocks|output_blocks)_(\d+)_|_middle_block_")
_KOHYA_DIFFUSERS = re.compile(r"_(down_blocks|up_blocks)_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_"
                              r"|_mid_block_(resnets|attentions)_(\d+)_|_(conv_in)$")
# A layer each kind of diffusers sub-block has, standing for any layer of it: only the block index matters here.
_SAMPLE_LAYER = {"resnets": "conv1", "attentions": "proj_in", "downsamplers": "conv", "upsamplers": "conv"}


def block_id_of_name(name: str, unet_config: Any = STANDARD_UNET_CONFIGS["sd1"]) -> str | None:
    """The block id of a file's module name (kohya naming, LDM or diffusers paths), without a pipeline:
    for a file's chart in the UI. Diffusers-style UNet names need the UNet layout (default: SD 1.x/2.x's;
    :data:`STANDARD_UNET_CONFIGS` has SDXL's)."""
    if name_part(name) not in (None, "unet"):
        return BASE if "_encoder_" in name else None
    m = _KOHYA_LDM.search(name)
    if m is not None:
        return ldm_block_id(f"{m.group(1)}.{m.group(2)}." if m.group(1) else "middle_block.")
    m = _KOHYA_DIFFUSERS.search(name)
    if m is None:
        return None
    if m.group(7):
        path = "conv_in"
    elif m.group(1):
        path = f"{m.group(1)}.{m.group(2)}.{m.group(3)}.{m.group(4)}.{_SAMPLE_LAYER[m.group(3)]}"
    else:
        path = f"mid_block.{m.group(5)}.{m.group(6)}.{_SAMPLE_LAYER[m.group(5)]}"
    return ldm_block_id(unet_ldm_path(path, unet_config))


def file_block(name: str, architecture: str | None = None) -> str:
    """The block a file's module belongs to, for reports and charts: its LoRA Block Weight id (BASE, IN00–IN11,
    M00, OUT00–OUT11) or :data:`OUTSIDE_BLOCKS`. `architecture` (an architectures.UNET_ARCHITECTURES label such as
    "SDXL") gives the UNet layout that diffusers-style names need; SD 1.x's when None or unknown."""
    arch = UNET_ARCHITECTURES.get(architecture or "", UNET_ARCHITECTURES["SD 1.x"])
    return block_id_of_name(name, arch.unet) or OUTSIDE_BLOCKS


def block_order(label: str) -> int:
    """Where a block label (a :data:`BLOCK_IDS` id or :data:`OUTSIDE_BLOCKS`) sorts: LoRA Block Weight's order,
    then the layers outside every block."""
    return BLOCK_IDS.index(label) if label in BLOCK_IDS else len(BLOCK_IDS)
