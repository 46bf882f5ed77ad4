"""The trainable LoHA network: layers put into a pipeline's UNet and text encoder(s), and saving it.

`add_loha` wraps the chosen frozen layers in place (module paths gain a `.base` level while the network
is attached) and returns a `LoHANetwork`, the one handle a trainer needs: parameters, per-module
listing, multiplier, saving in the community format, and `remove()` to put the original layers back.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import save_safetensors_atomic
from .layers import LoHALayer, wrap
from .models import ModelFamily, detect_family, text_encoders, unet_family_name
from .naming import PART, SD3_PART, text_encoder_canonical_path, text_encoder_save_name, unet_ldm_path, unet_save_name
from .sd3_network import RowSlice, SD3Keys, fused_owner
from .targets import (Preset, Target, candidate_targets, first_match, layer_names, load_preset, preset_label,
                      unmatched_patterns, unmatched_regexes)
from .version import __version__

logger = logging.getLogger(__name__)

# Layer kinds that take conv_rank / conv_alpha (1x1 convs count as linear layers).
KXK_KINDS = ("conv", "conv_tucker")
SAVE_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "float": torch.float32, "fp32": torch.float32, "float32": torch.float32}


@dataclass
class NetworkModule:
    part: str  # "unet" | "te" | "te1" | "te2"
    path: str  # dotted path of the original layer inside its model
    key: str  # the kohya module name written to the file
    layer: LoHALayer
    parent: nn.Module
    attr: str
    lr_rule: int | None = None  # index of its network_reg_lrs pattern; None: the part's lr (unet_lr / text_encoder_lr)
    # SD 3.x layers the file stores as one (a fused qkv): (parent, attr, RowSlice) of each model layer it spans
    slices: tuple[tuple[nn.Module, str, nn.Module], ...] = ()


class LoHANetwork:
    """LoHA layers attached to one or more models. Created by `add_loha`."""

    def __init__(self, modules: list[NetworkModule], settings: dict[str, Any], family: ModelFamily | None) -> None:
        self.modules = modules
        self.settings = settings
        self.family = family

    # -- training -------------------------------------------------------------------------------
    def parameters(self, part: str | None = None) -> list[nn.Parameter]:
        """Trainable factor tensors, optionally of one part ("unet", or "te" for all text encoders)."""
        out = []
        for m in self.modules:
            if part is None or m.part == part or (part == "te" and m.part.startswith("te")):
                out.extend(p for p in m.layer.parameters(recurse=False) if p.requires_grad)
        return out

    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict[str, Any]]:
        """One optimizer group per part ("unet", "text_encoder") at its learning rate, and, as kohya does, one per
        part and network_reg_lrs pattern i ("unet_reg_lr_0") at the pattern's rate, for the modules it matched first."""
        rates = list(self.settings.get("reg_lrs", {}).values())
        groups: dict[tuple[str, int], dict[str, Any]] = {}
        for m in self.modules:
            part = "unet" if m.part == "unet" else "text_encoder"
            rule = -1 if m.lr_rule is None else m.lr_rule
            lr = rates[rule] if rule >= 0 else unet_lr if part == "unet" else text_encoder_lr
            name = part if rule < 0 else f"{part}_reg_lr_{rule}"
            group = groups.setdefault((part, rule), {"params": [], "lr": lr, "name": name})
            group["params"].extend(p for p in m.layer.parameters(recurse=False) if p.requires_grad)
        order = sorted(groups, key=lambda k: (k[0] != "unet", k[1]))  # unet first, each part's own group first
        return [groups[k] for k in order if groups[k]["params"]]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_multiplier(self, multiplier: float) -> None:
        for m in self.modules:
            m.layer.multiplier = float(multiplier)

    def listing(self) -> list[dict[str, Any]]:
        """One row per adapted layer: part, path, file key, kind, rank, alpha, parameter count."""
        return [
            {"part": m.part, "path": m.path, "key": m.key, "kind": m.layer.kind, "rank": m.layer.rank,
             "alpha": m.layer.alpha_value, "params": sum(p.numel() for p in m.layer.parameters(recurse=False))}
            for m in self.modules
        ]

    def summary(self) -> str:
        rows = self.listing()
        counts: dict[str, int] = {}
        for r in rows:
            counts[f"{r['part']}/{r['kind']}"] = counts.get(f"{r['part']}/{r['kind']}", 0) + 1
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        return f"LoHA network: {len(rows)} layers ({parts}), {self.num_parameters():,} trainable parameters"

    # -- state --------------------------------------------------------------------------------
    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The file's tensors: `<kohya name>.<param>`; factors cast to `dtype`, alpha kept in fp32."""
        sd: dict[str, torch.Tensor] = {}
        for m in self.modules:
            for param, tensor in m.layer.factors().items():
                t = tensor.detach().cpu()
                if param == "alpha":
                    t = t.to(torch.float32)  # whatever the layer was cast to, files carry an fp32 alpha
                elif dtype is not None:
                    t = t.to(dtype)
                sd[f"{m.key}.{param}"] = t.contiguous()
        return sd

    def raw_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors as they are, in fp32 (`<kohya name>.<param>`; a use_scalar layer's w1_a and
        scalar apart): what a resumable state holds, so the optimizer's moments still fit their parameters."""
        return {f"{m.key}.{name}": t.detach().cpu().to(torch.float32).contiguous()
                for m in self.modules for name, t in m.layer.raw_tensors().items()}

    def load_raw_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`raw_state_dict` (without use_scalar its keys are the file's, so older states load too)."""
        with torch.no_grad():
            for m in self.modules:
                for name, t in m.layer.raw_tensors().items():
                    key = f"{m.key}.{name}"
                    if key not in state_dict:
                        raise KeyError(f"{key} missing from the resumable state")
                    src = state_dict[key].reshape(t.shape) if name == "alpha" else state_dict[key]
                    if src.shape != t.shape:
                        raise ValueError(f"{key}: shape {tuple(src.shape)} in the state, {tuple(t.shape)} in the "
                                         "network; the network settings differ from the run that saved it")
                    t.copy_(src.to(t.dtype))
        self._settings_follow_alphas()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Load factors and alphas saved by `state_dict`/`save` (e.g. to continue from a file). Returns
        missing keys.

        The file's alpha wins over the one the network was created with: it is a buffer of each layer
        (as in kohya's modules), the forward scales by it / rank (kohya's keeps its construction-time
        scale), `save` writes it, and the `ss_network_alpha` / `conv_alpha` metadata follow it.
        """
        missing = []
        with torch.no_grad():
            for m in self.modules:
                # Through the layer's own loader: a use_scalar layer's file hada_w1_a is w1_a · scalar, a
                # dora_wd layer's dora_scale is a parameter of its own.
                expected, found = m.layer.factors(), {}
                for param, tensor in expected.items():
                    key = f"{m.key}.{param}"
                    if key not in state_dict:
                        missing.append(key)
                        continue
                    src = state_dict[key]
                    if param == "alpha" and src.numel() == 1:
                        src = src.reshape(())  # some writers store alpha as shape (1,)
                    if src.shape != tensor.shape:
                        raise ValueError(f"{key}: shape {tuple(src.shape)} in the file, {tuple(tensor.shape)} in the network; "
                                         "rank, conv rank, Tucker or dora settings differ from the file's")
                    found[param] = src.to(tensor.dtype)
                if len(found) == len(expected):
                    m.layer.load_factors(found)
        if strict and missing:
            raise KeyError(f"{len(missing)} network tensors missing from the state dict, e.g. {missing[:3]}")
        self._settings_follow_alphas()
        return missing

    def _settings_follow_alphas(self) -> None:
        """Set the `alpha` / `conv_alpha` settings (written as metadata) to the layers' alphas where
        all layers of that kind agree, so the metadata never contradicts the tensors."""
        for setting, kxk in (("alpha", False), ("conv_alpha", True)):
            values = {m.layer.alpha_value for m in self.modules if (m.layer.kind in KXK_KINDS) == kxk}
            if len(values) == 1:
                self.settings[setting] = values.pop()

    def _common(self, attr: str, kxk: bool, default: Any) -> str:
        """The rank or alpha that every linear/1x1 (or every k×k) layer has, or "Dynamic" where they differ, as
        kohya's resize and merge scripts write it; the setting when there is no such layer. The tensors hold
        each module's own rank (factor shapes) and alpha, which is what loaders read."""
        values = {getattr(m.layer, attr) for m in self.modules if (m.layer.kind in KXK_KINDS) == kxk}
        return "Dynamic" if len(values) > 1 else str(values.pop() if values else default)

    def metadata(self, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
        """kohya ss_* and SAI modelspec.* keys describing this network (all values strings)."""
        s = self.settings
        now = _dt.datetime.now(_dt.timezone.utc)
        args = {"algo": "loha", "preset": s["preset"], "conv_dim": self._common("rank", True, s["conv_rank"]),
                "conv_alpha": self._common("alpha_value", True, s["conv_alpha"])}
        for name, rules in (("network_reg_dims", s.get("reg_dims")), ("network_reg_lrs", s.get("reg_lrs"))):
            if rules:  # kohya's own network_args string
                args[name] = ",".join(f"{p}={v:g}" for p, v in rules.items())
        if s["use_tucker"]:
            args["use_tucker"] = "True"
        for flag in ("dora_wd", "use_scalar"):  # LyCORIS's network_args spelling
            if s.get(flag):
                args[flag] = "True"
        if s.get("train_t5xxl"):  # kohya's lora_sd3 network argument
            args["train_t5xxl"] = "True"
        if s.get("dora_wd"):
            args["wd_on_output"] = str(bool(s.get("wd_on_output")))
        if s["rank_dropout"]:
            args["rank_dropout"] = str(s["rank_dropout"])
        if s["module_dropout"]:
            args["module_dropout"] = str(s["module_dropout"])
        meta: dict[str, Any] = {
            "ss_network_module": "lycoris.kohya",
            "ss_network_dim": self._common("rank", False, s["rank"]),
            "ss_network_alpha": self._common("alpha_value", False, s["alpha"]),
            "ss_network_args": json.dumps(args),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
            "sd_loha_version": __version__,
        }
        if self.family is not None:
            fam = self.family
            meta.update({
                "ss_base_model_version": fam.ss_base_model_version,
                "ss_v2": str(fam.name == "sd2"),
                "modelspec.architecture": fam.modelspec_architecture,
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if fam.is_sdxl else "diffusers",
                "modelspec.prediction_type": "v" if fam.prediction_type == "v_prediction" else "epsilon",
            })
        meta.update(extra or {})
        return {k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
                for k, v in meta.items() if v is not None}

    def save(self, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
             dtype: torch.dtype | str = torch.float16) -> Path:
        """Write a community-format LoHA safetensors file atomically (temp file + rename)."""
        if isinstance(dtype, str):
            dtype = SAVE_DTYPES[dtype]
        meta = self.metadata({"modelspec.title": Path(path).stem, **dict(metadata or {})})
        return save_safetensors_atomic(self.state_dict(dtype), path, meta, with_addnet_hash=True)

    def remove(self) -> None:
        """Unwrap every layer, putting the original frozen modules back."""
        for m in self.modules:
            for parent, attr, layer in m.slices or ((m.parent, m.attr, m.layer),):
                setattr(parent, attr, layer.base)
        self.modules = []


def _split_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def _resolve_models(target: Any, text_encoder: bool, train_t5xxl: bool = False
                    ) -> tuple[dict[str, nn.Module], ModelFamily | None]:
    if getattr(target, "unet", None) is None and getattr(target, "transformer", None) is not None:  # SD 3.x
        family = detect_family(target)  # refuses a transformer that is not SD3's
        models = {"unet": target.transformer}  # the denoiser is the "unet" part: lora_unet_, unet_lr
        if text_encoder:
            models.update({k: v for k, v in text_encoders(target).items() if k != "te3" or train_t5xxl})
        return models, family
    if hasattr(target, "unet"):  # a pipeline
        models = {"unet": target.unet}
        if text_encoder:
            models.update(text_encoders(target))
        return models, detect_family(target)
    if type(target).__name__ == "UNet2DConditionModel":
        return {"unet": target}, ModelFamily(unet_family_name(target.config), "epsilon")
    if type(target).__name__.startswith("CLIPText"):
        return {"te": target}, None
    raise TypeError(f"add_loha: expected a diffusers pipeline, a UNet2DConditionModel or a CLIP text encoder, "
                    f"got {type(target).__name__}")


def add_loha(
    target: Any,
    *,
    preset: str | Preset = "attn-mlp",
    rank: int = 8,
    alpha: float = 4.0,
    conv_rank: int = 0,
    conv_alpha: float = 1.0,
    use_tucker: bool = False,
    text_encoder: bool = True,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    reg_dims: Mapping[str, int] | None = None,
    reg_lrs: Mapping[str, float] | None = None,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    rank_dropout_scale: bool = False,
    dora_wd: bool = False,
    wd_on_output: bool = False,
    use_scalar: bool = False,
    train_t5xxl: bool = False,
    sd3_file_form: str = "kohya",
) -> LoHANetwork:
    """Put LoHA layers into a pipeline (UNet + text encoder(s)), a single UNet, or a single text encoder.

    Layers are chosen by `preset` ("attn-only", "attn-mlp", "full", a LyCORIS preset file ending in .toml, or a
    `Preset`), `include`/`exclude` glob patterns, and conv_rank (0 = no k×k convs). `reg_dims` / `reg_lrs` are
    kohya's network_reg_dims / network_reg_lrs: regular expressions searched in each module's file name, the
    first match giving its rank (0 = not adapted) or learning rate (:func:`sd_loha.targets.candidate_targets`).
    The original weights are frozen; only the factors train.

    SD 3.x pipelines: the transformer is the "unet" part; T5 (te3) is adapted only with `train_t5xxl`;
    `sd3_file_form` "kohya" (default) trains each fused qkv as one LoHA over the three diffusers layers and writes
    the original-layout names kohya and ComfyUI read, "simpletuner" one LoHA per diffusers layer
    (:mod:`sd_loha.sd3_network`).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    preset_obj = load_preset(preset)
    models, family = _resolve_models(target, text_encoder, train_t5xxl)
    sd3 = SD3Keys(models["unet"], sd3_file_form) if family is not None and family.is_sd3 else None
    names: list[tuple[str, ...]] = []
    plan: list[tuple[str, nn.Module, Target]] = []
    for part, model in models.items():
        prefix = (PART[part] if part in PART else SD3_PART[part]).prefix
        key_of = sd3.key_of(part) if sd3 else _key_function(part, model, prefix)
        names += layer_names(model, prefix, key_of)
        plan += [(part, model, t) for t in candidate_targets(
            model, part=part, prefix=prefix, preset=preset_obj, rank=rank, alpha=alpha, conv_rank=conv_rank,
            conv_alpha=conv_alpha, include=include, exclude=exclude, reg_dims=reg_dims, key_of=key_of,
            path_forms=sd3.path_forms(part) if sd3 else _path_forms(part, model))]
    # before any layer is wrapped, so a refused pattern leaves the models as they were
    _check_regexes("network_reg_dims", reg_dims, [t.key for _, _, t in plan], preset_obj)
    plan = [(part, model, t) for part, model, t in plan if t.rank > 0]
    _check_regexes("network_reg_lrs", reg_lrs, [t.key for _, _, t in plan], preset_obj)
    groups = _fused_groups(plan, sd3)
    for model in models.values():
        model.requires_grad_(False)
    rules = {p: i for i, p in enumerate(reg_lrs or {})}  # pattern -> its index: the group it trains in
    settings_kw = dict(rank_dropout=rank_dropout, module_dropout=module_dropout, rank_dropout_scale=rank_dropout_scale,
                       dora_wd=dora_wd, wd_on_output=wd_on_output, use_scalar=use_scalar)
    modules: list[NetworkModule] = []
    for part, model, t in plan:
        if part == "unet" and sd3 is not None and sd3.fused(t.path) is not None:
            if t.path == groups[t.key][0].path:  # the file's module, made once, at its first row
                modules.append(_attach_fused(model, sd3, groups[t.key], first_match(rules, t.key), settings_kw))
            continue
        tucker = use_tucker if t.use_tucker is None else t.use_tucker
        layer = wrap(t.module, rank=t.rank, alpha=t.alpha, use_tucker=tucker and t.is_kxk_conv, **settings_kw)
        parent, attr = _split_parent(model, t.path)
        setattr(parent, attr, layer)
        modules.append(NetworkModule(part, t.path, t.key, layer, parent, attr, lr_rule=first_match(rules, t.key)))
    for option, patterns in (("include", include), ("exclude", exclude)):
        for p in unmatched_patterns(list(patterns or []), names):
            logger.warning("%s pattern %r matches no layer of the adapted models, so it changes nothing; patterns "
                           "are globs over module paths or kohya names, e.g. '*.attn1.*' or 'lora_unet_mid_block_*'",
                           option, p)
    if not modules:
        raise ValueError(f"add_loha: preset {preset!r} with include={include} exclude={exclude} selected no layers")
    settings = dict(preset=preset_label(preset), rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                    use_tucker=use_tucker, rank_dropout=rank_dropout, module_dropout=module_dropout,
                    dora_wd=dora_wd, wd_on_output=wd_on_output, use_scalar=use_scalar,
                    text_encoder=text_encoder and any(p != "unet" for p in models),
                    reg_dims=dict(reg_dims or {}), reg_lrs=dict(reg_lrs or {}),
                    **({"sd3_file_form": sd3_file_form, "train_t5xxl": train_t5xxl} if sd3 else {}))
    return LoHANetwork(modules, settings, family)


def _fused_groups(plan: Sequence[tuple[str, nn.Module, Target]], sd3: SD3Keys | None) -> dict[str, list[Target]]:
    """File key -> the selected targets of each SD 3.x layer the kohya form stores as one (rows in file order).
    A fused qkv trains as one LoHA, so its q, k and v are selected together, at one rank and alpha, or not at all."""
    groups: dict[str, list[Target]] = {}
    if sd3 is None:
        return groups
    for part, _, t in plan:
        if part == "unet" and sd3.fused(t.path) is not None:
            groups.setdefault(t.key, []).append(t)
    for key, targets in groups.items():
        name, rows = sd3.fused(targets[0].path)
        chosen = {t.path: t for t in targets}
        missing = [r.path for r in rows if r.path not in chosen]
        if missing:
            raise ValueError(f"{key}: the kohya file form stores {', '.join(r.path for r in rows)} as one module "
                             f"({name}), but the preset and include/exclude patterns leave out {', '.join(missing)}; "
                             "select all of them or none, or set sd3_file_form = \"simpletuner\" (one module each)")
        if len({(t.rank, t.alpha) for t in targets}) > 1:
            raise ValueError(f"{key}: {name} is one module in the file, but its layers got different ranks or alphas "
                             "from the preset; give them one")
        groups[key] = [chosen[r.path] for r in rows]
    return groups


def _attach_fused(model: nn.Module, sd3: SD3Keys, targets: Sequence[Target], lr_rule: int | None,
                  settings: Mapping[str, Any]) -> NetworkModule:
    """One LoHA over `targets` (an SD 3.x fused qkv, or a swapped adaLN), each model layer wrapped in a RowSlice
    reading its rows."""
    name, rows = sd3.fused(targets[0].path)
    owner = fused_owner([t.module for t in targets], rank=targets[0].rank, alpha=targets[0].alpha, **settings)
    slices = []
    for t, r in zip(targets, rows):
        parent, attr = _split_parent(model, t.path)
        layer = RowSlice(t.module, owner, r)
        setattr(parent, attr, layer)
        slices.append((parent, attr, layer))
    return NetworkModule("unet", name, targets[0].key, owner, slices[0][0], slices[0][1], lr_rule=lr_rule,
                         slices=tuple(slices))


def _key_function(part: str, model: nn.Module, prefix: str) -> Callable[[str], str]:
    """Module path -> its name in the file (SDXL UNets: the LDM names)."""
    if part != "unet":
        return lambda path: text_encoder_save_name(path, prefix)
    sdxl = unet_family_name(model.config) == "sdxl"
    return lambda path: unet_save_name(path, model.config, sdxl)


def _path_forms(part: str, model: nn.Module) -> Callable[[str], tuple[str, ...]]:
    """The names a preset file's module names are tested on: the live path, and the path files are written in
    (the transformers-4 text-encoder layout; SDXL's LDM paths, which kohya's SDXL presets name)."""
    if part != "unet":
        return lambda path: tuple(dict.fromkeys((path, text_encoder_canonical_path(path))))
    if unet_family_name(model.config) != "sdxl":
        return lambda path: (path,)
    return lambda path: tuple(dict.fromkeys((path, unet_ldm_path(path, model.config) or path)))


def _check_regexes(option: str, rules: Mapping[str, Any] | None, keys: list[str], preset: Preset) -> None:
    """A block-wise pattern that matches none of the layers it could apply to changes nothing: most often a
    typo, a dotted path instead of the file's underscored name, or a block outside the preset."""
    for p in unmatched_regexes(rules or {}, keys):
        examples = ", ".join(keys[i] for i in sorted({0, len(keys) // 2, len(keys) - 1}) if keys)
        raise ValueError(f"{option} pattern {p!r} matches no module that preset {preset.name!r} adapts; patterns are "
                         f"regular expressions searched in the file's module names, such as {examples}")


def save_loha(network: LoHANetwork, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
              dtype: torch.dtype | str = torch.float16) -> Path:
    """Module-level alias of `LoHANetwork.save`."""
    return network.save(path, metadata=metadata, dtype=dtype)
