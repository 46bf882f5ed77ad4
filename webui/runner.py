"""The one background training job of the web UI.

:class:`TrainingRunner` runs ``sd_loha.train.loop.train`` in a daemon thread and keeps what its typed events
say (phase, step, loss history, samples, saved files, the result or the error) in a snapshot that
browsers poll. The job belongs to the server, not to a browser session: closing the tab or losing the
connection does not stop it, and a browser that connects later sees it. One job at a time: a second
start while one is active raises :class:`RunActive`.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sd_loha.train.events import Caching, Done, Event, MemoryEstimate, Preflight, Progress, Sample, Saved, Validation

logger = logging.getLogger(__name__)

ACTIVE = ("starting", "preflight", "loading", "caching", "training", "stopping")


class RunActive(RuntimeError):
    """A training run is already active."""


@dataclass
class RunState:
    status: str = "idle"  # idle | starting | preflight | loading | caching | training | stopping | finished | stopped | failed
    message: str = "No training run yet."
    step: int = 0
    total: int = 0
    epoch: int = 0
    loss: float | None = None
    it_s: float | None = None
    eta_s: float | None = None
    caching: tuple[int, int] | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[str, int]] = field(default_factory=list)  # (path, step)
    saved: list[str] = field(default_factory=list)
    output: str | None = None
    output_dir: str | None = None
    loss_curve: str | None = None
    error: str | None = None
    preflight: str = ""
    preflight_report: dict[str, Any] | None = None  # PreflightReport.to_dict() of this run's dataset
    memory: str = ""  # the trainer's device-memory estimate, as printed
    memory_total: int | None = None
    memory_fits: bool | None = None  # None: nothing to compare with (the CPU)
    resume: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    log: list[str] = field(default_factory=list)
    version: int = 0

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["active"] = self.active
        return d


def describe_error(e: BaseException) -> str:
    """An exception as plain words: the library's own errors already say what to do; others get their type."""
    from sd_loha.train.config import ConfigError

    known: tuple[type, ...] = (ConfigError,)
    try:
        from sd_loha.data.preflight import DatasetError
        from sd_loha.io import AdapterFileError
        from sd_loha.model_names import UnsupportedWeightError
        from sd_loha.models import ModelLoadError
        from sd_loha.train.loop import TrainingError

        known += (DatasetError, ModelLoadError, TrainingError, AdapterFileError, UnsupportedWeightError)
    except ImportError:  # pragma: no cover
        pass
    text = str(e).strip()
    if isinstance(e, known):
        return text
    if isinstance(e, MemoryError) or "out of memory" in text.lower():
        return ("Out of memory. Lower the batch size or the resolution, use mixed precision (fp16/bf16) or gradient "
                f"checkpointing. ({type(e).__name__}: {text})")
    if isinstance(e, FileNotFoundError):
        return f"A file was not found: {text}"
    return f"{type(e).__name__}: {text or 'no message'} (the full traceback is in the server console)"


class TrainingRunner:
    """Runs one training at a time in a background thread; `snapshot()` is what the UI shows."""

    def __init__(self, train_fn: Callable[..., Any] | None = None) -> None:
        self._train_fn = train_fn
        self._lock = threading.Lock()
        self._state = RunState()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.last_config = None

    # ---------------------------------------------------------------- control

    def start(self, config: Any, *, resume: bool | str = False) -> None:
        """Start training `config` (a validated TrainConfig) in the background; RunActive if one runs."""
        with self._lock:
            busy = self._busy_message()
            if busy:
                raise RunActive(busy)
            self._stop = threading.Event()
            prev = self._state
            out_dir = str(getattr(config, "output_dir", "") or "") or None
            self._state = RunState(status="starting", message="Starting: checking the settings and the dataset…",
                                   output_dir=out_dir, resume=bool(resume), started_at=time.time(),
                                   version=prev.version + 1)
            if resume and prev.output_dir == out_dir:  # continuing the run on screen: keep its history
                self._state.losses, self._state.val_losses = list(prev.losses), list(prev.val_losses)
                self._state.samples, self._state.saved = list(prev.samples), list(prev.saved)
                self._state.log = list(prev.log)
            self._log("resuming from the newest saved state" if resume else "starting a new run")
            self.last_config = config
            self._thread = threading.Thread(target=self._run, args=(config, resume, self._stop),
                                            name="sd-loha-webui-train", daemon=True)
            self._thread.start()

    def busy_message(self) -> str | None:
        """What to tell someone who presses Start while a run is active (None when idle)."""
        with self._lock:
            return self._busy_message()

    def _busy_message(self) -> str | None:  # lock held
        s = self._state
        if not s.active:
            return None
        where = f" into {s.output_dir}" if s.output_dir else ""
        return (f"A training run is already active ({s.status}" + (f", step {s.step} / {s.total}" if s.total else "")
                + f"{where}). Only one training runs at a time: wait for it to finish, or press Stop first.")

    def stop(self) -> bool:
        """Ask the active run to stop after its current step (it saves the adapter and a resumable state)."""
        with self._lock:
            if not self._state.active:
                return False
            self._stop.set()
            if self._state.status != "stopping":
                self._state.status = "stopping"
                self._state.message = ("Stopping after the current step; the adapter and a resumable state will be "
                                       "saved…")
                self._log("stop requested")
                self._state.version += 1
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends (for scripts and tests); True when no run is active."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        return not self.snapshot()["active"]

    @property
    def active(self) -> bool:
        with self._lock:
            return self._state.active

    @property
    def version(self) -> int:
        with self._lock:
            return self._state.version

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._state.to_dict())

    # ---------------------------------------------------------------- the thread

    def _log(self, line: str) -> None:  # lock held
        self._state.log.append(time.strftime("%H:%M:%S ") + line)
        del self._state.log[:-200]

    def _phase(self, status: str, message: str) -> None:  # lock held
        """Show the run's new phase, unless a Stop request is showing: that stays until the run ends."""
        if self._state.status != "stopping":
            self._state.status, self._state.message = status, message

    def _on_event(self, event: Event) -> None:
        """The trainer's callback: fold one typed event (sd_loha.train.events) into the state."""
        if not isinstance(event, Event):  # a programming error in the trainer: say what was expected
            raise TypeError(f"on_event expects an sd_loha.train.events.Event, got {type(event).__name__}: {event!r}")
        with self._lock:
            s = self._state
            match event:
                case Preflight(report=rep, text=text):
                    s.preflight, s.preflight_report = text, rep or None
                    self._log(f"dataset: {rep.get('images_used', '?')} images used, "
                              f"{len(rep.get('skipped', []))} skipped")
                    self._phase("loading", "Loading the base model…")
                case MemoryEstimate(report=rep, text=text, fits=fits):
                    s.memory, s.memory_total, s.memory_fits = text, rep.get("total"), fits
                    self._log(next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("total")), text))
                    if fits is False:
                        self._log("the estimate does NOT fit the device's free memory: see the status for options")
                case Caching(done=done, total=total):
                    s.caching = (done, total)
                    self._phase("caching", f"Caching latents: {done} / {total} images")
                case Progress():
                    s.step, s.total, s.epoch = event.step, event.total, event.epoch
                    s.loss, s.it_s, s.eta_s = event.loss, event.it_s, event.eta_s
                    while s.losses and s.losses[-1][0] >= s.step:  # a resumed run repeats no step, but be safe
                        s.losses.pop()
                    s.losses.append((s.step, s.loss))
                    self._phase("training", "Training")
                case Validation(step=step, loss=loss):
                    s.val_losses.append((step, loss))
                    self._log(f"validation loss {loss:.4f} at step {step}")
                case Sample(path=path, step=step):
                    s.samples.append((path, step))
                    self._log(f"sample images: {path}")
                case Saved(path=path):
                    s.saved.append(path)
                    self._log(f"saved {path}")
                case Done(stopped=stopped):
                    self._log("run ended" + (" (stopped)" if stopped else ""))
            s.version += 1

    def _run(self, config: Any, resume: bool | str, stop: threading.Event) -> None:
        train = self._train_fn
        try:
            if train is None:
                from sd_loha.train.loop import train
            with self._lock:  # a Stop pressed before this thread ran must stay on screen
                self._phase("preflight", "Checking the dataset…")
                self._state.version += 1
            result = train(config, resume=resume or None, on_event=self._on_event, stop_event=stop, progress=False)
        except BaseException as e:  # noqa: BLE001 - a failed run must never take the server down
            logger.exception("training failed")
            msg = describe_error(e)
            with self._lock:
                self._state.status = "failed"
                self._state.error = msg
                self._state.message = "Training failed."
                self._state.finished_at = time.time()
                self._log("failed: " + msg.splitlines()[0] if msg else "failed")
                self._state.log.append("".join(traceback.format_exception_only(type(e), e)).strip())
                self._state.version += 1
            return
        with self._lock:
            s = self._state
            s.output = str(result.output) if result.output else None
            s.output_dir = str(result.output_dir)
            s.loss_curve = str(result.loss_curve) if result.loss_curve else None
            s.finished_at = time.time()
            if result.stopped:
                s.status = "stopped"
                s.message = (f"Stopped at step {result.steps}. The adapter so far and a resumable state are saved; "
                             "press Resume to continue this run.")
            else:
                s.status = "finished"
                s.message = f"Finished: {result.steps} steps."
            self._log(f"{s.status}: {s.output}")
            s.version += 1
