"""The shipped configs on a CUDA GPU (issue 11): it/s and peak memory, fp16 and bf16, AdamW8bit (bitsandbytes).

Two parts, each run in its own process so each gets its own peak:
  matrix  every file in train_configs/ as shipped on the tiny model of its family (64 px), fp16 and bf16
  full    sd15_style.toml at 512 px, sdxl_style.toml and sd35_style.toml (SD3.5 Medium: MMDiT-X, T5-XXL cached)
          at 1024 px on full-size random-weight models (bench/random_models.py), fp16 and bf16

Every run overrides only the base model, the data (the bundled demo images), the resolution (and the bucket
range the resolution needs), the step count, the sample/save intervals, sample steps, mixed_precision and
optimizer_type=AdamW8bit; the rest (gradient checkpointing, caching, text-encoder training, min-SNR, ...) is as
shipped. Each run calls `sd_loha.train.train(config, overrides=...)`, what `sd-loha train --config ... --set ...`
calls, in a child process that reports torch.cuda.max_memory_allocated / max_memory_reserved afterwards.

    bash bench/gpu_configs.sh                   # sets up .venv with CUDA torch if needed, then both parts
    python bench/gpu_configs.py --part full     # one part
    python bench/gpu_configs.py --cpu-dry-run   # the same logic on the CPU, small models, 4 steps (minutes)

it/s: the median of the optimizer steps after the first two, leaving out steps that also made a sample or a
save; peak memory covers the whole run (loading, caching, steps, samples, saves).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

PRECISIONS = ("fp16", "bf16")
# (config stem, resolution, random_models name) of the full-size part
FULL_RUNS = [("sd15_style", 512, "sd15"), ("sdxl_style", 1024, "sdxl"), ("sd35_style", 1024, "sd35m")]


def _shipped(config: Path, section: str, key: str, default: Any = None) -> Any:
    import tomllib

    return tomllib.loads(config.read_text()).get(section, {}).get(key, default)


def bucket_sets(config: Path, res: int) -> list[str]:
    """The bucket range overrides `res` needs (none where the shipped range holds it)."""
    lo, hi = _shipped(config, "dataset", "min_bucket_reso", 256), _shipped(config, "dataset", "max_bucket_reso", 1024)
    return ([f"min_bucket_reso={res}"] if res < lo else []) + ([f"max_bucket_reso={res}"] if res > hi else [])


def tiny_model_for(config: Path) -> str:
    """The built-in tiny model of the family the shipped config is written for."""
    model = str(_shipped(config, "model", "pretrained_model", ""))
    if model.startswith("tiny-"):
        return model
    if "stable-diffusion-3" in model:
        return "tiny-sd3"
    if "xl" in model.lower():
        return "tiny-sdxl"
    if "stable-diffusion-2" in model:
        return "tiny-sd2"
    return "tiny-sd1"


def plan(part: str, steps: int, dry_run: bool, cache: Path) -> list[dict[str, Any]]:
    """The runs of `part`: each a config path, overrides and a label."""
    runs = []
    common = [f"max_train_steps={steps}", "train_data_dir=sd_loha/assets/demo_images", "optimizer_type=AdamW8bit",
              f"sample_every_n_steps={max(1, steps // 2)}", f"save_every_n_steps={max(1, steps // 2)}",
              "sample_steps=4", "overwrite=true", "log_with=none"]
    if part in ("matrix", "all"):
        for config in sorted((ROOT / "train_configs").glob("*.toml")):
            for mp in PRECISIONS:
                runs.append({"label": f"{config.stem} (tiny) {mp}", "config": str(config), "sets": [
                    f"pretrained_model={tiny_model_for(config)}", "resolution=64", *bucket_sets(config, 64),
                    f"mixed_precision={mp}", *common]})
    if part in ("full", "all"):
        import random_models

        size = "small" if dry_run else "full"
        for stem, res, model in FULL_RUNS:
            folder = random_models.prepare(model, size, cache)
            res = 256 if dry_run else res
            config = ROOT / "train_configs" / f"{stem}.toml"
            for mp in PRECISIONS:
                runs.append({"label": f"{stem} ({model} {size}) {res} px {mp}", "config": str(config), "sets": [
                    f"pretrained_model={folder}", f"resolution={res}", *bucket_sets(config, res),
                    f"mixed_precision={mp}", *common]})
    return runs


def _kind(event: Any) -> str:
    # events are dicts with a "type" today and typed records (sd_loha/train/events.py) next: read either
    return event.get("type", "") if isinstance(event, dict) else getattr(event, "kind", "")


def _field(event: Any, name: str) -> Any:
    return event.get(name) if isinstance(event, dict) else getattr(event, name, None)


def run_in_process(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run; returns its figures. Runs in the child process."""
    import torch

    from sd_loha.train import train

    cuda = torch.cuda.is_available()
    marks: list[tuple[float, str, int | None]] = []  # (time, kind, step)

    def on_event(e: Any) -> None:
        marks.append((time.perf_counter(), _kind(e), _field(e, "step")))

    t0 = time.perf_counter()
    error = None
    try:
        train(spec["config"], overrides=spec["sets"] + [f"output_dir={spec['output_dir']}"], on_event=on_event,
              progress=False)
    except Exception as e:  # noqa: BLE001  (the figures of a failed run are a finding too: report it, go on)
        error = f"{type(e).__name__}: {e}"[:300]
    wall = time.perf_counter() - t0
    step_dt, last, busy = [], None, False
    for t, kind, step in marks:
        if kind == "progress":
            if last is not None and not busy and step is not None and step > 2:
                step_dt.append(t - last)
            last, busy = t, False
        elif kind in ("sample", "saved", "validation"):
            busy = True  # the next step's interval includes this work
    first_step = next((t for t, kind, _ in marks if kind == "progress"), None)
    out = {"label": spec["label"], "error": error, "wall_s": round(wall, 1),
           "setup_s": round(first_step - t0, 1) if first_step else None,
           "it_s": round(1 / statistics.median(step_dt), 2) if step_dt else None,
           "timed_steps": len(step_dt)}
    if cuda:
        out["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    else:
        import resource

        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def run_child(spec: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"label": spec["label"], "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"label": spec["label"], "error": f"rc {res.returncode}: {(res.stderr or res.stdout)[-500:]}"}


def table(results: list[dict[str, Any]]) -> str:
    mem = "peak_alloc_gib" if any("peak_alloc_gib" in r for r in results) else "peak_rss_gib"
    head = ("| run | it/s | setup s | wall s | peak allocated GiB | peak reserved GiB | result |" if mem == "peak_alloc_gib"
            else "| run | it/s | setup s | wall s | peak RSS GiB | result |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cells = [r["label"], r.get("it_s"), r.get("setup_s"), r.get("wall_s"), r.get(mem)]
        if mem == "peak_alloc_gib":
            cells.append(r.get("peak_reserved_gib"))
        cells.append("ok" if not r.get("error") else r["error"].replace("|", "/").replace("\n", " ")[:160])
        rows.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=("all", "matrix", "full"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cpu-dry-run", action="store_true", help="CPU, small models, 4 steps: checks the script")
    ap.add_argument("--out", type=Path, default=Path("/tmp/sd-loha-gpu-configs"))
    ap.add_argument("--cache", type=Path, default=None, help="random-model cache (default: random_models')")
    ap.add_argument("--only", default="", help="run only labels containing this text")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_in_process(json.loads(args.one))), flush=True)
        return 0

    import random_models

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if args.cpu_dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible to torch: run with --cpu-dry-run, or install a CUDA build of torch")
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    steps = 4 if args.cpu_dry_run else args.steps  # 4: one step is timed (3 follows the sample and save at 2)
    t0 = time.perf_counter()
    runs = [r for r in plan(args.part, steps, args.cpu_dry_run, args.cache or random_models.DEFAULT_CACHE)
            if args.only in r["label"]]
    print(f"models ready in {time.perf_counter() - t0:.0f} s; {len(runs)} runs of {steps} steps", flush=True)
    results = []
    for i, spec in enumerate(runs):
        spec["output_dir"] = str(args.out / f"run{i:02d}")
        r = run_child(spec, env, args.timeout)
        results.append(r)
        print(f"  {r['label']}: {r.get('it_s')} it/s, {r.get('wall_s')} s" + (f"  ERROR {r['error']}" if r.get("error")
              else ""), flush=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, total {time.perf_counter() - t0:.0f} s\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(not r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
