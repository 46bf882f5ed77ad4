"""Sample prompts with kohya's per-prompt options (lines, .txt/.toml/.json prompts files), sample_at_first, and the
trackers: TensorBoard's event files and wandb's offline run hold the run's losses, learning rates and sample grids.

Expected values are recomputed here from kohya's rules (sd-scripts' `line_to_prompt_dict`: sizes rounded down to a
multiple of 8 and at least 64, steps clamped to 1..1000; prompt i's seed sample_seed + i unless --d) and from
diffusers' linear schedule with warm-up, not read back from the code under test.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_loha.train.config import ConfigError, config_from_kwargs
from sd_loha.train.events import Progress, Sample
from sd_loha.train.loop import Trainer, train
from sd_loha.train.prompts import PromptEntry, parse_prompt_line, read_prompts_file
from sd_loha.train.report import LABEL_H
from sd_loha.train.sampling import row_labels, sample_specs, sampling_key

from .helpers import base_config, grid_cell

SAMPLING = dict(train_text_encoder=False, sample_steps=2, sample_sampler="euler", sample_guidance_scale=7.0,
                sample_width=64, sample_height=64, sample_seed=100, cache_latents=False)


def _config(tmp_path: Path, **kw):
    return config_from_kwargs(**base_config(tmp_path / "out", **{**SAMPLING, **kw}))


# ---------------------------------------------------------------------------------------------
# Parsing: kohya's line syntax and prompts files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ("a cat", PromptEntry("a cat")),
    ("a cat, my_style --n blurry, lowres --w 512 --h 768 --d 42 --l 6.5 --s 28",
     PromptEntry("a cat, my_style", negative_prompt="blurry, lowres", width=512, height=768, seed=42,
                 guidance_scale=6.5, steps=28)),
    # kohya: width/height max(64, x - x % 8); steps max(1, min(1000, s)); flags in any case
    ("a cat --W 500 --H 30 --S 5000", PromptEntry("a cat", width=496, height=64, steps=1000)),
    ("a cat --s 0 --ss k_euler_a", PromptEntry("a cat", steps=1, sampler="euler_a")),
    ("  a cat   --d 0  ", PromptEntry("a cat", seed=0)),
    ("a--b -- c", PromptEntry("a--b -- c")),  # only " --" followed by a letter starts an option
])
def test_prompt_line_options_follow_kohya(line, expected):
    assert parse_prompt_line(line, "x") == expected


@pytest.mark.parametrize("line, message", [
    ("a cat --x 3", "unknown option --x"),
    ("a cat --d seven", "--d must be a whole number"),
    ("a cat --l -1", "--l must be a number >= 0"),
    ("a cat --ss nope", "--ss must be one of euler_a"),
    ("a cat --g 3.5", "--g is FLUX/SD3's embedded guidance"),
])
def test_bad_prompt_options_are_refused(line, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_prompt_line(line, "x")


def test_txt_toml_and_json_prompts_files_read_the_same(tmp_path):
    (tmp_path / "p.txt").write_text("# my prompts\n\na red circle --n blurry --w 96\n  \na blue square --d 3 --l 4\n",
                                    encoding="utf-8")
    (tmp_path / "p.toml").write_text(
        '[prompt]\nwidth = 96\n\n[[prompt.subset]]\nprompt = "a red circle"\nnegative_prompt = "blurry"\n\n'
        '[[prompt.subset]]\nprompt = "a blue square"\nseed = 3\nscale = 4\nwidth = 64\n', encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps(["a red circle --n blurry --w 96",
                                                 {"prompt": "a blue square", "seed": 3, "scale": 4.0}]),
                                     encoding="utf-8")
    expected = [PromptEntry("a red circle", negative_prompt="blurry", width=96),
                PromptEntry("a blue square", seed=3, guidance_scale=4.0)]
    assert read_prompts_file(str(tmp_path / "p.txt")) == expected
    assert read_prompts_file(str(tmp_path / "p.json")) == expected
    # TOML: [prompt] holds defaults for every subset; a subset's own key wins
    toml = read_prompts_file(str(tmp_path / "p.toml"))
    assert toml == [expected[0], PromptEntry("a blue square", seed=3, guidance_scale=4.0, width=64)]


def test_prompts_file_problems_name_the_file_and_line_before_any_model_loads(tmp_path, monkeypatch):
    import sd_loha.train.loop as loop

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loop, "load_pipeline", no_model)
    bad = tmp_path / "bad.txt"
    bad.write_text("a red circle\n# fine\na blue square --w 64 --q 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.txt line 3: unknown option --q.*--n --w --h --d --l --s --ss"):
        train(base_config(tmp_path / "out", sample_prompts=str(bad), sample_every_n_steps=1), progress=False)
    with pytest.raises(ConfigError, match=r"missing\.toml: prompts file not found"):
        _config(tmp_path, sample_prompts="missing.toml")
    (tmp_path / "b.json").write_text('[{"prompt": "a", "steps": 3}]', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"b\.json entry 1: unknown key 'steps'.*sample_steps"):
        _config(tmp_path, sample_prompts=str(tmp_path / "b.json"))
    with pytest.raises(ConfigError, match=r"sample_prompts entry 2: --d must be a whole number"):
        _config(tmp_path, sample_prompts=["a", "b --d x"])
    with pytest.raises(ConfigError, match=r"prompt 1 \('a'\): sampler 'pndm' needs at least 4 steps"):
        _config(tmp_path, sample_prompts=["a --ss pndm --s 2"])


def test_list_entries_mix_prompts_and_files_with_defaults_from_sample_options(tmp_path):
    (tmp_path / "more.txt").write_text("a green triangle --s 5\n", encoding="utf-8")
    cfg = _config(tmp_path, sample_prompts=["a red circle --d 7 --w 96", str(tmp_path / "more.txt"), "a blue square"],
                  sample_negative_prompt="ugly")
    specs = sample_specs(cfg)
    # (prompt, negative, width, height, seed, steps, guidance, sampler): own settings win, the rest from sample_*,
    # prompt i's seed sample_seed + i
    assert [(s.prompt, s.negative_prompt, s.width, s.height, s.seed, s.steps, s.guidance_scale, s.sampler)
            for s in specs] == [
        ("a red circle", "ugly", 96, 64, 7, 2, 7.0, "euler"),
        ("a green triangle", "ugly", 64, 64, 101, 5, 7.0, "euler"),
        ("a blue square", "ugly", 64, 64, 102, 2, 7.0, "euler"),
    ]
    # grid rows: the prompt, then what the prompt set itself
    assert row_labels(cfg) == ["a red circle [96x64, seed 7]", "a green triangle [5 steps]", "a blue square"]


def test_sampling_key_holds_every_per_prompt_setting(tmp_path):
    key = sampling_key(_config(tmp_path, sample_prompts=["a red circle"]))
    for option in ("--n x", "--w 96", "--h 96", "--d 1", "--l 3", "--s 3", "--ss ddim"):
        assert sampling_key(_config(tmp_path, sample_prompts=[f"a red circle {option}"])) != key, option
    assert sampling_key(_config(tmp_path, sample_prompts=["a red circle --d 100"])) == key  # = sample_seed + 0


# ---------------------------------------------------------------------------------------------
# The per-prompt settings reach the sample pipeline
# ---------------------------------------------------------------------------------------------

def _trainer(tmp_path: Path, **kw) -> Trainer:
    t = Trainer(_config(tmp_path, **kw), tmp_path / "out", progress=False)
    t.setup()
    return t


def _unet_shapes(t: Trainer) -> list:
    calls = []
    t.unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((tuple(args[0].shape), type(t.pipe.scheduler).__name__)),
        with_kwargs=True)
    return calls


def _randomize(params) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_each_prompt_samples_with_its_own_size_steps_guidance_and_sampler(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 96 --s 3 --l 1 --ss ddim\na blue square\n", encoding="utf-8")
    t = _trainer(tmp_path, sample_prompts=str(prompts))
    calls = _unet_shapes(t)
    grid = np.asarray(Image.open(t.make_samples("check")))
    # per column (base, adapter): prompt 1: 3 DDIM steps of one 12x8 latent (guidance 1: no unconditional half),
    # prompt 2: the defaults, 2 Euler steps of a CFG batch of two 8x8 latents
    column = [((1, 4, 8, 12), "DDIMScheduler")] * 3 + [((2, 4, 8, 8), "EulerDiscreteScheduler")] * 2
    assert calls == column * 2
    # cells are the largest picture (96x64, enlarged x2 to 192x128); the 64 px picture sits centred on white
    assert grid.shape[:2] == (LABEL_H + 2 * (LABEL_H + 128), 2 * 192)
    y = LABEL_H + (LABEL_H + 128) + LABEL_H
    assert (grid[y:y + 128, :32] == 255).all() and (grid[y:y + 128, 160:192] == 255).all()
    assert not (grid[y:y + 128, 32:160] == 255).all()


def test_per_prompt_seed_and_negative_prompt_are_those_of_the_options(tmp_path):
    """"--d 7" draws what sample_seed = 7 draws for the first prompt; "--n" what sample_negative_prompt does."""
    t = _trainer(tmp_path, sample_prompts=["a red circle --d 7 --n blurry"])
    _randomize(t.params)
    own = np.asarray(Image.open(t.make_samples("own")))
    t.cfg = _config(tmp_path, sample_prompts=["a red circle"], sample_seed=7, sample_negative_prompt="blurry")
    assert np.array_equal(grid_cell(own, 0, 1), grid_cell(np.asarray(Image.open(t.make_samples("opt"))), 0, 1))
    t.cfg = _config(tmp_path, sample_prompts=["a red circle"], sample_seed=8, sample_negative_prompt="blurry")
    assert not np.array_equal(grid_cell(own, 0, 1), grid_cell(np.asarray(Image.open(t.make_samples("s8"))), 0, 1))


# ---------------------------------------------------------------------------------------------
# A run with sample_at_first, a prompts file and both trackers
# ---------------------------------------------------------------------------------------------

def _wandb_records(run_file: Path) -> list:
    """The protobuf Records of an offline wandb run: its .wandb file is a LevelDB-style log (7-byte header,
    32 KiB blocks, chunks of crc32 / length / type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, records = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pb.Record())
            records[-1].ParseFromString(pending)
    return records


def _history(records: list) -> list[dict]:
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def _tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in folder.rglob("events.out.tfevents.*") if p.parent == folder]
    assert len(events) == 1, events
    acc = EventAccumulator(str(events[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_run_with_sample_at_first_logs_losses_lrs_and_grids_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --d 3\n# a comment\na blue square --s 1\n", encoding="utf-8")
    lr, te_lr, warmup, steps = 1e-3, 5e-4, 2, 4
    seen = []
    result = train(base_config(tmp_path / "out", **{
        **SAMPLING, "sample_prompts": str(prompts), "sample_at_first": True, "sample_every_n_steps": 2,
        "log_with": "all", "log_tracker_name": "style", "wandb_run_name": "try-1",
        "logging_dir": str(tmp_path / "logs"), "max_train_steps": steps, "learning_rate": lr,
        "train_text_encoder": True, "text_encoder_lr": te_lr, "lr_scheduler": "linear", "lr_warmup_steps": warmup}),
        progress=False, on_event=seen.append)
    names = [p.name for p in result.samples]
    assert names == ["at_first.png", "step000002.png", "final.png", "progress.png"]
    assert sorted(p.name for p in (tmp_path / "out" / "samples").iterdir())[0] == "at_first.png"
    # the first grid comes before the first step, and (the LoHA starts at delta W = 0) draws what the base draws
    first_sample = next(i for i, e in enumerate(seen) if isinstance(e, Sample))
    assert seen[first_sample].step == 0 and not any(isinstance(e, Progress) for e in seen[:first_sample])
    at_first = np.asarray(Image.open(result.samples[0]))
    assert np.array_equal(grid_cell(at_first, 0, 0), grid_cell(at_first, 0, 1))
    assert np.array_equal(grid_cell(at_first, 1, 0), grid_cell(at_first, 1, 1))

    # diffusers' linear schedule with warm-up, after k scheduler steps: k/warmup, then (total-k)/(total-warmup)
    factor = {k: k / warmup if k < warmup else max(0.0, (steps - k) / (steps - warmup)) for k in range(1, steps + 1)}
    expected = {"loss": result.losses, "lr": [lr * factor[k] for k in factor],
                "lr/unet": [lr * factor[k] for k in factor], "lr/text_encoder": [te_lr * factor[k] for k in factor]}
    grid_steps = [0, 2, steps]

    tb = _tensorboard(tmp_path / "logs" / "style")
    for tag, values in expected.items():
        logged = tb.Scalars(tag)
        assert [e.step for e in logged] == list(range(1, steps + 1)), tag
        np.testing.assert_allclose([e.value for e in logged], values, rtol=1e-6, err_msg=tag)
    assert [e.step for e in tb.Images("samples")] == grid_steps
    assert [e.step for e in tb.Images("progress")] == [steps]
    first = tb.Images("samples")[0]
    assert (first.width, first.height) == Image.open(result.samples[0]).size

    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = _wandb_records(next(runs[0].glob("run-*.wandb")))
    assert {r.run.display_name for r in records if r.WhichOneof("record_type") == "run"} == {"try-1"}
    assert {r.run.project for r in records if r.WhichOneof("record_type") == "run"} == {"style"}
    rows = _history(records)
    for key, values in expected.items():
        np.testing.assert_allclose([r[key] for r in rows if key in r], values, rtol=1e-6, err_msg=key)
    assert [r["_step"] for r in rows if "samples/_type" in r] == grid_steps
    assert [r["_step"] for r in rows if "progress/_type" in r] == [steps]
    images = sorted((runs[0] / "files" / "media" / "images").glob("samples_*.png"))
    assert len(images) == len(grid_steps)
    assert Image.open(images[0]).size == Image.open(result.samples[0]).size


def test_sample_at_first_is_not_repeated_on_resume(tmp_path):
    from .helpers import stop_at_step

    stop, _, on_event = stop_at_step(1)
    kw = dict(SAMPLING, sample_prompts=["a red circle"], sample_at_first=True, max_train_steps=2, save_state=True)
    first = train(base_config(tmp_path / "out", **kw), progress=False, stop_event=stop, on_event=on_event)
    assert first.stopped and [p.name for p in first.samples] == ["at_first.png"]
    resumed = train(base_config(tmp_path / "out", **kw), resume=True, progress=False)
    assert [p.name for p in resumed.samples] == ["final.png"]


def test_wandb_asked_for_but_not_installed_is_refused(tmp_path, monkeypatch):
    import sd_loha.train.config.rules as config

    monkeypatch.setattr(config, "wandb_installed", lambda: False)
    for value in ("wandb", "all"):
        with pytest.raises(ConfigError, match=f'log_with = "{value}" but wandb is not installed.*pip install wandb'):
            _config(tmp_path, log_with=value)
