"""Does a merged LoHA cost anything at generation time? One SD 1.5-size pipeline (random weights, CPU), one
full-preset LoHA merged at strength 0 (the original weights) and 1 (merged), UNet forward passes at 64×64
latents alternating in ABBA order, process CPU time per pass.

    python bench/bench_merged_forward.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_loader  # noqa: E402  (same model and files as the loader benchmark)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sd_loha import apply_loha, set_loha_strength

    pipe = bench_loader.build_sd15_pipeline()
    loha, _, _, _ = bench_loader.make_files(pipe, Path(tempfile.mkdtemp(prefix="sd_loha_bench_")))
    g = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(1, 4, 64, 64, generator=g), torch.randn(1, 77, 768, generator=g)

    def step() -> float:
        with torch.inference_mode():
            t = time.process_time()
            pipe.unet(sample, torch.tensor([500]), hidden)
            return time.process_time() - t

    apply_loha(pipe, loha, strength=0.0)
    times: dict[float, list[float]] = {0.0: [], 1.0: []}
    for i in range(args.rounds):
        for s in ((0.0, 1.0) if i % 2 == 0 else (1.0, 0.0)):
            set_loha_strength(pipe, loha.stem, s)
            times[s].append(step())
    for s, label in ((0.0, "base (strength 0)"), (1.0, "LoHA merged (strength 1)")):
        print(f"{label}: {statistics.median(times[s]):.2f} s CPU per UNet pass (min {min(times[s]):.2f}), "
              f"{args.rounds} passes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
