"""Tests for sd_loha.ops: autograd kernels, merge deltas, DoRA.

Tolerances: fp64 gradchecks use torch's defaults (eps 1e-6, atol 1e-5, rtol 1e-3).  fp32
comparisons against the plain-autograd formula use rtol=1e-5 and an atol of 1e-5 times the
magnitude of the compared tensor (sums of a few hundred O(1) products in fp32 reassociate to
~1e-6 relative).  Hand computations in fp64 vs our fp32 results: rtol=1e-5, atol=1e-6.
"""

import pytest
import torch

from sd_loha import ops

RTOL = 1e-5


# These tensors are tiny: one intra-op thread is as fast, and immune to the OpenMP stalls a shared,
# oversubscribed machine causes with more (gradchecks ran ~10x slower there).
pytestmark = pytest.mark.usefixtures("one_thread")


def close32(actual, expected, rtol=RTOL):
    """fp32 closeness scaled to the tensor's magnitude."""
    atol = 1e-5 * max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _flat_factors(out, inn, r1, r2=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r2 = r1 if r2 is None else r2
    return [
        torch.randn(out, r1, generator=g, dtype=dtype),
        torch.randn(r1, inn, generator=g, dtype=dtype),
        torch.randn(out, r2, generator=g, dtype=dtype),
        torch.randn(r2, inn, generator=g, dtype=dtype),
    ]


def _tucker_factors(out, inn, r, k, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    # order: t1, w1a, w1b, t2, w2a, w2b
    return [f(r, r, *k), f(r, out), f(r, inn), f(r, r, *k), f(r, out), f(r, inn)]


def plain_hada(w1a, w1b, w2a, w2b):
    return (w1a @ w1b) * (w2a @ w2b)


def plain_tucker(t1, w1a, w1b, t2, w2a, w2b):
    # literal FORMAT.md formula: W[o,c,y,x] = sum_{j,k} t[j,k,y,x] a[j,o] b[k,c]
    w1 = torch.einsum("jkyx,jo,kc->ocyx", t1, w1a, w1b)
    w2 = torch.einsum("jkyx,jo,kc->ocyx", t2, w2a, w2b)
    return w1 * w2


# ------------------------------------------------------------------------------ gradcheck
def test_gradcheck_hada_weight():
    fs = [t.requires_grad_() for t in _flat_factors(5, 4, 3)]
    assert torch.autograd.gradcheck(ops.hada_weight, fs)
    fs = [t.requires_grad_() for t in _flat_factors(3, 6, 2, 4, seed=1)]  # unequal ranks
    assert torch.autograd.gradcheck(ops.hada_weight, fs)


def test_gradgradcheck_hada_weight():
    fs = [t.requires_grad_() for t in _flat_factors(3, 4, 2)]
    assert torch.autograd.gradgradcheck(ops.hada_weight, fs)


def test_gradcheck_hada_weight_partial_inputs():
    w1a, w1b, w2a, w2b = _flat_factors(4, 3, 2)
    w1b.requires_grad_()
    w2a.requires_grad_()
    assert torch.autograd.gradcheck(ops.hada_weight, [w1a, w1b, w2a, w2b])


@pytest.mark.parametrize("k", [(3, 3), (3, 2), (1, 5)])
def test_gradcheck_hada_weight_tucker(k):
    fs = [t.requires_grad_() for t in _tucker_factors(4, 3, 2, k)]
    assert torch.autograd.gradcheck(ops.hada_weight_tucker, fs)


def test_gradgradcheck_hada_weight_tucker():
    fs = [t.requires_grad_() for t in _tucker_factors(3, 2, 2, (2, 2))]
    assert torch.autograd.gradgradcheck(ops.hada_weight_tucker, fs)


# ------------------------------------------------------------------------------ vs plain formula, fp32
def _compare_to_plain(fn, plain, factors32):
    ours = [t.clone().requires_grad_() for t in factors32]
    ref = [t.clone().requires_grad_() for t in factors32]
    y, y_ref = fn(*ours), plain(*ref)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    close32(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for a, b in zip(ours, ref):
        close32(a.grad, b.grad)


def test_hada_weight_matches_plain_fp32():
    _compare_to_plain(ops.hada_weight, plain_hada, _flat_factors(64, 48, 8, dtype=torch.float32))
    # flat 3x3 conv form: (out, r), (r, in*9)
    _compare_to_plain(ops.hada_weight, plain_hada, _flat_factors(32, 16 * 9, 4, dtype=torch.float32))


def test_hada_weight_tucker_matches_plain_fp32():
    _compare_to_plain(
        ops.hada_weight_tucker, plain_tucker, _tucker_factors(24, 16, 4, (3, 3), dtype=torch.float32)
    )


def test_tucker_rebuild_formula():
    t, a, b = torch.randn(2, 3, 3, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    w = ops.tucker_rebuild(t, a, b)
    assert w.shape == (4, 5, 3, 2)
    o, c, y, x = 3, 2, 1, 1
    expect = sum(t[j, k, y, x] * a[j, o] * b[k, c] for j in range(2) for k in range(3))
    torch.testing.assert_close(w[o, c, y, x], expect)


def test_shape_errors():
    w1a, w1b, w2a, w2b = _flat_factors(4, 3, 2)
    with pytest.raises(ValueError):
        ops.hada_weight(w1a, w1b.T, w2a, w2b)
    with pytest.raises(ValueError):
        ops.hada_weight(w1a, w1b, w2a[:3], w2b)
    t1, a1, b1, t2, a2, b2 = _tucker_factors(4, 3, 2, (3, 3))
    with pytest.raises(ValueError):
        ops.hada_weight_tucker(t1, a1.T, b1, t2, a2, b2)


# ------------------------------------------------------------------------------ memory
class _SavedCounter:
    """Records the element count of every tensor autograd saves inside the context."""

    def __init__(self):
        self.numels = []

    def __enter__(self):
        def pack(t):
            self.numels.append(t.numel())
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_hada_weight_saves_only_factors():
    out, inn, r = 96, 80, 4
    fs = [t.requires_grad_() for t in _flat_factors(out, inn, r, dtype=torch.float32)]
    with _SavedCounter() as c:
        y = ops.hada_weight(*fs)
    assert sorted(c.numels) == sorted(t.numel() for t in fs)
    assert max(c.numels) < out * inn
    y.sum().backward()  # still works after the hooks
    # the hook does see full-size saves: the plain formula saves the (out, in) products
    with _SavedCounter() as c_plain:
        plain_hada(*fs)
    assert max(c_plain.numels) == out * inn


def test_hada_weight_tucker_saves_only_factors():
    out, inn, r, k = 32, 24, 4, (3, 3)
    fs = [t.requires_grad_() for t in _tucker_factors(out, inn, r, k, dtype=torch.float32)]
    with _SavedCounter() as c:
        y = ops.hada_weight_tucker(*fs)
    assert sorted(c.numels) == sorted(t.numel() for t in fs)
    assert sum(c.numels) < out * inn * 9
    y.sum().backward()
    with _SavedCounter() as c_plain:
        plain_tucker(*fs)
    assert max(c_plain.numels) == out * inn * 9


# ------------------------------------------------------------------------------ loha_delta
def test_loha_delta_linear_fp16_factors_upcast():
    fs64 = _flat_factors(6, 5, 3)
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    factors = {n: t.to(torch.float16) for n, t in zip(names, fs64)}
    factors["alpha"] = torch.tensor(1.5)  # ignored
    d = ops.loha_delta(factors, torch.Size((6, 5)), scale=0.5)
    assert d.dtype == torch.float32 and d.shape == (6, 5)
    expect = 0.5 * plain_hada(*(factors[n].double() for n in names))  # fp16 values, exact math
    torch.testing.assert_close(d, expect.float(), rtol=1e-5, atol=1e-6)
    d16 = ops.loha_delta(factors, (6, 5), scale=0.5, dtype=torch.float16)
    assert d16.dtype == torch.float16
    torch.testing.assert_close(d16, expect.half())


def test_loha_delta_flat_conv_reshape():
    out, inn, kh, kw, r = 4, 3, 3, 2, 2
    w1a, w1b, w2a, w2b = _flat_factors(out, inn * kh * kw, r)
    factors = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    d = ops.loha_delta(factors, torch.Size((out, inn, kh, kw)), scale=2.0, dtype=torch.float64)
    assert d.shape == (out, inn, kh, kw)
    # hand computation: flat column index = c*kh*kw + y*kw + x (torch's row-major flattening)
    for o, c, y, x in [(0, 0, 0, 0), (3, 2, 2, 1), (1, 1, 0, 1), (2, 0, 1, 0)]:
        col = c * kh * kw + y * kw + x
        expect = 2.0 * (w1a[o] @ w1b[:, col]) * (w2a[o] @ w2b[:, col])
        torch.testing.assert_close(d[o, c, y, x], expect)
    # 4-D flat factors (a known non-standard writer) give the same result
    f4 = dict(factors, hada_w1_b=w1b.reshape(r, inn, kh, kw), hada_w2_b=w2b.reshape(r, inn, kh, kw),
              hada_w1_a=w1a.reshape(out, r, 1, 1))
    torch.testing.assert_close(ops.loha_delta(f4, (out, inn, kh, kw), 2.0, dtype=torch.float64), d)
    # 1x1 conv
    w1a, w1b, w2a, w2b = _flat_factors(out, inn, r)
    f = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    d = ops.loha_delta(f, (out, inn, 1, 1), 1.0, dtype=torch.float64)
    torch.testing.assert_close(d, plain_hada(w1a, w1b, w2a, w2b)[..., None, None])


def test_loha_delta_tucker():
    fs = _tucker_factors(5, 4, 3, (3, 3))
    t1, w1a, w1b, t2, w2a, w2b = fs
    factors = dict(hada_t1=t1, hada_w1_a=w1a, hada_w1_b=w1b, hada_t2=t2, hada_w2_a=w2a, hada_w2_b=w2b)
    d = ops.loha_delta(factors, (5, 4, 3, 3), scale=0.25)
    torch.testing.assert_close(d, (0.25 * plain_tucker(*fs)).float(), rtol=1e-5, atol=1e-6)


def test_loha_delta_shape_errors():
    w1a, w1b, w2a, w2b = _flat_factors(4, 6, 2)
    f = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    with pytest.raises(ValueError):
        ops.loha_delta(f, (4, 5), 1.0)
    with pytest.raises(ValueError):
        ops.loha_delta(f, (6, 4), 1.0)
    with pytest.raises(KeyError):
        ops.loha_delta({"hada_w1_a": w1a}, (4, 6), 1.0)
    t = _tucker_factors(4, 3, 2, (3, 3))
    ft = dict(zip(("hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b"), t))
    with pytest.raises(ValueError):
        ops.loha_delta(ft, (3, 4, 3, 3), 1.0)
    with pytest.raises(ValueError):
        ops.loha_delta(dict(ft, hada_t2=None), (4, 3, 3, 3), 1.0)


# ------------------------------------------------------------------------------ lora_delta
def test_lora_delta_linear_and_conv():
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    d = ops.lora_delta(up, down, scale=0.5)
    assert d.shape == (6, 5) and d.dtype == torch.float32
    hand = torch.tensor([[0.5 * sum(up[o, i].double() * down[i, c].double() for i in range(2)) for c in range(5)] for o in range(6)])
    torch.testing.assert_close(d, hand.float(), rtol=1e-5, atol=1e-6)
    # LoCon k x k: up (out, r, 1, 1), down (r, in, kh, kw)
    up4, down4 = torch.randn(4, 3, 1, 1, generator=g), torch.randn(3, 2, 3, 3, generator=g)
    d = ops.lora_delta(up4.half(), down4.half(), None, (4, 2, 3, 3), 2.0)
    assert d.shape == (4, 2, 3, 3) and d.dtype == torch.float32
    u, dn = up4.half().double(), down4.half().double()
    hand = 2.0 * torch.einsum("oi,icyx->ocyx", u[:, :, 0, 0], dn)
    torch.testing.assert_close(d, hand.float(), rtol=1e-5, atol=1e-6)
    assert ops.lora_delta(up4, down4).shape == (4, 2, 3, 3)  # natural shape


def test_lora_delta_tucker_hand():
    g = torch.Generator().manual_seed(4)
    out, inn, r = 3, 2, 2
    up = torch.randn(out, r, 1, 1, generator=g, dtype=torch.float64)
    down = torch.randn(r, inn, 1, 1, generator=g, dtype=torch.float64)
    mid = torch.randn(r, r, 3, 3, generator=g, dtype=torch.float64)
    d = ops.lora_delta(up, down, mid, (out, inn, 3, 3), 0.5, dtype=torch.float64)
    for o, c, y, x in [(0, 0, 0, 0), (2, 1, 2, 1), (1, 0, 1, 2)]:
        expect = 0.5 * sum(up[o, i, 0, 0] * mid[i, j, y, x] * down[j, c, 0, 0] for i in range(r) for j in range(r))
        torch.testing.assert_close(d[o, c, y, x], expect)
    # equals running the three convs in sequence (down 1x1 -> mid kxk -> up 1x1)
    xin = torch.randn(1, inn, 5, 5, generator=g, dtype=torch.float64)
    seq = torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(torch.nn.functional.conv2d(xin, down), mid, padding=1), up
    )
    torch.testing.assert_close(torch.nn.functional.conv2d(xin, d / 0.5, padding=1), seq)


def test_lora_delta_matches_lycoris():
    locon = pytest.importorskip("lycoris.functional.locon")
    g = torch.Generator().manual_seed(5)
    up, down, mid = torch.randn(4, 3, 1, 1, generator=g), torch.randn(3, 5, 1, 1, generator=g), torch.randn(3, 3, 3, 3, generator=g)
    ref = locon.diff_weight(down, up, mid, gamma=0.75, backend="torch")
    close32(ops.lora_delta(up, down, mid, ref.shape, 0.75), ref)
    down_k = torch.randn(3, 5, 3, 3, generator=g)
    ref = locon.diff_weight(down_k, up, None, gamma=0.75, backend="torch")
    close32(ops.lora_delta(up, down_k, None, ref.shape, 0.75), ref)


# ------------------------------------------------------------------------------ apply_dora
EPS32 = torch.finfo(torch.float32).eps


def _hand_dora(w, axis, ds):
    """Loops: per output row o, norm over w[o, ...]; per input column c, norm over w[:, c, ...]."""
    w = w.double()
    outw = torch.empty_like(w)
    if axis == "out":
        for o in range(w.shape[0]):
            n = torch.sqrt((w[o] ** 2).sum()) + EPS32
            outw[o] = w[o] * ds.reshape(-1)[o].double() / n
    else:
        for c in range(w.shape[1]):
            n = torch.sqrt((w[:, c] ** 2).sum()) + EPS32
            outw[:, c] = w[:, c] * ds.reshape(-1)[c].double() / n
    return outw


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3, 3), (4, 3, 1, 1)])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_apply_dora_hand(shape, axis):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(*shape, generator=g)
    dw = 0.1 * torch.randn(*shape, generator=g)
    rest = [1] * (len(shape) - 2)
    ds_shape = (shape[0], 1, *rest) if axis == "out" else (1, shape[1], *rest)
    ds = torch.rand(*ds_shape, generator=g) + 0.5
    res = ops.apply_dora(w.half(), dw, ds)  # fp16 weight is upcast
    assert res.dtype == torch.float32 and res.shape == w.shape
    torch.testing.assert_close(res, _hand_dora(w.half().float() + dw, axis, ds).float(), rtol=1e-5, atol=1e-6)
    # and LyCORIS's own decomposition agrees (wd_on_out True/False)
    general = pytest.importorskip("lycoris.functional.general")
    ref = general.weight_decompose(w.half().float() + dw, ds, 1, wd_on_out=(axis == "out"), backend="torch")
    close32(res, ref)


def test_apply_dora_bad_shape():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError):
        ops.apply_dora(w, torch.zeros_like(w), torch.ones(4, 3))
    with pytest.raises(ValueError):
        ops.apply_dora(w, torch.zeros(3, 4), torch.ones(4, 1))


# ------------------------------------------------------------------------------ merged ops (issue 5)
# merged_linear / merged_conv2d: y = op(x, W + diag(row_scale) H, bias) in one op, saving x and
# the factors only.  fp64 gradchecks (torch defaults); fp32 against the plain formula with the
# module's tolerances (rtol 1e-5, atol 1e-5 x max magnitude).
import torch.nn.functional as F  # noqa: E402


def _row_scales(out, dtype):
    g = torch.Generator().manual_seed(11)
    mask = (torch.rand(out, generator=g) > 0.4).to(dtype)
    return [0.7, mask * 1.3]  # a number, and a rank-dropout-style (out,) tensor


def _plain_merged(x, w, b, factors, row_scale, conv=None):
    if len(factors) == 6:
        h = plain_tucker(*factors)
    else:
        h = plain_hada(*factors).reshape(w.shape)
    rs = row_scale.reshape(-1, *([1] * (w.dim() - 1))) if isinstance(row_scale, torch.Tensor) else row_scale
    weff = w + rs * h
    if conv is None:
        return F.linear(x, weff, b)
    return F.conv2d(x, weff, b, *conv)


# x shape, out, in, rank of the first pair, rank of the second (unequal ranks: zero-padded inside)
LINEAR_CASES = [((2, 3, 5), 4, 5, 2, 2), ((6, 4), 3, 4, 3, 3), ((3, 5), 4, 5, 3, 1), ((3, 5), 4, 5, 1, 2)]


@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("rs_kind", [0, 1])
def test_gradcheck_merged_linear(case, rs_kind):
    xs, out, inn, r1, r2 = case
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*xs, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out, inn, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64)
    fs = [t.requires_grad_() for t in _flat_factors(out, inn, r1, r2, seed=3)]
    rs = _row_scales(out, torch.float64)[rs_kind]
    f = lambda x, *fs: ops.merged_linear(x, w, b, fs, rs)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, *fs))
    # only some inputs need a gradient (frozen x; one factor pair)
    x2 = x.detach()
    fs2 = [fs[0].detach(), fs[1].detach(), fs[2], fs[3]]
    assert torch.autograd.gradcheck(lambda *t: ops.merged_linear(x2, w, None, t, rs), fs2)
    assert torch.autograd.gradcheck(lambda x: ops.merged_linear(x, w, b, [t.detach() for t in fs], rs), (x,))


CONV_CASES = {
    "1x1": ((3, 4, 1, 1), {}),
    "1x1_s2": ((3, 4, 1, 1), {"stride": 2}),
    "3x3": ((3, 2, 3, 3), {}),
    "3x3_s2_p1_d2": ((3, 2, 3, 3), {"stride": 2, "padding": 1, "dilation": 2}),
    "3x2_p1": ((3, 2, 3, 2), {"padding": (1, 0)}),
}


@pytest.mark.parametrize(
    "name,tucker",
    [(n, False) for n in CONV_CASES] + [(n, True) for n, (ws, _) in CONV_CASES.items() if ws[2:] != (1, 1)],
)
def test_gradcheck_merged_conv2d(name, tucker):
    wshape, kw = CONV_CASES[name]
    out, inn, kh, kwid = wshape
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, inn, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*wshape, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64)
    if tucker:
        fs = _tucker_factors(out, inn, 2, (kh, kwid), seed=5)
    else:
        fs = _flat_factors(out, inn * kh * kwid, 2, seed=5)
    fs = [t.requires_grad_() for t in fs]
    for rs in _row_scales(out, torch.float64):
        f = lambda x, *fs: ops.merged_conv2d(x, w, b, fs, rs, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, *fs))


def _compare_merged_fp32(fn, plain, x, factors):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    f1 = [t.clone().requires_grad_() for t in factors]
    f2 = [t.clone().requires_grad_() for t in factors]
    y1, y2 = fn(x1, f1), plain(x2, f2)
    assert y1.dtype == torch.float32
    close32(y1, y2)
    gy = torch.randn_like(y1)
    y1.backward(gy)
    y2.backward(gy)
    close32(x1.grad, x2.grad)
    for a, b in zip(f1, f2):
        close32(a.grad, b.grad)


@pytest.mark.parametrize("rs_kind", [0, 1])
def test_merged_ops_match_plain_fp32(rs_kind):
    g = torch.Generator().manual_seed(6)
    f32 = torch.float32
    # Linear, attention-like token count
    out, inn = 48, 40
    w, b = torch.randn(out, inn, generator=g), torch.randn(out, generator=g)
    rs = _row_scales(out, f32)[rs_kind]
    x = torch.randn(2, 33, inn, generator=g)
    fs = [0.3 * t for t in _flat_factors(out, inn, 8, dtype=f32)]
    _compare_merged_fp32(lambda x, f: ops.merged_linear(x, w, b, f, rs),
                         lambda x, f: _plain_merged(x, w, b, f, rs), x, fs)
    # 3x3 conv, stride 2, padding 1, dilation 2, flat and Tucker
    out, inn = 24, 16
    w, b = torch.randn(out, inn, 3, 3, generator=g), torch.randn(out, generator=g)
    rs = _row_scales(out, f32)[rs_kind]
    x = torch.randn(2, inn, 11, 11, generator=g)
    conv = (2, 1, 2)
    fs = [0.3 * t for t in _flat_factors(out, inn * 9, 4, dtype=f32)]
    _compare_merged_fp32(lambda x, f: ops.merged_conv2d(x, w, b, f, rs, *conv),
                         lambda x, f: _plain_merged(x, w, b, f, rs, conv), x, fs)
    fs = [0.5 * t for t in _tucker_factors(out, inn, 4, (3, 3), dtype=f32)]
    _compare_merged_fp32(lambda x, f: ops.merged_conv2d(x, w, b, f, rs, *conv),
                         lambda x, f: _plain_merged(x, w, b, f, rs, conv), x, fs)


def test_merged_ops_shape_errors():
    w1a, w1b, w2a, w2b = _flat_factors(4, 3, 2)
    w = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError):
        ops.merged_linear(torch.randn(2, 3, dtype=torch.float64), w, None, [w1a, w1b.T, w2a, w2b])
    with pytest.raises(ValueError):
        ops.merged_conv2d(torch.randn(1, 3, 5, 5, dtype=torch.float64), w.reshape(4, 3, 1, 1).expand(4, 3, 3, 3),
                          None, [w1a, w1b, w2a, w2b])


def test_merged_ops_save_no_full_size_tensor():
    """The memory claim: autograd keeps x, the frozen weight (a parameter: no new memory) and the
    small factors (stacked pairwise for the batched products); the plain formula additionally
    keeps a full-size W + ΔW."""
    out, inn, r = 96, 80, 4
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 7, inn, generator=g, requires_grad=True)
    w = torch.randn(out, inn, generator=g)
    fs = [t.requires_grad_() for t in _flat_factors(out, inn, r, dtype=torch.float32)]
    with _SavedCounter() as c:
        y = ops.merged_linear(x, w, None, fs, torch.ones(out))
    assert [t.shape[1] for t in fs[::2]] == [r, r]
    expected = sorted([x.numel(), w.numel(), out, 2 * out * r, 2 * r * inn])  # x, W, row scale, (w1a, w2a), (w1b, w2b)
    assert sorted(c.numels) == expected
    y.sum().backward()
    with _SavedCounter() as c_plain:
        _plain_merged(x, w, None, fs, 1.0)
    assert sorted(c_plain.numels).count(out * inn) >= 2  # the products, W + ΔW
    # conv: x, W, factors only
    wc = torch.randn(out, inn, 3, 3, generator=g)
    xc = torch.randn(1, inn, 6, 6, generator=g, requires_grad=True)
    fc = [t.requires_grad_() for t in _flat_factors(out, inn * 9, r, dtype=torch.float32)]
    with _SavedCounter() as c:
        ops.merged_conv2d(xc, wc, None, fc, 0.5, padding=1).sum().backward()
    assert sorted(c.numels) == sorted([xc.numel(), wc.numel(), 2 * out * r, 2 * r * inn * 9])


# ------------------------------------------------------------------------------ Khatri-Rao form
def test_kr_factors_reproduce_h():
    fs = _flat_factors(7, 5, 3, 2)  # unequal ranks
    u, v = ops.kr_factors(*fs)
    assert u.shape == (7, 6) and v.shape == (6, 5)
    torch.testing.assert_close(u @ v, plain_hada(*fs))
    fs = [t.requires_grad_() for t in _flat_factors(4, 3, 2)]
    assert torch.autograd.gradcheck(lambda *f: ops.kr_factors(*f)[0] @ ops.kr_factors(*f)[1], fs)


@pytest.mark.parametrize("conv", [(1, 0, 1), (2, 1, 2)])
def test_kr_tucker_chain_is_the_tucker_conv(conv):
    stride, padding, dilation = conv
    t1, w1a, w1b, t2, w2a, w2b = fs = _tucker_factors(5, 4, 2, (3, 2), seed=8)
    v, core, u = ops.kr_tucker_factors(*fs)
    assert v.shape == (4, 4) and core.shape == (4, 4, 3, 2) and u.shape == (5, 4)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    z = F.conv2d(F.conv2d(x, v[:, :, None, None]), core, None, stride, padding, dilation)
    y = F.conv2d(z, u[:, :, None, None])
    expect = F.conv2d(x, plain_tucker(*fs), None, stride, padding, dilation)
    torch.testing.assert_close(y, expect)


# ------------------------------------------------------------------------------ cost model
def test_cost_model_choices():
    """Per-call choices on the issue-5 UNet's shapes (batch 2, 32x32 latents, rank 8)."""
    c = lambda **kw: ops.choose_path(rank1=8, **kw)  # noqa: E731
    # wide token count, narrow layer: the one weight-gradient product is cheapest
    assert c(out=128, in_ch=128, n_out=2048) == "merge"  # level-0 attention projection
    assert c(out=1024, in_ch=128, n_out=2048) == "merge"  # level-0 GEGLU projection
    assert c(out=128, in_ch=128, kernel=9, n_out=2048) == "merge"  # level-0 resnet 3x3 conv
    # few tokens or wide layers: rank-64 Khatri-Rao path
    assert c(out=512, in_ch=512, n_out=2) == "kr"  # time_emb_proj: batch 2 tokens
    assert c(out=256, in_ch=512, n_out=154) == "kr"  # cross-attention to_k on 2 x 77 text tokens
    assert c(out=512, in_ch=512, n_out=128) == "kr"  # 8x8 attention
    assert c(out=512, in_ch=512, kernel=9, n_out=128) == "kr"  # 8x8 resnet conv
    assert c(out=256, in_ch=256, kernel=9, n_out=128) == "kr"  # stride-2 downsampler
    # no merge allowed (half precision / autocast): KR or the straightforward delta path
    assert c(allow_merge=False, out=1280, in_ch=1280, n_out=8192) == "kr"
    assert ops.choose_path(False, out=3, in_ch=4, rank1=2, n_out=6) == "delta"  # tiny: fewest kernels
    # forward only (no grad): the merged weight costs no token-dependent work at all
    assert c(out=320, in_ch=320, n_out=8192, backward=False) == "merge"
    costs = ops.path_costs(out=320, in_ch=320, rank1=8, n_out=8192)
    assert set(costs) == {"merge", "kr", "delta"} and costs["delta"] > costs["merge"]
