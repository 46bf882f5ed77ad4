#!/usr/bin/env bash
# Issue 11 on a CUDA GPU (prepared for an H200): every shipped config in fp16 and bf16 with AdamW8bit
# (bitsandbytes), on the tiny models and, for sd15_style (512 px), sdxl_style and sd35_style (1024 px; SD3.5
# Medium with T5-XXL), on full-size random-weight models built from the real configs (no download). Prints it/s
# and peak GPU memory per run. SD3.5 alone: bash bench/gpu_configs.sh --only sd35
#
#   bash bench/gpu_configs.sh                  # ~5-8 minutes on an H200, most of it building the SDXL-size model
#   bash bench/gpu_configs.sh --part matrix    # extra args go to bench/gpu_configs.py (--part, --steps, --only)
#
# Uses $PYTHON when set (it must have a CUDA torch and sd-loha's test extras); otherwise scripts/setup makes .venv,
# which installs PyPI's CUDA torch where nvidia-smi sees a GPU (this needs the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  ./scripts/setup
  PYTHON=.venv/bin/python
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" - <<'PYEOF'
import torch, sys
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device; a CPU build in .venv? "
             "remove .venv (or set PYTHON to a CUDA-enabled python) and run again")
import bitsandbytes
print(torch.__version__, torch.cuda.get_device_name(), "bitsandbytes", bitsandbytes.__version__)
PYEOF
exec "$PYTHON" bench/gpu_configs.py --json "${OUT:-/tmp}/gpu_configs.json" "$@"
