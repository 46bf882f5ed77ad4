"""Adapters added in the forward instead of merged into the weight ("bypass").

A layer whose weight cannot take an exact merge (bitsandbytes Linear4bit / Linear8bitLt, float8 storage from
diffusers' ``enable_layerwise_casting``, a quantized tensor subclass), or any layer when ``apply_loha(merge=False)``
asks for it, gets one forward hook that adds Σ strength·ΔW·x of the adapters bypassed on it to the layer's own
output. The stored weights are never written, so removing the last adapter (which removes the hooks) leaves every
stored byte as it was, and a strength change only changes a number the hook reads.

Per adapter and call, ΔW·x takes the cheaper of two forms by :func:`sd_loha.ops.choose_path` (the training
layer's cost model, without its merge path, which needs a writable fp32 weight):

- ``kr``: the thin form U (V x): the Khatri-Rao factors of a LoHA (:func:`sd_loha.ops.kr_factors`, rank r1·r2;
  Tucker convs: :func:`sd_loha.ops.kr_tucker_factors`, a 1x1 -> k×k core -> 1x1 chain), or a LoRA/LoCon's own
  up / (mid) / down. Built once in fp32 with strength · alpha/r folded into U, cast once to the layer's compute
  dtype and kept until the strength, device or dtype changes.
- ``delta``: ΔW = scale · H built in fp32 on the layer's device for the call, cast once, then the layer's own
  op with it (cheaper when r1·r2 is large against the layer's width).

DoRA cannot simply add: W' = (W + ΔW)·c, with c = dora_scale / ‖W + ΔW‖ along one axis, rescales the base
output too. c is computed once from the dequantized weight (:func:`dequantized_weight`, the merged weight plus
the adapters bypassed before it when several are stacked) and kept while their strengths stay; then
W + s·(W' − W) = diag(a)·W + s·diag(c)·ΔW (c per output row, a = 1 + s·(c − 1)), so the hook rescales the base
output row-wise and adds the scaled delta; for c per input column (W·diag(a) + s·ΔW·diag(c)) a forward pre-hook
scales the layer's input by a and the hook adds ΔW applied to c ⊙ x (the original input, kept by the pre-hook).
Stacked adapters compose in the order applied, as the merge does: y = b + A_out ⊙ W (A_in ⊙ x) + Σ_i
out_i ⊙ s_i·ΔW_i (in_i ⊙ x), the products of the later DoRA adapters' a over each term.

Cost: the thin form adds r1·r2·(in·k + out) multiply-adds per output token to the layer's out·in·k: at rank 8
(r1·r2 = 64, a LoHA is as costly here as an unfused rank-64 LoRA) 40 % of a 320-wide Linear, 10 % of a 1280-wide
one; see bench/RESULTS.md, "Bypass", for whole UNet passes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .forward import base_weight, tokens
from .io import AdapterModule
from .model_names import UnsupportedWeightError

__all__ = ["BypassSlot", "dequantized_weight", "full_delta", "weight_shape", "dora_problem"]

_EPS = torch.finfo(torch.float32).eps  # what ops.dora_weight adds to the norm


def weight_shape(module: nn.Module) -> torch.Size:
    """The layer's logical weight shape (a bitsandbytes 4-bit weight is stored packed as (n, 1))."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return torch.Size(state.shape)
    return weight.shape


def _float_storage(weight: torch.Tensor) -> bool:
    """A weight that is its own values in a floating dtype (float8 included): plain tensors, and bitsandbytes
    parameters not (yet) quantized."""
    bnb_param = type(weight).__name__ in ("Params4bit", "Int8Params")
    return weight.is_floating_point() and (type(weight) in (torch.Tensor, nn.Parameter) or bnb_param)


def dora_problem(module: nn.Module) -> str | None:
    """Why :func:`dequantized_weight` cannot read this layer's weight (None when it can)."""
    weight = module.weight
    name = type(weight).__name__
    if _float_storage(weight) or weight.is_quantized:
        return None
    if name == "Params4bit":
        return None if getattr(weight, "quant_state", None) is not None else \
            "is a bitsandbytes 4-bit weight without its quant_state"
    if name == "Int8Params":
        return None if getattr(weight, "SCB", None) is not None else "is a bitsandbytes 8-bit weight without its SCB"
    if getattr(type(weight), "dequantize", torch.Tensor.dequantize) is torch.Tensor.dequantize:
        # (torch.Tensor's own dequantize() is for torch's quantized dtypes; a tensor type must bring its own)
        return f"stores its weight as {name}, which has no dequantize()"
    return None


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as the forward uses it, in fp32, on its device, in its logical shape: bitsandbytes and
    float8 storage as the training layer reads them (:func:`sd_loha.forward.base_weight`), a quantized tensor type
    through its own dequantize()."""
    problem = dora_problem(module)
    if problem is not None:
        raise UnsupportedWeightError(f"{type(module).__name__} {problem}")
    weight = module.weight
    if weight.is_quantized or (not _float_storage(weight) and type(weight).__name__ not in ("Params4bit", "Int8Params")):
        return weight.dequantize().float()
    return base_weight(module, torch.float32).reshape(weight_shape(module))


def full_delta(mod: AdapterModule, shape: torch.Size, device: torch.device | str,
               tensors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """scale · H of one file module as a fresh fp32 tensor of the weight's shape (any form, no DoRA).
    `tensors`: the module's tensors already in fp32 on `device` (the bypass keeps them there)."""
    f = tensors if tensors is not None else {
        k: v.detach().to(device=device, dtype=torch.float32) for k, v in mod.tensors.items()}
    if mod.algo == "loha":
        return ops.loha_delta(f, shape, mod.scale)
    return ops.lora_delta(f["lora_up.weight"], f["lora_down.weight"], f.get("lora_mid.weight"), shape=shape,
                          scale=mod.scale)


def _op(x: torch.Tensor, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The layer's linear / conv2d with another weight (no bias)."""
    if weight.dim() == 2:
        return F.linear(x, weight)
    return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, 1)


class _Entry:
    """One adapter's module on one bypassed layer: its fp32 factors and the device copies the forward uses."""

    def __init__(self, mod: AdapterModule, shape: torch.Size) -> None:
        self.mod = mod
        self.shape = shape
        self.fp32 = {k: v.detach().float() for k, v in mod.tensors.items()}
        self._device_fp32: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._thin: tuple[Any, tuple] | None = None  # (key, (v, core, u)) in the compute dtype
        if mod.algo == "loha":
            r1 = mod.tensors["hada_w1_a" if mod.tucker else "hada_w1_b"].shape[0]
            r2 = mod.tensors["hada_w2_a" if mod.tucker else "hada_w2_b"].shape[0]
            self.ranks = (int(r1), int(r2))
        else:
            self.ranks = (mod.rank, 1)
        self.on_output = True  # DoRA axis (only read when mod.dora_scale is set)
        if mod.dora_scale is not None:
            out, ones = shape[0], (1,) * (len(shape) - 2)
            self.on_output = tuple(mod.dora_scale.shape) in ((out, 1, *ones), (out,))

    def device_fp32(self, device: torch.device) -> dict[str, torch.Tensor]:
        f = self._device_fp32.get(device)
        if f is None:
            f = self._device_fp32[device] = {k: v.to(device) for k, v in self.fp32.items()}
        return f

    def _thin_fp32(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(V, core or None, U) with ΔW = scale · U ∘ core ∘ V, fp32 (U not yet scaled)."""
        f = self.device_fp32(device)
        if self.mod.algo == "loha":
            if self.mod.tucker:
                return ops.kr_tucker_factors(*(f[k] for k in ("hada_t1", "hada_w1_a", "hada_w1_b",
                                                              "hada_t2", "hada_w2_a", "hada_w2_b")))
            w1a, w1b, w2a, w2b = (f[k].reshape(f[k].shape[0], -1) for k in ("hada_w1_a", "hada_w1_b",
                                                                              "hada_w2_a", "hada_w2_b"))
            u, v = ops.kr_factors(w1a, w1b, w2a, w2b)
            return v, None, u
        up, down = f["lora_up.weight"], f["lora_down.weight"]
        return down.reshape(down.shape[0], -1), f.get("lora_mid.weight"), up.reshape(up.shape[0], -1)

    def thin(self, device: torch.device, dtype: torch.dtype, multiplier: float) -> tuple:
        key = (device, dtype, multiplier)
        if self._thin is None or self._thin[0] != key:
            v, core, u = self._thin_fp32(device)
            u = u * (self.mod.scale * multiplier)  # in fp32, then one cast
            self._thin = (key, (v.to(dtype), None if core is None else core.to(dtype), u.to(dtype)))
        return self._thin[1]

    def path(self, x: torch.Tensor, module: nn.Module) -> str:
        in_dim = self.shape[1] if len(self.shape) > 1 else 1
        n_in, n_out = tokens(x, module, in_dim)
        return ops.choose_path(False, out=self.shape[0], in_ch=in_dim, kernel=math.prod(self.shape[2:]),
                               rank1=self.ranks[0], rank2=self.ranks[1], n_out=n_out, n_in=n_in,
                               tucker=self.mod.tucker, backward=False)

    def apply(self, x: torch.Tensor, module: nn.Module, multiplier: float) -> torch.Tensor:
        """multiplier · ΔW · x in x's dtype (ΔW or its thin factors built in fp32, cast once)."""
        if self.path(x, module) == "delta":
            dw = full_delta(self.mod, self.shape, x.device, self.device_fp32(x.device))
            if multiplier != 1.0:
                dw.mul_(multiplier)
            return _op(x, module, dw.to(x.dtype))
        v, core, u = self.thin(x.device, x.dtype, multiplier)
        if len(self.shape) == 2:
            return F.linear(F.linear(x, v), u)
        if core is None:
            z = F.conv2d(x, v.reshape(v.shape[0], *self.shape[1:]), None, module.stride, module.padding,
                         module.dilation, 1)
        else:
            z = F.conv2d(x, v[:, :, None, None])
            z = F.conv2d(z, core, None, module.stride, module.padding, module.dilation, 1)
        return F.conv2d(z, u[:, :, None, None])


class BypassSlot:
    """The adapters bypassed on one layer, in the order applied, and the hooks that add them."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.shape = weight_shape(module)
        self.entries: dict[str, _Entry] = {}
        self._plan: list[tuple[_Entry, float, torch.Tensor | None, torch.Tensor | None]] = []
        self._base_in: torch.Tensor | None = None  # A_in, A_out of the module docstring (DoRA only)
        self._base_out: torch.Tensor | None = None
        self._dora_c: dict[str, torch.Tensor] = {}
        self._dora_key: Any = None
        self._device_vectors: dict[Any, torch.Tensor] = {}
        self._x: torch.Tensor | None = None
        self._hook = module.register_forward_hook(self._forward_hook, with_kwargs=True)
        self._pre_hook = None

    def add(self, name: str, mod: AdapterModule) -> None:
        self.entries[name] = _Entry(mod, self.shape)

    def remove(self, name: str) -> None:
        del self.entries[name]
        self._dora_key = None

    def close(self) -> None:
        """Remove the hooks: the layer runs exactly its own forward again."""
        self._hook.remove()
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None

    def refresh(self, multipliers: Mapping[str, float], merged_state: Any = ()) -> None:
        """Take the adapters' current multipliers (strength × block weight). Cheap unless a DoRA adapter's
        norm must be recomputed (the merged weight or a strength of an adapter before it changed).
        `merged_state` names what is merged into the weight itself; a change of it changes DoRA's norms."""
        names = list(self.entries)
        dora = [i for i, n in enumerate(names) if self.entries[n].mod.dora_scale is not None]
        if dora:
            key = (merged_state, tuple(multipliers[n] for n in names[: dora[-1]]))
            if key != self._dora_key:
                self._dora_c = self._dora_vectors(names[: dora[-1] + 1], multipliers)
                self._dora_key = key
        # Walk backwards: each term is scaled by the a's of the DoRA adapters after it.
        plan = []
        after_in: torch.Tensor | None = None
        after_out: torch.Tensor | None = None
        for name in reversed(names):
            entry, s = self.entries[name], float(multipliers[name])
            if s == 0.0:
                continue  # a DoRA adapter at 0 has a = 1: nothing to scale either
            c = self._dora_c.get(name) if entry.mod.dora_scale is not None else None
            in_scale, out_scale = after_in, after_out
            if c is not None:
                if entry.on_output:
                    out_scale = c if out_scale is None else out_scale * c
                else:
                    in_scale = c if in_scale is None else in_scale * c
                a = 1.0 + s * (c - 1.0)
                if entry.on_output:
                    after_out = a if after_out is None else after_out * a
                else:
                    after_in = a if after_in is None else after_in * a
            plan.append((entry, s, in_scale, out_scale))
        self._plan = plan[::-1]
        self._base_in, self._base_out = after_in, after_out
        self._device_vectors = {}
        if after_in is not None and self._pre_hook is None:
            self._pre_hook = self.module.register_forward_pre_hook(self._forward_pre_hook, with_kwargs=True)
        elif after_in is None and self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None

    @torch.no_grad()
    def _dora_vectors(self, names: list[str], multipliers: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """c = dora_scale / (‖W_before + ΔW‖ + eps) of each DoRA adapter (1-D, fp32, CPU), W_before the dequantized
        weight plus the adapters before it, composed as the merge composes them."""
        w = dequantized_weight(self.module).reshape(self.shape)
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(names):
            entry, s = self.entries[name], float(multipliers[name])
            delta = full_delta(entry.mod, self.shape, w.device, entry.device_fp32(w.device))
            last = i == len(names) - 1
            if entry.mod.dora_scale is not None:
                merged = w + delta
                norm = ops.dora_magnitude(merged, entry.on_output) + _EPS
                c = entry.mod.dora_scale.to(device=w.device, dtype=torch.float32).reshape(norm.shape) / norm
                out[name] = c.flatten().cpu()
                if not last and s != 0.0:
                    w = w + s * (merged * c - w)  # what the merge computes for this adapter
            elif not last and s != 0.0:
                w = w + s * delta
        return out

    def _vector(self, t: torch.Tensor, like: torch.Tensor, channel_dim_last: bool) -> torch.Tensor:
        """A per-channel vector on like's device and dtype, shaped to broadcast over its channel dim. (The plan
        holds `t` until the next refresh, which empties this cache, so its id is not reused meanwhile.)"""
        key = (id(t), like.device, like.dtype, channel_dim_last)
        v = self._device_vectors.get(key)
        if v is None:
            v = t.to(device=like.device, dtype=like.dtype)
            v = self._device_vectors[key] = v if channel_dim_last else v.reshape(-1, 1, 1)
        return v

    def _forward_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if self._base_in is None:
            return None
        x = args[0] if args else kwargs["input"]
        self._x = x
        scaled = x * self._vector(self._base_in, x, len(self.shape) == 2)
        return ((scaled, *args[1:]), kwargs) if args else (args, {**kwargs, "input": scaled})

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        x = self._x if self._x is not None else (args[0] if args else kwargs["input"])  # the unscaled input
        self._x = None
        if not self._plan and self._base_out is None:
            return None
        linear = len(self.shape) == 2
        y = output
        if self._base_out is not None:
            bias = module.bias
            if bias is None:
                y = y * self._vector(self._base_out, y, linear)
            else:
                b = bias.to(y.dtype) if linear else bias.to(y.dtype).reshape(-1, 1, 1)
                y = (y - b) * self._vector(self._base_out, y, linear) + b
        extra = None
        for entry, s, in_scale, out_scale in self._plan:
            xi = x if in_scale is None else x * self._vector(in_scale, x, linear)
            t = entry.apply(xi, module, s)
            if out_scale is not None:
                t = t * self._vector(out_scale, t, linear)
            extra = t if extra is None else extra + t
        return y if extra is None else y + extra.to(y.dtype)
