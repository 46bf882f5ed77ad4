"""The README quickstart's training command, as a user runs it: `sd-loha train --config train_configs/demo.toml`
(run once per session by the `demo_run` fixture; tests/train/test_learning.py judges its pictures)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from sd_loha import apply_loha
from sd_loha.models import load_pipeline
from sd_loha.train.config import load_config

from .helpers import REPO, assert_finite_file, grid_cell, read_file

# The run's time is printed, never asserted: CPU time moves with the processor and its neighbours. The
# benchmark of record is bench/RESULTS.md ("The demo").


@pytest.mark.slow
def test_demo_config_end_to_end(demo_run):
    out, proc, took, cpu = demo_run
    print(f"demo: {took:.1f} s wall, {cpu:.1f} s CPU (load average {os.getloadavg()[0]:.1f})")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    cfg = load_config(REPO / "train_configs" / "demo.toml")

    adapter = out / "demo.safetensors"
    assert_finite_file(adapter)
    tensors, meta = read_file(adapter)
    assert meta["ss_steps"] == str(cfg.max_train_steps) and meta["ss_base_model_version"] == "sd_v1"
    report = apply_loha(load_pipeline("toy-sd1"), adapter, strict=True)
    assert report.unmatched == [] and report.patched.get("te", 0) == 0 and report.patched["unet"] > 0
    assert not any(k.startswith("lora_te") for k in tensors)  # the text encoder stays frozen, as configured
    assert any("resnets_0_conv1." in k for k in tensors)  # preset full with conv_dim: the 3x3 convs train

    # samples: a grid per saved step and at the end (rows: prompts; columns: strengths 0, 0.5, 1), and the
    # progress grid (the base, then each saved step at strength 1)
    grids = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert grids == ["final.png", "progress.png", "step000200.png"]
    n = len(cfg.sample_prompts)
    final = np.asarray(Image.open(out / "samples" / "final.png").convert("RGB"))
    progress = np.asarray(Image.open(out / "samples" / "progress.png").convert("RGB"))
    assert final.shape[1] == 3 * 128 and progress.shape[1] == 3 * 128  # 64 px pictures shown at 2x
    for row in range(n):
        base = grid_cell(final, row, 0)
        assert np.array_equal(grid_cell(progress, row, 0), base)  # the same base pictures in both
        assert np.array_equal(grid_cell(progress, row, 2), grid_cell(final, row, 2))  # the last step at 1
        assert np.abs(grid_cell(final, row, 2).astype(float) - base).mean() > 10  # the adapter changed them

    # the loss curve and its numbers: the loss clearly falls
    rows = (out / "loss.csv").read_text().split()
    assert rows[0] == "step,loss" and len(rows) == cfg.max_train_steps + 1
    losses = [float(r.split(",")[1]) for r in rows[1:]]
    first, last = sum(losses[:25]) / 25, sum(losses[-25:]) / 25
    print(f"demo loss: first 25 steps {first:.3f}, last 25 steps {last:.3f}")
    assert last < 0.6 * first
    with Image.open(out / "loss.png") as im:
        assert im.size == (640, 360)
    assert (out / "demo-step000200.safetensors").is_file() and (out / "state-00000400").is_dir()
