"""Real-size smoke (issue 11): two steps of a shipped config on a full-size random-weight model, through the CLI.

Runs `sd-loha train --config train_configs/<config>.toml` exactly as a user types it, overriding only the base
model (a full-size SD 1.5 or SDXL pipeline with random weights, bench/random_models.py), the data folder, the
resolution, the step count, the sample interval and sample steps, and mixed_precision (bf16: the CPU's autocast
has no fp16). Every other option stays as shipped: gradient checkpointing, the optimizer, caching, samples,
saves and the resumable state. Then the adapter must load strictly (`sd_loha.apply_loha(..., strict=True)`).

    python bench/smoke_real_size.py                       # sd15 at 256 px, then sdxl at 512 px
    python bench/smoke_real_size.py --models sd15 --json /tmp/smoke.json
    python bench/smoke_real_size.py --size small          # same steps on tiny-width models (seconds)

Reports wall time per phase (from the time each log line or output file appears), peak RSS per phase (polled
from /proc) and in all (wait4), and the strict load. Not part of the test run: minutes of CPU and up to ~20 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import random_models

# model -> (shipped config, resolution, options the model needs beyond those every run overrides)
RUNS = {
    "sd15": ("sd15_style", 256, []),
    # sdxl_style's buckets start at 640 px (SDXL's floor in real use); at 512 px that would leave no bucket
    "sdxl": ("sdxl_style", 512, ["min_bucket_reso=256"]),
    # SD3.5 Medium (2.5 B MMDiT, T5-XXL cached and parked) at 256 px: sd35_style's buckets start at 512
    "sd35m": ("sd35_style", 256, ["min_bucket_reso=256"]),
}
# Phases by the log line (a regex) or output file that ends each, in the order they happen.
PHASES = [
    ("load base model", "line", r"^base model:"),
    ("LoHA network, latent cache", "line", r"^training \d+ steps"),
    # tqdm redraws when the step's loss is set, just before its count moves (that redraw comes too soon to print)
    ("step 1", "line", r"\| 0/2 \[.*loss="),
    ("sample at step 1", "file", "samples/step000001.png"),
    ("step 2", "line", r"\| 1/2 \[.*loss="),
    ("save adapter", "file", "{name}.safetensors"),
    ("save state, final sample", "file", "samples/final.png"),
    ("exit", "end", ""),
]


@dataclass
class RunResult:
    model: str
    config: str
    resolution: int
    command: list[str]
    returncode: int
    wall_s: float
    peak_rss_gib: float
    phases: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    strict_load: str = ""
    strict_load_s: float = 0.0
    strict_load_rss_gib: float = 0.0
    log_tail: str = ""


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class Watch:
    """Runs a command, timestamps its output lines, and polls its RSS so each phase gets its own peak."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.t0 = time.time()
        self.lines: list[tuple[float, str]] = []
        self.rss: list[tuple[float, int]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            buf += chunk
            *done, buf = buf.replace(b"\r", b"\n").split(b"\n")  # tqdm redraws with \r
            now = time.time()
            for raw in done:
                if raw.strip():
                    self.lines.append((now, raw.decode(errors="replace")))

    def wait(self) -> tuple[int, float]:
        """(return code, peak RSS in GiB from the kernel's own accounting)."""
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            self.rss.append((time.time(), _rss_kib(self.proc.pid)))
            time.sleep(0.5)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._reader.join(timeout=10)
        return self.proc.returncode, usage.ru_maxrss / 2**20

    def first_line(self, pattern: str) -> float | None:
        return next((t for t, line in self.lines if re.search(pattern, line)), None)

    def peak_between(self, a: float, b: float) -> float:
        return max((kib for t, kib in self.rss if a <= t <= b), default=0) / 2**20


def _phase_times(w: Watch, out_dir: Path, name: str, end: float) -> list[dict]:
    rows, start = [], w.t0
    for label, kind, what in PHASES:
        if kind == "line":
            t = w.first_line(what)
        elif kind == "file":
            f = out_dir / what.format(name=name)
            t = f.stat().st_mtime if f.exists() else None
        else:
            t = end
        if t is None:  # skipped (no samples), or the run died before it ended
            rows.append({"phase": label, "s": None, "peak_rss_gib": None})
            continue
        rows.append({"phase": label, "s": round(t - start, 1), "peak_rss_gib": round(w.peak_between(start, t), 2)})
        start = t
    return rows


# The console script's own function, sd_loha.cli.main, with the train command wrapped to print the traceback of a
# failure too (the CLI prints only the message; a crash at real size needs its traceback).
CLI = """
import sys, traceback
import sd_loha.cli as cli
run_train = cli._cmd_train
def traced(args):
    try:
        return run_train(args)
    except BaseException:
        traceback.print_exc()
        raise
cli._cmd_train = traced
sys.exit(cli.main(sys.argv[1:]))
"""


STRICT_LOAD = """
import sys, torch, diffusers, sd_loha
pipe = diffusers.DiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16, safety_checker=None)
report = sd_loha.apply_loha(pipe, sys.argv[2], strict=True)
print(report)
"""


def demo_subset(out_root: Path, n: int) -> Path:
    """The first n bundled demo images with their captions: two steps need batch x accumulation x 2 images, and
    each extra one is two more VAE encodes (both flips are cached) at full size."""
    src = ROOT / "sd_loha" / "assets" / "demo_images"
    dst = out_root / f"demo_images_{n}"
    dst.mkdir(parents=True, exist_ok=True)
    for img in sorted(src.glob("*.png"))[:n]:
        for f in (img, img.with_suffix(".txt")):
            shutil.copyfile(f, dst / f.name)
    return dst


def run_one(model: str, size: str, out_root: Path, cache: Path, sample_steps: int, threads: int | None,
            samples: bool = True, images: int = 4) -> RunResult:
    config, resolution, extra = RUNS[model]
    data = demo_subset(out_root, images)
    folder = random_models.prepare(model, size, cache)
    out_dir = out_root / f"{model}-{size}"
    sets = [f"pretrained_model={folder}", f"train_data_dir={data}", f"resolution={resolution}",
            "max_train_steps=2", "sample_every_n_steps=1", f"sample_steps={sample_steps}", "mixed_precision=bf16",
            f"output_dir={out_dir}", "overwrite=true", *extra, *([] if samples else ["sample_prompts=[]"])]
    cmd = [sys.executable, "-c", CLI, "train", "--config", f"train_configs/{config}.toml"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"\n== {model} ({size}) at {resolution} px: sd-loha {' '.join(cmd[3:])}", flush=True)
    w = Watch(cmd, env)
    rc, peak = w.wait()
    end = time.time()
    name = config
    result = RunResult(model, config, resolution, ["sd-loha", *cmd[3:]], rc, round(end - w.t0, 1), round(peak, 2),
                       phases=_phase_times(w, out_dir, name, end),
                       log_tail="\n".join(line for _, line in w.lines[-40:]))
    loss_csv = out_dir / "loss.csv"
    if loss_csv.exists():
        result.losses = [float(r.split(",")[1]) for r in loss_csv.read_text().splitlines()[1:]]
    adapter = out_dir / f"{name}.safetensors"
    if rc == 0 and adapter.exists():
        v = Watch([sys.executable, "-c", STRICT_LOAD, str(folder), str(adapter)], env)
        vrc, vpeak = v.wait()
        said = [line for _, line in v.lines if line.startswith("adapter")] if vrc == 0 else [l for _, l in v.lines[-8:]]
        result.strict_load = ("ok: " if vrc == 0 else f"FAILED rc {vrc}: ") + " | ".join(said)
        result.strict_load_s = round(time.time() - v.t0, 1)
        result.strict_load_rss_gib = round(vpeak, 2)
    return result


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
    import torch

    return f"{cpu}, {os.cpu_count()} cores, {mem / 2**20:.0f} GiB RAM, torch {torch.__version__}, {platform.python_version()}"


def table(results: list[RunResult]) -> str:
    rows = ["| model | config @ px | phase | wall s | peak RSS GiB |", "|---|---|---|---|---|"]
    for r in results:
        for p in r.phases:
            rows.append(f"| {r.model} | {r.config} @ {r.resolution} | {p['phase']} | {p['s']} | {p['peak_rss_gib']} |")
        rows.append(f"| {r.model} | | **total** (rc {r.returncode}) | **{r.wall_s}** | **{r.peak_rss_gib}** |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl, sd35m")
    ap.add_argument("--size", default="full", choices=("full", "small"), help="small: the same layout, tiny widths")
    ap.add_argument("--out", type=Path, default=Path("/tmp/sd-loha-smoke"))
    ap.add_argument("--cache", type=Path, default=random_models.DEFAULT_CACHE)
    ap.add_argument("--sample-steps", type=int, default=2)
    ap.add_argument("--images", type=int, default=4, help="how many of the bundled demo images to train on")
    ap.add_argument("--no-samples", action="store_true", help="sample_prompts=[] (to isolate the training steps)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    results = []
    for model in args.models.split(","):
        r = run_one(model, args.size, args.out, args.cache, args.sample_steps, args.threads, not args.no_samples,
                    args.images)
        results.append(r)
        if r.returncode != 0:
            print(f"{model}: FAILED (rc {r.returncode}); the log ends:\n{r.log_tail}", flush=True)
        else:
            print(f"{model}: losses {r.losses}; strict load {r.strict_load} ({r.strict_load_s} s, "
                  f"{r.strict_load_rss_gib} GiB)", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine()}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                                         "results": [asdict(r) for r in results]}, indent=2))
    return 0 if all(r.returncode == 0 and r.strict_load.startswith("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
