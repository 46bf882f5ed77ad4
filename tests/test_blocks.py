"""Block weights (LoRA Block Weight's syntax): parsing and presets, which block each layer is in, and the merge:
each layer gets original + strength × block weight × ΔW, bit for bit, and removing restores the original.

The expected block ids are recomputed here by A1111's own rule for diffusers names (its
convert_diffusers_name_to_compvis, which LoRA Block Weight's BLOCKS list then reads): with 2 layers per level,
down_blocks.i.{resnets,attentions}.j is input_blocks.(1+3i+j), its downsampler input_blocks.(3+3i),
up_blocks.i.{resnets,attentions}.j is output_blocks.(3i+j), its upsampler output_blocks.(3i+2).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sd_loha import apply_loha, list_loha, remove_loha, set_loha_strength
from sd_loha.architectures import UNET_ARCHITECTURES, meta_pipeline
from sd_loha.blocks import (
    BLOCK_ID_FORMS,
    BLOCK_IDS,
    OUTSIDE_BLOCKS,
    PRESETS,
    STANDARD_UNET_CONFIGS,
    block_id_of_name,
    block_order,
    file_block,
    layer_block_id,
    parse_block_weights,
)
from sd_loha.cli import main
from sd_loha.formats import load_adapter
from sd_loha.generate import AdapterSpec, GenerationSession, lora_tag
from sd_loha.merge import loha_block_weights, merge_delta
from sd_loha.naming import kohya_name, text_encoder_canonical_path, unet_ldm_path

from .loader_helpers import all_models, assert_unchanged, make_loha_file, snapshot


def a1111_block(part: str, path: str) -> str | None:
    """A1111's block of a diffusers-named layer (2 layers per level), the way the module docstring says."""
    if part != "unet":
        return "BASE" if "encoder." in path else None
    if path == "conv_in":
        return "IN00"
    if path.startswith("mid_block."):
        return "M00"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.", path)
    if m is None:
        return None
    i, j = int(m.group(2)), int(m.group(4))
    if m.group(1) == "down":
        return f"IN{(3 + 3 * i) if m.group(3) == 'downsamplers' else (1 + 3 * i + j):02d}"
    return f"OUT{(3 * i + 2) if m.group(3) == 'upsamplers' else (3 * i + j):02d}"


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------
def test_forms_and_presets_are_lora_block_weights():
    assert len(BLOCK_IDS) == 26 and all(len(ids) == n for n, ids in BLOCK_ID_FORMS.items())
    assert BLOCK_ID_FORMS[17][1:8] == ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00")
    assert BLOCK_ID_FORMS[12] == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT0{i}" for i in range(6)))
    assert set(PRESETS) >= {"INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL", "NONE"}
    ins = parse_block_weights("INS")
    assert ins.text == "INS"
    assert [b for b in BLOCK_IDS if ins.by_id[b] == 1.0] == ["BASE", "IN01", "IN02", "IN04"]
    outs = parse_block_weights("outs")  # preset names are case-insensitive
    assert [b for b in BLOCK_IDS if outs.by_id[b]] == ["BASE", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]


def test_short_forms_leave_unnamed_blocks_at_zero():
    # LoRA Block Weight's to26(): blocks a form does not name get 0, e.g. conv_in and the downsamplers in 17.
    bw = parse_block_weights([1.0] * 17)
    assert {b for b in BLOCK_IDS if bw.by_id[b] == 0.0} == {"IN00", "IN03", "IN06", "IN09", "IN10", "IN11",
                                                           "OUT00", "OUT01", "OUT02"}
    bw12 = parse_block_weights(" 0.5, 1,2,3,4,5,6,7,8,9,10,11")
    assert bw12.by_id["BASE"] == 0.5 and bw12.by_id["OUT05"] == 11.0 and bw12.by_id["IN01"] == 0.0
    assert bw12.weight(None) == 1.0  # layers outside every block keep their strength


@pytest.mark.parametrize("spec, words", [("1,0,0", "3 weights"), ("INX", "'INX' is not a number"),
                                         ([float("nan")] * 17, "finite"), ("R," * 16 + "R", "'R' is not a number")])
def test_bad_block_weights_say_what_is_accepted(spec, words):
    with pytest.raises(ValueError, match="12, 17, 20 or 26") as e:
        parse_block_weights(spec)
    assert words in str(e.value) and "INS" in str(e.value)


# ------------------------------------------------------------------------------------------------
# which block a layer is in
# ------------------------------------------------------------------------------------------------
def test_layer_block_ids_follow_a1111(tiny_pipe):
    pipe = tiny_pipe("tiny-sd1")
    seen = set()
    for part, model in all_models(pipe).items():
        if part == "vae":
            continue
        for path, mod in model.named_modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                got = layer_block_id(part, path, pipe.unet.config)
                assert got == a1111_block(part, path), (part, path)
                seen.add(got)
    assert seen >= {"BASE", "IN00", "IN01", "IN03", "IN05", "M00", "OUT00", "OUT02", "OUT05", None}


@pytest.mark.parametrize("name, family, block", [
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k", "sd1", "IN02"),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", "sd1", "IN09"),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", "sd1", "OUT11"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "sd2", "OUT02"),
    ("lora_unet_mid_block_attentions_0_proj_in", "sd1", "M00"),
    ("lora_unet_conv_in", "sd1", "IN00"),
    ("lora_unet_time_embedding_linear_1", "sd1", None),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "sdxl", "IN04"),
    ("lora_unet_output_blocks_10_1_proj_in", "sd1", "OUT10"),
    ("lora_unet_middle_block_1_proj_out", "sdxl", "M00"),
    ("lora_unet_up_blocks_1_attentions_2_proj_out", "sdxl", "OUT05"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "sdxl", "BASE"),
    ("lora_te_text_model_encoder_layers_11_self_attn_q_proj", "sd1", "BASE"),
])
def test_block_of_a_file_module_name(name, family, block):
    assert block_id_of_name(name, STANDARD_UNET_CONFIGS[family]) == block


@pytest.mark.parametrize("label", sorted(UNET_ARCHITECTURES))
def test_file_blocks_are_the_block_weight_ids_of_the_real_layers(label):
    """Reports and charts (file_block, from a name alone) name every layer of a real architecture by the block id
    its block weight is taken from (layer_block_id, from the pipeline layer), in either naming style."""
    models = meta_pipeline(label)
    config = models.unet.config
    seen = set()
    for path, module in models.unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        expected = layer_block_id("unet", path, config) or OUTSIDE_BLOCKS
        ldm = unet_ldm_path(path, config)
        for name in [kohya_name("lora_unet", path)] + ([kohya_name("lora_unet", ldm)] if ldm else []):
            assert file_block(name, label) == expected, name
        seen.add(expected)
    if label == "SDXL":  # three levels: IN00-IN08, M00, OUT00-OUT08
        assert seen == {f"IN{i:02d}" for i in range(9)} | {"M00"} | {f"OUT{i:02d}" for i in range(9)} | {OUTSIDE_BLOCKS}
    else:  # four levels: every UNet block
        assert seen == set(BLOCK_IDS[1:]) | {OUTSIDE_BLOCKS}
    te_path = next(p for p, m in models.text_encoder.named_modules() if isinstance(m, torch.nn.Linear))
    assert file_block(kohya_name("lora_te", text_encoder_canonical_path(te_path)), label) == "BASE"
    assert sorted([OUTSIDE_BLOCKS, "OUT00", "BASE", "M00"], key=block_order) == ["BASE", "M00", "OUT00", OUTSIDE_BLOCKS]


# ------------------------------------------------------------------------------------------------
# the merge
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    from sd_loha.models import build_tiny_pipeline

    path = tmp_path_factory.mktemp("blocks") / "style.safetensors"
    rows = make_loha_file(build_tiny_pipeline("tiny-sd1"), path, seed=3, include=["conv_in", "conv_out"])
    return path, rows


@pytest.fixture
def sd1_pipe(tiny_pipe):
    """A fresh tiny-sd1 and its snapshot; afterwards every adapter is removed and every tensor must be back."""
    pipe = tiny_pipe("tiny-sd1")
    base = snapshot(pipe)
    yield pipe, base
    remove_loha(pipe)
    assert_unchanged(pipe, base)


DISTINCT = [round(0.1 * i - 0.8, 2) for i in range(26)]  # a different weight for every block, some negative


def _expected(base, parsed, rows, strength_of, weights):
    """original + strength × weight(block) × ΔW in fp32, cast once: what the merge must write, per layer."""
    out = {}
    for r in rows:
        w = base[f"{r['part']}:{r['path']}.weight"]
        block = a1111_block(r["part"], r["path"])
        factor = strength_of(r["part"]) * (1.0 if block is None else weights[BLOCK_IDS.index(block)])
        out[r["key"]] = (w.float() + factor * merge_delta(parsed.modules[r["key"]], w.shape)).to(w.dtype)
    return out


def _assert_weights(pipe, rows, expected):
    models = all_models(pipe)
    for r in rows:
        assert torch.equal(models[r["part"]].get_submodule(r["path"]).weight, expected[r["key"]]), r["key"]


def test_block_weights_merge_exactly_and_remove_bit_for_bit(tiny_pipe, sd1_file):
    path, rows = sd1_file
    assert {a1111_block(r["part"], r["path"]) for r in rows} >= {"IN00", "IN03", "M00", "OUT02", "BASE", None}
    pipe = tiny_pipe("tiny-sd1")
    base = snapshot(pipe)
    parsed = load_adapter(path)
    apply_loha(pipe, path, unet_strength=0.8, text_encoder_strength=0.6, block_weights=DISTINCT)
    _assert_weights(pipe, rows, _expected(base, parsed, rows, lambda p: 0.8 if p == "unet" else 0.6, DISTINCT))
    assert loha_block_weights(pipe, "style").as_list() == DISTINCT

    # A preset, by name, through set_loha_strength: recomputed from the originals, not from the last merge.
    set_loha_strength(pipe, "style", 1.0, block_weights="MIDD")
    midd = parse_block_weights("MIDD").as_list()
    _assert_weights(pipe, rows, _expected(base, parsed, rows, lambda p: 1.0, midd))
    set_loha_strength(pipe, "style", 0.5)  # block weights kept when left out
    _assert_weights(pipe, rows, _expected(base, parsed, rows, lambda p: 0.5, midd))
    set_loha_strength(pipe, "style", block_weights=None)  # None: no block weights at all
    _assert_weights(pipe, rows, _expected(base, parsed, rows, lambda p: 0.5, [1.0] * 26))


def test_all_zero_block_weights_leave_only_layers_outside_blocks(sd1_pipe, sd1_file):
    (pipe, base), (path, rows) = sd1_pipe, sd1_file
    apply_loha(pipe, path, block_weights="NONE")
    models = all_models(pipe)
    for r in rows:
        same = torch.equal(models[r["part"]].get_submodule(r["path"]).weight, base[f"{r['part']}:{r['path']}.weight"])
        assert same == (a1111_block(r["part"], r["path"]) is not None), r["key"]  # conv_out, time embedding move


def test_bad_block_weights_change_nothing(sd1_pipe, sd1_file):
    (pipe, base), (path, _) = sd1_pipe, sd1_file
    with pytest.raises(ValueError, match="block weights"):
        apply_loha(pipe, path, block_weights="1,2")
    assert_unchanged(pipe, base)
    apply_loha(pipe, path)
    with pytest.raises(ValueError, match="block weights"):
        set_loha_strength(pipe, "style", 0.3, block_weights="OUTX")
    assert list_loha(pipe)["style"] == (1.0, 1.0) and loha_block_weights(pipe, "style") is None


def test_sdxl_ldm_named_file_gets_its_blocks(tiny_pipe, tmp_path):
    """SDXL files name layers by LDM path; the 12-weight SDXL form reaches them (IN04 = input_blocks.4)."""
    src = tiny_pipe("tiny-sdxl")
    path = tmp_path / "xl.safetensors"
    make_loha_file(src, path, seed=5, preset="attn-only")
    weights = [0.0] * 12
    weights[BLOCK_ID_FORMS[12].index("IN04")] = 1.0
    pipe = tiny_pipe("tiny-sdxl")
    base = snapshot(pipe)
    apply_loha(pipe, path, block_weights=weights)
    now = snapshot(pipe)
    moved = [k for k in base if not torch.equal(base[k], now[k])]
    assert moved and all(k.startswith("unet:down_blocks.1.attentions.0.") for k in moved), moved[:5]
    assert any("input_blocks_4_1" in n for n in load_file(path))  # the file does use LDM names


# ------------------------------------------------------------------------------------------------
# --loha FILE:S:lbw=..., the PNG text, and a generation run
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("x.safetensors:0.8:lbw=INS", ("x.safetensors", 0.8, None, "INS")),
    ("x.safetensors:1:0.5:lbw=1,0,0,0,0,0,0,0,0,0,0,0", ("x.safetensors", 1.0, 0.5, "1,0,0,0,0,0,0,0,0,0,0,0")),
    ("C:\\loras\\x.safetensors:lbw=OUTS", ("C:\\loras\\x.safetensors", 1.0, None, "OUTS")),
    ("x.safetensors:0.7", ("x.safetensors", 0.7, None, None)),
])
def test_adapter_spec_lbw(text, expected):
    spec = AdapterSpec.parse(text)
    assert (spec.path, spec.strength, spec.te_strength, spec.block_weights) == expected


def test_adapter_spec_bad_lbw_names_the_option():
    with pytest.raises(ValueError, match=r"--loha 'x.safetensors:1:lbw=1,2'.*12, 17, 20 or 26"):
        AdapterSpec.parse("x.safetensors:1:lbw=1,2")


def test_lora_tag_writes_lbw_as_lora_block_weight_reads_it():
    assert lora_tag(AdapterSpec("a/style.safetensors", 0.8, block_weights="INS")) == "<lora:style:0.8:lbw=INS>"
    assert lora_tag(AdapterSpec("style.safetensors", 1.0, 0.5, block_weights="1,0,1")) == "<lora:style:0.5:1:lbw=1,0,1>"
    assert lora_tag(AdapterSpec("style.safetensors", 0.8)) == "<lora:style:0.8>"


GEN = dict(seed=1, steps=2, width=64, height=64, guidance_scale=7.0, scheduler="euler")


def test_generate_with_block_weights(tmp_path, capsys):
    """Attention-only file: every layer is in a block, so lbw=NONE draws the base model's image exactly, OUTS
    (only output blocks and the text encoder) another; the CLI writes lbw into the PNG text."""
    from sd_loha.models import build_tiny_pipeline

    path = tmp_path / "style.safetensors"
    make_loha_file(build_tiny_pipeline("tiny-sd1"), path, std=0.5, preset="attn-only")
    session = GenerationSession("tiny-sd1", device="cpu")
    plain = np.asarray(session.generate("a poster", **GEN)[0][0])
    session.set_adapters([AdapterSpec(str(path), 1.0, block_weights="NONE")])
    none, text = session.generate("a poster", **GEN)[0]
    assert np.array_equal(np.asarray(none), plain) and "<lora:style:1:lbw=NONE>" in text
    session.set_adapters([AdapterSpec(str(path), 1.0, block_weights="OUTS")])  # re-weighted, not reloaded
    outs = np.asarray(session.generate("a poster", **GEN)[0][0])
    session.set_adapters([AdapterSpec(str(path), 1.0)])
    full = np.asarray(session.generate("a poster", **GEN)[0][0])
    assert not np.array_equal(outs, plain) and not np.array_equal(outs, full)

    out_dir = tmp_path / "out"
    assert main(["generate", "--model", "tiny-sd1", "--loha", f"{path}:0.8:lbw=OUTS", "--prompt", "a poster",
                 "--seed", "1", "--steps", "2", "--width", "64", "--height", "64", "--output-dir", str(out_dir)]) == 0
    png = capsys.readouterr().out.split()[0]
    assert Image.open(png).text["parameters"].splitlines()[0] == "a poster <lora:style:0.8:lbw=OUTS>"
