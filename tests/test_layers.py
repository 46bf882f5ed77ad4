"""Tests for sd_loha.layers.LoHALayer.

Tolerances: fp64 gradchecks use torch's defaults.  fp32 comparisons (against the plain formula
and against LyCORIS's forward) use rtol=1e-5 and atol=1e-5 x the tensor's max magnitude; LyCORIS
forms its delta as (W + ΔW) - W, which alone costs ~1e-7 x |W| absolute.  bf16 checks: rtol=2e-2.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sd_loha import ops
from sd_loha.layers import LoHALayer, wrap

NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
TUCKER = ("hada_t1", "hada_t2")


# These tensors are tiny: one intra-op thread is as fast, and immune to the OpenMP stalls a shared,
# oversubscribed machine causes with more (gradchecks ran ~10x slower there).
pytestmark = pytest.mark.usefixtures("one_thread")


def close32(actual, expected, rtol=1e-5):
    atol = 1e-5 * max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def pnames(layer):
    return NAMES + (TUCKER if layer.tucker else ())


def randomize(layer, seed=0, std=0.5):
    """Nonzero values for every factor (init leaves w2_a = 0, so ΔW would be 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in pnames(layer):
            p = getattr(layer, n)
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return layer


def make_input(layer, batch=2, hw=7, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    if layer.kind == "linear":
        shape = (batch, 3, layer.in_dim)  # extra leading dim: F.linear on (..., in)
    else:
        shape = (batch, layer.in_dim, hw, hw)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# Every form the layer supports, tiny enough for fp64 gradcheck.
FORMS = {
    "linear": (lambda: nn.Linear(4, 3), {}),
    "conv1x1": (lambda: nn.Conv2d(3, 4, 1), {}),
    "conv1x1_stride2": (lambda: nn.Conv2d(3, 4, 1, stride=2), {}),
    "conv3x3": (lambda: nn.Conv2d(2, 3, 3), {}),
    "conv3x3_stride2": (lambda: nn.Conv2d(2, 3, 3, stride=2), {}),
    "conv3x3_pad1": (lambda: nn.Conv2d(2, 3, 3, padding=1), {}),
    "conv3x3_dil2": (lambda: nn.Conv2d(2, 3, 3, dilation=2), {}),
    "conv3x3_s2_p1_d2": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2), {}),
    "conv3x1_same": (lambda: nn.Conv2d(2, 3, (3, 1), padding="same", bias=False), {}),
    "tucker3x3": (lambda: nn.Conv2d(2, 3, 3, padding=1), {"use_tucker": True}),
    "tucker3x3_s2_d2": (lambda: nn.Conv2d(2, 3, 3, stride=2, dilation=2), {"use_tucker": True}),
}
EXPECTED_KIND = {
    "linear": "linear",
    "conv1x1": "conv1x1",
    "conv1x1_stride2": "conv1x1",
    "tucker3x3": "conv_tucker",
    "tucker3x3_s2_d2": "conv_tucker",
}


def build(form, rank=2, alpha=1.0, seed=0, **extra):
    torch.manual_seed(seed)
    make, kw = FORMS[form]
    return LoHALayer(make(), rank=rank, alpha=alpha, **kw, **extra)


def plain_delta(layer, params):
    """scale * H from the FORMAT.md formula with plain torch autograd, in weight shape."""
    if layer.tucker:
        w1a, w1b, w2a, w2b, t1, t2 = (params[n] for n in pnames(layer))
        h = torch.einsum("jkyx,jo,kc->ocyx", t1, w1a, w1b) * torch.einsum("jkyx,jo,kc->ocyx", t2, w2a, w2b)
    else:
        w1a, w1b, w2a, w2b = (params[n] for n in NAMES)
        h = (w1a @ w1b) * (w2a @ w2b)
    return layer.scale * h.reshape(layer.base.weight.shape)


def plain_forward(layer, x, params):
    b = layer.base
    w = b.weight + layer.multiplier * plain_delta(layer, params)
    if layer.kind == "linear":
        return F.linear(x, w, b.bias)
    return F.conv2d(x, w, b.bias, b.stride, b.padding, b.dilation, b.groups)


# ------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("form", list(FORMS))
def test_kind_and_shapes(form):
    layer = build(form, rank=2)
    assert layer.kind == EXPECTED_KIND.get(form, "conv")
    out, inn, *k = layer.base.weight.shape
    f = layer.factors()
    assert set(f) == {"alpha", *pnames(layer)}
    assert f["alpha"].shape == () and f["alpha"].dtype == torch.float32
    if layer.tucker:
        assert f["hada_w1_a"].shape == f["hada_w2_a"].shape == (2, out)
        assert f["hada_w1_b"].shape == f["hada_w2_b"].shape == (2, inn)
        assert f["hada_t1"].shape == f["hada_t2"].shape == (2, 2, *k)
    else:
        assert f["hada_w1_a"].shape == f["hada_w2_a"].shape == (out, 2)
        assert f["hada_w1_b"].shape == f["hada_w2_b"].shape == (2, inn * math.prod(k))  # 2-D, never 4-D
    assert not any(p.requires_grad for p in layer.base.parameters())
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == set(pnames(layer))
    assert layer.weight is layer.base.weight  # forwarded attribute
    sd = layer.state_dict()
    assert "base.weight" in sd and "alpha" in sd and all(n in sd for n in pnames(layer))


def test_tucker_ignored_for_1x1_and_linear():
    assert wrap(nn.Conv2d(3, 4, 1), rank=2, use_tucker=True).kind == "conv1x1"
    assert wrap(nn.Linear(3, 4), rank=2, use_tucker=True).kind == "linear"


def test_construction_errors():
    with pytest.raises(ValueError, match="groups"):
        wrap(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        wrap(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError):
        wrap(nn.Conv1d(4, 4, 3))
    with pytest.raises(TypeError):
        wrap(wrap(nn.Linear(3, 3)))
    with pytest.raises(ValueError):
        wrap(nn.Linear(3, 3), rank=0)


# ------------------------------------------------------------------------------ init
@pytest.mark.parametrize("form", list(FORMS))
def test_zero_delta_at_init(form):
    layer = build(form, rank=2)
    assert torch.count_nonzero(layer.hada_w2_a) == 0
    x = make_input(layer)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base(x))
        assert torch.count_nonzero(layer.delta_weight()) == 0


def test_init_statistics():
    torch.manual_seed(0)
    lin = wrap(nn.Linear(256, 192), rank=16)
    tk = wrap(nn.Conv2d(64, 48, 3), rank=16, use_tucker=True)
    for layer in (lin, tk):
        assert abs(layer.hada_w1_b.std().item() - 1.0) < 0.1
        assert abs(layer.hada_w2_b.std().item() - 1.0) < 0.1
        assert abs(layer.hada_w1_a.std().item() - 0.1) < 0.01
        assert abs(layer.hada_w1_b.mean().item()) < 0.1
        assert torch.count_nonzero(layer.hada_w2_a) == 0
    assert abs(tk.hada_t1.std().item() - 0.1) < 0.01
    assert abs(tk.hada_t2.std().item() - 0.1) < 0.01


def test_scale_alpha_over_rank():
    assert wrap(nn.Linear(4, 4), rank=8, alpha=2).scale == 0.25
    for a in (None, 0, 0.0):
        layer = wrap(nn.Linear(4, 4), rank=8, alpha=a)
        assert layer.scale == 1.0 and float(layer.alpha) == 8.0
    layer = randomize(wrap(nn.Linear(5, 4), rank=4, alpha=1))
    p = {n: getattr(layer, n) for n in NAMES}
    close32(layer.delta_weight(), plain_delta(layer, p))
    torch.testing.assert_close(layer.delta_weight(), 0.25 * ops.hada_weight(*p.values()))
    layer.set_alpha(2)
    assert layer.scale == 0.5 and float(layer.alpha) == 2.0


# ------------------------------------------------------------------------------ gradcheck
def gradcheck_layer(layer, hw: int, seed: int | None = None) -> bool:
    """fp64 gradcheck of a layer's output w.r.t. its input and every factor (re-seeding before each
    call when given, so a rank-dropout mask repeats)."""
    names = pnames(layer)
    x = make_input(layer, batch=1, hw=hw, dtype=torch.float64).requires_grad_()
    params = [getattr(layer, n).detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        if seed is not None:
            torch.manual_seed(seed)
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    return torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("form", list(FORMS))
def test_gradcheck_layer(form):
    layer = randomize(build(form, rank=2, alpha=1.5, multiplier=0.7).double())
    assert gradcheck_layer(layer, hw=6)


# ------------------------------------------------------------------------------ vs plain formula (fp32)
def check_against_plain_formula(layer) -> None:
    """fp32: the layer's output, input gradient and every factor gradient equal the plain formula's."""
    names = pnames(layer)
    x = make_input(layer, hw=9)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    ref = {n: getattr(layer, n).detach().clone().requires_grad_() for n in names}
    y = layer(x)
    y_ref = plain_forward(layer, x_ref, ref)
    assert y.shape == y_ref.shape
    close32(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    close32(x.grad, x_ref.grad)
    for n in names:
        close32(getattr(layer, n).grad, ref[n].grad)


@pytest.mark.parametrize("form", list(FORMS))
def test_matches_plain_formula_fp32(form):
    layer = randomize(build(form, rank=3, alpha=2.0, multiplier=0.8))
    check_against_plain_formula(layer)
    # delta_weight() is the same ΔW (fp32, weight shape, no multiplier)
    ref = {n: getattr(layer, n).detach().clone() for n in pnames(layer)}
    close32(layer.delta_weight(), plain_delta(layer, ref).detach())


def test_multiplier_is_linear():
    layer = randomize(build("conv3x3_pad1", rank=2))
    x = make_input(layer)
    with torch.no_grad():
        base = layer.base(x)
        full = layer(x) - base
        layer.multiplier = 0.5
        close32(layer(x) - base, 0.5 * full)
        layer.multiplier = 0.0
        assert torch.equal(layer(x), base)


# ------------------------------------------------------------------------------ against LyCORIS
LYCORIS_FORMS = ["linear", "conv1x1_stride2", "conv3x3_pad1", "conv3x3_s2_p1_d2", "tucker3x3", "tucker3x3_s2_d2"]


@pytest.mark.parametrize("form", LYCORIS_FORMS)
def test_matches_lycoris_forward(form):
    loha_mod = pytest.importorskip("lycoris.modules.loha")
    make, kw = FORMS[form]
    torch.manual_seed(0)
    base = make()
    # widen the toy layer a bit so the comparison means something
    if isinstance(base, nn.Linear):
        base = nn.Linear(24, 16)
    else:
        base = nn.Conv2d(8, 12, base.kernel_size, stride=base.stride, padding=base.padding, dilation=base.dilation)
    rank, alpha, mult = 4, 2.0, 0.7
    ours = randomize(LoHALayer(base, rank=rank, alpha=alpha, multiplier=mult, **kw), seed=3)
    theirs = loha_mod.LohaModule("t", base, multiplier=mult, lora_dim=rank, alpha=alpha, use_tucker=kw.get("use_tucker", False))
    # same file layout: names and shapes of what gets saved
    sd = theirs.custom_state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ours.factors().items()}
    assert float(sd["alpha"]) == float(ours.factors()["alpha"])
    with torch.no_grad():
        for n in pnames(ours):
            getattr(theirs, n).copy_(getattr(ours, n))
    ours.eval()
    theirs.eval()
    x = make_input(ours, hw=9, seed=7)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    assert (y1 - base(x)).abs().max() > 1e-2  # the delta is really there
    close32(y1, y2)
    # gradients agree too (LyCORIS 4.1.3's Tucker backward included)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    close32(x1.grad, x2.grad)
    for n in pnames(ours):
        close32(getattr(ours, n).grad, getattr(theirs, n).grad, rtol=1e-4)


# ------------------------------------------------------------------------------ dropout
def test_module_dropout():
    layer = randomize(build("conv3x3_pad1", rank=2, module_dropout=1.0))
    x = make_input(layer)
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base(x))
        layer.eval()
        ref = copy.deepcopy(layer)
        ref.module_dropout = 0.0
        assert torch.equal(layer(x), ref(x))
        assert not torch.equal(layer(x), layer.base(x))


def test_eval_ignores_dropouts():
    layer = randomize(build("linear", rank=2, rank_dropout=0.5, module_dropout=0.5, rank_dropout_scale=True))
    plain = copy.deepcopy(layer)
    plain.rank_dropout = plain.module_dropout = 0.0
    layer.eval()
    x = make_input(layer)
    with torch.no_grad():
        for _ in range(5):
            assert torch.equal(layer(x), plain(x))


@pytest.mark.parametrize("scale_mask", [False, True])
def test_rank_dropout_rows(scale_mask):
    torch.manual_seed(0)
    layer = randomize(wrap(nn.Linear(8, 32), rank=2, rank_dropout=0.5, rank_dropout_scale=scale_mask))
    x = make_input(layer)
    with torch.no_grad():
        base = layer.base(x)
        layer.eval()
        full = layer(x) - base
        layer.train()
        torch.manual_seed(1)
        d = layer(x) - base
    assert not torch.allclose(d, full)  # train mode changes the output
    # per output row: either dropped (0) or kept, times 1 or 1/mean(mask)
    dropped = (d.abs().amax(dim=(0, 1)) == 0)
    kept = ~dropped
    assert 0 < int(kept.sum()) < 32
    factor = 32 / int(kept.sum()) if scale_mask else 1.0
    close32(d[..., kept], factor * full[..., kept])


def test_rank_dropout_all_dropped_is_finite():
    layer = randomize(build("conv3x3", rank=2, rank_dropout=1.0, rank_dropout_scale=True))
    layer.train()
    x = make_input(layer)
    with torch.no_grad():
        y = layer(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y, layer.base(x))


def test_rank_dropout_conv_grads_flow():
    layer = randomize(build("tucker3x3", rank=2, rank_dropout=0.3))
    layer.train()
    layer(make_input(layer)).square().sum().backward()
    assert all(getattr(layer, n).grad is not None for n in pnames(layer))


# ------------------------------------------------------------------------------ dtypes
def test_bf16_base_fp32_factors():
    layer = randomize(build("conv3x3_pad1", rank=2))
    ref = copy.deepcopy(layer)
    layer.base.to(torch.bfloat16)
    x = make_input(layer)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert layer.hada_w1_a.dtype == torch.float32
    y.float().sum().backward()
    assert layer.hada_w1_a.grad.dtype == torch.float32
    y_ref = ref(x.bfloat16().float())
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2 * float(y_ref.detach().abs().max()))


def test_delta_computed_in_fp32_under_autocast(monkeypatch):
    seen = []
    orig = ops.hada_weight

    def spy(*a):
        out = orig(*a)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(ops, "hada_weight", spy)
    layer = randomize(build("linear", rank=2))
    x = make_input(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert seen == [torch.float32]
    y.float().sum().backward()
    assert layer.hada_w1_a.grad.dtype == torch.float32


# ------------------------------------------------------------------------------ state dict / factors
def test_state_dict_of_unwrapped_model_loads():
    torch.manual_seed(0)
    orig = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Conv2d(3, 2, 3))
    sd = copy.deepcopy(orig.state_dict())
    wrapped = copy.deepcopy(orig)
    wrapped[0] = wrap(wrapped[0], rank=2, alpha=1)
    wrapped[2] = wrap(wrapped[2], rank=2, alpha=1, use_tucker=True)
    with torch.no_grad():
        for p in wrapped.parameters():
            p.zero_()  # make sure the load really writes the base weights
    res = wrapped.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == []
    assert set(res.missing_keys) == {f"0.{n}" for n in NAMES + ("alpha",)} | {f"2.{n}" for n in NAMES + TUCKER + ("alpha",)}
    assert torch.equal(wrapped[0].base.weight, orig[0].weight)
    assert torch.equal(wrapped[2].base.bias, orig[2].bias)
    # wrapped -> wrapped, strict: alpha (and so scale) comes along
    src = copy.deepcopy(wrapped)
    src[0].set_alpha(3.0)
    randomize(src[0])
    wrapped.load_state_dict(src.state_dict())
    assert wrapped[0].scale == 1.5
    x = torch.randn(5, 4)
    assert torch.equal(wrapped[0](x), src[0](x))


@pytest.mark.parametrize("form", ["linear", "conv1x1", "conv3x3_pad1", "tucker3x3"])
def test_factors_roundtrip(form):
    layer = randomize(build(form, rank=3, alpha=1.0))
    f = {k: v.clone() for k, v in layer.factors().items()}
    other = LoHALayer.from_factors(copy.deepcopy(layer.base), f)
    assert other.kind == layer.kind and other.rank == 3 and other.scale == layer.scale
    x = make_input(layer)
    with torch.no_grad():
        assert torch.equal(other(x), layer(x))
        # factors() is exactly what loha_delta merges
        d = ops.loha_delta(f, layer.base.weight.shape, layer.scale)
        close32(d, layer.delta_weight())
    # no alpha in the file -> scale 1
    f.pop("alpha")
    assert LoHALayer.from_factors(copy.deepcopy(layer.base), f).scale == 1.0
    # wrong shapes are refused
    bad = dict(f, hada_w1_b=f["hada_w1_b"][:, :-1])
    with pytest.raises(ValueError):
        layer.load_factors(bad)


# ------------------------------------------------------------------------------ forward paths (issue 5)
# Every path ("merge": one op with W + s·H; "kr": base(x) + U(Vx), rank r²; "delta": base(x) +
# op(x, ΔW)) on every layer form: fp64 gradcheck, fp32 equality with the plain formula (forward,
# input gradient, every factor gradient; tolerances as above), same rank-dropout semantics.
from sd_loha.layers import PATHS  # noqa: E402


def _forced(layer, path):
    layer.path = path
    return layer


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", list(FORMS))
def test_gradcheck_each_path(form, path):
    layer = _forced(randomize(build(form, rank=2, alpha=1.5, multiplier=0.7).double()), path)
    assert gradcheck_layer(layer, hw=6)
    assert layer.last_path == path


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", ["linear", "conv1x1_stride2", "conv3x3_s2_p1_d2", "tucker3x3_s2_d2"])
def test_gradcheck_each_path_rank_dropout(form, path):
    """Rank dropout on: the (seeded, so repeatable) mask scales rows of ΔW in every path."""
    layer = randomize(build(form, rank=2, rank_dropout=0.4, rank_dropout_scale=True).double()).train()
    _forced(layer, path)
    assert gradcheck_layer(layer, hw=5, seed=3)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", list(FORMS))
def test_each_path_matches_plain_formula_fp32(form, path):
    layer = _forced(randomize(build(form, rank=3, alpha=2.0, multiplier=0.8)), path)
    check_against_plain_formula(layer)
    assert layer.last_path == path


@pytest.mark.parametrize("form", ["linear", "conv3x3_s2_p1_d2", "tucker3x3"])
def test_paths_agree_under_rank_dropout(form):
    """Same seed -> same mask -> same output and gradients on all three paths; dropped rows of
    ΔW leave exactly the base output there."""
    layer = randomize(build(form, rank=3, rank_dropout=0.5, rank_dropout_scale=True)).train()
    x = make_input(layer, hw=8)
    outs, grads = {}, {}
    for path in PATHS:
        layer.path = path
        torch.manual_seed(5)
        y = layer(x)
        y.square().sum().backward()
        outs[path] = y.detach()
        grads[path] = [getattr(layer, n).grad.clone() for n in pnames(layer)]
        layer.zero_grad()
    for path in ("merge", "kr"):
        close32(outs[path], outs["delta"])
        for a, b in zip(grads[path], grads["delta"]):
            close32(a, b, rtol=1e-4)
    with torch.no_grad():
        d = outs["delta"] - layer.base(x)
    ch = -1 if layer.kind == "linear" else 1
    dims = [i for i in range(d.dim()) if i != d.dim() + ch and i != ch]
    dropped = d.abs().amax(dim=dims) < 1e-6
    assert 0 < int(dropped.sum()) < layer.out_dim


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_auto_path_choice():
    torch.manual_seed(0)
    # level-0 attention projection: many tokens, narrow layer -> merge
    lin = randomize(wrap(nn.Linear(128, 128), rank=8, alpha=4))
    x = torch.randn(2, 1024, 128)
    assert lin.choose_path(x) == "merge"
    # the same layer on 2 tokens (a time-embedding projection) -> Khatri-Rao
    assert lin.choose_path(torch.randn(2, 128)) == "kr"
    # 8x8 resnet conv, 512 channels -> Khatri-Rao; 32x32, 128 channels -> merge
    assert wrap(nn.Conv2d(512, 512, 3, padding=1), rank=8).choose_path(torch.randn(2, 512, 8, 8)) == "kr"
    assert wrap(nn.Conv2d(128, 128, 3, padding=1), rank=8).choose_path(torch.randn(2, 128, 32, 32)) == "merge"
    # half precision or autocast never merges (W + ΔW in bf16 would round ΔW away)
    lin_bf = copy.deepcopy(lin)
    lin_bf.base.to(torch.bfloat16)
    assert lin_bf.choose_path(x.bfloat16()) in ("kr", "delta")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin.choose_path(x) in ("kr", "delta")
    lin_bf.path = "merge"
    with pytest.raises(ValueError, match="merge"):
        lin_bf(x.bfloat16())
    lin_bf.path = "kr"
    assert lin_bf(x.bfloat16()).dtype == torch.bfloat16
    lin.path = "fast"
    with pytest.raises(ValueError):
        lin(x)
    # a Linear subclass with its own forward is never bypassed by the merged op
    class Odd(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    odd = wrap(Odd(128, 128), rank=8)
    assert odd.choose_path(x) != "merge"
    # "same" padding with an even kernel is asymmetric: no merged conv, the others still agree
    same = randomize(wrap(nn.Conv2d(3, 4, (2, 2), padding="same"), rank=2))
    xs = torch.randn(1, 3, 5, 5)
    assert same.choose_path(xs) != "merge"
    with torch.no_grad():
        ref = same(xs)
        same.path = "kr"
        close32(same(xs), ref)


def test_kr_factors_in_fp32_under_autocast(monkeypatch):
    seen = []
    orig = ops.kr_factors

    def spy(*a):
        out = orig(*a)
        seen.extend(t.dtype for t in out)
        return out

    monkeypatch.setattr(ops, "kr_factors", spy)
    layer = _forced(randomize(build("linear", rank=2)), "kr")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(make_input(layer))
    assert seen == [torch.float32, torch.float32]
    y.float().sum().backward()
    assert layer.hada_w1_a.grad.dtype == torch.float32


class _SavedBytes:
    """Bytes of the unique storages autograd saves, excluding parameters / buffers / the input."""

    def __init__(self, *modules, exclude=()):
        self.ex = {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}
        self.ex |= {t.untyped_storage().data_ptr() for t in exclude}
        self.seen = {}

    def pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self.ex:
            self.seen[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    @property
    def total(self):
        return sum(self.seen.values())


MEMORY_CASES = {
    # (layer, input): token-heavy attention projection, 8x8 attention, 3x3 convs at two depths
    "attn_128": (lambda: nn.Linear(128, 128), (2, 1024, 128)),
    "attn_512_8x8": (lambda: nn.Linear(512, 512), (2, 64, 512)),
    "conv_128_32x32": (lambda: nn.Conv2d(128, 128, 3, padding=1), (2, 128, 32, 32)),
    "conv_512_8x8": (lambda: nn.Conv2d(512, 512, 3, padding=1), (2, 512, 8, 8)),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_saved_memory_not_above_lycoris(case):
    """What autograd keeps between forward and backward (the input excluded: every variant keeps
    it): sd-loha's auto path <= LyCORIS 4.1.3's LohaModule, and the merge path keeps nothing of
    the weight's size (LyCORIS keeps its ΔW)."""
    loha_mod = pytest.importorskip("lycoris.modules.loha")
    make, xs = MEMORY_CASES[case]
    torch.manual_seed(0)
    base = make().requires_grad_(False)
    ours = randomize(LoHALayer(base, rank=8, alpha=4))
    theirs = loha_mod.LohaModule("t", base, multiplier=1.0, lora_dim=8, alpha=4)
    x = torch.randn(*xs, requires_grad=True)
    with _SavedBytes(ours, theirs, exclude=[x]) as s_ours:
        ours(x).sum().backward()
    with _SavedBytes(ours, theirs, exclude=[x]) as s_theirs:
        theirs(x).sum().backward()
    assert s_ours.total <= s_theirs.total
    assert s_theirs.total >= base.weight.numel() * 4  # LyCORIS: a full-size ΔW per layer
    ours.path = "merge"
    with _SavedBytes(ours, exclude=[x]) as s_merge:
        ours(x).sum().backward()
    assert max(s_merge.seen.values(), default=0) < base.weight.numel() * 4


@pytest.mark.parametrize("path", ("auto",) + PATHS)
@pytest.mark.parametrize("form", ["linear", "conv3x3_pad1", "tucker3x3"])
def test_activation_checkpointing(form, path):
    """The trainer's gradient checkpointing re-runs forward in backward: same path, same rank
    dropout mask (checkpoint restores the RNG), same gradients as without it."""
    from torch.utils.checkpoint import checkpoint

    layer = _forced(randomize(build(form, rank=3, rank_dropout=0.3)).train(), path)
    x = make_input(layer, hw=8)
    grads = []
    for use_ckpt in (False, True):
        torch.manual_seed(9)
        xi = x.clone().requires_grad_()
        y = checkpoint(layer, xi, use_reentrant=False) if use_ckpt else layer(xi)
        y.square().sum().backward()
        grads.append([xi.grad] + [getattr(layer, n).grad.clone() for n in pnames(layer)])
        layer.zero_grad()
    for a, b in zip(*grads):
        close32(a, b)


# ------------------------------------------------------------------------------ alpha as a buffer
def _alpha_writers():
    """Every way a file's alpha reaches a layer; each must change the forward, not only the buffer."""

    def via_factors(layer, a):  # what LoHANetwork.load_state_dict does
        with torch.no_grad():
            layer.factors()["alpha"].copy_(torch.tensor(a))

    def via_load_state_dict(layer, a):
        layer.load_state_dict({**layer.state_dict(), "alpha": torch.tensor(a)})

    def via_set_alpha(layer, a):
        layer.set_alpha(a)

    return {"factors": via_factors, "load_state_dict": via_load_state_dict, "set_alpha": via_set_alpha}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("writer", list(_alpha_writers()))
@pytest.mark.parametrize("form", ["linear", "conv3x3_pad1"])
def test_written_alpha_sets_the_forward_scale(form, writer, path):
    layer = _forced(randomize(build(form, rank=4, alpha=4.0)), path)
    x = make_input(layer)
    layer(x)  # a forward before the write: no value may be left over from it
    _alpha_writers()[writer](layer, 2.0)
    p = {n: getattr(layer, n).detach() for n in NAMES}
    h = ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(layer.base.weight.shape)
    w = layer.base.weight + (2.0 / 4) * h  # FORMAT.md: ΔW = alpha / r · H
    b = layer.base
    ref = F.linear(x, w, b.bias) if form == "linear" else F.conv2d(x, w, b.bias, b.stride, b.padding)
    with torch.no_grad():
        close32(layer(x), ref)
    assert layer.scale == 0.5 and float(layer.factors()["alpha"]) == 2.0
    assert "alpha=2" in repr(layer)


def test_alpha_follows_the_buffer_across_dtype_and_copy():
    layer = randomize(build("linear", rank=4, alpha=1.0))
    layer.double()  # a new buffer tensor: its value is read again
    assert layer.alpha.dtype == torch.float64 and layer.scale == 0.25
    twin = copy.deepcopy(layer)
    twin.set_alpha(3.0)
    assert (twin.scale, layer.scale) == (0.75, 0.25)
