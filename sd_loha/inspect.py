"""What is in an adapter file: algorithms, modules by part, ranks, the architecture it was made for."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .blocks import file_block
from .formats import load_adapter
from .io import SHORTHASH_DIGITS, AdapterModule, ParsedFile, addnet_hash
from .model_names import file_architecture
from .naming import PART_LABELS, name_part
from .ops import loha_delta, lora_delta
from .sd3_names import FORMS, flat, sd3_file_evidence

# SD 3.x files: (flat prefix, part) of every form (sd3_names.FORMS), longest first, so that text_encoder_2_ is never
# read as text_encoder_ and the original form's bare transformer names (no prefix) come last
_SD3_PREFIXES = sorted({(flat(f.prefixes[p]), p) for f in FORMS.values() for p in f.prefixes},
                       key=lambda x: -len(x[0]))
_SD3_GROUPS = ((r"embedder|pos_embed_proj|final_layer_linear|proj_out$", "embedders / final layer"),
               (r"_attn2?_|add_[qkv]_proj|to_add_out", "attention"), (r"_mlp_|_ff_|_ff_context_", "mlp"),
               (r"adaLN_modulation|norm1_linear|norm1_context_linear|norm_out_linear", "adaLN"))
_SD3_BLOCK = re.compile(r"(joint_blocks|transformer_blocks)_(\d+)_")


def layer_group(name: str) -> str:
    """Coarse role of a UNet module from its kohya name (either naming style)."""
    if re.search(r"attn\d|_attn_|proj_in|proj_out|self_attn", name):
        return "attention"
    if re.search(r"_ff_net_|_mlp_", name):
        return "mlp"
    return "conv/resnet"


def sd3_part(name: str) -> str:
    """The SD 3.x part ("transformer", "te1", "te2", "te3") a module name of any form adapts."""
    return next(part for prefix, part in _SD3_PREFIXES if name.startswith(prefix))


def sd3_layer_group(name: str) -> str:
    """Coarse role of an SD 3.x transformer module from its name (any form)."""
    return next((group for pattern, group in _SD3_GROUPS if re.search(pattern, name)), "other")


def _part_group_block(name: str, architecture: str | None, sd3: bool) -> tuple[str, str, str]:
    """(part, group, block label for the norms) of a module."""
    if sd3:
        part = sd3_part(name)
        if part != "transformer":
            return part, "layers", "BASE"
        m = _SD3_BLOCK.search(name)
        return part, sd3_layer_group(name), f"{m.group(1)}_{m.group(2)}" if m else "other"
    part = name_part(name) or "unknown"
    return part, layer_group(name) if part == "unet" else "layers", file_block(name, architecture)


def _flat_delta(mod: AdapterModule) -> torch.Tensor:
    t = mod.tensors
    if mod.algo == "loha":
        if mod.tucker:
            shape = (mod.out_features(), mod.in_features(), *t["hada_t1"].shape[2:])
        else:
            shape = (mod.out_features(), mod.in_features())
        return loha_delta(t, torch.Size(shape), mod.scale)
    # The factors' own shapes give the delta's: (out, in[, kh, kw]), with a lora_mid's kernel for Tucker LoCon.
    return lora_delta(t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight"), scale=mod.scale)


def summarize(source: str | os.PathLike | ParsedFile, *, delta_norms: bool = False) -> dict[str, Any]:
    """A JSON-able summary of an adapter file (what `sd-loha inspect` prints)."""
    parsed = source if isinstance(source, ParsedFile) else load_adapter(source)
    algos: Counter = Counter()
    parts: dict[str, Counter] = {}
    ranks: Counter = Counter()
    norms: dict[str, float] = {}
    architecture = file_architecture(parsed)
    sd3 = sd3_file_evidence(parsed) is not None
    for name, mod in parsed.modules.items():
        algo = mod.algo + (" (Tucker)" if mod.tucker else "") + (" +DoRA" if mod.dora_scale is not None else "")
        algos[algo] += 1
        part, group, block = _part_group_block(name, architecture, sd3)
        parts.setdefault(part, Counter())[group] += 1
        alpha = "none" if mod.alpha is None else f"{mod.alpha:g}"
        ranks[f"rank {mod.rank}, alpha {alpha}"] += 1
        if delta_norms:
            key = f"{part}:{block}"  # LoRA Block Weight's ids, as block weights use (SD 3.x: the joint blocks)
            norms[key] = norms.get(key, 0.0) + float(_flat_delta(mod).norm() ** 2)
    path = Path(parsed.source)
    out: dict[str, Any] = {
        "file": parsed.source,
        # What A1111 writes as `Lora hashes` and Civitai looks the file up by (None for an in-memory state dict).
        "addnet_hash": addnet_hash(path) if path.is_file() else None,
        "architecture": architecture or "unknown",
        "algorithms": dict(algos),
        "modules": sum(algos.values()),
        "parts": {PART_LABELS.get(p, p): dict(c) for p, c in parts.items()},
        "rank_alpha": dict(ranks.most_common()),
        "unsupported_modules": sorted(parsed.unsupported),
        "ignored_params": {n: list(p) for n, p in sorted(parsed.ignored.items())},
        "metadata": parsed.metadata,
    }
    if delta_norms:
        out["delta_norm_by_block"] = {k: v ** 0.5 for k, v in norms.items()}
    return out


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"file:          {summary['file']}",
        f"made for:      {summary['architecture']}",
    ]
    if summary.get("addnet_hash"):
        lines.append(f"addnet hash:   {summary['addnet_hash'][:SHORTHASH_DIGITS]} (A1111 / Civitai; full {summary['addnet_hash']})")
    lines += [
        f"modules:       {summary['modules']}  ("
        + ", ".join(f"{k}: {v}" for k, v in summary["algorithms"].items()) + ")",
    ]
    for part, groups in summary["parts"].items():
        lines.append(f"  {part + ':':<28}" + ", ".join(f"{g} {n}" for g, n in groups.items()))
    lines.append("rank / alpha:")
    lines += [f"  {k}: {v} modules" for k, v in summary["rank_alpha"].items()]
    if summary["unsupported_modules"]:
        lines.append(f"not mergeable: {len(summary['unsupported_modules'])} modules (unknown algorithm): "
                     + ", ".join(summary["unsupported_modules"][:5]) + (" …" if len(summary["unsupported_modules"]) > 5 else ""))
    if summary.get("ignored_params"):
        lines.append(f"ignored parameters: {len(summary['ignored_params'])} modules carry parameters sd-loha does not use")
    meta = summary["metadata"]
    if meta:
        lines.append("metadata:")
        for k in sorted(meta):
            v = meta[k]
            lines.append(f"  {k}: {v if len(v) <= 120 else v[:117] + '...'}")
    return "\n".join(lines)
