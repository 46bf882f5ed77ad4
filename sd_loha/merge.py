"""Loading adapter files into diffusers pipelines: merge, change strength, remove.

Every patched weight keeps a clean copy of its original. The merged weight is always recomputed as
original + Σ strength·ΔW over the adapters on that layer, in fp32, and cast once: changing a strength
never subtracts in half precision, and removing the last adapter restores the original bit for bit.
After merging, the pipeline runs exactly the modules it ran before, so generation costs the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import AdapterFileError, AdapterModule, ParsedFile, load_adapter
from .models import detect_family, text_encoders
from .naming import LYCORIS_PREFIX, name_part, text_encoder_module_names, unet_module_names
from .ops import apply_dora, loha_delta, lora_delta

logger = logging.getLogger(__name__)
REGISTRY_ATTR = "_sd_loha_registry"
PART_PREFIXES = {"unet": "lora_unet", "te": "lora_te", "te1": "lora_te1", "te2": "lora_te2"}
PART_LABELS = {"unet": "UNet", "te": "text encoder", "te1": "text encoder 1 (CLIP-L)", "te2": "text encoder 2 (CLIP-G)"}


class ArchitectureMismatchError(AdapterFileError):
    """The file was made for another model architecture; nothing was changed."""


@dataclass
class ApplyReport:
    name: str
    patched: dict[str, int]  # part -> number of layers patched
    unmatched: list[str]  # file modules that match no layer of this pipeline
    unsupported: list[str]  # modules of algorithms we do not merge (LoKr, OFT, ...)
    file_architecture: str | None

    @property
    def total(self) -> int:
        return sum(self.patched.values())

    def __str__(self) -> str:
        parts = ", ".join(f"{PART_LABELS.get(p, p)}: {n}" for p, n in self.patched.items() if n)
        lines = [f"adapter {self.name!r}: {self.total} layers patched ({parts or 'none'})"]
        if self.unmatched:
            lines.append(f"  {len(self.unmatched)} modules matched nothing: {', '.join(self.unmatched[:10])}"
                         + (" …" if len(self.unmatched) > 10 else ""))
        if self.unsupported:
            lines.append(f"  {len(self.unsupported)} modules use an algorithm sd-loha does not merge: "
                         + ", ".join(self.unsupported[:5]))
        return "\n".join(lines)


@dataclass
class _Adapter:
    name: str
    unet_strength: float
    te_strength: float
    layers: dict[tuple[str, str], AdapterModule]  # (part, module path) -> file module

    def strength(self, part: str) -> float:
        return self.unet_strength if part == "unet" else self.te_strength


@dataclass
class _Slot:
    module: nn.Module
    original: torch.Tensor  # clean copy, CPU, original dtype
    adapters: list[str] = field(default_factory=list)  # in the order they were applied


class _Registry:
    """What is merged into one pipeline. Lives on the UNet object, so pipelines built from the same
    components (img2img, inpaint) see the same state."""

    def __init__(self) -> None:
        self.adapters: dict[str, _Adapter] = {}
        self.slots: dict[tuple[str, str], _Slot] = {}

    def recompute(self, keys: Iterable[tuple[str, str]]) -> None:
        for key in keys:
            slot = self.slots[key]
            weight = slot.module.weight
            active = [self.adapters[n] for n in slot.adapters if self.adapters[n].strength(key[0]) != 0.0]
            if not active:
                with torch.no_grad():
                    weight.copy_(slot.original.to(weight.device))
                continue
            merged = slot.original.to(device=weight.device, dtype=torch.float32)
            for adapter in active:
                merged = _merge_one(merged, adapter.layers[key], adapter.strength(key[0]))
            with torch.no_grad():
                weight.copy_(merged.to(weight.dtype))  # the single cast


def _merge_one(weight: torch.Tensor, mod: AdapterModule, strength: float) -> torch.Tensor:
    device = weight.device
    tensors = {k: v.to(device) for k, v in mod.tensors.items()}
    if mod.algo == "loha":
        delta = loha_delta(tensors, weight.shape, mod.scale)
    else:
        delta = lora_delta(tensors["lora_up.weight"], tensors["lora_down.weight"], tensors.get("lora_mid.weight"),
                           shape=weight.shape, scale=mod.scale)
    if mod.dora_scale is None:
        return weight + strength * delta
    # DoRA re-normalises the whole weight; strength interpolates towards it (A1111/ComfyUI semantics).
    target = apply_dora(weight, delta, mod.dora_scale.to(device))
    return weight + strength * (target - weight)


def _registry(pipe: Any, create: bool = False) -> _Registry | None:
    reg = getattr(pipe.unet, REGISTRY_ATTR, None)
    if reg is None and create:
        reg = _Registry()
        setattr(pipe.unet, REGISTRY_ATTR, reg)
    return reg


def _models(pipe: Any) -> dict[str, nn.Module]:
    return {"unet": pipe.unet, **text_encoders(pipe)}


def _name_tables(models: Mapping[str, nn.Module]) -> dict[str, dict[str, str]]:
    tables = {}
    for part, model in models.items():
        if part == "unet":
            tables[part] = unet_module_names(model)
        else:
            tables[part] = text_encoder_module_names(model, PART_PREFIXES[part])
    return tables


def _candidates(mod_name: str) -> list[tuple[str, str]]:
    """(part, name to look up) pairs for a file module name. LyCORIS's generic wrapper writes
    `lycoris_<path>` for whatever model it wrapped: usually the UNet, so that is tried first."""
    if mod_name.startswith(LYCORIS_PREFIX + "_"):
        rest = mod_name[len(LYCORIS_PREFIX) + 1:]
        return [(part, f"{prefix}_{rest}") for part, prefix in PART_PREFIXES.items()]
    return [(name_part(mod_name), mod_name)]


def file_architecture(parsed: ParsedFile) -> str | None:
    """The architecture a file was made for, from its keys and shapes (metadata as a fallback)."""
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


def _expected_shape_ok(mod: AdapterModule, weight: torch.Tensor) -> bool:
    out, flat_in = weight.shape[0], weight[0].numel()
    if mod.tucker:
        in_ch = weight.shape[1] if weight.dim() > 1 else flat_in
        if mod.algo == "loha":
            t = mod.tensors["hada_t1"]
            return mod.out_features() == out and mod.in_features() == in_ch and tuple(t.shape[2:]) == tuple(weight.shape[2:])
        return mod.out_features() == out and mod.in_features() == in_ch
    return mod.out_features() == out and mod.in_features() == flat_in


def apply_loha(
    pipe: Any,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    strength: float = 1.0,
    *,
    unet_strength: float | None = None,
    text_encoder_strength: float | None = None,
    name: str | None = None,
    strict: bool = False,
) -> ApplyReport:
    """Merge a LoHA (or LoRA/LoCon, or mixed) file into a pipeline's UNet and text encoder(s).

    `source` is a .safetensors path or a state dict. Every check runs before any weight changes: a file
    for another architecture, a shape mismatch, or (strict=True) unmatched keys leave the pipeline as it was.
    Applying under a name that is already loaded replaces that adapter.
    """
    parsed = load_adapter(source)
    if name is None:
        name = Path(source).stem if not isinstance(source, Mapping) else f"adapter{len(list_loha(pipe))}"
    models = _models(pipe)
    tables = _name_tables(models)
    family = detect_family(pipe)
    arch = file_architecture(parsed)

    layers: dict[tuple[str, str], AdapterModule] = {}
    unmatched: list[str] = []
    missing_parts: set[str] = set()
    mismatched: list[str] = []
    for mod_name, mod in parsed.modules.items():
        hit = None
        for part, lookup in _candidates(mod_name):
            if part in tables and lookup in tables[part]:
                hit = (part, tables[part][lookup])
                break
        if hit is None:
            part = name_part(mod_name)
            if part not in tables and part is not None and not mod_name.startswith(LYCORIS_PREFIX + "_"):
                missing_parts.add(part)
            unmatched.append(mod_name)
            continue
        weight = models[hit[0]].get_submodule(hit[1]).weight
        if not _expected_shape_ok(mod, weight):
            mismatched.append(f"{mod_name}: file {mod.out_features()}×{mod.in_features()}, "
                              f"model {tuple(weight.shape)}")
            continue
        layers[hit] = mod

    made_for = f"made for {arch}" if arch else "made for another architecture"
    if missing_parts:
        labels = ", ".join(PART_LABELS.get(p, p) for p in sorted(missing_parts))
        raise ArchitectureMismatchError(
            f"{parsed.source} was {made_for}: it adapts {labels}, which this {family.label} pipeline does not have. "
            "Nothing was changed; use a base model of the architecture the file was trained on."
        )
    if mismatched:
        raise ArchitectureMismatchError(
            f"{parsed.source} was {made_for}; this pipeline is {family.label}. {len(mismatched)} layers differ in shape, "
            f"e.g. {'; '.join(mismatched[:3])}. Nothing was changed."
        )
    if not layers:
        raise ArchitectureMismatchError(
            f"{parsed.source}: none of its {len(parsed.modules)} modules match a layer of this {family.label} pipeline "
            f"(file {made_for if arch else 'of unknown architecture'}; first keys: {', '.join(list(parsed.modules)[:3])}). "
            "Nothing was changed."
        )
    if unmatched and strict:
        raise AdapterFileError(
            f"{parsed.source}: {len(unmatched)} modules match no layer of this pipeline (strict=True): "
            + ", ".join(unmatched[:20]) + (" …" if len(unmatched) > 20 else "") + ". Nothing was changed."
        )
    if unmatched:
        logger.warning("%s: %d modules match no layer and were skipped: %s", parsed.source, len(unmatched),
                       ", ".join(unmatched[:20]) + (" …" if len(unmatched) > 20 else ""))

    reg = _registry(pipe, create=True)
    if name in reg.adapters:
        remove_loha(pipe, name)
    adapter = _Adapter(
        name=name,
        unet_strength=float(strength if unet_strength is None else unet_strength),
        te_strength=float(strength if text_encoder_strength is None else text_encoder_strength),
        layers=layers,
    )
    reg.adapters[name] = adapter
    for key in layers:
        slot = reg.slots.get(key)
        if slot is None:
            module = models[key[0]].get_submodule(key[1])
            slot = reg.slots[key] = _Slot(module, module.weight.detach().to("cpu", copy=True))
        slot.adapters.append(name)
    try:
        reg.recompute(layers)
    except BaseException:
        remove_loha(pipe, name)  # never leave a half-merged adapter behind
        raise

    patched: dict[str, int] = {p: 0 for p in models}
    for part, _ in layers:
        patched[part] += 1
    return ApplyReport(name, patched, unmatched, sorted(parsed.unsupported), arch)


def set_loha_strength(
    pipe: Any,
    name: str,
    strength: float | None = None,
    *,
    unet_strength: float | None = None,
    text_encoder_strength: float | None = None,
) -> None:
    """Change one loaded adapter's strength (UNet and text encoder together, or each on its own)."""
    reg = _registry(pipe)
    if reg is None or name not in reg.adapters:
        raise KeyError(f"no adapter named {name!r} is loaded; loaded: {', '.join(list_loha(pipe)) or 'none'}")
    adapter = reg.adapters[name]
    if strength is not None:
        adapter.unet_strength = adapter.te_strength = float(strength)
    if unet_strength is not None:
        adapter.unet_strength = float(unet_strength)
    if text_encoder_strength is not None:
        adapter.te_strength = float(text_encoder_strength)
    reg.recompute(adapter.layers)


def remove_loha(pipe: Any, name: str | None = None) -> None:
    """Remove one adapter (or all with name=None); layers with no adapter left get their original back bit for bit."""
    reg = _registry(pipe)
    if reg is None:
        return
    names = list(reg.adapters) if name is None else [name]
    for n in names:
        if n not in reg.adapters:
            raise KeyError(f"no adapter named {n!r} is loaded; loaded: {', '.join(reg.adapters) or 'none'}")
        adapter = reg.adapters.pop(n)
        for key in adapter.layers:
            reg.slots[key].adapters.remove(n)
        reg.recompute(adapter.layers)
        for key in adapter.layers:
            if not reg.slots[key].adapters:
                del reg.slots[key]  # weight is the original again; drop the backup


def list_loha(pipe: Any) -> dict[str, tuple[float, float]]:
    """Loaded adapters: name -> (UNet strength, text-encoder strength)."""
    reg = _registry(pipe)
    return {n: (a.unet_strength, a.te_strength) for n, a in reg.adapters.items()} if reg else {}
