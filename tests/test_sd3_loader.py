"""apply_loha / set_loha_strength / remove_loha on SD 3.x pipelines (tiny-sd3: SD3.5-Medium-style, dual attention,
qk-norm, pre-only last block, CLIP-L/G and T5): the same guarantees as on SD 1.x/XL.

The reference for each layer's change is independent of sd-loha's split: LyCORIS's functional LoHA/LoCon on the
file's fused (kohya / ComfyUI layout) module, its rows cut where diffusers' own converter cuts them, and the
(shift, scale) halves swapped back with diffusers' swap_scale_shift.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import nn

from sd_loha.formats import load_adapter
from sd_loha.io import AdapterFileError
from sd_loha.merge import ArchitectureMismatchError, apply_loha, list_loha, remove_loha, set_loha_strength
from sd_loha.models import load_pipeline
from sd_loha.sd3_convert import to_form
from sd_loha.sd3_names import FORMS, SD3Names, form_name

from .loader_helpers import assert_unchanged, changed, snapshot
from .test_sd3_convert import _reference_changes

TEXT_PARTS = ("te1", "te2", "te3")


def _pipe():
    return load_pipeline("tiny-sd3")


@cache
def _names() -> SD3Names:
    return SD3Names.from_pipeline(_pipe())


def _kohya_file(seed: int = 1, std: float = 0.05, lora_on: str = "joint_blocks.1.context_block.mlp.fc2"
                ) -> dict[str, torch.Tensor]:
    """Every transformer layer in the kohya form: LoHA (rank 2, alpha 1) on each original-layout layer (fused qkv,
    swapped adaLN halves and all), a LoRA on one (a LoHA + LoRA file), LoRA on the first layer of each text
    encoder."""
    g = torch.Generator().manual_seed(seed)
    names = _names()
    pipe_models = names.models
    sd: dict[str, torch.Tensor] = {}
    for original, targets in names.layout.items():
        w = pipe_models["transformer"].get_submodule(targets[0].path).weight
        out, inn = targets[-1].stop, w[0].numel()
        n = form_name("kohya", "transformer", original)
        if original == lora_on:
            sd[f"{n}.lora_up.weight"] = torch.randn(out, 3, generator=g) * std
            sd[f"{n}.lora_down.weight"] = torch.randn(3, inn, generator=g)
            sd[f"{n}.alpha"] = torch.tensor(3.0)
            continue
        for f in ("hada_w1_a", "hada_w2_a"):
            sd[f"{n}.{f}"] = torch.randn(out, 2, generator=g) * std ** 0.5
        for f in ("hada_w1_b", "hada_w2_b"):
            sd[f"{n}.{f}"] = torch.randn(2, inn, generator=g) * std ** 0.5
        sd[f"{n}.alpha"] = torch.tensor(1.0)
    for part in TEXT_PARTS:
        model = pipe_models[part]
        path, module = next((p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear) and ".0." in p)
        file_path = path if part == "te3" or path.startswith("text_model.") else "text_model." + path
        n = form_name("kohya", part, file_path)
        sd[f"{n}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=g) * std
        sd[f"{n}.lora_down.weight"] = torch.randn(2, module.in_features, generator=g)
        sd[f"{n}.alpha"] = torch.tensor(2.0)
    return sd


def _reference(sd: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """(part, model path) -> the fp32 change of the file at strength 1 (see the module docstring)."""
    return _reference_changes(sd, _names())


def _weights(pipe) -> dict[tuple[str, str], torch.Tensor]:
    models = {"transformer": pipe.transformer, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2,
              "te3": pipe.text_encoder_3}
    return {(part, path): m.weight.detach().clone() for part, model in models.items()
            for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def test_every_layer_gets_the_reference_change_at_its_strength_and_removal_is_bit_exact():
    pipe = _pipe()
    sd = _kohya_file()
    ref = _reference(sd)
    before, snap = _weights(pipe), snapshot(pipe)
    report = apply_loha(pipe, sd, unet_strength=0.7, text_encoder_strength=0.4, name="style", strict=True)
    assert report.file_architecture.startswith("SD3")  # tiny-sd3 is no released size
    after = _weights(pipe)
    touched = {k for k in after if not torch.equal(after[k], before[k])}
    assert touched == set(ref)  # every adapted layer, nothing else
    assert sum(k[0] == "transformer" for k in ref) > 30 and {k[0] for k in ref} == {"transformer", *TEXT_PARTS}
    for key, change in ref.items():
        s = 0.7 if key[0] == "transformer" else 0.4
        torch.testing.assert_close(after[key] - before[key], s * change, rtol=1e-5, atol=1e-6)
    assert report.patched["transformer"] == sum(k[0] == "transformer" for k in ref)
    set_loha_strength(pipe, "style", 0.25)  # recomputed from the originals, both parts
    again = _weights(pipe)
    for key, change in ref.items():
        torch.testing.assert_close(again[key] - before[key], 0.25 * change, rtol=1e-5, atol=1e-6)
    remove_loha(pipe, "style")
    assert_unchanged(pipe, snap)


@pytest.mark.parametrize("form", sorted(f for f in FORMS if f != "kohya"))
def test_every_file_form_merges_to_the_same_weights(form):
    sd = _kohya_file(seed=2)
    if any(p not in FORMS[form].prefixes for p in TEXT_PARTS):  # a form for the transformer alone
        sd = {k: v for k, v in sd.items() if k.startswith("lora_unet")}
    other = to_form(load_adapter(sd), _names(), form)
    a, b = _pipe(), _pipe()
    apply_loha(a, sd, strict=True)
    apply_loha(b, other, strict=True)
    wa, wb = _weights(a), _weights(b)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{form} {key}: {m}")


def test_bypass_gives_the_merged_outputs_and_never_writes_a_weight():
    sd = _kohya_file(seed=3)
    merged, bypassed = _pipe(), _pipe()
    apply_loha(merged, sd, 0.8)
    snap = snapshot(bypassed)
    report = apply_loha(bypassed, sd, 0.8, merge=False)
    assert set(report.paths.values()) == {"bypass"}
    assert_unchanged(bypassed, snap)
    torch.manual_seed(0)
    x = torch.randn(1, bypassed.transformer.config.in_channels, 16, 16)
    ctx = torch.randn(1, 10, bypassed.transformer.config.joint_attention_dim)
    pooled = torch.randn(1, bypassed.transformer.config.pooled_projection_dim)
    t = torch.tensor([500.0])
    with torch.no_grad():
        out_m = merged.transformer(x, ctx, pooled, t).sample
        out_b = bypassed.transformer(x, ctx, pooled, t).sample
        base = _pipe().transformer(x, ctx, pooled, t).sample
    assert (out_m - base).abs().max() > 1e-3
    torch.testing.assert_close(out_b, out_m, rtol=1e-4, atol=1e-5)
    set_loha_strength(bypassed, list(list_loha(bypassed))[0], 0.0)
    with torch.no_grad():
        assert torch.equal(bypassed.transformer(x, ctx, pooled, t).sample, base)
    remove_loha(bypassed)
    assert_unchanged(bypassed, snap)


def test_fp8_stored_transformer_takes_the_bypass():
    pipe = _pipe()
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    snap = snapshot(pipe)
    fp8 = {f"transformer:{n}" for n, t in pipe.transformer.named_parameters() if t.dtype == torch.float8_e4m3fn}
    report = apply_loha(pipe, _kohya_file(seed=4))
    bypassed = {f"transformer:{k[1]}.weight" for k, path in report.paths.items() if path == "bypass"}
    assert len(bypassed) >= 30 and bypassed <= fp8
    # the fp8-stored weights are never written; layers the casting skips (norms, pos_embed) and the text encoders merge
    assert not set(changed(pipe, snap)) & fp8
    assert report.paths[("te1", next(k[1] for k in report.paths if k[0] == "te1"))] == "merged"


def test_two_adapters_stack_and_come_off_in_any_order():
    pipe = _pipe()
    snap, before = snapshot(pipe), _weights(pipe)
    a, b = _kohya_file(seed=5), _kohya_file(seed=6)
    ra, rb = _reference(a), _reference(b)
    apply_loha(pipe, a, 0.5, name="a")
    apply_loha(pipe, b, 1.0, name="b")
    now = _weights(pipe)
    for key in ra:
        s = 1.0 if key[0] == "transformer" else 1.0
        torch.testing.assert_close(now[key] - before[key], 0.5 * ra[key] + s * rb[key], rtol=1e-5, atol=1e-6)
    remove_loha(pipe, "a")
    remove_loha(pipe, "b")
    assert_unchanged(pipe, snap)


def test_a_file_for_another_transformer_size_or_family_changes_nothing(tmp_path):
    pipe = _pipe()
    snap = snapshot(pipe)
    sd = _kohya_file()
    # one block more than tiny-sd3 has: a larger SD3 of the same width
    extra = {k.replace("joint_blocks_1_", "joint_blocks_7_"): v for k, v in sd.items() if "joint_blocks_1_" in k}
    with pytest.raises(ArchitectureMismatchError, match="[Nn]othing was changed"):
        apply_loha(pipe, {**sd, **extra})
    wide = {k: (torch.cat([v, v], dim=-1) if k.endswith(("hada_w1_b", "hada_w2_b", "lora_down.weight"))
                and "lora_unet" in k else v) for k, v in sd.items()}
    with pytest.raises(ArchitectureMismatchError):
        apply_loha(pipe, wide)
    assert_unchanged(pipe, snap)
    from .loader_helpers import make_loha_file

    make_loha_file(load_pipeline("tiny-sdxl"), tmp_path / "sdxl.safetensors")
    with pytest.raises(ArchitectureMismatchError, match="SDXL.*SD 3|SD 3.*SDXL"):
        apply_loha(pipe, tmp_path / "sdxl.safetensors")
    with pytest.raises(ArchitectureMismatchError, match="SD3"):
        apply_loha(load_pipeline("tiny-sdxl"), sd)
    assert_unchanged(pipe, snap)


def test_strict_and_block_weights_and_img2img():
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = _pipe()
    sd = _kohya_file(seed=7)
    with pytest.raises(ValueError, match="block weights"):
        apply_loha(pipe, sd, block_weights="INS")
    stray = {**sd, "lora_unet_not_a_layer.lora_up.weight": torch.zeros(4, 2),
             "lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 4)}
    with pytest.raises((AdapterFileError, ValueError)):
        apply_loha(pipe, stray, strict=True)
    assert not list_loha(pipe)
    report = apply_loha(pipe, stray)  # not strict: the rest loads, the stray is reported
    assert "lora_unet_not_a_layer" in report.unmatched
    remove_loha(pipe)
    i2i = StableDiffusion3Img2ImgPipeline(**pipe.components)
    snap = snapshot(i2i)
    apply_loha(i2i, sd)
    assert changed(i2i, snap)
    remove_loha(i2i)
    assert_unchanged(i2i, snap)
