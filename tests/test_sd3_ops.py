"""Exact moves between SD3's layouts (sd_loha.sd3_ops) against independent references: LyCORIS's functional LoHA /
LoCon deltas and weight decomposition, diffusers' own swap_scale_shift, PEFT's LoRA layers."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import swap_scale_shift
from lycoris.functional import locon as ly_locon
from lycoris.functional import loha as ly_loha
from lycoris.functional.general import weight_decompose
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from sd_loha.architectures import build_model
from sd_loha.formats import load_adapter
from sd_loha.io import AdapterModule
from sd_loha.sd3_names import SD3Names, Target, form_name, original_layout
from sd_loha.sd3_ops import DenseSplitNeeded, dense_deltas, fuse_rows, slice_rows, split_rows, swap_halves

ROWS = (6, 6, 6)  # q, k, v of a fused qkv
IN = 5


def _loha(out: int, inn: int, r: int, alpha: float, *, dora: str | None = None, seed: int = 0,
          tucker: bool = False) -> AdapterModule:
    g = torch.Generator().manual_seed(seed)
    if tucker:
        t = {"hada_w1_a": torch.randn(r, out, generator=g), "hada_w1_b": torch.randn(r, inn, generator=g),
             "hada_w2_a": torch.randn(r, out, generator=g), "hada_w2_b": torch.randn(r, inn, generator=g),
             "hada_t1": torch.randn(r, r, 3, 3, generator=g), "hada_t2": torch.randn(r, r, 3, 3, generator=g)}
    else:
        t = {"hada_w1_a": torch.randn(out, r, generator=g), "hada_w1_b": torch.randn(r, inn, generator=g),
             "hada_w2_a": torch.randn(out, r, generator=g), "hada_w2_b": torch.randn(r, inn, generator=g)}
    ds = None if dora is None else (torch.rand(out, 1, generator=g) + 0.5 if dora == "out"
                                    else torch.rand(1, inn, generator=g) + 0.5)
    return AdapterModule("m", "loha", t, alpha=alpha, dora_scale=ds)


def _lora(out: int, inn: int, r: int, alpha: float, seed: int = 0) -> AdapterModule:
    g = torch.Generator().manual_seed(seed)
    return AdapterModule("m", "lora", {"lora_up.weight": torch.randn(out, r, generator=g),
                                       "lora_down.weight": torch.randn(r, inn, generator=g)}, alpha=alpha)


def ref_delta(mod: AdapterModule) -> torch.Tensor:
    """ΔW by LyCORIS's functional code (its forward's math): loha (w1d, w1u, w2d, w2u, t1, t2), locon (down, up, mid)."""
    t = mod.tensors
    if mod.algo == "lora":
        return ly_locon.diff_weight(t["lora_down.weight"], t["lora_up.weight"], None, gamma=mod.scale, backend="torch")
    return ly_loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t.get("hada_t1"),
                               t.get("hada_t2"), gamma=mod.scale, backend="torch")


def _targets(rows=ROWS) -> list[Target]:
    starts = [sum(rows[:i]) for i in range(len(rows))]
    return [Target(f"t{i}", s, s + n) for i, (s, n) in enumerate(zip(starts, rows))]


@pytest.mark.parametrize("make", [lambda: _loha(18, IN, 4, 2.0), lambda: _lora(18, IN, 4, 3.0)])
def test_fused_splits_exactly_onto_q_k_v(make):
    fused = make()
    whole = ref_delta(fused)
    parts = split_rows(fused, _targets())
    for part, t in zip(parts, _targets()):
        assert part.rank == fused.rank and part.scale == fused.scale
        torch.testing.assert_close(ref_delta(part), whole[t.start:t.stop], rtol=0, atol=1e-6)


def test_three_loha_fuse_exactly_at_the_summed_rank():
    """Split LoHAs of different ranks and alphas fuse into one LoHA of rank r_q + r_k + r_v whose ΔW is theirs
    stacked."""
    mods = [_loha(6, IN, 2, 1.0, seed=1), _loha(6, IN, 3, 3.0, seed=2), _loha(6, IN, 4, 0.5, seed=3)]
    fused = fuse_rows(mods, ROWS, "qkv")
    assert fused.rank == 9
    torch.testing.assert_close(ref_delta(fused), torch.cat([ref_delta(m) for m in mods]), rtol=1e-5, atol=1e-6)
    # And back: splitting the fused module gives each slice's ΔW again.
    for part, mod in zip(split_rows(fused, _targets()), mods):
        torch.testing.assert_close(ref_delta(part), ref_delta(mod), rtol=1e-5, atol=1e-6)


def test_lora_fuse_and_missing_slice():
    mods = [_lora(6, IN, 2, 1.0, seed=4), None, _lora(6, IN, 3, 6.0, seed=5)]
    fused = fuse_rows(mods, ROWS, "qkv")
    expected = torch.cat([ref_delta(mods[0]), torch.zeros(6, IN), ref_delta(mods[2])])
    torch.testing.assert_close(ref_delta(fused), expected, rtol=1e-5, atol=1e-6)


def test_fuse_refuses_what_no_fused_module_equals():
    with pytest.raises(ValueError, match="input-column"):
        fuse_rows([_loha(6, IN, 2, 1.0, dora="in")] * 3, ROWS, "qkv")
    with pytest.raises(ValueError, match="some slices only"):
        fuse_rows([_loha(6, IN, 2, 1.0, dora="out"), _loha(6, IN, 2, 1.0), None], ROWS, "qkv")
    with pytest.raises(ValueError, match="all be flat LoHA or all LoRA"):
        fuse_rows([_loha(6, IN, 2, 1.0), _lora(6, IN, 2, 1.0), None], ROWS, "qkv")


def test_output_dora_splits_and_fuses_by_rows():
    torch.manual_seed(6)
    base = torch.randn(18, IN)
    fused = _loha(18, IN, 3, 1.5, dora="out", seed=7)
    merged = weight_decompose(base + ref_delta(fused), fused.dora_scale, wd_on_out=True, backend="torch")
    parts = split_rows(fused, _targets())
    for part, t in zip(parts, _targets()):
        got = weight_decompose(base[t.start:t.stop] + ref_delta(part), part.dora_scale, wd_on_out=True, backend="torch")
        torch.testing.assert_close(got, merged[t.start:t.stop], rtol=1e-6, atol=1e-6)
    again = fuse_rows(parts, ROWS, "qkv")
    torch.testing.assert_close(again.dora_scale, fused.dora_scale)


def test_input_dora_needs_the_dense_per_slice_delta():
    """An input-column dora_scale normalises each column over q, k and v together: no slice module reproduces it
    (slice_rows refuses); dense_deltas gives each layer's exact change from the base weights, equal to the rows of
    LyCORIS's decomposition of the whole fused weight, at strength 1 and 0.5."""
    torch.manual_seed(8)
    weights = [torch.randn(6, IN) for _ in range(3)]
    base = torch.cat(weights)
    fused = _loha(18, IN, 3, 1.5, dora="in", seed=9)
    with pytest.raises(DenseSplitNeeded):
        slice_rows(fused, 0, 6)
    merged = weight_decompose(base + ref_delta(fused), fused.dora_scale, wd_on_out=False, backend="torch")
    for strength in (1.0, 0.5):
        deltas = dense_deltas(fused, _targets(), weights, strength)
        for d, t in zip(deltas, _targets()):
            torch.testing.assert_close(d, strength * (merged - base)[t.start:t.stop], rtol=1e-5, atol=1e-5)
    # A per-slice input-column DoRA (what splitting the factors would give) is measurably different.
    alone = weight_decompose(weights[0] + ref_delta(slice_rows(_loha(18, IN, 3, 1.5, seed=9), 0, 6)),
                             fused.dora_scale, wd_on_out=False, backend="torch")
    assert not torch.allclose(alone, merged[:6], atol=1e-3)


@pytest.mark.parametrize("kind", ["loha", "tucker", "lora", "dora_out", "dora_in"])
def test_swap_halves_is_diffusers_swap_scale_shift(kind):
    """Swapping a module's halves swaps its ΔW's rows (shift, scale) <-> (scale, shift) exactly as diffusers'
    checkpoint converter swaps the weight, for every factor form, DoRA's merged weight included; twice is identity."""
    torch.manual_seed(10)
    mod = {"loha": lambda: _loha(8, IN, 3, 2.0), "tucker": lambda: _loha(8, IN, 3, 2.0, tucker=True),
           "lora": lambda: _lora(8, IN, 3, 2.0), "dora_out": lambda: _loha(8, IN, 3, 2.0, dora="out"),
           "dora_in": lambda: _loha(8, IN, 3, 2.0, dora="in")}[kind]()
    swapped = swap_halves(mod)
    torch.testing.assert_close(ref_delta(swapped), swap_scale_shift(ref_delta(mod), dim=None), rtol=0, atol=1e-6)
    if mod.dora_scale is not None:
        base = torch.randn(8, IN)
        on_out = kind == "dora_out"
        merged = weight_decompose(base + ref_delta(mod), mod.dora_scale, wd_on_out=on_out, backend="torch")
        got = weight_decompose(swap_scale_shift(base, dim=None) + ref_delta(swapped), swapped.dora_scale,
                               wd_on_out=on_out, backend="torch")
        torch.testing.assert_close(got, swap_scale_shift(merged, dim=None), rtol=1e-6, atol=1e-6)
    back = swap_halves(swapped)
    for k, v in mod.tensors.items():
        assert torch.equal(back.tensors[k], v)


def test_dense_deltas_on_a_swapped_layer():
    torch.manual_seed(11)
    weight = torch.randn(8, IN)  # the diffusers layer: (scale, shift)
    mod = _loha(8, IN, 2, 1.0, dora="out")  # the file's module: (shift, scale)
    (delta,) = dense_deltas(mod, [Target("norm_out.linear", 0, 8, True)], [weight])
    file_weight = swap_scale_shift(weight, dim=None)
    merged = weight_decompose(file_weight + ref_delta(mod), mod.dora_scale, wd_on_out=True, backend="torch")
    torch.testing.assert_close(delta, swap_scale_shift(merged - file_weight, dim=None), rtol=1e-5, atol=1e-5)


SMALL = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
             pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


def test_peft_diffusers_form_reads_to_peft_deltas_and_fuses_to_kohya():
    """A PEFT LoRA on diffusers' q/k/v (its own layers' get_delta_weight as reference), saved in diffusers'
    `transformer.` form, reads to layers whose deltas are PEFT's; fused into the kohya form's qkv, the fused ΔW
    is the three stacked."""
    torch.manual_seed(12)
    model = build_model("SD3Transformer2DModel", SMALL)
    names = SD3Names({"transformer": model})  # before PEFT wraps the layers
    layout = original_layout(model)
    config = LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                           "add_v_proj"], init_lora_weights=False)
    inject_adapter_in_model(config, model)
    state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    parsed = load_adapter(state)
    by_slot: dict[str, list] = {}
    for name, mod in parsed.modules.items():
        mod.alpha = float(config.lora_alpha)  # diffusers' state dicts leave alpha to the adapter config
        layer = names.match(name)
        (target,) = layer.targets
        peft_layer = model.get_submodule(target.path)
        torch.testing.assert_close(ref_delta(mod), peft_layer.get_delta_weight("default"), rtol=1e-6, atol=1e-6)
        by_slot.setdefault(layer.original, [None] * 3)[layer.slot] = mod
    assert set(by_slot) == {o for o in layout if o.endswith("qkv")}  # attn2 (dual attention) too
    for original, mods in by_slot.items():
        fused = fuse_rows(mods, [t.stop - t.start for t in layout[original]], form_name("kohya", "transformer", original))
        assert names.match(fused.name).targets == layout[original]
        torch.testing.assert_close(ref_delta(fused), torch.cat([ref_delta(m) for m in mods]), rtol=1e-5, atol=1e-6)
