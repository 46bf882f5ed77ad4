"""Which reader reads an adapter source: the one dispatch above the format readers.

kohya, LyCORIS, OneTrainer and A1111 files share kohya's key names and are read by sd_loha.io; a PEFT LoHa
adapter (a folder with adapter_config.json, or its weights file) by sd_loha.peft_format, as the kohya modules it
equals; an SD3 file of any of its forms (dotted diffusers / ComfyUI names too) by sd_loha.sd3_names. The readers never import this module, so a new format is a new reader plus a line here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .io import ParsedFile, parse_state_dict, read_safetensors
from .peft_format import is_peft_adapter, read_peft
from .sd3_names import is_sd3_state_dict, read_sd3


def load_adapter(source: str | os.PathLike | Mapping[str, torch.Tensor], *, family: str | None = None) -> ParsedFile:
    """Parse an adapter from a path or an in-memory state dict. A PEFT LoHa adapter (a folder with
    adapter_config.json, or its safetensors file) is read as the kohya modules it equals; `family` ("sd1",
    "sd2", "sdxl") tells it which text encoder a PEFT `text_encoder` adapter is (peft_format.read_peft)."""
    if not isinstance(source, Mapping) and is_peft_adapter(source):
        tensors, metadata = read_peft(source, family=family)
        if is_sd3_state_dict(tensors):  # SD 3.x adapters come back under diffusers' dotted names
            return read_sd3(tensors, metadata=metadata, where=str(source))
        return parse_state_dict(tensors, source=str(source), metadata=metadata)
    if isinstance(source, Mapping):
        tensors, metadata, where = source, {}, "<state dict>"
    else:
        (tensors, metadata), where = read_safetensors(source), str(source)
    if is_sd3_state_dict(tensors):
        return read_sd3(tensors, metadata=metadata, where=where)
    return parse_state_dict(tensors, source=where, metadata=metadata)
