"""An SD3 adapter rewritten in another file form (sd_loha.sd3_names.FORMS), exactly; and, for a loader, what
changes each layer of a pipeline (:func:`model_layers`).

Between forms of one layout only names change. From the original layout to diffusers' a fused qkv module splits
onto q, k and v and the two (shift, scale) adaLN modules swap their halves (sd3_ops); back, split modules fuse at
their summed rank. What no module of the other layout equals, an input-column dora_scale on a fused qkv, is
refused with the reason before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .io import AdapterFileError, AdapterModule, ParsedFile
from .naming import text_encoder_canonical_path
from .sd3_names import FORMS, TRANSFORMER, SD3Layer, SD3Names, Target, form_name
from .sd3_ops import DenseSplitNeeded, fuse_rows, split_rows, swap_halves

__all__ = ["resolve", "Coupled", "model_layers", "in_layout", "to_form"]


def resolve(parsed: ParsedFile, names: SD3Names) -> dict[str, tuple[SD3Layer, AdapterModule]]:
    """file module name -> (the layers it adapts, the module), for every module of an SD3 file; an
    AdapterFileError naming those that match no layer of `names`' models."""
    resolved, unknown = {}, []
    for name, mod in parsed.modules.items():
        layer = names.match(name)
        if layer is None:
            unknown.append(name)
        else:
            resolved[name] = (layer, mod)
    if unknown:
        raise AdapterFileError(f"{parsed.source}: {len(unknown)} modules match no layer of this SD3 model "
                               f"(another size, or not SD3), e.g. {', '.join(unknown[:5])}")
    return resolved


@dataclass(frozen=True)
class Coupled:
    """A fused module no per-layer module equals (an input-column dora_scale over a fused qkv): each of its
    layers' exact change needs all their base weights, sd3_ops.dense_deltas(module, targets, weights)."""

    module: AdapterModule
    targets: tuple[Target, ...]


def model_layers(parsed: ParsedFile, names: SD3Names) -> dict[tuple[str, str], AdapterModule | Coupled]:
    """(part, module path in the pipeline's model) -> what changes that layer: an AdapterModule made for that layer
    alone (a fused qkv split exactly, swapped halves put in the model's order), or the same Coupled for every layer
    of a fused module that cannot be split. An AdapterFileError names a layer two modules adapt, or modules that
    match no layer."""
    out: dict[tuple[str, str], AdapterModule | Coupled] = {}
    for layer, mod in resolve(parsed, names).values():
        try:
            pieces: list[AdapterModule | Coupled] = list(split_rows(mod, layer.targets))
        except DenseSplitNeeded:
            pieces = [Coupled(mod, layer.targets)] * len(layer.targets)
        for t, piece in zip(layer.targets, pieces):
            if (layer.part, t.path) in out:
                raise AdapterFileError(f"{parsed.source}: layer {t.path} is adapted twice (by {mod.name} and another "
                                       "module); a file holds one module per layer")
            out[(layer.part, t.path)] = piece
    return out


def _file_path(part: str, path: str) -> str:
    # Text encoders: the path as files write it (CLIPs in transformers 4's text_model. layout).
    return path if part in (TRANSFORMER, "te3") else text_encoder_canonical_path(path)


def _claim(out: dict[tuple[str, str], AdapterModule], key: tuple[str, str], mod: AdapterModule, where: str) -> None:
    if key in out:
        raise AdapterFileError(f"{where}: layer {key[1]} is adapted twice (modules {out[key].name} and {mod.name})")
    out[key] = mod


def in_layout(parsed: ParsedFile, names: SD3Names, layout: str) -> dict[tuple[str, str], AdapterModule]:
    """Every module of an SD3 file moved to `layout` ("original" or "diffusers"), keyed by (part, path): the
    transformer's original-layout or diffusers path, a text encoder's module path as files write it."""
    if layout == "diffusers":
        moved = {}
        for (part, path), piece in model_layers(parsed, names).items():
            if isinstance(piece, Coupled):
                raise AdapterFileError(f"{parsed.source}: {piece.module.name} has a per-input-column dora_scale, a norm "
                                       "over all the fused rows, which no split module reproduces; keep the fused form")
            moved[(part, _file_path(part, path))] = piece
        return moved
    out: dict[tuple[str, str], AdapterModule] = {}
    slots: dict[str, list[AdapterModule | None]] = {}
    for layer, mod in resolve(parsed, names).values():
        if layer.part != TRANSFORMER:
            _claim(out, (layer.part, _file_path(layer.part, layer.targets[0].path)), mod, parsed.source)
        elif FORMS[layer.form].layout == "original":
            _claim(out, (TRANSFORMER, layer.original), mod, parsed.source)
        else:
            group = slots.setdefault(layer.original, [None] * len(names.layout[layer.original]))
            index = layer.slot or 0
            if group[index] is not None:
                raise AdapterFileError(f"{parsed.source}: layer {layer.targets[0].path} is adapted twice")
            group[index] = mod
    for original, group in slots.items():
        targets = names.layout[original]
        name = form_name("kohya", TRANSFORMER, original)
        fused = fuse_rows(group, [t.stop - t.start for t in targets], name) if len(targets) > 1 else group[0]
        _claim(out, (TRANSFORMER, original), swap_halves(fused) if targets[0].swap_halves else fused, parsed.source)
    return out


def _tensors(mod: AdapterModule, name: str, form_key: str) -> dict[str, torch.Tensor]:
    form = FORMS[form_key]
    out: dict[str, torch.Tensor] = {}
    spell = {"lora_down.weight": form.lora_params[0], "lora_up.weight": form.lora_params[1]}
    fold = form.alpha_in_up and mod.algo == "lora"
    for k, v in mod.tensors.items():
        if fold and k == "lora_up.weight":
            v = v.float() * mod.scale
        out[f"{name}.{spell.get(k, k)}"] = v
    if mod.alpha is not None and not fold:
        out[f"{name}.alpha"] = torch.tensor(float(mod.alpha))
    if mod.scale_override is not None and not fold:
        out[f"{name}.scale"] = torch.tensor(float(mod.scale_override))
    if mod.dora_scale is not None:
        out[f"{name}.dora_scale"] = mod.dora_scale
    return out


def to_form(parsed: ParsedFile, names: SD3Names, form: str) -> dict[str, torch.Tensor]:
    """The tensors of an SD3 file (any form, read by sd3_names.read_sd3 / formats.load_adapter) in `form` (a
    FORMS key), exact; `names` (SD3Names of the pipeline or architectures.meta_pipeline) gives the layers. An
    AdapterFileError, before anything is written, for a part the form has no names for (OneTrainer's ORIGINAL
    holds the transformer only, ...) or a module the target layout cannot hold exactly."""
    target = FORMS[form]
    moved: Mapping[tuple[str, str], AdapterModule] = in_layout(parsed, names, target.layout)
    missing = sorted({part for part, _ in moved if part not in target.prefixes})
    if missing:
        raise AdapterFileError(f"{parsed.source}: the {form} form ({target.writers}) has no names for the "
                               f"{', '.join(missing)} modules of this file; choose another form")
    out: dict[str, torch.Tensor] = {}
    for (part, path), mod in moved.items():
        out.update(_tensors(mod, form_name(form, part, path), form))
    # Split q / k / v share their B factors (and slice one A): each its own tensor, as safetensors saves no shared
    # storage
    seen: set[int] = set()
    for key, value in out.items():
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            out[key] = value.clone()
        seen.add(ptr)
    return out
