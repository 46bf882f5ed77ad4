"""What the bypass path (adapters added in the forward, `apply_loha(merge=False)` and quantized pipelines) costs
at generation time against the merge. One pipeline (random weights, fp32, CPU), one full-preset LoHA file
(bench_loader's: rank 8, convs 3×3 rank 4) loaded twice: merged and bypassed; UNet passes alternate between
base (both at strength 0), merged (merged at 1) and bypass (bypassed at 1) in rotating order, process CPU time
and wall time per pass; plus the time of a strength change on each path. `--models tiny` runs tiny-sd1 at 16×16
latents (seconds), `sd15` the SD 1.5-size UNet at 64×64 (minutes). `--write` puts the tables into
bench/RESULTS.md ("Bypass").

    python bench/bench_bypass.py --models tiny sd15 --rounds 3 --threads 2 [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_loader  # noqa: E402  (same model, file and results writer as the loader benchmark)


def _pipeline(model: str):
    if model == "sd15":
        pipe = bench_loader.build_sd15_pipeline()
        return pipe, (1, 4, 64, 64), (1, 77, 768)
    from sd_loha.models import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-sd1")
    return pipe, (1, pipe.unet.config.in_channels, 16, 16), (1, 77, pipe.unet.config.cross_attention_dim)


def run(model: str, rounds: int) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float], int]:
    from sd_loha import apply_loha, set_loha_strength

    pipe, sample_shape, hidden_shape = _pipeline(model)
    loha, _, n_unet, _ = bench_loader.make_files(pipe, Path(tempfile.mkdtemp(prefix="sd_loha_bench_")))
    g = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(sample_shape, generator=g), torch.randn(hidden_shape, generator=g)
    apply_loha(pipe, loha, strength=0.0, name="merged")
    apply_loha(pipe, loha, strength=0.0, name="bypass", merge=False)
    arms = {"base": (0.0, 0.0), "merged": (1.0, 0.0), "bypass": (0.0, 1.0)}

    def step() -> tuple[float, float]:
        with torch.inference_mode():
            t, c = time.perf_counter(), time.process_time()
            pipe.unet(sample, torch.tensor([500]), hidden)
            return time.perf_counter() - t, time.process_time() - c

    step()  # warm-up: first-call allocations and the bypass factors' casts
    times: dict[str, list[tuple[float, float]]] = {a: [] for a in arms}
    switch: dict[str, list[float]] = {"merged": [], "bypass": []}
    order = list(arms)
    for i in range(rounds):
        for arm in order[i % 3:] + order[: i % 3]:
            for name, s in zip(("merged", "bypass"), arms[arm]):
                t = time.perf_counter()
                set_loha_strength(pipe, name, s)
                if s:
                    switch[name].append(time.perf_counter() - t)
            step()  # the first pass after a strength change builds the bypass's cast factors once
            times[arm].append(step())
    return times, {k: statistics.median(v) for k, v in switch.items()}, n_unet


def _table(model: str, rounds: int, threads: int) -> str:
    times, switch, n_unet = run(model, rounds)
    base_cpu = statistics.median(c for _, c in times["base"])
    rows = []
    for arm, label in (("base", "base (both adapters at strength 0)"), ("merged", "LoHA merged (strength 1)"),
                       ("bypass", "LoHA bypass, merge=False (strength 1)")):
        wall, cpu = [w for w, _ in times[arm]], [c for _, c in times[arm]]
        rows.append(f"| {label} | {statistics.median(wall):.3f} | {statistics.median(cpu):.3f} (min {min(cpu):.3f}) "
                    f"| {100 * (statistics.median(cpu) / base_cpu - 1):+.1f} % |")
    size = "SD 1.5-size UNet (860M), 64×64 latents" if model == "sd15" else "tiny-sd1 UNet, 16×16 latents"
    return "\n".join([
        f"### {size}, {n_unet} UNet layers adapted, {rounds} passes per row",
        "",
        "| UNet pass, batch 1, fp32 CPU | wall s, median | CPU s, median | CPU vs base |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Strength change (set_loha_strength, median): merged {switch['merged']:.3f} s (every adapted weight "
        f"recomputed), bypass {switch['bypass'] * 1000:.2f} ms (numbers the hooks read).",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=("tiny", "sd15"), default=["tiny", "sd15"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    tables = [_table(m, args.rounds, args.threads) for m in args.models]
    load_after = os.getloadavg()[0]
    section = "\n".join([
        "## Bypass: adapters added in the forward (apply_loha merge=False, quantized pipelines)",
        "",
        f"Command: `python bench/bench_bypass.py --models {' '.join(args.models)} --rounds {args.rounds} "
        f"--threads {args.threads}`",
        "",
        f"Machine: {bench_loader.machine()}; torch threads {args.threads}. {bench_loader.versions()}. Load average "
        f"before / after: {load_before:.1f} / {load_after:.1f} (on a shared machine the minimums are the steadier figures).",
        "One full-preset LoHA file (rank 8 / alpha 4, 3×3 convs rank 4 / alpha 1, stored fp16) loaded twice into one "
        "fp32 pipeline with random weights: merged (`apply_loha`) and bypassed (`merge=False`); the arms alternate in "
        "rotating order, each pass after one untimed pass. The bypass computes the same layer outputs to fp32 "
        "rounding (tests/test_bypass.py); on a quantized pipeline it is the only path, and its cost over that "
        "pipeline's own pass is the same extra work.",
        "",
        *("\n\n".join(tables).splitlines()),
    ])
    print(section)
    if args.write:
        bench_loader.write_results(Path(__file__).resolve().parent / "RESULTS.md", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
