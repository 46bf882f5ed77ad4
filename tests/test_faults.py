"""Faults during training, made for real: Ctrl-C / SIGTERM, SIGKILL at random moments, a full disk.

Each test runs the real `sd-loha train` command in a subprocess on the tiny model and checks what is left on disk.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sd_loha.io import AdapterFileError, read_safetensors, save_safetensors_atomic

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "sd_loha" / "assets" / "demo_images"


def _cmd(out: Path, *extra: str) -> list[str]:
    sets = {
        "pretrained_model": "tiny-sd1", "train_data_dir": str(DEMO), "output_dir": str(out), "output_name": "run",
        "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "train_batch_size": 2,
        "max_train_steps": 400, "learning_rate": 1e-3, "train_text_encoder": False, "save_every_n_steps": 3,
        "save_last_n": 2, "cache_latents": True, "log_with": "none",
    }
    args = [sys.executable, "-m", "sd_loha.cli", "train"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("timed out waiting for the training run")


def _saved_adapters(out: Path) -> list[Path]:
    return sorted(out.glob("run-step*.safetensors"))


def _newest_step(out: Path) -> int:
    """Step of the newest saved adapter (save_last_n rotates old ones away, so count by step, not by files)."""
    steps = [int(p.stem.split("step")[-1]) for p in _saved_adapters(out)]
    return max(steps, default=0)


def _assert_all_outputs_valid(out: Path) -> None:
    for f in out.glob("*.safetensors"):
        tensors, _ = read_safetensors(f)  # raises on a truncated or corrupt file
        assert all(torch.isfinite(t.float()).all() for t in tensors.values()), f
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") and not p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_adapter_and_state_then_resume_finishes(tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    _wait_for(lambda: len(_saved_adapters(out)) >= 1, proc)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output  # stopped early, on purpose: not a success, not a crash
    assert "resume with --resume" in output
    states = sorted(out.glob("state-*"))
    assert states, output
    stopped_step = int(states[-1].name.split("-")[1])
    assert (out / f"run-step{stopped_step:06d}.safetensors").is_file()
    _assert_all_outputs_valid(out)

    resumed = subprocess.run(_cmd(out, "--set", f"max_train_steps={stopped_step + 2}", "--resume"),
                             capture_output=True, text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {states[-1]}: step {stopped_step}" in resumed.stdout
    assert (out / "run.safetensors").is_file()
    _assert_all_outputs_valid(out)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_corrupts_and_resume_works(tmp_path):
    out = tmp_path / "out"
    rng = random.Random(0)
    for _ in range(3):
        newest = _newest_step(out)
        extra = ["--resume"] if any(out.glob("state-*")) else []
        proc = subprocess.Popen(_cmd(out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
        _wait_for(lambda: _newest_step(out) > newest, proc, timeout=180)  # a save after this (re)start
        time.sleep(rng.uniform(0.0, 1.5))  # anywhere in a step or a save (saves come every 3 steps)
        proc.kill()
        proc.wait(timeout=30)
        _assert_all_outputs_valid(out)
        for state in out.glob("state-*"):
            assert (state / "progress.json").is_file() and (state / "network.safetensors").is_file()
    last = sorted(out.glob("state-*"))[-1]
    step = int(last.name.split("-")[1])
    done = subprocess.run(_cmd(out, "--set", f"max_train_steps={step + 2}", "--resume"),
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "run.safetensors").is_file()
    assert not list(out.glob(".*.tmp")), "stale temp files from killed runs are cleaned up"


def test_kill_during_a_save_leaves_the_previous_file(tmp_path):
    """SIGKILL a process while it writes a large file over an existing one: the old file stays intact."""
    target = tmp_path / "a.safetensors"
    save_safetensors_atomic({"x": torch.ones(4)}, target)
    code = (
        "import torch, sys; from sd_loha.io import save_safetensors_atomic\n"
        "print('start', flush=True)\n"
        "save_safetensors_atomic({f't{i}': torch.randn(2_000_000) for i in range(40)}, sys.argv[1])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "start"
    _wait_for(lambda: any(tmp_path.glob(".a.safetensors.*.tmp")), proc, timeout=60)
    proc.kill()
    proc.wait()
    tensors, _ = read_safetensors(target)
    assert torch.equal(tensors["x"], torch.ones(4))


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs: a real full disk. Needs mount rights (root, as in CI)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_while_saving_keeps_old_file_and_leaves_no_partial(small_fs):
    target = small_fs / "adapter.safetensors"
    save_safetensors_atomic({"w": torch.full((1000,), 3.0)}, target)
    before = target.read_bytes()
    with pytest.raises(OSError) as e:
        save_safetensors_atomic({"w": torch.randn(400_000)}, target)  # 1.6 MB: cannot fit
    assert "could not write" in str(e.value) and str(target) in str(e.value)
    assert "previous file" in str(e.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in small_fs.iterdir()) == ["adapter.safetensors"]


def test_refuses_nan_before_writing(tmp_path):
    with pytest.raises(AdapterFileError, match="NaN or Inf"):
        save_safetensors_atomic({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_disk_full_during_training_says_so(small_fs):
    proc = subprocess.run(_cmd(small_fs, "--set", "max_train_steps=30", "--set", "save_every_n_steps=1",
                               "--set", "save_last_n=none"),
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "No space left on device" in err or "disk is full" in err, err[-2000:]
    _assert_all_outputs_valid(small_fs)


def test_out_of_memory_stops_with_advice(tmp_path):
    """A real allocation failure: the training process's address space is capped (RLIMIT_AS) 512 MiB above
    what it uses once torch and diffusers are imported, and the run asks for 16 images of 768 px per step.
    The run stops with advice that names the settings to change, not a traceback."""
    out = tmp_path / "out"
    train_args = _cmd(out, "--set", "train_batch_size=16", "--set", "resolution=768", "--set", "min_bucket_reso=256",
                      "--set", "max_bucket_reso=1024", "--set", "cache_latents=false")[3:]
    script = (
        "import resource, sys\n"
        "import torch, diffusers, transformers, accelerate\n"
        "from sd_loha.cli import main\n"
        "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024\n"
        "limit = vm + 512 * 2**20\n"
        "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    # On the CPU even where a GPU exists: CUDA reserves far more address space than the cap allows.
    env = dict(_env(), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", script, *train_args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "out of memory" in err and ("can't allocate memory" in err or "MemoryError" in err), err[-3000:]
    assert "train_batch_size (now 16)" in err and "gradient_checkpointing" in err and "cache_latents" in err
    assert "Traceback" not in err
    assert not list(out.glob("*.safetensors")), "no adapter file is written by a run that never finished a step"
    assert not list(out.glob("*.tmp*")), "no temporary file is left behind"


def test_a_kill_while_rotating_states_never_leaves_a_half_deleted_state(tmp_path, monkeypatch):
    """rotate() deletes old resumable states; a kill in the middle of that rmtree must not leave a folder under a
    state's final name without its files (the random-kill test above once found state-00000048 without
    progress.json). The leftover must be a temp name that clean_stale_temp removes."""
    import shutil

    from sd_loha.train import state as state_mod

    for step in (3, 6, 9):
        folder = tmp_path / f"state-{step:08d}"
        folder.mkdir()
        for name in ("network.safetensors", "optimizer.pt", "progress.json"):
            (folder / name).write_bytes(b"x")
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        victim = sorted(Path(path).iterdir())[-1]  # progress.json goes first, then the process dies
        victim.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(state_mod.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        state_mod.rotate(tmp_path, "state-*", 2)
    monkeypatch.setattr(state_mod.shutil, "rmtree", real_rmtree)
    for folder in tmp_path.glob("state-*"):
        assert (folder / "progress.json").is_file(), folder
    assert [p.name for p in sorted(tmp_path.glob("state-*"))] == ["state-00000006", "state-00000009"]
    assert state_mod.clean_stale_temp(tmp_path) and not list(tmp_path.glob(".*"))
