"""SD 3.x through the tools: generate (flow samplers, bypass, low-precision bases), merge (diffusers folder and an
original-layout single file diffusers reads back), convert (LoRA for kohya / ComfyUI and for diffusers'
load_lora_weights, PEFT both ways), inspect and meta. Files are made with the names layer on tiny-sd3."""

from __future__ import annotations

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


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_sd3_low_precision_base_stores_transformer_and_text_encoders(kind, sd3_file):
    """--base-weight-dtype on SD 3.x stores the transformer, the CLIPs and T5 low; the LoHA (bypass) still acts."""
    if kind == "int8":
        pytest.importorskip("bitsandbytes")
    from sd_loha.train.lowmem import stored_as

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
