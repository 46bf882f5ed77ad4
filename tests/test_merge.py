"""apply_loha / set_loha_strength / remove_loha: strength semantics, exact restore, stacking, precision,
SDXL and text-encoder naming, and that a merged pipeline runs exactly the modules it ran before.

Tolerances: "exact" means torch.equal. fp32 comparisons of values computed in a different order than
the loader does (hand sums, layer outputs, a UNet forward) use rtol 1e-5 / atol 1e-6 (weights) and
rtol 1e-4 / atol 1e-5 (activations).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sd_loha import apply_loha, list_loha, remove_loha, set_loha_strength
from sd_loha.formats import load_adapter
from sd_loha.merge import REGISTRY_ATTR, merge_delta
from sd_loha.naming import kohya_name
from sd_loha.ops import loha_delta

from .loader_helpers import all_models, assert_unchanged, changed, file_delta, make_loha_file, snapshot

W_TOL = dict(rtol=1e-5, atol=1e-6)
ACT_TOL = dict(rtol=1e-4, atol=1e-5)
DELTA_TOL = dict(rtol=1e-5, atol=1e-8)  # the loader's ΔW vs ops.loha_delta: BLAS rounding only


def _exact_delta(parsed, sd, key, shape):
    """The loader's own fp32 ΔW (merge_delta), checked against the FORMAT.md formula (ops.loha_delta)."""
    mod = parsed.modules[key]
    delta = merge_delta(mod, shape)
    factors = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(key + ".")}
    ref = loha_delta(factors, shape, float(factors["alpha"]) / factors["hada_w1_b"].shape[0])
    torch.testing.assert_close(delta, ref, **DELTA_TOL)
    return delta


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory):
    """Two different full-preset LoHA files (Linear, 1×1 and 3×3 convs, text encoder) for tiny-sd1."""
    from sd_loha.models import build_tiny_pipeline

    d = tmp_path_factory.mktemp("sd1")
    pipe = build_tiny_pipeline("tiny-sd1")
    rows_a = make_loha_file(pipe, d / "a.safetensors", seed=1)
    rows_b = make_loha_file(pipe, d / "b.safetensors", seed=2, rank=2, alpha=1.0, conv_rank=2, conv_alpha=2.0)
    return {"a": d / "a.safetensors", "b": d / "b.safetensors", "rows_a": rows_a, "rows_b": rows_b}


def _weights(pipe, rows) -> dict[str, torch.Tensor]:
    models = all_models(pipe)
    return {r["key"]: models[r["part"]].get_submodule(r["path"]).weight.detach().clone() for r in rows}


def _unet_inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    sample = torch.randn(1, cfg.in_channels, 16, 16, generator=g)
    hidden = torch.randn(1, 7, cfg.cross_attention_dim, generator=g)
    return sample, torch.tensor([500]), hidden


def _unet_out(pipe, inputs):
    with torch.no_grad():
        return pipe.unet(*inputs).sample


# ------------------------------------------------------------------------------------------------
# 1. strength
# ------------------------------------------------------------------------------------------------
def test_strength_zero_is_bit_exact(tiny_pipe, sd1_files):
    pipe = tiny_pipe("tiny-sd1")
    snap = snapshot(pipe)
    report = apply_loha(pipe, sd1_files["a"], strength=0.0)
    assert report.patched["unet"] > 0 and report.patched["te"] > 0
    assert_unchanged(pipe, snap)
    # and the same file at strength 1 does change things (the check above can fail)
    set_loha_strength(pipe, "a", 1.0)
    assert len(changed(pipe, snap)) == report.total
    set_loha_strength(pipe, "a", unet_strength=0.0, text_encoder_strength=0.0)
    assert_unchanged(pipe, snap)


def test_weights_and_layer_outputs_linear_in_strength(tiny_pipe, sd1_files):
    pipe = tiny_pipe("tiny-sd1")
    rows = sd1_files["rows_a"]
    apply_loha(pipe, sd1_files["a"], strength=0.0)
    w0 = _weights(pipe, rows)
    set_loha_strength(pipe, "a", 1.0)
    w1 = _weights(pipe, rows)
    set_loha_strength(pipe, "a", 0.5)
    wh = _weights(pipe, rows)
    for key in w0:
        assert not torch.equal(w0[key], w1[key]), key
        torch.testing.assert_close(wh[key], (w0[key] + w1[key]) / 2, **W_TOL, msg=lambda m: f"{key}: {m}")

    # One Linear and one 3x3 conv layer's output on a fixed input.
    to_q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    conv = pipe.unet.down_blocks[0].resnets[0].conv1
    g = torch.Generator().manual_seed(0)
    x_lin, x_conv = torch.randn(3, to_q.in_features, generator=g), torch.randn(1, conv.in_channels, 8, 8, generator=g)
    outs = {}
    for s in (0.0, 0.5, 1.0):
        set_loha_strength(pipe, "a", s)
        with torch.no_grad():
            outs[s] = (to_q(x_lin), conv(x_conv))
    for i in range(2):
        assert not torch.allclose(outs[0.0][i], outs[1.0][i], **ACT_TOL)
        torch.testing.assert_close(outs[0.5][i], (outs[0.0][i] + outs[1.0][i]) / 2, **ACT_TOL)


def test_unet_forward_linear_in_strength(tiny_pipe, tmp_path):
    """A whole UNet forward is linear in strength when the adapted layer is the last one (conv_out):
    out(s) = conv(h, W + sΔ). With many patched layers the non-linearities in between make the output
    non-linear in s, so that case is covered by the weight-level check above."""
    pipe = tiny_pipe("tiny-sd1")
    path = tmp_path / "conv_out.safetensors"
    make_loha_file(pipe, path, preset="attn-only", text_encoder=False, include=["conv_out"],
                   exclude=["*attn*"], conv_rank=4, conv_alpha=4.0, std=0.5)
    report = apply_loha(pipe, path, strength=0.0)
    assert report.total == 1
    inputs = _unet_inputs(pipe)
    outs = {}
    for s in (0.0, 0.5, 1.0):
        set_loha_strength(pipe, "conv_out", s)
        outs[s] = _unet_out(pipe, inputs)
    assert (outs[1.0] - outs[0.0]).abs().max() > 1e-3
    torch.testing.assert_close(outs[0.5], (outs[0.0] + outs[1.0]) / 2, **ACT_TOL)


def test_set_strength_then_back_equals_direct_apply(tiny_pipe, sd1_files):
    direct = tiny_pipe("tiny-sd1")
    apply_loha(direct, sd1_files["a"], strength=0.7)
    ref = snapshot(direct)

    pipe = tiny_pipe("tiny-sd1")
    apply_loha(pipe, sd1_files["a"], strength=1.0)
    for s in (0.3, -0.4, 1.3, 0.0, 0.7):
        set_loha_strength(pipe, "a", s)
    assert_unchanged(pipe, ref)
    assert list_loha(pipe) == {"a": (0.7, 0.7)}


def test_remove_restores_every_parameter(tiny_pipe, sd1_files):
    pipe = tiny_pipe("tiny-sd1")
    snap = snapshot(pipe)
    apply_loha(pipe, sd1_files["a"], strength=0.8)
    apply_loha(pipe, sd1_files["b"], unet_strength=-0.5, text_encoder_strength=1.2)
    set_loha_strength(pipe, "a", 0.35)
    remove_loha(pipe, "a")
    assert changed(pipe, snap)  # b is still in
    remove_loha(pipe, "b")
    assert_unchanged(pipe, snap)
    assert list_loha(pipe) == {}
    assert getattr(pipe.unet, REGISTRY_ATTR).slots == {}  # no backups kept once nothing is merged

    apply_loha(pipe, sd1_files["b"])
    apply_loha(pipe, sd1_files["a"])
    remove_loha(pipe)  # all at once
    assert_unchanged(pipe, snap)
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        remove_loha(pipe, "a")


def test_remove_after_pipeline_cast_gives_cast_original(tiny_pipe, sd1_files):
    """On the CPU the original tensor itself is the clean copy and the merged weight is fresh memory. A
    pipeline cast after the merge (pipe.to(float16)) must not get the fp32 original tensor back on
    removal: it gets the original cast like every other parameter."""
    pipe = tiny_pipe("tiny-sd1")
    apply_loha(pipe, sd1_files["a"])
    pipe.to(dtype=torch.float16)
    remove_loha(pipe)
    ref = tiny_pipe("tiny-sd1").to(dtype=torch.float16)
    assert_unchanged(pipe, snapshot(ref))
    assert all(p.dtype == torch.float16 for p in pipe.unet.parameters())


def test_two_adapters_sum_of_deltas(tiny_pipe, sd1_files):
    pipe = tiny_pipe("tiny-sd1")
    base = snapshot(pipe)
    models = all_models(pipe)
    sa, sb = 0.8, -0.6
    apply_loha(pipe, sd1_files["a"], strength=sa)
    apply_loha(pipe, sd1_files["b"], strength=sb)
    sd_a, sd_b = load_file(sd1_files["a"]), load_file(sd1_files["b"])
    rows = {(r["part"], r["path"]): r["key"] for r in sd1_files["rows_a"]}
    rows_b = {(r["part"], r["path"]): r["key"] for r in sd1_files["rows_b"]}
    assert rows.keys() == rows_b.keys()
    for (part, path), key in rows.items():
        w = base[f"{part}:{path}.weight"]
        da = file_delta({k: v for k, v in sd_a.items() if k.startswith(key + ".")}, w.shape)
        db = file_delta({k: v for k, v in sd_b.items() if k.startswith(key + ".")}, w.shape)
        got = models[part].get_submodule(path).weight
        torch.testing.assert_close(got, w + sa * da + sb * db, **W_TOL, msg=lambda m: f"{key}: {m}")

    # A at 0 leaves exactly B alone; B at 0 exactly A alone.
    only_b = tiny_pipe("tiny-sd1")
    apply_loha(only_b, sd1_files["b"], strength=sb)
    set_loha_strength(pipe, "a", 0.0)
    assert_unchanged(pipe, snapshot(only_b))


def test_summed_delta_as_one_state_dict(tiny_pipe, sd1_files):
    """W + ΔA + ΔB from two files equals one hand-made state dict holding ΔA + ΔB (full-rank LoRA,
    down = identity), within fp32 rounding of the different summation order."""
    pipe = tiny_pipe("tiny-sd1")
    sd_a, sd_b = load_file(sd1_files["a"]), load_file(sd1_files["b"])
    summed = {}
    for r in sd1_files["rows_a"]:
        if r["part"] != "unet":
            continue
        w = pipe.unet.get_submodule(r["path"]).weight
        key = r["key"]
        delta = (file_delta({k: v for k, v in sd_a.items() if k.startswith(key + ".")}, w.shape)
                 + file_delta({k: v for k, v in sd_b.items() if k.startswith(key + ".")}, w.shape))
        flat = delta.reshape(w.shape[0], -1)
        summed[f"{key}.lora_up.weight"] = flat
        summed[f"{key}.lora_down.weight"] = torch.eye(flat.shape[1])
    one = tiny_pipe("tiny-sd1")
    apply_loha(one, summed, text_encoder_strength=0.0)
    apply_loha(pipe, sd1_files["a"], text_encoder_strength=0.0)
    apply_loha(pipe, sd1_files["b"], text_encoder_strength=0.0)
    for n, p in pipe.unet.named_parameters():
        torch.testing.assert_close(p, one.unet.get_parameter(n), **W_TOL, msg=lambda m: f"{n}: {m}")


def test_unet_and_text_encoder_strength_separately(tiny_pipe, sd1_files):
    pipe = tiny_pipe("tiny-sd1")
    snap = snapshot(pipe)
    te_keys = {k for k in snap if k.startswith("te:")}
    apply_loha(pipe, sd1_files["a"], unet_strength=1.0, text_encoder_strength=0.0)
    diff = set(changed(pipe, snap))
    assert diff and not diff & te_keys  # TE untouched bit for bit, UNet changed

    set_loha_strength(pipe, "a", unet_strength=0.0, text_encoder_strength=1.0)
    diff = set(changed(pipe, snap))
    assert diff and diff <= te_keys

    # strength= sets both; unet_strength overrides it for the UNet only
    remove_loha(pipe)
    apply_loha(pipe, sd1_files["a"], 0.5, unet_strength=0.0)
    assert list_loha(pipe) == {"a": (0.0, 0.5)}
    assert set(changed(pipe, snap)) <= te_keys


def test_non_finite_strength_refused(tiny_pipe, sd1_files):
    pipe = tiny_pipe("tiny-sd1")
    snap = snapshot(pipe)
    with pytest.raises(ValueError, match="finite"):
        apply_loha(pipe, sd1_files["a"], strength=float("nan"))
    apply_loha(pipe, sd1_files["a"], strength=0.0)
    with pytest.raises(ValueError, match="finite"):
        set_loha_strength(pipe, "a", unet_strength=float("inf"))
    assert_unchanged(pipe, snap)


def test_state_dict_adapters_get_distinct_names(tiny_pipe, sd1_files):
    """Default names for in-memory adapters never replace another loaded adapter."""
    pipe = tiny_pipe("tiny-sd1")
    sd_a, sd_b = load_file(sd1_files["a"]), load_file(sd1_files["b"])
    assert apply_loha(pipe, sd_a).name == "adapter0"
    assert apply_loha(pipe, sd_b).name == "adapter1"
    remove_loha(pipe, "adapter0")
    third = apply_loha(pipe, sd_a).name
    assert third != "adapter1" and set(list_loha(pipe)) == {"adapter1", third}


def test_reapply_same_name_replaces(tiny_pipe, sd1_files):
    pipe = tiny_pipe("tiny-sd1")
    apply_loha(pipe, sd1_files["a"], strength=0.3, name="x")
    apply_loha(pipe, sd1_files["a"], strength=0.7, name="x")
    direct = tiny_pipe("tiny-sd1")
    apply_loha(direct, sd1_files["a"], strength=0.7)
    assert list_loha(pipe) == {"x": (0.7, 0.7)}
    assert_unchanged(pipe, snapshot(direct))


# ------------------------------------------------------------------------------------------------
# 2. precision
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_single_cast_and_no_drift(tiny_pipe, tmp_path, dtype):
    src = tiny_pipe("tiny-sd1")
    path = tmp_path / "h.safetensors"
    rows = make_loha_file(src, path, std=0.5)  # deltas well above half-precision resolution
    sd = load_file(path)
    parsed = load_adapter(path)
    pipe = tiny_pipe("tiny-sd1").to(dtype)
    base = snapshot(pipe)
    models = all_models(pipe)
    s = 0.7
    apply_loha(pipe, path, strength=s)
    for r in rows:
        w = base[f"{r['part']}:{r['path']}.weight"]
        delta = _exact_delta(parsed, sd, r["key"], w.shape)  # fp32
        expect = (w.float() + s * delta).to(dtype)
        got = models[r["part"]].get_submodule(r["path"]).weight
        assert got.dtype == dtype
        assert torch.equal(got, expect), r["key"]
    merged = snapshot(pipe)

    g = torch.Generator().manual_seed(0)
    strengths = (torch.rand(20, generator=g) * 2 - 0.5).tolist()
    for x in strengths:
        set_loha_strength(pipe, "h", x)
    set_loha_strength(pipe, "h", s)
    assert_unchanged(pipe, merged)  # no drift

    # The naive way (subtract the old delta, add the new one, in half precision) does drift.
    r = next(r for r in rows if r["part"] == "unet")
    w = merged[f"unet:{r['path']}.weight"].clone()
    delta = merge_delta(parsed.modules[r["key"]], w.shape)
    current = s
    for x in strengths + [s]:
        w = w - (current * delta).to(dtype) + (x * delta).to(dtype)
        current = x
    assert not torch.equal(w, merged[f"unet:{r['path']}.weight"])

    remove_loha(pipe)
    assert_unchanged(pipe, base)


def test_half_precision_two_adapters_single_cast(tiny_pipe, sd1_files):
    """Stacked adapters on an fp16 pipeline: (W.float() + s1·Δ1 + s2·Δ2).to(fp16), one cast at the end."""
    sd_a, sd_b = load_file(sd1_files["a"]), load_file(sd1_files["b"])
    pa, pb = load_adapter(sd1_files["a"]), load_adapter(sd1_files["b"])
    pipe = tiny_pipe("tiny-sd1").to(torch.float16)
    base = snapshot(pipe)
    models = all_models(pipe)
    s1, s2 = 0.9, -1.3
    apply_loha(pipe, sd1_files["a"], strength=s1)
    apply_loha(pipe, sd1_files["b"], strength=s2)
    for r in sd1_files["rows_a"]:
        w = base[f"{r['part']}:{r['path']}.weight"]
        da, db = _exact_delta(pa, sd_a, r["key"], w.shape), _exact_delta(pb, sd_b, r["key"], w.shape)
        expect = (w.float() + s1 * da + s2 * db).to(torch.float16)
        assert torch.equal(models[r["part"]].get_submodule(r["path"]).weight, expect), r["key"]
    remove_loha(pipe)
    assert_unchanged(pipe, base)


@pytest.mark.parametrize("layout,block_bytes", [("fp32", 1), ("fp32", 300), ("fp16", 300), ("channels_last", 300),
                                                 ("channels_last", 1 << 20)],
                         ids=["fp32-row", "fp32-rows", "fp16-rows", "channels_last-rows", "channels_last-whole"])
def test_row_blocked_merge(tiny_pipe, sd1_files, monkeypatch, block_bytes, layout):
    """The CPU merge walks each weight in blocks of rows; with any block size the result is exactly
    (W.float() + s1·ΔW1 + s2·ΔW2).to(dtype), ΔW matches ops.loha_delta within fp32 rounding, and the
    memory format (channels-last convs) is kept."""
    import sd_loha.merge as merge_mod

    monkeypatch.setattr(merge_mod, "_BLOCK_BYTES", block_bytes)
    pipe = tiny_pipe("tiny-sd1")
    if layout == "fp16":
        pipe = pipe.to(torch.float16)
    elif layout == "channels_last":
        pipe.unet.to(memory_format=torch.channels_last)
    base = snapshot(pipe)
    models = all_models(pipe)
    sd_a, sd_b = load_file(sd1_files["a"]), load_file(sd1_files["b"])
    pa, pb = load_adapter(sd1_files["a"]), load_adapter(sd1_files["b"])
    s1, s2 = 0.75, 1.0
    apply_loha(pipe, sd1_files["a"], strength=s1)
    apply_loha(pipe, sd1_files["b"], strength=s2)
    for r in sd1_files["rows_a"]:
        layer_w = models[r["part"]].get_submodule(r["path"]).weight
        w = base[f"{r['part']}:{r['path']}.weight"]
        da, db = _exact_delta(pa, sd_a, r["key"], w.shape), _exact_delta(pb, sd_b, r["key"], w.shape)
        assert torch.equal(layer_w, (w.float() + s1 * da + s2 * db).to(w.dtype)), r["key"]
        if layout == "channels_last" and layer_w.dim() == 4:
            assert layer_w.is_contiguous(memory_format=torch.channels_last)  # layout kept
    remove_loha(pipe)
    assert_unchanged(pipe, base)


def test_lora_merge_matches_diffusers_fuse_lora(tiny_pipe, tmp_path):
    """For a kohya LoRA (Linear, 1×1 and 3×3 LoCon, text encoder), apply_loha's merged weights equal
    diffusers' load_lora_weights + fuse_lora (PEFT) within fp32 rounding (bit for bit on these layers);
    remove_loha restores exactly, which diffusers' unfuse_lora does not."""
    pytest.importorskip("peft")
    from safetensors.torch import save_file

    src = tiny_pipe("tiny-sd1")
    rows = make_loha_file(src, tmp_path / "layout.safetensors", rank=8, alpha=4.0, conv_rank=4, conv_alpha=1.0)
    models = all_models(src)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for r in rows:
        w = models[r["part"]].get_submodule(r["path"]).weight
        if w.dim() == 4:
            sd[f"{r['key']}.lora_down.weight"] = torch.randn(4, *w.shape[1:], generator=g) * 0.1
            sd[f"{r['key']}.lora_up.weight"] = torch.randn(w.shape[0], 4, 1, 1, generator=g) * 0.1
        else:
            sd[f"{r['key']}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.1
            sd[f"{r['key']}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.1
        sd[f"{r['key']}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "kohya_lora.safetensors"
    save_file(sd, str(path))

    ours, theirs = tiny_pipe("tiny-sd1"), tiny_pipe("tiny-sd1")
    base = snapshot(ours)
    report = apply_loha(ours, path, strict=True)
    assert report.total == len(rows)
    theirs.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="k")  # diffusers 0.31 needs the name
    theirs.fuse_lora()
    mine, peft_models = all_models(ours), all_models(theirs)
    for r in rows:
        layer = peft_models[r["part"]].get_submodule(r["path"])
        fused = getattr(layer, "base_layer", layer).weight
        # bit-identical in practice; the row-blocked BLAS calls may round a last bit differently
        torch.testing.assert_close(mine[r["part"]].get_submodule(r["path"]).weight, fused, rtol=1e-6, atol=1e-8)
        assert not torch.equal(fused, base[f"{r['part']}:{r['path']}.weight"])
    remove_loha(ours)
    assert_unchanged(ours, base)


# ------------------------------------------------------------------------------------------------
# 3. SDXL naming, 4. text encoders
# ------------------------------------------------------------------------------------------------
def test_sdxl_ldm_and_diffusers_names_patch_the_same_layers(tiny_pipe, tmp_path):
    src = tiny_pipe("tiny-sdxl")
    path = tmp_path / "xl.safetensors"
    rows = make_loha_file(src, path)
    sd = load_file(path)
    renamed = {}
    n_ldm = 0
    for r in rows:
        new = kohya_name("lora_unet", r["path"]) if r["part"] == "unet" else r["key"]
        n_ldm += new != r["key"]
        for k, v in sd.items():
            if k.startswith(r["key"] + "."):
                renamed[new + k[len(r["key"]):]] = v
    assert n_ldm > 50  # the file really used LDM names (input_blocks_…) for most UNet layers
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in sd)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.") for k in renamed)

    pipe_ldm, pipe_diff = tiny_pipe("tiny-sdxl"), tiny_pipe("tiny-sdxl")
    base = snapshot(pipe_ldm)
    rep_ldm = apply_loha(pipe_ldm, path, strict=True)
    rep_diff = apply_loha(pipe_diff, renamed, strict=True)
    assert rep_ldm.patched == rep_diff.patched
    assert rep_ldm.file_architecture == "SDXL"
    counts = {p: sum(r["part"] == p for r in rows) for p in ("unet", "te1", "te2")}
    assert rep_ldm.patched == counts and counts["te1"] > 0 and counts["te2"] > 0
    assert_unchanged(pipe_diff, snapshot(pipe_ldm))
    assert len(changed(pipe_ldm, base)) == len(rows)

    # te1 goes to text_encoder (CLIP-L), te2 to text_encoder_2 (CLIP-G), each with its own delta.
    for r in rows:
        if r["part"] == "unet":
            continue
        model = pipe_ldm.text_encoder if r["part"] == "te1" else pipe_ldm.text_encoder_2
        w = base[f"{r['part']}:{r['path']}.weight"]
        delta = file_delta({k: v for k, v in sd.items() if k.startswith(r["key"] + ".")}, w.shape)
        torch.testing.assert_close(model.get_submodule(r["path"]).weight, w + delta, **W_TOL)
    assert any(r["key"].startswith("lora_te2_text_model_encoder_") for r in rows)


@pytest.mark.skipif(int(__import__("transformers").__version__.split(".")[0]) < 5,
                    reason="the transformers 5 CLIPTextModel layout (no text_model level) does not exist in 4.x")
@pytest.mark.parametrize("with_text_model", [True, False], ids=["text_model_", "short"])
def test_text_encoder_names_on_transformers5_clip(tiny_pipe, with_text_model):
    pipe = tiny_pipe("tiny-sd1")
    te = pipe.text_encoder
    assert not hasattr(te, "text_model")  # transformers 5 layout: paths start at encoder.
    q = te.encoder.layers[0].self_attn.q_proj
    g = torch.Generator().manual_seed(0)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj" if with_text_model else \
        "lora_te_encoder_layers_0_self_attn_q_proj"
    sd = {
        f"{name}.hada_w1_a": torch.randn(q.out_features, 2, generator=g),
        f"{name}.hada_w1_b": torch.randn(2, q.in_features, generator=g),
        f"{name}.hada_w2_a": torch.randn(q.out_features, 2, generator=g),
        f"{name}.hada_w2_b": torch.randn(2, q.in_features, generator=g),
        f"{name}.alpha": torch.tensor(1.0),
    }
    w = q.weight.detach().clone()
    snap = snapshot(pipe)
    report = apply_loha(pipe, sd, strict=True)
    assert report.patched == {"unet": 0, "te": 1}
    expect = w + 0.5 * (sd[f"{name}.hada_w1_a"] @ sd[f"{name}.hada_w1_b"]) * (sd[f"{name}.hada_w2_a"] @ sd[f"{name}.hada_w2_b"])
    torch.testing.assert_close(q.weight, expect, **W_TOL)
    assert changed(pipe, snap) == ["te:encoder.layers.0.self_attn.q_proj.weight"]


# ------------------------------------------------------------------------------------------------
# 6 (part). pipelines sharing components
# ------------------------------------------------------------------------------------------------
def test_img2img_pipeline_shares_merged_state(tiny_pipe, sd1_files):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = tiny_pipe("tiny-sd1")
    snap = snapshot(pipe)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    apply_loha(pipe, sd1_files["a"], strength=0.9)
    assert list_loha(img2img) == {"a": (0.9, 0.9)}
    assert changed(img2img, snap)  # sees the merged weights
    remove_loha(img2img, "a")
    assert_unchanged(pipe, snap)
    assert list_loha(pipe) == {}

    apply_loha(img2img, sd1_files["b"])
    set_loha_strength(pipe, "b", 0.4)
    assert list_loha(img2img) == {"b": (0.4, 0.4)}
    remove_loha(pipe)
    assert_unchanged(img2img, snap)


# ------------------------------------------------------------------------------------------------
# 10. generation cost
# ------------------------------------------------------------------------------------------------
def _module_signature(model: nn.Module):
    return [(n, type(m)) for n, m in model.named_modules()]


def _hooks(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            n += len(getattr(m, attr, {}) or {})
    return n


def test_merged_pipeline_runs_the_same_modules(tiny_pipe, sd1_files):
    pipe = tiny_pipe("tiny-sd1")
    before = {p: (_module_signature(m), _hooks(m), [n for n, _ in m.named_parameters()])
              for p, m in all_models(pipe).items()}
    params_before = {p: [id(t) for t in m.parameters()] for p, m in all_models(pipe).items()}
    apply_loha(pipe, sd1_files["a"])
    apply_loha(pipe, sd1_files["b"], strength=0.5)
    set_loha_strength(pipe, "a", 0.2)
    for p, m in all_models(pipe).items():
        assert (_module_signature(m), _hooks(m), [n for n, _ in m.named_parameters()]) == before[p]
        assert [id(t) for t in m.parameters()] == params_before[p]  # merged in place, same Parameter objects
    assert torch.nn.modules.module._global_forward_hooks == {}
    assert torch.nn.modules.module._global_forward_pre_hooks == {}
