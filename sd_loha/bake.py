"""Baking adapters into a base model: `sd-loha merge`.

The adapters are merged by `apply_loha` (fp32 weights, every ΔW in fp32, one cast), then the pipeline is
written as a diffusers folder or as one `.safetensors` checkpoint in the original (LDM / CompVis, SGM for
SDXL; SD 3.x's MMDiT layout with its CLIPs and T5 under ``text_encoders.``) layout that A1111, ComfyUI and
diffusers' `from_single_file` read. The diffusers -> original key conversion is ours; diffusers ships only the
other direction in its loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .atomic import replace_file_atomic, write_folder_atomic, write_text_atomic
from .formats import load_adapter
from .generate import AdapterSpec
from .io import AdapterFileError, addnet_hash
from .models import SD3_FILE_PARTS, detect_family, load_pipeline, text_encoders
from .naming import text_encoder_canonical_path, unet_ldm_path
from .peft_format import peft_sources
from .sd3_names import original_layout

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
METADATA_KEY = "sd_loha_merge"  # JSON in the checkpoint's __metadata__ (and merge.json in a folder)
FOLDER_RECORD = "sd_loha_merge.json"

# Where each part of a pipeline lives in an original-layout checkpoint, per family. The CLIP-L encoders keep
# transformers' own layout under a prefix; SD2's and SDXL's OpenCLIP encoders are rewritten (`_open_clip`).
_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "te": "cond_stage_model.transformer."},
    "sd2": {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "te": "cond_stage_model.model."},
    "sdxl": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
             "te1": "conditioner.embedders.0.transformer.", "te2": "conditioner.embedders.1.model."},
    # SD 3.x: SAI's files (and diffusers' single_file_utils) keep each text encoder's transformers layout under
    # its `text_encoders.<name>.transformer.` prefix
    "sd3": {"transformer": "model.diffusion_model.", "vae": SD3_FILE_PARTS["vae"][0],
            **{te: SD3_FILE_PARTS[attr][0] + "transformer." for te, attr in
               (("te1", "text_encoder"), ("te2", "text_encoder_2"), ("te3", "text_encoder_3"))}},
}
_OPEN_CLIP_PARTS = {("sd2", "te"), ("sdxl", "te2")}

Progress = Callable[[str, float], None]  # (what is happening, fraction done 0..1)


@dataclass
class BakeReport:
    """What `bake_adapters` wrote: the output, its layout and dtype, and per adapter what it patched."""

    out: Path
    layout: str  # "single-file" | "diffusers"
    dtype: str
    base_model: str
    family: str
    adapters: list[dict[str, Any]] = field(default_factory=list)  # file, addnet_hash, strengths, layers patched

    def __str__(self) -> str:
        lines = [f"wrote {self.out} ({self.layout}, {self.dtype}, {self.family}) from {self.base_model}"]
        for a in self.adapters:
            lines.append(f"  {a['file']}: strength {a['strength']:g}, text encoder {a['te_strength']:g}, "
                         f"{a['layers']} layers ({adapter_hash_label(a)})")
        return "\n".join(lines)


def _as_spec(adapter: AdapterSpec | str | os.PathLike | Sequence[Any]) -> AdapterSpec:
    if isinstance(adapter, AdapterSpec):
        return adapter
    if isinstance(adapter, (str, os.PathLike)):
        return AdapterSpec(str(adapter))
    path, *strengths = adapter
    return AdapterSpec(str(path), *(float(s) for s in strengths if s is not None))


def adapter_hash_label(record: Mapping[str, Any]) -> str:
    """How a merged adapter's record names its file: the addnet hash of a file, those of a PEFT folder's files."""
    if "addnet_hash" in record:
        return f"addnet {record['addnet_hash'][:12]}"
    return "addnet " + ", ".join(f"{a} {h[:12]}" for a, h in record["peft_addnet_hashes"].items())


def _adapter_record(path: str) -> dict[str, Any]:
    """What identifies an adapter in the merge record: its file name and addnet hash; a PEFT folder's name and
    the addnet hash of each model's adapter_model.safetensors."""
    sources = peft_sources(path) if Path(path).is_dir() else []
    if not sources:
        return {"file": Path(path).name, "addnet_hash": addnet_hash(path)}
    return {"file": Path(path).name,
            "peft_addnet_hashes": {s.pipeline_attr or "": addnet_hash(s.weights_path) for s in sources}}


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # streamed: checkpoints are GBs


def base_model_identity(model: str) -> dict[str, str]:
    """What identifies the base model in a merge record, never a local path: its name (a local file's or
    folder's base name, else the hub id or built-in name as given) and, for a local checkpoint, a sha256 of
    its weights: of the whole file for a single file (A1111's checkpoint hash), and for a diffusers folder of
    the lines "<relative path> <sha256>" of model_index.json and every component's config and weights files,
    in sorted order (so it changes with any weight, and not with where the folder lies)."""
    path = Path(model).expanduser()
    if path.is_file():
        return {"name": path.name, "sha256": _sha256_file(path)}
    if path.is_dir() and (path / "model_index.json").is_file():
        files = sorted(p for p in [path / "model_index.json", *path.glob("*/*")]
                       if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
        manifest = "".join(f"{p.relative_to(path).as_posix()} {_sha256_file(p)}\n" for p in files)
        return {"name": path.resolve().name, "sha256": hashlib.sha256(manifest.encode()).hexdigest()}
    return {"name": model}


def _output_layout(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix == ".safetensors":
        return "single-file"
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise ValueError(f"--out {out}: sd-loha writes no pickles; give a .safetensors file or a folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file that is not .safetensors; give a .safetensors file or a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise ValueError(f"--out {out} is a folder holding other files (no model_index.json): "
                         "choose an empty or new folder, or a diffusers folder to replace")
    return "diffusers"


def check_bake_inputs(adapters: Sequence[AdapterSpec], out: Path, dtype: str, model: str | None = None) -> str:
    """Every check that needs no model, so a mistake fails in a second, not after loading a checkpoint.
    Returns the output layout."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not adapters:
        raise ValueError("no adapter to merge: give at least one --loha FILE[:STRENGTH[:TE_STRENGTH]]")
    for spec in adapters:
        if not Path(spec.path).exists():
            raise AdapterFileError(f"--loha {spec.path}: no such file or folder (give a .safetensors adapter file "
                                   "or a PEFT adapter folder)")
        load_adapter(spec.path)  # header, tensors and values checked now, not after the model loads
    base = Path(model).expanduser() if model is not None else None
    if base is not None and base.exists() and base.resolve() == out.expanduser().resolve():
        raise ValueError(f"--out {out} is the base model (--model {model}): the merge would replace it; write the "
                         "merged model to another path")
    return _output_layout(out)


def bake_adapters(
    model: str,
    adapters: Sequence[AdapterSpec | str | os.PathLike | Sequence[Any]],
    out: str | os.PathLike,
    dtype: str = "fp16",
    *,
    progress: Progress | None = None,
    base_config: str | None = None,
) -> BakeReport:
    """Merge `adapters` (paths, `AdapterSpec`s or (path, strength[, te_strength]) tuples, applied in order)
    into the base `model` (anything `load_pipeline` reads) and save the result to `out`: a `.safetensors`
    path gets a single-file checkpoint in the original layout, any other path a diffusers folder.

    The weights are loaded and merged in fp32 and cast to `dtype` ("fp16", "bf16" or "fp32") once, so the
    output equals `apply_loha` on an fp32 pipeline, cast. Written atomically; the record of what was merged
    (files, addnet hashes, strengths, base model, sd-loha version) goes in the file's metadata. `base_config`
    completes a single-file `model` (load_pipeline's config: e.g. an SD 3.x file without text encoders).
    """
    from .merge import apply_loha, keep_merged
    from .version import __version__

    report_progress = progress or (lambda _what, _fraction: None)
    specs = [_as_spec(a) for a in adapters]
    out = Path(out)
    layout = check_bake_inputs(specs, out, dtype, model)
    base = base_model_identity(model)  # before loading: the read also warms the page cache for the load

    report_progress(f"loading {model}", 0.0)
    pipe = load_pipeline(model, dtype=torch.float32, config=base_config)
    family = detect_family(pipe)
    records = []
    for i, spec in enumerate(specs):
        report_progress(f"merging {spec.path}", 0.1 + 0.6 * i / len(specs))
        te = spec.strength if spec.te_strength is None else spec.te_strength
        lbw = spec.block_weights  # `FILE:S:lbw=...`
        applied = apply_loha(pipe, spec.path, unet_strength=spec.strength, text_encoder_strength=te,
                             name=f"{i}:{spec.name}",  # the index keeps two files of one name apart
                             **({"block_weights": lbw} if lbw else {}))
        records.append({**_adapter_record(spec.path), "strength": spec.strength, "te_strength": te,
                        **({"block_weights": lbw} if lbw else {}), "layers": applied.total})
    # Nothing changes a strength again: drop the clean originals the merge keeps, up to a second copy of the model.
    keep_merged(pipe)
    record = {"base_model": base["name"], **({"base_model_sha256": base["sha256"]} if "sha256" in base else {}),
              "family": family.name, "prediction_type": family.prediction_type,
              "dtype": dtype, "sd_loha_version": __version__,
              "adapters": [{k: v for k, v in r.items() if k != "layers"} for r in records]}

    report_progress(f"writing {out}", 0.7)
    if layout == "single-file":
        # Cast in place, tensor by tensor (each fp32 weight is freed as its copy is made), and stream the file
        # from the tensors: the fp32 model, a cast state dict and the serialised bytes never coexist.
        state = original_state_dict(pipe.to(dtype=DTYPES[dtype]))
        del pipe
        with replace_file_atomic(out) as tmp:
            save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(record), "format": "pt"})
    else:
        _save_folder(pipe.to(dtype=DTYPES[dtype]), out, record)
    report_progress("done", 1.0)
    return BakeReport(out, layout, dtype, str(model), family.label, records)


def _save_folder(pipe: Any, out: Path, record: Mapping[str, Any]) -> None:
    """save_pretrained into a temp sibling folder, then swap it in, so `out` is never half written nor lost."""
    with write_folder_atomic(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_text_atomic(tmp / FOLDER_RECORD, json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# diffusers -> original layout
# ---------------------------------------------------------------------------------------------

def original_state_dict(pipe: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder(s) as one state dict in the original checkpoint layout
    (keys A1111, ComfyUI and `from_single_file` read), each tensor cast to `dtype` (None: kept)."""
    family = detect_family(pipe).name
    prefixes = _PREFIXES[family]
    denoiser = {"transformer": pipe.transformer} if family == "sd3" else {"unet": pipe.unet}
    models = {**denoiser, "vae": pipe.vae, **text_encoders(pipe)}
    out: dict[str, torch.Tensor] = {}
    for part, model in models.items():
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if part == "unet":
            converted = unet_to_original(state, model.config)
        elif part == "transformer":
            converted = sd3_transformer_to_original(model)
        elif part == "te3":  # T5: its own names; the tied token tables as two tensors (safetensors shares none)
            converted = {k: v.clone() if k == "encoder.embed_tokens.weight" else v for k, v in state.items()}
        elif part == "vae":
            converted = vae_to_original(state)
        elif (family, part) in _OPEN_CLIP_PARTS:
            converted = open_clip_to_original(state)
        else:
            converted = {text_encoder_canonical_path(k): v for k, v in state.items()}
        for key, value in converted.items():
            value = value if dtype is None else value.to(dtype)
            out[prefixes[part] + key] = value.contiguous()
    return out


# The diffusers ResnetBlock2D norms, which naming.unet_ldm_path (layers only) does not map: each sits in the
# LDM ResBlock's Sequential next to a conv it does map, at index 0.
_UNET_RESNET_NORMS = {"norm1": ("conv1", "in_layers.2", "in_layers.0"), "norm2": ("conv2", "out_layers.3", "out_layers.0")}
_UNET_TOP_NORMS = {"conv_norm_out": "out.0"}


def _unet_module_to_original(module: str, config: Any) -> str:
    ldm = unet_ldm_path(module, config)
    if ldm is not None:
        return ldm
    if module in _UNET_TOP_NORMS:
        return _UNET_TOP_NORMS[module]
    parent, _, leaf = module.rpartition(".")
    if leaf in _UNET_RESNET_NORMS and parent.rsplit(".", 2)[-2:-1] == ["resnets"]:
        sibling, sibling_ldm, norm_ldm = _UNET_RESNET_NORMS[leaf]
        ldm = unet_ldm_path(f"{parent}.{sibling}", config)
        if ldm is not None and ldm.endswith(sibling_ldm):
            return ldm[: -len(sibling_ldm)] + norm_ldm
    raise ValueError(f"UNet layer {module!r} has no place in the original checkpoint layout; "
                     "only SD 1.x / 2.x / SDXL UNets can be saved as a single file (save a diffusers folder instead)")


def unet_to_original(state: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in LDM / SGM names (without `model.diffusion_model.`)."""
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        out[f"{_unet_module_to_original(module, config)}.{param}"] = value
    return out


# SD3Transformer2DModel parameters outside its Linear / Conv layers (sd3_names.original_layout maps those): the
# qk-norms of each block, as diffusers' convert_sd3_transformer_checkpoint_to_diffusers names them
_SD3_BLOCK_NORMS = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
                    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
                    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
_SD3_BLOCK_PARAM = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def sd3_transformer_to_original(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel's weights in SD3's original (MMDiT) names, without
    `model.diffusion_model.`: q, k, v fused into one qkv (rows q|k|v), the (scale, shift) adaLN halves put back in
    the original's (shift, scale) order, as sd3_names.original_layout says for every layer."""
    state = {k: v.detach() for k, v in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for original, targets in original_layout(transformer).items():
        for param in ("weight", "bias"):
            keys = [f"{t.path}.{param}" for t in targets]
            if keys[0] not in state:
                continue
            pieces = [_swap_halves(state.pop(k)) if t.swap_halves else state.pop(k) for k, t in zip(keys, targets)]
            out[f"{original}.{param}"] = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    for key, value in state.items():
        m = _SD3_BLOCK_PARAM.fullmatch(key)
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
        elif m is not None and m.group(2) in _SD3_BLOCK_NORMS:
            out[f"joint_blocks.{m.group(1)}.{_SD3_BLOCK_NORMS[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise ValueError(f"SD 3.x transformer tensor {key!r} has no place in the original (MMDiT) layout; "
                             "save a diffusers folder instead")
    return out


# diffusers AutoencoderKL -> LDM AutoencoderKL, as (pattern, replacement) applied to the module path; `up`
# levels run the other way round in LDM, so those are computed in `_vae_module_to_original`.
_VAE_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    (r"\.conv_shortcut$", ".nin_shortcut"),
    (r"^(encoder|decoder)\.conv_norm_out$", r"\1.norm_out"),
    (r"\.attn_1\.group_norm$", ".attn_1.norm"),
    (r"\.attn_1\.to_([qkv])$", r".attn_1.\1"),
    (r"\.attn_1\.to_out\.0$", ".attn_1.proj_out"),
))
_VAE_MID_RESNET = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.")
_VAE_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.")
# LDM's VAE attention projections are 1x1 convs; diffusers' are Linear.
_VAE_CONV_ATTENTION = re.compile(r"\.attn_1\.(q|k|v|proj_out)$")


def _vae_module_to_original(module: str, up_levels: int) -> str:
    m = _VAE_MID_RESNET.match(module)
    if m:
        module = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}." + module[m.end():]
    m = _VAE_UP.match(module)
    if m:
        level = up_levels - 1 - int(m.group(1))
        inner = f"block.{m.group(3)}" if m.group(2) == "resnets" else "upsample"
        module = f"decoder.up.{level}.{inner}." + module[m.end():]
    for pattern, replacement in _VAE_RULES:
        module = pattern.sub(replacement, module)
    return module


def vae_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in LDM names (without `first_stage_model.`)."""
    up_levels = len({k.split(".")[2] for k in state if k.startswith("decoder.up_blocks.")})
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        module = _vae_module_to_original(module, up_levels)
        if param == "weight" and value.ndim == 2 and _VAE_CONV_ATTENTION.search(module):
            value = value[:, :, None, None]
        out[f"{module}.{param}"] = value
    return out


# transformers CLIP (transformers-4 paths) -> OpenCLIP, for the parts that are renamed one to one.
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def open_clip_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel(WithProjection) state dict in OpenCLIP names (without the prefix):
    q/k/v fused into `attn.in_proj_*` in that order, `text_projection` stored transposed (x @ P)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = text_encoder_canonical_path(key)
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T
            continue
        m = _CLIP_LAYER.match(key)
        if m is None:
            if key == "text_model.embeddings.position_ids":
                continue  # a buffer OpenCLIP does not have
            raise ValueError(f"text encoder tensor {key!r} has no place in the OpenCLIP layout")
        layer, module, param = m.groups()
        if module.startswith("self_attn.") and module.split(".")[1] in _QKV:
            qkv.setdefault((layer, param), {})[module.split(".")[1]] = value
            continue
        if module not in _OPEN_CLIP_LAYER:
            raise ValueError(f"text encoder tensor {key!r} has no place in the OpenCLIP layout")
        out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{param}"] = value
    for (layer, param), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts[p] for p in _QKV])
    return out
