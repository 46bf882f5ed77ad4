"""PEFT LoHa adapters (``peft.LoHaConfig``): read them as kohya-format modules, and write kohya files as them.

PEFT saves a folder: ``adapter_model.safetensors`` with keys ``base_model.model.<module path>.hada_w1_a`` (the
adapter name removed; a raw model state dict has ``...hada_w1_a.<adapter>``), and ``adapter_config.json`` with
``r``, ``alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_effective_conv2d``, ``target_modules``, ... The file
holds no alpha: PEFT's scale is ``alpha / r`` with both taken from the config per layer
(``peft/tuners/loha/model.py::_create_and_replace``). Its factors are LyCORIS's layout exactly
(``peft/tuners/loha/layer.py``): Linear and flat convs ``hada_w_a`` (out, r), ``hada_w_b`` (r, in·kh·kw); with
``use_effective_conv2d`` a k×k conv (k > 1) gets ``hada_w_a`` (r, out), ``hada_w_b`` (r, in), ``hada_t`` (r, r, kh,
kw), rebuilt as W[o, c] = Σ t[j, l] w_a[j, o] w_b[l, c]; 1×1 convs stay flat. So converting renames keys, reshapes
flat factors to 2-D and moves alpha between the file and the config; no number changes.

A pipeline's adapters are one PEFT folder per model, in diffusers' pipeline layout (``unet/``,
``text_encoder/``, ``text_encoder_2/``); a single folder (or its safetensors file with the JSON beside it) is read
too, its model told from its module names. PEFT's ``module_dropout`` and ``rank_dropout`` act only in training.

SD 3.x adapters are PEFT LoHa on diffusers' models (``transformer/``, ``text_encoder/`` … ``text_encoder_3/``), so
on the split q / k / v: a kohya file's fused qkv is split exactly on the way there (sd3_convert.in_layout) and
fused back at the summed rank on the way to kohya (sd3_convert.to_form), with the base's or the real
architecture's layers (sd3_names) naming them.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import UNET_ARCHITECTURES, meta_pipeline
from .atomic import write_folder_atomic, write_text_atomic
from .io import LOHA_PARAMS, TUCKER_PARAMS, AdapterFileError, AdapterModule, ParsedFile, parse_state_dict, \
    read_safetensors, save_safetensors_atomic
from .model_names import ModelLayers, file_architecture
from .naming import PART, PARTS, SD3_PART, SD3_PARTS, kohya_name, text_encoder_save_name, unet_save_name
from .sd3_convert import in_layout, to_form
from .sd3_names import (SD3Names, fitting_architectures, form_name, is_sd3_state_dict, read_sd3,
                        sd3_file_evidence)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_TYPE = "LOHA"
PEFT_PREFIX = "base_model.model."  # PeftModel's wrapper path in saved keys
PEFT_PARAMS = LOHA_PARAMS + TUCKER_PARAMS
# Module paths that are a CLIP text encoder's (transformers 4 keeps them under text_model., 5 at the root).
_TEXT_ENCODER_ROOTS = ("text_model.", "encoder.layers.", "embeddings.", "final_layer_norm", "text_projection")


@dataclass(frozen=True)
class PeftSource:
    """One PEFT adapter of a pipeline: which model it adapts (a pipeline attribute, or None: tell from names)."""

    pipeline_attr: str | None
    config_path: Path
    weights_path: Path


def _pipeline_attrs() -> tuple[str, ...]:
    return tuple(dict.fromkeys(p.pipeline_attr for p in (*PARTS, *SD3_PARTS)))


def _has_peft_keys(path: Path) -> bool:
    """Whether a safetensors file's keys are PEFT's: under PeftModel's ``base_model.model.`` wrapper, or an
    adapter parameter after a dotted module path (kohya and LyCORIS names have no dots before it). Only the
    header is read; an unreadable file is left to the kohya reader, whose errors say what is wrong."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (OSError, SafetensorError):
        return False
    for key in keys:
        module, _, param = key.rpartition(".")
        if key.startswith(PEFT_PREFIX) or (param in PEFT_PARAMS and "." in module) or ".lora_A." in key:
            return True
    return False


def peft_sources(path: str | os.PathLike) -> list[PeftSource]:
    """The PEFT adapters at `path` (empty when it is no PEFT adapter): a folder with adapter_config.json, a
    folder of pipeline subfolders (unet/, text_encoder/, ...) that have one, or a .safetensors file with
    adapter_config.json beside it that is PEFT's own (named adapter_model.safetensors, or with PEFT's keys): a
    kohya/LyCORIS file in the same folder as a PEFT adapter is kohya."""
    p = Path(path)
    if p.is_file():
        config = p.parent / PEFT_CONFIG
        peft_file = p.suffix == ".safetensors" and config.is_file() and (p.name == PEFT_WEIGHTS or _has_peft_keys(p))
        return [PeftSource(None, config, p)] if peft_file else []
    if not p.is_dir():
        return []
    if (p / PEFT_CONFIG).is_file():
        return [PeftSource(None, p / PEFT_CONFIG, p / PEFT_WEIGHTS)]
    return [PeftSource(a, p / a / PEFT_CONFIG, p / a / PEFT_WEIGHTS) for a in _pipeline_attrs()
            if (p / a / PEFT_CONFIG).is_file()]


def is_peft_adapter(path: str | os.PathLike) -> bool:
    return bool(peft_sources(path))


def pattern_key(patterns: Mapping[str, Any], module_path: str) -> str | None:
    """The rank_pattern / alpha_pattern key that applies to `module_path`: PEFT's rule
    (``peft.utils.other.get_pattern_key``): the first key, in the file's order, that matches the end of the path
    at a dot boundary as a regular expression."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def layer_rank_alpha(config: Mapping[str, Any], module_path: str) -> tuple[int, float]:
    """(r, alpha) PEFT gives the layer at `module_path` (its path inside the adapted model)."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rk, ak = pattern_key(ranks, module_path), pattern_key(alphas, module_path)
    r = ranks[rk] if rk is not None else config.get("r", 8)
    alpha = alphas[ak] if ak is not None else config.get("alpha", 8)
    return int(r), float(alpha)


def _read_config(source: PeftSource) -> dict[str, Any]:
    try:
        config = json.loads(source.config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{source.config_path}: cannot read the PEFT config ({e}); re-save the adapter "
                               "with PEFT's save_pretrained") from None
    kind = config.get("peft_type") if isinstance(config, dict) else None
    if kind != PEFT_TYPE:
        hint = " diffusers' load_lora_weights reads PEFT LoRA adapters." if kind == "LORA" else ""
        raise AdapterFileError(f"{source.config_path}: a PEFT {kind or 'unknown-type'} adapter; sd-loha reads PEFT "
                               f"LoHa adapters (peft_type {PEFT_TYPE!r}).{hint}")
    if not source.weights_path.is_file():
        raise AdapterFileError(f"{source.weights_path}: missing; a PEFT adapter folder holds {PEFT_WEIGHTS} beside "
                               f"{PEFT_CONFIG} (sd-loha never reads the pickled adapter_model.bin)")
    return config


def _split_peft_key(key: str, where: Path) -> tuple[str, str]:
    """(module path, param) of a PEFT key: ``[base_model.model.]<path>.<param>[.<adapter name>]``."""
    parts = key.split(".")
    at = [i for i, s in enumerate(parts) if s in PEFT_PARAMS]
    if len(at) != 1 or at[0] == 0 or len(parts) - at[0] > 2:
        raise AdapterFileError(f"{where}: key {key!r} is not a PEFT LoHa key (<module>.hada_w1_a/…); the file holds "
                               "another kind of adapter or modules_to_save, which sd-loha does not merge")
    path = ".".join(parts[: at[0]])
    return path.removeprefix(PEFT_PREFIX), parts[at[0]]


def _family_of(groups: Mapping[str | None, Mapping[str, Mapping[str, torch.Tensor]]]) -> str:
    """sd3 when the adapters name an SD 3.x transformer (or T5); sdxl when they name a second text encoder or a
    2048-wide cross-attention context."""
    if {"transformer", "text_encoder_3"} & set(groups) or any(
            p.startswith(("transformer.", "transformer_blocks.")) for modules in groups.values() for p in modules):
        return "sd3"
    if "text_encoder_2" in groups:
        return "sdxl"
    for modules in groups.values():
        for path, params in modules.items():
            if path.endswith(("attn2.to_k", "attn2.to_v")) and params["hada_w1_b"].shape[-1] == 2048:
                return "sdxl"
    return "sd1"


def _kohya_module_name(attr: str | None, path: str, family: str, unet_config: Any = None) -> str:
    """A PEFT module path (in the model `attr`, or in a pipeline when attr is None) as a kohya name: with the
    UNet's config the name kohya writes (LDM paths for SDXL), without it the diffusers path, which every
    family's table (and so apply_loha) also reads."""
    if attr is None:
        first, _, rest = path.partition(".")
        if first in _pipeline_attrs() and rest:  # a whole pipeline's keys: "unet.<path>", "text_encoder.<path>"
            attr, path = first, rest
        else:
            attr = "text_encoder" if path.startswith(_TEXT_ENCODER_ROOTS) else "transformer" if family == "sd3" else "unet"
    if family == "sd3":  # diffusers' pipeline names, which sd3_names reads (the "diffusers" form)
        part = next((p for p in SD3_PARTS if p.pipeline_attr == attr), None)
        if part is None:
            raise AdapterFileError(f"a PEFT adapter for {attr} cannot belong to an SD 3.x pipeline")
        return form_name("diffusers", part.name, path)
    part = next((p for p in PARTS if p.pipeline_attr == attr and family in p.families), None)
    if part is None:
        raise AdapterFileError(f"a PEFT adapter for {attr} cannot belong to a {family} pipeline")
    if part.name == "unet":
        return kohya_name(part.prefix, path) if unet_config is None else unet_save_name(path, unet_config)
    return text_encoder_save_name(path, part.prefix)


def read_peft(path: str | os.PathLike, *, family: str | None = None,
              unet_config: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A PEFT LoHa adapter (or a pipeline folder of them) as a kohya-format state dict and metadata.

    Each module gets PEFT's factors unchanged and an `alpha` with PEFT's per-layer alpha (rank_pattern and
    alpha_pattern applied), so alpha / r is PEFT's scale. `family` ("sd1", "sd2", "sdxl") decides whether
    `text_encoder` is SDXL's first text encoder; by default it is read from the adapters' modules. The UNet's
    config (`unet_config`) makes UNet names kohya's own (LDM paths on SDXL, which A1111 needs).
    """
    sources = peft_sources(path)
    if not sources:
        raise AdapterFileError(f"{path}: not a PEFT adapter (no {PEFT_CONFIG} here, beside it, or in unet/, "
                               "text_encoder/ or text_encoder_2/)")
    groups: dict[str | None, dict[str, dict[str, torch.Tensor]]] = {}
    configs: dict[str | None, dict[str, Any]] = {}
    for source in sources:
        configs[source.pipeline_attr] = _read_config(source)
        tensors, _ = read_safetensors(source.weights_path)
        modules = groups.setdefault(source.pipeline_attr, {})
        for key, value in tensors.items():
            module_path, param = _split_peft_key(key, source.weights_path)
            modules.setdefault(module_path, {})[param] = value
    family = family or _family_of(groups)
    state: dict[str, torch.Tensor] = {}
    for attr, modules in groups.items():
        for module_path, params in modules.items():
            inner = module_path.partition(".")[2] if attr is None and module_path.split(".")[0] in _pipeline_attrs() \
                else module_path
            r, alpha = layer_rank_alpha(configs[attr], inner)
            got = int(params["hada_w1_b"].shape[0]) if "hada_w1_b" in params else r
            if got != r:
                raise AdapterFileError(f"{path}: {module_path} has rank {got} in the weights but {r} in {PEFT_CONFIG} "
                                       "(r / rank_pattern); the config does not belong to these weights")
            name = _kohya_module_name(attr, module_path, family, unet_config)
            for param, value in params.items():
                state[f"{name}.{param}"] = value
            state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    meta = {"sd_loha_source_format": "peft",
            "peft_config": json.dumps({a or "": c for a, c in configs.items()}, sort_keys=True)}
    return state, meta


# ---------------------------------------------------------------------------------------------
# kohya -> PEFT
# ---------------------------------------------------------------------------------------------


def _peft_alpha(mod: AdapterModule) -> float:
    """The PEFT alpha giving this module's scale: its own alpha when it has one (so the kohya file comes back
    bit for bit), r when it has none (scale 1), scale · r for a `scale` key."""
    if mod.scale_override is not None:
        return mod.scale_override * mod.rank
    return float(mod.rank) if mod.alpha is None else mod.alpha


def _peft_factors(mod: AdapterModule, where: str) -> dict[str, torch.Tensor]:
    if mod.algo != "loha" or mod.dora_scale is not None:
        kind = "DoRA" if mod.dora_scale is not None else mod.algo
        raise AdapterFileError(f"{where}: module {mod.name} is {kind}; a PEFT LoHa adapter holds plain LoHA only, "
                               "so this file cannot be converted exactly")
    if mod.tucker:
        return dict(mod.tensors)
    # Some trainers write flat conv factors 4-D; PEFT's parameters are 2-D.
    return {k: v.reshape(v.shape[0], -1) for k, v in mod.tensors.items()}


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _peft_config(modules: Mapping[str, AdapterModule], tucker: bool, base: str | None) -> dict[str, Any]:
    """adapter_config.json for one model's modules: the commonest r and alpha, per-layer exceptions as
    full-path rank_pattern / alpha_pattern entries (checked to resolve to each layer's own values)."""
    ranks = {p: m.rank for p, m in modules.items()}
    alphas = {p: _peft_alpha(m) for p, m in modules.items()}
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    config = {
        "peft_type": PEFT_TYPE, "task_type": None, "base_model_name_or_path": base, "revision": None,
        "inference_mode": True, "init_weights": True, "r": r, "alpha": alpha,
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
        "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": tucker,
        # no keys newer PEFT versions add with a default (exclude_modules, ...): older ones refuse unknown keys
        "target_modules": sorted(modules), "layers_to_transform": None,
        "layers_pattern": None, "modules_to_save": None,
    }
    for p in modules:
        if layer_rank_alpha(config, p) != (ranks[p], alphas[p]):
            raise AdapterFileError(f"{p}: PEFT's pattern rule would give this layer another rank or alpha; "
                                   "cannot write an exact PEFT config")
    return config


def _by_model(parsed: ParsedFile, pipe: Any) -> dict[str, dict[str, AdapterModule]]:
    """pipeline attribute -> {module path: file module}, every module matched or an error."""
    layers = ModelLayers(pipe)
    out: dict[str, dict[str, AdapterModule]] = {}
    unmatched = []
    for name, mod in parsed.modules.items():
        hit = layers.match(name)
        if hit is None:
            unmatched.append(name)
            continue
        out.setdefault(PART[hit.part].pipeline_attr, {})[hit.path] = mod
    if unmatched or parsed.unsupported:
        names = unmatched + sorted(parsed.unsupported)
        raise AdapterFileError(f"{parsed.source}: {len(names)} modules match no layer of the reference model or use "
                               f"another algorithm ({', '.join(names[:5])}); pass the base model the file was "
                               "trained on (--model) to convert it")
    return out


def _sd3_by_model(parsed: ParsedFile, pipe: Any) -> dict[str, dict[str, AdapterModule]]:
    """An SD 3.x file's modules on diffusers' layers (fused qkv split exactly), as _by_model gives them."""
    if parsed.unsupported:
        raise AdapterFileError(f"{parsed.source}: {len(parsed.unsupported)} modules use an algorithm PEFT LoHa cannot "
                               f"hold ({', '.join(sorted(parsed.unsupported)[:5])})")
    out: dict[str, dict[str, AdapterModule]] = {}
    for (part, path), mod in in_layout(parsed, SD3Names.from_pipeline(pipe), "diffusers").items():
        attr = SD3_PART[part].pipeline_attr
        model = getattr(pipe, attr)
        # a CLIP path as files write it (text_model.…) in a model without that wrapper (transformers >= 5.6)
        path = path if hasattr(model, "text_model") or part == "transformer" else path.removeprefix("text_model.")
        # split q / k / v share their B factors: each its own copy, as safetensors stores no shared tensors
        out.setdefault(attr, {})[path] = replace(mod, tensors={k: v.clone() for k, v in mod.tensors.items()})
    return out


def _sd3_architecture_pipeline(parsed: ParsedFile) -> Any | None:
    """The meta pipeline of the real SD 3.x architecture an SD 3.x file fits, None when the file is not SD 3.x;
    an error for one of a size no real SD 3.x has."""
    evidence = sd3_file_evidence(parsed)
    if evidence is None:
        return None
    fits = fitting_architectures(evidence)
    if not fits:
        raise AdapterFileError(f"{parsed.source}: an SD 3.x file of a size no real SD 3.x architecture has; pass the "
                               "base model it was trained on with --model")
    return meta_pipeline(fits[0])  # the Mediums share every layer a file naming both can hold


def _check_conv_forms(modules: Mapping[str, AdapterModule], model: nn.Module, where: str) -> bool:
    """Whether the model's k×k convs are Tucker (PEFT's use_effective_conv2d), which must hold for all or none."""
    forms = {p: m.tucker for p, m in modules.items()
             if isinstance(model.get_submodule(p), nn.Conv2d) and model.get_submodule(p).kernel_size != (1, 1)}
    if len(set(forms.values())) > 1:
        raise AdapterFileError(f"{where}: some k×k convs are Tucker and some flat; PEFT's use_effective_conv2d is one "
                               "setting per model, so this file cannot be converted exactly")
    return any(forms.values())


def check_peft_output(out: str | os.PathLike) -> Path:
    """`out` may be replaced by a pipeline folder of PEFT adapters: it is new, empty, or holds only what such a
    folder holds (an earlier conversion), never other files that the replacement would delete."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; --to peft writes a folder (OUT/unet, OUT/text_encoder, ...)")
    ours = {*_pipeline_attrs(), PEFT_CONFIG, PEFT_WEIGHTS, "README.md"}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if others:
        raise ValueError(f"--out {out} is a folder holding other files ({', '.join(others[:5])}); --to peft replaces "
                         "the whole folder: choose a new or empty folder, or an earlier PEFT conversion")
    return out


def write_peft(source: str | os.PathLike | Mapping[str, torch.Tensor] | ParsedFile, out: str | os.PathLike, pipe: Any,
               *, base_model: str | None = None) -> dict[str, Path]:
    """Write a kohya/LyCORIS LoHA file as PEFT LoHa adapters, one folder per model in diffusers' pipeline layout
    (OUT/unet, OUT/text_encoder, OUT/text_encoder_2), each loadable with ``PeftModel.from_pretrained(model,
    OUT/<attr>)``. `pipe` (a pipeline, or architectures.meta_pipeline) names the layers. Returns attr -> folder.

    OUT is written whole into a temp folder beside it and then swapped in, so an earlier conversion there is
    replaced entirely (never a new UNet adapter beside an old text-encoder one) and a failure leaves it as it was."""
    parsed = source if isinstance(source, ParsedFile) else _load(source)
    out = check_peft_output(out)
    written = {}
    by_model = _sd3_by_model(parsed, pipe) if sd3_file_evidence(parsed) is not None else _by_model(parsed, pipe)
    with write_folder_atomic(out) as tmp:
        for attr, modules in by_model.items():
            model = getattr(pipe, attr)
            tucker = _check_conv_forms(modules, model, parsed.source)
            tensors = {f"{PEFT_PREFIX}{p}.{k}": v for p, m in modules.items()
                       for k, v in _peft_factors(m, parsed.source).items()}
            save_safetensors_atomic(tensors, tmp / attr / PEFT_WEIGHTS, {"format": "pt"})
            config = _peft_config(modules, tucker, base_model)
            write_text_atomic(tmp / attr / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
            written[attr] = out / attr
    return written


def write_kohya(path: str | os.PathLike, out: str | os.PathLike, *, family: str | None = None,
                unet_config: Any = None, pipe: Any = None) -> Path:
    """Write a PEFT LoHa adapter (folder, pipeline folder, or safetensors file with its JSON) as a kohya/LyCORIS
    LoHA file: the same factors, each module's alpha from PEFT's config. UNet names as read_peft writes them.
    SD 3.x: kohya's fused form, its layers from `pipe` (the base) or the real architecture the adapter fits."""
    state, meta = read_peft(path, family=family, unet_config=unet_config)
    meta.update({"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "loha"})})
    if family == "sd3" or (family is None and is_sd3_state_dict(state)):
        # kohya's SD3 form: the original MMDiT layout, q / k / v fused at their summed rank
        parsed = read_sd3(state, metadata=meta, where=str(path))
        names = SD3Names.from_pipeline(pipe if pipe is not None else _sd3_architecture_pipeline(parsed))
        state = to_form(parsed, names, "kohya")
    return save_safetensors_atomic(state, out, meta)


def _load(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> ParsedFile:
    """A kohya / LyCORIS file, or an SD 3.x file of any form (sd3_names.FORMS)."""
    tensors, meta = (source, {}) if isinstance(source, Mapping) else read_safetensors(source)
    where = "<state dict>" if isinstance(source, Mapping) else str(source)
    if is_sd3_state_dict(tensors):
        return read_sd3(tensors, metadata=meta, where=where)
    return parse_state_dict(tensors, source=where, metadata=meta)


def convert_to_peft(source: str | os.PathLike, out: str | os.PathLike, model: str | None = None) -> dict[str, Path]:
    """`sd-loha convert FILE --to peft`: `model` (a base model load_pipeline reads) names the layers; without it
    the real architecture the file was made for does (module trees only, nothing downloaded)."""
    from .models import load_pipeline

    check_peft_output(out)  # before loading a model
    if model is not None:
        return write_peft(source, out, load_pipeline(model), base_model=model)
    parsed = _load(source)
    sd3 = _sd3_architecture_pipeline(parsed)
    if sd3 is not None:
        return write_peft(parsed, out, sd3)
    arch = file_architecture(parsed)
    if arch is None:
        raise AdapterFileError(f"{source}: its architecture cannot be told from its keys or metadata; pass the base "
                               "model it was trained on with --model")
    if arch not in UNET_ARCHITECTURES:
        raise AdapterFileError(f"{source}: a {arch} file; converting to PEFT LoHa covers SD 1.x, SD 2.x, SDXL and "
                               "SD 3.x files. Nothing was written.")
    return write_peft(parsed, out, meta_pipeline(arch))



def convert_to_kohya(source: str | os.PathLike, out: str | os.PathLike, model: str | None = None) -> Path:
    """`sd-loha convert PEFT_DIR --to kohya`: with `model` the base's family and UNet config decide the names
    (LDM paths on SDXL, as kohya writes them); without it the family comes from the adapters."""
    if model is None:
        return write_kohya(source, out)
    from .models import detect_family, load_pipeline

    pipe = load_pipeline(model)
    family = detect_family(pipe)
    if family.is_sd3:
        return write_kohya(source, out, family="sd3", pipe=pipe)
    return write_kohya(source, out, family=family.name, unet_config=pipe.unet.config)
