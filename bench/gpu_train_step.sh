#!/usr/bin/env bash
# Issue 5 on a GPU (prepared for an H200; not yet run): one LoHA training step, side by side,
# SD1.5-size UNet (860M params, random weights from the config: no download) at 512x512
# (64x64 latents), batch 4, frozen UNet in bf16 under autocast, adapters in fp32 (as the trainer
# runs), variants: floor, sd-loha, LyCORIS LoHA, PEFT LoHa, PEFT LoRA r16 (same parameter count),
# targets attn-mlp and full.  Prints step time (median), it/s, ratio to the floor, autograd-saved
# bytes and peak memory (torch.cuda.max_memory_allocated minus memory_allocated before the step).
# Then sd-loha against PEFT LoRA alone, in A B B A rounds (median ratio, bootstrap 95% interval).
# Then issue 19's memory run (bench/bench_memory.py --device cuda): SDXL (real architecture, random weights) at
# 1024 px, batch 1, gradient checkpointing, only the UNet and its fp32 adapter on the GPU, frozen base in bf16 / fp8 /
# int8 / nf4, sd-loha LoHA vs LyCORIS LoHA vs PEFT LoRA r16: the accounting's components next to a real step under
# bf16 autocast (memory allocated before it, the bytes its forward saved, torch.cuda.max_memory_allocated over two
# steps with AdamW); rows also in $OUT/gpu_memory.json.
#
#   bash bench/gpu_train_step.sh            # ~1-2 minutes on an H200 after the model build, plus ~3-5 for memory
#   bash bench/gpu_train_step.sh --steps 20 # extra args go to bench_train_step.py
#   PART=memory bash bench/gpu_train_step.sh  # only the memory run (PART=step: only the step timings)
#
# Needs the venv's packages plus a CUDA build of torch (pip install torch --index-url .../cu12x).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(torch.__version__, torch.cuda.get_device_name())
PYEOF
PART=${PART:-all}
ARGS=(--size sd15 --device cuda --dtype bf16 --batch 4 --latent 64 --warmup 3)
if [ "$PART" != memory ]; then
  "$PY" bench/bench_train_step.py "${ARGS[@]}" --steps 10 "$@"
  "$PY" bench/bench_train_step.py "${ARGS[@]}" --targets attn-mlp,full --pair peft-lora --steps 10 "$@"
fi
if [ "$PART" != step ]; then
  "$PY" bench/bench_memory.py --device cuda --json "${OUT:-/tmp}/gpu_memory.json"
fi
