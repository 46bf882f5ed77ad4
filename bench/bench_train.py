#!/usr/bin/env python
"""Training step time and peak memory of the sd-loha trainer (`sd_loha.train.loop.train`), end to end.

    python bench/bench_train.py                           # tiny + mid, 4 configurations each (a few minutes)
    python bench/bench_train.py --sizes tiny --steps 10   # seconds
    python bench/bench_train.py --results                 # also print the markdown table for bench/RESULTS.md

Models (random weights, no download):
- tiny: the built-in tiny-sd1 (UNet (32, 64), 2-layer CLIP of width 32), the 16 demo images at 64 px, batch 4;
- mid: a diffusers UNet2DConditionModel with block_out_channels (128, 256, 512), layers_per_block 2,
  cross_attention_dim 512, a 6-layer CLIP text encoder of width 512, a VAE (64, 128, 256, 256) with
  one layer per block; 4 demo images at 256 px (32x32 latents), batch 2. Written once to a temporary
  diffusers folder, loaded by the trainer like any user model.

Every run: LoHA preset "full" (rank 8, conv rank 4), UNet + text encoder trained, AdamW,
fp32, no samples or intermediate saves. Four configurations per model: latent caching on/off x gradient
checkpointing on/off. Each configuration runs in a fresh process (so peak memory is its own).

Step time: the trainer's progress events, one per optimizer step; median over `--steps` steps after
`--warmup` steps. Wall time and the process's CPU time per step are both reported: with one intra-op
thread (`--threads 1`, the default), CPU time is what the step costs on an idle core, even while
other jobs share the machine; wall time includes waiting for the CPU.

Memory: peak resident set size (VmHWM) over the measured steps, reset after the warm-up through
/proc/self/clear_refs (Linux); "base" is the resident size at that reset (models, adapter, optimizer
state, cached latents), so peak - base is what a training step adds at its high point (activations,
gradients, temporaries, allocator slack).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    # resolution, batch, training images (of the demo set), warm-up steps, measured steps (defaults)
    "tiny": dict(resolution=64, batch=4, images=16, warmup=3, steps=15),
    "mid": dict(resolution=256, batch=2, images=4, warmup=1, steps=3),
}
CONFIGS = [(cache, ckpt) for cache in (True, False) for ckpt in (False, True)]


# ------------------------------------------------------------------------------------------ models
def build_mid_pipeline(folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sd_loha.models import TOKENIZER_DIR, _tiny_scheduler

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(128, 256, 512), layers_per_block=2,
        cross_attention_dim=512, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(64, 128, 256, 256),
                        layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=256)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=_tiny_scheduler("epsilon"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def _params_m(model_dir: str) -> str:
    from sd_loha.models import load_pipeline

    pipe = load_pipeline(model_dir)
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    return f"UNet {count(pipe.unet):.1f}M, text encoder {count(pipe.text_encoder):.1f}M, VAE {count(pipe.vae):.1f}M"


# ------------------------------------------------------------------------------------------ worker
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from sd_loha.train.loop import train

    size = SIZES[args.size]
    warmup, steps = args.warmup, args.steps
    marks: list[tuple[float, float]] = []
    mem: dict[str, int] = {}

    def on_event(e):
        if e["type"] != "progress":
            return
        marks.append((time.perf_counter(), time.process_time()))
        if e["step"] == warmup:
            _reset_peak()
            mem["base"] = _status_kb("VmRSS")
        if e["step"] == warmup + steps:
            mem["peak"] = _status_kb("VmHWM")

    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "out"
        data.mkdir()
        for img in sorted((REPO / "sd_loha/assets/demo_images").glob("*.png"))[: size["images"]]:
            for f in (img, img.with_suffix(".txt")):
                (data / f.name).write_bytes(f.read_bytes())
        cfg = dict(
            pretrained_model=args.model, train_data_dir=str(data), output_dir=str(out),
            resolution=size["resolution"], min_bucket_reso=64, max_bucket_reso=max(128, size["resolution"]),
            bucket_reso_steps=64, train_batch_size=size["batch"], max_train_steps=warmup + steps,
            cache_latents=args.cache, gradient_checkpointing=args.ckpt, preset="full", network_dim=8,
            network_alpha=4.0, conv_dim=4, conv_alpha=1.0, train_text_encoder=True, learning_rate=1e-4,
            save_state=False, log_with="none", seed=0,
        )
        t0 = time.perf_counter()
        train(cfg, progress=False, on_event=on_event)
        total = time.perf_counter() - t0
    wall = [b[0] - a[0] for a, b in zip(marks[warmup - 1:], marks[warmup:])]
    cpu = [b[1] - a[1] for a, b in zip(marks[warmup - 1:], marks[warmup:])]
    return {"size": args.size, "cache": args.cache, "ckpt": args.ckpt, "steps": len(wall),
            "wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "peak_mb": mem["peak"] / 1024, "base_mb": mem["base"] / 1024, "total_s": total,
            "load": os.getloadavg()[0]}


# ------------------------------------------------------------------------------------------ driver
def run_config(size: str, model: str, cache: bool, ckpt: bool, warmup: int, steps: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--size", size, "--model", model, "--warmup", str(warmup),
           "--steps", str(steps), "--threads", str(threads)] + ["--cache"] * cache + ["--ckpt"] * ckpt
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{size} cache={cache} ckpt={ckpt} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| model | latent cache | grad. checkpointing | step, CPU (median) | step, wall (median) | peak RSS | peak - base |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {'on' if r['cache'] else 'off'} | {'on' if r['ckpt'] else 'off'} | "
                     f"{r['cpu_s'] * 1000:.0f} ms | {r['wall_s'] * 1000:.0f} ms | {r['peak_mb']:.0f} MB | "
                     f"{r['peak_mb'] - r['base_mb']:.0f} MB |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--steps", type=int, help="measured steps (default per size: tiny 15, mid 3)")
    p.add_argument("--warmup", type=int, help="steps before measuring (default: tiny 3, mid 1)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run (default 1)")
    p.add_argument("--results", action="store_true", help="print the markdown table for bench/RESULTS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--cache", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import platform

    import torch

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.threads} thread(s) per run, load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            model = "tiny-sd1" if size == "tiny" else str(build_mid_pipeline(Path(tmp) / "mid"))
            print(f"{size}: {_params_m(model)}", flush=True)
            warmup = args.warmup or SIZES[size]["warmup"]
            steps = args.steps or SIZES[size]["steps"]
            for cache, ckpt in CONFIGS:
                r = run_config(size, model, cache, ckpt, warmup, steps, args.threads)
                rows.append(r)
                print(f"  cache={'on ' if cache else 'off'} ckpt={'on ' if ckpt else 'off'}: step {r['cpu_s'] * 1000:7.0f} ms "
                      f"CPU, {r['wall_s'] * 1000:7.0f} ms wall; peak RSS {r['peak_mb']:6.0f} MB "
                      f"(+{r['peak_mb'] - r['base_mb']:.0f} MB over base); run {r['total_s']:.0f} s, "
                      f"load {r['load']:.1f}", flush=True)
    if args.results:
        print()
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
