"""Loader benchmark: sd-loha's merge path vs diffusers' LoRA path on an SD 1.5-size pipeline (CPU).

    python bench/bench_loader.py                 # writes the "## Loader" section of bench/RESULTS.md
    python bench/bench_loader.py --repeats 5 --steps 3 --threads 2
    python bench/bench_loader.py --fresh 3       # "## Loader: first apply in a fresh process"

What it builds (offline, random weights): the real SD 1.5 UNet config (860M parameters) and the real
CLIP ViT-L/14 text-encoder config (123M), with sd-loha's tiny tokenizer (no text is encoded for the
loader timings) and no VAE. On it:

* a full-preset LoHA made by add_loha (rank 8, alpha 4, conv_rank 4, conv_alpha 1; attention, MLP,
  resnet and sampler convs, text-encoder attention + MLP), factors randomised, saved in fp16;
* a kohya LoRA with the same kohya module names (rank 8, alpha 4, k×k convs as LoCon), fp16.

Timed side by side in one process (median of --repeats, each from a clean pipeline state):

* sd-loha: apply_loha (read + parse + name lookup + backups + merge), set_loha_strength, remove_loha,
  for the LoHA file and for the LoRA file;
* diffusers: pipe.load_lora_weights + pipe.fuse_lora, re-strengthening (unfuse_lora + set_adapters +
  fuse_lora), unfuse_lora + unload_lora_weights, for the LoRA file (diffusers cannot load LoHA);
* generation cost: UNet forward passes at 64×64 latents (512×512 images), batch 1, one UNet call per
  step: base and LoHA-merged steps alternate on the same UNet (strength 0 / 1), then diffusers' LoRA
  loaded but unfused (PEFT wrappers) and fused.

Exactness is checked on the way: remove_loha must give every parameter back bit for bit.

--fresh N times what a user sees once per session: build the pipeline, then the first apply (sd-loha,
LoHA file) or the first load_lora_weights + fuse_lora (diffusers, LoRA file), each in its own new
process, arms alternating, N processes per arm. Later applies in a long-lived process reuse memory the
allocator already holds, so they vary with whatever ran before; the first one does not.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sd_loha.architectures import CLIP_L, SD15_UNET, build_model  # noqa: E402

# the real SD 1.5 shapes (sd_loha/architectures.py); CLIP-L keeps its real 49408-token embedding table here
SD15_TEXT = dict(CLIP_L, vocab_size=49408)


def build_sd15_pipeline(seed: int = 0):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from sd_loha.models import _tiny_tokenizer

    torch.manual_seed(seed)
    unet = build_model("UNet2DConditionModel", SD15_UNET).eval()
    text_encoder = build_model("CLIPTextModel", SD15_TEXT).eval()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=_tiny_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for m in (unet, text_encoder):
        m.requires_grad_(False)
    return pipe


def make_files(pipe, folder: Path) -> tuple[Path, Path, int, int]:
    """The LoHA file (add_loha) and a kohya LoRA file with the same module names."""
    from safetensors.torch import save_file

    from sd_loha import add_loha
    from sd_loha.models import text_encoders

    network = add_loha(pipe, preset="full", rank=8, alpha=4.0, conv_rank=4, conv_alpha=1.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    loha = folder / "bench_loha.safetensors"
    network.save(loha, dtype=torch.float16)
    rows = network.listing()
    network.remove()

    models = {"unet": pipe.unet, **text_encoders(pipe)}
    sd = {}
    for r in rows:
        w = models[r["part"]].get_submodule(r["path"]).weight
        k = r["key"]
        if w.dim() == 4:
            sd[f"{k}.lora_down.weight"] = torch.randn(8, *w.shape[1:], generator=g) * 0.05
            sd[f"{k}.lora_up.weight"] = torch.randn(w.shape[0], 8, 1, 1, generator=g) * 0.05
        else:
            sd[f"{k}.lora_down.weight"] = torch.randn(8, w.shape[1], generator=g) * 0.05
            sd[f"{k}.lora_up.weight"] = torch.randn(w.shape[0], 8, generator=g) * 0.05
        sd[f"{k}.alpha"] = torch.tensor(4.0)
    lora = folder / "bench_lora.safetensors"
    save_file({k: v.to(torch.float16) if k.endswith("weight") else v for k, v in sd.items()}, str(lora))
    n_unet = sum(r["part"] == "unet" for r in rows)
    return loha, lora, n_unet, len(rows) - n_unet


def timed(fn, *args, **kwargs) -> float:
    gc.collect()
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def params_equal(model, reference: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, reference[n]) for n, p in model.named_parameters())


def max_abs_diff(model, reference: dict[str, torch.Tensor]) -> float:
    return max(float((p - reference[n]).abs().max()) for n, p in model.named_parameters())


def unet_steps(pipe, steps: int, seed: int = 0) -> list[tuple[float, float]]:
    """(wall s, process CPU s) per UNet call. On a shared machine the CPU time of a 1-thread run is the
    steadier number: other jobs stretch the wall clock, not the work done."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 64, 64, generator=g)
    hidden = torch.randn(1, 77, 768, generator=g)
    times = []
    with torch.inference_mode():
        for i in range(steps):
            t, c = time.perf_counter(), time.process_time()
            pipe.unet(sample, torch.tensor([999 - 100 * i]), hidden)
            times.append((time.perf_counter() - t, time.process_time() - c))
    return times


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def versions() -> str:
    import diffusers
    import peft
    import transformers

    import sd_loha

    return (f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, sd-loha {sd_loha.__version__}")


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}"


def write_results(path: Path, section: str) -> None:
    """Replace (or add) the section of RESULTS.md whose heading is the section's first line."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    heading = section.splitlines()[0].strip()
    start = next((i for i, l in enumerate(lines) if l.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + section.rstrip("\n").splitlines() + ([""] + lines[end:] if end < len(lines) else []))
        new = new.rstrip("\n") + "\n"
    path.write_text(new)


def first_apply(arm: str) -> float:
    """In this (new) process: build the pipeline, then time the first apply of one arm."""
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    from sd_loha import apply_loha

    pipe = build_sd15_pipeline()
    loha, lora, _, _ = make_files(pipe, Path(tempfile.mkdtemp(prefix="sd_loha_bench_")))
    gc.collect()
    t = time.perf_counter()
    if arm == "sd-loha":
        apply_loha(pipe, loha)
    else:
        pipe.load_lora_weights(str(lora), adapter_name="bench")
        pipe.fuse_lora(lora_scale=1.0)
    return time.perf_counter() - t


def fresh_processes(n: int, threads: int, results: str, command: str) -> int:
    import subprocess

    times: dict[str, list[float]] = {"sd-loha": [], "diffusers": []}
    load_before = os.getloadavg()
    for i in range(n):
        for arm in (("sd-loha", "diffusers") if i % 2 == 0 else ("diffusers", "sd-loha")):
            out = subprocess.run([sys.executable, __file__, "--first-apply", arm, "--threads", str(threads)],
                                 capture_output=True, text=True, check=True).stdout
            times[arm].append(float(out.strip().splitlines()[-1]))
            print(f"{arm}: {times[arm][-1]:.2f}s", flush=True)
    load_after = os.getloadavg()
    row = lambda arm: " / ".join(f"{t:.2f}" for t in times[arm])  # noqa: E731
    section = "\n".join([
        "## Loader: first apply in a fresh process",
        "",
        f"Command: `{command}` (same machine, model and files as above; torch threads {threads}).",
        "",
        "| arm | what is timed | each process (s) | median (s) |",
        "|---|---|---|---|",
        f"| sd-loha, LoHA file | `apply_loha` | {row('sd-loha')} | {fmt(times['sd-loha'])} |",
        f"| diffusers, LoRA file | `load_lora_weights + fuse_lora` | {row('diffusers')} | {fmt(times['diffusers'])} |",
        "",
        f"- Arms alternate, one new process each; load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f}.",
    ])
    print(section)
    if results:
        write_results(Path(results), section)
        print(f"wrote {results}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fresh", type=int, default=0, help="time the first apply in N new processes per arm")
    ap.add_argument("--first-apply", choices=["sd-loha", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="UNet forward passes per generation measurement")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="'' to skip writing")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one apply_loha")
    ap.add_argument("--no-diffusers", action="store_true", help="time sd-loha only (e.g. to compare two versions)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python bench/bench_loader.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.first_apply:
        print(first_apply(args.first_apply))
        return 0
    if args.fresh:
        return fresh_processes(args.fresh, args.threads, args.results, command)
    load_before = os.getloadavg()

    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    from sd_loha import apply_loha, remove_loha, set_loha_strength

    t0 = time.perf_counter()
    pipe = build_sd15_pipeline()
    t_build = time.perf_counter() - t0
    n_unet_params = sum(p.numel() for p in pipe.unet.parameters())
    n_te_params = sum(p.numel() for p in pipe.text_encoder.parameters())
    print(f"built SD 1.5-size pipeline in {t_build:.1f}s: UNet {n_unet_params / 1e6:.0f}M, text encoder "
          f"{n_te_params / 1e6:.0f}M parameters; {args.threads} threads", flush=True)
    base_unet = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    base_te = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}

    tmp = Path(tempfile.mkdtemp(prefix="sd_loha_bench_"))
    loha, lora, n_unet, n_te = make_files(pipe, tmp)
    print(f"files: LoHA {loha.stat().st_size / 2**20:.1f} MiB, LoRA {lora.stat().st_size / 2**20:.1f} MiB; "
          f"{n_unet} UNet + {n_te} text-encoder layers", flush=True)

    # The first apply in a fresh process also pays for faulting in the backups' fresh memory; reported
    # separately, then not part of the medians.
    t_first_apply = timed(apply_loha, pipe, loha)
    remove_loha(pipe)

    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        apply_loha(pipe, loha)
        prof.disable()
        remove_loha(pipe)
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)

    res: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        res.setdefault(key, []).append(value)

    exact = True
    for rep in range(args.repeats):
        for label, path in (("loha", loha), ("lora", lora)):
            add(f"ours_{label}_apply", timed(apply_loha, pipe, path))
            add(f"ours_{label}_set", timed(set_loha_strength, pipe, path.stem, 0.5))
            add(f"ours_{label}_remove", timed(remove_loha, pipe, path.stem))
            exact &= params_equal(pipe.unet, base_unet) and params_equal(pipe.text_encoder, base_te)

        if args.no_diffusers:
            print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in res.items()), flush=True)
            continue
        # diffusers: load + fuse, re-strengthen, unfuse + unload
        t_load = timed(pipe.load_lora_weights, str(lora), adapter_name="bench")
        t_fuse = timed(pipe.fuse_lora, lora_scale=1.0)
        add("diff_load", t_load)
        add("diff_fuse", t_fuse)
        add("diff_apply", t_load + t_fuse)

        def restrength():
            pipe.unfuse_lora()
            pipe.set_adapters(["bench"], adapter_weights=[0.5])
            pipe.fuse_lora(lora_scale=1.0)

        add("diff_set", timed(restrength))

        def unload():
            pipe.unfuse_lora()
            pipe.unload_lora_weights()

        add("diff_remove", timed(unload))
        diff_err = max(max_abs_diff(pipe.unet, base_unet), max_abs_diff(pipe.text_encoder, base_te))
        # start each repeat from the exact base weights
        with torch.no_grad():
            for n, p in pipe.unet.named_parameters():
                p.copy_(base_unet[n])
            for n, p in pipe.text_encoder.named_parameters():
                p.copy_(base_te[n])
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in res.items()), flush=True)

    # generation cost: UNet forward at 64x64 latents. Base and merged steps alternate on the same UNet
    # (strength 0 = the original weights bit for bit, strength 1 = merged), so drifting machine load hits
    # both arms alike; then diffusers' LoRA unfused (PEFT wrappers) and fused, one after the other.
    if args.steps <= 0 or args.no_diffusers:
        print({k: fmt(v) for k, v in res.items()}, f"first apply {t_first_apply:.2f}s, exact restore: {exact}")
        return 0
    gen: dict[str, list[float]] = {"base": [], "loha_merged": []}
    apply_loha(pipe, loha, strength=0.0)
    for i in range(args.steps):
        for arm, strength in (("base", 0.0), ("loha_merged", 1.0)) if i % 2 == 0 else (("loha_merged", 1.0), ("base", 0.0)):
            set_loha_strength(pipe, loha.stem, strength)
            gen[arm] += unet_steps(pipe, 1, seed=i)
    remove_loha(pipe)
    exact &= params_equal(pipe.unet, base_unet) and params_equal(pipe.text_encoder, base_te)
    pipe.load_lora_weights(str(lora), adapter_name="bench")
    gen["diffusers_lora_unfused"] = unet_steps(pipe, args.steps)
    pipe.fuse_lora()
    gen["diffusers_lora_fused"] = unet_steps(pipe, args.steps)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    load_after = os.getloadavg()

    rows = [
        ("apply (read + merge)", "apply_loha", fmt(res["ours_loha_apply"]), fmt(res["ours_lora_apply"]),
         "load_lora_weights + fuse_lora", f"{fmt(res['diff_apply'])} ({fmt(res['diff_load'])} + {fmt(res['diff_fuse'])})"),
        ("change strength", "set_loha_strength", fmt(res["ours_loha_set"]), fmt(res["ours_lora_set"]),
         "unfuse_lora + set_adapters + fuse_lora", fmt(res["diff_set"])),
        ("remove", "remove_loha", fmt(res["ours_loha_remove"]), fmt(res["ours_lora_remove"]),
         "unfuse_lora + unload_lora_weights", fmt(res["diff_remove"])),
    ]
    table = ["| operation | sd-loha call | sd-loha, LoHA file (s) | sd-loha, LoRA file (s) | diffusers call | diffusers, LoRA file (s) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {a} | `{b}` | {c} | {d} | `{e}` | {f} |" for a, b, c, d, e, f in rows]
    labels = {"base": "base model (interleaved with the next row)", "loha_merged": "LoHA merged by sd-loha (interleaved)",
              "diffusers_lora_unfused": "diffusers: LoRA loaded, not fused (PEFT wrappers)",
              "diffusers_lora_fused": "diffusers: LoRA fused"}
    gtable = ["| UNet forward, 64×64 latents, batch 1 | wall s/step, median (min) | CPU s/step, median (min) | steps |",
              "|---|---|---|---|"]
    for k, v in gen.items():
        wall, cpu = [w for w, _ in v], [c for _, c in v]
        gtable.append(f"| {labels[k]} | {statistics.median(wall):.2f} ({min(wall):.2f}) | "
                      f"{statistics.median(cpu):.2f} ({min(cpu):.2f}) | {len(v)} |")

    notes = [
        f"- remove_loha restored every UNet and text-encoder parameter bit for bit: **{'yes' if exact else 'NO'}**; "
        f"diffusers' unfuse_lora + unload_lora_weights left a max abs error of {diff_err:.1e}.",
        f"- Adapter: {n_unet} UNet + {n_te} text-encoder layers (full preset); LoHA rank 8 / alpha 4, convs 3×3 rank 4 / "
        f"alpha 1; LoRA rank 8 / alpha 4 on the same names; both stored fp16, merged into an fp32 pipeline.",
        f"- Median of {args.repeats} repeats; each sd-loha apply includes reading and validating the file, building the "
        "name tables, fresh memory for the merged weights (on the CPU the original tensors stay as the clean copies) and the fp32 merge. diffusers' numbers include PEFT injection. The very "
        f"first apply_loha of the process (not in the medians) took {t_first_apply:.2f} s.",
        f"- Peak RSS of the whole run {rss_gb():.1f} GiB (pipeline {4 * (n_unet_params + n_te_params) / 2**30:.1f} GiB fp32; "
        "sd-loha keeps a clean copy of each patched weight while an adapter is merged).",
        f"- Load average before/after the run: {load_before[0]:.1f} / {load_after[0]:.1f} "
        "(the machine is shared; other jobs inflate every number alike).",
    ]
    section = "\n".join([
        "## Loader",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {machine()}; torch threads {args.threads}.",
        f"Software: {versions()}.",
        f"Model: SD 1.5 UNet config ({n_unet_params / 1e6:.0f}M params) + CLIP ViT-L/14 text encoder "
        f"({n_te_params / 1e6:.0f}M), random weights, fp32, CPU.",
        "",
        *table,
        "",
        *gtable,
        "",
        *notes,
        "",
    ])
    print()
    print(section)
    if args.results:
        write_results(Path(args.results), section)
        print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
