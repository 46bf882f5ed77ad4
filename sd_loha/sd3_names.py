"""SD3 / SD3.5 adapter names: the original MMDiT layout <-> diffusers' SD3Transformer2DModel, in every file form.

Two module layouts name the same SD3 transformer:

* the **original** (MMDiT) layout of Stability's checkpoints, kohya sd-scripts' and ComfyUI's models:
  ``joint_blocks.N.{x_block,context_block}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}``,
  ``x_block.attn2.{qkv,proj}`` (SD3.5 Medium), ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``,
  ``y_embedder.mlp.{0,2}``, ``context_embedder``, ``final_layer.{linear,adaLN_modulation.1}``;
* the **diffusers** layout of ``SD3Transformer2DModel``, with q, k and v as three Linears
  (``attn.to_q/k/v``; ``attn.add_q/k/v_proj`` for the context stream; ``attn2.to_q/k/v``).

:func:`original_of` is the one rule table between them (checked against diffusers' own
``convert_sd3_transformer_checkpoint_to_diffusers`` for every tensor, tests/test_sd3_names.py). Two layers differ
by more than a name: the fused qkv, whose rows are q | k | v, and the two adaLN projections that store
(shift, scale) in the original layout and (scale, shift) in diffusers' (the last block's context
``adaLN_modulation.1`` = ``norm1_context.linear``, and ``final_layer.adaLN_modulation.1`` = ``norm_out.linear``).

:data:`FORMS` lists the file forms (key prefixes and layout) that trainers write; :class:`SD3Names` builds every
name each form gives each layer of a pipeline's models (never parsing a name back into a path, as naming.py);
:func:`read_sd3` reads a file of any form into a ParsedFile whose module names are the forms' names with dots
made underscores; :func:`sd3_file_evidence` / :func:`sd3_file_architecture` tell SD3 Medium, SD3.5 Medium and
SD3.5 Large files apart. docs/format.md, "SD3 / SD3.5", says which tool writes which form.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn

from .architectures import SD3_ARCHITECTURES, meta_pipeline
from .io import ParsedFile, parse_state_dict, read_safetensors
from .naming import LYCORIS_PREFIX, SD3_PARTS, text_encoder_canonical_path

__all__ = [
    "Form", "FORMS", "Target", "SD3Layer", "original_of", "original_layout",
    "form_name", "flat", "SD3Names", "architecture_names", "split_param", "is_sd3_state_dict", "read_sd3", "SD3Evidence",
    "sd3_file_evidence", "fitting_architectures", "sd3_file_architecture", "transformer_problem",
]

TRANSFORMER = SD3_PARTS[0].name


# ---------------------------------------------------------------------------------------------
# The original <-> diffusers layout
# ---------------------------------------------------------------------------------------------

# diffusers layer inside transformer_blocks.N -> (original layer inside joint_blocks.N, row slot in the fused qkv).
_BLOCK_LAYERS: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None), "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}
# Layers outside the blocks.
_TOP_LAYERS: dict[str, str] = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


def original_of(path: str, num_layers: int) -> tuple[str, int | None, bool] | None:
    """(original-layout module, slot in its fused q|k|v rows or None, row halves swapped) of the diffusers
    SD3Transformer2DModel layer `path` in a model of `num_layers` blocks; None for a layer without one.

    ``original_of("transformer_blocks.3.attn.add_k_proj", 24) == ("joint_blocks.3.context_block.attn.qkv", 1,
    False)``. Swapped are ``norm_out.linear`` and the last block's ``norm1_context.linear``: diffusers stores
    (scale, shift) where the original stores (shift, scale)."""
    top = _TOP_LAYERS.get(path)
    if top is not None:
        return top, None, path == "norm_out.linear"
    m = _BLOCK.fullmatch(path)
    if m is None:
        return None
    block, rest = int(m.group(1)), m.group(2)
    rule = _BLOCK_LAYERS.get(rest)
    if rule is None:
        return None
    swapped = rest == "norm1_context.linear" and block == num_layers - 1
    return f"joint_blocks.{block}.{rule[0]}", rule[1], swapped


@dataclass(frozen=True)
class Target:
    """One model layer an adapter module changes, and how: rows [start, stop) of the module's ΔW (in the
    file's layout) are the layer's, with their two halves exchanged when `swap_halves`."""

    path: str  # module path in the part's model (diffusers / transformers names)
    start: int
    stop: int
    swap_halves: bool = False


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def _rows(module: nn.Module) -> int:
    """A layer's output rows, from its declared size: a bitsandbytes Linear4bit's weight is packed (nf4 keeps two
    values a byte), so its shape does not say them."""
    return int(module.out_features if isinstance(module, nn.Linear) else module.out_channels)


def original_layout(transformer: nn.Module) -> dict[str, tuple[Target, ...]]:
    """Every original-layout layer of a diffusers SD3Transformer2DModel -> the diffusers layers it is, in row
    order (q, k, v for a fused qkv), each with its rows; built from the model's own layers and shapes."""
    num_layers = int(transformer.config.num_layers)
    parts: dict[str, list[tuple[int, str, int, bool]]] = {}
    for path, module in transformer.named_modules():
        if not _adaptable(module):
            continue
        found = original_of(path, num_layers)
        if found is not None:
            original, slot, swap = found
            parts.setdefault(original, []).append((slot or 0, path, _rows(module), swap))
    layout: dict[str, tuple[Target, ...]] = {}
    for original, pieces in parts.items():
        start, targets = 0, []
        for _, path, rows, swap in sorted(pieces):
            targets.append(Target(path, start, start + rows, swap))
            start += rows
        layout[original] = tuple(targets)
    return layout


# ---------------------------------------------------------------------------------------------
# File forms
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    """One way files name SD3 adapter modules: per part, the prefix before the module path, the layout of the
    transformer's paths, and whether the path's dots become underscores (kohya) or stay (PEFT style)."""

    name: str
    layout: str  # "original" (fused qkv, MMDiT names) | "diffusers" (split q/k/v, diffusers paths)
    dotted: bool  # module paths keep their dots
    prefixes: Mapping[str, str]  # part -> prefix, separator included; a part missing: the form has no names for it
    writers: str  # who writes it (docs and messages)
    lora_params: tuple[str, str] = ("lora_down.weight", "lora_up.weight")  # how it spells LoRA's (down, up)
    alpha_in_up: bool = False  # LoRA's alpha/r folded into the up factor, no alpha key (diffusers / PEFT)


_KOHYA = {p.name: p.prefix + "_" for p in SD3_PARTS}  # lora_unet_, lora_te1_, lora_te2_, lora_te3_
_KOHYA_TE = {k: v for k, v in _KOHYA.items() if k != TRANSFORMER}
_AB = ("lora_A.weight", "lora_B.weight")  # PEFT's spelling; OneTrainer's ORIGINAL / COMFY use it too
FORMS: dict[str, Form] = {f.name: f for f in (
    Form("kohya", "original", False, _KOHYA,
         "kohya sd-scripts (networks/lora_sd3.py; LyCORIS as its network module), OneTrainer KOHYA; ComfyUI reads it"),
    Form("original", "original", True, {TRANSFORMER: ""}, "OneTrainer ORIGINAL (transformer only)", _AB),
    Form("comfy", "original", True, {TRANSFORMER: "diffusion_model.", "te1": "text_encoders.clip_l.transformer.",
                                     "te2": "text_encoders.clip_g.transformer.",
                                     "te3": "text_encoders.t5xxl.transformer."}, "OneTrainer COMFY", _AB),
    Form("simpletuner", "diffusers", False, {TRANSFORMER: LYCORIS_PREFIX + "_"},
         "LyCORIS on the diffusers transformer (SimpleTuner)"),
    Form("legacy", "diffusers", False, {TRANSFORMER: "lora_transformer_", **_KOHYA_TE}, "OneTrainer LEGACY"),
    Form("diffusers", "diffusers", True, {TRANSFORMER: "transformer.", "te1": "text_encoder.",
                                          "te2": "text_encoder_2.", "te3": "text_encoder_3."},
         "diffusers / PEFT (load_lora_weights), OneTrainer DIFFUSERS", _AB, True),
    Form("peft", "diffusers", True, {TRANSFORMER: "base_model.model."}, "PEFT's own wrapper paths (ComfyUI reads them)",
         _AB, True),
)}


def flat(name: str) -> str:
    """A module name with its dots made underscores: how :func:`read_sd3` and :class:`SD3Names` compare names,
    so dotted (PEFT-style) and kohya-style names go through one table."""
    return name.replace(".", "_")


def form_name(form: str, part: str, path: str) -> str:
    """The module name `form` writes for a layer: `path` is an original-layout path (the transformer in an
    original-layout form), a diffusers path (the transformer in a diffusers-layout form) or a text encoder's
    module path (CLIPs in transformers 4's ``text_model.`` layout, as files write them). Raises KeyError for a
    part the form has no names for."""
    f = FORMS[form]
    name = f.prefixes[part] + path
    return name if f.dotted else f.prefixes[part] + flat(path)


@dataclass(frozen=True)
class SD3Layer:
    """What one file module of an SD3 file adapts: the part, the form its name is in, and its targets."""

    part: str  # "transformer" | "te1" | "te2" | "te3"
    form: str  # the FORMS key whose name matched
    targets: tuple[Target, ...]  # the model layers it changes, in row order
    original: str | None = None  # the transformer's original-layout layer it is (or, split, is a slice of)
    slot: int | None = None  # a split qkv layer's place in the fused original (0 q, 1 k, 2 v)

    @property
    def fused(self) -> bool:
        """One module spanning several model layers (a fused qkv on diffusers' split q/k/v)."""
        return len(self.targets) > 1


def _add(table: dict[str, SD3Layer], name: str, layer: SD3Layer) -> None:
    other = table.setdefault(flat(name), layer)
    if other.targets != layer.targets:
        # Two layers flattening to one name would make a file ambiguous: fail loudly.
        raise ValueError(f"SD3 module name {name!r} refers to both {other.targets} and {layer.targets}")


def _transformer_names(layout: Mapping[str, tuple[Target, ...]], table: dict[str, SD3Layer]) -> None:
    for form in FORMS.values():
        for original, targets in layout.items():
            if form.layout == "original":
                _add(table, form_name(form.name, TRANSFORMER, original),
                     SD3Layer(TRANSFORMER, form.name, targets, original))
                continue
            for slot, t in enumerate(targets):
                whole = Target(t.path, 0, t.stop - t.start)  # the model's own rows: no offset, no swap
                _add(table, form_name(form.name, TRANSFORMER, t.path),
                     SD3Layer(TRANSFORMER, form.name, (whole,), original, slot if len(targets) > 1 else None))


def _text_encoder_names(part: str, model: nn.Module, table: dict[str, SD3Layer]) -> None:
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if part == "te3":  # T5: transformers' own paths (encoder.block.N.layer.0.SelfAttention.q)
            variants = {path}
        else:  # CLIP: the text_model. form files write, and the form without it
            canonical = text_encoder_canonical_path(path)
            variants = {canonical, canonical.removeprefix("text_model.")}
        target = (Target(path, 0, _rows(module)),)
        for form in FORMS.values():
            if part in form.prefixes:
                for v in variants:
                    _add(table, form_name(form.name, part, v), SD3Layer(part, form.name, target))


class SD3Names:
    """Every name each file form gives each adaptable layer of an SD3 pipeline's models.

    `models` maps part ("transformer", "te1", "te2", "te3") to the model (a pipeline's ``transformer``,
    ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``, or architectures.meta_pipeline's); parts left out
    or None have no names. :meth:`from_pipeline` takes them from a pipeline."""

    def __init__(self, models: Mapping[str, nn.Module | None]) -> None:
        self.models = {part: m for part, m in models.items() if m is not None}
        transformer = self.models.get(TRANSFORMER)
        # original-layout layer -> the model layers it is (original_layout)
        self.layout: dict[str, tuple[Target, ...]] = original_layout(transformer) if transformer is not None else {}
        self.table: dict[str, SD3Layer] = {}
        for part, model in self.models.items():
            if part == TRANSFORMER:
                _transformer_names(self.layout, self.table)
            else:
                _text_encoder_names(part, model, self.table)

    @classmethod
    def from_pipeline(cls, pipe: Any) -> SD3Names:
        return cls({p.name: getattr(pipe, p.pipeline_attr, None) for p in SD3_PARTS})

    def match(self, name: str) -> SD3Layer | None:
        """The layer(s) a file module name of any form (dotted or flat) adapts, or None."""
        return self.table.get(flat(name))


@cache
def architecture_names(label: str) -> SD3Names:
    """The SD3Names of a real SD3 architecture (an architectures.SD3_ARCHITECTURES label), its models built on the
    meta device (names and shapes, no weights): for tools that name a file's layers without a model."""
    if label not in SD3_ARCHITECTURES:
        raise KeyError(f"{label!r} is not an SD3 architecture ({', '.join(SD3_ARCHITECTURES)})")
    return SD3Names.from_pipeline(meta_pipeline(label))


# ---------------------------------------------------------------------------------------------
# Reading files of every form
# ---------------------------------------------------------------------------------------------

# A file's parameter names -> sd-loha's (kohya's) names. PEFT and OneTrainer's A/B forms say lora_A / lora_B.
_PARAMS: dict[str, str] = {p: p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                          "alpha", "scale", "dora_scale", "lora_up.weight", "lora_down.weight",
                                          "lora_mid.weight")}
_PARAMS.update({"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
                "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
                "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight"})
# Longest first, so "x.lora_up.weight" is never read as "x.lora_up" + "weight".
_SUFFIXES = sorted(_PARAMS, key=len, reverse=True)


def split_param(key: str) -> tuple[str, str]:
    """(module name, sd-loha parameter name) of a key in any form: the parameter is the known suffix
    (``lora_A.weight`` read as ``lora_down.weight``), the module everything before it, dots and all. A key
    with no known suffix splits at its first dot, as io.split_key (the parameter is then reported as unknown)."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], _PARAMS[suffix]
    name, _, param = key.partition(".")
    return name, param


def _alternatives(prefixes: Iterable[str]) -> str:
    return "|".join(sorted({re.escape(flat(p)) for p in prefixes}, key=len, reverse=True))


# Text-encoder prefixes no SDXL file has: T5's in every form, and ComfyUI's text_encoders.* for the CLIPs.
_SD3_ONLY_TEXT = [f.prefixes[p] for f in FORMS.values() for p in f.prefixes
                  if p == "te3" or (f.name == "comfy" and p != TRANSFORMER)]
# Names only SD3 files have, in any form (flattened): an original-layout block, embedder or final layer under an
# original-layout form's prefix, a diffusers transformer layer under a diffusers-layout form's prefix (never
# reached through an SD1 UNet's attentions_N_), and the text-encoder prefixes only SD3 has (T5's, ComfyUI's).
_SD3_NAME = re.compile(
    rf"^({_alternatives(f.prefixes[TRANSFORMER] for f in FORMS.values() if f.layout == 'original')})"
    r"(joint_blocks_\d+_(x|context)_block_|final_layer_|[xyt]_embedder_)"
    rf"|^({_alternatives(f.prefixes[TRANSFORMER] for f in FORMS.values() if f.layout == 'diffusers')})"
    r"(transformer_blocks_\d+_(attn2?_|ff_|ff_context_|norm1)|time_text_embed_|pos_embed_proj|norm_out_linear"
    r"|proj_out|context_embedder)"
    rf"|^({_alternatives(_SD3_ONLY_TEXT)})"
)


def is_sd3_state_dict(keys: Iterable[str]) -> bool:
    """Whether adapter keys name SD3 modules (any form); SD1/SD2/SDXL files never match."""
    return any(_SD3_NAME.match(flat(split_param(k)[0])) for k in keys)


def read_sd3(source: str | os.PathLike | Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None,
             where: str = "<state dict>") -> ParsedFile:
    """An SD3 adapter of any form (:data:`FORMS`), a .safetensors path or its tensors (`metadata`, `where`: the
    file's metadata and name for messages), as a ParsedFile: module names are the file's own with dots made
    underscores (:func:`flat`; :meth:`SD3Names.match` takes them), parameters in sd-loha's names (``lora_A`` ->
    ``lora_down``), validated as io.parse_state_dict validates every file."""
    if isinstance(source, Mapping):
        tensors, meta = source, dict(metadata or {})
    else:
        tensors, meta = read_safetensors(source)
        where = str(source)
    normal: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        module, param = split_param(key)
        normal[f"{flat(module)}.{param}"] = value
    return parse_state_dict(normal, source=where, metadata=meta)


# ---------------------------------------------------------------------------------------------
# Which SD3 a file was made for
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SD3Evidence:
    """What an SD3 file's names and shapes say about the transformer it was made for."""

    width: int | None  # hidden size (1536 Medium, 2432 Large)
    last_block: int | None  # the highest block index named
    attn2_blocks: frozenset[int]  # blocks with an x-stream attn2 (SD3.5 Medium's dual attention)
    x_modulation: Mapping[int, int]  # block -> rows of its x-stream adaLN (6 or 9 x width)


_BLOCK_NAME = re.compile(r"(?:joint|transformer)_blocks_(\d+)_(.+)$")
# Tails whose layer's input is not the hidden width: (tail, how the width follows from (out, in)).
_WIDTH_FROM_OUT = ("embedder_mlp_0", "embedder_mlp_2", "embedder_linear_1", "embedder_linear_2", "context_embedder",
                   "x_embedder_proj", "pos_embed_proj")
_FOUR_X_IN = ("mlp_fc2", "ff_net_2", "ff_context_net_2")
# Flat names of text-encoder modules in any form (the texts' widths say nothing of the transformer).
_TEXT_ENCODER_NAMES = tuple({flat(f.prefixes[p]) for f in FORMS.values() for p in f.prefixes if p != TRANSFORMER})


def sd3_file_evidence(parsed: ParsedFile) -> SD3Evidence | None:
    """The transformer facts an SD3 file's module names and shapes give; None when it is not an SD3 file."""
    names = [n for n in parsed.modules if _SD3_NAME.match(n)]
    if not names:
        return None
    widths: Counter[int] = Counter()
    blocks: set[int] = set()
    attn2: set[int] = set()
    x_mod: dict[int, int] = {}
    for name in names:
        mod = parsed.modules[name]
        if mod.tucker:
            continue
        out, inn = mod.out_features(), mod.in_features()
        m = _BLOCK_NAME.search(name)
        if m is not None:
            block, tail = int(m.group(1)), m.group(2)
            blocks.add(block)
            if tail.startswith(("x_block_attn2_", "attn2_")):
                attn2.add(block)
            if tail in ("x_block_adaLN_modulation_1", "norm1_linear"):
                x_mod[block] = out
        if not name.startswith(_TEXT_ENCODER_NAMES):
            widths[out if name.endswith(_WIDTH_FROM_OUT) else inn // 4 if name.endswith(_FOUR_X_IN) else inn] += 1
    width = widths.most_common(1)[0][0] if widths else None
    return SD3Evidence(width, max(blocks) if blocks else None, frozenset(attn2), x_mod)


def transformer_problem(evidence: SD3Evidence, config: Mapping[str, Any] | Any) -> str | None:
    """Why a file with `evidence` cannot be for a transformer of `config` (a SD3Transformer2DModel config), or
    None when its names and shapes fit."""
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    width = int(get("num_attention_heads")) * int(get("attention_head_dim"))
    layers = int(get("num_layers"))
    dual = set(get("dual_attention_layers", ()) or ())
    if evidence.width is not None and evidence.width != width:
        return f"its layers are {evidence.width} wide, the transformer's {width}"
    if evidence.last_block is not None and evidence.last_block >= layers:
        return f"it names block {evidence.last_block}, the transformer has {layers} blocks"
    extra = sorted(evidence.attn2_blocks - dual)
    if extra:
        return f"it adapts the dual attention (attn2) of blocks {extra}, which the transformer lacks"
    for block, rows in evidence.x_modulation.items():
        want = (9 if block in dual else 6) * width
        if rows != want:
            return (f"its block {block} x-stream adaLN has {rows} rows, the transformer's {want} "
                    f"({'dual attention' if block in dual else 'no dual attention'} there)")
    return None


def fitting_architectures(evidence: SD3Evidence) -> list[str]:
    """The real SD3 architectures (architectures.SD3_ARCHITECTURES labels) whose transformer a file fits."""
    return [label for label, arch in SD3_ARCHITECTURES.items() if transformer_problem(evidence, arch.transformer) is None]


# kohya's modelspec.architecture for SD3 (library/sai_model_spec.py: "stable-diffusion-3-" + medium / 5-medium /
# 5-large, then "/lora" ...): the file's own word when its layers fit more than one size.
_MODELSPEC = {"stable-diffusion-3-5-large": "SD3.5 Large", "stable-diffusion-3-5-medium": "SD3.5 Medium",
              "stable-diffusion-3-medium": "SD3 Medium"}


def sd3_file_architecture(parsed: ParsedFile) -> str | None:
    """The SD3 architecture a file was made for ("SD3 Medium", "SD3.5 Medium", "SD3.5 Large"), from its names and
    shapes, its modelspec.architecture where those fit several (a file adapting no attn2 nor adaLN layer fits
    both Mediums); "SD3 Medium or SD3.5 Medium" when nothing tells; None for a file that is not SD3."""
    evidence = sd3_file_evidence(parsed)
    if evidence is None:
        return None
    fits = fitting_architectures(evidence)
    spec = parsed.metadata.get("modelspec.architecture", "")
    said = next((label for key, label in _MODELSPEC.items() if spec.startswith(key)), None)
    if len(fits) == 1:
        return fits[0]
    if said is not None and (said in fits or not fits):
        return said
    return " or ".join(fits) if fits else "SD3 (a size sd-loha does not know)"
