"""LoHA wrappers around a frozen ``nn.Linear`` / ``nn.Conv2d``.

``LoHALayer(base, rank, alpha, ...)`` keeps the original module as ``self.base`` (frozen) and owns
parameters named exactly like the file keys (``hada_w1_a`` ... ``hada_t2``) plus an ``alpha``
buffer, so ``factors()`` can be written to a LoHA file as is.

forward(x) = base(x) + op(x, multiplier * alpha / r * H), op = the base's own linear / conv2d
(same stride, padding, dilation; no bias).  H is built by :mod:`sd_loha.ops` in the parameters'
dtype (fp32 when training) with autocast switched off, then cast once to the input dtype.

The layer keeps the parameters and dispatches; the forward strategies are :mod:`sd_loha.forward`'s.
Three ways to compute that, equal up to fp32 rounding, chosen per call (``LoHALayer.path``,
default "auto": the cheapest by :func:`sd_loha.ops.path_costs` from the layer's shape, rank and
the token count of x, :func:`sd_loha.forward.auto_path`):

- "merge": one op with W + s·H (:func:`sd_loha.ops.merged_linear` / ``merged_conv2d``); its
  backward gets the factor gradients from one weight-gradient product and saves nothing of the
  weight's size.  Only when x, W and the factors share one fp32/fp64 dtype and autocast is off
  (in half precision W + ΔW would round small deltas away).
- "kr": base(x) + U (V x), the Khatri-Rao form (:func:`sd_loha.ops.kr_factors`): a rank r1·r2
  LoRA-like path, cheapest for wide layers or few tokens.
- "delta": base(x) + op(x, ΔW), the straightforward formula.

With ``dora_wd`` (LyCORIS's weight decomposition, "DoHa") every call takes the "dora" path: the layer's
weight becomes W' = (W + ΔW) · dora_scale / ‖W + ΔW‖, the norm per input column (``wd_on_output=False``)
or per output row (``True``), dora_scale a trainable magnitude initialised to ‖W‖ on that axis; a
multiplier s gives W + s·(W' − W), what sd-loha's loader, A1111 and ComfyUI compute for a strength s
(LyCORIS's own forward uses (W + ΔW) · (1 + s·(dora_scale/‖W + ΔW‖ − 1)): the same at s = 1 only).
``use_scalar`` is LyCORIS's trainable scalar: ΔW = scalar · scale · H with scalar starting at 0, so both
factor pairs start random; files carry ``hada_w1_a · scalar`` (LyCORIS's layout, no extra key).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

from . import forward as fwd
from . import ops

__all__ = ["LoHALayer", "wrap", "KINDS"]

KINDS = ("linear", "conv1x1", "conv", "conv_tucker")
PATHS = ("merge", "kr", "delta")
DORA_PATH = "dora"

# Attributes of the wrapped module that code elsewhere (diffusers, our own injection code) may
# read from the layer as if it were the original module.
_FORWARDED = frozenset(
    {
        "weight",
        "bias",
        "in_features",
        "out_features",
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    }
)


class LoHALayer(nn.Module):
    """A frozen Linear / Conv2d plus a trainable LoHA delta.

    Args:
        base: the module to adapt (``nn.Linear`` or ``nn.Conv2d`` with ``groups=1`` and
            ``padding_mode="zeros"``).  It is frozen (``requires_grad_(False)``) and kept as
            ``self.base``.
        rank: r, the inner dimension of each of the two factor pairs.
        alpha: scale = alpha / r; ``None`` or 0 means alpha = r (scale 1).
        use_tucker: Tucker factors for k x k convs (ignored for Linear and 1x1 convs).
        rank_dropout: training only; drops each output row of ΔW with this probability.
        module_dropout: training only; skips the whole adapter for a step with this probability.
        rank_dropout_scale: divide the rank-dropout mask by its mean (LyCORIS semantics).
        multiplier: strength applied to the delta in forward (``self.multiplier``).
        dtype: dtype of the new parameters (fp32 by default, whatever the base dtype).
        dora_wd: LyCORIS's weight decomposition: a trainable ``dora_scale`` magnitude (module docstring).
        wd_on_output: the axis of the decomposition's norm: per output row (True, LyCORIS's default) or per
            input column (False: the one axis every loader reads right, docs/format.md).
        use_scalar: LyCORIS's trainable scalar on ΔW (starts at 0; then hada_w2_a starts random too).
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int = 4,
        alpha: float | None = None,
        use_tucker: bool = False,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
        multiplier: float = 1.0,
        dtype: torch.dtype = torch.float32,
        dora_wd: bool = False,
        wd_on_output: bool = False,
        use_scalar: bool = False,
    ):
        super().__init__()
        if isinstance(base, LoHALayer):
            raise TypeError("LoHALayer: the module is already wrapped")
        if isinstance(base, nn.Linear):
            kind = "linear"
            out_dim, in_dim = base.out_features, base.in_features
            ksize: tuple[int, ...] = ()
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError(
                    f"LoHALayer: grouped convolutions are not supported (groups={base.groups})"
                )
            if base.padding_mode != "zeros":
                raise ValueError(
                    f"LoHALayer: only padding_mode='zeros' is supported (got {base.padding_mode!r})"
                )
            out_dim, in_dim = base.out_channels, base.in_channels
            ksize = tuple(base.kernel_size)
            if all(k == 1 for k in ksize):
                kind = "conv1x1"
            else:
                kind = "conv_tucker" if use_tucker else "conv"
        else:
            raise TypeError(
                f"LoHALayer wraps nn.Linear or nn.Conv2d, not {type(base).__name__}"
            )
        rank = int(rank)
        if rank < 1:
            raise ValueError(f"LoHALayer: rank must be >= 1, got {rank}")
        for name, p in (("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"LoHALayer: {name} must be in [0, 1], got {p}")

        self.base = base
        base.requires_grad_(False)
        self.kind = kind
        self.rank = rank
        self.out_dim, self.in_dim, self.kernel = out_dim, in_dim, ksize
        self.weight_shape = torch.Size((out_dim, in_dim, *ksize))
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.rank_dropout_scale = bool(rank_dropout_scale)
        self.multiplier = float(multiplier)
        # Forward path: "auto" (per call, by ops.path_costs) or one of PATHS; last_path records
        # what the latest call did.
        self.path = "auto"
        self.last_path: str | None = None

        w = getattr(base, "weight", None)
        device = w.device if isinstance(w, torch.Tensor) else None
        kw = {"device": device, "dtype": dtype}
        if kind == "conv_tucker":
            self.hada_w1_a = nn.Parameter(torch.empty(rank, out_dim, **kw))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, in_dim, **kw))
            self.hada_w2_a = nn.Parameter(torch.empty(rank, out_dim, **kw))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, in_dim, **kw))
            self.hada_t1 = nn.Parameter(torch.empty(rank, rank, *ksize, **kw))
            self.hada_t2 = nn.Parameter(torch.empty(rank, rank, *ksize, **kw))
        else:
            in_flat = in_dim * math.prod(ksize)
            self.hada_w1_a = nn.Parameter(torch.empty(out_dim, rank, **kw))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, in_flat, **kw))
            self.hada_w2_a = nn.Parameter(torch.empty(out_dim, rank, **kw))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, in_flat, **kw))
        alpha = float(rank if alpha is None or float(alpha) == 0 else alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=device))
        self._remember_alpha(alpha)
        self.use_scalar = bool(use_scalar)
        self.scalar = nn.Parameter(torch.zeros((), **kw)) if self.use_scalar else None
        self.wd_on_output = bool(wd_on_output)
        self.dora_scale = None
        if dora_wd:
            # LyCORIS: the magnitude starts at ‖W‖ of the frozen weight, computed in fp32.
            mag = ops.dora_magnitude(fwd.base_weight(base, torch.float32), self.wd_on_output)
            self.dora_scale = nn.Parameter(mag.to(**kw))
        self.reset_parameters()

    # ---------------------------------------------------------------- init / bookkeeping
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LyCORIS init: w1_b, w2_b ~ N(0, 1); w1_a ~ N(0, 0.1); w2_a = 0; cores ~ N(0, 0.1).  With use_scalar
        w2_a ~ N(0, 0.1) and scalar = 0 instead, so ΔW still starts at 0."""
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        if self.use_scalar:
            nn.init.normal_(self.hada_w2_a, std=0.1)
            self.scalar.zero_()
        else:
            nn.init.zeros_(self.hada_w2_a)
        if self.tucker:
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)

    @property
    def tucker(self) -> bool:
        return self.kind == "conv_tucker"

    @property
    def dora(self) -> bool:
        return self.dora_scale is not None

    # The forward needs alpha as a Python float: reading the buffer each call would be a device sync
    # per layer per step. The float is re-read only when the buffer is another tensor or its version
    # counter moved, so every way of writing alpha (load_state_dict, copy_ into factors()["alpha"],
    # set_alpha, .to(device)) reaches the forward, and none can leave a stale scale behind.
    def _alpha_key(self) -> tuple[int, int | None]:
        buf = self.alpha
        try:
            version: int | None = buf._version
        except RuntimeError:  # inference-mode tensors keep no version counter
            version = None
        return id(buf), version

    def _remember_alpha(self, value: float) -> None:
        self._alpha_value = float(value)
        # Holding the tensor keeps its id from being reused by another tensor.
        self._alpha_seen = (self.alpha, self._alpha_key())

    @property
    def alpha_value(self) -> float:
        """alpha as a float, following the ``alpha`` buffer."""
        seen, key = self._alpha_seen
        if (seen is not self.alpha or key != self._alpha_key()) and self.alpha.device.type != "meta":
            self._remember_alpha(float(self.alpha))
        return self._alpha_value

    @property
    def scale(self) -> float:
        """alpha / rank."""
        return self.alpha_value / self.rank

    @torch.no_grad()
    def set_alpha(self, alpha: float | None) -> None:
        """Change alpha (None or 0 -> rank)."""
        alpha = float(self.rank if alpha is None or float(alpha) == 0 else alpha)
        self.alpha.fill_(alpha)
        self._remember_alpha(alpha)

    _FACTOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    _TUCKER_NAMES = ("hada_t1", "hada_t2")

    def _param_names(self) -> tuple[str, ...]:
        return self._FACTOR_NAMES + (self._TUCKER_NAMES if self.tucker else ())

    def raw_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a resume must restore as it is (unlike :meth:`factors`, the scalar apart from w1_a),
        sharing storage with the layer: ``alpha``, the ``hada_*`` parameters, ``scalar``, ``dora_scale``."""
        out = {"alpha": self.alpha.detach()}
        for name in self._param_names():
            out[name] = getattr(self, name).detach()
        if self.use_scalar:
            out["scalar"] = self.scalar.detach()
        if self.dora:
            out["dora_scale"] = self.dora_scale.detach()
        return out

    def factors(self) -> dict[str, torch.Tensor]:
        """The tensors to save, keyed by their file names: ``alpha`` (the 0-dim buffer), ``hada_*`` (in the
        parameters' dtype) and, with dora_wd, ``dora_scale``, all detached and sharing storage with the layer,
        so copying a file's tensors into them loads the file (alpha included).  With use_scalar,
        ``hada_w1_a`` is a fresh tensor hada_w1_a · scalar, as LyCORIS saves it: load such a mapping with
        :meth:`load_factors`, which also sets the scalar to 1 (LyCORIS's load hook)."""
        out = {"alpha": self.alpha.detach()}
        for name in self._param_names():
            out[name] = getattr(self, name).detach()
        if self.use_scalar:
            out["hada_w1_a"] = (self.hada_w1_a * self.scalar).detach()
        if self.dora:
            out["dora_scale"] = self.dora_scale.detach()
        return out

    @torch.no_grad()
    def load_factors(self, factors: Mapping[str, torch.Tensor]) -> None:
        """Copy file tensors (``hada_*``, optional ``alpha``, and ``dora_scale`` for a dora_wd layer) into this
        layer; shapes must match exactly (flat conv factors may also come 4-D: they are flattened).  A
        use_scalar layer takes hada_w1_a as the file's product and its scalar becomes 1."""
        if self.dora:
            src = factors.get("dora_scale")
            if src is None:
                raise KeyError("load_factors: missing 'dora_scale' (the layer has dora_wd)")
            if src.shape != self.dora_scale.shape:
                raise ValueError(f"load_factors: dora_scale has shape {tuple(src.shape)}, the layer's is "
                                 f"{tuple(self.dora_scale.shape)} (wd_on_output={self.wd_on_output})")
            self.dora_scale.copy_(src)
        elif factors.get("dora_scale") is not None:
            raise ValueError("load_factors: the tensors have a dora_scale but the layer has no dora_wd")
        if self.use_scalar:
            self.scalar.fill_(1.0)
        for name in self._param_names():
            p = getattr(self, name)
            src = factors.get(name)
            if src is None:
                raise KeyError(f"load_factors: missing {name!r}")
            if src.dim() > 2 and not self.tucker:  # 4-D flat factors from some trainers
                src = src.reshape(src.shape[0], -1)
            if src.shape != p.shape:
                raise ValueError(
                    f"load_factors: {name} has shape {tuple(src.shape)}, layer ({self.kind}) "
                    f"expects {tuple(p.shape)}"
                )
            p.copy_(src)
        if factors.get("alpha") is not None:
            self.set_alpha(float(factors["alpha"]))

    @classmethod
    def from_factors(
        cls, base: nn.Module, factors: Mapping[str, torch.Tensor], **kw
    ) -> "LoHALayer":
        """Build a layer whose rank / Tucker form come from file tensors, then load them.
        No ``alpha`` key -> scale 1 (alpha = rank), as A1111 and ComfyUI do."""
        rank = factors["hada_w1_b"].shape[0]
        tucker = factors.get("hada_t1") is not None
        alpha = factors.get("alpha")
        kw.setdefault("dtype", torch.float32)
        ds = factors.get("dora_scale")
        if ds is not None:
            shape = torch.Size((base.weight.shape[0], base.weight.shape[1], *base.weight.shape[2:]))
            kw.update(dora_wd=True, wd_on_output=ops._dora_axis(shape, ds) == "out")
        layer = cls(base, rank=rank, alpha=None if alpha is None else float(alpha), use_tucker=tucker, **kw)
        if tucker and not layer.tucker:
            raise ValueError(f"from_factors: Tucker factors for a {layer.kind} layer")
        layer.load_factors(factors)
        return layer

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept a checkpoint of the unwrapped module: "<prefix>weight" -> "<prefix>base.weight".
        for name in ("weight", "bias"):
            old, new = prefix + name, prefix + "base." + name
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _FORWARDED:
                base = self._modules.get("base")
                if base is not None:
                    return getattr(base, name)
            raise

    def extra_repr(self) -> str:
        extra = ""
        if self.dora:
            extra += f", dora_wd=True, wd_on_output={self.wd_on_output}"
        if self.use_scalar:
            extra += ", use_scalar=True"
        return (
            f"kind={self.kind}, rank={self.rank}, alpha={self.alpha_value:g}, "
            f"multiplier={self.multiplier:g}, rank_dropout={self.rank_dropout:g}, "
            f"module_dropout={self.module_dropout:g}{extra}"
        )

    # ---------------------------------------------------------------- math
    def _factor_tensors(self) -> list[torch.Tensor]:
        """The factors in file order (w1a, w1b, w2a, w2b[, t1, t2]), hada_w1_a times the scalar with
        use_scalar (differentiable in both)."""
        ts = [getattr(self, n) for n in self._param_names()]
        if self.use_scalar:
            ts[0] = ts[0] * self.scalar
        return ts

    def _hada(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """H in the weight shape (times the scalar with use_scalar), differentiable, computed in ``dtype``
        (default: param dtype)."""
        return fwd.hada(self._factor_tensors(), self.tucker, self.weight_shape, dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scale * H`` in the weight shape, fp32 (no multiplier, no dropout, no weight decomposition);
        differentiable."""
        return self._hada(torch.float32) * self.scale

    def dora_delta(self, multiplier: float | None = None) -> torch.Tensor:
        """A dora_wd layer's change of the weight, fp32, differentiable, no dropout:
        multiplier · (W' − W) with W' = (W + scale·H) · dora_scale / ‖W + scale·H‖ (default multiplier:
        ``self.multiplier``)."""
        m = self.multiplier if multiplier is None else float(multiplier)
        return self._dora_change(self._hada(torch.float32) * self.scale, m)

    def _dora_change(self, dw: torch.Tensor, multiplier: float) -> torch.Tensor:
        return fwd.dora_change(fwd.base_weight(self.base, dw.dtype), dw, self.dora_scale, self.wd_on_output, multiplier)

    # ---------------------------------------------------------------- forward paths
    def _row_scale(self, with_multiplier: bool = True):
        """multiplier * alpha / r (alpha / r without the multiplier), times the rank-dropout mask in training:
        a float, or an (out,) tensor in the parameters' dtype when rank dropout is active."""
        s = self.multiplier * self.scale if with_multiplier else self.scale
        if self.training and self.rank_dropout > 0:
            p = self.hada_w1_a
            keep = (torch.rand(self.out_dim, device=p.device) > self.rank_dropout).to(p.dtype)
            if self.rank_dropout_scale:
                # LyCORIS divides by mask.mean(); an all-dropped mask stays all zero here
                # instead of becoming NaN.
                keep = keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)
            return keep * s
        return s

    def choose_path(self, x: torch.Tensor) -> str:
        """Which forward this call takes: ``self.path`` if set to "merge" / "kr" / "delta", else
        the cheapest by :func:`sd_loha.ops.path_costs` for this layer's shape, rank and x's token
        count (backward costs count when grad mode is on and a factor needs a gradient).  Auto
        choices are cached per (input shape, dtypes, grad / autocast state)."""
        if self.path != "auto":
            if self.path not in PATHS:
                raise ValueError(f"LoHALayer.path must be 'auto' or one of {PATHS}, got {self.path!r}")
            if self.path == "merge" and not fwd.merge_ok(x, self.base, self.hada_w1_a.dtype):
                raise ValueError(
                    "LoHALayer: path 'merge' needs an fp32/fp64 input, weight and factors of one dtype, "
                    "no autocast, a frozen plain nn.Linear / nn.Conv2d base and numeric conv padding"
                )
            return self.path
        p, b = self.hada_w1_a, self.base
        w = b.weight
        backward = torch.is_grad_enabled() and p.requires_grad
        frozen = not (w.requires_grad or (b.bias is not None and b.bias.requires_grad))
        key = (x.shape, x.dtype, x.device.type, backward, fwd.autocast_on(x.device.type), w.dtype, frozen, p.dtype)
        cache = self.__dict__.setdefault("_path_cache", {})
        path = cache.get(key)
        if path is None:
            factors = [getattr(self, n) for n in self._param_names()]
            path = fwd.auto_path(x, b, factors, self.tucker, out_dim=self.out_dim, in_dim=self.in_dim,
                                 kernel=self.kernel, backward=backward)
            if len(cache) > 64:
                cache.clear()
            cache[key] = path
        return path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.module_dropout > 0:
            if torch.rand(()).item() < self.module_dropout:
                return self.base(x)
        if self.dora:
            # the decomposition needs the whole W + ΔW (its norm): no merge / Khatri-Rao shortcut
            self.last_path = DORA_PATH
            return fwd.forward_dora(x, self.base, self._factor_tensors(), self.tucker, self.weight_shape,
                                    self._row_scale(with_multiplier=False), self.multiplier, self.dora_scale,
                                    self.wd_on_output)
        row_scale = self._row_scale()
        path = self.choose_path(x)
        self.last_path = path
        if path == "merge":
            return fwd.forward_merge(x, self.base, self._factor_tensors(), self.tucker, row_scale)
        if path == "kr":
            return fwd.forward_kr(x, self.base, self._factor_tensors(), self.tucker, row_scale)
        return fwd.forward_delta(x, self.base, self._factor_tensors(), self.tucker, self.weight_shape, row_scale)


def wrap(module: nn.Module, **kw) -> LoHALayer:
    """``LoHALayer(module, **kw)``: wrap a Linear / Conv2d in a LoHA adapter."""
    return LoHALayer(module, **kw)
