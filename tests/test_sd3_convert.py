"""An SD3 file through every form and back: each layer of a small SD3.5-Medium-style pipeline (dual attention,
qk-norm, pre-only last block, CLIP-L/G and T5) gets the change LyCORIS's functional LoHA/LoCon and weight
decomposition give for the original kohya file, with diffusers' swap_scale_shift for the swapped halves."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from diffusers.loaders.single_file_utils import swap_scale_shift
from lycoris.functional.general import weight_decompose
from torch import nn

from sd_loha.architectures import build_model
from sd_loha.formats import load_adapter
from sd_loha.io import AdapterFileError
from sd_loha.sd3_convert import resolve, to_form
from sd_loha.sd3_names import FORMS, SD3Names, Target, form_name
from sd_loha.sd3_ops import dense_deltas
from tests.test_sd3_names import SMALL
from tests.test_sd3_ops import ref_delta

TINY_CLIP = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=8, projection_dim=8, vocab_size=40)
TINY_T5 = dict(vocab_size=40, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu")


@cache
def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"transformer": build_model("SD3Transformer2DModel", SMALL),
            "te1": build_model("CLIPTextModelWithProjection", TINY_CLIP),
            "te2": build_model("CLIPTextModelWithProjection", TINY_CLIP),
            "te3": build_model("T5EncoderModel", TINY_T5)}


def _kohya_file(*, dora_in_fused: bool = False) -> dict[str, torch.Tensor]:
    """A kohya-form file on every layer: LoHA (rank 2, alpha 1) on the transformer, LoRA on the text encoders,
    an output-row DoRA on a fused qkv and input-column ones on a swapped layer and an MLP."""
    g = torch.Generator().manual_seed(1)
    names = SD3Names(_models())
    sd: dict[str, torch.Tensor] = {}
    for original, targets in names.layout.items():
        model = _models()["transformer"]
        w = model.get_submodule(targets[0].path).weight
        out, inn = targets[-1].stop, w[0].numel()
        n = form_name("kohya", "transformer", original)
        for f in ("hada_w1_a", "hada_w2_a"):
            sd[f"{n}.{f}"] = torch.randn(out, 2, generator=g)
        for f in ("hada_w1_b", "hada_w2_b"):
            sd[f"{n}.{f}"] = torch.randn(2, inn, generator=g)
        sd[f"{n}.alpha"] = torch.tensor(1.0)
        if original == "joint_blocks.1.x_block.attn.qkv":
            sd[f"{n}.dora_scale"] = torch.rand(out, 1, generator=g) + 0.5
        if original in ("final_layer.adaLN_modulation.1", "joint_blocks.0.x_block.mlp.fc1") or (
                dora_in_fused and original == "joint_blocks.0.context_block.attn.qkv"):
            sd[f"{n}.dora_scale"] = torch.rand(1, inn, generator=g) + 0.5
    for part in ("te1", "te2", "te3"):
        for path, module in _models()[part].named_modules():
            if isinstance(module, nn.Linear) and ".0." in path:  # the first layer of each encoder
                file_path = path if part == "te3" else path if path.startswith("text_model.") else "text_model." + path
                n = form_name("kohya", part, file_path)
                sd[f"{n}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=g)
                sd[f"{n}.lora_down.weight"] = torch.randn(2, module.in_features, generator=g)
                sd[f"{n}.alpha"] = torch.tensor(4.0)
    return sd


def _reference_changes(sd: dict[str, torch.Tensor], names: SD3Names | None = None
                       ) -> dict[tuple[str, str], torch.Tensor]:
    """(part, model path) -> the change the kohya file makes to `names`' models (default: this module's small
    ones), by LyCORIS's math and diffusers' swap."""
    parsed = load_adapter(sd)
    names = names or SD3Names(_models())
    changes = {}
    for layer, mod in resolve(parsed, names).values():
        model = names.models[layer.part]
        weights = [model.get_submodule(t.path).weight.detach() for t in layer.targets]
        file_w = torch.cat([swap_scale_shift(w, dim=None) if t.swap_halves else w
                            for w, t in zip(weights, layer.targets)])
        delta = ref_delta(mod).reshape(file_w.shape)
        if mod.dora_scale is not None:
            on_out = mod.dora_scale.shape[0] != 1
            delta = weight_decompose(file_w + delta, mod.dora_scale, wd_on_out=on_out, backend="torch") - file_w
        for t in layer.targets:
            rows = delta[t.start:t.stop]
            changes[(layer.part, t.path)] = swap_scale_shift(rows, dim=None) if t.swap_halves else rows
    return changes


def _changes(sd: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    parsed = load_adapter(sd)
    changes = {}
    for layer, mod in resolve(parsed, SD3Names(_models())).values():
        model = _models()[layer.part]
        weights = [model.get_submodule(t.path).weight for t in layer.targets]
        for t, d in zip(layer.targets, dense_deltas(mod, layer.targets, weights)):
            assert (layer.part, t.path) not in changes
            changes[(layer.part, t.path)] = d.reshape(model.get_submodule(t.path).weight.shape)
    return changes


def _transformer_only(sd):
    return {k: v for k, v in sd.items() if not k.startswith("lora_te")}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_form_gives_every_layer_the_reference_change_and_back(form):
    source = _kohya_file()
    if set(FORMS[form].prefixes) == {"transformer"}:
        source = _transformer_only(source)
    expected = _reference_changes(source)
    written = to_form(load_adapter(source), SD3Names(_models()), form)
    got = _changes(written)
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    back = to_form(load_adapter(written), SD3Names(_models()), "kohya")
    assert {k.split(".")[0] for k in back} == {k.split(".")[0] for k in source}
    for key, value in _changes(back).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5)


def test_split_forms_refuse_an_input_column_dora_on_a_fused_qkv():
    parsed = load_adapter(_kohya_file(dora_in_fused=True))
    with pytest.raises(AdapterFileError, match="per-input-column dora_scale.*keep the fused form"):
        to_form(parsed, SD3Names(_models()), "simpletuner")
    assert to_form(parsed, SD3Names(_models()), "comfy")  # fused forms hold it


def test_form_without_text_encoder_names_refuses():
    with pytest.raises(AdapterFileError, match="original form .* no names for the te1, te2, te3"):
        to_form(load_adapter(_kohya_file()), SD3Names(_models()), "original")


def test_split_modules_and_fused_module_on_one_layer_refused():
    sd = _transformer_only(_kohya_file())
    split = to_form(load_adapter(sd), SD3Names(_models()), "simpletuner")
    both = {**sd, **{k: v for k, v in split.items() if k.startswith("lycoris_transformer_blocks_0_attn_to_q.")}}
    with pytest.raises(AdapterFileError, match="adapted twice"):
        to_form(load_adapter(both), SD3Names(_models()), "simpletuner")


def test_convert_to_peft_names_a_real_size_sd3_file_by_its_architecture(tmp_path):
    """convert --to peft without a model: an SD3.5 Medium file (its dual attention says which) is split onto the
    real architecture's diffusers layers (meta device, nothing downloaded)."""
    import json

    from sd_loha.io import save_safetensors_atomic
    from sd_loha.peft_format import convert_to_peft

    g = torch.Generator().manual_seed(0)
    name = "lora_unet_joint_blocks_3_x_block_attn2_qkv"
    sd = {f"{name}.hada_w1_a": torch.randn(3 * 1536, 2, generator=g), f"{name}.hada_w2_a": torch.randn(3 * 1536, 2, generator=g),
          f"{name}.hada_w1_b": torch.randn(2, 1536, generator=g), f"{name}.hada_w2_b": torch.randn(2, 1536, generator=g),
          f"{name}.alpha": torch.tensor(1.0)}
    path = save_safetensors_atomic(sd, tmp_path / "sd35m.safetensors")
    written = convert_to_peft(path, tmp_path / "out")
    config = json.loads((written["transformer"] / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == [f"transformer_blocks.3.attn2.to_{x}" for x in "kqv"]
    assert config["r"] == 2 and config["alpha"] == 1.0


def test_model_layers_gives_each_pipeline_layer_its_own_module_or_the_coupled_one():
    """What the loader needs: per pipeline layer, a module whose change is the reference change (split, swapped),
    or for an input-column DoRA over a fused qkv the coupled module whose dense deltas are."""
    from sd_loha.sd3_convert import Coupled, model_layers

    sd = _kohya_file(dora_in_fused=True)
    expected = _reference_changes(sd)
    layers = model_layers(load_adapter(sd), SD3Names(_models()))
    assert set(layers) == set(expected)
    coupled = {id(v): v for v in layers.values() if isinstance(v, Coupled)}
    assert [c.module.name for c in coupled.values()] == ["lora_unet_joint_blocks_0_context_block_attn_qkv"]
    for (part, path), got in layers.items():
        model = _models()[part]
        if isinstance(got, Coupled):
            weights = [model.get_submodule(t.path).weight for t in got.targets]
            i = [t.path for t in got.targets].index(path)
            change = dense_deltas(got.module, got.targets, weights)[i]
        else:
            w = model.get_submodule(path).weight
            (change,) = dense_deltas(got, [Target(path, 0, w.shape[0])], [w])
        torch.testing.assert_close(change.reshape(expected[(part, path)].shape), expected[(part, path)],
                                   rtol=1e-4, atol=1e-5)
