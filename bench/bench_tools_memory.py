"""Peak memory of the file tools on a full-size SDXL setup: `sd-loha meta`, `sd-loha merge` (one .safetensors
checkpoint) and `sd-loha convert --to lora`.

Each tool runs in a fresh process exactly as a user types it (`sd-loha ...`, run as `sd_loha.cli` by runpy); its
peak resident set is the kernel's own count, /proc/self/status VmHWM, read by the process as it exits (not
ru_maxrss: Linux carries the parent's peak over fork and exec into the child's ru_maxrss). `--code DIR` picks the sd-loha
tree that runs (e.g. a `git worktree` of an older commit), so one machine measures before and after a change:

    python bench/bench_tools_memory.py --code /tmp/sd-loha-before --json /tmp/before.json
    python bench/bench_tools_memory.py --json /tmp/after.json
    python bench/bench_tools_memory.py --size small              # the same runs on tiny widths (seconds)

The base is bench/random_models.py's full-size SDXL (diffusers folder, fp16, random weights). The adapter is a
LoHA file with a module on every attention projection of the UNet (attn1 / attn2 to_q, to_k, to_v, to_out.0) and
on every Linear of both text encoders, rank 8 (fp16): real names and shapes (824 modules, 6.2 GiB of fp32 ΔW).
`meta` and `merge` take that file; `meta-checkpoint` edits the merge's output, a full-size fp16 SDXL checkpoint
(run `merge` first). `convert` and `merge-block` take the same file's modules of one UNet block (--convert-block,
default SDXL's deepest down block, down_blocks.2 = input_blocks.7-8: 20 transformer blocks, 160 layers, 1.2 GiB of
fp32 ΔW): on a 2-core machine the SVDs of all 824 layers take the better part of an hour, and what the layer count
changes is known (holding every ΔW grows with it, one layer at a time does not).

A watchdog ends a tool when the machine's available memory falls under --reserve-gib (this is a shared machine);
such a run is reported as "stopped at N GiB" (its peak until then).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

GIB = 1024 ** 3


@dataclass
class ToolRun:
    tool: str
    command: list[str]
    returncode: int
    peak_rss_gib: float
    wall_s: float
    stopped: bool  # ended by the watchdog (the machine ran low on memory)
    stderr_tail: str


def available_gib() -> float:
    """MemAvailable of the machine, GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("inf")


# The tool as `sd-loha` runs it, then its own VmHWM (KiB) into the file named by the last argument.
_RUN_TOOL = """
import runpy, sys
out = sys.argv.pop()
sys.argv[0] = "sd-loha"
try:
    if sys.argv[1] == "--load-only":  # what loading the base for a merge takes, the floor of any merge
        import torch
        from sd_loha.models import load_pipeline
        load_pipeline(sys.argv[2], dtype=torch.float32)
    else:
        runpy.run_module("sd_loha.cli", run_name="__main__", alter_sys=True)
finally:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    open(out, "w").write(hwm.split()[1])
"""


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(tool: str, args: list[str], code: Path, *, threads: int = 2, reserve_gib: float = 1.5) -> ToolRun:
    """Run `sd-loha ARGS` with `code` first on the path; its peak RSS is its VmHWM at exit (polled while it
    runs, for a run the watchdog ends)."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    hwm_path, err_path = tmp / f"bench-tools-{os.getpid()}-{tool}.hwm", tmp / f"bench-tools-{os.getpid()}-{tool}.err"
    hwm_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", _RUN_TOOL, *args, str(hwm_path)]
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    stopped, polled = False, 0
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=str(code), stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None:
            polled = max(polled, _hwm_kib(proc.pid))
            if not stopped and available_gib() < reserve_gib:
                stopped = True
                proc.kill()
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    peak = int(hwm_path.read_text()) if hwm_path.is_file() else polled
    hwm_path.unlink(missing_ok=True)
    tail = err_path.read_text(errors="replace")[-2000:]
    err_path.unlink(missing_ok=True)
    return ToolRun(tool, args, proc.returncode, peak * 1024 / GIB, wall, stopped, tail)


def reference_models(size: str, model: str = "sdxl") -> tuple[object, dict[str, object]]:
    """The UNet and text encoders of `model` (sdxl, sd15) at `size`, on the meta device (names and shapes only)."""
    import diffusers
    import torch
    import transformers

    import random_models

    configs = random_models.component_configs(model, size)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**configs["unet"][1])
        encoders = {name: getattr(transformers, cls)(transformers.CLIPTextConfig(vocab_size=984, **cfg))
                    for name, (cls, cfg) in configs.items() if name.startswith("text_encoder")}
    return unet, encoders


def make_loha(path: Path, size: str = "full", rank: int = 8, seed: int = 0, block: str | None = None,
              model: str = "sdxl") -> int:
    """Write the benchmark's LoHA file (module docstring) for `model` to `path`; returns its number of modules.
    `block` (a UNet module path prefix such as "down_blocks.2") keeps only that block's UNet modules."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from sd_loha.naming import text_encoder_save_name, unet_save_name

    unet, encoders = reference_models(size, model)
    sdxl = model == "sdxl"
    layers: dict[str, tuple[int, int]] = {}
    for p, m in unet.named_modules():
        if isinstance(m, nn.Linear) and p.rsplit(".", 2)[-2:][0] in ("attn1", "attn2", "to_out") and \
                (block is None or p.startswith(block + ".")):
            layers[unet_save_name(p, unet.config, sdxl=sdxl)] = (m.out_features, m.in_features)
    prefixes = (("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")) if sdxl else (("text_encoder", "lora_te"),)
    for attr, prefix in prefixes if block is None else ():
        for p, m in encoders[attr].named_modules():
            if isinstance(m, nn.Linear) and p != "text_projection":
                layers[text_encoder_save_name(p, prefix)] = (m.out_features, m.in_features)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inp) in layers.items():
        for i in (1, 2):
            tensors[f"{name}.hada_w{i}_a"] = (torch.randn(out, rank, generator=gen) * 0.1).half()
            tensors[f"{name}.hada_w{i}_b"] = (torch.randn(rank, inp, generator=gen) * 0.1).half()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank / 2), dtype=torch.float16)
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "loha"}),
            "ss_network_dim": str(rank), "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1", "modelspec.title": "bench"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return len(layers)


def tool_args(work: Path, base: Path, loha: Path, size: str = "full", convert_loha: Path | None = None
              ) -> dict[str, list[str]]:
    """Each measured tool -> its command line (after `sd-loha`). Its output is WORK/<tool>.safetensors."""
    # The full-size file's layers are the real SDXL's, which convert knows without the base; the small widths
    # are nobody's, so there the base names the layer shapes.
    shapes = [] if size == "full" else ["--model", str(base)]
    return {
        "meta": ["meta", str(loha), "--title", "edited", "--trigger", "bench", "--out", str(work / "meta.safetensors")],
        # a full-size checkpoint (the merge's output, 6.3 GiB): what "2-3x the file" meant
        "meta-checkpoint": ["meta", str(work / "merge.safetensors"), "--title", "edited", "--out",
                            str(work / "meta-checkpoint.safetensors")],
        "load": ["--load-only", str(base)],  # not a tool: the base loaded in fp32 as merge loads it, nothing else
        "merge": ["merge", "--model", str(base), "--loha", str(loha), "--out", str(work / "merge.safetensors"),
                  "--dtype", "fp16"],
        # the same with the one-block adapter: the merge itself then adds little, and writing the file dominates
        "merge-block": ["merge", "--model", str(base), "--loha", str(convert_loha or loha), "--out",
                        str(work / "merge-block.safetensors"), "--dtype", "fp16"],
        "convert": ["convert", str(convert_loha or loha), "--to", "lora", "--rank", "8",
                    "--out", str(work / "convert.safetensors"), *shapes],
    }


def _size_gib(path: Path) -> float:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GIB
    return path.stat().st_size / GIB if path.exists() else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", type=Path, default=ROOT, help="the sd-loha tree whose tools run (default: this one)")
    ap.add_argument("--size", default="full", choices=("full", "small"))
    ap.add_argument("--model", default="sdxl", choices=("sdxl", "sd15"), help="the base (and the LoHA's layers)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench-tools-memory")
    ap.add_argument("--tools", default="meta,merge,convert")
    ap.add_argument("--convert-block", default="down_blocks.2",
                    help="the UNet block whose modules convert takes ('' = the whole file)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reserve-gib", type=float, default=1.5, help="stop a tool when MemAvailable falls under this")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import random_models

    base = random_models.prepare(args.model, args.size)
    loha = args.work / f"{args.model}-{args.size}-loha.safetensors"
    if not loha.is_file():
        print(f"writing {loha}: {make_loha(loha, args.size, model=args.model)} modules", flush=True)
    convert_loha = loha
    if args.convert_block:
        convert_loha = args.work / f"{args.model}-{args.size}-loha-{args.convert_block}.safetensors"
        if not convert_loha.is_file():
            n = make_loha(convert_loha, args.size, block=args.convert_block, model=args.model)
            print(f"writing {convert_loha}: {n} modules", flush=True)
    commands = tool_args(args.work, base, loha, args.size, convert_loha)
    runs = []
    for tool in args.tools.split(","):
        run = measure(tool, commands[tool], args.code.resolve(), threads=args.threads, reserve_gib=args.reserve_gib)
        runs.append(run)
        state = "stopped at" if run.stopped else "peak"
        print(f"{tool}: rc {run.returncode}, {state} {run.peak_rss_gib:.2f} GiB, {run.wall_s:.0f} s", flush=True)
        if run.returncode and not run.stopped:
            print(run.stderr_tail, file=sys.stderr)
    sizes = {"base (diffusers folder, fp16)": _size_gib(base), "LoHA file": _size_gib(loha),
             "LoHA file for convert": _size_gib(convert_loha),
             **{f"{t} output": _size_gib(args.work / f"{t}.safetensors") for t in commands}}
    result = {"code": str(args.code), "size": args.size, "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM",
              "python": platform.python_version(), "sizes_gib": sizes, "runs": [asdict(r) for r in runs]}
    for name, gib in sizes.items():
        print(f"{name}: {gib:.3f} GiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if any(r.returncode and not r.stopped for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
