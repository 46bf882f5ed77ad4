"""SD 3.x through the tools: generate (flow samplers, bypass, low-precision bases), merge (diffusers folder and an
original-layout single file diffusers reads back), convert (LoRA for kohya / ComfyUI and for diffusers'
load_lora_weights, PEFT both ways), inspect and meta. Files are made with the names layer on tiny-sd3."""

from __future__ import annotations

from sd_loha.schedulers import FLOW_SAMPLERS_DIFFUSERS
from sd_loha.version import diffusers_at_least

import numpy as np
import pytest
import torch
from PIL import Image

from sd_loha.cli import main
from sd_loha.generate import AdapterSpec, GenerationSession
from sd_loha.models import build_tiny_pipeline

from .sd3_helpers import write_sd3_loha

GEN = dict(seed=3, steps=2, width=64, height=64, guidance_scale=4.5)


@pytest.fixture(scope="module")
def sd3_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3tools") / "sd3style.safetensors"
    return write_sd3_loha(build_tiny_pipeline("tiny-sd3"), path)


@pytest.fixture(scope="module")
def session():
    return GenerationSession("tiny-sd3", device="cpu")


def _image(session: GenerationSession, **kw) -> tuple[np.ndarray, str]:
    image, text = session.generate("a red dog", **{**GEN, **kw})[0]
    return np.asarray(image, dtype=np.int16), text


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def test_sd3_samples_with_flow_samplers_only(session):
    """SD 3.x defaults to its flow Euler, takes the flow samplers (DPM++ with the pipeline's shift), and refuses a
    noise-prediction sampler by name, before any step runs."""
    session.set_adapters([])
    euler, text = _image(session)
    assert "Sampler: Euler," in text and type(session.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    heun, text = _image(session, scheduler="heun", steps=3)
    assert "Sampler: Heun," in text and type(session.pipe.scheduler).__name__ == "FlowMatchHeunDiscreteScheduler"
    if not diffusers_at_least(FLOW_SAMPLERS_DIFFUSERS):  # the floor run: refused by name before a step
        with pytest.raises(ValueError, match="'dpmpp_2m' on an SD 3.x model needs diffusers 0.33"):
            _image(session, scheduler="dpmpp_2m", steps=3)
        return
    _, text = _image(session, scheduler="dpmpp_2m", steps=3)
    sched = session.pipe.scheduler
    assert "Sampler: DPM++ 2M," in text and sched.config.use_flow_sigmas and sched.config.flow_shift == 3.0
    assert sched.config.prediction_type == "flow_prediction"
    # switching back builds from the base's own config, not the last sampler's
    again, _ = _image(session, scheduler="euler")
    assert np.array_equal(euler, again) and np.abs(euler - heun).max() > 0
    with pytest.raises(ValueError, match="'euler_a' integrates a noise prediction .* choose one of euler, heun"):
        _image(session, scheduler="euler_a")


def test_sd3_generation_with_a_loha_merged_and_bypassed(session, sd3_file):
    """Strength changes the picture; the bypass (--no-merge) draws the merge's picture; removing restores the base."""
    session.set_adapters([])
    base, _ = _image(session)
    session.set_adapters([AdapterSpec(str(sd3_file), 0.8)])
    merged, text = _image(session)
    assert "<lora:sd3style:0.8>" in text and np.abs(merged - base).max() > 10
    session.set_adapters([AdapterSpec(str(sd3_file), 0.8)], merge=False)
    bypassed, _ = _image(session)
    assert np.abs(bypassed - merged).max() <= 2
    session.set_adapters([AdapterSpec(str(sd3_file), 0.0)], merge=False)
    zero, _ = _image(session)
    session.set_adapters([])
    assert np.array_equal(zero, base) and np.array_equal(_image(session)[0], base)


@pytest.mark.parametrize("kind", ["fp8", "int8", "nf4"])
def test_sd3_low_precision_base_stores_transformer_and_text_encoders(kind, sd3_file):
    """--base-weight-dtype on SD 3.x stores the transformer, the CLIPs and T5 low; the LoHA (bypass) still acts."""
    if kind != "fp8":
        pytest.importorskip("bitsandbytes")  # an optional dependency of quantized bases, not of sd-loha
    from sd_loha.train.lowmem import diffusers_has_layerwise_casting, stored_as

    if kind == "fp8" and not diffusers_has_layerwise_casting():  # the floor run: refused by name before loading
        with pytest.raises(ValueError, match='"fp8" needs diffusers 0.33 or newer'):
            GenerationSession("tiny-sd3", device="cpu", base_weight_dtype=kind)
        return
    s = GenerationSession("tiny-sd3", device="cpu", base_weight_dtype=kind)
    want = kind
    for model in (s.pipe.transformer, s.pipe.text_encoder, s.pipe.text_encoder_2, s.pipe.text_encoder_3):
        kinds = [stored_as(m) for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert want in kinds, f"{type(model).__name__}: no layer stored as {want}"
    base, _ = _image(s)
    s.set_adapters([AdapterSpec(str(sd3_file), 1.0)])
    assert np.abs(_image(s)[0] - base).max() > 10


def test_cli_generate_sd3_no_merge(sd3_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--model", "tiny-sd3", "--loha", f"{sd3_file}:0.8", "--prompt", "a red dog",
                 "--seed", "2", "--steps", "2", "--width", "64", "--height", "64", "--no-merge",
                 "--output-dir", str(out)]) == 0
    png = capsys.readouterr().out.strip().splitlines()[-1]
    info = Image.open(png).info["parameters"]
    assert "Sampler: Euler," in info and "CFG scale: 4.5," in info and "<lora:sd3style:0.8>" in info
    assert main(["generate", "--model", "tiny-sd3", "--prompt", "x", "--scheduler", "ddim", "--steps", "2",
                 "--output-dir", str(out)]) == 2
    assert "'ddim' integrates a noise prediction" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3base") / "tiny-sd3"
    build_tiny_pipeline("tiny-sd3").save_pretrained(folder)
    return folder


def _merged_reference(path, strength: float, te_strength: float):
    from sd_loha.merge import apply_loha

    pipe = build_tiny_pipeline("tiny-sd3")
    apply_loha(pipe, str(path), unet_strength=strength, text_encoder_strength=te_strength)
    return pipe


PARTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def test_merge_sd3_into_one_original_layout_file_diffusers_reads_back(sd3_file, sd3_folder, tmp_path, capsys):
    """The single file holds the MMDiT under model.diffusion_model. (qkv fused, adaLN halves in the original order)
    and the CLIPs, T5 and VAE as SAI's files do; diffusers' own from_single_file (offline, the local configs) reads
    every tensor back equal to apply_loha's merge; the CLIP-L projection excepted, which diffusers sets to the
    identity for every SD3 file."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors import safe_open

    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--model", "tiny-sd3", "--loha", f"{sd3_file}:0.7:0.5", "--out", str(out),
                 "--dtype", "fp32"]) == 0
    assert "SD 3.x" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in keys
    assert "model.diffusion_model.final_layer.adaLN_modulation.1.weight" in keys
    assert {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
            "text_encoders.t5xxl.transformer.shared.weight", "first_stage_model.decoder.conv_out.weight"} <= keys
    ref = _merged_reference(sd3_file, 0.7, 0.5)
    base = build_tiny_pipeline("tiny-sd3")
    t = SD3Transformer2DModel.from_single_file(str(out), config=str(sd3_folder), subfolder="transformer",
                                               local_files_only=True)
    want, got = ref.transformer.state_dict(), t.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # the merge changed the swapped layers, and they came back in diffusers' order
    assert not torch.equal(want["norm_out.linear.weight"], base.transformer.state_dict()["norm_out.linear.weight"])
    pipe = StableDiffusion3Pipeline.from_single_file(str(out), config=str(sd3_folder), local_files_only=True)
    for attr in PARTS:
        want, got = getattr(ref, attr).state_dict(), getattr(pipe, attr).state_dict()
        differ = [k for k in want if not torch.equal(want[k], got[k])]
        assert differ == (["text_projection.weight"] if attr == "text_encoder" else []), attr
    from sd_loha.models import load_pipeline

    ours = load_pipeline(str(out), config=str(sd3_folder))  # sd-loha's loader reads it back the same way
    assert all(torch.equal(v, ours.transformer.state_dict()[k]) for k, v in ref.transformer.state_dict().items())
    changed_te = [k for k, v in ref.text_encoder_3.state_dict().items()
                  if not torch.equal(v, base.text_encoder_3.state_dict()[k])]
    assert changed_te, "the T5 part of the LoHA changed nothing"


def test_merge_sd3_into_a_diffusers_folder(sd3_file, sd3_folder, tmp_path):
    from sd_loha.bake import bake_adapters
    from sd_loha.models import load_pipeline

    out = tmp_path / "merged"
    report = bake_adapters(str(sd3_folder), [(str(sd3_file), 1.0)], out, "fp32")
    assert report.layout == "diffusers" and report.family == "SD 3.x"
    loaded, ref = load_pipeline(str(out)), _merged_reference(sd3_file, 1.0, 1.0)
    base = build_tiny_pipeline("tiny-sd3")
    for attr in PARTS:
        want, got = getattr(ref, attr).state_dict(), getattr(loaded, attr).state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), attr
    assert not torch.equal(loaded.transformer.proj_out.weight, base.transformer.proj_out.weight)


# ---------------------------------------------------------------------------------------------
# convert --to lora
# ---------------------------------------------------------------------------------------------

MODELS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _weights(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {attr: {k: v.detach().clone() for k, v in getattr(pipe, attr).state_dict().items()} for attr in MODELS}


@pytest.fixture(scope="module")
def loha_merged(sd3_file):
    return _weights(_merged_reference(sd3_file, 1.0, 1.0))


def _kohya_lora_applied(path) -> dict[str, dict[str, torch.Tensor]]:
    """A kohya SD3 LoRA put on tiny-sd3 by this test alone, as kohya's lora_sd3 and ComfyUI do: each module's
    (alpha / r) up @ down, a fused qkv's rows split q|k|v over the diffusers layers, the (shift, scale) rows of
    the two swapped adaLN layers exchanged (diffusers' swap_scale_shift)."""
    from diffusers.loaders.single_file_utils import swap_scale_shift
    from safetensors.torch import load_file

    pipe = build_tiny_pipeline("tiny-sd3")
    sd = load_file(str(path))
    n = pipe.transformer.config.num_layers
    fused = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
             "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
    single = {"x_block.attn.proj": "attn.to_out.0", "context_block.attn.proj": "attn.to_add_out",
              "x_block.attn2.proj": "attn2.to_out.0", "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
              "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
              "x_block.adaLN_modulation.1": "norm1.linear", "context_block.adaLN_modulation.1": "norm1_context.linear"}
    top = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2", "context_embedder": "context_embedder",
           "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
           "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out",
           "final_layer.adaLN_modulation.1": "norm_out.linear"}
    layers: dict[str, list[str]] = {}
    for i in range(n):
        for o, d in fused.items():
            layers[f"lora_unet_joint_blocks_{i}_{o.replace('.', '_')}"] = [f"transformer_blocks.{i}.{x}" for x in d]
        for o, d in single.items():
            layers[f"lora_unet_joint_blocks_{i}_{o.replace('.', '_')}"] = [f"transformer_blocks.{i}.{d}"]
    for o, d in top.items():
        layers[f"lora_unet_{o.replace('.', '_')}"] = [d]
    swapped = {f"lora_unet_joint_blocks_{n - 1}_context_block_adaLN_modulation_1", "lora_unet_final_layer_adaLN_modulation_1"}
    modules = {k.split(".")[0] for k in sd}
    with torch.no_grad():
        for name in modules:
            up, down = sd[f"{name}.lora_up.weight"].float(), sd[f"{name}.lora_down.weight"].float()
            delta = (up.flatten(1) @ down.flatten(1)) * float(sd[f"{name}.alpha"]) / down.shape[0]
            if name.startswith("lora_unet_"):
                if name in swapped:
                    delta = swap_scale_shift(delta, dim=0)
                paths = [p for p in layers[name] if _has(pipe.transformer, p)]
                for p, piece in zip(paths, delta.chunk(len(paths))):
                    w = pipe.transformer.get_submodule(p).weight
                    w += piece.reshape(w.shape)
            else:
                te, path = name.split("_", 2)[1], name.split("_", 2)[2]
                model = {"te1": pipe.text_encoder, "te2": pipe.text_encoder_2, "te3": pipe.text_encoder_3}[te]
                module = next(m for p, m in model.named_modules() if p.replace(".", "_") in (path, path.removeprefix("text_model_")))
                module.weight += delta
    return _weights(pipe)


def _has(model, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _max_difference(a, b, models=MODELS) -> float:
    return max((a[m][k] - b[m][k]).abs().max().item() for m in models for k in a[m])


def test_convert_sd3_to_a_kohya_lora_at_full_rank_equals_the_loha(sd3_file, loha_merged, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "k.safetensors"
    assert main(["convert", str(sd3_file), "--to", "lora", "--rank", "64", "--model", "tiny-sd3",
                 "--out", str(out)]) == 0
    assert "joint_blocks_0" in capsys.readouterr().out  # the report groups by joint block
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight" in keys
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in keys
    assert meta["ss_network_module"] == "networks.lora_sd3"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert _max_difference(_kohya_lora_applied(out), loha_merged) < 1e-4
    # a low rank is an approximation: the same reference then differs
    low = tmp_path / "k2.safetensors"
    assert main(["convert", str(sd3_file), "--to", "lora", "--rank", "1", "--model", "tiny-sd3",
                 "--out", str(low)]) == 0
    assert _max_difference(_kohya_lora_applied(low), loha_merged) > 1e-2


def test_convert_sd3_to_a_diffusers_lora_that_load_lora_weights_reads(sd3_file, loha_merged, tmp_path, capsys):
    """diffusers' own StableDiffusion3Pipeline.load_lora_weights + fuse_lora gives the LoHA's merged weights on
    the transformer and both CLIPs; diffusers loads no T5 LoRA, which the report says."""
    out = tmp_path / "d.safetensors"
    assert main(["convert", str(sd3_file), "--to", "lora", "--rank", "64", "--model", "tiny-sd3",
                 "--lora-form", "diffusers", "--out", str(out)]) == 0
    assert "loads no T5 (text_encoder_3) LoRA" in capsys.readouterr().out
    pipe = build_tiny_pipeline("tiny-sd3")
    base = _weights(pipe)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)  # diffusers < 0.33 wants the name when offline
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    got = _weights(pipe)
    clip_and_mmdit = MODELS[:3]
    assert _max_difference(got, loha_merged, clip_and_mmdit) < 1e-4
    assert _max_difference(got, base, clip_and_mmdit) > 1e-2
    assert main(["convert", str(sd3_file), "--to", "peft", "--lora-form", "diffusers", "--out",
                 str(tmp_path / "p")]) == 2
    assert "--lora-form is for --to lora only" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# convert --to peft / --to kohya
# ---------------------------------------------------------------------------------------------


def test_convert_sd3_to_peft_loha_that_peft_merges_and_back_to_kohya(sd3_file, loha_merged, tmp_path):
    """kohya form -> PEFT LoHa folders (transformer/, text_encoder/ … text_encoder_3/): PEFT's own PeftModel on
    each model, merged, gives the LoHA's weights; PEFT -> kohya gives kohya's fused form back (q|k|v fused at the
    summed rank), which apply_loha merges to the same weights."""
    import json

    from peft import PeftModel
    from safetensors import safe_open

    folder = tmp_path / "peft"
    assert main(["convert", str(sd3_file), "--to", "peft", "--model", "tiny-sd3", "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(MODELS)
    config = json.loads((folder / "transformer" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOHA" and "transformer_blocks.0.attn.to_q" in config["target_modules"]
    pipe = build_tiny_pipeline("tiny-sd3")
    got = {}
    for attr in MODELS:
        merged = PeftModel.from_pretrained(getattr(pipe, attr), str(folder / attr)).merge_and_unload()
        got[attr] = {k: v.detach() for k, v in merged.state_dict().items()}
    assert _max_difference(got, loha_merged) < 1e-5

    # the PEFT folder itself is an adapter apply_loha (and so generate and merge) reads
    assert _max_difference(_weights(_merged_reference(folder, 1.0, 1.0)), loha_merged) < 1e-5

    back = tmp_path / "back.safetensors"
    assert main(["convert", str(folder), "--to", "kohya", "--model", "tiny-sd3", "--out", str(back)]) == 0
    with safe_open(str(back), "pt") as f:
        keys = set(f.keys())
        qkv = f.get_tensor("lora_unet_joint_blocks_0_x_block_attn_qkv.hada_w1_b")
    with safe_open(str(sd3_file), "pt") as f:
        rank = f.get_tensor("lora_unet_joint_blocks_0_x_block_attn_qkv.hada_w1_b").shape[0]
    assert "lora_unet_final_layer_adaLN_modulation_1.hada_w1_a" in keys and qkv.shape[0] == 3 * rank
    assert _max_difference(_weights(_merged_reference(back, 1.0, 1.0)), loha_merged) < 1e-5


def test_convert_sd3_to_peft_without_a_model_needs_a_real_size(sd3_file, tmp_path):
    """Without --model an SD 3.x file names its layers by the real architecture it fits; tiny-sd3's file fits none,
    and the error says what to pass. Nothing is written."""
    from sd_loha.io import AdapterFileError
    from sd_loha.peft_format import convert_to_peft

    with pytest.raises(AdapterFileError, match="no real SD 3.x architecture has; pass the base model"):
        convert_to_peft(sd3_file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# inspect, meta
# ---------------------------------------------------------------------------------------------


def _real_size_file(path, modules: dict[str, tuple[int, int]]):
    """A rank-1 LoHA on real-size SD 3.x layers (kohya names -> (out, in)), no metadata: names and shapes alone."""
    from safetensors.torch import save_file

    sd = {}
    for name, (out, inn) in modules.items():
        sd.update({f"{name}.hada_w1_a": torch.ones(out, 1), f"{name}.hada_w2_a": torch.ones(out, 1),
                   f"{name}.hada_w1_b": torch.ones(1, inn), f"{name}.hada_w2_b": torch.ones(1, inn),
                   f"{name}.alpha": torch.tensor(1.0)})
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("label, modules", [
    ("SD3 Medium", {"lora_unet_joint_blocks_0_x_block_adaLN_modulation_1": (6 * 1536, 1536),
                    "lora_unet_joint_blocks_23_x_block_attn_qkv": (3 * 1536, 1536)}),
    ("SD3.5 Medium", {"lora_unet_joint_blocks_0_x_block_attn2_qkv": (3 * 1536, 1536)}),
    ("SD3.5 Large", {"lora_unet_joint_blocks_37_x_block_mlp_fc1": (4 * 2432, 2432),
                     "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (4096, 4096)}),
])
def test_inspect_names_the_sd3_architecture_and_groups_modules_by_part(label, modules, tmp_path, capsys):
    path = _real_size_file(tmp_path / "f.safetensors", modules)
    assert main(["inspect", str(path), "--norms"]) == 0
    out = capsys.readouterr().out
    assert f"made for:      {label}\n" in out
    assert "transformer (MMDiT):" in out and "unknown" not in out
    if "te3" in str(modules):
        assert "text encoder 3 (T5-XXL):" in out


def test_inspect_groups_every_sd3_form_alike(sd3_file, tmp_path):
    """kohya, ComfyUI (dotted) and diffusers forms of one LoHA: the same parts; the transformer's roles by name;
    the size of the change per joint block."""
    from sd_loha.inspect import summarize

    pipe = build_tiny_pipeline("tiny-sd3")
    summaries = {form: summarize(write_sd3_loha(pipe, tmp_path / f"{form}.safetensors", form=form), delta_norms=True)
                 for form in ("kohya", "comfy", "diffusers")}
    for form, s in summaries.items():
        assert s["architecture"] == "SD3.5 Medium", form  # the file's modelspec: tiny-sd3 fits no real size
        assert set(s["parts"]) == {"transformer (MMDiT)", "text encoder 1 (CLIP-L)", "text encoder 2 (CLIP-G)",
                                   "text encoder 3 (T5-XXL)"}, form
        assert s["parts"]["transformer (MMDiT)"]["adaLN"] == 7, form  # 3 blocks x 2 streams + the final layer
    assert summaries["kohya"]["parts"]["transformer (MMDiT)"]["attention"] == 15
    assert summaries["diffusers"]["parts"]["transformer (MMDiT)"]["attention"] == 31  # q, k, v split
    norms = summaries["kohya"]["delta_norm_by_block"]
    assert {"transformer:joint_blocks_0", "transformer:joint_blocks_2", "te3:BASE"} <= set(norms)
    assert all(v > 0 for v in norms.values())


def test_meta_edits_an_sd3_file_and_keeps_its_tensors(sd3_file, tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    out = tmp_path / "titled.safetensors"
    assert main(["meta", str(sd3_file), "--title", "SD3 style", "--trigger", "sd3style", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["meta", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["modelspec.title"] == "SD3 style" and meta["modelspec.trigger_phrase"] == "sd3style"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    before, after = load_file(str(sd3_file)), load_file(str(out))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("cls, flow", [("FlowMatchEulerDiscreteScheduler", True), ("FlowMatchHeunDiscreteScheduler", True),
                                       ("DPMSolverMultistepScheduler", False), ("UniPCMultistepScheduler", False),
                                       ("EulerAncestralDiscreteScheduler", False), ("PNDMScheduler", False)])
def test_flow_schedulers_are_told_apart_from_their_config(cls, flow, tmp_path):
    """A scheduler built in code (no _class_name in its config, as the built-in models') and one read from a folder:
    only the flow-matching ones count as flow (DPM-Solver and UniPC have a dynamic-shift option too)."""
    import diffusers

    from sd_loha.schedulers import is_flow_config

    sched = getattr(diffusers, cls)()
    assert "_class_name" not in sched.config and is_flow_config(sched.config) is flow
    sched.save_pretrained(tmp_path)
    assert is_flow_config(getattr(diffusers, cls).load_config(tmp_path)) is flow
