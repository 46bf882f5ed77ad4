"""SD3 / SD3.5 names: the original <-> diffusers layout against diffusers' own checkpoint converter, every layer of
the real SD3 Medium, SD3.5 Medium and SD3.5 Large (meta device) through every file form, and which SD3 a file
is for."""

from __future__ import annotations

import re
from functools import cache

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from torch import nn

from sd_loha.architectures import SD3_ARCHITECTURES, build_model, meta_pipeline
from sd_loha.formats import load_adapter
from sd_loha.naming import SD3_PARTS, text_encoder_canonical_path
from sd_loha.model_names import file_architecture
from sd_loha.sd3_names import (
    FORMS, SD3Names, Target, architecture_names, flat, form_name, is_sd3_state_dict, original_layout, original_of,
    sd3_file_architecture, sd3_file_evidence, split_param, transformer_problem,
)

LABELS = sorted(SD3_ARCHITECTURES)
# diffusers' qk-norm names -> the original's: not adaptable, but the converter needs them.
_NORMS = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
          "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
          "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
SMALL = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
             pos_embed_max_size=8, dual_attention_layers=(0, 1), qk_norm="rms_norm")


@cache
def _pipe(label: str):
    return meta_pipeline(label)


def _names(label: str) -> SD3Names:
    return architecture_names(label)


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def _original_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the original layout, built with sd-loha's layout (the thing under test)."""
    sd = model.state_dict()
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    for original, targets in original_layout(model).items():
        for p in ("weight", "bias"):
            pieces = [_swap(sd[f"{t.path}.{p}"]) if t.swap_halves else sd[f"{t.path}.{p}"] for t in targets]
            out[f"{original}.{p}"] = torch.cat(pieces)
    for key, value in sd.items():
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(attn2?\.norm_\w+)\.weight", key)
        if m:
            out[f"joint_blocks.{m.group(1)}.{_NORMS[m.group(2)]}.weight"] = value
    return out


def test_layout_is_diffusers_converter_inverse_for_every_tensor():
    """diffusers' convert_sd3_transformer_checkpoint_to_diffusers, fed the original layout sd-loha builds
    (fused q|k|v rows, (shift, scale) halves), gives back every tensor of a random SD3.5-Medium-style model
    (dual attention, qk-norm, pre-only last block): each fused row block and each swapped half lands on the
    diffusers layer sd-loha says."""
    torch.manual_seed(0)
    model = build_model("SD3Transformer2DModel", SMALL)
    expected = model.state_dict()
    converted = convert_sd3_transformer_checkpoint_to_diffusers(_original_state_dict(model))
    assert set(converted) == set(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
    # The swap is real: the rows the converter moves differ from an unswapped copy.
    assert not torch.equal(expected["norm_out.linear.weight"], _swap(expected["norm_out.linear.weight"]))


@pytest.mark.parametrize("label", LABELS)
def test_real_layout_against_converter_keys_and_shapes(label):
    """For the real sizes (meta device: names and shapes), the converter maps sd-loha's original layout onto
    exactly the transformer's own keys and shapes, and every Linear/Conv2d is in exactly one original layer."""
    model = _pipe(label).transformer
    converted = convert_sd3_transformer_checkpoint_to_diffusers(_original_state_dict(model))
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    layers = {p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    covered = [t.path for targets in original_layout(model).values() for t in targets]
    assert sorted(covered) == sorted(layers)


@pytest.mark.parametrize("label", LABELS)
def test_fused_rows_are_comfyui_offsets(label):
    """ComfyUI (comfy/utils.py mmdit_to_diffusers) patches q, k, v at rows offset = depth x 64 apart; the real
    models' widths are 64 x depth, so sd-loha's row ranges are ComfyUI's."""
    model = _pipe(label).transformer
    depth = model.config.num_layers
    for original, targets in original_layout(model).items():
        if original.endswith("qkv"):
            assert [(t.start, t.stop) for t in targets] == [(i * 64 * depth, (i + 1) * 64 * depth) for i in range(3)]


@pytest.mark.parametrize("label", LABELS)
def test_every_layer_maps_both_ways_through_every_form(label):
    """Every adaptable layer of the transformer and the three text encoders has a name in every form that has its
    part, the name matches back to it (rows and swap for the original layout), and nothing else is named."""
    pipe, names = _pipe(label), _names(label)
    model = pipe.transformer
    layout = original_layout(model)
    num_layers = model.config.num_layers
    seen = set()
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        original, slot, swap = original_of(path, num_layers)
        for form in FORMS.values():
            key = original if form.layout == "original" else path
            name = form_name(form.name, "transformer", key)
            layer = names.match(name)
            assert layer is not None and layer.part == "transformer", name
            seen.add(flat(name))
            if form.layout == "diffusers":
                assert [t.path for t in layer.targets] == [path] and layer.original == original
                assert layer.slot == slot and not layer.targets[0].swap_halves
            else:
                (target,) = [t for t in layer.targets if t.path == path]
                assert target.stop - target.start == module.weight.shape[0] and target.swap_halves == swap
                assert layer.targets == layout[original]
    for part in SD3_PARTS[1:]:
        encoder = getattr(pipe, part.pipeline_attr)
        for path, module in encoder.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            file_path = path if part.name == "te3" else text_encoder_canonical_path(path)
            for form in FORMS.values():
                if part.name not in form.prefixes:
                    continue
                name = form_name(form.name, part.name, file_path)
                layer = names.match(name)
                assert layer is not None and layer.part == part.name and layer.targets[0].path == path, name
                seen.add(flat(name))
    # The only other names are the CLIPs' without text_model_.
    short_clip = re.compile(r"^(lora_te[12]_|text_encoder(_2)?_|text_encoders_clip_[lg]_transformer_)(?!text_model)")
    assert [n for n in names.table if n not in seen and not short_clip.search(n)] == []


def test_swapped_layers_are_the_two_adaln_projections():
    names = _names("SD3.5 Large")
    swapped = sorted({t.path for layer in names.table.values() for t in layer.targets if t.swap_halves})
    assert swapped == ["norm_out.linear", "transformer_blocks.37.norm1_context.linear"]


def test_prefixes_of_each_form():
    """The spellings the projects' code uses (kohya networks/lora_sd3.py, ComfyUI comfy/lora.py,
    OneTrainer StableDiffusion3Model / LoRASaverMixin, diffusers' SD3 LoRA loader)."""
    qkv = "joint_blocks.0.x_block.attn.qkv"
    assert form_name("kohya", "transformer", qkv) == "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert form_name("kohya", "te3", "encoder.block.0.layer.0.SelfAttention.q") == \
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    assert form_name("comfy", "transformer", qkv) == "diffusion_model.joint_blocks.0.x_block.attn.qkv"
    assert form_name("comfy", "te2", "text_model.encoder.layers.0.mlp.fc1") == \
        "text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1"
    assert form_name("simpletuner", "transformer", "transformer_blocks.0.attn.to_q") == "lycoris_transformer_blocks_0_attn_to_q"
    assert form_name("legacy", "transformer", "transformer_blocks.0.attn.to_q") == "lora_transformer_transformer_blocks_0_attn_to_q"
    assert form_name("diffusers", "transformer", "transformer_blocks.0.attn.to_q") == "transformer.transformer_blocks.0.attn.to_q"
    assert split_param("transformer.transformer_blocks.0.attn.to_q.lora_A.weight") == \
        ("transformer.transformer_blocks.0.attn.to_q", "lora_down.weight")
    assert split_param("joint_blocks.0.x_block.attn.qkv.hada_w1_a") == ("joint_blocks.0.x_block.attn.qkv", "hada_w1_a")


def _file(label: str, originals: list[str], rank: int = 1, form: str = "kohya", **meta) -> dict[str, torch.Tensor]:
    """A LoHA file with real shapes (rank 1) on original-layout layers of a real architecture, in `form`."""
    layout = original_layout(_pipe(label).transformer)
    model = _pipe(label).transformer
    sd = {}
    for original in originals:
        rows = layout[original][-1].stop
        inn = model.get_submodule(layout[original][0].path).weight[0].numel()
        name = form_name(form, "transformer", original)
        sd.update({f"{name}.hada_w1_a": torch.ones(rows, rank), f"{name}.hada_w2_a": torch.ones(rows, rank),
                   f"{name}.hada_w1_b": torch.ones(rank, inn), f"{name}.hada_w2_b": torch.ones(rank, inn)})
    return sd


@pytest.mark.parametrize("label,originals", [
    ("SD3 Medium", ["joint_blocks.0.x_block.adaLN_modulation.1", "joint_blocks.5.x_block.attn.qkv"]),
    ("SD3.5 Medium", ["joint_blocks.2.x_block.attn2.qkv", "joint_blocks.5.context_block.mlp.fc2"]),
    ("SD3.5 Medium", ["joint_blocks.3.x_block.adaLN_modulation.1"]),
    ("SD3.5 Large", ["joint_blocks.0.x_block.attn.qkv"]),
    ("SD3.5 Large", ["joint_blocks.37.context_block.adaLN_modulation.1", "final_layer.linear"]),
])
def test_file_architecture_from_names_and_shapes(label, originals):
    parsed = load_adapter(_file(label, originals))
    assert sd3_file_architecture(parsed) == label
    assert file_architecture(parsed) == label
    for other, arch in SD3_ARCHITECTURES.items():
        problem = transformer_problem(sd3_file_evidence(parsed), arch.transformer)
        assert (problem is None) == (other == label), (other, problem)


def test_medium_file_without_telling_layers_names_both_unless_metadata_says():
    sd = _file("SD3 Medium", ["joint_blocks.4.x_block.attn.qkv", "joint_blocks.4.x_block.mlp.fc1"])
    assert sd3_file_architecture(load_adapter(sd)) == "SD3 Medium or SD3.5 Medium"
    parsed = load_adapter(sd)
    parsed.metadata["modelspec.architecture"] = "stable-diffusion-3-5-medium/lora"
    assert sd3_file_architecture(parsed) == "SD3.5 Medium"


def test_wrong_size_is_named():
    parsed = load_adapter(_file("SD3.5 Large", ["joint_blocks.0.x_block.attn.qkv"]))
    problem = transformer_problem(sd3_file_evidence(parsed), SD3_ARCHITECTURES["SD3.5 Medium"].transformer)
    assert "2432" in problem and "1536" in problem
    parsed = load_adapter(_file("SD3.5 Medium", ["joint_blocks.1.x_block.attn2.qkv"]))
    assert "attn2" in transformer_problem(sd3_file_evidence(parsed), SD3_ARCHITECTURES["SD3 Medium"].transformer)


def test_sd3_files_are_not_sdxl_and_sdxl_files_are_not_sd3():
    sd3 = _file("SD3 Medium", ["joint_blocks.0.context_block.attn.qkv"])
    sd3["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.ones(3072, 1)
    sd3["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.ones(1, 768)
    assert file_architecture(load_adapter(sd3)).startswith("SD3")
    sdxl = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(3072, 1),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(1, 768),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(640, 1),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(1, 2048)}
    assert not is_sd3_state_dict(sdxl)
    assert file_architecture(load_adapter(sdxl)) == "SDXL"
    sd1 = {"lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_a": torch.ones(320, 1)}
    assert not is_sd3_state_dict(sd1)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_form_reads_to_the_same_layers(form):
    """A file in each form, read through formats.load_adapter, names the same model layers."""
    label = "SD3.5 Medium"
    names = _names(label)
    layout = original_layout(_pipe(label).transformer)
    if FORMS[form].layout == "original":
        sd = _file(label, ["joint_blocks.2.x_block.attn2.qkv"], form=form)
        expected = layout["joint_blocks.2.x_block.attn2.qkv"]
    else:
        path = "transformer_blocks.2.attn2.to_k"
        n = form_name(form, "transformer", path)
        sd = {f"{n}.lora_A.weight" if FORMS[form].dotted else f"{n}.lora_down.weight": torch.ones(1, 1536),
              f"{n}.lora_B.weight" if FORMS[form].dotted else f"{n}.lora_up.weight": torch.ones(1536, 1)}
        expected = (Target(path, 0, 1536),)
    parsed = load_adapter(sd)
    (name,) = parsed.modules
    layer = names.match(name)
    assert layer is not None and layer.form in (form, "kohya") and layer.targets == expected
    assert sd3_file_architecture(parsed) in ("SD3.5 Medium", "SD3 Medium or SD3.5 Medium")


@pytest.mark.parametrize("form", sorted(FORMS))
def test_large_file_told_in_every_form(form):
    """The size shows in every form: SD3.5 Large's block 37 and width 2432, split or fused."""
    path = "transformer_blocks.37.attn.to_q"
    original = "joint_blocks.37.x_block.attn.qkv"
    key, rows = (original, 3 * 2432) if FORMS[form].layout == "original" else (path, 2432)
    n = form_name(form, "transformer", key)
    parsed = load_adapter({f"{n}.hada_w1_a": torch.ones(rows, 1), f"{n}.hada_w2_a": torch.ones(rows, 1),
                           f"{n}.hada_w1_b": torch.ones(1, 2432), f"{n}.hada_w2_b": torch.ones(1, 2432)})
    assert file_architecture(parsed) == "SD3.5 Large"
    problem = transformer_problem(sd3_file_evidence(parsed), SD3_ARCHITECTURES["SD3 Medium"].transformer)
    assert "2432" in problem and "1536" in problem
