#!/usr/bin/env python
"""One LoHA training step, side by side: sd-loha vs LyCORIS vs PEFT LoHa vs PEFT LoRA vs the floor.

    python bench/bench_train_step.py                      # mid-size UNet, CPU, fp32 (issue 5's setup)
    python bench/bench_train_step.py --size tiny          # seconds; smoke test
    python bench/bench_train_step.py --size sd15 --device cuda --dtype bf16 --batch 4 --latent 64   # GPU
    python bench/bench_train_step.py --targets attn-mlp --pair peft-lora --steps 30   # sd-loha vs LoRA alone, ABBA

One process, one UNet built from a config with random weights (no downloads).  Every variant is a
copy of that UNet that shares its frozen weight tensors (deepcopy with the parameters memoised),
so the variants differ only in their adapters:

- floor: the frozen UNet, no adapter, gradients flowing to its input latents;
- sd-loha: ``sd_loha.add_loha`` (LoHA rank 8, conv rank 8 for "full"), per-layer path chosen by
  ``sd_loha.ops.path_costs`` (the mix is printed);
- lycoris: ``lycoris.create_lycoris(algo="loha")`` with the target classes named explicitly (its
  own "full" preset crashes on diffusers UNets in 4.1.x; TimestepEmbedding is left out);
- peft-loha: ``peft.LoHaConfig(r=8)``; peft-lora: ``peft.LoraConfig(r=16)`` (same parameter count:
  LoRA r16 has 16·(in+out) parameters per layer, LoHA r8 has 2·8·(in+out));
- all adapters target exactly the layers sd-loha's preset selects (PEFT gets the full module paths).

Adapter parameters are randomised (small normal) so no factor is zero.  One step = forward, an MSE
loss against a fixed target, backward to the adapter weights (floor: to the input), grads dropped.

Timing: rounds of one step per variant, in a rotating order; median over ``--steps`` rounds after
``--warmup``.  The ratio column is the median over rounds of (variant step / floor step in the same
round), robust to other processes' load drifting between rounds.

Memory, two numbers per variant:
- "saved": bytes autograd keeps between forward and backward (bench/saved_memory.py: unique storages
  still alive when the forward returns, parameters and buffers excluded): the activation memory a trainer
  holds per step;
- "peak": CPU: the process's resident high-water mark during one step minus the resident size just
  before it (``/proc/self/clear_refs`` resets VmHWM; ``malloc_trim`` first), which covers
  temporaries too (glibc's allocator granularity included); CUDA: ``max_memory_allocated`` minus
  ``memory_allocated`` before the step.

A consistency check runs first (``--no-check`` skips it): on the same inputs, sd-loha's
auto-chosen paths against every layer forced onto the straightforward path ("delta" = base(x) +
op(x, ΔW)); prints the max relative difference of the loss and of the factor gradients.
"""

from __future__ import annotations

import argparse
import collections
import copy
import ctypes
import gc
import os
import platform
import random
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import saved_memory  # noqa: E402

from sd_loha.architectures import SD15_UNET  # noqa: E402

SIZES = {
    # (UNet config, batch, latent size, encoder tokens)
    "tiny": (
        dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=4,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             norm_num_groups=8),
        2, 16, 77,
    ),
    "mid": (
        dict(block_out_channels=(128, 256, 512), layers_per_block=2, cross_attention_dim=512, attention_head_dim=8,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        2, 32, 77,
    ),
    "sd15": (
        {k: v for k, v in SD15_UNET.items() if k not in ("sample_size", "in_channels", "out_channels")},
        1, 32, 77,  # CPU default; the GPU script passes --batch 4 --latent 64 (512x512 images)
    ),
}

TARGET_CLASSES = {
    "attn-mlp": ["Transformer2DModel"],
    "full": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
}
ALL_VARIANTS = ("floor", "sd-loha", "lycoris", "peft-loha", "peft-lora")
RANK, ALPHA, LORA_RANK = 8, 4.0, 16


# ------------------------------------------------------------------------------------------ models
def build_unet(size: str, dtype, device):
    from diffusers import UNet2DConditionModel

    cfg, *_ = SIZES[size]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, **cfg)
    return unet.to(device=device, dtype=dtype).requires_grad_(False).train()


def shared_copy(unet):
    """A copy of the module tree whose parameters and buffers ARE the original's tensors."""
    memo = {id(t): t for t in list(unet.parameters()) + list(unet.buffers())}
    return copy.deepcopy(unet, memo)


def target_paths(unet, targets: str) -> list[str]:
    from sd_loha.targets import select_targets

    conv_rank = RANK if targets == "full" else 0
    ts = select_targets(unet, part="unet", prefix="lora_unet", preset=targets, rank=RANK, alpha=ALPHA,
                        conv_rank=conv_rank, conv_alpha=ALPHA)
    return [t.path for t in ts]


def randomize_(params, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((std * torch.randn(p.shape, generator=g)).to(p.dtype))


def make_variant(name: str, unet, targets: str, paths: list[str], adapter_dtype, share: bool = True):
    """(model, trainable parameters, note) for one variant; on a copy sharing the UNet's frozen tensors, or
    with ``share=False`` on the UNet itself (a throwaway one: copying diffusers' layerwise-casting hooks is
    best avoided)."""
    m = shared_copy(unet) if share else unet
    if name == "floor":
        return m, [], ""
    if name == "sd-loha":
        from sd_loha import add_loha

        conv_rank = RANK if targets == "full" else 0
        net = add_loha(m, preset=targets, rank=RANK, alpha=ALPHA, conv_rank=conv_rank, conv_alpha=ALPHA,
                       text_encoder=False)
        assert sorted(mod.path for mod in net.modules) == sorted(paths)
        params = net.parameters()
    elif name == "lycoris":
        from lycoris import LycorisNetwork, create_lycoris

        LycorisNetwork.apply_preset({"target_module": TARGET_CLASSES[targets], "target_name": [],
                                     "enable_conv": targets == "full"})
        net = create_lycoris(m, 1.0, linear_dim=RANK, linear_alpha=ALPHA, algo="loha",
                             conv_dim=RANK if targets == "full" else 0, conv_alpha=ALPHA)
        net.apply_to()
        net.to(device=next(m.parameters()).device, dtype=adapter_dtype)
        m._lycoris_net = net  # keep it alive with the model
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        from peft import LoHaConfig, LoraConfig, inject_adapter_in_model

        if name == "peft-loha":
            cfg = LoHaConfig(r=RANK, alpha=ALPHA, target_modules=paths)
        else:
            cfg = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=paths)
        m = inject_adapter_in_model(cfg, m)
        params = [p for n, p in m.named_parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.to(adapter_dtype)
    randomize_(params)
    return m, params, ""


# ------------------------------------------------------------------------------------------ steps
class Inputs:
    def __init__(self, size, batch, latent, dtype, device):
        cfg, b0, l0, tokens = SIZES[size]
        batch, latent = batch or b0, latent or l0
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.ctx = torch.randn(batch, tokens, cfg["cross_attention_dim"], generator=g).to(device, dtype)
        self.target = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
        self.batch, self.latent = batch, latent


def forward_loss(name, model, inp: Inputs, autocast):
    x = inp.x.detach().requires_grad_(name == "floor")
    with autocast():
        out = model(x, inp.t, inp.ctx).sample
    return torch.nn.functional.mse_loss(out.float(), inp.target.float())


def step(name, model, params, inp: Inputs, autocast):
    loss = forward_loss(name, model, inp, autocast)
    loss.backward()
    for p in params:
        p.grad = None
    return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ memory
def saved_bytes(name, model, params, inp, autocast):
    """Bytes autograd keeps between forward and backward (bench/saved_memory.py says what is counted)."""
    return saved_memory.saved_bytes(model, lambda: forward_loss(name, model, inp, autocast))


_LIBC = None


def _status_kb(key):
    with open("/proc/self/status") as f:
        m = re.search(key + r":\s+(\d+)", f.read())
    return int(m.group(1)) if m else 0


def peak_bytes(name, model, params, inp, autocast, device):
    global _LIBC
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(name, model, params, inp, autocast)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if _LIBC is None:
        _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before = _status_kb("VmRSS")
    step(name, model, params, inp, autocast)
    return (_status_kb("VmHWM") - before) * 1024


# ------------------------------------------------------------------------------------------ check
def check_against_delta(model, params, inp, autocast):
    """Same step with every sd-loha layer on its auto path vs forced onto the straightforward one."""
    from sd_loha.layers import LoHALayer

    layers = [m for m in model.modules() if isinstance(m, LoHALayer)]
    res = {}
    for mode in ("auto", "delta"):
        for lay in layers:
            lay.path = mode
        x = inp.x.detach()
        with autocast():
            out = model(x, inp.t, inp.ctx).sample
        loss = torch.nn.functional.mse_loss(out.float(), inp.target.float())
        loss.backward()
        res[mode] = (loss.detach().double(), [p.grad.double() for p in params])
        for p in params:
            p.grad = None
    for lay in layers:
        lay.path = "auto"
    (la, ga), (ld, gd) = res["auto"], res["delta"]
    loss_rel = float((la - ld).abs() / ld.abs())
    grad_rel = max(float((a - d).abs().max() / d.abs().max().clamp_min(1e-30)) for a, d in zip(ga, gd))
    return loss_rel, grad_rel


def path_mix(model):
    from sd_loha.layers import LoHALayer

    c = collections.Counter()
    for m in model.modules():
        if isinstance(m, LoHALayer):
            c[(m.kind, m.last_path)] += 1
    return ", ".join(f"{k} {p}: {n}" for (k, p), n in sorted(c.items()))


# ------------------------------------------------------------------------------------------ layer sweep
SWEEP = [
    # (kind, out, in, kernel, stride, input shape): the mid UNet's adapted layer shapes (batch 2)
    ("linear", 128, 128, 1, 1, (2, 1024, 128)),     # level-0 attention q/k/v/out
    ("linear", 1024, 128, 1, 1, (2, 1024, 128)),    # level-0 GEGLU in
    ("linear", 128, 512, 1, 1, (2, 1024, 512)),     # level-0 FF out
    ("linear", 128, 512, 1, 1, (2, 77, 512)),       # level-0 cross-attention k/v
    ("linear", 256, 256, 1, 1, (2, 256, 256)),      # level-1 attention
    ("linear", 2048, 256, 1, 1, (2, 256, 256)),     # level-1 GEGLU in
    ("linear", 256, 512, 1, 1, (2, 77, 512)),       # level-1 cross-attention k/v
    ("linear", 512, 512, 1, 1, (2, 64, 512)),       # mid-block attention (8x8)
    ("linear", 512, 512, 1, 1, (2, 512)),           # time_emb_proj (2 tokens)
    ("conv", 128, 128, 1, 1, (2, 128, 32, 32)),     # proj_in/out, level 0
    ("conv", 256, 256, 1, 1, (2, 256, 16, 16)),     # proj_in/out, level 1
    ("conv", 128, 128, 3, 1, (2, 128, 32, 32)),     # resnet conv, level 0
    ("conv", 256, 256, 3, 1, (2, 256, 16, 16)),     # resnet conv, level 1
    ("conv", 512, 512, 3, 1, (2, 512, 8, 8)),       # resnet conv, level 2
    ("conv", 512, 1024, 3, 1, (2, 1024, 8, 8)),     # up-block resnet conv, level 2
    ("conv", 256, 256, 3, 2, (2, 256, 16, 16)),     # downsampler
]


def layer_sweep(reps: int):
    """Per layer shape: extra time of each sd-loha path over the frozen layer (forward + backward
    to input and factors), CPU time of this thread, one intra-op thread, median of ``reps``
    interleaved repetitions; next to ``ops.path_costs``'s estimate and choice."""
    from torch import nn

    from sd_loha.layers import LoHALayer

    torch.set_num_threads(1)
    print("| layer | input | frozen layer | merge | kr | delta | fastest | cost model picks |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, o, i, k, st, xs in SWEEP:
        torch.manual_seed(0)
        base = (nn.Linear(i, o) if kind == "linear" else nn.Conv2d(i, o, k, stride=st, padding=k // 2)).requires_grad_(False)
        lay = LoHALayer(base, rank=RANK, alpha=ALPHA)
        randomize_(lay.parameters())
        x = torch.randn(*xs, requires_grad=True)
        ts = {v: [] for v in ("floor", "merge", "kr", "delta")}

        def run(v):
            if v == "floor":
                y = base(x)
            else:
                lay.path = v
                y = lay(x)
            y.backward(torch.ones_like(y))
            x.grad = None
            for p in lay.parameters():
                p.grad = None

        for v in ts:
            run(v)
        for _ in range(reps):
            for v in ts:
                t0 = time.thread_time()
                run(v)
                ts[v].append(time.thread_time() - t0)
        med = {v: statistics.median(t) * 1e3 for v, t in ts.items()}
        lay.path = "auto"
        pick = lay.choose_path(x)
        best = min(("merge", "kr", "delta"), key=med.__getitem__)
        fl = med["floor"]
        name = f"{kind} {o}×{i}" + (f" k{k}" if k > 1 else "") + (f" s{st}" if st > 1 else "")
        print(f"| {name} | {tuple(xs)} | {fl:.2f} ms | +{med['merge'] - fl:.2f} | +{med['kr'] - fl:.2f} | "
              f"+{med['delta'] - fl:.2f} | {best} | {pick} |", flush=True)


# ------------------------------------------------------------------------------------------ paired A/B
def paired(other: str, unet, inp, targets: str, warmup: int, rounds: int, clock, device, autocast):
    """sd-loha against one other variant, nothing else in the process's rotation: rounds of
    A B B A / B A A B (so drift and order effects cancel); per round the ratio of the two sums.
    Prints every round, the median ratio and a bootstrap 95% interval of that median."""
    paths = target_paths(unet, targets)
    models = {v: make_variant(v, unet, targets, paths, torch.float32) for v in ("sd-loha", other)}
    times: dict[str, list[float]] = {v: [] for v in models}

    def one(v):
        m, params, _ = models[v]
        sync(device)
        t0 = clock()
        step(v, m, params, inp, autocast)
        sync(device)
        return clock() - t0

    for _ in range(warmup):
        for v in models:
            one(v)
    ratios = []
    for r in range(rounds):
        order = ("sd-loha", other, other, "sd-loha") if r % 2 == 0 else (other, "sd-loha", "sd-loha", other)
        t_round: dict[str, float] = {v: 0.0 for v in models}
        for v in order:
            dt = one(v)
            t_round[v] += dt
            times[v].append(dt)
        ratios.append(t_round["sd-loha"] / t_round[other])
        print(f"  round {r}: sd-loha {t_round['sd-loha'] / 2:.3f}s  {other} {t_round[other] / 2:.3f}s  "
              f"ratio {ratios[-1]:.3f}", flush=True)
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    lo, hi = boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]
    faster = sum(r < 1 for r in ratios)
    print(f"\n| targets | sd-loha step (median) | {other} step (median) | sd-loha / {other} (median of "
          f"{rounds} ABBA rounds) | 95% interval | rounds sd-loha faster |")
    print("|---|---|---|---|---|---|")
    print(f"| {targets} | {statistics.median(times['sd-loha']) * 1e3:.0f} ms | "
          f"{statistics.median(times[other]) * 1e3:.0f} ms | {statistics.median(ratios):.3f} | "
          f"{lo:.3f}-{hi:.3f} | {faster} of {rounds} |", flush=True)


# ------------------------------------------------------------------------------------------ main
def machine_note(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="mid")
    ap.add_argument("--targets", default="attn-mlp,full", help="comma list of attn-mlp, full")
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS))
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (default: tiny 10, mid 7, sd15 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--latent", type=int, default=None, help="latent side (image side / 8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="frozen UNet dtype; adapters stay fp32; bf16/fp16 run under autocast")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter; cpu: this process's CPU time (honest under other processes' load "
                         "only with --threads 1: OpenMP threads spin while waiting)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--layer-sweep", action="store_true",
                    help="instead: per-layer time of each sd-loha path (calibrates ops.path_costs)")
    ap.add_argument("--sweep-reps", type=int, default=15)
    ap.add_argument("--pair", metavar="VARIANT", default=None,
                    help="instead: sd-loha against VARIANT only (e.g. peft-lora), in A B B A rounds, "
                         "median ratio with a bootstrap 95%% interval; --steps rounds (default 20)")
    args = ap.parse_args(argv)
    if args.layer_sweep:
        torch.set_num_threads(1)
        print(f"# machine: {machine_note(torch.device('cpu'))}")
        layer_sweep(args.sweep_reps)
        return

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    adapter_dtype = torch.float32
    if dtype == torch.float32:
        autocast = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731
    else:
        autocast = lambda: torch.autocast(device.type, dtype=dtype)  # noqa: E731
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    steps = args.steps or {"tiny": 10, "mid": 7, "sd15": 3}[args.size]
    variants = [v for v in args.variants.split(",") if v]
    if "floor" not in variants:
        variants.insert(0, "floor")

    unet = build_unet(args.size, dtype, device)
    inp = Inputs(args.size, args.batch, args.latent, dtype, device)
    print(f"# size {args.size}: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params, "
          f"batch {inp.batch}, latents {inp.latent}x{inp.latent}, {args.dtype}, device {device}")
    print(f"# machine: {machine_note(device)}")
    print(f"# command: python {' '.join(sys.argv)}  (clock: {args.clock})")

    if args.pair:
        for targets in [t for t in args.targets.split(",") if t]:
            paired(args.pair, unet, inp, targets, args.warmup, args.steps or 20, clock, device, autocast)
        return

    rows = []
    for targets in [t for t in args.targets.split(",") if t]:
        paths = target_paths(unet, targets)
        models = {}
        for v in variants:
            models[v] = make_variant(v, unet, targets, paths, adapter_dtype)
        counts = {v: sum(p.numel() for p in models[v][1]) for v in variants}
        print(f"\n## {targets}: {len(paths)} layers; trainable parameters: "
              + ", ".join(f"{v} {counts[v] / 1e6:.3f}M" for v in variants if v != "floor"))

        if "sd-loha" in models and not args.no_check:
            lr, gr = check_against_delta(models["sd-loha"][0], models["sd-loha"][1], inp, autocast)
            print(f"check sd-loha auto paths vs straightforward formula: loss rel diff {lr:.1e}, "
                  f"max grad rel diff (per tensor, vs its max) {gr:.1e}")

        times = {v: [] for v in variants}
        ratios = {v: [] for v in variants}
        for r in range(args.warmup + steps):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            t_round = {}
            for v in order:
                m, params, _ = models[v]
                sync(device)
                t0 = clock()
                step(v, m, params, inp, autocast)
                sync(device)
                t_round[v] = clock() - t0
            if r >= args.warmup:
                for v in variants:
                    times[v].append(t_round[v])
                    ratios[v].append(t_round[v] / t_round["floor"])
            print(f"  round {r}{' (warm-up)' if r < args.warmup else ''}: "
                  + "  ".join(f"{v} {t_round[v]:.3f}s" for v in variants), flush=True)
        if "sd-loha" in models:
            print(f"sd-loha paths: {path_mix(models['sd-loha'][0])}")

        mem = {}
        for v in variants:
            m, params, _ = models[v]
            if args.no_memory:
                mem[v] = (float("nan"), float("nan"))
                continue
            sv = saved_bytes(v, m, params, inp, autocast)
            pk = peak_bytes(v, m, params, inp, autocast, device)
            mem[v] = (sv, pk)
        for v in variants:
            med = statistics.median(times[v])
            rows.append((targets, v, counts[v], med, statistics.median(ratios[v]), *mem[v]))
        del models
        gc.collect()

    print("\n| targets | variant | trainable params | step (median) | it/s | × floor | saved for backward | peak during step |")
    print("|---|---|---|---|---|---|---|---|")
    floor_mem = {t: (s, p) for t, v, _, _, _, s, p in rows if v == "floor"}
    for targets, v, n, med, ratio, sv, pk in rows:
        fs, fp = floor_mem[targets]
        print(f"| {targets} | {v} | {n / 1e6:.2f}M | {med * 1e3:.0f} ms | {1 / med:.2f} | {ratio:.2f} | "
              f"{sv / 2**20:.0f} MiB ({sv / fs:.2f}×) | {pk / 2**20:.0f} MiB ({pk / fp:.2f}×) |")


if __name__ == "__main__":
    main()
