"""DoRA-LoHA (dora_wd, wd_on_output) and use_scalar: LyCORIS's math in training, LyCORIS's layout in files, and
what each loader makes of those files.

The references, read from their public source and re-implemented here from that reading:

- LyCORIS 4.1.3 (the installed package): lycoris/modules/loha.py ``LohaModule`` (init of dora_scale and
  scalar, ``forward``, ``custom_state_dict``) and lycoris/functional/general.py ``_weight_decompose``.
- ComfyUI: comfy/weight_adapter/loha.py ``LoHaAdapter.calculate_weight`` and comfy/weight_adapter/base.py
  ``weight_decompose`` (stored commit 9c0cf36c; the same text is in its v0.3.77 copies).
- A1111 1.10: extensions-builtin/Lora/network_hada.py ``NetworkModuleHada.calc_updown`` ->
  extensions-builtin/Lora/network.py ``NetworkModule.finalize_updown`` / ``apply_weight_decompose``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sd_loha import add_loha, apply_loha, ops
from sd_loha.layers import LoHALayer
from sd_loha.models import build_tiny_pipeline
from tests.train.helpers import _tables, _our_layer, read_file

lyco_loha = pytest.importorskip("lycoris.modules.loha")

EPS = torch.finfo(torch.float32).eps


def _base(kind: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(6, 5, 3, padding=1)
    return m.to(dtype)


def _input(layer: nn.Module, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Linear) or getattr(layer, "kind", "") == "linear":
        return torch.randn(3, layer.in_features, generator=g, dtype=dtype)
    return torch.randn(2, layer.in_channels, 7, 7, generator=g, dtype=dtype)


def _op(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, w)
    return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation)


@torch.no_grad()
def _randomize(layer: LoHALayer, seed: int) -> None:
    """Large factors (ΔW of the weight's size, where loaders' differences show) and a magnitude off ‖W‖."""
    g = torch.Generator().manual_seed(seed)
    for name, p in layer.named_parameters(recurse=False):
        if name == "dora_scale":
            p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g, dtype=p.dtype))
        elif name == "scalar":
            p.fill_(0.7)
        else:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _lycoris_twin(layer: LoHALayer, multiplier: float) -> nn.Module:
    """LyCORIS's LohaModule on a copy of the frozen layer, holding this layer's parameters; returns the copy,
    whose forward LyCORIS has patched."""
    org = copy.deepcopy(layer.base)
    mod = lyco_loha.LohaModule("t", org, multiplier, layer.rank, layer.alpha_value, use_tucker=layer.tucker,
                               use_scalar=layer.use_scalar, weight_decompose=layer.dora, wd_on_out=layer.wd_on_output)
    with torch.no_grad():
        for name, p in layer.named_parameters(recurse=False):
            getattr(mod, name).copy_(p.reshape(getattr(mod, name).shape))
    mod.apply_to()
    return org


FORMS = [("linear", False), ("conv", False), ("conv", True)]
FORM_IDS = ["linear", "conv", "tucker"]


# ------------------------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("on_output", [False, True], ids=["in", "out"])
def test_dora_scale_starts_at_lycoris_norm(kind, on_output):
    base = _base(kind)
    layer = LoHALayer(copy.deepcopy(base), rank=2, dora_wd=True, wd_on_output=on_output)
    theirs = lyco_loha.LohaModule("t", copy.deepcopy(base), 1.0, 2, 2, weight_decompose=True, wd_on_out=on_output)
    assert layer.dora_scale.shape == theirs.dora_scale.shape
    torch.testing.assert_close(layer.dora_scale.detach(), theirs.dora_scale.detach(), rtol=0, atol=0)
    # recomputed by hand: one norm per output row / per input column of W
    w = base.weight.detach()
    ones = [1] * (w.dim() - 2)
    if on_output:
        expect = torch.sqrt((w ** 2).sum(dim=tuple(range(1, w.dim())))).reshape(-1, 1, *ones)
    else:
        expect = torch.sqrt((w ** 2).sum(dim=(0, *range(2, w.dim())))).reshape(1, -1, *ones)
    torch.testing.assert_close(layer.dora_scale.detach(), expect)
    # ΔW = 0 at init, so W' = W · ‖W‖ / (‖W‖ + eps): the base model up to LyCORIS's eps
    x = _input(base)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-5, atol=1e-6)


def test_use_scalar_init_lycoris():
    torch.manual_seed(3)
    layer = LoHALayer(nn.Linear(400, 300), rank=8, use_scalar=True)
    assert float(layer.scalar.detach()) == 0.0 and layer.scalar.requires_grad
    assert layer.hada_w2_a.std().item() == pytest.approx(0.1, rel=0.05)  # random, not zero (LyCORIS)
    assert layer.hada_w1_a.std().item() == pytest.approx(0.1, rel=0.05)
    assert layer.hada_w1_b.std().item() == pytest.approx(1.0, rel=0.05)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    # both factor pairs random, so the scalar is the one parameter with a gradient at step 0
    x = torch.randn(4, 400)
    layer(x).pow(2).sum().backward()
    assert layer.scalar.grad is not None and layer.scalar.grad.abs() > 0
    assert torch.count_nonzero(layer.hada_w2_a.grad) == 0 and torch.count_nonzero(layer.hada_w1_a.grad) == 0


# ------------------------------------------------------------------------------------------ training forward
@pytest.mark.parametrize("kind,tucker", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("on_output", [False, True], ids=["in", "out"])
@pytest.mark.parametrize("use_scalar", [False, True], ids=["plain", "scalar"])
def test_forward_matches_lycoris(kind, tucker, on_output, use_scalar):
    """At multiplier 1 our layer computes LyCORIS's forward. At another multiplier s, LyCORIS rescales the whole
    W + ΔW, (W + ΔW)(1 + s(m/‖W + ΔW‖ − 1)), while we (and A1111, ComfyUI, our loader) give W + s(W' − W):
    LyCORIS's output is ours plus (1 − s)·op(x, ΔW), checked as such."""
    layer = LoHALayer(_base(kind), rank=3, alpha=1.5, use_tucker=tucker, dora_wd=True, wd_on_output=on_output,
                      use_scalar=use_scalar)
    _randomize(layer, 5)
    x = _input(layer.base)
    with torch.no_grad():
        dw = layer.delta_weight()
        for s in (1.0, 0.5):
            layer.multiplier = s
            theirs = _lycoris_twin(layer, s)(x)
            ours = layer(x)
            assert layer.last_path == "dora"
            torch.testing.assert_close(ours + (1 - s) * _op(layer.base, x, dw), theirs, rtol=1e-4, atol=1e-5)
            # and by hand: W' = (W + ΔW) m / (‖W + ΔW‖ + eps) along the axis
            w = layer.base.weight + dw
            wd = w * layer.dora_scale / (ops.dora_magnitude(w, on_output) + EPS)
            by_hand = layer.base(x) + s * _op(layer.base, x, wd - layer.base.weight)
            torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,tucker", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("on_output", [False, True], ids=["in", "out"])
def test_dora_layer_gradcheck(kind, tucker, on_output):
    torch.manual_seed(0)
    base = nn.Linear(5, 4) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1)  # small: gradcheck is O(params)
    layer = LoHALayer(base.double(), rank=2, alpha=1.0, use_tucker=tucker, dora_wd=True,
                      wd_on_output=on_output, use_scalar=True, dtype=torch.float64)
    _randomize(layer, 7)
    layer.multiplier = 0.8
    names = [n for n, p in layer.named_parameters(recurse=False) if p.requires_grad]
    assert "dora_scale" in names and "scalar" in names
    x = torch.randn(2, 5, dtype=torch.float64) if kind == "linear" else torch.randn(1, 3, 4, 4, dtype=torch.float64)

    def f(*ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    params = tuple(getattr(layer, n).detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5)


def test_dora_rank_dropout_masks_delta_rows_before_the_norm(monkeypatch):
    """LyCORIS drops rows of ΔW (get_weight), then decomposes W + ΔW·mask."""
    layer = LoHALayer(_base("linear"), rank=3, dora_wd=True, rank_dropout=0.5)
    _randomize(layer, 9)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.float32)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.where(keep > 0, 0.9, 0.1))
    x = _input(layer.base)
    with torch.no_grad():
        y = layer.train()(x)
        w = layer.base.weight + layer.delta_weight() * keep[:, None]
        wd = w * layer.dora_scale / (ops.dora_magnitude(w, False) + EPS)
    torch.testing.assert_close(y, F.linear(x, wd, layer.base.bias), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ the loaders' math
def comfyui_merge(weight, h, alpha_over_rank, dora_scale, strength):
    """ComfyUI LoHaAdapter.calculate_weight -> weight_decompose, re-implemented from the reading: the norm of an
    output-row dora_scale (dora_scale.shape[0] == out) is taken of the ORIGINAL weight, an input-column one of
    W + ΔW; strength s: W + s(W' − W)."""
    weight_calc = weight + alpha_over_rank * h
    d = weight.dim()
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *[1] * (d - 1))
    else:
        norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight_calc.shape[1], *[1] * (d - 1)).transpose(0, 1))
    weight_calc = weight_calc * (dora_scale / (norm + EPS))
    return weight_calc if strength == 1.0 else weight + strength * (weight_calc - weight)


def a1111_merge(weight, h, scale, dora_scale, multiplier):
    """A1111 1.10 finalize_updown -> apply_weight_decompose, re-implemented from the reading: updown = scale·H,
    the norm ALWAYS per input column of W + updown (no eps), updown' = W' − W, then × multiplier."""
    merged = weight + h * scale
    d = weight.dim()
    norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * (d - 1)).transpose(0, 1))
    return weight + (merged * (dora_scale / norm) - weight) * multiplier


# ------------------------------------------------------------------------------------------ trained files
def _train(pipe, network, steps: int = 3) -> None:
    """A few Adam steps at a high learning rate on the tiny UNet + text encoder (a denoising-shaped loss on
    random latents), so the file is trained, not initial."""
    opt = torch.optim.Adam(network.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a red circle"] * 2, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    c = pipe.unet.config
    for _ in range(steps):
        lat = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
        pred = pipe.unet(lat, torch.tensor([10, 500]), pipe.text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, torch.randn(pred.shape, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module", params=[(False, False), (True, False), (False, True)],
                ids=["wd-in", "wd-out", "wd-in-scalar"])
def trained_file(request, tmp_path_factory):
    on_output, use_scalar = request.param
    pipe = build_tiny_pipeline("tiny-sd1")
    network = add_loha(pipe, preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, dora_wd=True,
                       wd_on_output=on_output, use_scalar=use_scalar)
    _train(pipe, network)
    path = tmp_path_factory.mktemp("dora") / "dora.safetensors"
    network.save(path, dtype=torch.float32)
    return path, on_output, use_scalar


def _file_modules(tensors):
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        name, _, param = k.partition(".")
        out.setdefault(name, {})[param] = v
    return out


def test_trained_file_layout(trained_file):
    path, on_output, _ = trained_file
    tensors, meta = read_file(path)
    mods = _file_modules(tensors)
    assert not any("scalar" in k for k in tensors)  # use_scalar leaves no key: hada_w1_a carries it (LyCORIS)
    tables = _tables(build_tiny_pipeline("tiny-sd1"))
    for name, t in mods.items():
        assert set(t) >= {"alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "dora_scale"}, name
        w = _our_layer(tables, name).weight
        ones = (1,) * (w.dim() - 2)
        want = (w.shape[0], 1, *ones) if on_output else (1, w.shape[1], *ones)
        assert tuple(t["dora_scale"].shape) == want, name
        assert t["hada_w1_b"].dim() == 2 or "hada_t1" in t  # flat convs stay 2-D


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_trained_file_loads_in_sd_loha_and_lycoris(trained_file, tiny_pipe, strength):
    """Our strict loader at strength 1 and 0.5; LyCORIS's LohaModule per file module with the same
    wd_on_output (its create_network_from_weights always builds wd_on_out=True modules and cannot take an
    input-column dora_scale), on a fresh pipeline's layer: equal outputs at 1, and LyCORIS = ours +
    (1 − s)·op(x, ΔW) at s (test_forward_matches_lycoris)."""
    path, on_output, _ = trained_file
    tensors, _ = read_file(path)
    merged = tiny_pipe("tiny-sd1")
    report = apply_loha(merged, path, strength=strength, strict=True)
    mods = _file_modules(tensors)
    assert report.unmatched == [] and report.total == len(mods)
    ref_tables, our_tables = _tables(tiny_pipe("tiny-sd1")), _tables(merged)
    g = torch.Generator().manual_seed(2)
    changed = 0
    with torch.no_grad():
        for name, t in sorted(mods.items()):
            org = _our_layer(ref_tables, name)
            rank = t["hada_w1_b"].shape[0]
            mod = lyco_loha.LohaModule(name, org, strength, rank, float(t["alpha"]), use_tucker="hada_t1" in t,
                                       weight_decompose=True, wd_on_out=on_output)
            for k, v in t.items():
                if k != "alpha":
                    getattr(mod, k).copy_(v)
            mod.apply_to()
            ours = _our_layer(our_tables, name)
            x = _input(org) if isinstance(org, nn.Linear) else torch.randn(2, org.in_channels, 9, 9, generator=g)
            dw = ops.loha_delta(t, org.weight.shape, float(t["alpha"]) / rank)
            torch.testing.assert_close(ours(x) + (1 - strength) * _op(org, x, dw), org(x), rtol=1e-4, atol=2e-5,
                                       msg=lambda m: f"{name}: {m}")
            changed += not torch.equal(ours.weight, org.weight)  # LyCORIS patches the forward, not the weight
    assert changed > 0


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_loaders_agree_on_input_column_files(trained_file, tiny_pipe, strength):
    """wd_on_output = false (our default): ComfyUI's and A1111's merged weights equal ours at 1 and 0.5.
    wd_on_output = true: both go wrong (the noise LyCORIS issue 246 reports): A1111 broadcasts the (out, 1)
    magnitude against its (1, in) norm into a full matrix, ComfyUI divides by ‖W‖ instead of ‖W + ΔW‖."""
    path, on_output, _ = trained_file
    tensors, _ = read_file(path)
    merged = tiny_pipe("tiny-sd1")
    apply_loha(merged, path, strength=strength, strict=True)
    ref_tables, our_tables = _tables(tiny_pipe("tiny-sd1")), _tables(merged)
    worst = {"comfyui": 0.0, "a1111": 0.0}
    for name, t in sorted(_file_modules(tensors).items()):
        w = _our_layer(ref_tables, name).weight.detach()
        ours = _our_layer(our_tables, name).weight.detach()
        rank = t["hada_w1_b"].shape[0]
        h = ops.loha_delta(t, w.shape, 1.0)
        scale = float(t["alpha"]) / rank
        theirs = {"comfyui": comfyui_merge(w, h, scale, t["dora_scale"], strength),
                  "a1111": a1111_merge(w, h, scale, t["dora_scale"], strength)}
        for tool, m in theirs.items():
            rel = float((m - ours).norm() / (ours - w).norm().clamp_min(1e-12))
            worst[tool] = max(worst[tool], rel)
            if not on_output:
                torch.testing.assert_close(m, ours, rtol=1e-4, atol=1e-5, msg=lambda s: f"{tool} {name}: {s}")
    print(f"wd_on_output={on_output} strength={strength}: worst |merged - ours| / |ours - W| per layer: {worst}")
    if on_output:
        assert worst["a1111"] > 1.0, worst  # errors larger than the adapter's own change: noise
        assert worst["comfyui"] > 1e-3, worst
    else:
        assert max(worst.values()) < 1e-3, worst


def test_lycoris_written_input_column_file_loads_in_sd_loha(tmp_path, tiny_pipe):
    """The other direction: a file LyCORIS's own network writes with dora_wd and wd_on_output = False."""
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    from tests.test_lycoris_interop import LYCO_PRESET_TOML, _TextModelShim

    preset = tmp_path / "preset.toml"
    preset.write_text(LYCO_PRESET_TOML)
    ref = tiny_pipe("tiny-sd1")
    te = _TextModelShim(ref.text_encoder)
    net = lycoris_kohya.create_network(1.0, 4, 2.0, ref.vae, te, ref.unet, algo="loha", conv_dim=2, conv_alpha=1.0,
                                       preset=str(preset), dora_wd=True, wd_on_output=False, use_scalar=True)
    net.apply_to(te, ref.unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "dora_scale" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path / "lyco.safetensors"
    net.save_weights(str(path), torch.float32, {})
    tensors, _ = read_file(path)
    assert any(k.endswith("dora_scale") and v.shape[0] == 1 for k, v in tensors.items())
    merged = tiny_pipe("tiny-sd1")
    report = apply_loha(merged, path, strict=True)
    assert report.unmatched == []
    tables = _tables(merged)
    with torch.no_grad():
        for m in net.loras:
            ours = _our_layer(tables, m.lora_name)
            x = _input(ours) if isinstance(ours, nn.Linear) else torch.randn(2, ours.in_channels, 9, 9, generator=g)
            torch.testing.assert_close(ours(x), m.org_module[0](x), rtol=1e-4, atol=2e-5, msg=lambda s: f"{m.lora_name}: {s}")


# ------------------------------------------------------------------------------------------ layer <-> tensors
@pytest.mark.parametrize("on_output", [False, True], ids=["in", "out"])
def test_factors_roundtrip_dora_and_scalar(on_output):
    layer = LoHALayer(_base("conv"), rank=2, dora_wd=True, wd_on_output=on_output, use_scalar=True)
    _randomize(layer, 11)
    x = _input(layer.base)
    with torch.no_grad():
        y = layer(x)
        f = {k: v.clone() for k, v in layer.factors().items()}
    torch.testing.assert_close(f["hada_w1_a"], layer.hada_w1_a.detach() * 0.7)  # the scalar folded in
    fresh = LoHALayer.from_factors(copy.deepcopy(layer.base), f)
    assert fresh.dora and fresh.wd_on_output == on_output and not fresh.use_scalar
    torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-6)
    again = LoHALayer(copy.deepcopy(layer.base), rank=2, dora_wd=True, wd_on_output=on_output, use_scalar=True)
    again.load_factors(f)
    assert float(again.scalar.detach()) == 1.0  # LyCORIS's load hook: the file's w1_a already holds the scalar
    torch.testing.assert_close(again(x), y, rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="dora_scale"):
        again.load_factors({k: v for k, v in f.items() if k != "dora_scale"})
    with pytest.raises(ValueError, match="no dora_wd"):
        LoHALayer(copy.deepcopy(layer.base), rank=2).load_factors(f)
