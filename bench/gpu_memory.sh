#!/usr/bin/env bash
# Issue 19 on a CUDA GPU (prepared, not yet run): SDXL (real architecture, random weights, no download) at 1024 px,
# batch 1, gradient checkpointing, cached latents and text-encoder outputs (only the UNet and its adapter on the
# GPU), frozen base in bf16 / fp8 / int8 / nf4, adapters sd-loha LoHA rank 8, LyCORIS LoHA rank 8 and PEFT LoRA r16
# in fp32 with AdamW. Per row: the accounting's components (base by storage kind, adapter, gradients, AdamW state,
# saved for backward on the meta device) next to a real step under bf16 autocast: memory allocated before it, the
# bytes its forward saved (real tensors) and torch.cuda.max_memory_allocated over two steps.
#
#   bash bench/gpu_memory.sh                     # ~3-5 minutes on an H100/H200 (the base is built 4 times on the CPU)
#   bash bench/gpu_memory.sh --storages bf16,nf4 # extra args go to bench/bench_memory.py
#
# Uses $PYTHON (default python) with a CUDA torch, diffusers, peft, lycoris-lora and bitsandbytes; sd-loha from the
# tree (PYTHONPATH). Writes $OUT/gpu_memory.json when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(torch.__version__, torch.cuda.get_device_name())
PYEOF
"$PY" bench/bench_memory.py --device cuda --json "${OUT:-/tmp}/gpu_memory.json" "$@"
