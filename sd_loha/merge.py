"""Loading adapter files into diffusers pipelines: merge, change strength, remove.

Every patched weight keeps its clean original (on the CPU: the original tensor itself). The merged
weight is always recomputed as original + Σ strength·ΔW over the adapters on that layer, in fp32, and
cast once: changing a strength never subtracts in half precision, and removing the last adapter
restores the original bit for bit. After merging, the pipeline runs exactly the modules it ran before,
so generation costs the same.

Layers whose weight cannot take an exact merge (bitsandbytes 4/8-bit, float8 storage, quantized tensor types),
and every layer when `apply_loha(merge=False)` asks, take the "bypass" path instead (sd_loha.bypass): a forward
hook adds strength·ΔW·x and the stored weight is never written. One adapter may take both paths (e.g. merged
into a quantized UNet's fp16 convs, bypassed on its 4-bit Linears); the ApplyReport says which layer took which.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .blocks import BlockWeights, BlockWeightsLike, layer_block_id, parse_block_weights
from .bypass import BypassSlot, dora_problem, full_delta, weight_shape
from .formats import load_adapter
from .io import AdapterFileError, AdapterModule, ParsedFile
from .model_names import LayerMatch, ModelLayers, UnsupportedWeightError, file_architecture, weight_problem
from .models import detect_family
from .naming import LYCORIS_PREFIX, PART_LABELS, name_part, parts_of_family
from .ops import apply_dora
from .sd3_convert import Coupled
from .sd3_convert import model_layers as sd3_model_layers
from .sd3_names import SD3Names, sd3_file_evidence, transformer_problem

logger = logging.getLogger(__name__)
REGISTRY_ATTR = "_sd_loha_registry"
KEEP_BLOCK_WEIGHTS = object()  # set_loha_strength's default: leave the block weights as they are
MERGED, BYPASS = "merged", "bypass"  # the two paths a layer may take (ApplyReport.paths)
DENOISER_PARTS = ("unet", "transformer")  # the parts unet_strength applies to; every other part is a text encoder


class ArchitectureMismatchError(AdapterFileError):
    """The file was made for another model architecture; nothing was changed."""


@dataclass
class ApplyReport:
    name: str
    patched: dict[str, int]  # part -> number of layers patched
    unmatched: list[str]  # file modules that match no layer of this pipeline
    unsupported: list[str]  # modules of algorithms we do not merge (LoKr, OFT, ...)
    file_architecture: str | None
    paths: dict[tuple[str, str], str] = field(default_factory=dict)  # (part, module path) -> MERGED | BYPASS
    bypass_reasons: dict[str, int] = field(default_factory=dict)  # why layers were bypassed -> how many

    @property
    def total(self) -> int:
        return sum(self.patched.values())

    @property
    def bypassed(self) -> int:
        return sum(1 for p in self.paths.values() if p == BYPASS)

    def __str__(self) -> str:
        parts = ", ".join(f"{PART_LABELS.get(p, p)}: {n}" for p, n in self.patched.items() if n)
        lines = [f"adapter {self.name!r}: {self.total} layers patched ({parts or 'none'})"]
        if self.bypassed:
            reasons = self.bypass_reasons
            why = "; ".join(reason if len(reasons) == 1 else f"{n}: {reason}" for reason, n in reasons.items())
            lines[0] += f": {self.total - self.bypassed} merged, {self.bypassed} through bypass ({why})"
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
    bypassed: set[tuple[str, str]] = field(default_factory=set)  # the layers it is added on in the forward
    block_weights: BlockWeights | None = None
    block_factor: dict[tuple[str, str], float] = field(default_factory=dict)  # layer -> its block's weight

    def strength(self, part: str) -> float:
        return self.unet_strength if part in DENOISER_PARTS else self.te_strength

    def multiplier(self, key: tuple[str, str]) -> float:
        """What ΔW of this layer is multiplied by: the part's strength × the layer's block weight."""
        return self.strength(key[0]) * self.block_factor.get(key, 1.0)

    def set_block_weights(self, weights: BlockWeights | None, unet_config: Any) -> None:
        self.block_weights = weights
        self.block_factor = {} if weights is None else {
            key: weights.weight(layer_block_id(key[0], key[1], unet_config)) for key in self.layers}


@dataclass
class _Slot:
    module: nn.Module
    original: torch.Tensor  # the clean original on the CPU, original dtype: never written to
    adapters: list[str] = field(default_factory=list)  # in the order they were applied
    # The merged weight's memory while the original is back in place (every adapter at strength 0), kept
    # so that a strength change does not allocate and fault in fresh memory again.
    spare: torch.Tensor | None = None

    def restore(self) -> None:
        """Put the original back, bit for bit."""
        weight = self.module.weight
        if _same_tensor_kind(weight, self.original):
            if weight.data_ptr() != self.original.data_ptr():
                self.spare = weight.data
            weight.data = self.original  # no copy: the original tensor itself
        else:
            weight.copy_(self.original)  # moved or cast since the merge: copy_ crosses devices and dtypes

    def writable_weight(self) -> torch.Tensor:
        """The weight, made safe to overwrite: while it still is the original tensor (a CPU weight just
        taken over, or restored at strength 0) it gets memory of its own first."""
        weight = self.module.weight
        if weight.data_ptr() == self.original.data_ptr():
            weight.data = self.spare if self.spare is not None else _empty_like(self.original)
            self.spare = None
        return weight


def _same_tensor_kind(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()


class _Registry:
    """What is merged into one pipeline. Lives on the UNet object, so pipelines built from the same
    components (img2img, inpaint) see the same state."""

    def __init__(self) -> None:
        self.adapters: dict[str, _Adapter] = {}
        self.slots: dict[tuple[str, str], _Slot] = {}
        self.bypass: dict[tuple[str, str], BypassSlot] = {}

    def recompute(self, keys: Iterable[tuple[str, str]]) -> None:
        """Bring the merged weights and the bypass hooks of these layers up to the adapters' multipliers."""
        keys = list(keys)
        self._recompute_merged([k for k in keys if k in self.slots])
        for key in keys:
            slot = self.bypass.get(key)
            if slot is not None:
                merged = self.slots.get(key)
                merged_state = () if merged is None else tuple(
                    (n, self.adapters[n].multiplier(key)) for n in merged.adapters)
                slot.refresh({n: self.adapters[n].multiplier(key) for n in slot.entries}, merged_state)

    def _recompute_merged(self, keys: list[tuple[str, str]]) -> None:
        """Set each layer's weight to original + Σ strength·ΔW (fp32, one cast at the end).

        Per layer: original.float() + strength · ΔW for each active adapter in the order applied, in fp32.
        On CPU the flat forms run in blocks of output rows through small reused buffers, so the
        intermediate products stay in cache and no full-size temporary is allocated (on SD 1.5 that is
        2-3x faster than whole-layer products; freshly allocated memory costs more than the maths).
        ΔW is `merge_delta`'s, which equals ops.loha_delta's up to fp32 rounding of the BLAS.
        """
        ws = _Workspace()
        with torch.no_grad():
            for key in keys:
                slot = self.slots[key]
                active = [self.adapters[n] for n in slot.adapters if self.adapters[n].multiplier(key) != 0.0]
                if not active:
                    slot.restore()
                    continue
                weight = slot.writable_weight()
                original = slot.original.to(weight.device)  # no copy when it is already there
                # fp32 weights accumulate in place; half-precision (or channels-last) ones in an fp32 buffer,
                # copied (cast once) at the end.
                direct = weight.dtype == torch.float32 and weight.is_contiguous()
                acc = weight if direct else ws.buffer("acc", weight.shape, weight.device)
                for i, adapter in enumerate(active):
                    mod, strength = adapter.layers[key], adapter.multiplier(key)
                    base = original if i == 0 else acc
                    if mod.dora_scale is not None or mod.tucker:
                        delta = full_delta(mod, weight.shape, weight.device)
                        if mod.dora_scale is not None:
                            # DoRA re-normalises the whole weight; strength interpolates towards it (A1111/ComfyUI).
                            current = base.to(torch.float32)
                            target = apply_dora(current, delta, mod.dora_scale.to(weight.device))
                            acc.copy_(current + strength * (target - current))
                            continue
                        if strength != 1.0:  # 1.0 * x == x exactly
                            delta.mul_(strength)
                        torch.add(base, delta, out=acc)  # promotes a half-precision original to fp32 first
                        continue
                    _add_flat_delta(mod, strength, base.reshape(base.shape[0], -1), acc.view(acc.shape[0], -1), ws)
                    # (base.reshape is a view: originals kept on the CPU and acc are contiguous)
                if acc is not weight:
                    weight.copy_(acc)  # the single cast


# Bytes of one block of rows of a full-size product on CPU: the two Hadamard operands of a block
# (2 x this) stay in a core's L2 cache. Tests shrink it to exercise the blocking on tiny layers.
_BLOCK_BYTES = 1 << 20


class _Workspace:
    """fp32 scratch buffers reused across the layers of one recompute."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def buffer(self, name: str, shape: Iterable[int], device: torch.device) -> torch.Tensor:
        shape = torch.Size(shape)
        key = (name, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < shape.numel():
            self._buffers[key] = buf = torch.empty(shape.numel(), dtype=torch.float32, device=device)
        return buf[: shape.numel()].view(shape)


def _add_flat_delta(mod: AdapterModule, strength: float, base: torch.Tensor, acc: torch.Tensor, ws: _Workspace) -> None:
    """acc = base + strength · (scale · H) for a flat LoHA or LoRA/LoCon module; base, acc are (out, in_flat).

    The operations of `ops.loha_delta` (H = (w1a @ w1b) * (w2a @ w2b), then * scale) or `ops.lora_delta`
    (up @ down, then * scale), then * strength, then + base, on blocks of rows. The rank-sized reductions
    are never split, but the BLAS may pick another kernel for a block than for the whole matrix, so H can
    differ from ops' in the last bit; `merge_delta` gives exactly this function's ΔW."""
    device = acc.device
    f = {k: v.detach().to(device=device, dtype=torch.float32) for k, v in mod.tensors.items()}
    if mod.algo == "loha":
        a1, b1, a2, b2 = (f[k].reshape(f[k].shape[0], -1) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    else:
        a1, b1 = (f[k].reshape(f[k].shape[0], -1) for k in ("lora_up.weight", "lora_down.weight"))
        a2 = b2 = None
    out, flat_in = acc.shape
    rows = out if device.type != "cpu" else max(1, min(out, _BLOCK_BYTES // (4 * flat_in)))
    scale = float(mod.scale)
    for i in range(0, out, rows):
        j = min(out, i + rows)
        h = torch.matmul(a1[i:j], b1, out=ws.buffer("p1", (j - i, flat_in), device))
        if a2 is not None:
            h.mul_(torch.matmul(a2[i:j], b2, out=ws.buffer("p2", (j - i, flat_in), device)))
        h.mul_(scale)
        if strength != 1.0:  # 1.0 * x == x exactly
            h.mul_(strength)
        torch.add(base[i:j], h, out=acc[i:j])  # promotes a half-precision original to fp32 first


def merge_delta(mod: AdapterModule, shape: Iterable[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """ΔW = scale · H of one file module for a weight of `shape`, in fp32, computed exactly as the merge
    computes it (same kernels, same row blocks), so `original.float() + strength * merge_delta(...)` is
    bit for bit what apply_loha writes before its single cast. Equal to ops.loha_delta / ops.lora_delta
    up to fp32 rounding (the row blocks may make the BLAS round a last bit differently). No DoRA."""
    shape = torch.Size(shape)
    device = torch.device(device)
    if mod.tucker:
        return full_delta(mod, shape, device)
    acc = torch.zeros(shape, dtype=torch.float32, device=device)
    flat = acc.view(shape[0], -1)
    _add_flat_delta(mod, 1.0, flat, flat, _Workspace())
    return acc


def _take_original(weight: torch.Tensor) -> torch.Tensor:
    """The clean original of a weight about to be merged.

    A contiguous CPU weight is kept as it is: the tensor itself becomes the clean copy and the merged
    weight gets fresh memory (`_Slot.writable_weight`), which saves a full copy of every patched weight,
    and removing the adapter just puts the tensor back. Accelerator weights are copied to the CPU, so
    the clean copies never take accelerator memory; so are channels-last CPU weights, so that the
    original can be walked by rows (copy_ puts values back into any layout)."""
    data = weight.detach()
    if data.device.type == "cpu" and data.is_contiguous():
        return data
    out = _empty_like(data, device="cpu")
    return out.copy_(data)


def _empty_like(t: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """An uninitialised contiguous tensor like `t`. (Asking Linux for transparent huge pages here made the
    first merge of a process slower, not faster, when measured on SD 1.5: 4 KiB pages it is.)"""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device if device is None else device)


def _denoiser(pipe: Any) -> nn.Module:
    """The UNet, or SD 3.x's transformer: where the registry of loaded adapters lives."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def _registry(pipe: Any, create: bool = False) -> _Registry | None:
    reg = getattr(_denoiser(pipe), REGISTRY_ATTR, None)
    if reg is None and create:
        reg = _Registry()
        setattr(_denoiser(pipe), REGISTRY_ATTR, reg)
    return reg


@dataclass
class _Matching:
    """A file's modules put on a pipeline's layers, with every problem found on the way: all of it is known
    before apply_loha changes anything."""

    merge: bool
    models: dict[str, nn.Module]  # part -> the pipeline's model for it
    layers: dict[tuple[str, str], AdapterModule] = field(default_factory=dict)
    claimed: dict[tuple[str, str], str] = field(default_factory=dict)  # layer -> the file module name on it
    bypass_why: dict[tuple[str, str], str] = field(default_factory=dict)  # layer -> why it takes the bypass path
    cannot: list[str] = field(default_factory=list)  # layers where even the bypass cannot work
    unmatched: list[str] = field(default_factory=list)
    missing_parts: set[str] = field(default_factory=set)
    mismatched: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    def add(self, mod_name: str, match: LayerMatch, mod: AdapterModule) -> None:
        hit = match.key
        label = f"{PART_LABELS.get(match.part, match.part)} layer {match.path}"
        if not isinstance(getattr(match.module, "weight", None), torch.Tensor):
            self.cannot.append(f"{label} is a {type(match.module).__name__} without a weight tensor")
            return
        why = _bypass_reason(match.module, self.merge, mod, self.cannot, label)
        problem = mod.shape_problem(weight_shape(match.module))
        if problem is not None:
            self.mismatched.append(f"{mod_name}: {problem}")
            return
        if why is not None:
            self.bypass_why[hit] = why
        if hit in self.layers:
            # Two names for one layer (e.g. diffusers- and LDM-style, or lycoris_ and lora_unet_): ambiguous.
            self.duplicates.append(f"{self.claimed[hit]} and {mod_name} (both {hit[1]})")
            return
        self.layers[hit] = mod
        self.claimed[hit] = mod_name


def _match_unet_family(pipe: Any, parsed: ParsedFile, family: Any, merge: bool) -> _Matching:
    """SD 1.x / 2.x / XL: each file module names one layer (kohya, LDM or diffusers paths; ModelLayers.match)."""
    model_layers = ModelLayers(pipe)
    m = _Matching(merge, model_layers.models)
    family_parts = {p.name for p in parts_of_family(family.name)}
    for mod_name, mod in parsed.modules.items():
        match = model_layers.match(mod_name)
        if match is None:
            part = name_part(mod_name)
            # A part the architecture does not have (te1 on SD 1.x, te on SDXL) means another architecture;
            # a text encoder the family has but this pipeline object lacks (text_encoder=None) is just unmatched.
            if (part is not None and part not in model_layers.tables and part != "unet" and part not in family_parts
                    and not mod_name.startswith(LYCORIS_PREFIX + "_")):
                m.missing_parts.add(part)
            m.unmatched.append(mod_name)
            continue
        m.add(mod_name, match, mod)
    return m


def _match_sd3(pipe: Any, parsed: ParsedFile, merge: bool) -> _Matching:
    """SD 3.x: a file module in any of the forms (sd3_names.FORMS) may span several layers (a fused qkv on
    diffusers' to_q/to_k/to_v): it is split exactly into one module per layer first (sd3_convert.model_layers). A
    transformer of another size is refused by name before anything else."""
    names = SD3Names.from_pipeline(pipe)
    evidence = sd3_file_evidence(parsed)
    problem = None if evidence is None else transformer_problem(evidence, pipe.transformer.config)
    if problem is not None:
        raise ArchitectureMismatchError(f"{parsed.source}: {problem}. Nothing was changed.")
    m = _Matching(merge, names.models)
    known = {n: mod for n, mod in parsed.modules.items() if names.match(n) is not None}
    m.unmatched = [n for n in parsed.modules if n not in known]
    for (part, path), piece in sd3_model_layers(replace(parsed, modules=known), names).items():
        module = names.models[part].get_submodule(path)
        if isinstance(piece, Coupled):
            m.cannot.append(f"{piece.module.name} has a dora_scale along the input axis of a fused qkv, which splits "
                            "onto to_q/to_k/to_v only as dense per-layer deltas (sd-loha's loader does not take those)")
            continue
        m.add(piece.name, LayerMatch(part, path, module), piece)
    return m


def apply_loha(
    pipe: Any,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    strength: float = 1.0,
    *,
    unet_strength: float | None = None,
    text_encoder_strength: float | None = None,
    name: str | None = None,
    strict: bool = False,
    block_weights: BlockWeightsLike | None = None,
    merge: bool = True,
) -> ApplyReport:
    """Merge a LoHA (or LoRA/LoCon, or mixed) file into a pipeline's UNet and text encoder(s).

    `source` is a .safetensors path or a state dict. Every check runs before any weight changes: a file
    for another architecture, a shape mismatch, or (strict=True) unmatched keys leave the pipeline as it was.
    `block_weights` (LoRA Block Weight's syntax, see sd_loha.blocks: a preset name such as "INS", a comma
    string or a list of 12/17/20/26 numbers) multiplies each layer's strength by its block's weight.
    Applying under a name that is already loaded replaces that adapter.

    Layers whose weight cannot take an exact merge (bitsandbytes 4/8-bit, float8 storage, quantized tensor
    types) get the adapter through bypass: a forward hook adds strength·ΔW·x and their stored weights are never
    written (see sd_loha.bypass). `merge=False` puts every layer on that path: strength changes then rewrite no
    weight at all (instant sweeps), at a small cost per generation step.
    """
    _check_strengths(strength=strength, unet_strength=unet_strength, text_encoder_strength=text_encoder_strength)
    weights = None if block_weights is None else parse_block_weights(block_weights)
    parsed = load_adapter(source, family=detect_family(pipe).name)
    if name is None:
        if isinstance(source, Mapping):
            # Never reuse a loaded name: that would silently replace another in-memory adapter.
            loaded = list_loha(pipe)
            name = next(f"adapter{i}" for i in range(len(loaded) + 1) if f"adapter{i}" not in loaded)
        else:
            name = Path(source).stem
    family = detect_family(pipe)
    arch = file_architecture(parsed)
    if family.name == "sd3" and weights is not None:
        raise ValueError("block weights (LoRA Block Weight's syntax) are defined for the SD 1.x/2.x/XL UNets' blocks, "
                         "not for SD 3.x's transformer; leave block_weights out")
    if arch is not None and arch.startswith("SD3") != (family.name == "sd3"):  # their text encoders share names
        raise ArchitectureMismatchError(
            f"{parsed.source} was made for {arch}; this pipeline is {family.label}. Nothing was changed; use a base "
            "model of the architecture the file was trained on.")
    m = _match_sd3(pipe, parsed, merge) if family.name == "sd3" else _match_unet_family(pipe, parsed, family, merge)
    layers, bypass_why, cannot, unmatched = m.layers, m.bypass_why, m.cannot, m.unmatched
    missing_parts, mismatched, duplicates = m.missing_parts, m.mismatched, m.duplicates

    if cannot:
        raise UnsupportedWeightError(
            f"{parsed.source}: {len(cannot)} layers cannot take the adapter, merged or in the forward: "
            + "; ".join(cannot[:3]) + ". Load the pipeline without that quantization. Nothing was changed.")
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
    if duplicates:
        raise AdapterFileError(
            f"{parsed.source}: {len(duplicates)} layers are named twice in the file: {'; '.join(duplicates[:5])}. "
            "It is ambiguous which to use; nothing was changed. Re-export the file with one name per layer."
        )
    if not layers:
        raise ArchitectureMismatchError(
            f"{parsed.source}: none of its {len(parsed.modules)} modules match a layer of this {family.label} pipeline "
            f"(file {made_for if arch else 'of unknown architecture'}; first keys: {', '.join(list(parsed.modules)[:3])}). "
            "Nothing was changed."
        )
    unsupported = _check_leftovers(parsed, unmatched, strict)

    reg = _registry(pipe, create=True)
    if name in reg.adapters:
        remove_loha(pipe, name)
    adapter = _Adapter(
        name=name,
        unet_strength=float(strength if unet_strength is None else unet_strength),
        te_strength=float(strength if text_encoder_strength is None else text_encoder_strength),
        layers=layers,
        bypassed=set(bypass_why),
    )
    adapter.set_block_weights(weights, getattr(_denoiser(pipe), "config", None))
    reg.adapters[name] = adapter
    try:
        for key, mod in layers.items():
            module = m.models[key[0]].get_submodule(key[1])
            if key in bypass_why:
                if key not in reg.bypass:
                    reg.bypass[key] = BypassSlot(module)
                reg.bypass[key].add(name, mod)
                continue
            slot = reg.slots.get(key)
            if slot is None:
                slot = reg.slots[key] = _Slot(module, _take_original(module.weight))
            slot.adapters.append(name)
        reg.recompute(layers)
    except BaseException:
        remove_loha(pipe, name)  # never leave a half-merged adapter behind
        raise

    patched: dict[str, int] = {p: 0 for p in m.models}
    for part, _ in layers:
        patched[part] += 1
    reasons = dict(Counter(bypass_why.values()))
    paths = {key: BYPASS if key in bypass_why else MERGED for key in layers}
    return ApplyReport(name, patched, unmatched, unsupported, arch, paths, reasons)


def _check_leftovers(parsed: ParsedFile, unmatched: list[str], strict: bool) -> list[str]:
    """What of the file will not be applied (unmatched modules, algorithms sd-loha does not merge, unknown
    parameters): an error with strict=True, else warnings. Returns the unsupported modules' names."""
    unsupported = sorted(parsed.unsupported)
    if strict and (unmatched or unsupported or parsed.ignored):
        problems = []
        if unmatched:
            problems.append(f"{len(unmatched)} modules match no layer of this pipeline: "
                            + ", ".join(unmatched[:20]) + (" …" if len(unmatched) > 20 else ""))
        if unsupported:
            problems.append(f"{len(unsupported)} modules use an algorithm sd-loha does not merge: "
                            + ", ".join(unsupported[:20]) + (" …" if len(unsupported) > 20 else ""))
        if parsed.ignored:
            problems.append(f"{len(parsed.ignored)} modules carry parameters sd-loha does not know: "
                            + ", ".join(f"{n} ({', '.join(p)})" for n, p in list(parsed.ignored.items())[:5]))
        raise AdapterFileError(f"{parsed.source} (strict=True): " + "; ".join(problems)
                               + ". Nothing was changed; pass strict=False to apply the rest.")
    if unmatched:
        logger.warning("%s: %d modules match no layer and were skipped: %s", parsed.source, len(unmatched),
                       ", ".join(unmatched[:20]) + (" …" if len(unmatched) > 20 else ""))
    if unsupported:
        logger.warning("%s: %d modules use an algorithm sd-loha does not merge and were skipped: %s", parsed.source,
                       len(unsupported), ", ".join(unsupported[:20]) + (" …" if len(unsupported) > 20 else ""))
    if parsed.ignored:
        logger.warning("%s: %d modules carry parameters sd-loha does not know, which were ignored: %s", parsed.source,
                       len(parsed.ignored), ", ".join(f"{n} ({', '.join(p)})" for n, p in list(parsed.ignored.items())[:5]))
    return unsupported


def _bypass_reason(module: nn.Module, merge: bool, mod: AdapterModule, cannot: list[str], label: str) -> str | None:
    """Why this layer takes the bypass path (None: it is merged). Layers where neither path works are added to
    `cannot`: DoRA (which needs the weight's norm) on a weight sd-loha cannot read."""
    problem = weight_problem(module)
    if problem is None and merge:
        return None
    unreadable = dora_problem(module) if mod.dora_scale is not None else None
    if unreadable is not None:
        cannot.append(f"{label} {unreadable} (its DoRA needs the weight's norm)")
    if problem is None:
        return "merge=False"
    return problem.removeprefix("is a ").removeprefix("stores its weight as ")


def _check_strengths(**values: float | None) -> None:
    for key, value in values.items():
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(f"{key} must be a finite number, got {value!r}")


def set_loha_strength(
    pipe: Any,
    name: str,
    strength: float | None = None,
    *,
    unet_strength: float | None = None,
    text_encoder_strength: float | None = None,
    block_weights: BlockWeightsLike | None | object = KEEP_BLOCK_WEIGHTS,
) -> None:
    """Change one loaded adapter's strength (UNet and text encoder together, or each on its own) and/or its
    block weights (None: no block weights; left out: unchanged). Exact: recomputed from the original weights; on
    bypassed layers only the numbers the hooks read change (no weight is written)."""
    _check_strengths(strength=strength, unet_strength=unet_strength, text_encoder_strength=text_encoder_strength)
    keep = block_weights is KEEP_BLOCK_WEIGHTS
    weights = None if keep or block_weights is None else parse_block_weights(block_weights)  # type: ignore[arg-type]
    reg = _registry(pipe)
    if reg is None or name not in reg.adapters:
        raise KeyError(f"no adapter named {name!r} is loaded; loaded: {', '.join(list_loha(pipe)) or 'none'}")
    adapter = reg.adapters[name]
    if not keep:
        adapter.set_block_weights(weights, getattr(_denoiser(pipe), "config", None))
    if strength is not None:
        adapter.unet_strength = adapter.te_strength = float(strength)
    if unet_strength is not None:
        adapter.unet_strength = float(unet_strength)
    if text_encoder_strength is not None:
        adapter.te_strength = float(text_encoder_strength)
    reg.recompute(adapter.layers)


def keep_merged(pipe: Any) -> None:
    """Keep the merged weights as the model's own and drop the clean originals kept for strength changes and
    removal (up to a second copy of the patched layers): afterwards the pipeline no longer knows its adapters.
    Refused while an adapter is on the bypass path: it is in no weight to keep."""
    reg = _registry(pipe)
    if reg is not None and reg.bypass:
        names = sorted({n for slot in reg.bypass.values() for n in slot.entries})
        raise ValueError(f"adapters {', '.join(names)} are added in the forward (bypass) on {len(reg.bypass)} layers, "
                         "not merged into weights; keep_merged needs a pipeline in fp32/fp16/bf16 with merge=True")
    if reg is not None:
        delattr(_denoiser(pipe), REGISTRY_ATTR)


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
            # (A failed apply cleans up here too, before every layer got its entry.)
            if key in adapter.bypassed and key in reg.bypass and n in reg.bypass[key].entries:
                reg.bypass[key].remove(n)
            elif key in reg.slots and n in reg.slots[key].adapters:
                reg.slots[key].adapters.remove(n)
        reg.recompute(adapter.layers)
        for key in adapter.layers:
            if key in reg.slots and not reg.slots[key].adapters:
                del reg.slots[key]  # weight is the original again; drop the clean copy and any spare buffer
            if key in reg.bypass and not reg.bypass[key].entries:
                reg.bypass.pop(key).close()  # the layer runs exactly its own forward again


def loha_block_weights(pipe: Any, name: str) -> BlockWeights | None:
    """The block weights a loaded adapter is merged with (None: none)."""
    reg = _registry(pipe)
    if reg is None or name not in reg.adapters:
        raise KeyError(f"no adapter named {name!r} is loaded; loaded: {', '.join(list_loha(pipe)) or 'none'}")
    return reg.adapters[name].block_weights


def list_loha(pipe: Any) -> dict[str, tuple[float, float]]:
    """Loaded adapters: name -> (UNet strength, text-encoder strength)."""
    reg = _registry(pipe)
    return {n: (a.unet_strength, a.te_strength) for n, a in reg.adapters.items()} if reg else {}
