"""LoHA (or mixed LoHA / LoRA / LoCon) files as kohya-format LoRA / LoCon files, by truncated SVD of each ΔW.

Each module's ΔW is the one apply_loha merges (merge.merge_delta: fp32, alpha / rank folded in). Its SVD
ΔW = U S Vᵀ gives the best rank-r approximation in the Frobenius norm (Eckart–Young); we write
lora_up = U_r √S_r · c and lora_down = √S_r V_rᵀ · c, so (alpha / r) · up @ down = ΔW_r. The singular values
are split evenly between the factors so neither holds the whole dynamic range (fp16 files).

Every module gets the same alpha, the largest rank written (so a file of one rank has alpha = rank, scale 1),
and c = √(r / alpha) folds each module's own alpha / r back in. One alpha because diffusers' kohya loader
names per-module alphas of attention layers `…to_k_lora.down.weight.alpha` (lora_conversion_utils.
_get_alpha_name splits at ".lora." only), so PEFT's alpha_pattern misses them and those layers get the
file's most common alpha instead: with alpha = rank per module, a layer whose rank is not the most common
one would load at the wrong scale.

Linear layers get 2-D factors, convs conv-shaped ones (down (r, in, kh, kw), up (out, r, 1, 1)), 1×1 convs
included: diffusers' loader refuses 2-D factors for a conv. A flat LoHA factor (r, in·kh·kw) does not say
whether it belongs to a Linear, a 1×1 conv or which k×k conv, so each module's weight shape comes from,
in this order: the base model (`model`), the file's own shapes where they say it (Tucker cores, 4-D factors,
text-encoder layers, which are all Linear), and the real architecture the file was made for (its UNet built
on the meta device, names from naming.py's tables); what none of them knows is an error asking for `model`.

An SD 3.x file (any form of sd3_names.FORMS) is converted in the layout its LoRA is for: `form="kohya"` (kohya
sd-scripts / ComfyUI) in the original MMDiT layout, one LoRA per fused qkv; `form="diffusers"` (diffusers'
``load_lora_weights``, PEFT) on diffusers' split q / k / v, each layer's own ΔW taken exactly from the fused
module (sd3_convert.in_layout) before its SVD, alpha / rank folded into lora_B as diffusers reads it.

DoRA modules (`dora_scale`) are not a low-rank ΔW: their merged weight W' = (W + ΔW)·m / ||W + ΔW|| depends
on the base weight W. With the base model we convert W' − W, the change sd-loha, A1111 and ComfyUI make at
strength 1; since they apply a strength s as W + s·(W' − W), the LoRA gives the same weights at every strength
for that base model alone (not on another fine-tune of it, nor stacked over another adapter, where W differs).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from .architectures import UNET_ARCHITECTURES, meta_pipeline
from .blocks import OUTSIDE_BLOCKS, block_order, file_block, layer_block_id
from .formats import load_adapter
from .io import (
    AdapterFileError,
    AdapterModule,
    ParsedFile,
    addnet_hash,
    save_safetensors_atomic,
)
from .merge import merge_delta
from .model_names import ModelLayers, file_architecture
from .naming import LYCORIS_PREFIX, PART, name_part
from .ops import apply_dora
from .sd3_convert import in_layout, to_form
from .sd3_names import (FORMS, TRANSFORMER, SD3Names, architecture_names, fitting_architectures, form_name,
                        read_sd3, sd3_file_evidence)

# Source metadata still true of the LoRA: kohya's training record (data, base model) and the modelspec fields
# that describe what it draws. Not the network's own keys (ss_network_*: algo, dims, args), the source's hashes,
# nor the modelspec fields that describe the source file (implementation, hash_sha256, date; architecture is
# rewritten to .../lora).
_KEPT_METADATA = re.compile(r"^(ss_(?!network_|new_|sd_model_hash|new_sd_model_hash)|modelspec\.(title|author|"
                            r"description|license|usage_hint|trigger_phrase|tags|thumbnail|resolution|"
                            r"prediction_type|timestep_range|encoder_layer|sai_model_spec)$)")


@dataclass
class LayerConversion:
    """One converted module: its rank and how much of ΔW the rank keeps."""

    name: str  # the module name written
    source_name: str  # its name in the source file
    part: str  # "unet" | "te" | "te1" | "te2"
    block: str  # its LoRA Block Weight id (BASE = text encoders, IN00..IN11, M00, OUT00..OUT11) or "other"
    shape: tuple[int, ...]  # the layer's weight shape
    rank: int  # rank written
    max_rank: int  # min(out, in·kh·kw): the rank that is exact
    energy: float  # Σ_{i<r} σ_i² / Σ σ_i²: the fraction of ||ΔW||² the rank keeps
    delta_norm: float  # ||ΔW||_F
    error_norm: float  # ||ΔW − up @ down||_F, of the factors as written (their dtype included)

    @property
    def relative_error(self) -> float:
        return self.error_norm / self.delta_norm if self.delta_norm > 0 else 0.0


@dataclass
class ConversionReport:
    source: str
    target: str  # "lora"
    layers: list[LayerConversion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a loader of the written file should know

    def _grouped(self, key) -> dict[str, float]:
        sums: dict[str, list[float]] = {}
        for layer in self.layers:
            s = sums.setdefault(key(layer), [0.0, 0.0])
            s[0] += layer.error_norm ** 2
            s[1] += layer.delta_norm ** 2
        return {k: math.sqrt(e / d) if d > 0 else 0.0 for k, (e, d) in sums.items()}

    @property
    def blocks(self) -> dict[str, float]:
        """Relative Frobenius error per block (LoRA Block Weight's ids, in its order):
        sqrt(Σ ||ΔW − ΔW_r||²) / sqrt(Σ ||ΔW||²) over its layers."""
        return dict(sorted(self._grouped(lambda layer: layer.block).items(), key=lambda kv: block_order(kv[0])))

    @property
    def total(self) -> float:
        """The same over every layer of the file."""
        return self._grouped(lambda layer: "all").get("all", 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "target": self.target, "total_relative_error": self.total,
            "blocks": self.blocks, "notes": self.notes,
            "layers": [{"name": x.name, "source_name": x.source_name, "part": x.part, "block": x.block,
                        "shape": list(x.shape), "rank": x.rank, "max_rank": x.max_rank, "energy": x.energy,
                        "relative_error": x.relative_error} for x in self.layers],
        }

    def __str__(self) -> str:
        ranks = [x.rank for x in self.layers] or [0]
        lines = [f"{self.source} -> {self.target}: {len(self.layers)} layers, rank {min(ranks)}"
                 + (f"..{max(ranks)}" if max(ranks) != min(ranks) else "")
                 + f", relative error {self.total:.3g} overall"]
        lines += [f"note: {n}" for n in self.notes]
        lines.append("relative error per block:")
        lines += [f"  {b:<28}{e:.3g}" for b, e in self.blocks.items()]
        lines.append("per layer (rank / max rank, energy kept, relative error):")
        lines += [f"  {x.name}: {x.rank}/{x.max_rank}, {x.energy:.6f}, {x.relative_error:.3g}" for x in self.layers]
        return "\n".join(lines)


def choose_rank(singular_values: torch.Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """The rank to keep: `rank` clipped to the number of singular values, or the smallest r whose
    Σ_{i<r} σ_i² is at least `energy` of Σ σ_i² (at least 1: a LoRA module has rank ≥ 1)."""
    n = int(singular_values.numel())
    if rank is not None:
        return max(1, min(int(rank), n))
    s2 = singular_values.double() ** 2
    total = float(s2.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(s2, 0) / total
    # A small slack so that energy=1.0 is met by the full rank despite the cumsum's rounding.
    return min(n, int((kept < energy - 1e-12).sum()) + 1)


def _check_target(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise ValueError("convert to lora: give exactly one of rank (a fixed rank per layer) or energy "
                         "(the fraction of each layer's squared singular values to keep)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"convert to lora: rank must be a whole number >= 1, got {rank!r}")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise ValueError(f"convert to lora: energy must be in (0, 1] (e.g. 0.99 keeps 99% of each layer's "
                         f"squared singular values), got {energy!r}")


@cache
def _reference_layers(architecture: str) -> ModelLayers:
    """The layers of a real architecture's models, built on the meta device (shapes, no weights)."""
    return ModelLayers(meta_pipeline(architecture))


def _shape_from_factors(mod: AdapterModule, part: str | None) -> tuple[int, ...] | None:
    """The layer's weight shape where the module's own tensors say it, else None."""
    t = mod.tensors
    out = mod.out_features()
    if mod.algo == "loha":
        if mod.tucker:
            return (out, int(t["hada_w1_b"].shape[1]), *t["hada_t1"].shape[2:])
        if t["hada_w1_b"].dim() == 4:  # some trainers write flat conv factors 4-D: (r, in, kh, kw)
            return (out, *t["hada_w1_b"].shape[1:])
    else:
        down = t["lora_down.weight"]
        if "lora_mid.weight" in t:
            return (out, int(down.shape[1]), *t["lora_mid.weight"].shape[2:])
        if down.dim() == 4:
            return (out, *down.shape[1:])
    if part in ("te", "te1", "te2"):  # CLIP text encoders: sd-loha and kohya adapt only their Linears
        return (out, mod.in_features())
    return None


@dataclass
class _Layer:
    part: str
    shape: tuple[int, ...]
    weight: torch.Tensor | None  # the base weight, when a model was given
    block: str  # its LoRA Block Weight id (blocks.py), or blocks.OUTSIDE_BLOCKS


def _file_layer(name: str, mod: AdapterModule, arch: str | None) -> _Layer | None:
    """The layer as the file alone says it: its own shapes, else the real models of the file's architecture."""
    part = name_part(name)
    shape = _shape_from_factors(mod, part)
    if shape is None and arch in UNET_ARCHITECTURES:
        match = _reference_layers(arch).match(name)
        if match is not None:
            part, shape = match.part, tuple(match.weight.shape)
    if shape is None or part is None:
        return None
    return _Layer(part, shape, None, file_block(name, arch))


def _model_layer(name: str, model_layers: ModelLayers, unet_config: Any) -> _Layer | None:
    match = model_layers.match(name)
    if match is None:
        return None
    block = layer_block_id(match.part, match.path, unet_config) or OUTSIDE_BLOCKS
    return _Layer(match.part, tuple(match.weight.shape), match.weight, block)


def _resolve(parsed: ParsedFile, model: Any | None) -> dict[str, _Layer]:
    """Each module's part and weight shape (and base weight with a model); an error lists what is unknown."""
    model_layers = ModelLayers(model) if model is not None else None
    arch = file_architecture(parsed)
    resolved: dict[str, _Layer] = {}
    unknown: list[str] = []
    for name, mod in parsed.modules.items():
        layer = (_model_layer(name, model_layers, model.unet.config) if model_layers is not None
                 else _file_layer(name, mod, arch))
        if layer is None or mod.shape_problem(layer.shape) is not None:
            unknown.append(name)
            continue
        resolved[name] = layer
    if unknown:
        if model is not None:
            why = "match no layer of the given model (or differ from it in shape): is it the base the file was made for?"
        else:
            known = (f"the real {arch} models (the architecture the file names) have no such layers of these shapes"
                     if arch in UNET_ARCHITECTURES else "the file's architecture is unknown")
            why = (f"have flat factors that do not say whether the layer is a Linear or a conv (nor its kernel), and "
                   f"{known}. Pass the base model (--model BASE, or model= in Python) so each layer's shape is "
                   "read from it")
        raise AdapterFileError(f"{parsed.source}: {len(unknown)} modules {why}; e.g. {', '.join(unknown[:5])}")
    return resolved


#: the forms `loha_to_lora` writes an SD 3.x LoRA in: form -> the form its modules are named in while converting
#: (one of the same layout, kohya-style names, whose LoRA parameters are sd-loha's own)
SD3_LORA_FORMS: dict[str, str] = {"kohya": "kohya", "diffusers": "legacy"}


def _sd3_names(parsed: ParsedFile, model: Any | None) -> SD3Names:
    """The SD3 layers a file names: the base pipeline's, else the real architecture its names and shapes fit."""
    if model is not None:
        return SD3Names.from_pipeline(model)
    evidence = sd3_file_evidence(parsed)
    fits = fitting_architectures(evidence) if evidence is not None else []
    if not fits:  # a size sd-loha does not know (a tiny test model, a fine-tune of another width)
        raise AdapterFileError(f"{parsed.source}: an SD 3.x file of a size no real SD 3.x architecture has; pass the "
                               "base model (--model BASE, or model= in Python) so each layer's shape is read from it")
    return architecture_names(fits[0])  # the Mediums share every layer a file naming both can hold


def _sd3_weight(names: SD3Names, part: str, path: str, layout: str) -> torch.Tensor:
    """The base weight of a layer in the file's layout: a fused qkv's q|k|v rows, swapped halves in its order."""
    model = names.models[part]
    if part != TRANSFORMER or layout == "diffusers":
        return model.get_submodule(path if part == TRANSFORMER or part == "te3" else _model_path(model, path)).weight
    pieces = []
    for t in names.layout[path]:
        w = model.get_submodule(t.path).weight
        pieces.append(torch.cat(w.chunk(2, dim=0)[::-1]) if t.swap_halves else w)
    return torch.cat(pieces)


def _sd3_block(part: str, path: str) -> str:
    """The report's group of an SD 3.x layer: BASE (text encoders, as LoRA Block Weight calls them), the joint
    block (joint_blocks_N / transformer_blocks_N), or OUTSIDE_BLOCKS (embedders, final layer)."""
    if part != TRANSFORMER:
        return "BASE"
    m = re.match(r"(joint_blocks|transformer_blocks)\.(\d+)\.", path)
    return f"{m.group(1)}_{m.group(2)}" if m else OUTSIDE_BLOCKS


def _model_path(model: Any, path: str) -> str:
    # A CLIP path as files write it (text_model.…) in a model without that wrapper (transformers >= 5.6)
    return path if hasattr(model, "text_model") else path.removeprefix("text_model.")


def _sd3_resolve(parsed: ParsedFile, model: Any | None, form: str) -> tuple[ParsedFile, dict[str, _Layer], SD3Names]:
    """An SD 3.x file's modules moved to `form`'s layout (sd3_convert.in_layout), named in SD3_LORA_FORMS[form],
    with each layer's part, shape, base weight (with a model) and block label."""
    if form not in SD3_LORA_FORMS:
        raise ValueError(f"convert to lora: an SD 3.x LoRA is written in form {' or '.join(SD3_LORA_FORMS)}, "
                         f"got {form!r}")
    names = _sd3_names(parsed, model)
    naming = SD3_LORA_FORMS[form]
    layout = FORMS[naming].layout
    modules: dict[str, AdapterModule] = {}
    layers: dict[str, _Layer] = {}
    for (part, path), mod in in_layout(parsed, names, layout).items():
        name = form_name(naming, part, path)
        weight = _sd3_weight(names, part, path, layout)
        modules[name] = replace(mod, name=name)
        layers[name] = _Layer(part, tuple(weight.shape), weight if model is not None else None, _sd3_block(part, path))
    return ParsedFile(modules, dict(parsed.metadata), {}, parsed.source), layers, names


def _out_name(name: str, part: str) -> str:
    """kohya's name: LyCORIS's generic `lycoris_<path>` becomes the resolved part's prefix."""
    if name.startswith(LYCORIS_PREFIX + "_"):
        return f"{PART[part].prefix}_{name[len(LYCORIS_PREFIX) + 1:]}"
    return name


def _delta(mod: AdapterModule, layer: _Layer) -> torch.Tensor:
    """The module's ΔW in fp32 as apply_loha merges it at strength 1 (DoRA: W' − W of the base weight)."""
    delta = merge_delta(mod, layer.shape)
    if mod.dora_scale is None:
        return delta
    if layer.weight is None:
        raise AdapterFileError(f"{mod.name} has dora_scale (DoRA): its change depends on the base weight, so "
                               "converting it needs the base model (--model BASE, or model= in Python)")
    w = layer.weight.detach().to(device="cpu", dtype=torch.float32)
    return apply_dora(w, delta, mod.dora_scale.to(torch.float32)) - w


@cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None (another C library)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed_memory() -> None:
    """Hand the memory of freed layer deltas back to the system. The deltas (MiBs each) come from the C heap once
    glibc has raised its mmap threshold, and the small factors kept between them leave holes that later deltas do
    not always fit: without this, resident memory grew by about a delta per layer (measured on 48 layers of
    512x2048), as if every delta were kept."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _factors(delta: torch.Tensor, rank: int | None, energy: float | None) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """fp32 up (out, r) and down (r, in·kh·kw) with up @ down = the best rank-r ΔW, the energy kept, the full rank."""
    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
    r = choose_rank(s, rank, energy)
    s2 = s.double() ** 2
    total = float(s2.sum())
    kept = float(s2[:r].sum()) / total if total > 0 else 1.0
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r], kept, int(s.numel())


def _metadata(parsed: ParsedFile, rank: int | None, energy: float | None, ranks: list[int]) -> dict[str, str]:
    meta = {k: v for k, v in parsed.metadata.items() if _KEPT_METADATA.match(k)}
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[0]) if len(set(ranks)) == 1 else "Dynamic",
        "ss_network_alpha": str(max(ranks)),  # one alpha for every module (module docstring)
        "sd_loha_converted_from": Path(parsed.source).name,
        "sd_loha_conversion": f"lora, rank={rank}" if rank is not None else f"lora, energy={energy}",
    })
    if Path(parsed.source).is_file():
        meta["sd_loha_converted_from_hash"] = addnet_hash(parsed.source)
    if "modelspec.architecture" in parsed.metadata:  # e.g. "stable-diffusion-v1/lycoris" -> ".../lora"
        meta["modelspec.architecture"] = parsed.metadata["modelspec.architecture"].split("/")[0] + "/lora"
    return meta


def loha_to_lora(
    source: str | os.PathLike | Mapping[str, torch.Tensor] | ParsedFile,
    rank: int | None = None,
    energy: float | None = None,
    model: Any | None = None,
    dtype: torch.dtype | None = None,
    form: str = "kohya",
) -> tuple[dict[str, torch.Tensor], dict[str, str], ConversionReport]:
    """A LoHA file (or one mixing LoHA with LoRA/LoCon modules) as kohya LoRA/LoCon tensors, metadata and report.

    Give exactly one of `rank` (every layer at that rank, clipped to the layer's full rank) or `energy` (per
    layer the smallest rank keeping that fraction of Σσ²). `model`: the base pipeline or its name/path for
    load_pipeline, needed when the file's shapes and architecture do not say each layer's shape, and for
    DoRA modules. `dtype`: of the written factors (default: the source factors' dtype). Keys are
    `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha` (= rank). `form`, for an SD 3.x file:
    "kohya" (those keys, the original MMDiT layout) or "diffusers" (``transformer.<path>.lora_A.weight`` /
    ``lora_B.weight`` with alpha / rank folded in, as ``StableDiffusion3Pipeline.load_lora_weights`` reads them).
    """
    _check_target(rank, energy)
    parsed = source if isinstance(source, ParsedFile) else load_adapter(source)
    if parsed.unsupported:
        raise AdapterFileError(f"{parsed.source}: {len(parsed.unsupported)} modules use an algorithm sd-loha does "
                               f"not convert (e.g. {', '.join(sorted(parsed.unsupported)[:3])}); the LoRA would "
                               "silently lack them")
    if isinstance(model, (str, os.PathLike)):
        from .models import load_pipeline

        model = load_pipeline(str(model))
    dora = [n for n, m in parsed.modules.items() if m.dora_scale is not None]
    if dora and model is None:
        raise AdapterFileError(f"{parsed.source}: {len(dora)} modules have dora_scale (DoRA), e.g. {dora[0]}: their "
                               "change depends on the base weight, so converting them needs the base model "
                               "(--model BASE, or model= in Python)")
    sd3_names = None
    if sd3_file_evidence(parsed) is not None:
        parsed, layers, sd3_names = _sd3_resolve(parsed, model, form)
    else:
        if form != "kohya":
            raise ValueError(f"convert to lora: form {form!r} is for SD 3.x files; an SD 1.x/2.x/XL LoRA is kohya's")
        layers = _resolve(parsed, model)
    # One layer at a time: a layer's fp32 ΔW lives only while its SVD runs (pass 1) and while the error of its
    # written factors is measured (pass 2, ΔW computed again), so memory holds the factors, never every ΔW.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, int, float]] = {}
    with torch.no_grad():
        for name, mod in parsed.modules.items():
            delta = _delta(mod, layers[name])
            factors[name] = (*_factors(delta, rank, energy), float(delta.norm()))
            del delta
            _release_freed_memory()
        # One alpha for the whole file (see the module docstring: diffusers drops per-module alphas of
        # attention layers); alpha / r is folded back into each module's factors.
        alpha = max(int(up.shape[1]) for up, *_ in factors.values())
        tensors: dict[str, torch.Tensor] = {}
        report = ConversionReport(parsed.source, "lora")
        for name, mod in parsed.modules.items():
            layer = layers[name]
            up, down, kept, max_rank, delta_norm = factors.pop(name)
            r = int(down.shape[0])
            out_dtype = dtype or next(iter(mod.tensors.values())).dtype
            root = math.sqrt(r / alpha)
            up, down = (up * root).to(out_dtype), (down * root).to(out_dtype)
            error = _delta(mod, layer).reshape(up.shape[0], -1).sub_((up.float() @ down.float()).mul_(alpha / r))
            out_name = _out_name(name, layer.part)
            if f"{out_name}.alpha" in tensors:
                raise AdapterFileError(f"{parsed.source}: two modules are both named {out_name} once converted")
            if len(layer.shape) == 4:  # conv-shaped factors, 1x1 included: diffusers refuses 2-D ones for a conv
                up, down = up.reshape(*up.shape, 1, 1), down.reshape(r, *layer.shape[1:])
            tensors[f"{out_name}.lora_down.weight"] = down.contiguous()
            tensors[f"{out_name}.lora_up.weight"] = up.contiguous()
            tensors[f"{out_name}.alpha"] = torch.tensor(float(alpha), dtype=out_dtype)
            report.layers.append(LayerConversion(
                name=out_name, source_name=name, part=layer.part, block=layer.block,
                shape=layer.shape, rank=r, max_rank=max_rank, energy=kept, delta_norm=delta_norm,
                error_norm=float(error.norm())))
            del error
            _release_freed_memory()
    if sd3_names is not None and SD3_LORA_FORMS[form] != form:  # the same layers under the form's own names
        tensors = to_form(read_sd3(tensors, where=parsed.source), sd3_names, form)
        t5 = sum(1 for x in report.layers if x.part == "te3")
        if t5:
            report.notes.append(f"diffusers' load_lora_weights loads no T5 (text_encoder_3) LoRA: it skips the {t5} "
                                "T5 modules written here (sd-loha and OneTrainer load them)")
    metadata = _metadata(parsed, rank, energy, [x.rank for x in report.layers])
    if sd3_names is not None:
        metadata["ss_network_module"] = "networks.lora_sd3"  # kohya's SD3 LoRA module
    return tensors, metadata, report


def convert_to_lora_file(
    source: str | os.PathLike, out: str | os.PathLike, *, rank: int | None = None, energy: float | None = None,
    model: Any | None = None, dtype: torch.dtype | None = None, form: str = "kohya",
) -> ConversionReport:
    """:func:`loha_to_lora`, written atomically to `out` (a .safetensors file, with its addnet hash)."""
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"convert to lora: --out {out} must be a .safetensors file")
    if Path(source).resolve() == out.resolve():
        raise ValueError(f"convert to lora: --out {out} is the source file; write the LoRA to another file")
    _check_target(rank, energy)  # before loading a model
    if form not in SD3_LORA_FORMS:
        raise ValueError(f"convert to lora: form must be one of {', '.join(SD3_LORA_FORMS)}, got {form!r}")
    tensors, metadata, report = loha_to_lora(source, rank=rank, energy=energy, model=model, dtype=dtype, form=form)
    save_safetensors_atomic(tensors, out, metadata, with_addnet_hash=True)
    return report
