"""Trainer tests run with one intra-op thread.

The tiny models' ops are too small for intra-op parallelism to pay, and on a shared 2-core machine
a second OpenMP thread that waits at every op's barrier for a descheduled partner makes steps 10x
slower (measured: 0.57 s/step with 1 thread vs 7 s/step with 2 at load average 6).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import REPO


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README quickstart's training command, run once as a user runs it, for the demo and learning tests:
    (output folder, completed process, wall seconds, CPU seconds of the run)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    exe = Path(sys.executable).with_name("sd-loha")
    cmd = [str(exe)] if exe.exists() else [shutil.which("sd-loha") or "sd-loha"]
    cmd += ["train", "--config", "train_configs/demo.toml", "--set", f"output_dir={out}"]
    # One intra-op thread: the toy model gains nothing from two, and on a loaded 2-core machine the second
    # thread's barrier waits make every step ~10x slower.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return out, proc, time.perf_counter() - t, _children_cpu() - cpu0


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime
