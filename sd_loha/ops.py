"""Pure tensor functions for LoHA (and the LoRA/LoCon/DoRA parts of mixed files).

Conventions (see docs FORMAT.md, "Math" and "Shapes"):

* flat form (Linear, 1x1 conv, k x k conv "flat"):
  ``H = (w1a @ w1b) * (w2a @ w2b)`` with ``w_a`` (out, r) and ``w_b`` (r, in*kh*kw);
  H is (out, in*kh*kw) and is reshaped to the weight shape by the caller.
* Tucker form (k x k conv): ``W_i[o, c, y, x] = sum_{j,k} t_i[j, k, y, x] * w_i_a[j, o] * w_i_b[k, c]``
  with ``w_a`` (r, out), ``w_b`` (r, in), ``t`` (r, r, kh, kw); ``H = W_1 * W_2``.

The two training kernels (:func:`hada_weight`, :func:`hada_weight_tucker`) are custom autograd
Functions that save only the small factors and recompute the full-size products in backward, so a
trainer holds no (out x in) tensor per adapted layer between forward and backward.

The layer-level training paths (:mod:`sd_loha.forward` calls them): :func:`merged_linear` /
:func:`merged_conv2d` run ONE op with W + s·H and get every factor gradient from one weight-gradient product
(saving x and the factors only); :func:`kr_factors` / :func:`kr_tucker_factors` give the Khatri-Rao form H = U
V (rank r1·r2), so ΔW x = U (V x) costs r1·r2·(in + out) per token; :func:`path_costs` / :func:`choose_path`
pick between them (and the plain base(x) + op(x, ΔW)) per call. The merge helpers (:func:`loha_delta`,
:func:`lora_delta`, :func:`apply_dora`) run without autograd and always compute in fp32 (or fp64 when asked),
whatever dtype the factors are stored in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "hada_weight",
    "hada_weight_tucker",
    "merged_linear",
    "merged_conv2d",
    "kr_factors",
    "kr_tucker_factors",
    "path_costs",
    "choose_path",
    "tucker_rebuild",
    "loha_delta",
    "lora_delta",
    "apply_dora",
    "dora_magnitude",
    "dora_weight",
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


def _tucker_side_grads(g, t3, wa, wb, k, n_t, n_a, n_b):
    """Gradients of one Tucker factor ``W[o,c,s] = sum t[j,k,s] wa[j,o] wb[k,c]`` from
    ``g = dL/dW`` (out, in, S): returns (grad t (r, r, *k), grad wa, grad wb), None where not needed."""
    gt = ga = gb = None
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
            if not (n_t or n_a or n_b):
                return None, None, None
            # g = _mul_into(...) is passed as a temporary so the helper can free it early
            return _tucker_side_grads(_mul_into(_tucker3(*other), grad3), t3, wa, wb, k, n_t, n_a, n_b)

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
# training forward paths: merge-then-one-op, Khatri-Rao (rank r1*r2), and the cost model
# --------------------------------------------------------------------------------------------
def _as_pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(t) for t in v)
    return (v[0], v[0]) if len(v) == 1 else v  # type: ignore[return-value]


def _scale_rows(wa: torch.Tensor, row_scale, tucker: bool) -> torch.Tensor:
    """``diag(row_scale) @ (wa @ wb)`` expressed on the small factor: rows of a flat (out, r) w_a,
    columns of a Tucker (r, out) w_a.  ``row_scale`` is a Python number or an (out,) tensor."""
    if isinstance(row_scale, torch.Tensor):
        return wa * (row_scale.reshape(1, -1) if tucker else row_scale.reshape(-1, 1))
    return wa * row_scale


def _tucker_parts(factors, row_scale):
    """The two full-size Tucker Hadamard operands (W1s, W2), each (out, in, S); W1s carries the row
    scale."""
    t1, w1a, w1b, t2, w2a, w2b = factors
    t1_3 = t1.reshape(t1.shape[0], t1.shape[1], -1)
    t2_3 = t2.reshape(t2.shape[0], t2.shape[1], -1)
    return _tucker3(t1_3, _scale_rows(w1a, row_scale, True), w1b), _tucker3(t2_3, w2a, w2b)


def _pad_rank(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """``t`` with dimension ``dim`` (0 or 1 of a 2-D tensor) zero-padded to size r."""
    n = r - t.shape[dim]
    if n == 0:
        return t
    return torch.nn.functional.pad(t, (0, n) if dim == 1 else (0, 0, 0, n))


def _stack_flat(factors, row_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The two flat factor pairs stacked for one batched product: (A, B) with A = (w1a·s, w2a)
    (2, out, r) and B = (w1b, w2b) (2, r, in_flat), so bmm(A, B) = (P1s, P2), the two Hadamard
    operands, the first carrying the row scale.  Unequal ranks are zero-padded to the larger one
    (zero columns / rows add nothing to either product)."""
    w1a, w1b, w2a, w2b = factors
    r = max(w1a.shape[1], w2a.shape[1])
    a = torch.stack((_pad_rank(_scale_rows(w1a, row_scale, False), r, 1), _pad_rank(w2a, r, 1)))
    return a, torch.stack((_pad_rank(w1b, r, 0), _pad_rank(w2b, r, 0)))


def _merged(weight: torch.Tensor, p1s: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """``weight + p1s * p2`` in one pass (p1s already carries scale and row mask)."""
    return torch.addcmul(weight.reshape(p1s.shape), p1s, p2).reshape(weight.shape)


class _MergedHadaOp(torch.autograd.Function):
    """y = op(x, W + diag(row_scale) H, bias), one linear / conv per call.

    Saves x and the small factors only; backward rebuilds the two Hadamard operands once and uses
    them three times: for the merged weight (input gradient), and for the two halves of
    dL/dH = row_scale * gᵀx (one weight-gradient product, then straight to the factors).  Flat
    factors go through batched products (both pairs in one bmm), which keeps the per-layer kernel
    count low: at a few hundred tokens the rank-r products and their launch overhead are a large
    part of the adapter's cost."""

    @staticmethod
    def forward(ctx, conv, tucker, row_scale, x, weight, bias, *factors):
        if tucker:
            w_eff = _merged(weight, *_tucker_parts(factors, row_scale))
            saved = factors
        else:
            a, b = _stack_flat(factors, row_scale)
            p = torch.bmm(a, b)
            w_eff = _merged(weight, p[0], p[1])
            del p
            saved = (a, b)
        if conv is None:
            y = torch.nn.functional.linear(x, w_eff, bias)
        else:
            stride, padding, dilation = conv
            y = torch.nn.functional.conv2d(x, w_eff, bias, stride, padding, dilation, 1)
        rs_t = row_scale if isinstance(row_scale, torch.Tensor) else None
        ctx.conv, ctx.tucker = conv, tucker
        ctx.row_scale = None if rs_t is not None else row_scale
        ctx.ranks = None if tucker else (factors[0].shape[1], factors[2].shape[1])
        ctx.save_for_backward(x, weight, rs_t, *saved)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, rs_t, *saved = ctx.saved_tensors
        row_scale = rs_t if rs_t is not None else ctx.row_scale
        tucker, conv = ctx.tucker, ctx.conv
        need_x = ctx.needs_input_grad[3]
        need_f = ctx.needs_input_grad[6:]
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            raise RuntimeError("merged LoHA op: the base weight and bias must be frozen")
        need_w = any(need_f)
        grads_f: list = [None] * len(need_f)
        grad_x = None
        if not (need_x or need_w):
            return (None, None, None, None, None, None, *grads_f)
        if tucker:
            p1s, p2 = _tucker_parts(saved, row_scale)
        else:
            a, b = saved
            p = torch.bmm(a, b)  # (P1s, P2)
            p1s, p2 = p[0], p[1]
        w_eff = _merged(weight, p1s, p2) if need_x else weight
        g = g.contiguous()
        if conv is None:
            out, inn = weight.shape
            if need_x:
                grad_x = g @ w_eff
            del w_eff
            gw = g.reshape(-1, out).mT @ x.reshape(-1, inn) if need_w else None
        else:
            stride, padding, dilation = conv
            grad_x, gw, _ = torch.ops.aten.convolution_backward(
                g, x, w_eff, None, stride, padding, dilation, False, [0, 0], 1, [need_x, need_w, False]
            )
            del w_eff
        if not need_w:
            return (None, None, None, grad_x, None, None, *grads_f)
        gw = gw.reshape(p1s.shape)  # dL/d(P1s * P2)
        if not tucker:
            # p * gw = (gw⊙P1s, gw⊙P2) = (dL/dP2, dL/dP1s): each slot holds the OTHER operand's
            # gradient, so it meets the other pair's factors (a, b flipped on the batch axis).
            del p1s, p2
            d = p.mul_(gw)
            del gw
            ga = torch.bmm(d, b.flip(0).mT)  # (dL/dw2a, dL/d(w1a·s)), padded
            gb = torch.bmm(a.flip(0).mT, d)  # (dL/dw2b, dL/dw1b), padded
            r1, r2 = ctx.ranks
            if need_f[0]:
                grads_f[0] = _scale_rows(ga[1, :, :r1], row_scale, False)
            if need_f[1]:
                grads_f[1] = gb[1, :r1]
            if need_f[2]:
                grads_f[2] = ga[0, :, :r2]
            if need_f[3]:
                grads_f[3] = gb[0, :r2]
            return (None, None, None, grad_x, None, None, *grads_f)
        t1, w1a, w1b, t2, w2a, w2b = saved
        k = t1.shape[2:]
        t1_3 = t1.reshape(t1.shape[0], t1.shape[1], -1)
        t2_3 = t2.reshape(t2.shape[0], t2.shape[1], -1)
        w1as = _scale_rows(w1a, row_scale, True)
        if need_f[0] or need_f[1] or need_f[2]:
            gt1, ga1s, gb1 = _tucker_side_grads(gw * p2, t1_3, w1as, w1b, k, need_f[0], need_f[1], need_f[2])
            grads_f[0], grads_f[2] = gt1, gb1
            if ga1s is not None:
                grads_f[1] = _scale_rows(ga1s, row_scale, True)
        del p2
        if need_f[3] or need_f[4] or need_f[5]:
            grads_f[3], grads_f[4], grads_f[5] = _tucker_side_grads(
                gw.mul_(p1s), t2_3, w2a, w2b, k, need_f[3], need_f[4], need_f[5]
            )
        return (None, None, None, grad_x, None, None, *grads_f)


def _check_factors(factors, weight: torch.Tensor, tucker: bool) -> None:
    if tucker:
        t1, w1a, w1b, t2, w2a, w2b = factors
        ok = (
            w1a.dim() == w2a.dim() == w1b.dim() == w2b.dim() == 2
            and w1a.shape[1] == w2a.shape[1] == weight.shape[0]
            and w1b.shape[1] == w2b.shape[1] == weight.shape[1]
            and tuple(t1.shape[2:]) == tuple(t2.shape[2:]) == tuple(weight.shape[2:])
            and t1.shape[:2] == (w1a.shape[0], w1b.shape[0])
            and t2.shape[:2] == (w2a.shape[0], w2b.shape[0])
        )
    else:
        w1a, w1b, w2a, w2b = factors
        in_flat = weight[0].numel()
        ok = (
            all(t.dim() == 2 for t in factors)
            and w1a.shape[0] == w2a.shape[0] == weight.shape[0]
            and w1b.shape[1] == w2b.shape[1] == in_flat
            and w1a.shape[1] == w1b.shape[0]
            and w2a.shape[1] == w2b.shape[0]
        )
    if not ok:
        raise ValueError(
            f"LoHA factors {[tuple(t.shape) for t in factors]} do not fit weight {tuple(weight.shape)}"
            f" ({'Tucker' if tucker else 'flat'} form)"
        )


def merged_linear(x, weight, bias, factors, row_scale=1.0) -> torch.Tensor:
    """``F.linear(x, weight + diag(row_scale) H, bias)`` with H = (w1a w1b) ⊙ (w2a w2b).

    ``factors`` = (w1a, w1b, w2a, w2b); ``row_scale`` a number (multiplier * alpha / r) or an (out,)
    tensor (that times a rank-dropout mask).  Everything in one dtype (fp32 / fp64).  Autograd
    saves x and the factors only, nothing of size (out, in); ``weight`` / ``bias`` must be frozen.
    """
    _check_factors(factors, weight, False)
    return _MergedHadaOp.apply(None, False, row_scale, x, weight, bias, *factors)


def merged_conv2d(x, weight, bias, factors, row_scale=1.0, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """``F.conv2d(x, weight + diag(row_scale) H, bias, stride, padding, dilation)``.

    ``factors`` = flat (w1a, w1b, w2a, w2b) with w_b (r, in*kh*kw), or Tucker (t1, w1a, w1b, t2,
    w2a, w2b) as in :func:`hada_weight_tucker`.  ``padding`` must be numeric (symmetric).  Same
    saving rule as :func:`merged_linear`.
    """
    tucker = len(factors) == 6
    _check_factors(factors, weight, tucker)
    conv = (_as_pair(stride), _as_pair(padding), _as_pair(dilation))
    return _MergedHadaOp.apply(conv, tucker, row_scale, x, weight, bias, *factors)


def kr_factors(w1a, w1b, w2a, w2b) -> tuple[torch.Tensor, torch.Tensor]:
    """Khatri-Rao form of the flat LoHA product: ``(w1a w1b) ⊙ (w2a w2b) = U @ V`` with
    ``U[o, j*r2 + k] = w1a[o, j] w2a[o, k]`` (out, r1*r2) and ``V[j*r2 + k, i] = w1b[j, i] w2b[k, i]``
    (r1*r2, in_flat).  So ΔW x = U (V x): a rank-r1*r2 LoRA path.  Plain autograd (small tensors)."""
    out, r1 = w1a.shape
    r2 = w2a.shape[1]
    u = (w1a.unsqueeze(2) * w2a.unsqueeze(1)).reshape(out, r1 * r2)
    v = (w1b.unsqueeze(1) * w2b.unsqueeze(0)).reshape(r1 * r2, w1b.shape[1])
    return u, v


def kr_tucker_factors(t1, w1a, w1b, t2, w2a, w2b) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Khatri-Rao form of the Tucker LoHA product: H = conv chain ``U ∘ T ∘ V``:
    V (R, in) 1x1 with ``V[(k,m), c] = w1b[k, c] w2b[m, c]``; core T (R, R, *k) with
    ``T[(j,l), (k,m), s] = t1[j,k,s] t2[l,m,s]`` (carries stride / padding / dilation);
    U (out, R) 1x1 with ``U[o, (j,l)] = w1a[j, o] w2a[l, o]``; R = r1 * r2."""
    r1, r2 = w1a.shape[0], w2a.shape[0]
    k = t1.shape[2:]
    t1_3 = t1.reshape(t1.shape[0], t1.shape[1], -1)
    t2_3 = t2.reshape(t2.shape[0], t2.shape[1], -1)
    big_r_in = t1.shape[1] * t2.shape[1]
    core = (t1_3[:, None, :, None, :] * t2_3[None, :, None, :, :]).reshape(r1 * r2, big_r_in, *k)
    u = (w1a.mT.unsqueeze(2) * w2a.mT.unsqueeze(1)).reshape(w1a.shape[1], r1 * r2)
    v = (w1b.unsqueeze(1) * w2b.unsqueeze(0)).reshape(big_r_in, w1b.shape[1])
    return v, core, u


# Cost model.  Unit: one multiply-add of the base layer's own GEMM / convolution.  Constants
# measured on the issue-5 machine (x86-64 AVX2, MKL / oneDNN, fp32, 1 thread, CPU time, median of
# the per-layer sweep in bench/bench_train_step.py --layer-sweep); see bench/RESULTS.md.
COST_THIN = 1.4        # one multiply-add of the Khatri-Rao path's thin (R = r1*r2 channel) GEMMs / convs
COST_W_FWD = 30.0      # per weight element: build W + s*H in forward (two rank-r GEMMs, one fused pass)
COST_W_BWD = 220.0     # per weight element: rebuild in backward, dL/dH products, four factor GEMMs
COST_PASS = 8.0        # per element of one elementwise pass over an activation (adding the delta)
COST_CALL = 600_000.0  # one extra kernel call (dispatch, allocation, autograd node): ~25 us


def path_costs(
    *,
    out: int,
    in_ch: int,
    kernel: int = 1,
    rank1: int,
    rank2: int | None = None,
    n_out: int,
    n_in: int | None = None,
    tucker: bool = False,
    backward: bool = True,
) -> dict[str, float]:
    """Estimated extra cost of the adapter over the frozen layer (forward, plus backward to the
    factors and the input when ``backward``), in multiply-adds of the base op, per path:

    - ``merge``: build W + s·H (rank-r GEMMs, one fused pass) and run ONE op; backward: the input
      gradient with the merged weight (what the frozen layer needs anyway), one weight-gradient
      product gᵀx (n_out·out·in·k multiply-adds, the only token-dependent extra), rebuild and four
      factor GEMMs.
    - ``kr``: the base op plus x -> V -> U through R = r1·r2 channels: 3·n·R·(in·k + out) in total
      (Tucker: 1x1 to R at input resolution, a k×k R -> R core, 1x1 to out).
    - ``delta``: the pre-issue-5 path, base op plus a second full op with ΔW: two extra full ops
      in backward, one in forward, plus the weight work of ``merge``.

    ``kernel`` = kh·kw, ``n_out`` / ``n_in`` = output / input tokens (batch × positions).  Plain
    arithmetic on Python ints, cheap enough for every call.
    """
    r2 = rank1 if rank2 is None else rank2
    big_r = rank1 * r2
    in_flat = in_ch * kernel
    oi = out * in_flat
    n_in = n_out if n_in is None else n_in
    scale_r = (rank1 + r2) / 16.0  # the weight-work constants were measured at r1 = r2 = 8
    w_work = oi * scale_r * (COST_W_FWD + (COST_W_BWD if backward else 0.0))
    passes = 1 + (1 if backward else 0)
    if backward:
        merge = w_work + n_out * oi + COST_CALL * 14
        delta = w_work + 3 * n_out * oi + COST_PASS * n_out * out * passes + COST_CALL * 18
    else:
        merge = w_work + COST_CALL * 4
        delta = w_work + n_out * oi + COST_PASS * n_out * out + COST_CALL * 6
    if tucker:
        thin = n_in * big_r * in_ch + n_out * big_r * big_r * kernel + n_out * big_r * out
        calls = 9
    else:
        thin = n_out * big_r * (in_flat + out)
        calls = 7
    kr = COST_THIN * thin * (3 if backward else 1) + COST_PASS * n_out * out * passes + COST_CALL * calls * (
        2.8 if backward else 1
    )
    return {"merge": merge, "kr": kr, "delta": delta}


def choose_path(allow_merge: bool = True, **shape) -> str:
    """The cheapest path by :func:`path_costs` (``merge`` only when ``allow_merge``: it needs the
    base weight, the input and the factors in one fp32/fp64 dtype and no autocast)."""
    costs = path_costs(**shape)
    if not allow_merge:
        del costs["merge"]
    return min(costs, key=costs.__getitem__)


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


def dora_magnitude(weight: torch.Tensor, on_output: bool) -> torch.Tensor:
    """‖weight‖ per output row (``on_output``: shape (out, 1[, 1, 1])) or per input column (over out and the
    kernel: (1, in[, 1, 1])), in a shape that broadcasts against the weight.  Differentiable.  LyCORIS
    initialises ``dora_scale`` with this of the original weight."""
    ones = [1] * (weight.dim() - 2)
    if on_output:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], 1, *ones)
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(1, weight.shape[1], *ones)


def dora_weight(merged: torch.Tensor, dora_scale: torch.Tensor, on_output: bool) -> torch.Tensor:
    """LyCORIS's weight decomposition of ``merged`` = W + ΔW: ``merged * dora_scale / (‖merged‖ + eps)``, the
    norm along the axis ``on_output`` names, eps = finfo(fp32).eps (LyCORIS adds the eps of its fp32
    dora_scale).  Differentiable in both ``merged`` and ``dora_scale`` (LyCORIS does not detach the norm)."""
    norm = dora_magnitude(merged, on_output) + torch.finfo(torch.float32).eps
    return merged * (dora_scale.reshape(norm.shape) / norm)


@torch.no_grad()
def apply_dora(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA-merged weight ``W' = (W + ΔW) * dora_scale / ||W + ΔW||`` in fp32 (fp64 stays fp64).

    The norm axis follows ``dora_scale``'s shape: (out, 1[, 1, 1]) -> one norm per output row over
    all other dims (LyCORIS ``wd_on_output=True``); (1, in[, 1, 1]) -> one norm per input
    column over out and spatial dims (``wd_on_output=False``, the axis A1111 always uses).  Like LyCORIS,
    ``finfo(fp32).eps`` is added to the norm (:func:`dora_weight`).  ``delta`` is ``scale * H`` WITHOUT
    strength; a strength s is applied by the caller as ``W + s * (W' - W)``.  With out == in == 1 a (1, 1)
    scale is read as per-output-row.
    """
    if weight.dim() < 2 or weight.shape != delta.shape:
        raise ValueError(f"apply_dora: weight {tuple(weight.shape)} and delta {tuple(delta.shape)} must match")
    cdt = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
    w = weight.to(cdt) + delta.to(device=weight.device, dtype=cdt)
    ds = dora_scale.to(device=weight.device, dtype=cdt)
    return dora_weight(w, ds, _dora_axis(w.shape, ds) == "out")
