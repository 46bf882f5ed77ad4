#!/usr/bin/env python
"""The quality cost of a low-precision frozen base: the same LoHA trained on toy-sd1 with the frozen UNet stored
in bf16 (base_weight_dtype = "auto" in a bf16 run), fp8, int8 and nf4, on the same data, seeds and noise.

    OMP_NUM_THREADS=1 python bench/bench_base_dtype.py --out /tmp/bench_base_dtype --steps 150
    python bench/bench_base_dtype.py --results /tmp/bench_base_dtype/runs.jsonl     # the tables again, from the log

Every run is bench_styles' "loha-conv-r8" (the demo recipe: rank 8, conv rank 4, text encoder trained) at its chosen
learning rate, trained by the real Trainer (bench_styles.BenchTrainer) in mixed_precision = "bf16" on the CPU;
only base_weight_dtype differs. Per run:

- the held-out denoising loss (bench_styles.heldout_loss: the same noise and timesteps for every run) twice:
  on the base in the storage the adapter was trained on (adapter still attached), and with the saved file
  applied by `apply_loha` to a plain fp32 toy-sd1 (what a user does with the file after training);
- the style measure and the content check (bench_styles.picture_scores) on that plain base with the file;
- what the storage really holds: the UNet's and text encoder's Linear / Conv weights counted by
  `lowmem.stored_as` (nf4 leaves a Linear whose input width is not a multiple of 64 in bf16, and the trained text
  encoder stays bf16), so "fraction quantized" is measured, not assumed.

Base rows: the base model alone (no adapter) in each storage, held-out loss only.
"""

from __future__ import annotations

import functools
import itertools
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_styles  # noqa: E402  (the recipe, the trainer subclass and the measures)
from runlog import bench_parser, log_row, logged_rows, spread  # noqa: E402

from sd_loha.train import lowmem  # noqa: E402

DTYPES = ("auto", "fp8", "int8", "nf4")  # auto = the run's mixed precision (bf16): the reference
REFERENCE = "auto"
METHOD = "loha-conv-r8"  # the demo recipe's layers and ranks
LR = 6e-3  # bench_styles' learning-rate sweep chose it for loha-conv on the posters
COMPUTE = "bf16"
COMPUTE_DTYPE = torch.bfloat16
# the quality targets: held-out loss relative to the bf16 base, applied file (int8 held to fp8's, both 8-bit)
TARGETS = {"fp8": 0.02, "int8": 0.02, "nf4": 0.05}


def storage_counts(model: nn.Module) -> dict[str, int]:
    """Weights (elements of the full-precision matrix, whatever the packing) of the model's Linear / Conv layers
    by how each layer stores them now (lowmem.stored_as). A LoHA layer's base is counted, its factors are not."""
    counts: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, nn.Linear):  # bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear subclasses
            counts[lowmem.stored_as(m)] += m.in_features * m.out_features
        elif isinstance(m, nn.Conv2d):
            counts[lowmem.stored_as(m)] += m.weight.numel()
    return dict(counts)


def quantized_fraction(counts: dict[str, int]) -> float:
    """The fraction of the counted weights in a storage narrower than the compute dtype (fp8 / int8 / nf4)."""
    total = sum(counts.values())
    return sum(v for k, v in counts.items() if k in ("fp8", "int8", "nf4", "fp4", "4bit")) / total if total else 0.0


def plain_pipeline(dtype: torch.dtype) -> Any:
    from sd_loha.models import load_pipeline

    return load_pipeline(bench_styles.RECIPE["pretrained_model"], dtype=dtype, vae_dtype=torch.float32)


def applied_scores(adapter: Path, style: str, heldout: list[tuple[torch.Tensor, str]], pictures: bool) -> dict[str, Any]:
    """The saved file applied (merged) to a plain fp32 base, as a user loads it on the CPU: held-out loss, and the
    picture measures (bench_styles' fp32 setting, so its figures compare)."""
    from sd_loha import apply_loha

    pipe = plain_pipeline(torch.float32)
    apply_loha(pipe, adapter, strict=True)
    out: dict[str, Any] = {"heldout_loss_applied": bench_styles.heldout_loss(pipe, heldout)}
    if pictures:
        out.update(bench_styles.picture_scores(pipe, style))
    return out


class DtypeTrainer(bench_styles.BenchTrainer):
    """BenchTrainer (held-out loss on the base as trained) that also counts the base's storage before the adapter
    comes off, then measures the saved file on a plain base."""

    def __init__(self, *args: Any, applied_pictures: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.applied_pictures = applied_pictures

    def _finish(self, stopped: bool):
        storage = {part: storage_counts(getattr(self.pipe, part)) for part in ("unet", "text_encoder")}
        result = super()._finish(stopped)
        if not stopped:
            self.scores.update(storage=storage, **applied_scores(result.output, self.style, self.heldout,
                                                                 self.applied_pictures))
        return result


def run_dtype(dtype: str, style: str, seed: int, root: Path, *, steps: int, pictures: bool = True) -> dict[str, Any]:
    row = bench_styles.run_one(METHOD, style, seed, LR, root, steps=steps, measure_pictures=False,
                               options={"mixed_precision": COMPUTE, "base_weight_dtype": dtype}, tag=f"-{dtype}",
                               trainer_class=functools.partial(DtypeTrainer, applied_pictures=pictures))
    return {**row, "dtype": dtype, "kind": "run"}


def base_rows(style: str, root: Path) -> list[dict[str, Any]]:
    """toy-sd1 alone (no adapter) in each storage: the held-out loss quantization costs before any training."""
    _, heldout_dir = bench_styles.style_folders(style, root)
    items = bench_styles.heldout_items(heldout_dir)
    rows = []
    for dtype in DTYPES:
        pipe = plain_pipeline(COMPUTE_DTYPE)
        lowmem.store_frozen_base(pipe.unet, dtype, COMPUTE_DTYPE)
        pipe.unet.to(lowmem.OFFLOAD_DEVICE)  # bitsandbytes quantizes as the layers move
        rows.append({"kind": "base", "style": style, "dtype": dtype,
                     "heldout_loss": bench_styles.heldout_loss(pipe, items, COMPUTE_DTYPE),
                     "storage": {"unet": storage_counts(pipe.unet), "text_encoder": storage_counts(pipe.text_encoder)}})
    return rows


def environment() -> dict[str, Any]:
    import bitsandbytes
    import diffusers

    return {"kind": "env", "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "bitsandbytes": bitsandbytes.__version__,
            "machine": f"{platform.machine()}, {_cpu()}, {torch.get_num_threads()} torch thread(s)",
            "started": time.strftime("%Y-%m-%d %H:%M")}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_bench(root: Path, styles_: list[str], seeds: list[int], steps: int, pictures: bool = True) -> Path:
    """Environment and base rows, then per seed one block of all storages (so a run cut short has every storage
    on the same seeds). Runs already in root/runs.jsonl are not repeated."""
    log = root / "runs.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    rows = logged_rows(log)
    log_row(log, environment())
    for style in styles_:
        if not any(r["kind"] == "base" and r["style"] == style for r in rows):
            for row in base_rows(style, root):
                log_row(log, row)
    done = {(r["style"], r["dtype"], r["seed"], r["steps"]) for r in rows if r["kind"] == "run"}
    for seed, style, dtype in itertools.product(seeds, styles_, DTYPES):
        if (style, dtype, seed, steps) not in done:
            log_row(log, run_dtype(dtype, style, seed, root, steps=steps, pictures=pictures))
    return log


# ---- the tables -----------------------------------------------------------------------------------------------

def _relative(runs: dict[tuple[str, int], dict[str, Any]], dtype: str, key: str) -> list[float]:
    """(loss / the bf16 run's loss - 1) seed by seed, over the seeds both have."""
    return [runs[dtype, s][key] / runs[REFERENCE, s][key] - 1 for (d, s) in runs if d == dtype and (REFERENCE, s) in runs]


def results_tables(log: Path) -> str:
    rows = logged_rows(log)
    out = []
    for style in dict.fromkeys(r["style"] for r in rows if r["kind"] in ("run", "base")):
        base = {r["dtype"]: r for r in rows if r["kind"] == "base" and r["style"] == style}
        ref = base.get(REFERENCE)
        if base:
            out += ["", f"**{style}: the base alone (no adapter)**", "",
                    "| base storage | held-out loss | vs bf16 | UNet Linear/Conv weights quantized |", "|---|---|---|---|"]
            for d, r in base.items():
                rel = f"{r['heldout_loss'] / ref['heldout_loss'] - 1:+.2%}" if ref else "-"
                out.append(f"| {_label(d)} | {r['heldout_loss']:.4f} | {rel} | {quantized_fraction(r['storage']['unet']):.1%} |")
        out += _run_table(style, [r for r in rows if r["kind"] == "run" and r["style"] == style])
    return "\n".join(out)


def _label(dtype: str) -> str:
    return f"{dtype} ({COMPUTE})" if dtype == "auto" else dtype


def _run_table(style: str, runs_: list[dict[str, Any]]) -> list[str]:
    if not runs_:
        return []
    steps = sorted({r["steps"] for r in runs_})
    out = ["", f"**{style}: trained adapters** ({', '.join(map(str, steps))} steps; n = seeds; relative figures paired "
           "seed by seed with the bf16 run)", "",
           "| base storage | n | held-out loss, base as trained | vs bf16 | held-out loss, file on plain fp32 base | "
           "vs bf16 | style measure | object color right | UNet weights quantized | all frozen Linear/Conv weights "
           "quantized | run s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = {(r["dtype"], r["seed"]): r for r in runs_}
    for dtype in dict.fromkeys(r["dtype"] for r in runs_):
        mine = [r for r in runs_ if r["dtype"] == dtype]
        rel = {k: _relative(runs, dtype, k) for k in ("heldout_loss", "heldout_loss_applied")}
        both = [Counter(r["storage"]["unet"]) + Counter(r["storage"]["text_encoder"]) for r in mine]
        pictures = "measure" in mine[0]
        out.append(
            f"| {_label(dtype)} | {len(mine)} | {spread([r['heldout_loss'] for r in mine], '.4f')} | "
            f"{_rel(rel['heldout_loss'], dtype)} | {spread([r['heldout_loss_applied'] for r in mine], '.4f')} | "
            f"{_rel(rel['heldout_loss_applied'], dtype)} | "
            f"{spread([r['measure'] for r in mine], '.4f') if pictures else '-'} | "
            f"{spread([100 * r['content'] for r in mine], '.0f') + ' %' if pictures else '-'} | "
            f"{quantized_fraction(mine[0]['storage']['unet']):.1%} | {quantized_fraction(dict(both[0])):.1%} | "
            f"{statistics.mean(r['seconds'] for r in mine):.0f} |")
    return out + ["", *_verdicts(runs)]


def _rel(values: list[float], dtype: str) -> str:
    if dtype == REFERENCE or not values:
        return "-"
    return spread([100 * v for v in values], "+.2f") + " %"


def _verdicts(runs: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """Each target against the mean relative held-out loss (file on the plain base, the figure users get; and
    the base as trained), with how many seeds are over it."""
    out = []
    for dtype, target in TARGETS.items():
        for key, where in (("heldout_loss_applied", "file on the plain base"), ("heldout_loss", "base as trained")):
            rel = _relative(runs, dtype, key)
            if not rel:
                continue
            mean = statistics.mean(rel)
            verdict = "met" if mean <= target else "NOT met"
            out.append(f"- {dtype} ({where}): {mean:+.2%} against bf16 (target <= +{target:.0%}): {verdict}; "
                       f"{sum(r > target for r in rel)} of {len(rel)} seeds over")
    return out


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__.split("\n\n")[0], Path("/tmp/bench_base_dtype"), "runs and runs.jsonl")
    p.add_argument("--styles", default="poster", help=f"of {', '.join(bench_styles.STYLES)}")
    p.add_argument("--steps", type=int, default=bench_styles.RECIPE["max_train_steps"])
    p.add_argument("--no-pictures", action="store_true", help="held-out losses only (faster)")
    args = p.parse_args(argv)
    if args.results:
        print(results_tables(args.results))
        return
    styles_ = args.styles.split(",")
    for s in styles_:
        if s not in bench_styles.STYLES:
            p.error(f"--styles: unknown style {s!r}; choose from {', '.join(bench_styles.STYLES)}")
    torch.set_num_threads(args.threads)
    started = time.time()
    log = run_bench(args.out, styles_, [int(s) for s in args.seeds.split(",")], args.steps, not args.no_pictures)
    print(results_tables(log))
    print(f"\nwall time {time.time() - started:.0f} s, torch threads {args.threads}")


if __name__ == "__main__":
    main()
