"""Every file in train_configs/ runs as shipped: only the base model (the tiny model of the same family), the
data folder, the resolution, the step count, the sample/save intervals and the output folder change; every
other option (mixed precision, gradient checkpointing, caching, optimizer, schedule, samples, saves, states)
stays. The run is stopped after two steps as Ctrl-C would stop it, resumed through the CLI to finish, and
the file loads strictly in sd-loha's loader and in the real LyCORIS."""

from __future__ import annotations

import pytest

from sd_loha import cli
from sd_loha.train.config import ConfigError, load_config
from sd_loha.train.flow import FLOW_DIFFUSERS
from sd_loha.train.lowmem import diffusers_at_least
from sd_loha.train.loop import train

from .helpers import DEMO_IMAGES, REPO, assert_file_loads_everywhere, read_file, stop_at_step

CONFIGS = REPO / "train_configs"
# shipped file -> (tiny model of its family, text-encoder parts its file adapts)
SHIPPED = {
    "demo.toml": ("tiny-sd1", ()),  # styles train the UNet alone: bench/RESULTS.md, "Style against subject"
    "sd15_style.toml": ("tiny-sd1", ()),
    "sd2_style.toml": ("tiny-sd2", ()),
    "sdxl_style.toml": ("tiny-sdxl", ()),  # ships with frozen text encoders and cached text-encoder outputs
    "sd35_style.toml": ("tiny-sd3", ()),  # frozen CLIPs and T5, outputs cached; kohya's fused file form
}


def test_every_shipped_config_is_in_the_matrix():
    assert {p.name for p in CONFIGS.glob("*.toml")} == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_trains_stops_resumes_and_loads(tmp_path, monkeypatch, name):
    model, te_parts = SHIPPED[name]
    path = CONFIGS / name
    shipped = load_config(path)
    out = tmp_path / "out"
    overrides = [f"pretrained_model={model}", f"train_data_dir={DEMO_IMAGES}", "resolution=64", "min_bucket_reso=64",
                 "max_bucket_reso=128", "bucket_reso_steps=64", "max_train_steps=4", "sample_every_n_steps=2",
                 "save_every_n_steps=2", "sample_steps=2", "sample_width=64", "sample_height=64", f"output_dir={out}"]

    if model == "tiny-sd3" and not diffusers_at_least(FLOW_DIFFUSERS):
        # the floor run (diffusers 0.31): SD 3.x training is refused by name before any model loads
        with pytest.raises(ConfigError, match=r'needs diffusers 0\.33 or newer.*pip install -U "diffusers>=0\.33"'):
            train(path, overrides=overrides, progress=False)
        assert not out.exists()
        return
    stop, _, on_event = stop_at_step(2)
    first = train(path, overrides=overrides, on_event=on_event, stop_event=stop, progress=False)
    assert first.stopped and first.steps == 2
    assert (out / "samples" / "step000002.png").is_file()
    assert (out / "state-00000002" / "progress.json").is_file()

    args = ["train", "--config", str(path), "--resume"]
    for o in overrides:
        args += ["--set", o]
    assert cli.main(args) == 0
    final = out / f"{shipped.output_name}.safetensors"
    tensors, meta = read_file(final)
    assert meta["ss_steps"] == "4"
    assert meta["ss_mixed_precision"] == shipped.mixed_precision and meta["ss_optimizer"] == shipped.optimizer_type
    assert (out / "samples" / "final.png").is_file() and (out / "loss.png").is_file()
    assert len((out / "loss.csv").read_text().splitlines()) == 1 + 4  # the whole run's curve, resumed part included
    assert_file_loads_everywhere(final, model, monkeypatch, te_parts)
