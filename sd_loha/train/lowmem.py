"""Less memory on the training device: what the frozen base keeps where, and in which storage dtype.

Two independent things:

- **Placement** (:func:`idle_components`, :class:`Offloader`): a component whose work is done before the first
  step (the VAE once the latents are cached, frozen text encoders once their outputs are cached) waits on the
  CPU; sampling and validation bring back what they use and send it away again.
- **Storage dtype of the frozen base** (:func:`store_frozen_base`): ``fp8`` keeps the weights of the frozen
  Linear and Conv layers in float8_e4m3fn and casts each layer to the compute dtype for its own forward (diffusers'
  layerwise casting hooks); ``nf4`` / ``int8`` replace the frozen Linear layers by bitsandbytes' Linear4bit /
  Linear8bitLt (convs stay in the compute dtype). The LoHA layers wrap these as they wrap plain layers: their
  delta and Khatri-Rao paths add ΔW·x to the base's output and never touch its weight.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..version import diffusers_at_least

__all__ = ["BASE_DTYPES", "BITSANDBYTES_INSTALL", "OFFLOAD_DEVICE", "Offloader", "TEXT_ENCODERS", "base_storage",
           "bitsandbytes_installed", "checkpointing_func", "diffusers_at_least", "diffusers_has_layerwise_casting",
           "idle_components", "quantizable_linears", "storage_unavailable", "store_frozen_base", "stored_as"]

#: base_weight_dtype's values: auto = the mixed-precision dtype (bf16 / fp16 / fp32)
BASE_DTYPES: tuple[str, ...] = ("auto", "fp8", "nf4", "int8")
BITSANDBYTES_INSTALL = 'pip install -U "bitsandbytes>=0.45"  (>= 0.50 for the CPU)'
OFFLOAD_DEVICE = torch.device("cpu")
#: the pipeline's text-encoder components, in conditioning order
TEXT_ENCODERS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")
FP8 = torch.float8_e4m3fn
NF4_BLOCK = 64  # bitsandbytes' default 4-bit block size


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


#: diffusers' layerwise casting (fp8 storage) and its custom checkpointing function came in 0.33
LAYERWISE_CASTING_DIFFUSERS = (0, 33)


def diffusers_has_layerwise_casting() -> bool:
    return diffusers_at_least(LAYERWISE_CASTING_DIFFUSERS)


def storage_unavailable(storage: str) -> tuple[str, str] | None:
    """Why this machine cannot store a frozen base as `storage` (a BASE_DTYPES value), and the fix; None when it
    can. The trainer's config rules and generation both ask this, before any model loads."""
    if storage == "fp8" and not diffusers_has_layerwise_casting():
        return ('"fp8" needs diffusers 0.33 or newer (its layerwise casting stores the weights in fp8)',
                'pip install -U "diffusers>=0.33"')
    if storage in ("nf4", "int8") and not bitsandbytes_installed():
        return f'"{storage}" needs the bitsandbytes package, which is not installed', f"install it: {BITSANDBYTES_INSTALL}"
    return None


def base_storage(fp8_base: bool, base_weight_dtype: str) -> str:
    """The one storage setting the two options give: fp8_base = true is base_weight_dtype = "fp8"."""
    return "fp8" if fp8_base else base_weight_dtype


# ---- placement ---------------------------------------------------------------------------------------------
def idle_components(*, latents_cached: bool, text_cached: bool, text_encoders: Sequence[str]) -> tuple[str, ...]:
    """The pipeline components no training step runs: the VAE when every training latent comes from the cache,
    the text encoders when every caption's output does (which implies they are not trained)."""
    return (("vae",) if latents_cached else ()) + (tuple(text_encoders) if text_cached else ())


class Offloader:
    """Keeps a pipeline's idle components on the CPU between uses.

    ``park()`` sends them away; ``using(names)`` (all idle ones by default) brings those of them that are parked to
    the training device for the block and parks them again after it. ``parked`` names the idle components that are
    away now (also where the training device is the CPU and the moves cost nothing)."""

    def __init__(self, pipe: Any, idle: Sequence[str], device: torch.device | str) -> None:
        self.pipe, self.idle, self.device = pipe, tuple(idle), torch.device(device)
        self._away: set[str] = set()

    def _move(self, name: str, device: torch.device) -> None:
        getattr(self.pipe, name).to(device)

    def park(self) -> None:
        for name in self.idle:
            if name not in self._away:
                self._move(name, OFFLOAD_DEVICE)
                self._away.add(name)

    @property
    def parked(self) -> tuple[str, ...]:
        return tuple(n for n in self.idle if n in self._away)

    @contextlib.contextmanager
    def using(self, names: Sequence[str] | None = None) -> Iterator[None]:
        wanted = [n for n in (self.idle if names is None else names) if n in self._away]
        for name in wanted:
            self._move(name, self.device)
            self._away.discard(name)
        try:
            yield
        finally:
            for name in wanted:
                self._move(name, OFFLOAD_DEVICE)
                self._away.add(name)


# ---- storage dtype of the frozen base -----------------------------------------------------------------------
def store_frozen_base(model: nn.Module, storage: str, compute_dtype: torch.dtype) -> int:
    """Store ``model``'s frozen layers as ``storage`` says ("auto": leave them; see the module docstring) before
    it moves to the training device (bitsandbytes quantizes as the layers move). Returns the number of layers
    now stored in the low-precision format."""
    if storage == "auto":
        return 0
    if storage == "fp8":
        return _layerwise_fp8(model, compute_dtype)
    if storage in ("nf4", "int8"):
        return _quantize_linears(model, storage, compute_dtype)
    raise ValueError(f"base_weight_dtype must be one of {BASE_DTYPES}, got {storage!r}")


def _layerwise_fp8(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """diffusers' layerwise casting: weights stored in fp8, each layer cast to compute_dtype for its forward.
    Norms (by name) and embeddings (token / position tables) keep their dtype: they are small and sensitive."""
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    if hasattr(model, "enable_layerwise_casting"):  # a diffusers model: its own skip list (norms, fp32 modules)
        model.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=compute_dtype,
                                       skip_modules_classes=(nn.Embedding,))
    else:
        kept = tuple(rf"(^|\.){re.escape(n)}$" for n in _kept_precision(model))
        apply_layerwise_casting(model, FP8, compute_dtype, skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN + kept,
                                skip_modules_classes=(nn.Embedding,))
    return sum(1 for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.dtype == FP8)


def quantizable_linears(model: nn.Module, storage: str) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, layer) of every plain nn.Linear of ``model`` that ``storage`` ("nf4" / "int8")
    quantizes. nf4 quantizes blocks of 64 weights along a row, and bitsandbytes' CPU kernel needs whole blocks: a
    Linear whose input width is not a multiple of 64 (none in the SD / SDXL UNets and text encoders; some in the
    tiny test models) stays as it is."""
    kept = _kept_precision(model)
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear and name not in kept and not (storage == "nf4" and child.in_features % NF4_BLOCK)]


def _kept_precision(model: nn.Module) -> tuple[str, ...]:
    """Layer names a transformers model keeps in its own precision (``_keep_in_fp32_modules``: T5's ``wo``, whose
    input T5 casts to the layer's weight dtype; an fp8 or 4-bit weight dtype there breaks the forward)."""
    return tuple(getattr(model, "_keep_in_fp32_modules", None) or ())


def _quantize_linears(model: nn.Module, storage: str, compute_dtype: torch.dtype) -> int:
    """Every layer :func:`quantizable_linears` names becomes a bitsandbytes Linear4bit (nf4) / Linear8bitLt (int8)
    holding the same weight; the quantization itself happens when the model moves to a device."""
    import bitsandbytes as bnb

    found = quantizable_linears(model, storage)
    for parent, name, child in found:
        w, b = child.weight.data, child.bias
        if storage == "nf4":
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=b is not None,
                                    compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
            # On a CPU with AVX512-BF16, bitsandbytes repacks the weight in place for its inference kernel at the
            # first eval-mode, no-grad forward (sampling, validation); a training forward after that fails, and
            # the repacking refuses output widths that are not a multiple of 32.
            new.support_avx512bf16_for_cpu = False
        else:
            new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=b is not None,
                                      has_fp16_weights=False, device="meta")
            new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        if b is not None:
            new.bias = nn.Parameter(b.data.to(compute_dtype), requires_grad=False)
        new.train(child.training)
        setattr(parent, name, new)
    return len(found)


def checkpointing_func(storage: str) -> Callable[..., Any] | None:
    """The UNet's gradient-checkpointing function for this storage (None: diffusers' default).

    With fp8 layerwise casting a layer's weight tensor changes dtype in place around each forward (fp8 -> compute
    -> fp8), so the recomputation sees the same tensor in fp8 where the first pass recorded the compute dtype, and
    torch's checkpoint refuses on that metadata alone. The values are the same (the fp8 -> compute cast is exact
    and repeatable; tests/train/test_lowmem.py compares the gradients with an uncheckpointed run), so that check
    is turned off for fp8 only."""
    if storage != "fp8":
        return None

    def checkpoint(module: Callable[..., Any], *args: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 determinism_check="none")

    return checkpoint


def stored_as(layer: nn.Module) -> str:
    """How a frozen Linear / Conv layer keeps its weight now: "nf4", "int8", "fp8" or its dtype's name."""
    cls = type(layer).__name__
    if cls == "Linear4bit":
        return getattr(getattr(layer.weight, "quant_state", None), "quant_type", None) or "4bit"
    if cls == "Linear8bitLt":
        return "int8"
    return "fp8" if layer.weight.dtype == FP8 else str(layer.weight.dtype).removeprefix("torch.")
