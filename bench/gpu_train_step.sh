#!/usr/bin/env bash
# Issue 5 on a GPU (prepared for an H200; not yet run): one LoHA training step, side by side,
# SD1.5-size UNet (860M params, random weights from the config: no download) at 512x512
# (64x64 latents), batch 4, frozen UNet in bf16 under autocast, adapters in fp32 (as the trainer
# runs), variants: floor, sd-loha, LyCORIS LoHA, PEFT LoHa, PEFT LoRA r16 (same parameter count),
# targets attn-mlp and full.  Prints step time (median), it/s, ratio to the floor, autograd-saved
# bytes and peak memory (torch.cuda.max_memory_allocated minus memory_allocated before the step).
# Then sd-loha against PEFT LoRA alone, in A B B A rounds (median ratio, bootstrap 95% interval).
#
#   bash bench/gpu_train_step.sh            # ~1-2 minutes on an H200 after the model build
#   bash bench/gpu_train_step.sh --steps 20 # extra args go to bench_train_step.py
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
ARGS=(--size sd15 --device cuda --dtype bf16 --batch 4 --latent 64 --warmup 3)
"$PY" bench/bench_train_step.py "${ARGS[@]}" --steps 10 "$@"
"$PY" bench/bench_train_step.py "${ARGS[@]}" --targets attn-mlp,full --pair peft-lora --steps 10 "$@"
