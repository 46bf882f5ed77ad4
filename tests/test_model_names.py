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

from .loader_helpers import make_loha_file


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


def _quantize_unet_linears(unet: nn.Module, bits: int) -> int:
    """Replace every Linear of `unet` by a bitsandbytes Linear4bit (NF4) or Linear8bitLt (LLM.int8), quantized on
    the CPU, as diffusers' BitsAndBytesConfig does on a GPU."""
    import bitsandbytes as bnb

    n = 0
    for path, module in list(unet.named_modules()):
        if type(module) is not nn.Linear:
            continue
        data = module.weight.data.clone()
        if bits == 4:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                    has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        parent, _, attr = path.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, attr, q.to("cpu"))  # .to() quantizes
        n += 1
    return n


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("bits,cls,kind,stored", [(4, "Linear4bit", "4-bit quantized", torch.uint8),
                                                    (8, "Linear8bitLt", "8-bit (LLM.int8) quantized", torch.int8)])
def test_bitsandbytes_layers_are_named_and_nothing_changes(tmp_path, tiny_pipe, bits, cls, kind, stored):
    pytest.importorskip("bitsandbytes")  # an optional dependency of the quantized pipelines, not of sd-loha
    pipe = tiny_pipe("tiny-sd1")
    path = tmp_path / "a.safetensors"
    make_loha_file(pipe, path)
    assert _quantize_unet_linears(pipe.unet, bits) > 0
    q = next(m for m in pipe.unet.modules() if type(m).__name__ == cls)
    assert q.weight.dtype == stored  # really quantized, not a float weight in a bitsandbytes class
    before = _state(pipe.unet), _state(pipe.text_encoder)
    with pytest.raises(UnsupportedWeightError) as err:
        apply_loha(pipe, path)
    text = str(err.value)
    assert f"bitsandbytes {cls} ({kind})" in text and "UNet layer " in text
    assert "without quantization" in text and "made for" not in text
    after = _state(pipe.unet), _state(pipe.text_encoder)
    for b, a in zip(before, after):
        assert b.keys() == a.keys() and all(torch.equal(b[k], a[k]) for k in b)
    with pytest.raises(UnsupportedWeightError, match=f"bitsandbytes {cls}"):
        loha_to_lora(path, rank=2, model=pipe)


def test_float8_layerwise_casting_is_named(tmp_path, tiny_pipe):
    pipe = tiny_pipe("tiny-sd1")
    path = tmp_path / "a.safetensors"
    make_loha_file(pipe, path)
    if not hasattr(pipe.unet, "enable_layerwise_casting"):
        pytest.skip("this diffusers has no enable_layerwise_casting (added in 0.33)")
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    before = _state(pipe.unet)
    with pytest.raises(UnsupportedWeightError, match=r"UNet layer \S+ stores its weight as float8_e4m3fn.*"
                                                     r"enable_layerwise_casting"):
        apply_loha(pipe, path)
    after = _state(pipe.unet)
    assert all(torch.equal(before[k].float(), after[k].float()) for k in before)


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
