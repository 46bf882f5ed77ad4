"""A real web UI server per test module: temp data/models/outputs folders, the demo images copied into
data/demo, the app launched in-process on a free 127.0.0.1 port and closed at teardown."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from sd_loha.toy.measure import BORDER, OBJECT_DISTANCE
from webui.paths import DEMO_IMAGES, PathPolicy  # noqa: E402
from webui.train_tab import FIELD_NAMES, default_form, section_names  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

# A short training on the built-in tiny SD 1.x model at 64 px: seconds per step on 2 CPU cores.
FAST_TRAIN = dict(
    pretrained_model="tiny-sd1", train_data_dir="demo", output_name="tiny", preset="attn-only", network_dim=4,
    network_alpha=4.0, conv_dim=0, train_text_encoder=False, learning_rate=5e-3, length_unit="steps", length=6,
    resolution="64", train_batch_size=4, lr_scheduler="constant", seed=1, save_every_n_steps=0, sample_prompts="",
    sample_every_n_steps=0, sample_steps=2,
)
# The bucket range must contain the 64 px resolution (options without a field go in the TOML box).
FAST_TOML = "[dataset]\nmin_bucket_reso = 64\nmax_bucket_reso = 128\nflip_aug = false\n"


def border_uniformity(img) -> float:
    """Share of the border ring's pixels that the toy measurement would read as background (within
    OBJECT_DISTANCE of the ring's median): about 1 on a real toy-sd1 picture (0.98-0.99), 0.68-0.77 on the
    coloured static of a random-weight model."""
    a = np.asarray(img)[..., :3].astype(np.float32)
    ring = np.ones(a.shape[:2], bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    px = a[ring]
    return float((np.sqrt(((px - np.median(px, axis=0)) ** 2).sum(-1)) < OBJECT_DISTANCE).mean())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def form_args(policy: PathPolicy, box: str = FAST_TOML, **overrides) -> list:
    """The Train tab's settings, positionally (the order of the /start_training endpoint): the fields, the TOML box,
    the sections' widgets; a fresh page's values with FAST_TRAIN and the overrides."""
    f = default_form(policy)
    f.update(FAST_TRAIN)
    f.update(overrides)
    return [*(f[n] for n in FIELD_NAMES), box, *(f[n] for n in section_names())]


@pytest.fixture
def policy(tmp_path, monkeypatch) -> PathPolicy:
    """Folders under tmp_path (the working folder too), the demo images copied into data/demo; no server."""
    monkeypatch.chdir(tmp_path)
    p = PathPolicy(tmp_path / "data", tmp_path / "models", tmp_path / "output")
    shutil.copytree(DEMO_IMAGES, p.data_dir / "demo")
    return p


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(demo, url, policy) for a launched app; folders under a temp root."""
    pytest.importorskip("gradio")
    from webui.app import build_app, launch

    root = tmp_path_factory.mktemp("webui")
    policy = PathPolicy(root / "data", root / "models", root / "output")
    shutil.copytree(DEMO_IMAGES, policy.data_dir / "demo")
    demo = build_app(policy)
    launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    url = demo.local_url
    yield demo, url, policy
    runner = demo.sdl_runner
    runner.stop()
    runner.wait(120)
    demo.close()


def wait_for(pred, timeout: float, interval: float = 0.5, what: str = "condition"):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="session", autouse=True)
def _offline_env():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    yield
