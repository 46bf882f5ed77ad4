"""Multi-process training on CPU (gloo): `accelerate launch` two processes of the CLI, and the gradient
all-reduce between two real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from sd_loha import apply_loha
from sd_loha.models import build_tiny_pipeline

from .helpers import DEMO_IMAGES, REPO, read_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m sd_loha.cli train` on a CPU-only machine: two gloo
    processes, each on its half of the batches, one optimizer step per step, one file written by rank 0.
    (accelerate's `--cpu` launcher starts several processes only under mpirun; `--multi_gpu` uses torchrun.)"""
    out = tmp_path / "out"
    sets = ["pretrained_model=tiny-sd1", f"train_data_dir={DEMO_IMAGES}", f"output_dir={out}", "resolution=64",
            "min_bucket_reso=64", "max_train_steps=3", "train_batch_size=2", "preset=attn-mlp", "network_dim=4",
            "learning_rate=1e-3", "log_with=none", "save_precision=float"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "sd_loha.cli", "train"] + [a for s in sets for a in ("--set", s)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=420)
    print(f"2-process run: {time.perf_counter() - t:.1f} s")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "batch 2 x 2 processes" in log  # accelerate formed a 2-process group
    assert "steps per epoch: 4 (batch size 2, 2 processes" in log  # 8 batches shared by 2 processes
    assert log.count("saved ") == 1, "only rank 0 writes the file"

    tensors, meta = read_file(out / "loha.safetensors")
    assert meta["ss_total_batch_size"] == "4" and meta["ss_batch_size_per_device"] == "2" and meta["ss_steps"] == "3"
    assert (out / "loss.csv").read_text().count("\n") == 4  # header + 3 steps
    report = apply_loha(build_tiny_pipeline("tiny-sd1"), out / "loha.safetensors", strict=True)
    assert report.unmatched == [] and report.patched["unet"] > 0 and report.patched["te"] > 0
    assert all(torch.isfinite(t).all() for t in tensors.values())


def _reduce_worker(rank: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from accelerate import Accelerator

    from sd_loha.train.runtime import all_reduce_grads as _all_reduce_grads

    acc = Accelerator(cpu=True)
    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad = torch.full((2, 3), float(rank + 1))  # rank 0: 1, rank 1: 2
    params[1].grad = torch.arange(4.0) * (10 if rank else -10)
    params[2].grad = None if rank == 0 else torch.tensor([4.0])  # a module unused on one process
    loss, stop = _all_reduce_grads(acc, params, loss=0.5 + rank, stop=rank == 1)  # only rank 1 saw a stop request
    queue.put((rank, acc.num_processes, loss, stop, [p.grad.tolist() for p in params]))  # plain lists: no shared memory
    acc.wait_for_everyone()


def test_gradients_loss_and_stop_are_shared_across_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_reduce_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, n, loss, stop, grads in results:
        assert n == 2 and loss == pytest.approx(1.0) and stop is True  # every process stops at the same step
        assert grads == [[[1.5] * 3] * 2, [0.0] * 4, [2.0]], rank
