"""The Train tab's settings without a server: the TOML box goes through the library's parser (the same errors
as a --config file), the fields are a layer over it, every path option is checked against the folders, and the
fields themselves follow sd_loha.train.config.OPTIONS."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_loha.train.config import OPTIONS, ConfigError, load_config, loads_config
from webui.defaults import DEFAULT_MODEL
from webui.train_tab import (
    FIELDS,
    LENGTH_FIELDS,
    PATH_CHECKS,
    box_edits,
    build_config,
    config_to_form,
    default_form,
    demo_config,
    field_kind,
    preflight_report,
    start_toml,
    toml_box_config,
)


@pytest.fixture
def form(policy) -> dict:
    f = default_form(policy)
    f["train_data_dir"] = "demo"
    # The fresh page's 64 px needs its TOML box (min_bucket_reso = 64); these tests give their own boxes, so the
    # fields take a size the default bucket range holds.
    f["resolution"] = "512"
    return f


# Each text is wrong in one way; the old hand-made parser of the web UI let the first one through (the second
# noise_offset silently won). Options without a field, so the fields' layer does not override them.
BAD_BOXES = {
    "set twice": "noise_offset = 0.1\n[training]\nnoise_offset = 0.2\n",
    "unknown key": "[training]\nnoise_ofset = 0.1\n",
    "wrong type": '[training]\nnoise_offset = "much"\n',
    "not TOML": "noise_offset = \n",
    "table as option": "training = 3\n",
}


@pytest.mark.parametrize("case", BAD_BOXES)
def test_a_bad_toml_box_fails_as_the_cli_fails(policy, form, case):
    text = BAD_BOXES[case]
    needed = {"pretrained_model": "tiny-sd1", "train_data_dir": "demo", "output_dir": "out"}
    with pytest.raises(ConfigError) as cli:
        loads_config(text, base=needed, source="TOML box")  # what sd-loha train --config reads the text as
    # the page's box replaced by the text: every line of it is typed there
    for build in (lambda: build_config(policy, form, text, start_toml()), lambda: toml_box_config(policy, text),
                  lambda: preflight_report(policy, form, text, start_toml())):
        with pytest.raises(ConfigError) as ui:
            build()
        assert str(ui.value) == str(cli.value)
    assert "TOML box" in str(cli.value)


def test_the_widgets_are_a_layer_over_the_box_and_the_box_edits_over_them(policy, form):
    box = "[network]\nnetwork_dim = 16\nuse_tucker = true\n[training]\nnoise_offset = 0.05\nmax_train_epochs = 9\n"
    # as --set over --config: without the page's sync the widgets win (every option has one)
    cfg = build_config(policy, {**form, "network_dim": 4, "length": 7}, box)
    assert (cfg.network_dim, cfg.use_tucker, cfg.noise_offset) == (4, False, 0.0)
    assert cfg.max_train_steps == 7 and cfg.max_train_epochs is None
    # the page: lines typed into its box since it wrote it win over their widgets, the rest follow the widgets
    cfg = build_config(policy, {**form, "network_dim": 4, "length": 7}, start_toml() + box, start_toml())
    assert (cfg.network_dim, cfg.use_tucker, cfg.noise_offset) == (16, True, 0.05)
    assert cfg.max_train_epochs == 9 and cfg.max_train_steps is None  # the box's run length replaces the field's
    assert cfg.min_bucket_reso == 64  # an untouched line: the widget's value, which is the same
    # after Start/Save the page shows one config in both; then a widget change wins, a box change wins, and a
    # deleted line leaves its widget's value
    synced = cfg.to_toml()
    widgets = config_to_form(cfg)
    assert build_config(policy, widgets, synced, synced).to_dict() == cfg.to_dict()
    after = build_config(policy, {**widgets, "noise_offset": 0.1, "flip_aug": True},
                         synced.replace("network_dim = 16", "network_dim = 12").replace("use_tucker = true\n", ""),
                         synced)
    assert (after.noise_offset, after.flip_aug, after.network_dim, after.use_tucker) == (0.1, True, 12, True)
    # problems of a typed line are named by the box's table, as the command line names them
    with pytest.raises(ConfigError, match=r"TOML box \[training\]: noise_offset must be a number"):
        build_config(policy, widgets, synced.replace("noise_offset = 0.05", "noise_offset = 'much'"), synced)
    with pytest.raises(ConfigError, match=r"fields: network_dim must be >= 1"):
        build_config(policy, {**form, "network_dim": 0}, box)
    assert box_edits(synced, synced) == {} and box_edits("not toml = ", synced) == {}


def test_saved_settings_are_the_library_toml_and_load_back(policy, form, tmp_path):
    cfg = build_config(policy, {**form, "sample_prompts": "a\nb", "resolution": "512,768"},
                       "[training]\nnoise_offset = 0.05\n[sampling]\nsample_sampler = 'ddim'\n")
    saved = tmp_path / "s.toml"
    saved.write_text(cfg.to_toml(), encoding="utf-8")
    assert load_config(saved).to_dict() == cfg.to_dict()
    assert cfg.train_data_dir == str(policy.data_dir / "demo")  # written resolved
    back = build_config(policy, config_to_form(load_config(saved)), saved.read_text(encoding="utf-8"))
    assert back.to_dict() == cfg.to_dict()


def test_every_path_option_is_checked_against_the_folders(policy, form):
    assert set(PATH_CHECKS) == {n for n, s in OPTIONS.items() if s.kind == "path"}
    with pytest.raises(ConfigError, match=r"paths refused:\n  - VAE '/etc/vae.safetensors' is refused"):
        build_config(policy, form, "[model]\nvae = '/etc/vae.safetensors'\n", "")  # a path from the box, too
    with pytest.raises(ConfigError, match="logging_dir '/tmp' is refused"):
        build_config(policy, form, "[logging]\nlogging_dir = '/tmp'\n", "")


def test_fields_follow_the_option_table(policy, form):
    assert set(FIELDS) - set(LENGTH_FIELDS) <= set(OPTIONS)
    kinds = {n: field_kind(n) for n in FIELDS}
    assert kinds["network_dim"] == "int" and kinds["save_every_n_steps"] == "optint"
    assert kinds["unet_lr"] == "optfloat" and kinds["preset"] == "choice" and kinds["sample_prompts"] == "lines"
    # every field survives config -> fields -> config, with values other than the defaults
    cfg = build_config(policy, form, "")
    changed = {"output_name": "x", "overwrite": True, "preset": "full", "network_dim": 3, "network_alpha": 1.5,
               "conv_dim": 2, "conv_alpha": 0.5, "train_text_encoder": False, "learning_rate": 3e-4, "unet_lr": 2e-4,
               "text_encoder_lr": 1e-5, "resolution": (512, 768), "train_batch_size": 2, "lr_scheduler": "cosine",
               "seed": 7, "save_every_n_steps": 5, "sample_prompts": ["a", "b"], "sample_every_n_steps": 10,
               "sample_steps": 3, "pretrained_model": "tiny-sd2", "train_data_dir": str(policy.data_dir / "other"),
               "output_dir": str(policy.outputs_dir / "other")}
    (policy.data_dir / "other").mkdir()
    assert set(changed) == set(FIELDS) - set(LENGTH_FIELDS)
    for k, v in changed.items():
        assert getattr(cfg, k) != v, k
        setattr(cfg, k, v)
    cfg.max_train_steps, cfg.max_train_epochs = None, 4
    back = build_config(policy, config_to_form(cfg), "")
    assert {k: getattr(back, k) for k in changed} == changed and back.max_train_epochs == 4


def test_the_dataset_check_reads_the_box(policy, form):
    box = "[dataset]\nvalidation_split = 0.25\nmin_bucket_reso = 64\n"
    rep = preflight_report(policy, {**form, "resolution": "64", "pretrained_model": "", "output_dir": ""}, box, "")
    d = rep.to_dict()
    assert d["images_found"] == 16 and d["validation_images"] == 4
    assert {(b["width"], b["height"]) for b in d["buckets"]} == {(64, 64)}


def test_demo_settings(policy):
    cfg = demo_config(policy)
    demo = load_config(Path(__file__).resolve().parents[2] / "train_configs" / "demo.toml")
    assert cfg.train_data_dir == str(policy.data_dir / "demo") and cfg.output_dir == str(policy.outputs_dir / "demo")
    assert {k: v for k, v in cfg.to_dict().items() if k not in ("train_data_dir", "output_dir")} == \
        {k: v for k, v in demo.to_dict().items() if k not in ("train_data_dir", "output_dir")}
    # the demo trains the pretrained base on captions in its own words, so its samples are pictures of them
    assert cfg.pretrained_model == DEFAULT_MODEL
    images = sorted(Path(cfg.train_data_dir).glob("*.png"))
    assert len(images) == 16 and all(p.with_suffix(cfg.caption_extension).is_file() for p in images)


def test_base_config_is_held_to_the_models_folder(policy, form):
    """base_config (what completes a single-file base) reads a model: only from the models folders or a hub id."""
    with pytest.raises(ConfigError, match="base_config '/etc' is refused"):
        build_config(policy, form, "[model]\nbase_config = '/etc'\n", "")
