"""Pretrain the toy base model `toy-sd1` on the procedural world (seeded, reproducible, CPU-sized).

    python -m sd_loha.toy.pretrain --out sd_loha/assets/toy-sd1

Two stages, each with a fixed number of steps (not a time limit, so a rerun with the same seed gives the same weights
on the same hardware and library versions):

1. an AutoencoderKL (x4 downsampling: 64x64 pictures -> 16x16x4 latents) on the broad mix of `world.vae_image`;
   its scaling factor is set from the latents' standard deviation, as SD's 0.18215 was;
2. a UNet2DConditionModel with cross-attention and a CLIPTextModel (with the repo's tokenizer), trained jointly on
   the frozen VAE's latents of captioned scenes, with SD 1.5's noise schedule and epsilon prediction; 10% of the
   captions are empty so classifier-free guidance works.

The result is a StableDiffusionPipeline saved with save_pretrained in fp16 safetensors. See docs/toy-model.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import world

NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon")


@dataclass
class Settings:
    seed: int = 0
    threads: int = 1  # on a shared CPU, one thread is many times faster than two (no OpenMP barrier stalls)
    vae_bf16: bool = True  # bf16 autocast: measured faster for the VAE on the CPU, slower for the UNet
    save_every: int = 500  # UNet steps between snapshots of the whole pipeline in --out
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 2800
    unet_batch: int = 32
    latents_per_caption: int = 4
    unet_lr: float = 1e-3
    text_lr: float = 5e-4
    warmup: int = 200
    num_latents: int = 8192  # captioned scenes encoded once by the frozen VAE
    empty_caption_rate: float = 0.1
    min_snr_gamma: float = 5.0
    log_every: int = 50


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=world.SIZE,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=128, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet():
    from diffusers import UNet2DConditionModel

    # SD 1.x's layout (conv proj_in/out, cross-attention in the upper levels), two levels at 16x16 and 8x8 latents.
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(48, 96), layers_per_block=1, norm_num_groups=16,
        attention_head_dim=4, cross_attention_dim=128,
    )


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 pictures -> float (N, 3, H, W) in [-1, 1], as diffusers' VAEs expect."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of pictures in [-1, 1] (so the peak-to-peak range is 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def train_vae(s: Settings, log) -> Any:
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _cosine(i, s.vae_steps, s.warmup))
    t0 = time.time()
    for step in range(s.vae_steps):
        x = to_tensor([world.vae_image(rng) for _ in range(s.vae_batch)])
        with _autocast(s.vae_bf16):
            dist = vae.encode(x).latent_dist
            rec = vae.decode(dist.sample()).sample.float()
        # L1 keeps edges sharper than MSE; the KL term only keeps the latent scale tame, as in SD's VAE.
        loss = F.l1_loss(rec, x) + s.vae_kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % s.log_every == 0 or step == s.vae_steps - 1:
            log(f"vae step {step}/{s.vae_steps} loss {loss.item():.4f} psnr {psnr(rec.detach(), x):.2f} dB "
                f"({time.time() - t0:.0f} s)")
    return vae.eval()


@torch.no_grad()
def vae_psnr(vae, images: list[np.ndarray], batch: int = 32) -> float:
    """Mean PSNR of encode (mode) -> decode over the pictures."""
    values = []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i:i + batch])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        values.extend(psnr(rec[j:j + 1], x[j:j + 1]) for j in range(len(x)))
    return float(np.mean(values))


@torch.no_grad()
def encode_scenes(vae, s: Settings, log) -> tuple[torch.Tensor, list[str]]:
    rng = np.random.default_rng(s.seed + 1)
    latents, captions = [], []
    for i in range(0, s.num_latents, 256):
        batch = [world.scene(rng) for _ in range(min(256, s.num_latents - i))]
        latents.append(vae.encode(to_tensor([b[0] for b in batch])).latent_dist.mode())
        captions.extend(b[1] for b in batch)
    log(f"encoded {s.num_latents} scenes")
    return torch.cat(latents), captions


def _min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr  # epsilon prediction: min(SNR, gamma) / SNR


def train_unet(vae, tokenizer, s: Settings, log, snapshot: Callable[[Any, Any], None]) -> tuple[Any, Any]:
    from diffusers import DDPMScheduler

    latents, captions = encode_scenes(vae, s, log)
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    log(f"latent scaling factor {scaling:.4f}")
    # Every caption is one of a few hundred strings: tokenize each once.
    vocab = sorted(set(captions)) + [""]
    ids = tokenizer(vocab, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    index = torch.tensor([vocab.index(c) for c in captions])
    empty = len(vocab) - 1

    torch.manual_seed(s.seed + 2)
    gen = torch.Generator().manual_seed(s.seed + 3)
    unet, text_encoder = build_unet().train(), build_text_encoder(tokenizer).train()
    scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    opt = torch.optim.AdamW([
        {"params": unet.parameters(), "lr": s.unet_lr},
        {"params": text_encoder.parameters(), "lr": s.text_lr},
    ], weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _cosine(i, s.unet_steps, s.warmup))
    by_caption = [torch.nonzero(index == i).flatten() for i in range(len(vocab) - 1)]
    groups = s.unet_batch // s.latents_per_caption
    t0, running = time.time(), None
    for step in range(s.unet_steps):
        # A batch is `groups` captions with several latents each, so the text encoder (with gradients) runs on
        # a quarter of the rows; a group's caption is empty at the empty-caption rate, its latents any scene's.
        cap = torch.randint(0, len(vocab) - 1, (groups,), generator=gen)
        drop = torch.rand(groups, generator=gen) < s.empty_caption_rate
        pick = torch.cat([
            torch.randint(0, len(latents), (s.latents_per_caption,), generator=gen) if d
            else by_caption[c][torch.randint(0, len(by_caption[c]), (s.latents_per_caption,), generator=gen)]
            for c, d in zip(cap.tolist(), drop.tolist())
        ])
        cap = torch.where(drop, empty, cap)
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (s.unet_batch,), generator=gen)
        xt = scheduler.add_noise(x0, noise, t)
        hidden = text_encoder(ids[cap])[0].repeat_interleave(s.latents_per_caption, dim=0)
        pred = unet(xt, t, encoder_hidden_states=hidden).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * _min_snr_weights(scheduler, t, s.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        opt.step()
        sched.step()
        running = per.mean().item() if running is None else 0.98 * running + 0.02 * per.mean().item()
        if step % s.log_every == 0 or step == s.unet_steps - 1:
            log(f"unet step {step}/{s.unet_steps} mse {running:.4f} ({time.time() - t0:.0f} s)")
        if (step + 1) % s.save_every == 0 and step + 1 < s.unet_steps:
            snapshot(unet.eval(), text_encoder.eval())
            unet.train(), text_encoder.train()
    return unet.eval(), text_encoder.eval()


def assemble(vae, text_encoder, tokenizer, unet):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    # Euler with SD's schedule, like the tiny built-ins; users pick other samplers through the usual settings.
    scheduler = EulerDiscreteScheduler(**NOISE_SCHEDULE, timestep_spacing="leading", steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def ship_repo_tokenizer(folder: Path) -> None:
    """The repo's tokenizer files in their slow-tokenizer layout (vocab.json + merges.txt), which every supported
    transformers version reads; save_pretrained of transformers 5 writes only tokenizer.json, which 4.x's
    CLIPTokenizer cannot read."""
    from ..models import TOKENIZER_DIR

    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(TOKENIZER_DIR, folder)


def text_encoder_in_common_layout(folder: Path) -> None:
    """Rewrite the saved CLIPTextModel weights with the `text_model.` prefix every SD checkpoint uses.

    transformers 5 saves CLIPTextModel without that level; transformers 4.x then matches none of the keys and
    silently keeps a random text encoder (found by the version-floor run). Both versions read the prefixed form."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    sd = load_file(str(path))
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}, str(path),
              metadata={"format": "pt"})


def heldout_sets(seed: int, n: int = 96) -> dict[str, list[np.ndarray]]:
    """Pictures the VAE never trained on: held-out kinds, fresh scenes, and the bundled posters at 64 px."""
    from PIL import Image

    rng = np.random.default_rng(seed + 1000)
    sets = {name: [fn(rng) for _ in range(n // len(world.HELDOUT_KINDS))] for name, fn in world.HELDOUT_KINDS}
    sets["scenes"] = [world.scene(rng)[0] for _ in range(n // 3)]
    assets = Path(__file__).resolve().parent.parent / "assets"
    posters = sorted((assets / "demo_images").glob("*.png")) + sorted((assets / "demo_images_heldout").glob("*.png"))
    sets["posters"] = [np.asarray(Image.open(p).convert("RGB").resize((world.SIZE, world.SIZE),
                                                                      Image.Resampling.LANCZOS)) for p in posters]
    return sets


def pretrain(out: Path, s: Settings) -> dict[str, Any]:
    from ..models import TOKENIZER_DIR
    from transformers import CLIPTokenizer

    torch.set_num_threads(s.threads)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    vae = train_vae(s, log)
    vae.requires_grad_(False)
    figures: dict[str, Any] = {"vae_psnr_db": {k: round(vae_psnr(vae, v), 2) for k, v in heldout_sets(s.seed).items()}}
    log(f"VAE PSNR on held-out pictures: {figures['vae_psnr_db']}")
    vae_seconds = time.time() - start

    def save(unet, text_encoder) -> None:
        # A half-precision copy, so the training weights stay fp32.
        pipe = copy.deepcopy(assemble(vae, text_encoder, tokenizer, unet)).to(torch.float16)
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(str(out), safe_serialization=True)
        ship_repo_tokenizer(out / "tokenizer")
        text_encoder_in_common_layout(out / "text_encoder")
        log(f"saved {out}")

    unet, text_encoder = train_unet(vae, tokenizer, s, log, save)
    save(unet, text_encoder)
    figures.update(vae_minutes=round(vae_seconds / 60, 1), total_minutes=round((time.time() - start) / 60, 1),
                   torch=torch.__version__, settings=asdict(s))
    (out / "pretrain_report.json").write_text(json.dumps(figures, indent=2) + "\n")
    log(f"saved {out} ({sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 1e6:.1f} MB)")
    return figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the diffusers pipeline")
    for name, default in asdict(Settings()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    pretrain(out, Settings(**args))


if __name__ == "__main__":
    main()
