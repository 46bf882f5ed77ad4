"""`sd-loha merge` / sd_loha.bake: adapters baked into a base model, checked against diffusers' own loaders.

The single file is read back by diffusers' `from_single_file` (its LDM -> diffusers conversion, not ours), the
folder by `from_pretrained`; every tensor must equal `apply_loha` on an fp32 pipeline (cast for fp16/bf16), and a
few entries are recomputed by hand from the file's factors at the key the original layout gives them.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sd_loha import bake
from sd_loha.bake import bake_adapters
from sd_loha.cli import main
from sd_loha.merge import apply_loha
from sd_loha.models import TOY_MODELS, build_tiny_pipeline, load_pipeline
from tests.loader_helpers import file_delta, group_modules, make_loha_file

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _wide_sdxl():
    """tiny-sdxl with CLIP-G wider than CLIP-L (48 vs 32), as in SDXL (1280 vs 768): diffusers' single-file
    loader tells the two encoders apart by width, so equal widths (tiny-sdxl's) would load CLIP-L twice."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    base = build_tiny_pipeline("tiny-sdxl")
    te1 = base.text_encoder
    torch.manual_seed(1)
    cfg = CLIPTextConfig(**{**te1.config.to_dict(), "hidden_size": 48, "intermediate_size": 96,
                            "projection_dim": 40, "hidden_act": "gelu"})
    te2 = CLIPTextModelWithProjection(cfg).eval()
    ucfg = dict(base.unet.config)
    ucfg.update(cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=6 * 8 + 40)
    unet = UNet2DConditionModel.from_config(ucfg).eval()
    return StableDiffusionXLPipeline(vae=base.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=base.tokenizer,
                                     tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Base models as diffusers folders (which also serve as from_single_file's offline `config`)."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name in ("tiny-sd1", "tiny-sd2"):
        build_tiny_pipeline(name).save_pretrained(root / name)
        out[name] = root / name
    _wide_sdxl().save_pretrained(root / "sdxl")
    out["sdxl"] = root / "sdxl"
    out["toy-sd1"] = TOY_MODELS["toy-sd1"]
    return out


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Two LoHA files per base model (seeds 0 and 1; the second one attention-only)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, folder in models.items():
        pipe = load_pipeline(str(folder))
        a, b = root / f"{name}-a.safetensors", root / f"{name}-b.safetensors"
        make_loha_file(pipe, a, seed=0)
        make_loha_file(pipe, b, seed=1, preset="attn-only", rank=2, alpha=1.0)
        out[name] = (a, b)
    return out


def _single_file_cls(name: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline


def _from_single_file(name: str, path: Path, config: Path):
    extra = {} if name == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    return _single_file_cls(name).from_single_file(str(path), config=str(config), local_files_only=True,
                                                   torch_dtype=torch.float32, **extra)


def _merged(folder: Path, specs: list[tuple[Path, float, float]]):
    pipe = load_pipeline(str(folder), dtype=torch.float32)
    for path, s, te in specs:
        apply_loha(pipe, path, unet_strength=s, text_encoder_strength=te)
    return pipe


def _assert_same_weights(expected, got, dtype: torch.dtype) -> int:
    """Every tensor of UNet, VAE and text encoder(s) of `got` equals `expected`'s cast to `dtype`, bit for bit."""
    checked = 0
    for part in PARTS:
        a, b = getattr(expected, part, None), getattr(got, part, None)
        if a is None:
            continue
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), part
        for k in sa:
            assert not sb[k].is_meta, f"{part}.{k} was not in the file"
            want = sa[k].to(dtype)
            assert sb[k].to(dtype).equal(want), f"{part}.{k}"
            checked += 1
    return checked


def _changed_parts(base, merged) -> set[str]:
    out = set()
    for part in PARTS:
        a, b = getattr(base, part, None), getattr(merged, part, None)
        if a is not None and any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())):
            out.add(part)
    return out


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "sdxl", "toy-sd1"])
def test_single_file_loads_in_diffusers_with_the_merged_weights(name, models, adapters, tmp_path, one_thread):
    a, _ = adapters[name]
    out = tmp_path / "merged.safetensors"
    report = bake_adapters(str(models[name]), [(a, 0.8, 0.5)], out, "fp32")
    assert report.layout == "single-file" and report.adapters[0]["layers"] > 0

    expected = _merged(models[name], [(a, 0.8, 0.5)])
    back = _from_single_file(name, out, models[name])
    assert _assert_same_weights(expected, back, torch.float32) > 100
    # The adapter did change the UNet and every text encoder (so equality above is not base == base).
    parts = {"unet", "text_encoder"} | ({"text_encoder_2"} if name == "sdxl" else set())
    assert _changed_parts(load_pipeline(str(models[name])), expected) == parts

    keys = load_file(out).keys()
    te_prefixes = {"tiny-sd1": ("cond_stage_model.transformer.text_model.",),
                   "toy-sd1": ("cond_stage_model.transformer.text_model.",),
                   "tiny-sd2": ("cond_stage_model.model.transformer.resblocks.",),
                   "sdxl": ("conditioner.embedders.0.transformer.text_model.",
                            "conditioner.embedders.1.model.transformer.resblocks.")}[name]
    for prefix in ("model.diffusion_model.input_blocks.", "first_stage_model.encoder.down.", *te_prefixes):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.")) for k in keys)


def test_original_layout_by_hand(models, adapters, tmp_path, one_thread):
    """Entries at keys written out by hand from the LDM / OpenCLIP layouts equal base + strength·ΔW recomputed
    from the file's factors: SD1 UNet attention, SD2's fused q|k|v, the VAE's 1x1-conv attention."""
    for name, unet_key, te_check in (
        ("tiny-sd1", "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
         ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", None)),
        ("tiny-sd2", "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
         ("cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight", 1)),
    ):
        a, _ = adapters[name]
        out = tmp_path / f"{name}.safetensors"
        bake_adapters(str(models[name]), [(a, 0.8, 0.5)], out, "fp32")
        got = load_file(out)
        base = load_pipeline(str(models[name]))
        mods = group_modules(load_file(a))
        unet_w = base.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight
        delta = file_delta(mods["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"], unet_w.shape)
        torch.testing.assert_close(got[unet_key], unet_w + 0.8 * delta, rtol=0, atol=1e-6)

        te_key, layer = te_check
        enc = getattr(base.text_encoder, "text_model", base.text_encoder)  # transformers 4 or 5
        if layer is None:
            q = enc.encoder.layers[0].self_attn.q_proj.weight
            d = file_delta(mods["lora_te_text_model_encoder_layers_0_self_attn_q_proj"], q.shape)
            torch.testing.assert_close(got[te_key], q + 0.5 * d, rtol=0, atol=1e-6)
        else:
            rows = []
            for proj in ("q_proj", "k_proj", "v_proj"):
                w = enc.encoder.layers[layer].self_attn.get_submodule(proj).weight
                d = file_delta(mods[f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}"], w.shape)
                rows.append(w + 0.5 * d)
            torch.testing.assert_close(got[te_key], torch.cat(rows), rtol=0, atol=1e-6)

        vae_q = base.vae.decoder.mid_block.attentions[0].to_q.weight
        assert got["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (*vae_q.shape, 1, 1)
        assert got["first_stage_model.decoder.mid.attn_1.q.weight"][:, :, 0, 0].equal(vae_q)


def test_sdxl_text_projection_is_stored_transposed(models, adapters, tmp_path):
    a, _ = adapters["sdxl"]
    out = tmp_path / "xl.safetensors"
    bake_adapters(str(models["sdxl"]), [a], out, "fp32")
    base = load_pipeline(str(models["sdxl"]))
    proj = load_file(out)["conditioner.embedders.1.model.text_projection"]
    assert proj.equal(base.text_encoder_2.text_projection.weight.T)  # OpenCLIP computes x @ P
    assert proj.shape == (48, 40)


def test_diffusers_folder_loads_with_from_pretrained(models, adapters, tmp_path, one_thread):
    from diffusers import StableDiffusionPipeline

    a, _ = adapters["tiny-sd1"]
    out = tmp_path / "merged"
    report = bake_adapters("tiny-sd1", [(a, 0.8, 0.5)], out, "fp16")
    assert report.layout == "diffusers"
    stored = {t.dtype for f in out.glob("*/*.safetensors") for t in load_file(f).values()}
    assert stored == {torch.float16}
    back = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False, torch_dtype=torch.float16)
    _assert_same_weights(_merged(models["tiny-sd1"], [(a, 0.8, 0.5)]), back, torch.float16)
    record = json.loads((out / bake.FOLDER_RECORD).read_text())
    assert record["adapters"][0]["strength"] == 0.8 and record["dtype"] == "fp16"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    bake_adapters("tiny-sd1", [(a, 0.0, 0.0)], out, "fp32")  # replacing an earlier output is allowed
    assert {t.dtype for t in load_file(out / "unet" / "diffusion_pytorch_model.safetensors").values()} == {torch.float32}


def test_two_adapters_equal_applying_one_after_the_other(models, adapters, tmp_path, one_thread):
    a, b = adapters["tiny-sd1"]
    out = tmp_path / "two.safetensors"
    specs = [(a, 0.7, 0.3), (b, -0.5, 1.2)]
    bake_adapters(str(models["tiny-sd1"]), specs, out, "fp32")
    back = _from_single_file("tiny-sd1", out, models["tiny-sd1"])
    _assert_same_weights(_merged(models["tiny-sd1"], specs), back, torch.float32)

    base = load_pipeline(str(models["tiny-sd1"]))
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    name = "lora_unet_" + path.replace(".", "_")
    w = base.unet.get_submodule(path).weight
    da, db = (file_delta(group_modules(load_file(f))[name], w.shape) for f in (a, b))
    torch.testing.assert_close(back.unet.get_submodule(path).weight, w + 0.7 * da - 0.5 * db, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_outputs_are_the_fp32_merge_cast_once(dtype, models, adapters, tmp_path, one_thread):
    a, _ = adapters["sdxl"]
    out = tmp_path / f"{dtype}.safetensors"
    bake_adapters(str(models["sdxl"]), [(a, 0.8, 0.5)], out, dtype)
    torch_dtype = bake.DTYPES[dtype]
    assert {t.dtype for t in load_file(out).values()} == {torch_dtype}
    back = _from_single_file("sdxl", out, models["sdxl"])
    _assert_same_weights(_merged(models["sdxl"], [(a, 0.8, 0.5)]), back, torch_dtype)


def _addnet_hash_by_hand(path: Path) -> str:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


def test_metadata_says_what_was_merged(models, adapters, tmp_path):
    import sd_loha

    a, b = adapters["tiny-sd1"]
    out = tmp_path / "meta.safetensors"
    steps: list[tuple[str, float]] = []
    report = bake_adapters("tiny-sd1", [(a, 0.7, 0.3), b], out, "fp16", progress=lambda w, f: steps.append((w, f)))
    assert [f for _, f in steps] == sorted(f for _, f in steps) and steps[-1][1] == 1.0
    assert sum(str(a) in w for w, _ in steps) == 1 and report.out == out and str(out) in str(report)
    with safe_open(str(out), "pt") as f:
        record = json.loads(f.metadata()[bake.METADATA_KEY])
    assert record["base_model"] == "tiny-sd1" and record["family"] == "sd1" and record["dtype"] == "fp16"
    assert record["sd_loha_version"] == sd_loha.__version__
    assert record["adapters"] == [
        {"file": a.name, "addnet_hash": _addnet_hash_by_hand(a), "strength": 0.7, "te_strength": 0.3},
        {"file": b.name, "addnet_hash": _addnet_hash_by_hand(b), "strength": 1.0, "te_strength": 1.0},
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written through a temp file


@pytest.mark.parametrize("args, message", [
    ({"dtype": "fp8"}, "--dtype 'fp8'"),
    ({"out": "x.ckpt"}, "no pickles"),
    ({"adapters": ["missing.safetensors"]}, "no such file"),
    ({"adapters": []}, "at least one --loha"),
    ({"out": "busy"}, "other files"),
])
def test_mistakes_fail_before_the_model_loads(args, message, adapters, tmp_path, monkeypatch):
    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(bake, "load_pipeline", no_load)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    kw = {"adapters": [adapters["tiny-sd1"][0]], "out": "out.safetensors", "dtype": "fp32"} | args
    kw["adapters"] = [p if Path(p).is_absolute() else tmp_path / p for p in kw["adapters"]]
    with pytest.raises((ValueError, OSError), match=message):
        bake_adapters("tiny-sd1", kw["adapters"], tmp_path / kw["out"], kw["dtype"])


def test_cli_merge(adapters, tmp_path, capsys, one_thread):
    a, b = adapters["tiny-sd1"]
    out = tmp_path / "cli.safetensors"
    rc = main(["merge", "--model", "tiny-sd1", "--loha", f"{a}:0.8:0.5", "--loha", str(b), "--out", str(out),
               "--dtype", "bf16"])
    assert rc == 0 and str(out) in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        record = json.loads(f.metadata()[bake.METADATA_KEY])
    assert [(x["strength"], x["te_strength"]) for x in record["adapters"]] == [(0.8, 0.5), (1.0, 1.0)]
    assert {t.dtype for t in load_file(out).values()} == {torch.bfloat16}
    assert main(["merge", "--model", "tiny-sd1", "--loha", str(a), "--out", str(tmp_path / "x.ckpt")]) == 2
    assert "no pickles" in capsys.readouterr().err


def test_block_weights_are_baked_as_the_loader_applies_them(models, adapters, tmp_path, one_thread):
    from sd_loha.generate import AdapterSpec

    a, _ = adapters["tiny-sd1"]
    spec = AdapterSpec.parse(f"{a}:0.8:0.5:lbw=INS")
    assert spec.block_weights == "INS"
    out = tmp_path / "lbw.safetensors"
    bake_adapters(str(models["tiny-sd1"]), [spec], out, "fp32")
    expected = load_pipeline(str(models["tiny-sd1"]))
    apply_loha(expected, a, unet_strength=0.8, text_encoder_strength=0.5, block_weights="INS")
    _assert_same_weights(expected, _from_single_file("tiny-sd1", out, models["tiny-sd1"]), torch.float32)
    assert _changed_parts(_merged(models["tiny-sd1"], [(a, 0.8, 0.5)]), expected)  # INS does change something
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()[bake.METADATA_KEY])["adapters"][0]["block_weights"] == "INS"


# Real-size UNet configs (SD 1.5, SD 2.x, SDXL base) built on the meta device: no weights, only the key layout.
# family -> keys of the real checkpoint's model.diffusion_model.* (SD 1.x / 2.x: 686, SDXL base: 1680)
_FULL_UNET_KEYS = {"sd1": 686, "sd2": 686, "sdxl": 1680}


def _tagged(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor of a meta-device state dict as a real one of its shape holding its own index everywhere
    (an expanded scalar: no memory for a real-size model)."""
    return {k: torch.tensor(float(i)).expand(v.shape) for i, (k, v) in enumerate(state.items())}


def _assert_same_tagged(converted: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """diffusers' converter gave every key back with its own tensor: same shape, same tag (two tensors of one
    shape swapped, e.g. to_q and to_k, fail here; a transpose of a non-square one fails on the shape)."""
    assert converted.keys() == state.keys()
    for k, v in state.items():
        got = converted[k]
        assert got.shape == v.shape, k
        assert float(got[(0,) * got.ndim]) == float(v[(0,) * v.ndim]), k


@pytest.mark.parametrize("family", sorted(_FULL_UNET_KEYS))
def test_real_size_layouts_convert_back_through_diffusers(family):
    """Our keys for real-size UNets and the SD VAE are exactly what diffusers' LDM -> diffusers converters map
    back to every diffusers key, each to its own tensor of its shape; the UNet has as many keys as the real
    checkpoints' model.diffusion_model.* (686 for SD 1.x / 2.x, 1680 for SDXL base). The values themselves go
    through diffusers bit for bit in the tiny-model tests above."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from sd_loha.architectures import ARCHITECTURE_OF_FAMILY, SD_VAE, build_model, meta_unet

    n_keys = _FULL_UNET_KEYS[family]
    unet = meta_unet(ARCHITECTURE_OF_FAMILY[family].unet)
    vae = build_model("AutoencoderKL", SD_VAE, meta=True)
    unet_state, vae_state = _tagged(unet.state_dict()), _tagged(vae.state_dict())
    ours = {"model.diffusion_model." + k: v for k, v in bake.unet_to_original(unet_state, unet.config).items()}
    assert len(ours) == n_keys
    _assert_same_tagged(convert_ldm_unet_checkpoint(ours, dict(unet.config)), unet_state)
    ours = {"first_stage_model." + k: v for k, v in bake.vae_to_original(vae_state).items()}
    _assert_same_tagged(convert_ldm_vae_checkpoint(ours, dict(vae.config)), vae_state)
    assert ours["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)


def test_folder_output_survives_a_failed_swap(adapters, tmp_path, monkeypatch, one_thread):
    """When putting the new folder in place fails after the old one was moved aside, the old one comes back whole
    and nothing hidden is left beside it."""
    import os

    a, _ = adapters["tiny-sd1"]
    out = tmp_path / "merged"
    bake_adapters("tiny-sd1", [(a, 0.5, 0.5)], out, "fp32")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []
    real_replace, real_rename = os.replace, os.rename

    def flaky(real):
        def move(src, dst, *args, **kwargs):
            if Path(dst) == out and Path(src).parent == tmp_path:
                calls.append(src)
                if len(calls) == 1:  # the new folder's move into place: the old one is aside by now
                    raise OSError(5, "Input/output error")
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "replace", flaky(real_replace))
    monkeypatch.setattr(os, "rename", flaky(real_rename))
    with pytest.raises(OSError):
        bake_adapters("tiny-sd1", [(a, 1.0, 1.0)], out, "fp16")
    monkeypatch.undo()
    assert calls
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp or renamed-away folder left


def test_record_names_the_base_without_its_local_path(models, adapters, tmp_path, one_thread):
    """A local base is recorded by its name and a hash of its weights (the file's sha256 for a single file,
    the same for a copy of a folder elsewhere), never by the path it had on the merging machine."""
    a, _ = adapters["tiny-sd1"]
    single = tmp_path / "base-single.safetensors"
    bake_adapters(str(models["tiny-sd1"]), [(a, 0.0, 0.0)], single, "fp32")

    def record(path: Path) -> dict:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()[bake.METADATA_KEY])

    first = record(single)
    assert first["base_model"] == models["tiny-sd1"].name and str(tmp_path.parent) not in json.dumps(first)
    assert len(first["base_model_sha256"]) == 64
    import shutil

    moved = tmp_path / "elsewhere" / models["tiny-sd1"].name
    shutil.copytree(models["tiny-sd1"], moved)
    bake_adapters(str(moved), [(a, 0.0, 0.0)], tmp_path / "again.safetensors", "fp32")
    assert record(tmp_path / "again.safetensors")["base_model_sha256"] == first["base_model_sha256"]

    # a single-file base (loading one needs diffusers' configs from the hub, so only its identity is checked here)
    assert bake.base_model_identity(str(single)) == {"name": single.name,
                                                     "sha256": hashlib.sha256(single.read_bytes()).hexdigest()}
    assert bake.base_model_identity("tiny-sd1") == {"name": "tiny-sd1"}


def test_cli_merge_refuses_to_replace_its_base(models, adapters, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setattr(bake, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    a, _ = adapters["tiny-sd1"]
    base = tmp_path / "base"
    shutil.copytree(models["tiny-sd1"], base)
    for out in (base, tmp_path / "x" / ".." / "base"):
        assert main(["merge", "--model", str(base), "--loha", str(a), "--out", str(out)]) == 2
        assert "is the base model" in capsys.readouterr().err
    assert (base / "model_index.json").is_file()


def test_cli_merge_accepts_a_peft_folder(adapters, tmp_path, capsys, one_thread):
    """apply_loha reads PEFT adapter folders; merge takes them too and records their weights' hashes."""
    from sd_loha.peft_format import convert_to_peft

    a, _ = adapters["tiny-sd1"]
    peft_dir = tmp_path / "peft"
    convert_to_peft(a, peft_dir, model="tiny-sd1")
    out, ref = tmp_path / "from-peft.safetensors", tmp_path / "from-file.safetensors"
    assert main(["merge", "--model", "tiny-sd1", "--loha", f"{peft_dir}:0.7", "--out", str(out), "--dtype", "fp32"]) == 0
    assert main(["merge", "--model", "tiny-sd1", "--loha", f"{a}:0.7", "--out", str(ref), "--dtype", "fp32"]) == 0
    got, want = load_file(out), load_file(ref)
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)
    with safe_open(str(out), "pt") as f:
        entry = json.loads(f.metadata()[bake.METADATA_KEY])["adapters"][0]
    assert entry["file"] == "peft" and set(entry["peft_addnet_hashes"]) == {"unet", "text_encoder"}
