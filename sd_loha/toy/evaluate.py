"""Generate the toy model's fixed prompt set and score it with `measure`; optionally save a labelled grid.

    python -m sd_loha.toy.evaluate --model toy-sd1 --grid docs/toy-model.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import measure, world

STEPS = 20
GUIDANCE = 4.0  # on the shipped weights: shapes right 85 % at 4, 79 % at 5, 62 % at 7 (colors 100 % at each)
SEEDS = (0, 1)


@torch.no_grad()
def generate(pipe: Any, scenes: list[world.Scene], seed: int, *, steps: int = STEPS, guidance: float = GUIDANCE,
             batch: int = 24, trigger: str = "") -> list[np.ndarray]:
    """One 64x64 picture per scene; picture i uses generator seed `seed * 1000 + i`, so any subset reproduces.
    `trigger`: put in front of each caption, as training put it in front of the captions it learned from."""
    out: list[np.ndarray] = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        gens = [torch.Generator().manual_seed(seed * 1000 + i + k) for k in range(len(chunk))]
        prompts = [f"{trigger}, {s.caption}" if trigger else s.caption for s in chunk]
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                      height=world.SIZE, width=world.SIZE, generator=gens, output_type="np").images
        out.extend((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return out


def evaluate(pipe: Any, scenes: list[world.Scene] | None = None, seeds: tuple[int, ...] = SEEDS,
             **kw: Any) -> tuple[measure.Score, list[world.Scene], list[np.ndarray]]:
    scenes = scenes or measure.prompt_set()
    all_scenes, images = [], []
    for seed in seeds:
        images += generate(pipe, scenes, seed, **kw)
        all_scenes += scenes
    return measure.score(all_scenes, images)[0], all_scenes, images


@torch.no_grad()
def denoising_mse(pipe: Any, latents: torch.Tensor, cond: torch.Tensor, *, draws: int, seed: int,
                  dtype: torch.dtype | None = None) -> float:
    """Mean ε-MSE of the pipeline's UNet on these latents and text conditioning: `draws` (noise, timestep) pairs
    from a generator seeded with `seed`, so every adapter and the base model see the same ones. The plain
    objective (no SNR weighting), over the base model's whole DDPM schedule. `dtype`: the UNet's compute dtype
    (the inputs are cast to it; the noise, timesteps and loss stay fp32, so they are the same in every dtype)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        pred = pipe.unet(noisy.to(dtype or noisy.dtype), t, cond.to(dtype or cond.dtype)).sample
        total += float(torch.nn.functional.mse_loss(pred.float(), noise))
    return total / draws


def grid(scenes: list[world.Scene], images: list[np.ndarray], columns: int = 8, scale: int = 2) -> Image.Image:
    """Tiles upscaled `scale` times, each with its prompt (object / background) and a mark when judged wrong."""
    tile = world.SIZE * scale
    label = 24
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * tile, rows * (tile + label)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (s, im) in enumerate(zip(scenes, images)):
        x, y = (i % columns) * tile, (i // columns) * (tile + label)
        canvas.paste(Image.fromarray(im).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        j = measure.judge(im)
        ok = (j.background, j.color, j.shape) == (s.background, s.color, s.shape)
        draw.text((x + 3, y + tile + 1), f"{s.color} {s.shape}", fill=(0, 0, 0))
        draw.text((x + 3, y + tile + 12), f"on {s.background}" + ("" if ok else "  x"), fill=(0, 0, 0) if ok
                  else (200, 0, 0))
    return canvas


@torch.no_grad()
def roundtrip(vae: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    """Encode (mode) and decode the pictures; uint8 HxWx3 in and out."""
    from .pretrain import to_tensor

    rec = vae.decode(vae.encode(to_tensor(images).to(vae.dtype)).latent_dist.mode()).sample.float()
    return list(((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


def vae_grid(vae: Any, seed: int = 0, per_kind: int = 3, scale: int = 2) -> Image.Image:
    """Pairs of rows, pictures the VAE never trained on above their encode/decode: held-out kinds, then posters."""
    from .pretrain import heldout_sets

    sets = heldout_sets(seed, n=per_kind * len(world.HELDOUT_KINDS))
    pictures = [im for name, ims in sets.items() if name != "scenes" for im in ims[:per_kind]]
    rec = roundtrip(vae, pictures)
    columns = len(pictures) // 2
    rows = [np.concatenate(block[i * columns:(i + 1) * columns], 1) for i in range(2) for block in (pictures, rec)]
    full = np.concatenate(rows, 0)
    return Image.fromarray(full).resize((full.shape[1] * scale, full.shape[0] * scale), Image.Resampling.NEAREST)


def main(argv: list[str] | None = None) -> None:
    from ..models import load_pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy-sd1", help="toy-sd1 or a folder written by sd_loha.toy.pretrain")
    p.add_argument("--grid", type=Path, help="write a labelled grid of the pictures here (PNG)")
    p.add_argument("--vae-grid", type=Path, help="write held-out pictures above their VAE reconstructions here (PNG)")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--guidance", type=float, default=GUIDANCE)
    args = p.parse_args(argv)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    result, scenes, images = evaluate(pipe, steps=args.steps, guidance=args.guidance)
    print(result)
    if args.grid:
        grid(scenes, images).save(args.grid)
        print(f"wrote {args.grid}")
    if args.vae_grid:
        vae_grid(pipe.vae).save(args.vae_grid)
        print(f"wrote {args.vae_grid}")


if __name__ == "__main__":
    main()
