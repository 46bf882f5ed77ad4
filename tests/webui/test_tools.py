"""The Tools tab's actions and the Inspect tab's editors without a server: each calls the library function the
CLI calls (bake_adapters, convert_to_lora_file / convert_to_peft / convert_to_kohya, edit_metadata), with the
slots' values as its arguments and every path checked against the UI's folders; the results equal the CLI's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sd_loha.cli import main
from sd_loha.generate import AdapterSpec
from sd_loha.io import addnet_hash
from sd_loha.meta import read_metadata
from sd_loha.models import build_tiny_pipeline
from tests.loader_helpers import make_loha_file
from webui import tools_tab
from webui.generate_tab import Generator
from webui.paths import PathRefused


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A LoHA file for tiny-sd1 (UNet and text encoder, convs included)."""
    path = tmp_path_factory.mktemp("adapters") / "style.safetensors"
    make_loha_file(build_tiny_pipeline("tiny-sd1"), path, seed=0, metadata={"modelspec.title": "old title"})
    return path


@pytest.fixture
def adapter(policy, made) -> Path:
    """That file in the UI's outputs folder."""
    dest = policy.outputs_dir / "run" / "style.safetensors"
    dest.parent.mkdir(parents=True)
    shutil.copy(made, dest)
    return dest


def _no_library_call(*args, **kwargs):
    raise AssertionError("the library was called although the inputs were refused")


# ------------------------------------------------------------------------------------------------ merge


def test_merge_passes_the_slots_to_bake_adapters(policy, adapter, monkeypatch):
    calls = []
    monkeypatch.setattr(tools_tab, "bake_adapters", lambda *a, **kw: calls.append((a, kw)) or "report")
    slots = [(str(adapter), 0.8, "0.5", "INS"), ("", 1.0, "", None), ("run/style.safetensors", 1.0, "", "")]
    assert tools_tab.merge(policy, "tiny-sd1", slots, "merged/m.safetensors", "bf16", progress=print) == "report"
    (args, kw), = calls
    assert args == ("tiny-sd1", [AdapterSpec(str(adapter), 0.8, 0.5, "INS"), AdapterSpec(str(adapter), 1.0, None, None)],
                    policy.outputs_dir / "merged" / "m.safetensors", "bf16")
    assert kw == {"progress": print}


@pytest.mark.parametrize("slots, out, message", [
    ([("run/style.safetensors", 1, "", "")], "../../escape.safetensors", "outside the folders"),
    ([("run/style.safetensors", 1, "", "")], "merged.ckpt", "pickle"),
    ([("run/style.safetensors", 1, "", "")], "", "no name given"),
    ([("/etc/passwd.safetensors", 1, "", "")], "m.safetensors", "outside the folders"),
    ([("run/style.safetensors", 1, "", "1,2")], "m.safetensors", "adapter 1: block weights '1,2': it has 2 weights"),
    ([("run/style.safetensors", 1, "x", "")], "m.safetensors", "adapter 1: TE strength 'x' is not a number"),
    ([("", 1, "", "")], "m.safetensors", "no adapter to merge"),
])
def test_merge_refuses_before_the_library_runs(policy, adapter, monkeypatch, slots, out, message):
    monkeypatch.setattr(tools_tab, "bake_adapters", _no_library_call)
    with pytest.raises((PathRefused, ValueError), match=message):
        tools_tab.merge(policy, "tiny-sd1", slots, out, "fp16")
    assert "Cannot merge" in tools_tab.error_markdown("Cannot merge", ValueError("x"))


def test_real_merge_equals_the_cli_and_becomes_a_model(policy, adapter, one_thread):
    """tiny-sd1 baked through the action, end to end: the file equals `sd-loha merge` of the same adapter
    (same block weights), its report table names what was merged, and the model lists offer it."""
    seen = []
    report = tools_tab.merge(policy, "tiny-sd1", [(str(adapter), 0.7, "0.4", "OUTD")], "merged/m.safetensors", "fp32",
                             progress=lambda what, frac: seen.append(frac))
    out = policy.outputs_dir / "merged" / "m.safetensors"
    assert report.out == out and report.layout == "single-file" and seen[0] == 0.0 and seen[-1] == 1.0
    cli_out = policy.outputs_dir / "cli.safetensors"
    assert main(["merge", "--model", "tiny-sd1", "--loha", f"{adapter}:0.7:0.4:lbw=OUTD", "--out", str(cli_out),
                 "--dtype", "fp32"]) == 0
    ours, cli = load_file(out), load_file(cli_out)
    assert ours.keys() == cli.keys() and all(torch.equal(ours[k], cli[k]) for k in ours)
    md = tools_tab.merge_markdown(report, policy)
    assert f"`{out}`" in md and "| `style.safetensors` | 0.7 | 0.4 | OUTD |" in md
    assert str(out) in policy.model_choices() and policy.check_model("merged/m.safetensors") == str(out)


# ------------------------------------------------------------------------------------------------ convert


def test_convert_to_lora_shows_the_library_report(policy, adapter, one_thread):
    from sd_loha.convert import convert_to_lora_file

    r = tools_tab.convert(policy, "run/style.safetensors", "lora", "converted/l.safetensors", rank=2, energy=None,
                          model="tiny-sd1", dtype="fp16")
    out = policy.outputs_dir / "converted" / "l.safetensors"
    expected = convert_to_lora_file(adapter, policy.outputs_dir / "direct.safetensors", rank=2,
                                    model=build_tiny_pipeline("tiny-sd1"), dtype=torch.float16)
    assert r.blocks == [{"block": b, "relative error": e} for b, e in expected.blocks.items()]
    assert [(x["module"], x["rank"], x["max rank"]) for x in r.layers] == [(x.name, x.rank, x.max_rank)
                                                                          for x in expected.layers]
    assert [x["relative error"] for x in r.layers] == pytest.approx([x.relative_error for x in expected.layers])
    assert all(x["rank"] == 2 for x in r.layers) and f"`{out}`" in r.message and f"{len(r.layers)} layers, rank 2," in r.message
    assert {t.dtype for t in load_file(out).values()} == {torch.float16}


def test_convert_passes_rank_energy_model_to_the_library(policy, adapter, monkeypatch):
    import sd_loha.convert as convert

    calls = []

    def fake(src, out, **kw):
        calls.append((src, out, kw))
        return convert.ConversionReport(str(src), "lora")

    monkeypatch.setattr(convert, "convert_to_lora_file", fake)
    tools_tab.convert(policy, str(adapter), "lora", "x.safetensors", rank=None, energy=0.95, model="", dtype="")
    tools_tab.convert(policy, str(adapter), "lora", "x.safetensors", rank=3.0, energy="", model="tiny-sd1", dtype="bf16")
    assert calls == [(adapter, policy.outputs_dir / "x.safetensors", dict(rank=None, energy=0.95, model=None, dtype=None)),
                     (adapter, policy.outputs_dir / "x.safetensors", dict(rank=3, energy=None, model="tiny-sd1",
                                                                          dtype=torch.bfloat16))]
    monkeypatch.setattr(convert, "convert_to_lora_file", _no_library_call)
    for kw, message in ((dict(rank=2.5), "whole number"), (dict(rank=2, target="peft"), "for --to lora only"),
                        (dict(target="gif"), "choose one of lora, peft, kohya"), (dict(out="../../o.safetensors"), "outside"),
                        (dict(model="/etc"), "outside")):
        args = {"target": "lora", "out": "x.safetensors", **kw}
        with pytest.raises((PathRefused, ValueError), match=message):
            tools_tab.convert(policy, str(adapter), args.pop("target"), args.pop("out"), **args)
    with pytest.raises(PathRefused, match="not a PEFT adapter"):
        tools_tab.convert(policy, str(adapter.parent), "kohya", "k.safetensors")


def test_convert_library_errors_are_its_messages(policy, adapter):
    with pytest.raises(ValueError) as e:
        tools_tab.convert(policy, str(adapter), "lora", "x.safetensors", rank=2, energy=0.9, model="tiny-sd1")
    md = tools_tab.error_markdown("Cannot convert", e.value)
    assert str(e.value) in md and "rank" in str(e.value) and "energy" in str(e.value)


def test_convert_to_peft_and_back(policy, adapter, one_thread):
    r = tools_tab.convert(policy, str(adapter), "peft", "converted/peft", model="tiny-sd1")
    folder = policy.outputs_dir / "converted" / "peft"
    assert f"`{folder / 'unet'}`" in r.message and (folder / "unet" / "adapter_config.json").is_file()
    back = tools_tab.convert(policy, str(folder), "kohya", "converted/back.safetensors", model="tiny-sd1")
    out = policy.outputs_dir / "converted" / "back.safetensors"
    assert f"`{out}`" in back.message
    src, got = load_file(adapter), load_file(out)
    factors = [k for k in src if ".hada_" in k]
    assert factors and all(torch.equal(src[k], got[k]) for k in factors)


# ------------------------------------------------------------------------------------------------ metadata


def test_meta_edit_keeps_the_hash_and_reads_back(policy, adapter, tmp_path):
    before = addnet_hash(adapter)
    fields = tools_tab.read_meta(policy, "run/style.safetensors")
    assert (fields.title, fields.trigger, fields.thumbnail) == ("old title", "", None)
    thumb = tmp_path / "t.png"
    Image.new("RGB", (8, 6), (200, 10, 10)).save(thumb)
    msg, meta = tools_tab.save_meta(policy, str(adapter), "Posters", " sdlohastyle ", "flat colors", str(thumb))
    assert addnet_hash(adapter) == before and before[:12] in msg and "unchanged" in msg
    assert read_metadata(adapter) == meta
    assert (meta["modelspec.title"], meta["modelspec.trigger_phrase"], meta["modelspec.description"]) == \
        ("Posters", "sdlohastyle", "flat colors")
    assert meta["modelspec.thumbnail"].startswith("data:image/png;base64,")
    again = tools_tab.read_meta(policy, str(adapter))
    assert again.thumbnail.size == (8, 6) and again.thumbnail.convert("RGB").getpixel((0, 0)) == (200, 10, 10)
    # an emptied box removes its key; the thumbnail stays unless removed
    _, meta = tools_tab.save_meta(policy, str(adapter), "", "sdlohastyle", "flat colors")
    assert "modelspec.title" not in meta and "modelspec.thumbnail" in meta
    _, meta = tools_tab.save_meta(policy, str(adapter), "T", "sdlohastyle", "", remove_thumbnail=True)
    assert "modelspec.thumbnail" not in meta and "modelspec.description" not in meta
    assert addnet_hash(adapter) == before


def test_meta_refuses_files_outside_the_adapter_folders(policy, made):
    in_data = policy.data_dir / "style.safetensors"
    shutil.copy(made, in_data)
    for bad in (str(in_data), str(made), "../../x.safetensors"):
        with pytest.raises(PathRefused):
            tools_tab.save_meta(policy, bad, "t", "", "")
    assert read_metadata(in_data) == read_metadata(made)


# ------------------------------------------------------------------------------------------------ block weights


def test_block_weights_table_follows_lora_block_weight():
    # LoRA Block Weight's INS (17 weights: BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03..OUT11) = 1,1,1,1,0,...:
    # BASE, IN01, IN02 and IN04 get 1; IN00, IN03, IN06, IN09-IN11, OUT00-OUT02, which the 17 form does not
    # name, get 0 like every other block.
    rows = {r["block"]: r["weight"] for r in tools_tab.block_weights_rows("INS")}
    assert len(rows) == 26 and {b for b, w in rows.items() if w == 1} == {"BASE", "IN01", "IN02", "IN04"}
    assert set(rows.values()) == {0.0, 1.0}
    twelve = {r["block"]: r["weight"] for r in tools_tab.block_weights_rows("1,0,0,0,0,0.5,0,0,0,0,0,0.25")}
    assert (twelve["BASE"], twelve["M00"], twelve["OUT05"], twelve["IN04"]) == (1, 0.5, 0.25, 0)
    assert all(r["weight"] == 1 for r in tools_tab.block_weights_rows(""))
    with pytest.raises(ValueError, match="it has 3 weights"):
        tools_tab.block_weights_rows("1,1,1")


def test_generate_slots_carry_block_weights(policy, adapter):
    gen = Generator(policy)
    specs = gen._specs([(str(adapter), 0.5, "", "OUTD"), ("", 1, "", "INS"), (str(adapter), 1.0, "0.2", None)])
    assert specs == [AdapterSpec(str(adapter), 0.5, None, "OUTD"), AdapterSpec(str(adapter), 1.0, 0.2, None)]
    assert gen._specs([(str(adapter), 1.0, None)]) == [AdapterSpec(str(adapter))]  # 3-tuples still work
    with pytest.raises(ValueError, match="LoHA file 1: block weights 'XYZ'"):
        gen._specs([(str(adapter), 1.0, "", "XYZ")])
