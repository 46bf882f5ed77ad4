"""Resumable training state and saved-file rotation.

A state is a folder `state-<step>/` next to the adapter files: the adapter factors in fp32
(safetensors), the optimizer/scheduler/EMA tensors (torch.save of our own plain dicts, read back with
weights_only=True so no code runs), RNG states and progress counters (JSON). It is written into a temp
folder and renamed, so a kill at any moment leaves either the previous state or the new one.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import remove_atomic
from ..io import read_safetensors, save_safetensors_atomic

STATE_PREFIX = "state-"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(output_dir: Path, step: int, *, network_sd: dict[str, torch.Tensor], optimizer, scheduler,
               progress: dict[str, Any], ema: dict[str, Any] | None = None,
               scaler: dict[str, Any] | None = None) -> Path:
    final = output_dir / f"{STATE_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=output_dir))
    try:
        save_safetensors_atomic(network_sd, tmp / "network.safetensors")
        _torch_save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "ema": ema,
                     "scaler": scaler},
                    tmp / "optimizer.pt")
        rng = _rng_state()
        # numpy's Mersenne Twister keys are uint32, which torch.save cannot serialize before torch 2.5;
        # int64 holds them exactly on every torch (load_state casts back).
        np_key = torch.from_numpy(rng["numpy"][1].astype(np.int64))
        _torch_save({"rng_torch": rng["torch"], "rng_cuda": rng.get("cuda"),
                     "rng_numpy": (rng["numpy"][0], np_key, *rng["numpy"][2:])},
                    tmp / "rng.pt")
        (tmp / "progress.json").write_text(json.dumps({**progress, "rng_python": _py_rng_to_json(rng["python"])}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            remove_atomic(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        hint = " (disk is full: free space or choose another output_dir)" if e.errno == errno.ENOSPC else ""
        raise OSError(e.errno, f"could not write training state {final}: {e.strerror}{hint}; "
                               "earlier states are untouched") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _torch_save(obj: Any, path: Path) -> None:
    # Through memory: torch.save's own writer reports a full disk as an opaque "unexpected pos" error.
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(buf.getvalue())


def _py_rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def load_state(path: Path) -> dict[str, Any]:
    """Everything `save_state` wrote; raises a clear error on a damaged state."""
    try:
        network_sd, _ = read_safetensors(path / "network.safetensors")
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
        progress = json.loads((path / "progress.json").read_text())
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"resume state {path} is damaged or incomplete ({e}); resume from an earlier state-* folder") from None
    py = progress.pop("rng_python")
    np_state = rng["rng_numpy"]
    return {
        "network": network_sd,
        "optimizer": opt["optimizer"],
        "scheduler": opt["scheduler"],
        "ema": opt.get("ema"),
        "scaler": opt.get("scaler"),  # fp16 loss scale: without it a resumed fp16 run re-learns the scale
        "progress": progress,
        "rng": {"python": (py[0], tuple(py[1]), py[2]), "torch": rng["rng_torch"], "cuda": rng.get("rng_cuda"),
                "numpy": (np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:])},
    }


def restore_rng(state: dict[str, Any]) -> None:
    rng = dict(state["rng"])
    if rng.get("cuda") is None:
        rng.pop("cuda", None)
    _set_rng_state(rng)


def latest_state(output_dir: Path) -> Path | None:
    states = sorted(p for p in output_dir.glob(f"{STATE_PREFIX}*") if p.is_dir() and (p / "progress.json").is_file())
    return states[-1] if states else None


def rotate(output_dir: Path, pattern: str, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` files/folders matching `pattern` (None = keep all)."""
    if not keep:
        return []
    items = sorted(output_dir.glob(pattern))
    doomed = items[:-keep]
    for p in doomed:
        remove_atomic(p)
    return doomed


def clean_stale_temp(output_dir: Path) -> list[Path]:
    """Remove temp files/folders a killed run left behind (`.<name>.<random>.tmp`, `.state-*.<random>`).
    They never carry a final name, so nothing else could be using them once we hold the folder lock."""
    removed = []
    for p in output_dir.glob(".*"):
        if p.name.endswith(".tmp") or p.name.startswith(f".{STATE_PREFIX}"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class OutputDirLock:
    """An exclusive lock on output_dir for the length of a run, so two runs can't write into one folder.
    flock is released by the kernel when the process dies, so a killed run never leaves a stale lock."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / ".sd-loha.lock"
        self._fh = None

    def __enter__(self) -> OutputDirLock:
        import fcntl

        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            owner = self._fh.read().strip() or "unknown"
            self._fh.close()
            raise RuntimeError(f"output_dir {self.path.parent} is in use by another training run (pid {owner}); "
                               "wait for it to finish or choose another output_dir") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(str(os.getpid()))
        self._fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
