"""Each tiny family (SD1.x, SD2.x v-prediction, SDXL) trains a few steps, UNet + text encoder(s), and the file
it writes loads everywhere: sd-loha's loader with strict=True on a fresh pipeline, and the real LyCORIS
package, whose modules compute the same layer outputs as our merged layers."""

from __future__ import annotations

import json

import pytest
import torch

from sd_loha.train.events import Progress
from sd_loha.train.loop import train

from .helpers import assert_file_loads_everywhere, base_config, read_file

FAMILIES = {
    # name: (config overrides, expected metadata, text-encoder parts)
    "tiny-sd1": (dict(preset="full", conv_dim=4, conv_alpha=2.0),
                 {"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora",
                  "modelspec.prediction_type": "epsilon"}, ("te",)),
    "tiny-sd2": (dict(preset="attn-mlp"),
                 {"ss_base_model_version": "sd_v2_v", "modelspec.architecture": "stable-diffusion-v2-768-v/lora",
                  "modelspec.prediction_type": "v", "ss_v2": "True"}, ("te",)),
    "tiny-sdxl": (dict(preset="full", conv_dim=2, conv_alpha=1.0),
                  {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
                  ("te1", "te2")),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_and_file_loads_everywhere(tmp_path, monkeypatch, family):
    overrides, expected_meta, te_parts = FAMILIES[family]
    events = []
    result = train(base_config(tmp_path / "out", pretrained_model=family, max_train_steps=4, **overrides),
                   progress=False, on_event=events.append)
    assert result.steps == 4 and not result.stopped
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3, 4]
    assert result.output == tmp_path / "out" / "loha.safetensors" and result.output.is_file()

    tensors, meta = read_file(result.output)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    # metadata: what A1111/ComfyUI/kohya tools read
    assert meta["ss_network_module"] == "lycoris.kohya"
    for k, v in expected_meta.items():
        assert meta[k] == v, k
    assert meta["ss_steps"] == "4"
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags["demo_images"]["sdlohastyle"] == 16 and tags["demo_images"]["poster"] == 16
    assert json.loads(meta["ss_dataset_dirs"]) == {"demo_images": {"n_repeats": 1, "img_count": 16}}
    assert json.loads(meta["ss_network_args"])["algo"] == "loha"
    # every module got a gradient (its zero-initialised hada_w2_a moved) except, on SDXL, CLIP-L's last layer:
    # SDXL reads that encoder's penultimate hidden states, so its last layer never influences the UNet
    untrained = sorted(k for k, t in tensors.items() if k.endswith("hada_w2_a") and not t.abs().sum())
    if family == "tiny-sdxl":
        assert untrained and all(k.startswith("lora_te1_text_model_encoder_layers_1_") for k in untrained), untrained
    else:
        assert untrained == []
    if overrides.get("conv_dim"):
        assert any("resnets_0_conv1." in k or "_in_layers_2." in k for k in tensors), \
            "preset full with conv_dim > 0 must adapt the ResNets' 3x3 convs"

    assert_file_loads_everywhere(result.output, family, monkeypatch, te_parts)
