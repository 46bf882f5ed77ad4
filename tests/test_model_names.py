"""sd_loha.model_names: the one matcher of a file's module names to a pipeline's layers (apply_loha, convert and
the PEFT export all go through ModelLayers.match), and its refusal of weights sd-loha cannot merge into."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sd_loha import apply_loha
from sd_loha.convert import loha_to_lora
from sd_loha.model_names import ModelLayers, UnsupportedWeightError, weight_problem
from sd_loha.naming import kohya_name, text_encoder_canonical_path, unet_ldm_path

from .loader_helpers import make_loha_file, quantize_unet_linears


@pytest.fixture(scope="module")
def sd1(tiny_pipe_module):
    return tiny_pipe_module("tiny-sd1")


@pytest.fixture(scope="module")
def sdxl(tiny_pipe_module):
    return tiny_pipe_module("tiny-sdxl")


@pytest.fixture(scope="module")
def tiny_pipe_module():
    from sd_loha.models import build_tiny_pipeline

    return build_tiny_pipeline


def _linears_and_convs(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_every_unet_layer_matches_by_each_name_files_use(sd1, sdxl):
    for pipe in (sd1, sdxl):
        layers = ModelLayers(pipe)
        for path in _linears_and_convs(pipe.unet):
            names = [kohya_name("lora_unet", path), kohya_name("lycoris", path)]
            ldm = unet_ldm_path(path, pipe.unet.config)
            if ldm is not None:  # LDM names (kohya's SDXL files, A1111)
                names += [kohya_name("lora_unet", ldm), kohya_name("lycoris", ldm)]
            for name in names:
                match = layers.match(name)
                assert match is not None, name
                assert (match.part, match.path) == ("unet", path) and match.module is pipe.unet.get_submodule(path)


def test_text_encoder_layers_match_with_and_without_text_model(sd1, sdxl):
    for pipe, parts in ((sd1, {"te": sd1.text_encoder}), (sdxl, {"te1": sdxl.text_encoder, "te2": sdxl.text_encoder_2})):
        layers = ModelLayers(pipe)
        for part, model in parts.items():
            linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
            assert linears
            for path in linears:
                canonical = text_encoder_canonical_path(path)
                short = canonical.removeprefix("text_model.")
                for name in (kohya_name(f"lora_{part}", canonical), kohya_name(f"lora_{part}", short)):
                    match = layers.match(name)
                    assert match is not None and (match.part, match.path) == (part, path), name
        # LyCORIS's generic prefix names no model: not a UNet layer, so the first text encoder is tried next
        part, model = next(iter(parts.items()))
        path = next(p for p, m in model.named_modules() if isinstance(m, nn.Linear))
        lyco = layers.match(kohya_name("lycoris", text_encoder_canonical_path(path)))
        assert lyco is not None and (lyco.part, lyco.path) == (part, path)


def test_what_does_not_match(sd1, sdxl):
    sd1_layers, sdxl_layers = ModelLayers(sd1), ModelLayers(sdxl)
    te_path = next(p for p, m in sd1.text_encoder.named_modules() if isinstance(m, nn.Linear))
    assert sd1_layers.match(kohya_name("lora_te1", text_encoder_canonical_path(te_path))) is None  # SDXL's part
    assert sdxl_layers.match(kohya_name("lora_te", text_encoder_canonical_path(te_path))) is None  # SD 1's part
    assert sd1_layers.match("lora_unet_down_blocks_9_resnets_0_conv1") is None
    assert sd1_layers.match("lora_unet_conv_norm_out") is None  # a GroupNorm: not an adaptable layer
    assert sd1_layers.match("something_else") is None


def test_the_tables_name_the_layers_of_the_pipeline_given(sd1):
    from sd_loha.models import build_tiny_pipeline

    other = build_tiny_pipeline("tiny-sd1")
    name = kohya_name("lora_unet", _linears_and_convs(sd1.unet)[0])
    assert ModelLayers(sd1).match(name).module is not ModelLayers(other).match(name).module


# ------------------------------------------------------------------------------------ weights it cannot merge into


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _bypassed_state(pipe, report) -> dict[str, torch.Tensor]:
    """The stored tensors of the layers the report says took the bypass path."""
    out = {}
    for (part, path), how in report.paths.items():
        if how == "bypass":
            module = pipe.unet.get_submodule(path) if part == "unet" else pipe.text_encoder.get_submodule(path)
            out.update({f"{path}.{k}": v.detach().clone() for k, v in module.state_dict().items()
                        if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.parametrize("bits,cls,kind,stored", [(4, "Linear4bit", "4-bit quantized", torch.uint8),
                                                    (8, "Linear8bitLt", "8-bit (LLM.int8) quantized", torch.int8)])
def test_bitsandbytes_layers_load_through_bypass_and_stay_as_stored(tmp_path, tiny_pipe, bits, cls, kind, stored):
    """A bitsandbytes UNet takes the adapter in the forward (bypass, tests/test_bypass.py checks the values); its
    quantized tensors are never written; convert, which needs the weights themselves, still refuses by name."""
    pytest.importorskip("bitsandbytes")  # an optional dependency of the quantized pipelines, not of sd-loha
    pipe = tiny_pipe("tiny-sd1")
    path = tmp_path / "a.safetensors"
    make_loha_file(pipe, path)
    n = quantize_unet_linears(pipe.unet, bits)
    q = next(m for m in pipe.unet.modules() if type(m).__name__ == cls)
    assert q.weight.dtype == stored  # really quantized, not a float weight in a bitsandbytes class
    before = _state(pipe.unet)
    report = apply_loha(pipe, path)
    quantized = [k for k in report.paths if k[0] == "unet" and type(pipe.unet.get_submodule(k[1])).__name__ == cls]
    assert 0 < len(quantized) <= n
    assert report.bypass_reasons == {f"bitsandbytes {cls} ({kind})": len(quantized)}
    assert f"{len(quantized)} through bypass (bitsandbytes {cls}" in str(report)
    bypassed = _bypassed_state(pipe, report)
    assert len(bypassed) >= len(quantized) and all(torch.equal(before[k], v) for k, v in bypassed.items())
    with pytest.raises(UnsupportedWeightError, match=f"bitsandbytes {cls}"):
        loha_to_lora(path, rank=2, model=pipe)


class _PackedWeight(torch.Tensor):
    """A quantized tensor type sd-loha knows nothing about: no dequantize()."""


def test_dora_on_an_unreadable_quantized_weight_is_refused_before_anything_changes(tmp_path, tiny_pipe):
    """What still cannot work: DoRA needs the weight's norm, and a quantized tensor type without dequantize()
    cannot be read; refused by name, nothing changed (merged layers included), no hook left. Without DoRA the
    same layer takes the bypass."""
    pipe = tiny_pipe("tiny-sd1")
    dora, plain = tmp_path / "dora.safetensors", tmp_path / "plain.safetensors"
    make_loha_file(pipe, dora, dora_wd=True)
    make_loha_file(pipe, plain)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    data = layer.weight.detach().clone()
    del layer.weight
    layer.weight = torch.Tensor._make_subclass(_PackedWeight, data)
    assert weight_problem(layer) == "stores its weight as _PackedWeight (a quantized tensor type)"
    before = _state(pipe.unet), _state(pipe.text_encoder)
    with pytest.raises(UnsupportedWeightError, match=r"UNet layer \S+to_q stores its weight as _PackedWeight, "
                                                     r"which has no dequantize\(\) \(its DoRA needs the weight's norm\)"):
        apply_loha(pipe, dora)
    after = _state(pipe.unet), _state(pipe.text_encoder)
    for b, a in zip(before, after):
        assert b.keys() == a.keys() and all(torch.equal(b[k], a[k]) for k in b)
    assert not any(m._forward_hooks for m in pipe.unet.modules())
    report = apply_loha(pipe, plain)
    assert report.bypass_reasons == {"_PackedWeight (a quantized tensor type)": 1}


def test_float8_layerwise_casting_loads_through_bypass(tmp_path, tiny_pipe):
    pipe = tiny_pipe("tiny-sd1")
    path = tmp_path / "a.safetensors"
    make_loha_file(pipe, path)
    if not hasattr(pipe.unet, "enable_layerwise_casting"):
        pytest.skip("this diffusers has no enable_layerwise_casting (added in 0.33)")
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    before = _state(pipe.unet)
    report = apply_loha(pipe, path)
    n = report.bypass_reasons["float8_e4m3fn"]
    assert n > 0 and set(report.bypass_reasons) == {"float8_e4m3fn"} and f"{n} through bypass" in str(report)
    bypassed = _bypassed_state(pipe, report)
    assert all(v.dtype == torch.float8_e4m3fn for k, v in bypassed.items() if k.endswith(".weight"))
    assert all(torch.equal(before[k].float(), v.float()) for k, v in bypassed.items())
    with torch.no_grad():  # and it runs: the hook adds in the compute dtype next to diffusers' own casting hook
        pipe.unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 7, pipe.unet.config.cross_attention_dim))


def test_weight_problem_of_plain_and_other_layers():
    assert weight_problem(nn.Linear(4, 4)) is None
    assert weight_problem(nn.Linear(4, 4).half()) is None and weight_problem(nn.Conv2d(2, 2, 3).bfloat16()) is None
    int8 = nn.Linear(4, 4)
    int8.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    assert weight_problem(int8) == "stores its weight as int8"
    assert "without a weight tensor" in weight_problem(nn.Identity())


def test_files_for_the_pipeline_still_match_every_module(tmp_path, sd1):
    path = tmp_path / "a.safetensors"
    make_loha_file(sd1, path)
    layers = ModelLayers(sd1)
    names = {k.split(".")[0] for k in load_file(path)}
    assert all(layers.match(n) is not None for n in names)
