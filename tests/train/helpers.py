"""Helpers of the trainer tests: a small base config, reading adapter files, the denoising loss of a pipeline."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from sd_loha.naming import text_encoder_module_names, unet_module_names
from sd_loha.toy.evaluate import denoising_mse
from sd_loha.train.report import LABEL_H, MIN_CELL

REPO = Path(__file__).resolve().parents[2]
DEMO_IMAGES = REPO / "sd_loha" / "assets" / "demo_images"
HELDOUT_IMAGES = REPO / "sd_loha" / "assets" / "demo_images_heldout"


def base_config(out: Path, **overrides) -> dict:
    """A few-step tiny-sd1 run on the demo images at 64 px with cached latents; writes only the adapter."""
    cfg = dict(
        pretrained_model="tiny-sd1",
        train_data_dir=str(DEMO_IMAGES),
        output_dir=str(out),
        resolution=64,
        min_bucket_reso=64,
        max_bucket_reso=128,
        bucket_reso_steps=64,
        cache_latents=True,
        train_batch_size=2,
        max_train_steps=4,
        learning_rate=1e-3,
        preset="attn-mlp",
        network_dim=4,
        network_alpha=2.0,
        train_text_encoder=True,
        save_state=False,
        save_precision="float",
        log_with="none",
        seed=0,
    )
    cfg.update(overrides)
    return cfg


def stop_at_step(step: int) -> tuple[threading.Event, list, object]:
    """(stop event, the events seen, on_event callback) that stops a run after optimizer step `step`, as the
    web UI's Stop button or Ctrl-C would."""
    from sd_loha.train.events import Progress

    stop, seen = threading.Event(), []

    def on_event(e) -> None:
        seen.append(e)
        if isinstance(e, Progress) and e.step == step:
            stop.set()

    return stop, seen, on_event


def grid_cell(grid: np.ndarray, row: int, col: int, size: int = 64) -> np.ndarray:
    """The picture at (row, col) of a sample grid (sd_loha.train.report.column_grid), at its own size: the
    grid shows pictures under MIN_CELL px enlarged by a whole factor, pixel for pixel."""
    scale = max(1, -(-MIN_CELL // size))
    cell = size * scale
    y = LABEL_H + row * (LABEL_H + cell) + LABEL_H
    return grid[y:y + cell:scale, col * cell:(col + 1) * cell:scale]


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def assert_finite_file(path: Path) -> None:
    tensors, _ = read_file(path)
    bad = [k for k, t in tensors.items() if not torch.isfinite(t.float()).all()]
    assert not bad, f"{path.name}: non-finite tensors {bad[:5]}"


# ---------------------------------------------------------------------------------------------
# Denoising loss of a pipeline on an image folder
# ---------------------------------------------------------------------------------------------

def load_folder(folder: Path, size: int, caption_extension: str = ".txt") -> list[tuple[torch.Tensor, str]]:
    """(pixels (3,size,size) in [-1,1], caption) per image: shorter side resized to `size`, centre crop."""
    out = []
    for img_path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")):
        im = Image.open(img_path).convert("RGB")
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
        caption = img_path.with_suffix(caption_extension).read_text(encoding="utf-8").strip()
        out.append((x.float() / 127.5 - 1.0, caption))
    assert out, f"no images in {folder}"
    return out


@torch.no_grad()
def denoising_loss(pipe, folder: Path, *, size: int = 64, draws: int = 16, seed: int = 1234,
                   caption_extension: str = ".txt") -> float:
    """Mean epsilon-MSE of `pipe`'s UNet on the folder's images, SD1/SD2 text conditioning from the caption files.

    Latents: the VAE posterior mean x scaling_factor. For each image, `draws` (timestep, noise) pairs from a
    generator seeded with `seed`, so two pipelines measured with the same seed see identical noise and
    timesteps. No min-SNR weighting: the plain denoising objective.
    """
    assert pipe.scheduler.config.prediction_type == "epsilon"
    data = load_folder(folder, size, caption_extension)
    pixels = torch.stack([x for x, _ in data])
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    ids = pipe.tokenizer([c for _, c in data], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    cond = pipe.text_encoder(ids)[0]
    loss = denoising_mse(pipe, latents, cond, draws=draws, seed=seed)
    assert math.isfinite(loss)
    return loss


# ---------------------------------------------------------------------------------------------
# A trained file loads everywhere: sd-loha's strict loader and the real LyCORIS package
# ---------------------------------------------------------------------------------------------

RTOL, ATOL = 1e-4, 1e-5  # merged weight vs LyCORIS's on-the-fly delta differ by summation order only


class _TextModelShim(torch.nn.Module):
    """transformers-5 CLIPTextModel lost the `text_model.` level that files name; LyCORIS names modules from
    the live tree, so give it that level back (CLIPTextModelWithProjection still has it)."""

    def __init__(self, te: torch.nn.Module) -> None:
        super().__init__()
        self.text_model = te if not hasattr(te, "text_model") else te.text_model


def _layer_input(module: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
    if isinstance(module, torch.nn.Linear):
        return torch.randn(3, module.in_features, generator=gen)
    return torch.randn(2, module.in_channels, 9, 9, generator=gen)


def _tables(pipe) -> dict[str, tuple[dict[str, str], torch.nn.Module]]:
    tables = {"lora_unet": (unet_module_names(pipe.unet), pipe.unet)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        tables["lora_te1"] = (text_encoder_module_names(pipe.text_encoder, "lora_te1"), pipe.text_encoder)
        tables["lora_te2"] = (text_encoder_module_names(pipe.text_encoder_2, "lora_te2"), pipe.text_encoder_2)
    else:
        tables["lora_te"] = (text_encoder_module_names(pipe.text_encoder, "lora_te"), pipe.text_encoder)
    return tables


def _our_layer(tables, name: str) -> torch.nn.Module:
    prefix = next(p for p in sorted(tables, key=len, reverse=True) if name.startswith(p + "_"))
    table, model = tables[prefix]
    return model.get_submodule(table[name])



def assert_file_loads_everywhere(path: Path, family: str, monkeypatch, te_parts: tuple[str, ...]):
    """sd-loha's loader with strict=True on a fresh pipeline matches every module and changes the model; the
    real LyCORIS package finds every module, and each of its modules computes what our merged layer computes."""
    import pytest

    from sd_loha import apply_loha
    from sd_loha.models import build_tiny_pipeline

    if family == "tiny-sd3":
        return assert_sd3_file_loads(path, te_parts)
    tensors, _ = read_file(path)
    file_modules = {k.split(".")[0] for k in tensors}
    # 1. sd-loha's loader, strict: every module of the file matches a layer of a fresh pipeline
    merged = build_tiny_pipeline(family)
    report = apply_loha(merged, path, strict=True)
    assert report.unmatched == [] and report.unsupported == []
    assert report.total == len(file_modules)
    assert report.patched["unet"] > 0
    for part in te_parts:
        assert report.patched[part] > 0, f"{part} not patched: {report}"
    # the trained file changes the model (4 steps at lr 1e-3 moved the zero-initialised factor)
    base = build_tiny_pipeline(family)
    assert any(not torch.equal(a, b) for a, b in zip(base.unet.state_dict().values(), merged.unet.state_dict().values()))

    # 2. the real LyCORIS package: create_network_from_weights on a fresh pipeline finds every module
    # (a skip from here on still means everything above passed; lycoris-lora 4.1.3 needs torch >= 2.5)
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    ref = build_tiny_pipeline(family)
    # create_network_from_weights first builds a network from LyCORIS's class-level default targets, which
    # name the time embedding twice on a diffusers UNet (by class and by name: "duplicated lora name"),
    # then discards it. Empty targets for that throw-away network, only for this test.
    net_cls = lycoris_kohya.LycorisNetworkKohya
    for attr in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE"):
        monkeypatch.setattr(net_cls, attr, [])
    if family == "tiny-sdxl":
        te = [_TextModelShim(ref.text_encoder), ref.text_encoder_2]  # LyCORIS numbers a list: lora_te1, lora_te2
    else:
        te = _TextModelShim(ref.text_encoder)
    lyco, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), ref.vae, te, ref.unet, for_inference=True)
    lyco.apply_to(te, ref.unet, apply_text_encoder=True, apply_unet=True)
    state = lyco.load_weights(str(path))
    assert "missing keys" not in state, state
    unexpected = state.get("unexpected keys", [])
    found = {m.lora_name for m in lyco.loras}
    pairs = [(m.lora_name, m.org_module[0]) for m in lyco.loras]
    if family == "tiny-sdxl":
        # LyCORIS names UNet modules from the live (diffusers) tree, while SDXL files use the LDM names every
        # SDXL tool uses, so it finds only the text-encoder modules on a diffusers UNet. Build its module for
        # each UNet entry by hand, on the layer the LDM name denotes, and check those too.
        assert found == {m for m in file_modules if not m.startswith("lora_unet")}
        assert unexpected and all(k.startswith("lora_unet_") for k in unexpected)
        ref_tables = _tables(ref)
        for name in sorted(m for m in file_modules if m.startswith("lora_unet")):
            lyco_type, params = lycoris_kohya.get_module(tensors, name)
            module = lycoris_kohya.make_module(lyco_type, params, name, _our_layer(ref_tables, name))
            assert module is not None, name
            module.apply_to()
            pairs.append((name, module.org_module[0]))
        assert len(pairs) == len(file_modules)
    else:
        assert found == file_modules and not unexpected, unexpected

    # every LyCORIS module computes what our merged layer computes
    tables = _tables(merged)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, theirs in pairs:
            ours = _our_layer(tables, name)
            x = _layer_input(ours, gen)
            torch.testing.assert_close(ours(x), theirs(x), rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def sd3_transformer_output(pipe) -> torch.Tensor:
    """The transformer's output for one fixed random input (fp32 tiny model)."""
    t = pipe.transformer
    cfg = t.config
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return t(hidden_states=torch.randn(1, cfg.in_channels, 16, 16, generator=gen),
                 encoder_hidden_states=torch.randn(1, 5, cfg.joint_attention_dim, generator=gen),
                 pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
                 timestep=torch.tensor([500.0])).sample


def assert_sd3_file_loads(path: Path, te_parts: tuple[str, ...]) -> None:
    """An SD 3.x file in kohya's form: sd-loha's loader with strict=True on a fresh tiny-sd3 matches every module
    and changes the transformer; the real LyCORIS, which names modules from the live diffusers tree, reads it split
    into its own names (sd3_convert, exact) and computes the transformer output sd-loha's loader gives."""
    from lycoris import create_lycoris_from_weights

    from sd_loha import apply_loha
    from sd_loha.io import parse_state_dict
    from sd_loha.models import build_tiny_pipeline
    from sd_loha.sd3_convert import to_form
    from sd_loha.sd3_names import SD3Names

    tensors, meta = read_file(path)
    assert meta["modelspec.architecture"].startswith("stable-diffusion-3-") and meta["ss_base_model_version"]
    assert any(k.startswith("lora_unet_joint_blocks_") and "_attn_qkv." in k for k in tensors)
    merged = build_tiny_pipeline("tiny-sd3")
    before = sd3_transformer_output(merged)
    report = apply_loha(merged, path, strict=True)
    assert report.unmatched == [] and report.unsupported == [] and report.patched["transformer"] > 0
    for part in te_parts:
        assert report.patched[part] > 0, f"{part} not patched: {report}"
    ours = sd3_transformer_output(merged)
    assert not torch.equal(ours, before)  # the trained file changes the model
    ref = build_tiny_pipeline("tiny-sd3")
    split = to_form(parse_state_dict(tensors), SD3Names.from_pipeline(ref), "simpletuner")
    transformer_only = {k: v for k, v in split.items() if k.startswith("lycoris_")}
    lyco, _ = create_lycoris_from_weights(1.0, "", ref.transformer, weights_sd=transformer_only)
    lyco.apply_to()
    assert len(lyco.loras) == len({k.split(".")[0] for k in transformer_only})
    torch.testing.assert_close(sd3_transformer_output(ref), ours, rtol=RTOL, atol=ATOL)
