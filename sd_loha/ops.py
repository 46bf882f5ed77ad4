"""Pure tensor functions for LoHA (and the LoRA/LoCon/DoRA parts of mixed files).

Conventions (see docs FORMAT.md, "Math" and "Shapes"):

* flat form (Linear, 1x1 conv, k x k conv "flat"):
  ``H = (w1a @ w1b) * (w2a @ w2b)`` with ``w_a`` (out, r) and ``w_b`` (r, in*kh*kw);
  H is (out, in*kh*kw) and is reshaped to the weight shape by the caller.
* Tucker form (k x k conv): ``W_i[o, c, y, x] = sum_{j,k} t_i[j, k, y, x] * w_i_a[j, o] * w_i_b[k, c]``
  with ``w_a`` (r, out), ``w_b`` (r, in), ``t`` (r, r, kh, kw); ``H = W_1 * W_2``.

The two training kernels (:func:`hada_weight`, :func:`hada_weight_tucker`) are custom autograd
Functions that save only the small factors and recompute the full-size products in backward, so a
trainer holds no (out x in) tensor per adapted layer between forward and backward.  The merge helpers
(:func:`loha_delta`, :func:`lora_delta`, :func:`apply_dora`) run without autograd and always compute
in fp32 (or fp64 when asked), whatever dtype the factors are stored in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "hada_weight",
    "hada_weight_tucker",
    "tucker_rebuild",
    "loha_delta",
    "lora_delta",
    "apply_dora",
]

_TUCKER_KEYS = ("hada_t1", "hada_t2")


def _mul_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh * other``, in place on ``fresh`` (a temporary we own) unless a graph is being
    recorded (double backward), where the in-place op could clobber a value autograd needs."""
    if torch.is_grad_enabled():
        return fresh * other
    return fresh.mul_(other)


# --------------------------------------------------------------------------------------------
# flat form
# --------------------------------------------------------------------------------------------
class _HadaWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return (w1a @ w1b).mul_(w2a @ w2b)

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        need = ctx.needs_input_grad
        g1a = g1b = g2a = g2b = None
        if need[0] or need[1]:
            g = _mul_into(w2a @ w2b, grad)  # dL/d(w1a @ w1b)
            if need[0]:
                g1a = g @ w1b.mT
            if need[1]:
                g1b = w1a.mT @ g
            del g
        if need[2] or need[3]:
            g = _mul_into(w1a @ w1b, grad)  # dL/d(w2a @ w2b)
            if need[2]:
                g2a = g @ w2b.mT
            if need[3]:
                g2b = w2a.mT @ g
        return g1a, g1b, g2a, g2b


def hada_weight(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor
) -> torch.Tensor:
    """``(w1a @ w1b) * (w2a @ w2b)``, shape (out, in_flat).

    ``w1a``/``w2a`` are (out, r1)/(out, r2), ``w1b``/``w2b`` are (r1, in_flat)/(r2, in_flat).
    Differentiable; autograd keeps only the four factors alive (the products are recomputed in
    backward).  Computes in the factors' dtype.
    """
    for name, t in (("w1a", w1a), ("w1b", w1b), ("w2a", w2a), ("w2b", w2b)):
        if t.dim() != 2:
            raise ValueError(f"hada_weight: {name} must be 2-D, got shape {tuple(t.shape)}")
    if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]:
        raise ValueError(
            "hada_weight: rank mismatch: "
            f"w1a {tuple(w1a.shape)} @ w1b {tuple(w1b.shape)}, w2a {tuple(w2a.shape)} @ w2b {tuple(w2b.shape)}"
        )
    if w1a.shape[0] != w2a.shape[0] or w1b.shape[1] != w2b.shape[1]:
        raise ValueError(
            "hada_weight: the two products have different shapes: "
            f"({w1a.shape[0]}, {w1b.shape[1]}) vs ({w2a.shape[0]}, {w2b.shape[1]})"
        )
    return _HadaWeight.apply(w1a, w1b, w2a, w2b)


# --------------------------------------------------------------------------------------------
# Tucker form
# --------------------------------------------------------------------------------------------
def _core_times_b(t3: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """(r, r, S) x (r, in) -> (r, in, S):  out[j, c, s] = sum_k t[j, k, s] wb[k, c]."""
    return torch.einsum("jks,kc->jcs", t3, wb)


def _tucker3(t3: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """W[o, c, s] = sum_{j,k} t[j, k, s] wa[j, o] wb[k, c], spatial dims flattened to s."""
    return torch.einsum("jcs,jo->ocs", _core_times_b(t3, wb), wa)


def tucker_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """One Tucker factor: ``W[o, c, *k] = sum_{j,l} t[j, l, *k] * wa[j, o] * wb[l, c]``.

    ``t`` (r, r, *k), ``wa`` (r, out), ``wb`` (r, in) -> (out, in, *k).  Plain autograd.
    """
    k = t.shape[2:]
    w = _tucker3(t.reshape(t.shape[0], t.shape[1], -1), wa, wb)
    return w.reshape(wa.shape[1], wb.shape[1], *k)


class _HadaWeightTucker(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t1, w1a, w1b, t2, w2a, w2b):
        ctx.save_for_backward(t1, w1a, w1b, t2, w2a, w2b)
        k = t1.shape[2:]
        t1_3 = t1.reshape(t1.shape[0], t1.shape[1], -1)
        t2_3 = t2.reshape(t2.shape[0], t2.shape[1], -1)
        h = _tucker3(t1_3, w1a, w1b).mul_(_tucker3(t2_3, w2a, w2b))
        return h.reshape(w1a.shape[1], w1b.shape[1], *k)

    @staticmethod
    def backward(ctx, grad):
        t1, w1a, w1b, t2, w2a, w2b = ctx.saved_tensors
        k = t1.shape[2:]
        need = ctx.needs_input_grad
        t1_3 = t1.reshape(t1.shape[0], t1.shape[1], -1)
        t2_3 = t2.reshape(t2.shape[0], t2.shape[1], -1)
        grad3 = grad.reshape(grad.shape[0], grad.shape[1], -1)

        def side(t3, wa, wb, other, n_t, n_a, n_b):
            # g = dL/dW_side = grad * W_other, then the three contractions of
            # W[o,c,s] = sum t[j,k,s] wa[j,o] wb[k,c].
            gt = ga = gb = None
            if not (n_t or n_a or n_b):
                return gt, ga, gb
            g = _mul_into(_tucker3(*other), grad3)  # (out, in, S)
            if n_a:
                ga = torch.einsum("ocs,jcs->jo", g, _core_times_b(t3, wb))
            if n_t or n_b:
                p = torch.einsum("ocs,jo->jcs", g, wa)  # (r, in, S)
                del g
                if n_b:
                    gb = torch.einsum("jcs,jks->kc", p, t3)
                if n_t:
                    gt = torch.einsum("jcs,kc->jks", p, wb).reshape(t3.shape[0], t3.shape[1], *k)
            return gt, ga, gb

        g_t1, g_w1a, g_w1b = side(t1_3, w1a, w1b, (t2_3, w2a, w2b), need[0], need[1], need[2])
        g_t2, g_w2a, g_w2b = side(t2_3, w2a, w2b, (t1_3, w1a, w1b), need[3], need[4], need[5])
        return g_t1, g_w1a, g_w1b, g_t2, g_w2a, g_w2b


def hada_weight_tucker(
    t1: torch.Tensor,
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    t2: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
) -> torch.Tensor:
    """Tucker LoHA product ``W1 * W2``, shape (out, in, *k) (e.g. (out, in, kh, kw)).

    ``W_i[o, c, *k] = sum_{j,l} t_i[j, l, *k] * w_i_a[j, o] * w_i_b[l, c]`` with ``w_i_a`` (r, out),
    ``w_i_b`` (r, in), ``t_i`` (r, r, *k).  Differentiable; autograd keeps only the six factors.
    """
    for i, (t, wa, wb) in enumerate(((t1, w1a, w1b), (t2, w2a, w2b)), start=1):
        if wa.dim() != 2 or wb.dim() != 2 or t.dim() < 3:
            raise ValueError(
                f"hada_weight_tucker: factor {i} needs 2-D w_a, w_b and a (r, r, *k) core; got "
                f"t{i} {tuple(t.shape)}, w{i}a {tuple(wa.shape)}, w{i}b {tuple(wb.shape)}"
            )
        if t.shape[0] != wa.shape[0] or t.shape[1] != wb.shape[0]:
            raise ValueError(
                f"hada_weight_tucker: rank mismatch in factor {i}: t{i} {tuple(t.shape)}, "
                f"w{i}a {tuple(wa.shape)} (r, out), w{i}b {tuple(wb.shape)} (r, in)"
            )
    if w1a.shape[1] != w2a.shape[1] or w1b.shape[1] != w2b.shape[1] or t1.shape[2:] != t2.shape[2:]:
        raise ValueError("hada_weight_tucker: the two Tucker factors have different shapes")
    return _HadaWeightTucker.apply(t1, w1a, w1b, t2, w2a, w2b)


# --------------------------------------------------------------------------------------------
# merge helpers (no grad, fp32)
# --------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prep(t: torch.Tensor, cdt: torch.dtype, device) -> torch.Tensor:
    return t.detach().to(device=device if device is not None else t.device, dtype=cdt)


def _get(factors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    t = factors.get(key)
    if t is None:
        raise KeyError(f"LoHA factors lack {key!r} (have: {sorted(factors)})")
    return t


@torch.no_grad()
def loha_delta(
    factors: Mapping[str, torch.Tensor],
    shape: Sequence[int],
    scale: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``scale * H`` reshaped to the weight ``shape``, for merging.

    ``factors`` uses the file's names (``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``,
    optional ``hada_t1``/``hada_t2``; other keys such as ``alpha`` are ignored).  The factors are
    upcast to fp32 (fp64 if ``dtype`` is fp64) before any arithmetic; the result is returned in
    ``dtype`` on ``device`` (default: the factors' device).  Flat conv factors are 2-D
    (r, in*kh*kw); 4-D flat factors written by some trainers ((out, r, 1, 1) / (r, in, kh, kw))
    are accepted too.  ``scale`` is alpha / r times any strength the caller wants folded in.
    """
    shape = torch.Size(shape)
    cdt = _compute_dtype(dtype)
    w1a, w1b, w2a, w2b = (
        _prep(_get(factors, k), cdt, device)
        for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    )
    has_t = [factors.get(k) is not None for k in _TUCKER_KEYS]
    if any(has_t):
        if not all(has_t):
            raise ValueError("LoHA factors have only one of hada_t1 / hada_t2")
        t1 = _prep(factors["hada_t1"], cdt, device)
        t2 = _prep(factors["hada_t2"], cdt, device)
        expect = (shape[0], shape[1], *t1.shape[2:]) if len(shape) >= 2 else None
        if (
            len(shape) < 3
            or w1a.dim() != 2
            or w1b.dim() != 2
            or tuple(shape) != expect
            or tuple(w1a.shape[1:]) != (shape[0],)
            or tuple(w1b.shape[1:]) != (shape[1],)
        ):
            raise ValueError(
                f"Tucker LoHA factors do not fit weight shape {tuple(shape)}: hada_t1 "
                f"{tuple(t1.shape)}, hada_w1_a {tuple(w1a.shape)} (want (r, out)), hada_w1_b "
                f"{tuple(w1b.shape)} (want (r, in))"
            )
        h = tucker_rebuild(t1, w1a, w1b).mul_(tucker_rebuild(t2, w2a, w2b))
    else:
        w1a = w1a.reshape(w1a.shape[0], -1)
        w2a = w2a.reshape(w2a.shape[0], -1)
        w1b = w1b.reshape(w1b.shape[0], -1)
        w2b = w2b.reshape(w2b.shape[0], -1)
        if (
            len(shape) < 1
            or w1a.shape[0] != shape[0]
            or w1a.shape[1] != w1b.shape[0]
            or w2a.shape[1] != w2b.shape[0]
            or w1a.shape[0] * w1b.shape[1] != shape.numel()
            or w2a.shape[0] != shape[0]
            or w2b.shape[1] != w1b.shape[1]
        ):
            raise ValueError(
                f"LoHA factors do not fit weight shape {tuple(shape)}: hada_w1_a "
                f"{tuple(w1a.shape)}, hada_w1_b {tuple(w1b.shape)}, hada_w2_a {tuple(w2a.shape)}, "
                f"hada_w2_b {tuple(w2b.shape)}"
            )
        h = (w1a @ w1b).mul_(w2a @ w2b)
    return h.reshape(shape).mul_(float(scale)).to(dtype)


@torch.no_grad()
def lora_delta(
    up: torch.Tensor,
    down: torch.Tensor,
    mid: torch.Tensor | None = None,
    shape: Sequence[int] | None = None,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """LoRA / LoCon delta ``scale * up @ down`` (or Tucker ``up x mid x down``), fp32.

    ``up`` (out, r[, 1, 1]) = ``lora_up.weight``, ``down`` (r, in[, kh, kw]) = ``lora_down.weight``,
    ``mid`` (r, r, kh, kw) = ``lora_mid.weight`` (then ``down`` is (r, in, 1, 1)):
    ``ΔW[o, c, y, x] = scale * sum_{i,j} up[o, i] * mid[i, j, y, x] * down[j, c]``.
    Without ``shape`` the result is (out, in[, kh, kw]) from the factors' own shapes.
    """
    cdt = _compute_dtype(dtype)
    up = _prep(up, cdt, device)
    down = _prep(down, cdt, device)
    up2 = up.reshape(up.shape[0], -1)
    down2 = down.reshape(down.shape[0], -1)
    if mid is None:
        if up2.shape[1] != down2.shape[0]:
            raise ValueError(f"lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} ranks differ")
        natural = (up.shape[0], *down.shape[1:])
        h = up2 @ down2
    else:
        mid = _prep(mid, cdt, device)
        if mid.dim() < 3 or mid.shape[0] != up2.shape[1] or mid.shape[1] != down2.shape[0]:
            raise ValueError(
                f"lora_mid {tuple(mid.shape)} does not fit lora_up {tuple(up.shape)} / "
                f"lora_down {tuple(down.shape)}"
            )
        natural = (up.shape[0], down2.shape[1], *mid.shape[2:])
        h = tucker_rebuild(mid, up2.mT, down2)
    if shape is None:
        shape = natural
    shape = torch.Size(shape)
    if shape.numel() != h.numel():
        raise ValueError(f"LoRA delta of shape {tuple(natural)} does not fit weight shape {tuple(shape)}")
    return h.reshape(shape).mul_(float(scale)).to(dtype)


def _dora_axis(weight_shape: torch.Size, ds: torch.Tensor) -> str:
    out, inn = weight_shape[0], weight_shape[1]
    rest = weight_shape[2:]
    s = tuple(ds.shape)
    if s in ((out, 1, *([1] * len(rest))), (out,)):
        return "out"
    if s == (1, inn, *([1] * len(rest))):
        return "in"
    raise ValueError(
        f"dora_scale shape {s} fits neither ({out}, 1{', 1' * len(rest)}) (per output row) nor "
        f"(1, {inn}{', 1' * len(rest)}) (per input column) for a weight of shape {tuple(weight_shape)}"
    )


@torch.no_grad()
def apply_dora(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA-merged weight ``W' = (W + ΔW) * dora_scale / ||W + ΔW||`` in fp32 (fp64 stays fp64).

    The norm axis follows ``dora_scale``'s shape: (out, 1[, 1, 1]) -> one norm per output row over
    all other dims (LyCORIS default, ``wd_on_out=True``); (1, in[, 1, 1]) -> one norm per input
    column over out and spatial dims (A1111 / old LyCORIS).  Like LyCORIS, ``finfo(fp32).eps`` is
    added to the norm.  ``delta`` is ``scale * H`` WITHOUT strength; a strength s is applied by the
    caller as ``W + s * (W' - W)``.  With out == in == 1 a (1, 1) scale is read as per-output-row.
    """
    if weight.dim() < 2 or weight.shape != delta.shape:
        raise ValueError(f"apply_dora: weight {tuple(weight.shape)} and delta {tuple(delta.shape)} must match")
    cdt = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
    w = weight.to(cdt) + delta.to(device=weight.device, dtype=cdt)
    ds = dora_scale.to(device=weight.device, dtype=cdt)
    axis = _dora_axis(w.shape, ds)
    ones = [1] * (w.dim() - 2)
    if axis == "out":
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], 1, *ones)
        ds = ds.reshape(w.shape[0], 1, *ones)
    else:
        norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *ones)
    norm = norm + torch.finfo(torch.float32).eps
    return w.mul_(ds / norm)
