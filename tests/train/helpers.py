"""Helpers of the trainer tests: a small base config, reading adapter files, the denoising loss of a pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

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

def load_folder(folder: Path, size: int) -> list[tuple[torch.Tensor, str]]:
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
        caption = img_path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        out.append((x.float() / 127.5 - 1.0, caption))
    assert out, f"no images in {folder}"
    return out


@torch.no_grad()
def denoising_loss(pipe, folder: Path, *, size: int = 64, draws: int = 16, seed: int = 1234) -> float:
    """Mean epsilon-MSE of `pipe`'s UNet on the folder's images, SD1/SD2 text conditioning from the caption files.

    Latents: the VAE posterior mean x scaling_factor. For each image, `draws` (timestep, noise) pairs from a
    generator seeded with `seed`, so two pipelines measured with the same seed see identical noise and
    timesteps. No min-SNR weighting: the plain denoising objective.
    """
    assert pipe.scheduler.config.prediction_type == "epsilon"
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    data = load_folder(folder, size)
    pixels = torch.stack([x for x, _ in data])
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    ids = pipe.tokenizer([c for _, c in data], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    cond = pipe.text_encoder(ids)[0]
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        pred = pipe.unet(sched.add_noise(latents, noise, t), t, cond).sample
        total += float(torch.nn.functional.mse_loss(pred, noise))
    loss = total / draws
    assert math.isfinite(loss)
    return loss
