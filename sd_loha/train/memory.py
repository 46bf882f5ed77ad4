"""The device memory a training run will need, said before the first step needs it.

Four parts, each as exact as it can be known before the step runs:

- **weights** of the components that stay on the training device, counted from their tensors in the storage they
  will have there (a bitsandbytes layer not yet quantized is counted at the size it quantizes to);
- **adapter** parameters and their **gradients**, from the network's tensors;
- **optimizer state**, by stepping the run's own optimizer once on a zero tensor of each distinct parameter shape
  (any optimizer, its arguments included: AdamW's two fp32 moments, 8-bit blocks and their scales, Prodigy's copies);
- **activations**: the bytes autograd keeps between forward and backward, from the table
  ``bench/bench_memory.py --table`` measures (sd_loha/assets/activation_memory.json) per architecture, preset,
  picture size, batch and checkpointing. Sizes between measured ones are interpolated on a power law of the pixel
  count; a UNet that is not one of the measured architectures (the tiny test models, a custom UNet) gets no figure.

Temporaries inside one layer, the recomputation during a checkpointed backward and the allocator's slack come on
top; on CUDA the estimate is compared with the free memory with a margin for them (:data:`CUDA_HEADROOM`).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..architectures import UNETS
from ..targets import PRESETS
from .lowmem import FP8, NF4_BLOCK, base_storage, bitsandbytes_installed, quantizable_linears
from .optim import make_optimizer

__all__ = ["ACTIVATION_TABLE", "CUDA_HEADROOM", "MemoryEstimate", "MemoryInputs", "activation_bytes",
           "architecture_of", "estimate_memory", "format_bytes", "optimizer_state_bytes", "stored_bytes"]

ACTIVATION_TABLE = Path(__file__).resolve().parents[1] / "assets" / "activation_memory.json"
#: what a step allocates beyond the four parts (temporaries, a checkpointed block's recomputation, CUDA's
#: allocator and context): the share of the device kept free when judging whether a run fits
CUDA_HEADROOM = 0.15
_GIB = 1024 ** 3


def format_bytes(n: int | float) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= _GIB / 10 else f"{n / 1024 ** 2:.0f} MiB"


# ---- weights ----------------------------------------------------------------------------------------------------
def _label(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", FP8: "fp8"}.get(
        dtype, str(dtype).removeprefix("torch."))


def _quant_state_tensors(weight: Any) -> list[torch.Tensor]:
    """The tensors a quantized bitsandbytes weight keeps beside its data (4-bit block scales, 8-bit row scales)."""
    found: list[torch.Tensor] = []
    qs = getattr(weight, "quant_state", None)
    while qs is not None:
        found += [t for t in (getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None))
                  if isinstance(t, torch.Tensor)]
        qs = getattr(qs, "state2", None)
    scb = getattr(weight, "SCB", None)
    return found + ([scb] if isinstance(scb, torch.Tensor) else [])


def _nf4_bytes(n: int, compress_statistics: bool = True) -> int:
    """Bytes of n weights in nf4: two per byte, a uint8 scale per block of 64 with the fp32 scales of those (blocks
    of 256, their 256-entry code and an offset: compress_statistics, Linear4bit's default) or an fp32 scale per
    block, and the 16-entry nf4 code table."""
    blocks = math.ceil(n / NF4_BLOCK)
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 if compress_statistics else 4 * blocks
    return math.ceil(n / 2) + scales + 4 * 16


def _int8_bytes(weight: torch.Tensor) -> int:
    """Bytes of a weight in LLM.int8: one per weight and an fp32 scale per output row."""
    return weight.numel() + 4 * weight.shape[0]


def _pending_quantized_bytes(weight: Any) -> tuple[str, int] | None:
    """(storage, bytes) of a bitsandbytes weight that has not been quantized yet (that happens as it moves to the
    device)."""
    cls = type(weight).__name__
    if cls == "Params4bit" and not getattr(weight, "bnb_quantized", True):
        return "nf4", _nf4_bytes(weight.numel(), weight.compress_statistics)
    if cls == "Int8Params" and weight.dtype != torch.int8:
        return "int8", _int8_bytes(weight)
    return None


def stored_bytes(module: nn.Module, skip: Iterable[torch.Tensor] = ()) -> dict[str, int]:
    """Bytes of ``module``'s parameters and buffers by storage ("bf16", "fp8", "nf4", "int8", ...), each storage
    counted once and those of ``skip`` (the adapter's, counted apart) not at all; bitsandbytes layers at the size
    they have (or will have, once moved) on the device."""
    out: dict[str, int] = {}
    seen: set[int] = {t.untyped_storage()._cdata for t in skip}

    def add(label: str, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            out[label] = out.get(label, 0) + t.untyped_storage().nbytes()

    for sub in module.modules():
        for t in list(sub.parameters(recurse=False)) + list(sub.buffers(recurse=False)):
            pending = _pending_quantized_bytes(t)
            if t.untyped_storage()._cdata in seen:
                continue
            if pending is not None:
                out[pending[0]] = out.get(pending[0], 0) + pending[1]
                continue
            cls = type(t).__name__
            label = {"Params4bit": "nf4", "Int8Params": "int8"}.get(cls, _label(t.dtype))
            add(label, t)
            for extra in _quant_state_tensors(t):
                add(label, extra)
    return out


def projected_bytes(module: nn.Module, storage: str, compute_dtype: torch.dtype, skip: Iterable[torch.Tensor] = ()
                    ) -> dict[str, int]:
    """About what ``module`` (stored as it is now, unquantized) would take stored as ``storage``: the frozen
    Linear / Conv weights in fp8 (norms and embeddings kept, as lowmem asks diffusers' layerwise casting), or the
    Linear layers lowmem quantizes in nf4 / int8. For the options the estimate suggests; the run itself counts its
    real tensors with :func:`stored_bytes`."""
    now = stored_bytes(module, skip)
    if storage == "auto":
        return now
    total = sum(now.values())
    moved = 0
    if storage == "fp8":
        for name, sub in module.named_modules():
            if isinstance(sub, (nn.Linear, nn.Conv2d)) and "norm" not in name and sub.weight.dtype != FP8:
                for p in sub.parameters(recurse=False):
                    moved += p.numel()
                    total -= p.numel() * p.element_size()
        return {_label(compute_dtype): total, "fp8": moved}
    quantized = 0
    for _parent, _name, child in quantizable_linears(module, storage):
        w = child.weight
        total -= w.numel() * w.element_size()
        quantized += _nf4_bytes(w.numel()) if storage == "nf4" else _int8_bytes(w)
    return {_label(compute_dtype): total, storage: quantized}


# ---- optimizer state ----------------------------------------------------------------------------------------------
def optimizer_state_bytes(params: Iterable[torch.Tensor], build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
                          ) -> int:
    """Bytes of optimizer state ``build`` (params -> the run's optimizer) keeps for ``params``, measured by one step of
    one optimizer over two small non-zero CPU tensors of each distinct (shape, dtype): per-parameter states depend on
    the shape alone, and what the two share (bitsandbytes' quantization maps) is the optimizer's, counted once. Exact
    without touching the real weights; an upper bound for Prodigy, which keeps only a scalar copy of a parameter that
    starts all zero."""
    counts: dict[tuple[tuple[int, ...], torch.dtype], int] = {}
    for p in params:
        key = (tuple(p.shape), p.dtype)
        counts[key] = counts.get(key, 0) + 1
    pairs = {key: [torch.full(key[0], 1e-2, dtype=key[1], requires_grad=True) for _ in range(2)] for key in counts}
    probes = [p for pair in pairs.values() for p in pair]
    for p in probes:
        p.grad = torch.full_like(p, 1e-3)
    opt = build(probes)
    opt.step()

    def storages(p: torch.Tensor) -> dict[int, int]:
        return {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for t in opt.state[p].values() if isinstance(t, torch.Tensor)}

    shared: dict[int, int] = {}
    total = 0
    for key, (a, b) in pairs.items():
        own_a, own_b = storages(a), storages(b)
        common = own_a.keys() & own_b.keys()
        shared.update({k: own_a[k] for k in common})
        total += counts[key] * sum(v for k, v in own_a.items() if k not in common)
    return total + sum(shared.values())


# ---- activations ----------------------------------------------------------------------------------------------------
def architecture_of(unet_config: Mapping[str, Any]) -> str | None:
    """Which measured architecture (sd1 / sd2 / sdxl) a UNet has, or None for any other (tiny, custom): the fields
    that shape the module tree must all equal the real model's."""
    cfg = dict(unet_config)
    names = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}
    for key, arch in UNETS.items():
        shaping = {k: v for k, v in arch.items() if k not in ("sample_size", "in_channels", "out_channels")}
        if all(_same(cfg.get(k), v) for k, v in shaping.items()):
            return names[key]
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):  # diffusers repeats one value per block
        seq, one = (a, b) if isinstance(a, (list, tuple)) else (b, a)
        return all(x == one for x in seq)
    return a == b


@functools.lru_cache(maxsize=1)
def _table() -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(ACTIVATION_TABLE.read_text())["rows"])


def _at_pixels(rows: Sequence[Mapping[str, Any]], pixels: int) -> float | None:
    """The rows' saved bytes at `pixels`: a measured size as measured, others on the power law of the segment
    around them (the first or last one beyond the measured range)."""
    points = sorted({r["width"] * r["height"]: r["saved_bytes"] for r in rows}.items())
    if not points:
        return None
    if len(points) == 1:
        (p0, s0), = points
        return s0 * pixels / p0
    i = next((k for k in range(1, len(points) - 1) if pixels <= points[k][0]), len(points) - 1)
    (p0, s0), (p1, s1) = points[i - 1], points[i]
    k = math.log(s1 / s0) / math.log(p1 / p0)
    return s0 * (pixels / p0) ** k


def activation_bytes(architecture: str, preset: str, pixels: int, batch: int, checkpointing: bool,
                     element_bytes: int) -> int | None:
    """Bytes saved for backward by one step, from the measured table; None where nothing was measured. Batch
    enters as the table measured it: a part per sample plus a part that does not grow with the batch (the
    adapter's weight-sized deltas that some layers keep), from the batch-1 and batch-2 rows; proportional to
    the batch where only batch 1 was measured."""
    rows = [r for r in _table() if r["family"] == architecture and r["preset"] == preset
            and r["checkpointing"] == checkpointing and r["element_bytes"] == element_bytes]
    one = _at_pixels([r for r in rows if r["batch"] == 1], pixels)
    if one is None:
        return None
    two = _at_pixels([r for r in rows if r["batch"] == 2], pixels)
    per_sample = one if two is None else two - one
    return round(one + per_sample * (batch - 1))


# ---- the estimate ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryInputs:
    """What the estimate is made of; the suggestions are estimates of the same inputs with one thing changed."""

    weights: Mapping[str, Mapping[str, int]]  # component -> storage -> bytes, for the components on the device
    adapter: int
    gradients: int
    optimizer: int
    optimizer_name: str
    architecture: str | None
    preset: str
    pixels: int  # the largest bucket's width x height
    batch: int
    checkpointing: bool
    element_bytes: int

    @property
    def activations(self) -> int | None:
        if self.architecture is None:
            return None
        return activation_bytes(self.architecture, self.preset, self.pixels, self.batch, self.checkpointing,
                                self.element_bytes)

    @property
    def total(self) -> int:
        return (sum(sum(w.values()) for w in self.weights.values()) + self.adapter + self.gradients + self.optimizer
                + (self.activations or 0))


@dataclass(frozen=True)
class MemoryEstimate:
    inputs: MemoryInputs
    device: str
    available: int | None = None  # CUDA: free memory plus what this run already holds there
    suggestions: tuple[tuple[str, int], ...] = field(default=())  # (option change, total with it)

    @property
    def total(self) -> int:
        return self.inputs.total

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available * (1 - CUDA_HEADROOM)

    def format(self) -> str:
        i = self.inputs
        lines = [f"device memory for training (estimate, {self.device}):"]
        for name, by_storage in i.weights.items():
            parts = ", ".join(f"{format_bytes(b)} {s}" for s, b in sorted(by_storage.items(), key=lambda kv: -kv[1]) if b)
            lines.append(f"  {name:<24}{format_bytes(sum(by_storage.values())):>10}  ({parts})")
        lines.append(f"  {'adapter':<24}{format_bytes(i.adapter):>10}")
        lines.append(f"  {'gradients':<24}{format_bytes(i.gradients):>10}")
        lines.append(f"  {'optimizer state':<24}{format_bytes(i.optimizer):>10}  ({i.optimizer_name})")
        act = i.activations
        if act is None:
            lines.append(f"  {'activations':<24}{'?':>10}  (not measured for this UNet: bench/bench_memory.py --table "
                         "measures SD 1.x, 2.x and XL)")
        else:
            side = int(math.sqrt(i.pixels))
            lines.append(f"  {'activations':<24}{format_bytes(act):>10}  (batch {i.batch}, about {side}x{side} px, "
                         f"checkpointing {'on' if i.checkpointing else 'off'})")
        lines.append(f"  {'total':<24}{format_bytes(self.total):>10}" + ("" if act is not None else " + activations"))
        if self.available is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict}: {format_bytes(self.available)} available, {int(CUDA_HEADROOM * 100)} % kept "
                         "for temporaries")
            if not self.fits and self.suggestions:
                lines.append("  options that bring it down:")
                budget = self.available * (1 - CUDA_HEADROOM)
                lines += [f"    {change}: about {format_bytes(total)}" + (" (fits)" if total <= budget else "")
                          for change, total in self.suggestions]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "total": self.total, "activations": self.inputs.activations,
                "available": self.available, "fits": self.fits, "inputs": asdict(self.inputs),
                "suggestions": [list(s) for s in self.suggestions]}


def _combined(base: MemoryInputs, alternatives: Sequence[tuple[str, MemoryInputs]]) -> MemoryInputs:
    """``base`` with every alternative's change at once (of the base storages, the smallest): fields an alternative
    changes take its value; weights change component by component (a new storage, or dropped from the device)."""
    storage = [alt for change, alt in alternatives if change.startswith("base_weight_dtype")]
    chosen = [alt for change, alt in alternatives if not change.startswith("base_weight_dtype")]
    chosen += [min(storage, key=lambda a: a.total)] if storage else []
    out, weights = base, dict(base.weights)
    for alt in chosen:
        changed = {f.name: getattr(alt, f.name) for f in fields(MemoryInputs)
                   if f.name != "weights" and getattr(alt, f.name) != getattr(base, f.name)}
        out = replace(out, **changed)
        for name, by_storage in base.weights.items():
            if name not in alt.weights:
                weights.pop(name, None)
            elif alt.weights[name] != by_storage and name in weights:
                weights[name] = alt.weights[name]
    return replace(out, weights=weights)


def estimate_memory(inputs: MemoryInputs, *, device: torch.device, alternatives: Sequence[tuple[str, MemoryInputs]] = (),
                    held: int = 0) -> MemoryEstimate:
    """The estimate for ``inputs`` on ``device``. On CUDA it is compared with the free memory plus ``held`` (what the
    run already put there, part of the estimate), and when it does not fit, the ``alternatives`` (an option change
    and the inputs it gives) that lower the total are listed, smallest first, and all of them together."""
    available = None
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        available = free + held
    est = MemoryEstimate(inputs, str(device), available)
    if est.fits is False:
        useful = [(change, alt) for change, alt in alternatives if alt.total < inputs.total]
        better = sorted(((change, alt.total) for change, alt in useful), key=lambda ct: ct[1])
        if len(useful) > 1:
            better.append(("all of these together (one base_weight_dtype)", _combined(inputs, useful).total))
        est = replace(est, suggestions=tuple(better))
    return est


# ---- a training run's estimate ----------------------------------------------------------------------------------


def run_estimate(cfg: Any, *, components: Mapping[str, nn.Module], parked: Sequence[str], frozen: Sequence[str],
                 network: Any, unet_config: Mapping[str, Any], compute_dtype: torch.dtype, pixels: int,
                 device: torch.device, held: int = 0) -> MemoryEstimate:
    """The estimate for a run of ``cfg`` (a TrainConfig) whose pipeline ``components`` are loaded, frozen layers
    stored as the run asks, the network in place, nothing of the UNet yet on the device; ``parked`` components wait
    on the CPU between samples; ``frozen`` ones (the denoiser, untrained text encoders) are those a base_weight_dtype
    would store. Alternatives: the options of the config that would lower the total."""
    adapter_tensors = [t for m in network.modules for t in
                       list(m.layer.parameters(recurse=False)) + list(m.layer.buffers(recurse=False))]
    trainable = network.parameters()

    def weights(storage_of: Callable[[str], str], drop: Sequence[str] = ()) -> dict[str, dict[str, int]]:
        return {name: projected_bytes(comp, storage_of(name), compute_dtype, adapter_tensors)
                for name, comp in components.items() if name not in parked and name not in drop}

    def optimizer(name: str, args: Mapping[str, Any]) -> int:
        return optimizer_state_bytes(trainable, lambda ps: make_optimizer(name, [{"params": ps}], cfg.learning_rate,
                                                                           dict(args)))

    storage = base_storage(cfg.fp8_base, cfg.base_weight_dtype)
    preset = cfg.preset if cfg.preset in PRESETS else "full"  # a preset file: the widest measured one
    adapter = sum(t.untyped_storage().nbytes() for t in adapter_tensors)
    inputs = MemoryInputs(
        weights=weights(lambda name: "auto"),  # as stored now: the run's own storage is already applied
        adapter=adapter, gradients=sum(p.numel() * p.element_size() for p in trainable),
        optimizer=optimizer(cfg.optimizer_type, cfg.optimizer_args), optimizer_name=cfg.optimizer_type,
        architecture=architecture_of(unet_config), preset=preset, pixels=pixels, batch=cfg.train_batch_size,
        checkpointing=cfg.gradient_checkpointing, element_bytes=torch.empty((), dtype=compute_dtype).element_size())
    if device.type != "cuda":  # nothing to compare with; the alternatives cost optimizer probes
        return estimate_memory(inputs, device=device)

    alternatives: list[tuple[str, MemoryInputs]] = []
    if not cfg.gradient_checkpointing:
        alternatives.append(("gradient_checkpointing = true", replace(inputs, checkpointing=True)))
    if storage == "auto":
        choices = ["fp8"] + (["nf4", "int8"] if bitsandbytes_installed() else [])
        for choice in choices:
            alternatives.append((f'base_weight_dtype = "{choice}"', replace(inputs, weights=weights(
                lambda name, c=choice: c if name in frozen else "auto"))))
    if cfg.train_batch_size > 1:
        alternatives.append((f"train_batch_size = 1, gradient_accumulation_steps = "
                             f"{cfg.train_batch_size * cfg.gradient_accumulation_steps} (the same effective batch)",
                             replace(inputs, batch=1)))
    idle = [n for n in components if n not in parked and n != "unet"]
    if "vae" in idle:
        alternatives.append(("cache_latents = true", replace(inputs, weights=weights(lambda n: "auto", ["vae"]))))
    te_idle = [n for n in idle if n.startswith("text_encoder")]
    if te_idle and not cfg.train_text_encoder:
        alternatives.append(("cache_text_encoder_outputs = true (with no caption shuffling or tag dropout)",
                             replace(inputs, weights=weights(lambda n: "auto", te_idle))))
    if cfg.optimizer_type.lower() in ("adamw", "adam") and bitsandbytes_installed():
        alternatives.append(('optimizer_type = "AdamW8bit"', replace(
            inputs, optimizer=optimizer("AdamW8bit", {}), optimizer_name="AdamW8bit")))
    return estimate_memory(inputs, device=device, alternatives=alternatives, held=held)
