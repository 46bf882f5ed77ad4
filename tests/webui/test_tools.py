"""The Tools tab's actions and the Inspect tab's editors without a server: each calls the library function the
CLI calls (bake_adapters, convert_to_lora_file / convert_to_peft / convert_to_kohya, edit_metadata), with the
slots' values as its arguments and every path checked against the UI's folders; the results equal the CLI's,
and the merged file read by diffusers equals the base plus the deltas the real LyCORIS package computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sd_loha import bake
from sd_loha.cli import main
from sd_loha.generate import AdapterSpec
from sd_loha.io import AdapterFileError, addnet_hash
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


def test_merge_passes_the_slots_to_bake_adapters(policy, adapter, one_thread):
    """The slots become the library's adapter list, seen in the file the action really writes: each adapter
    recorded with its strength, TE strength (empty = the strength) and block weights, an empty slot skipped,
    the dtype chosen, and the weights of `sd-loha merge` given the same list."""
    slots = [(str(adapter), 0.8, "0.5", "INS"), ("", 1.0, "", None), ("run/style.safetensors", 1.0, "", "")]
    report = tools_tab.merge(policy, "tiny-sd1", slots, "merged/m.safetensors", "bf16")
    out = policy.outputs_dir / "merged" / "m.safetensors"
    assert report.out == out
    with safe_open(str(out), "pt") as f:
        record = json.loads(f.metadata()[bake.METADATA_KEY])
    assert [(x["file"], x["strength"], x["te_strength"], x.get("block_weights")) for x in record["adapters"]] == \
        [("style.safetensors", 0.8, 0.5, "INS"), ("style.safetensors", 1.0, 1.0, None)]
    cli_out = policy.outputs_dir / "cli.safetensors"
    assert main(["merge", "--model", "tiny-sd1", "--loha", f"{adapter}:0.8:0.5:lbw=INS", "--loha", str(adapter),
                 "--out", str(cli_out), "--dtype", "bf16"]) == 0
    ours, cli = load_file(out), load_file(cli_out)
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    assert ours.keys() == cli.keys() and all(torch.equal(ours[k], cli[k]) for k in ours)


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


def test_merge_keeps_an_earlier_output_unless_overwrite_is_ticked(policy, adapter, one_thread):
    """A second merge to the same name is refused (the first stays byte for byte) until 'overwrite' is ticked."""
    slots = [(str(adapter), 0.7, "", "")]
    tools_tab.merge(policy, "tiny-sd1", slots, "merged/m.safetensors", "fp32")
    out = policy.outputs_dir / "merged" / "m.safetensors"
    first = out.read_bytes()
    with pytest.raises(ValueError, match="already exists.*Overwrite"):
        tools_tab.merge(policy, "tiny-sd1", [(str(adapter), 0.2, "", "")], "merged/m.safetensors", "fp32")
    assert out.read_bytes() == first
    tools_tab.merge(policy, "tiny-sd1", [(str(adapter), 0.2, "", "")], "merged/m.safetensors", "fp32", overwrite=True)
    assert out.read_bytes() != first


def test_folder_merge_report_says_diffusers_folder(policy, adapter, one_thread):
    report = tools_tab.merge(policy, "tiny-sd1", [(str(adapter), 1.0, "", "")], "merged/folder", "fp16")
    md = tools_tab.merge_markdown(report, policy)
    assert report.layout == "diffusers" and "diffusers folder" in md and "original checkpoint layout" not in md
    single = tools_tab.merge(policy, "tiny-sd1", [(str(adapter), 1.0, "", "")], "merged/one.safetensors", "fp16")
    assert "original checkpoint layout" in tools_tab.merge_markdown(single, policy)


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


def _flat_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each module's ΔW as a matrix (out, in·kh·kw), by the textbook formulas: LoHA (w1a w1b) ⊙ (w2a w2b)·α/r,
    LoRA up·down·α/r (in fp32, whatever the file's dtype)."""
    tensors = {k: v.float() for k, v in load_file(path).items()}
    out = {}
    for name in {k.split(".", 1)[0] for k in tensors}:
        t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if "hada_w1_a" in t:
            r = t["hada_w1_b"].shape[0]
            delta = (t["hada_w1_a"] @ t["hada_w1_b"].flatten(1)) * (t["hada_w2_a"] @ t["hada_w2_b"].flatten(1))
        else:
            r = t["lora_down.weight"].shape[0]
            delta = t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)
        out[name] = delta * (float(t["alpha"]) / r if "alpha" in t else 1.0)
    return out


def test_convert_passes_rank_energy_model_to_the_library(policy, adapter, monkeypatch, one_thread):
    """rank, energy, model and dtype from the form reach the conversion, seen in what it really does and writes,
    checked against the SVD of each LoHA ΔW (Eckart-Young): with energy 0.95 every layer has the smallest rank
    that keeps 95 % of Σσ², with rank 3 (typed as 3.0) every layer has rank 3 and the best rank-3 error, in bf16."""
    import sd_loha.convert as convert

    # an empty model is none: tiny-sd1's files need their base to tell Linear from conv layers
    with pytest.raises(AdapterFileError, match="Pass the base model"):
        tools_tab.convert(policy, str(adapter), "lora", "e.safetensors", rank=None, energy=0.95, model="", dtype="")
    tools_tab.convert(policy, str(adapter), "lora", "e.safetensors", rank=None, energy=0.95, model="tiny-sd1", dtype="")
    tools_tab.convert(policy, str(adapter), "lora", "r.safetensors", rank=3.0, energy="", model="tiny-sd1", dtype="bf16")
    loha = _flat_deltas(adapter)
    by_energy, by_rank = (_flat_deltas(policy.outputs_dir / n) for n in ("e.safetensors", "r.safetensors"))
    assert by_energy.keys() == by_rank.keys() == loha.keys()
    assert {t.dtype for t in load_file(policy.outputs_dir / "e.safetensors").values()} == {torch.float32}
    assert {t.dtype for t in load_file(policy.outputs_dir / "r.safetensors").values()} == {torch.bfloat16}
    ranks = {k: v.shape[0] for k, v in load_file(policy.outputs_dir / "e.safetensors").items() if "lora_down" in k}
    assert len(set(ranks.values())) > 1  # energy picks a rank per layer
    for name, delta in loha.items():
        s2 = torch.linalg.svdvals(delta.double()) ** 2
        kept = s2.cumsum(0) / s2.sum()
        r = ranks[f"{name}.lora_down.weight"]
        assert kept[r - 1] >= 0.95 - 1e-9 and (r == 1 or kept[r - 2] < 0.95), name
        # fp32 SVD and products: 1e-4 of ‖ΔW‖ covers their rounding
        tail = float(s2[r:].sum().sqrt())
        assert float((by_energy[name] - delta).norm()) == pytest.approx(tail, abs=1e-4 * float(delta.norm())), name
        # bf16 factors (8 bits of mantissa): 2 % of ‖ΔW‖
        best3 = float(s2[3:].sum().sqrt())
        assert float((by_rank[name] - delta).norm()) == pytest.approx(best3, abs=2e-2 * float(delta.norm())), name
    assert all(v.shape[0] == 3 for k, v in load_file(policy.outputs_dir / "r.safetensors").items() if "lora_down" in k)
    monkeypatch.setattr(convert, "convert_to_lora_file", _no_library_call)
    for kw, message in ((dict(rank=2.5), "whole number"), (dict(rank=2, target="peft"), "for --to lora only"),
                        (dict(target="gif"), "choose one of lora, peft, kohya"), (dict(out="../../o.safetensors"), "outside"),
                        (dict(model="/etc"), "outside")):
        args = {"target": "lora", "out": "x.safetensors", **kw}
        with pytest.raises((PathRefused, ValueError), match=message):
            tools_tab.convert(policy, str(adapter), args.pop("target"), args.pop("out"), **args)
    with pytest.raises(PathRefused, match="not a PEFT adapter"):
        tools_tab.convert(policy, str(adapter.parent), "kohya", "k.safetensors")


@pytest.mark.parametrize("target, name", [("lora", "converted/l.safetensors"), ("peft", "converted/peft")])
def test_convert_keeps_an_earlier_output_unless_overwrite_is_ticked(policy, adapter, target, name, one_thread):
    kw = dict(rank=2, model="tiny-sd1") if target == "lora" else dict(model="tiny-sd1")
    tools_tab.convert(policy, str(adapter), target, name, **kw)
    out = policy.outputs_dir / name
    before = sorted(p.stat().st_mtime_ns for p in [out, *out.rglob("*")])
    with pytest.raises(ValueError, match="already exists.*Overwrite"):
        tools_tab.convert(policy, str(adapter), target, name, **kw)
    assert sorted(p.stat().st_mtime_ns for p in [out, *out.rglob("*")]) == before
    r = tools_tab.convert(policy, str(adapter), target, name, overwrite=True, **kw)
    assert "**Wrote**" in r.message


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


def test_merged_file_loads_in_diffusers_with_the_deltas_lycoris_computes(policy, adapter, tmp_path, monkeypatch,
                                                                      one_thread):
    """The Tools tab's merge checked against the other side: diffusers' from_single_file reads the file (its own
    LDM -> diffusers conversion), and every layer the adapter names computes what the real LyCORIS package's
    module computes on a fresh base at the same strengths (UNet 0.7, text encoder 0.4); every other weight is
    the base's."""
    from diffusers import StableDiffusionPipeline

    lycoris_kohya = pytest.importorskip("lycoris.kohya")  # a third-party extra (lycoris-lora 4.1.3, torch >= 2.5)
    from tests.train.helpers import _TextModelShim

    tools_tab.merge(policy, "tiny-sd1", [(str(adapter), 0.7, "0.4", "")], "merged/plain.safetensors", "fp32")
    build_tiny_pipeline("tiny-sd1").save_pretrained(tmp_path / "config")
    merged = StableDiffusionPipeline.from_single_file(
        str(policy.outputs_dir / "merged" / "plain.safetensors"), config=str(tmp_path / "config"),
        local_files_only=True, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)

    ref = build_tiny_pipeline("tiny-sd1")
    # LyCORIS first builds a throw-away network from its class-level default targets, which name the time
    # embedding twice on a diffusers UNet ("duplicated lora name"): empty them for this test only.
    net_cls = lycoris_kohya.LycorisNetworkKohya
    for attr in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE"):
        monkeypatch.setattr(net_cls, attr, [])
    te = _TextModelShim(ref.text_encoder)
    lyco, _ = lycoris_kohya.create_network_from_weights(1.0, str(adapter), ref.vae, te, ref.unet, for_inference=True)
    lyco.apply_to(te, ref.unet, apply_text_encoder=True, apply_unet=True)
    state = lyco.load_weights(str(adapter))
    assert "missing keys" not in state and "unexpected keys" not in state, state
    assert {m.lora_name for m in lyco.loras} == {k.split(".")[0] for k in load_file(adapter)}

    paths = {part: {id(m): n for n, m in getattr(ref, part).named_modules()} for part in ("unet", "text_encoder")}
    adapted = {"unet": set(), "text_encoder": set()}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lyco.loras:
            part = "unet" if m.lora_name.startswith("lora_unet_") else "text_encoder"
            m.multiplier = 0.7 if part == "unet" else 0.4
            theirs = m.org_module[0]  # the base layer, its forward patched by LyCORIS
            path = paths[part][id(theirs)]
            adapted[part].add(path)
            ours = getattr(merged, part).get_submodule(path)
            x = (torch.randn(3, theirs.in_features, generator=gen) if isinstance(theirs, torch.nn.Linear)
                 else torch.randn(2, theirs.in_channels, 9, 9, generator=gen))
            # merged weight vs LyCORIS's on-the-fly delta: the same sums in another order (fp32)
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5, msg=lambda s: f"{m.lora_name}: {s}")
        for part in ("unet", "text_encoder", "vae"):
            base, got = getattr(ref, part).state_dict(), getattr(merged, part).state_dict()
            assert base.keys() == got.keys(), part
            kept = [k for k in base if k.rsplit(".", 1)[0] not in adapted.get(part, set())]
            assert kept and all(torch.equal(base[k], got[k]) for k in kept), part
    assert adapted["unet"] and adapted["text_encoder"]


def test_inspect_chart_orders_blocks_as_block_weights_do(policy, adapter):
    """The Inspect tab's per-block chart: text encoder first, then the UNet in LoRA Block Weight's order."""
    from sd_loha.blocks import BLOCK_IDS, OUTSIDE_BLOCKS
    from webui.inspect_tab import inspect_file

    _, frame, _ = inspect_file(policy, str(adapter))
    keys = list(frame["block"])
    assert keys[0] == "te:BASE" and all(k.startswith("unet:") for k in keys[1:])
    order = [*BLOCK_IDS, OUTSIDE_BLOCKS]
    unet = [k.removeprefix("unet:") for k in keys[1:]]
    assert unet == sorted(unet, key=order.index) and "M00" in unet


# ------------------------------------------------------------------------------------------------ SD 3.x


def test_sd3_models_are_listed(policy):
    """An SD 3.x diffusers folder and an SD 3.x single-file checkpoint in the models folder are in the model lists
    (an SD 3.x adapter there is not)."""
    from safetensors.torch import save_file

    from tests.sd3_helpers import write_sd3_loha

    pipe = build_tiny_pipeline("tiny-sd3")
    pipe.save_pretrained(policy.models_dir / "sd35m")
    save_file({"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": torch.zeros(3, 2)},
              str(policy.models_dir / "sd35m.safetensors"))
    write_sd3_loha(pipe, policy.models_dir / "sd3style.safetensors")
    choices = policy.model_choices()
    assert "tiny-sd3" in choices and str((policy.models_dir / "sd35m").resolve()) in choices
    assert str(policy.models_dir / "sd35m.safetensors") in choices
    assert str(policy.models_dir / "sd3style.safetensors") not in choices


def test_tools_merge_convert_and_inspect_sd3_files(policy, one_thread):
    """The Tools tab's merge, convert (kohya and diffusers LoRA, PEFT) and the Inspect tab on an SD 3.x LoHA, each
    the CLI's library call: the merged file holds the MMDiT, the diffusers LoRA diffusers' names, the inspect
    summary the SD 3.x parts."""
    from tests.sd3_helpers import write_sd3_loha
    from webui.inspect_tab import norms_frame

    (policy.outputs_dir / "run").mkdir()
    src = write_sd3_loha(build_tiny_pipeline("tiny-sd3"), policy.outputs_dir / "run" / "sd3style.safetensors")
    report = tools_tab.merge(policy, "tiny-sd3", [(str(src), 1.0, "", "")], "merged/sd3.safetensors", "fp16")
    assert report.family == "SD 3.x"
    with safe_open(str(report.out), "pt") as f:
        assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in set(f.keys())
    kohya = tools_tab.convert(policy, str(src), "lora", "converted/k.safetensors", rank=4, model="tiny-sd3")
    diffusers = tools_tab.convert(policy, str(src), "lora", "converted/d.safetensors", rank=4, model="tiny-sd3",
                                  lora_form="diffusers")
    assert "loads no T5" in diffusers.message and "loads no T5" not in kohya.message
    with safe_open(str(policy.outputs_dir / "converted" / "d.safetensors"), "pt") as f:
        assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in set(f.keys())
    with pytest.raises(ValueError, match="LoRA form 'comfy'"):
        tools_tab.convert(policy, str(src), "lora", "converted/x.safetensors", rank=4, model="tiny-sd3",
                          lora_form="comfy")
    peft = tools_tab.convert(policy, str(src), "peft", "converted/peft", model="tiny-sd3")
    assert "transformer" in peft.message and (policy.outputs_dir / "converted" / "peft" / "text_encoder_3").is_dir()
    from sd_loha.inspect import summarize

    s = summarize(src, delta_norms=True)
    assert "transformer (MMDiT)" in s["parts"]
    blocks = list(norms_frame(s)["block"])
    joint = [b for b in blocks if "joint_blocks" in b]
    assert joint == ["transformer:joint_blocks_0", "transformer:joint_blocks_1", "transformer:joint_blocks_2"]
    assert blocks.index("te3:BASE") < blocks.index(joint[0])
