"""A fresh page starts on the pretrained built-in toy-sd1, with settings it draws real pictures with: the Train tab's
fields and TOML box, the Generate tab's widgets and the Generator's defaults (webui/defaults.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from sd_loha.grid import MIN_GRID_CELL, labelled_grid
from sd_loha.models import TINY_MODELS, load_pipeline
from sd_loha.toy.measure import judge
from webui import defaults as d
from webui.generate_tab import Generator
from webui.paths import DEMO_IMAGES, PathPolicy
from webui.train_tab import build_config, default_form, preflight_report, start_toml

from .conftest import border_uniformity


@pytest.fixture
def policy(tmp_path) -> PathPolicy:
    p = PathPolicy(tmp_path / "data", tmp_path / "models", tmp_path / "output")
    shutil.copytree(DEMO_IMAGES, p.data_dir / "demo")
    return p


def test_the_default_model_is_toy_sd1_at_its_size():
    assert d.DEFAULT_MODEL == "toy-sd1" and d.DEFAULT_MODEL in TINY_MODELS
    pipe = load_pipeline(d.DEFAULT_MODEL)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == d.DEFAULT_SIZE


def test_a_fresh_train_tab_trains_toy_sd1_at_64_px(policy):
    form = {**default_form(policy), "train_data_dir": "demo"}
    cfg = build_config(policy, form, start_toml())  # what Start sends from a fresh page with a dataset typed in
    assert cfg.pretrained_model == d.DEFAULT_MODEL and cfg.resolution == (d.DEFAULT_SIZE, d.DEFAULT_SIZE)
    assert cfg.min_bucket_reso == d.DEFAULT_SIZE  # from the box: the default 256 refuses a 64 px resolution
    assert cfg.sample_prompts == list(d.DEFAULT_PROMPTS)
    sampling = (d.DEFAULT_STEPS, d.DEFAULT_GUIDANCE, d.DEFAULT_SAMPLER)
    assert (cfg.sample_steps, cfg.sample_guidance_scale, cfg.sample_sampler) == sampling
    buckets = preflight_report(policy, form, start_toml()).to_dict()["buckets"]
    assert {(b["width"], b["height"]) for b in buckets} == {(d.DEFAULT_SIZE, d.DEFAULT_SIZE)}


def _by_id(demo) -> dict:
    return {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}


def test_the_pages_widgets_start_on_toy_sd1(policy):
    pytest.importorskip("gradio")
    from webui.app import build_app

    c = _by_id(build_app(policy))
    for eid in ("train-pretrained-model", "gen-model"):
        assert c[eid].value == d.DEFAULT_MODEL, eid
        names = [v for _, v in c[eid].choices]
        assert names[0] == d.DEFAULT_MODEL and {"tiny-sd1", "tiny-sd2", "tiny-sdxl"} <= set(names), names
    assert c["train-resolution"].value == str(d.DEFAULT_SIZE) and c["train-toml"].value == start_toml()
    assert c["gen-prompt"].value == d.DEFAULT_PROMPTS[0]
    sampling = (d.DEFAULT_STEPS, d.DEFAULT_GUIDANCE, d.DEFAULT_SAMPLER)
    assert (c["gen-steps"].value, c["gen-guidance"].value, c["gen-scheduler"].value) == sampling
    assert c["gen-width"].value == 0  # the model's size: 64 px on toy-sd1


def test_the_generate_defaults_draw_what_the_prompt_says(policy, one_thread):
    # one_thread: on a CPU shared with other work a second torch thread waits at every op (90 s instead of 2)
    """The Generator with nothing but a seed: a toy-sd1 picture whose background and object match the default
    prompt; the same request on the random tiny-sd1 is static, which the border measurement tells apart."""
    gen = Generator(policy)
    for seed, prompt, (background, color) in ((0, d.DEFAULT_PROMPTS[0], ("white", "red")),
                                              (1, d.DEFAULT_PROMPTS[1], ("yellow", "blue"))):
        (path, _, params), = gen.generate(d.DEFAULT_MODEL, [], prompt, seed=seed)
        img = np.asarray(Image.open(path).convert("RGB"))
        assert img.shape == (d.DEFAULT_SIZE, d.DEFAULT_SIZE, 3)
        assert "Steps: 20, Sampler: Euler, CFG scale: 4," in params
        assert border_uniformity(img) > 0.95
        j = judge(img)
        assert (j.background, j.color) == (background, color), j
    (path, _, _), = gen.generate("tiny-sd1", [], d.DEFAULT_PROMPTS[0], seed=0, steps=4, width=64, height=64)
    assert border_uniformity(Image.open(path).convert("RGB")) < 0.9


def test_small_grid_cells_are_enlarged_whole(policy):
    cells = [[Image.new("RGB", (64, 64), c) for c in ("red", "blue")]]
    cells[0][0].putpixel((0, 0), (0, 255, 0))
    grid = np.asarray(labelled_grid(cells, ["row"], ["strength 0.5 (seed 7)", "strength 1 (seed 7)"]))
    zoom = MIN_GRID_CELL // 64
    left = grid.shape[1] - 2 * 64 * zoom
    top = grid.shape[0] - 64 * zoom
    assert left > 0 and top > 0  # room for the labels
    # nearest-neighbour: the corner pixel became a zoom x zoom block, its neighbour kept the cell's color
    assert (grid[top:top + zoom, left:left + zoom] == (0, 255, 0)).all()
    assert tuple(grid[top + zoom, left]) == (255, 0, 0) and tuple(grid[top, left + 64 * zoom]) == (0, 0, 255)
