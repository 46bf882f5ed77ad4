#!/usr/bin/env python
"""Training-device memory of an SDXL LoHA step at 1024 px, by component, per frozen-base storage dtype.

    python bench/bench_memory.py                 # SDXL (real architecture, random weights), 1024 px, batch 1
    python bench/bench_memory.py --size tiny     # the same on a small SDXL-shaped UNet: seconds (the test runs it)
    python bench/bench_memory.py --table         # writes sd_loha/assets/activation_memory.json (see below)
    python bench/bench_memory.py --device cuda   # on a GPU: also a real step's torch.cuda.max_memory_allocated

The setting of a low-memory SDXL run: latents and text-encoder outputs cached (so the VAE and the text encoders
are off the training device and only the UNet with its adapter lives there), gradient checkpointing, batch 1,
adapter in fp32 trained with AdamW. For each base storage (bf16; fp8 = diffusers layerwise casting; int8 / nf4 =
bitsandbytes, sd_loha.train.lowmem.store_frozen_base) and each adapter on the same targets (sd-loha LoHA rank 8,
LyCORIS LoHA rank 8, PEFT LoRA r16: equal parameter counts, bench/bench_train_step.py's variants), the bytes
resident on the training device:

- base: the UNet's parameters and buffers by storage kind, from real tensors (the real-size UNet is built on the
  CPU in bf16 with random weights and stored as asked; bitsandbytes quantizes as it moves, so its packed weights
  and quantization states, absmax and row scales, are counted as they are);
- adapter: its parameters (fp32); gradients: one per adapter parameter, same size; optimizer: AdamW's two fp32
  moments per parameter, from a real optimizer step (its ``step`` counters stay on the host unless capturable);
- saved: the bytes autograd keeps between the forward and the backward (bench/saved_memory.py: unique storages
  still alive after the forward, parameters excluded), from a forward on the meta device (no arithmetic: seconds
  at 1024 px) in the UNet's dtype without autocast. bitsandbytes layers do not run on the meta device: int8 and
  nf4 take the bf16 base's count (the ``--size tiny`` run counts all four on real tensors for comparison).
  Not counted: temporaries inside the forward, the recomputed activations of the one checkpointed block whose
  backward runs, allocator rounding and the CUDA context: the GPU run's max_memory_allocated has those.

The activation table (``--table``): for each family (sd1, sd2, sdxl), preset (attn-only, attn-mlp, full), square
size, batch (1, 2), gradient checkpointing (on, off) and element size (2: bf16, 4: fp32), the saved bytes of the
UNet with sd-loha's ``add_loha`` on the preset (rank 8, conv rank 8 for full, alpha 1; text encoder not trained),
encoder hidden states of the family's width and 77 tokens, SDXL's added conditioning. Deterministic: no timing.
sd_loha.train.memory reads it for the preflight's estimate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_train_step as bts  # noqa: E402
import saved_memory  # noqa: E402
from random_models import SMALL  # noqa: E402

from sd_loha.architectures import SD15_UNET, SD21_UNET, SDXL_UNET, build_model  # noqa: E402
from sd_loha.atomic import write_text_atomic  # noqa: E402
from sd_loha.train.lowmem import checkpointing_func, store_frozen_base, stored_as  # noqa: E402

TABLE = HERE.parent / "sd_loha" / "assets" / "activation_memory.json"
SIZES = {"sdxl": (SDXL_UNET, 1024), "tiny": (dict(SDXL_UNET, **SMALL["sdxl"]["unet"]), 64)}
STORAGES = ("bf16", "fp8", "int8", "nf4")
VARIANTS = ("sd-loha", "lycoris", "peft-lora")
TARGETS = {"bf16": 8, "fp8": 6, "nf4": 5}  # the GiB targets at SDXL 1024 px batch 1
GiB = 2**30

# The activation table's rows: family -> (UNet config, square sizes); the adapter is the one add_loha call below.
TABLE_FAMILIES = {"sd1": (SD15_UNET, (512, 768, 1024)), "sd2": (SD21_UNET, (512, 768, 1024)),
                  "sdxl": (SDXL_UNET, (512, 768, 1024, 1280))}
TABLE_PRESETS = ("attn-only", "attn-mlp", "full")
TABLE_ADAPTER = "sd-loha LoHA rank 8 (conv rank 8 for full), alpha 1"


# ------------------------------------------------------------------------------------------ inputs
def unet_inputs(cfg: dict[str, Any], side: int, batch: int, dtype: torch.dtype, device: str) -> dict[str, Any]:
    """One step's UNet inputs: latents of side/8, 77 tokens of the family's width, SDXL's added conditioning."""
    g = torch.Generator().manual_seed(1)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype) if device != "meta" else \
            torch.empty(*shape, device="meta", dtype=dtype)

    lat = side // 8
    out = {"sample": rnd(batch, cfg["in_channels"], lat, lat),
           "timestep": torch.full((batch,), 500, device=device),
           "encoder_hidden_states": rnd(batch, 77, cfg["cross_attention_dim"])}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        out["added_cond_kwargs"] = {"text_embeds": rnd(batch, pooled), "time_ids": rnd(batch, 6)}
    return out


def forward_loss(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    out = model(**inputs).sample
    return out.float().square().mean()  # the loss's own saved tensor is the fp32 copy of the prediction


def meta_model(cfg: dict[str, Any], dtype: torch.dtype, *, storage: str = "bf16", checkpointing: bool = True,
               adapter=None) -> nn.Module:
    """A meta UNet stored and checkpointed as asked; ``adapter(unet)`` puts the adapter in and returns the
    model to run (the UNet itself, or a library's wrapper)."""
    unet = build_model("UNet2DConditionModel", cfg, meta=True).to(dtype).requires_grad_(False).train()
    if storage == "fp8":
        store_frozen_base(unet, "fp8", dtype)
    if checkpointing:
        custom = checkpointing_func(storage)
        unet.enable_gradient_checkpointing(*([custom] if custom is not None else []))
    return adapter(unet) if adapter is not None else unet


def step_saved(model: nn.Module, cfg: dict[str, Any], side: int, batch: int, dtype: torch.dtype) -> int:
    """Saved-for-backward bytes of one step of ``model`` (meta or real) at ``side`` px and ``batch``."""
    device = next(model.parameters()).device.type
    inputs = unet_inputs(cfg, side, batch, dtype, device)
    return saved_memory.saved_bytes(model, lambda: forward_loss(model, inputs))


def meta_saved(cfg: dict[str, Any], side: int, batch: int, dtype: torch.dtype, **kw: Any) -> int:
    """:func:`step_saved` of a fresh :func:`meta_model`."""
    return step_saved(meta_model(cfg, dtype, **kw), cfg, side, batch, dtype)


# ------------------------------------------------------------------------------------------ resident bytes
def _quant_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState (absmax, code, offset, and its nested state's)."""
    for v in vars(obj).values():
        if isinstance(v, torch.Tensor):
            yield v
        elif type(v).__name__ == "QuantState":
            yield from _quant_tensors(v)


def resident_by_kind(model: nn.Module) -> dict[str, int]:
    """Bytes of the frozen base by storage kind ("bf16", "fp8", "nf4 packed", "nf4 state", "int8 scales"...),
    every storage once; trainable parameters (the adapter) left out."""
    seen: set[int] = set()
    out: dict[str, int] = defaultdict(int)

    def add(kind: str, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st._cdata not in seen:
            seen.add(st._cdata)
            out[kind] += st.nbytes()

    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                continue
            qs = getattr(p, "quant_state", None)
            scales = getattr(p, "SCB", None)
            if qs is not None:
                add(f"{qs.quant_type} packed", p)
                for t in _quant_tensors(qs):
                    add(f"{qs.quant_type} state", t)
            elif p.dtype == torch.int8:
                add("int8", p)
                if scales is not None:
                    add("int8 scales", scales)
            else:
                add(str(p.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float8_e4m3fn", "fp8")
                    .replace("float32", "fp32"), p)
        for b in m.buffers(recurse=False):
            add("buffers", b)
    return dict(out)


def real_unet(cfg: dict[str, Any], storage: str, device: str) -> nn.Module:
    """The UNet in bf16 with random weights (built on meta, then filled: no fp32 copy), stored as asked."""
    unet = build_model("UNet2DConditionModel", cfg, meta=True).to(torch.bfloat16)
    unet = unet.to_empty(device="cpu").requires_grad_(False).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in list(unet.parameters()) + list(unet.buffers()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32 if p.numel() < 2**20 else p.dtype) * 0.02)
    if storage != "bf16":
        store_frozen_base(unet, storage, torch.bfloat16)
    return unet.to(device)  # bitsandbytes quantizes here


def adapter_bytes(params: list[nn.Parameter]) -> dict[str, int]:
    """Adapter, gradient and AdamW state bytes of ``params`` (a real optimizer step on zero gradients)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4)
    opt.step()
    state = sum(t.untyped_storage().nbytes() for s in opt.state.values() for k, t in s.items()
                if isinstance(t, torch.Tensor) and k != "step")
    out = {"adapter": sum(p.untyped_storage().nbytes() for p in params),
           "gradients": sum(p.grad.untyped_storage().nbytes() for p in params), "optimizer": state}
    for p in params:
        p.grad = None
    return out


def make_adapter(variant: str, targets: str, share: bool = False):
    """``adapter(unet) -> model`` for bench_train_step's variant; its trainable parameters end up in
    ``adapter.params``."""
    def adapter(unet: nn.Module):
        paths = bts.target_paths(unet, targets)
        model, params, _ = bts.make_variant(variant, unet, targets, paths, torch.float32, share=share)
        adapter.params = params
        return model
    return adapter


# ------------------------------------------------------------------------------------------ the SDXL run
def real_step_peak(model: nn.Module, params: list[nn.Parameter], inputs: dict[str, Any]) -> dict[str, int]:
    """A real training step on CUDA under bf16 autocast (as the trainer runs): resident bytes before it, the
    saved bytes of its forward (real tensors) and torch.cuda.max_memory_allocated over forward, backward and
    the AdamW update."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        saved = saved_memory.saved_bytes(model, lambda: forward_loss(model, inputs))
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for _ in range(2):  # the second step's peak has the optimizer state in it
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward_loss(model, inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return {"cuda resident before": before, "cuda saved (real, autocast)": saved,
            "cuda max_memory_allocated": torch.cuda.max_memory_allocated()}


def measure_storage(size: str, storage: str, variants: list[str], targets: str, device: str,
                    meta_bf16: dict[str, int]) -> list[dict[str, Any]]:
    """One row per variant for one base storage (see the module docstring for each column)."""
    cfg, side = SIZES[size]
    t0 = time.perf_counter()
    base = real_unet(cfg, storage, device)
    kinds = resident_by_kind(base)
    layers = defaultdict(int)
    for m in base.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            layers[stored_as(m)] += 1
    print(f"# {storage}: base built and stored in {time.perf_counter() - t0:.0f} s; layers stored as "
          + ", ".join(f"{k}: {n}" for k, n in sorted(layers.items())), flush=True)
    rows = []
    for variant in variants:
        row: dict[str, Any] = {"storage": storage, "variant": variant, "base": kinds}
        try:
            adapter = make_adapter(variant, targets, share=True)
            model = adapter(base)
            row.update(adapter_bytes(adapter.params))
            if storage in ("bf16", "fp8"):
                row["saved"] = meta_saved(cfg, side, 1, torch.bfloat16, storage=storage,
                                          adapter=make_adapter(variant, targets))
                if storage == "bf16":
                    meta_bf16[variant] = row["saved"]
            else:
                row["saved"] = meta_bf16.get(variant)
                row["saved_note"] = "as bf16"
            if size == "tiny" or device == "cuda":
                custom = checkpointing_func(storage)  # on the copy's own modules: the shared base keeps none
                model.enable_gradient_checkpointing(*([custom] if custom is not None else []))
                if device == "cuda":
                    row.update(real_step_peak(model, adapter.params, unet_inputs(cfg, side, 1, torch.bfloat16, device)))
                else:
                    row["saved (real)"] = step_saved(model, cfg, side, 1, torch.bfloat16)
            del model, adapter
        except Exception as e:  # one adapter library failing on one storage is a finding, not the end of the run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
        gc.collect()
    del base
    gc.collect()
    return rows


def row_total(row: dict[str, Any]) -> int:
    return sum(row["base"].values()) + sum(row.get(k) or 0 for k in ("adapter", "gradients", "optimizer", "saved"))


def print_rows(rows: list[dict[str, Any]], size: str) -> None:
    def mib(n: int | None) -> str:
        return "n/a" if n is None else f"{n / 2**20:,.0f} MiB" if n >= 2**24 else f"{n / 2**10:,.0f} KiB"

    real = any("saved (real)" in r for r in rows)
    cuda = any("cuda max_memory_allocated" in r for r in rows)
    head = ["base storage", "adapter", "base weights by kind", "adapter", "gradients", "AdamW state",
            "saved for backward", "total"] + (["saved (real CPU)"] if real else []) + \
        (["CUDA resident", "CUDA saved (autocast)", "CUDA max allocated"] if cuda else []) + ["target"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        if "error" in r:
            print(f"| {r['storage']} | {r['variant']} | failed: {r['error']} |")
            continue
        kinds = ", ".join(f"{k} {mib(n)}" for k, n in sorted(r["base"].items(), key=lambda kv: -kv[1]))
        target = TARGETS.get(r["storage"]) if size == "sdxl" else None
        total = row_total(r)
        verdict = "" if target is None else f"<= {target} GiB: {'yes' if total <= target * GiB else 'NO'}"
        cells = [r["storage"], r["variant"], kinds, mib(r["adapter"]), mib(r["gradients"]), mib(r["optimizer"]),
                 mib(r["saved"]) + (f" ({r['saved_note']})" if r.get("saved_note") else ""),
                 f"{total / GiB:.2f} GiB"]
        if real:
            cells.append(mib(r.get("saved (real)")))
        if cuda:
            cells += [mib(r.get(k)) for k in ("cuda resident before", "cuda saved (real, autocast)",
                                              "cuda max_memory_allocated")]
        print("| " + " | ".join(cells + [verdict]) + " |")


# ------------------------------------------------------------------------------------------ the table
def _add_preset(preset: str):
    def adapter(unet: nn.Module) -> nn.Module:
        from sd_loha import add_loha

        add_loha(unet, preset=preset, rank=8, alpha=1, conv_rank=8 if preset == "full" else 0, conv_alpha=1,
                 text_encoder=False)
        return unet
    return adapter


def table_rows(families: list[str], presets: list[str]) -> Iterator[dict[str, Any]]:
    """The table's rows; one meta model per family, preset, checkpointing and dtype serves every size and batch."""
    for family in families:
        cfg, sides = TABLE_FAMILIES[family]
        for preset in presets:
            for checkpointing in (True, False):
                for dtype in (torch.bfloat16, torch.float32):
                    model = meta_model(cfg, dtype, checkpointing=checkpointing, adapter=_add_preset(preset))
                    for side in sides:
                        for batch in (1, 2):
                            yield {"family": family, "preset": preset, "width": side, "height": side, "batch": batch,
                                   "checkpointing": checkpointing, "element_bytes": dtype.itemsize,
                                   "saved_bytes": step_saved(model, cfg, side, batch, dtype)}


def write_table(path: Path, families: list[str], presets: list[str]) -> None:
    import diffusers

    rows = []
    t0 = time.perf_counter()
    for row in table_rows(families, presets):
        rows.append(row)
        print(f"  {row}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = {"measured_by": "python bench/bench_memory.py --table", "torch": torch.__version__.split("+")[0],
             "diffusers": diffusers.__version__, "adapter": TABLE_ADAPTER, "rows": rows}
    head = json.dumps({k: v for k, v in table.items() if k != "rows"}, indent=1)[:-2]
    body = ",\n".join("  " + json.dumps(r) for r in rows)
    write_text_atomic(path, f'{head},\n "rows": [\n{body}\n ]\n}}\n')  # one row a line: readable diffs
    print(f"wrote {len(rows)} rows to {path}")


# ------------------------------------------------------------------------------------------ main
def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return ", ".join(f"{name} {v(dist)}" for name, dist in (
        ("torch", "torch"), ("diffusers", "diffusers"), ("peft", "peft"), ("lycoris", "lycoris_lora"),
        ("bitsandbytes", "bitsandbytes")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="sdxl")
    ap.add_argument("--storages", default=",".join(STORAGES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--targets", default="attn-mlp", choices=("attn-mlp", "full"), help="the adapters' layers")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for a real step's max_memory_allocated")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--table", action="store_true", help="instead: write the activation table")
    ap.add_argument("--table-path", type=Path, default=TABLE)
    ap.add_argument("--families", default=",".join(TABLE_FAMILIES))
    ap.add_argument("--presets", default=",".join(TABLE_PRESETS))
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    if args.table:
        write_table(args.table_path, args.families.split(","), args.presets.split(","))
        print(f"# {versions()}; {time.perf_counter() - t0:.0f} s")
        return 0
    cfg, side = SIZES[args.size]
    print(f"# {args.size} UNet at {side} px, batch 1, gradient checkpointing, adapters on {args.targets}; "
          f"cached latents and text-encoder outputs (only the UNet and its adapter on the device)")
    print(f"# {versions()}; machine: {bts.machine_note(torch.device(args.device))}")
    print(f"# command: python {' '.join(sys.argv)}", flush=True)
    rows: list[dict[str, Any]] = []
    meta_bf16: dict[str, int] = {}
    storages = args.storages.split(",")
    if "bf16" not in storages and any(s in storages for s in ("int8", "nf4")):
        storages.insert(0, "bf16")  # int8 / nf4 take bf16's saved bytes
    for storage in storages:
        rows += measure_storage(args.size, storage, args.variants.split(","), args.targets, args.device, meta_bf16)
    print_rows(rows, args.size)
    print(f"\n# wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
