"""How a LoHA layer computes base(x) + ΔW x: the forward strategies and the choice between them.

Pure functions of the frozen base module, the input and the factors (in file order: w1a, w1b, w2a, w2b
and, for Tucker, t1, t2; hada_w1_a already times the scalar with use_scalar). :class:`sd_loha.layers.LoHALayer`
keeps the parameters and calls these; the tensor kernels they use are :mod:`sd_loha.ops`' (called through the
module, so one patched kernel is seen by every path).

``row_scale`` is multiplier · alpha / r, a float, or an (out,) tensor when a rank-dropout mask is on.

- :func:`forward_delta`: base(x) + op(x, ΔW), the straightforward formula;
- :func:`forward_merge`: one op with W + s·H (:func:`sd_loha.ops.merged_linear` / ``merged_conv2d``), only
  where :func:`merge_ok` says the input, weight and factors share one fp32/fp64 dtype and autocast is off;
- :func:`forward_kr`: base(x) + U (V x), the Khatri-Rao form (rank r1·r2);
- :func:`forward_dora`: the weight decomposition's W' − W, the one path of a dora_wd layer.

:func:`auto_path` picks the cheapest of the first three by :func:`sd_loha.ops.path_costs` from the layer's
shape, rank and the token count of x.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

__all__ = ["auto_path", "autocast_on", "base_weight", "conv_padding", "dora_change", "forward_delta", "forward_dora",
           "forward_kr", "forward_merge", "hada", "merge_ok", "no_autocast", "plain_weight", "tokens"]


def autocast_on(device_type: str) -> bool:
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4 or an unknown device type
        if device_type == "cuda":
            enabled = torch.is_autocast_enabled()
        elif device_type == "cpu":
            enabled = torch.is_autocast_cpu_enabled()
        else:
            enabled = False
    return bool(enabled)


def no_autocast(device_type: str):
    """Context that disables autocast for ``device_type`` if it is on (so ΔW stays fp32)."""
    return torch.autocast(device_type, enabled=False) if autocast_on(device_type) else contextlib.nullcontext()


def hada(factors: Sequence[torch.Tensor], tucker: bool, weight_shape: torch.Size,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """H in the weight shape, differentiable, computed in ``dtype`` (default: the factors') with autocast off."""
    ts = list(factors)
    if dtype is not None:
        ts = [t.to(dtype) for t in ts]
    with no_autocast(ts[0].device.type):
        if tucker:
            w1a, w1b, w2a, w2b, t1, t2 = ts
            h = ops.hada_weight_tucker(t1, w1a, w1b, t2, w2a, w2b)
        else:
            h = ops.hada_weight(*ts)
    return h.reshape(weight_shape)


def _per_row(scale, like: torch.Tensor):
    """A row scale shaped to multiply ``like`` row by row (a float stays a float)."""
    return scale.reshape(-1, *([1] * (like.dim() - 1))) if isinstance(scale, torch.Tensor) else scale


def _base_op(x: torch.Tensor, base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The base's own linear / conv2d with another weight (same stride, padding, dilation; no bias)."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight)
    return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation, 1)


def forward_delta(x: torch.Tensor, base: nn.Module, factors: Sequence[torch.Tensor], tucker: bool,
                  weight_shape: torch.Size, row_scale) -> torch.Tensor:
    """base(x) + op(x, ΔW), ΔW = row_scale · H built in the factors' dtype and cast once to x's dtype."""
    y = base(x)
    h = hada(factors, tucker, weight_shape)
    dw = (h * _per_row(row_scale, h)).to(x.dtype)
    return y + _base_op(x, base, dw)


def plain_weight(base: nn.Module) -> bool:
    """Whether ``base.weight`` is the weight its forward computes with, as a float tensor that W + ΔW can replace:
    not quantized (bitsandbytes 4/8-bit keep packed integers and scales), not stored in fp8 or cast per call by
    a hook (diffusers' layerwise casting). Only such a layer takes the merge path: for the others W + ΔW would
    start from a dequantized compute-dtype copy of W, which the merged op's backward would keep alive per layer
    (a full-size weight each), undoing what the low-precision storage saves; they add ΔW·x instead."""
    w = getattr(base, "weight", None)
    if type(w) not in (torch.Tensor, nn.Parameter) or not w.is_floating_point() or w.element_size() < 2:
        return False
    hooks = getattr(base, "_diffusers_hook", None)
    return hooks is None or not getattr(hooks, "hooks", None)


def base_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The base layer's weight as its forward uses it, in ``dtype``, detached: dequantized from bitsandbytes'
    nf4 / fp4 (Params4bit) and int8 (Int8Params with its row scales) storage, upcast from fp8."""
    w = base.weight
    quant_state = getattr(w, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit: packed uint8 + a quantization state
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(w.data, quant_state).to(dtype)
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = getattr(getattr(base, "state", None), "SCB", None)
    if w.dtype == torch.int8 and scb is not None:  # bitsandbytes 8-bit: int8 rows times absmax / 127
        return (w.data.to(torch.float32) * (scb.to(torch.float32) / 127.0)[:, None]).to(dtype)
    return w.detach().to(dtype)


def dora_change(weight: torch.Tensor, dw: torch.Tensor, dora_scale: torch.Tensor, on_output: bool,
                multiplier: float) -> torch.Tensor:
    """multiplier · (W' − W), W' = (W + dw) · dora_scale / ‖W + dw‖, in dw's dtype (``weight``: the base's
    weight as it computes, :func:`base_weight`)."""
    w = weight.detach().to(dw.dtype)
    change = ops.dora_weight(w + dw, dora_scale.to(dw.dtype), on_output) - w
    return change if multiplier == 1.0 else change * multiplier


def forward_dora(x: torch.Tensor, base: nn.Module, factors: Sequence[torch.Tensor], tucker: bool,
                 weight_shape: torch.Size, row_scale, multiplier: float, dora_scale: torch.Tensor,
                 on_output: bool) -> torch.Tensor:
    """base(x) + op(x, D), D = multiplier · (W' − W) built in the factors' dtype (the decomposition of
    W + row_scale · H, the rank-dropout mask on ΔW's rows as LyCORIS applies it) and cast once to x's dtype.
    Here ``row_scale`` is alpha / r without the multiplier: the multiplier scales W' − W."""
    with no_autocast(factors[0].device.type):
        h = hada(factors, tucker, weight_shape)
        d = dora_change(base_weight(base, h.dtype), h * _per_row(row_scale, h), dora_scale, on_output, multiplier)
        d = d.to(x.dtype)
    return base(x) + _base_op(x, base, d)


def forward_merge(x: torch.Tensor, base: nn.Module, factors: Sequence[torch.Tensor], tucker: bool,
                  row_scale) -> torch.Tensor:
    """One op with W + row_scale · H (see :func:`sd_loha.ops.merged_linear`)."""
    fs = list(factors)
    if tucker:
        w1a, w1b, w2a, w2b, t1, t2 = fs
        fs = [t1, w1a, w1b, t2, w2a, w2b]
    if isinstance(base, nn.Linear):
        return ops.merged_linear(x, base.weight, base.bias, fs, row_scale)
    return ops.merged_conv2d(x, base.weight, base.bias, fs, row_scale, base.stride, conv_padding(base),
                             base.dilation)


def forward_kr(x: torch.Tensor, base: nn.Module, factors: Sequence[torch.Tensor], tucker: bool,
               row_scale) -> torch.Tensor:
    """base(x) + U (V x), the Khatri-Rao (rank r1·r2) form of ΔW; the row scale (and rank dropout mask)
    lands on U's rows. Convs: V is a k×k conv (flat) or 1x1 -> k×k core (Tucker) with the base's stride /
    padding / dilation, U a 1x1 conv."""
    with no_autocast(factors[0].device.type):
        if tucker:
            w1a, w1b, w2a, w2b, t1, t2 = factors
            v, core, u = ops.kr_tucker_factors(t1, w1a, w1b, t2, w2a, w2b)
        else:
            u, v = ops.kr_factors(*factors)
            core = None
        u = u * _per_row(row_scale, u)
    u, v = u.to(x.dtype), v.to(x.dtype)
    y = base(x)
    if isinstance(base, nn.Linear):
        return y + F.linear(F.linear(x, v), u)
    if tucker:
        z = F.conv2d(x, v[:, :, None, None])
        z = F.conv2d(z, core.to(x.dtype), None, base.stride, base.padding, base.dilation, 1)
    else:
        z = F.conv2d(x, v.reshape(v.shape[0], base.in_channels, *base.kernel_size), None, base.stride,
                     base.padding, base.dilation, 1)
    return y + F.conv2d(z, u[:, :, None, None])


# ---------------------------------------------------------------- which path
def conv_padding(base: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's padding as a numeric (ph, pw) pair, or None when it is a string that needs asymmetric
    padding ("same" with an even dilated kernel)."""
    pad = base.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0)
        totals = [d * (k - 1) for d, k in zip(base.dilation, base.kernel_size)]
        if any(t % 2 for t in totals):
            return None
        return tuple(t // 2 for t in totals)
    return tuple(pad)


def merge_ok(x: torch.Tensor, base: nn.Module, factor_dtype: torch.dtype) -> bool:
    """merge-then-one-op computes x (W + ΔW)ᵀ in the input's dtype: only when that is the weight's and
    factors' dtype and is fp32/fp64 (a half-precision W + ΔW would round ΔW away), autocast is off, the base
    is a plain nn.Linear / nn.Conv2d, frozen, and its weight is stored as it computes (:func:`plain_weight`)."""
    w = base.weight
    if not plain_weight(base) or x.dtype not in (torch.float32, torch.float64):
        return False
    if not x.dtype == w.dtype == factor_dtype:
        return False
    if autocast_on(x.device.type) or w.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    if isinstance(base, nn.Linear):
        return type(base).forward is nn.Linear.forward
    return type(base).forward is nn.Conv2d.forward and conv_padding(base) is not None


def tokens(x: torch.Tensor, base: nn.Module, in_dim: int) -> tuple[int, int]:
    """(input tokens, output tokens): positions times batch, from x's shape alone."""
    if isinstance(base, nn.Linear):
        n = x.numel() // max(in_dim, 1)
        return n, n
    h, w = x.shape[-2], x.shape[-1]
    batch = x.numel() // max(in_dim * h * w, 1)
    pad = conv_padding(base)
    if pad is None:  # "same": stride is 1 there
        return batch * h * w, batch * h * w
    size = []
    for dim, p, d, k, st in zip((h, w), pad, base.dilation, base.kernel_size, base.stride):
        size.append((dim + 2 * p - d * (k - 1) - 1) // st + 1)
    return batch * h * w, batch * size[0] * size[1]


def auto_path(x: torch.Tensor, base: nn.Module, factors: Sequence[torch.Tensor], tucker: bool, *,
              out_dim: int, in_dim: int, kernel: tuple[int, ...], backward: bool) -> str:
    """The cheapest of "merge" / "kr" / "delta" by :func:`sd_loha.ops.path_costs` for this layer's shape,
    ranks and x's token count (backward costs count when `backward`)."""
    w1a, w1b, w2a, w2b = factors[:4]
    n_in, n_out = tokens(x, base, in_dim)
    return ops.choose_path(
        merge_ok(x, base, w1a.dtype),
        out=out_dim,
        in_ch=in_dim,
        kernel=math.prod(kernel) if kernel else 1,
        rank1=w1a.shape[0] if tucker else w1b.shape[0],
        rank2=w2a.shape[0] if tucker else w2b.shape[0],
        n_out=n_out,
        n_in=n_in,
        tucker=tucker,
        backward=backward,
    )
