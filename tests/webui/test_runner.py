"""The background runner, with a stand-in train function (fast): events to state, one job at a time,
Stop, failures in plain words, and a job that outlives whoever started it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sd_loha.train import events
from webui.runner import RunActive, TrainingRunner


def fake_train(steps=5, fail_at=None, gate: threading.Event | None = None):
    """Emits what sd_loha.train.loop.train emits, as the typed events of sd_loha/train/events.py."""
    def train(config, *, resume=None, on_event, stop_event, progress):
        on_event(events.Preflight(report={"images_used": 3, "skipped": []}, text="3 images"))
        on_event(events.Caching(done=3, total=3))
        done = 0
        for step in range(1, steps + 1):
            if gate is not None:
                gate.wait(10)
            if fail_at == step:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            on_event(events.Progress(step=step, total=steps, epoch=1, loss=1.0 / step, lr=1e-4, it_s=2.0,
                                     eta_s=(steps - step) / 2))
            done = step
            if step == 2:
                on_event(events.Sample(path="/x/s.png", step=step))
                on_event(events.Validation(step=step, loss=0.25))
            if stop_event.is_set():
                break
        out = Path(config.output_dir) / "a.safetensors"
        on_event(events.Saved(path=str(out), step=done))
        on_event(events.Done(output=str(out), stopped=done < steps, step=done))
        return SimpleNamespace(output=out, output_dir=Path(config.output_dir), steps=done, stopped=done < steps,
                               loss_curve=None)
    return train


CFG = SimpleNamespace(output_dir="/tmp/run")


def test_events_become_the_state():
    r = TrainingRunner(fake_train())
    r.start(CFG)
    assert r.wait(10)
    s = r.snapshot()
    assert s["status"] == "finished" and s["step"] == s["total"] == 5
    assert [st for st, _ in s["losses"]] == [1, 2, 3, 4, 5]
    assert s["samples"] == [["/x/s.png", 2]] or s["samples"] == [("/x/s.png", 2)]
    assert s["output"] == "/tmp/run/a.safetensors" and not s["active"]
    assert s["loss"] == pytest.approx(0.2) and s["it_s"] == 2.0 and s["eta_s"] == 0.0 and s["epoch"] == 1
    assert [tuple(v) for v in s["val_losses"]] == [(2, 0.25)] and s["saved"] == ["/tmp/run/a.safetensors"]
    assert s["preflight"] == "3 images" and s["preflight_report"]["images_used"] == 3
    assert s["caching"] in ([3, 3], (3, 3))
    assert any("validation loss 0.2500 at step 2" in line for line in s["log"])


def test_one_job_at_a_time_and_stop():
    gate = threading.Event()
    r = TrainingRunner(fake_train(steps=50, gate=gate))
    r.start(CFG)
    with pytest.raises(RunActive, match="already active"):
        r.start(CFG)
    assert "already active" in r.busy_message()
    assert r.stop()
    assert r.snapshot()["status"] == "stopping"
    gate.set()
    assert r.wait(10)
    s = r.snapshot()
    assert s["status"] == "stopped" and s["step"] == 1 and "Resume" in s["message"]
    assert not r.stop()  # nothing to stop any more
    r.start(CFG, resume=True)  # a new job may start now; resuming keeps the history on screen
    r.wait(10)
    assert r.snapshot()["status"] == "stopped" or r.snapshot()["status"] == "finished"


def test_failure_in_plain_words():
    r = TrainingRunner(fake_train(fail_at=3))
    r.start(CFG)
    r.wait(10)
    s = r.snapshot()
    assert s["status"] == "failed" and s["step"] == 2
    assert s["error"].startswith("Out of memory. Lower the batch size")


def test_config_errors_are_shown_as_they_are():
    from sd_loha.train.config import ConfigError

    def train(*a, **k):
        raise ConfigError(["network_dim must be >= 1"])

    r = TrainingRunner(train)
    r.start(CFG)
    r.wait(10)
    assert r.snapshot()["error"] == "invalid training config (1 problem):\n  - network_dim must be >= 1."


def test_the_job_belongs_to_the_server_not_the_caller():
    # started from a thread that ends at once (like a request handler of a browser that went away)
    gate = threading.Event()
    r = TrainingRunner(fake_train(gate=gate))
    t = threading.Thread(target=r.start, args=(CFG,))
    t.start()
    t.join()
    time.sleep(0.1)
    assert r.snapshot()["active"]
    gate.set()
    assert r.wait(10) and r.snapshot()["status"] == "finished"


def test_untyped_events_are_refused_in_words():
    """The trainer's events are the dataclasses of sd_loha/train/events.py; a string-keyed dict is a bug that
    must show, not a run whose progress silently never appears."""
    def train(config, *, on_event, **kw):
        on_event({"type": "progress", "step": 1, "total": 2, "loss": 0.5})

    r = TrainingRunner(train)
    r.start(CFG)
    r.wait(10)
    s = r.snapshot()
    assert s["status"] == "failed" and s["step"] == 0
    assert "on_event expects an sd_loha.train.events.Event, got dict" in s["error"]


def test_a_stop_before_the_thread_runs_stays(monkeypatch):
    """Stop pressed between Start and the job's first line: the job must not show "preflight" over it."""
    seen = []

    def train(config, *, on_event, stop_event, **kw):
        seen.append(r.snapshot()["status"])
        on_event(events.Preflight(report={"images_used": 1, "skipped": []}, text=""))
        on_event(events.Caching(done=1, total=1))
        seen.append(r.snapshot()["status"])
        assert stop_event.is_set()
        return SimpleNamespace(output=None, output_dir=Path(config.output_dir), steps=0, stopped=True, loss_curve=None)

    r = TrainingRunner(train)
    held = []
    monkeypatch.setattr(threading.Thread, "start", lambda self: held.append(self))
    r.start(CFG)
    assert r.stop()
    monkeypatch.undo()
    held[0].start()
    assert r.wait(10)
    assert seen == ["stopping", "stopping"] and r.snapshot()["status"] == "stopped"


def test_a_memory_estimate_that_does_not_fit_is_shown_while_the_run_can_still_be_stopped():
    from webui.train_tab import result_markdown, status_html

    gate = threading.Event()
    text = "device memory for training (estimate, cuda):\n  total   13.20 GiB\n  does NOT fit: 8.00 GiB available"

    def train(config, *, resume=None, on_event, stop_event, progress):
        on_event(events.MemoryEstimate(report={"total": int(13.2 * 2 ** 30)}, text=text, fits=False))
        gate.wait(10)
        return fake_train(steps=1)(config, resume=resume, on_event=on_event, stop_event=stop_event,
                                   progress=progress)

    r = TrainingRunner(train)
    r.start(CFG)
    for _ in range(100):
        if r.snapshot()["memory"]:
            break
        time.sleep(0.05)
    s = r.snapshot()
    assert s["active"] and s["memory"] == text and s["memory_fits"] is False
    assert "needs about 13.2 GiB (more than the GPU has free)" in status_html(s)
    assert "may not fit" in result_markdown(s) and "does NOT fit: 8.00 GiB available" in result_markdown(s)
    assert any("total   13.20 GiB" in line for line in s["log"])
    gate.set()
    assert r.wait(10)
    done = r.snapshot()
    assert "may not fit" not in result_markdown(done)  # the finished run shows its result instead
