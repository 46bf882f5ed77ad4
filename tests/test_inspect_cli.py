"""`sd-loha inspect FILE [--json] [--norms]`: what a file holds and what it was made for."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sd_loha.blocks import BLOCK_IDS, OUTSIDE_BLOCKS
from sd_loha.cli import main

from .loader_helpers import make_loha_file


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    from sd_loha.models import build_tiny_pipeline

    path = tmp_path_factory.mktemp("xl") / "xl_style.safetensors"
    rows = make_loha_file(build_tiny_pipeline("tiny-sdxl"), path, rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.5,
                          metadata={"ss_output_name": "xl_style", "modelspec.trigger_phrase": "zxq style"})
    return path, rows


def _hand_file(path, in_features: int, metadata=None):
    """A one-module file whose attn2_to_k takes `in_features` (the text-encoder width)."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    g = torch.Generator().manual_seed(0)
    sd = {f"{name}.hada_w1_a": torch.randn(320, 8, generator=g), f"{name}.hada_w1_b": torch.randn(8, in_features, generator=g),
          f"{name}.hada_w2_a": torch.randn(320, 8, generator=g), f"{name}.hada_w2_b": torch.randn(8, in_features, generator=g),
          f"{name}.alpha": torch.tensor(4.0)}
    save_file(sd, str(path), metadata=metadata)
    return path


def test_inspect_text(capsys, sdxl_file):
    path, rows = sdxl_file
    code, out, err = _run(capsys, "inspect", str(path))
    assert code == 0 and err == ""
    assert "made for:      SDXL" in out
    assert f"modules:       {len(rows)}  (loha: {len(rows)})" in out
    n_te1 = sum(r["part"] == "te1" for r in rows)
    n_te2 = sum(r["part"] == "te2" for r in rows)
    assert f"text encoder 1 (CLIP-L):    layers {n_te1}" in out
    assert f"text encoder 2 (CLIP-G):    layers {n_te2}" in out
    n_unet = sum(r["part"] == "unet" for r in rows)
    unet_line = next(line for line in out.splitlines() if line.strip().startswith("UNet:"))
    assert sum(int(x.split()[-1]) for x in unet_line.split(":", 1)[1].split(",")) == n_unet
    n_conv = sum(r["kind"] == "conv" for r in rows)
    assert f"rank 4, alpha 2: {len(rows) - n_conv} modules" in out
    assert f"rank 3, alpha 1.5: {n_conv} modules" in out
    assert "ss_network_module: lycoris.kohya" in out
    assert "modelspec.trigger_phrase: zxq style" in out
    assert "ss_base_model_version: sdxl_base_v1-0" in out


def test_inspect_json(capsys, sdxl_file):
    path, rows = sdxl_file
    code, out, _ = _run(capsys, "inspect", str(path), "--json", "--norms")
    assert code == 0
    s = json.loads(out)
    assert s["architecture"] == "SDXL"
    assert s["algorithms"] == {"loha": len(rows)}
    assert s["modules"] == len(rows)
    assert s["parts"]["text encoder 1 (CLIP-L)"] == {"layers": sum(r["part"] == "te1" for r in rows)}
    assert sum(s["parts"]["UNet"].values()) == sum(r["part"] == "unet" for r in rows)
    assert s["metadata"]["ss_output_name"] == "xl_style"
    assert s["metadata"]["ss_network_args"] and json.loads(s["metadata"]["ss_network_args"])["algo"] == "loha"
    assert s["unsupported_modules"] == []
    norms = s["delta_norm_by_block"]
    assert {k.split(":")[0] for k in norms} == {"unet", "te1", "te2"}
    # blocks named as block weights name them (LoRA Block Weight's ids), whatever naming the file uses
    assert {k.split(":")[1] for k in norms if not k.startswith("unet:")} == {"BASE"}
    assert {"unet:M00", "unet:IN04", "unet:OUT00"} <= set(norms)
    assert {k.split(":")[1] for k in norms} <= {*BLOCK_IDS, OUTSIDE_BLOCKS}
    assert all(v > 0 for v in norms.values())


@pytest.mark.parametrize("width,label", [(768, "SD 1.x"), (1024, "SD 2.x"), (2048, "SDXL")])
def test_architecture_from_cross_attention_width(capsys, tmp_path, width, label):
    path = _hand_file(tmp_path / "hand.safetensors", width)
    code, out, _ = _run(capsys, "inspect", str(path), "--json")
    assert code == 0 and json.loads(out)["architecture"] == label


def test_architecture_from_metadata_and_unknown(capsys, tmp_path):
    # 64 is no real text width: metadata decides, and without it the answer is "unknown"
    p = _hand_file(tmp_path / "meta.safetensors", 64, metadata={"ss_base_model_version": "sd_v2_v"})
    assert json.loads(_run(capsys, "inspect", str(p), "--json")[1])["architecture"] == "SD 2.x"
    p = _hand_file(tmp_path / "none.safetensors", 64)
    summary = json.loads(_run(capsys, "inspect", str(p), "--json")[1])
    assert summary["architecture"] == "unknown" and summary["metadata"] == {}


def test_inspect_mixed_file(capsys, tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "lora_unet_a_attn1_to_q.hada_w1_a": torch.randn(8, 2, generator=g),
        "lora_unet_a_attn1_to_q.hada_w1_b": torch.randn(2, 8, generator=g),
        "lora_unet_a_attn1_to_q.hada_w2_a": torch.randn(8, 2, generator=g),
        "lora_unet_a_attn1_to_q.hada_w2_b": torch.randn(2, 8, generator=g),
        "lora_unet_a_resnets_0_conv1.lora_up.weight": torch.randn(8, 4, 1, 1, generator=g),
        "lora_unet_a_resnets_0_conv1.lora_down.weight": torch.randn(4, 8, 3, 3, generator=g),
        "lora_unet_a_resnets_0_conv1.alpha": torch.tensor(2.0),
        "lora_unet_a_resnets_0_conv2.lora_up.weight": torch.randn(8, 4, 1, 1, generator=g),
        "lora_unet_a_resnets_0_conv2.lora_down.weight": torch.randn(4, 8, 1, 1, generator=g),
        "lora_unet_a_resnets_0_conv2.lora_mid.weight": torch.randn(4, 4, 3, 3, generator=g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 4, generator=g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_b.lokr_w1": torch.randn(2, 2, generator=g),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(sd, str(path))
    code, out, _ = _run(capsys, "inspect", str(path), "--json", "--norms")
    s = json.loads(out)
    assert code == 0
    assert s["algorithms"] == {"loha": 1, "lora": 2, "lora (Tucker)": 1}
    assert s["parts"]["UNet"] == {"attention": 1, "conv/resnet": 2}
    assert s["parts"]["text encoder"] == {"layers": 1}
    assert s["rank_alpha"] == {"rank 4, alpha none": 2, "rank 2, alpha none": 1, "rank 4, alpha 2": 1}
    assert s["unsupported_modules"] == ["lora_unet_b"]
    code, out, _ = _run(capsys, "inspect", str(path))
    assert "not mergeable: 1 modules (unknown algorithm): lora_unet_b" in out


def test_inspect_bad_files(capsys, tmp_path):
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"a": 1}))
    code, out, err = _run(capsys, "inspect", str(evil))
    assert code == 2 and out == ""
    assert str(evil) in err and "pickle" in err
    code, _, err = _run(capsys, "inspect", str(tmp_path / "nope.safetensors"))
    assert code == 2 and "no such file" in err
