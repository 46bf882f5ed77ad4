"""Files move both ways between sd-loha and the real LyCORIS package (lycoris-lora 4.1.3).

LyCORIS's merge helpers apply alpha/r twice (FORMAT.md), so we compare against its forward pass:
for every adapted layer, the layer output of LyCORIS's patched module equals the output of the same
layer in sd-loha's merged pipeline.
"""

import pytest
import torch
from torch import nn

from sd_loha import add_loha, apply_loha
from sd_loha.naming import text_encoder_module_names, unet_module_names

lycoris_kohya = pytest.importorskip("lycoris.kohya")

RTOL, ATOL = 1e-4, 1e-5  # fp32; merged weights vs on-the-fly delta differ only by summation order

# LyCORIS's own "full" preset crashes on diffusers UNets (FORMAT.md); name the classes ourselves.
# create_network re-applies its `preset` argument, so ours goes in as a preset file.
LYCO_PRESET_TOML = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


class _TextModelShim(nn.Module):
    """Gives transformers-5 CLIPTextModel the `text_model.` level every existing file names, so LyCORIS
    (which names modules from the live tree) sees the names A1111 and ComfyUI use."""

    def __init__(self, te: nn.Module) -> None:
        super().__init__()
        self.text_model = te if not hasattr(te, "text_model") else te.text_model


def _randomize(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _lyco_network(pipe, tmp_path, *, use_tucker: bool, shim_te: bool):
    preset = tmp_path / "preset.toml"
    preset.write_text(LYCO_PRESET_TOML)
    te = _TextModelShim(pipe.text_encoder) if shim_te else pipe.text_encoder
    net = lycoris_kohya.create_network(
        1.0, 4, 2.0, pipe.vae, te, pipe.unet, algo="loha", conv_dim=3, conv_alpha=1.5, use_tucker=use_tucker,
        preset=str(preset),
    )
    net.apply_to(te, pipe.unet, apply_text_encoder=True, apply_unet=True)
    return net, te


def _layer_input(module: nn.Module, gen: torch.Generator) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return torch.randn(3, module.in_features, generator=gen)
    return torch.randn(2, module.in_channels, 9, 9, generator=gen)


def _check_layers(pairs, gen):
    assert pairs
    for name, ours, theirs in pairs:
        x = _layer_input(ours, gen)
        torch.testing.assert_close(ours(x), theirs(x), rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("use_tucker", [False, True], ids=["flat", "tucker"])
def test_lycoris_written_file_loads_exactly(tmp_path, tiny_pipe, use_tucker):
    ref = tiny_pipe("tiny-sd1")
    net, _ = _lyco_network(ref, tmp_path, use_tucker=use_tucker, shim_te=False)  # transformers-5 names: no text_model
    _randomize(net.parameters(), 0)
    path = tmp_path / "lyco.safetensors"
    net.save_weights(str(path), torch.float32, {})

    pipe = tiny_pipe("tiny-sd1")
    report = apply_loha(pipe, path, strict=True)
    assert report.unmatched == []
    assert report.patched["unet"] > 0 and report.patched["te"] > 0
    kinds = {type(m.org_module[0]).__name__ + str(getattr(m.org_module[0], "kernel_size", "")) for m in net.loras}
    assert "Conv2d(3, 3)" in kinds and "Linear" in kinds
    if use_tucker:
        assert any(getattr(m, "tucker", False) for m in net.loras)

    tables = {"lora_unet": (unet_module_names(pipe.unet), pipe.unet),
              "lora_te": (text_encoder_module_names(pipe.text_encoder, "lora_te"), pipe.text_encoder)}
    pairs = []
    for m in net.loras:
        prefix = "lora_unet" if m.lora_name.startswith("lora_unet") else "lora_te"
        table, model = tables[prefix]
        ours = model.get_submodule(table[m.lora_name])
        pairs.append((m.lora_name, ours, m.org_module[0]))  # LyCORIS patched the original's forward
    assert len(pairs) == report.total
    _check_layers(pairs, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("use_tucker", [False, True], ids=["flat", "tucker"])
def test_sd_loha_written_file_loads_in_lycoris(tmp_path, tiny_pipe, use_tucker):
    pipe = tiny_pipe("tiny-sd1")
    network = add_loha(pipe, preset="full", rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.5, use_tucker=use_tucker)
    _randomize(network.parameters(), 2)
    path = tmp_path / "ours.safetensors"
    network.save(path, dtype=torch.float32)
    written = {r["key"] for r in network.listing()}
    network.remove()

    merged = tiny_pipe("tiny-sd1")
    apply_loha(merged, path, strict=True)

    ref = tiny_pipe("tiny-sd1")
    te = _TextModelShim(ref.text_encoder)
    lyco, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), ref.vae, te, ref.unet, for_inference=True)
    lyco.apply_to(te, ref.unet, apply_text_encoder=True, apply_unet=True)
    state = lyco.load_weights(str(path))
    assert "missing keys" not in state and "unexpected keys" not in state, state
    assert {m.lora_name for m in lyco.loras} == written  # LyCORIS found every module we wrote

    tables = {"lora_unet": (unet_module_names(merged.unet), merged.unet),
              "lora_te": (text_encoder_module_names(merged.text_encoder, "lora_te"), merged.text_encoder)}
    pairs = []
    for m in lyco.loras:
        prefix = "lora_unet" if m.lora_name.startswith("lora_unet") else "lora_te"
        table, model = tables[prefix]
        pairs.append((m.lora_name, model.get_submodule(table[m.lora_name]), m.org_module[0]))
    _check_layers(pairs, torch.Generator().manual_seed(3))
