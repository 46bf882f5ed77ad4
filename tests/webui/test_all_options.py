"""The Train tab's "All options" sections, generated from sd_loha.train.config.OPTIONS: every option has a widget
chosen by its kind, an option added to the table gets one with no UI change, every kind survives
config -> widgets -> config, and the files the config check reads (a preset file, prompts files) are checked
against the UI's folders before it reads them."""

from __future__ import annotations

import dataclasses

import pytest

from sd_loha.train.config import GROUPS, OPTIONS, ConfigError, OptionSpec, TrainConfig
from webui.train_tab import (
    FIELDS,
    LENGTH_FIELDS,
    LENGTH_OPTIONS,
    NOT_SET,
    READ_FILE_CHECKS,
    build_config,
    config_to_form,
    default_form,
    field_kind,
    form_names,
    from_widget,
    option_info,
    section_options,
    start_toml,
    to_widget,
    toml_box_config,
)

WIDGET_KINDS = {"bool", "optbool", "int", "optint", "float", "optfloat", "text", "choice", "lines", "toml",
                "resolution", "model", "unit"}


@pytest.fixture
def form(policy) -> dict:
    return {**default_form(policy), "train_data_dir": "demo"}


def test_every_option_has_one_widget(policy):
    sections = [n for names in section_options().values() for n in names]
    assert len(sections) == len(set(sections)) and not set(sections) & set(FIELDS)
    covered = set(form_names()) - set(LENGTH_FIELDS) | set(LENGTH_OPTIONS)
    assert covered == set(OPTIONS)
    assert list(section_options()) == [g for g in GROUPS if g in section_options()]  # the tables' order
    for name in form_names():
        assert field_kind(name) in WIDGET_KINDS, name
    # the kinds follow the spec: a checkbox, a dropdown, a number, an empty number = not set, TOML text
    kinds = {n: field_kind(n) for n in OPTIONS}
    assert kinds["masked_loss"] == "bool" and kinds["v_parameterization"] == "optbool"
    assert kinds["loss_type"] == kinds["log_with"] == "choice" and kinds["min_snr_gamma"] == "optfloat"
    assert kinds["multires_noise_iterations"] == "optint" and kinds["lr_warmup_steps"] == "float"
    assert {kinds[n] for n in ("network_reg_dims", "network_reg_lrs", "optimizer_args", "sample_strengths")} == {"toml"}
    assert kinds["reg_data_dir"] == kinds["wandb_run_name"] == "text" and kinds["network_exclude"] == "lines"
    assert default_form(policy).keys() == set(form_names())


def test_the_info_line_is_the_help_with_range_and_default():
    info = option_info("min_snr_gamma")
    assert info.startswith(OPTIONS["min_snr_gamma"].help) and "Range: > 0." in info and "Default: off." in info
    assert option_info("prior_loss_weight").endswith("Range: >= 0. Default: 1.0.")
    assert "Default: {}." in option_info("network_reg_dims") and "e.g. { 'up_blocks_.*attentions' = 16 }" in \
        option_info("network_reg_dims")
    assert "Default: not set." in option_info("reg_data_dir") and "Default: true." in option_info("cache_latents")
    assert "Default: 512." in option_info("resolution") and 'Default: "".' in option_info("trigger_word")


# A value other than the default for options of every widget kind, legal together.
CHANGED = {
    "flip_aug": True, "masked_loss": True, "alpha_mask": True, "sample_at_first": True,  # bool
    "v_parameterization": False,  # optbool
    "clip_skip": 2, "keep_tokens": 1,  # int
    "min_timestep": 0, "max_timestep": 900, "multires_noise_iterations": 6, "validation_every_n_steps": 3,  # optint
    "noise_offset": 0.05, "prior_loss_weight": 0.5,  # float
    "min_snr_gamma": 5.0, "adaptive_noise_scale": 0.0, "ema_decay": 0.99, "ip_noise_gamma": 0.1,  # optfloat
    "lr_warmup_steps": 0.05,  # warmup
    "caption_extension": ".caption", "trigger_word": "sks style", "optimizer_type": "RAdam",  # text
    "wandb_run_name": "my run", "log_tracker_name": "styles",
    "loss_type": "huber", "log_with": "none", "mixed_precision": "bf16",  # choice
    "network_exclude": ["*time_emb_proj", "*.attn2.*"],  # lines
    "network_reg_dims": {"up_blocks_1_.*attn": 16, "lora_te_": 4}, "network_reg_lrs": {"lora_te_": 5e-5},  # toml
    "optimizer_args": {"weight_decay": 0.01, "betas": [0.9, 0.99]}, "sample_strengths": [0.0, 0.5, 1.0],
    "validation_split": 0.25,
}


def test_every_kind_survives_config_to_widgets_to_config(policy, form):
    base = build_config(policy, form, start_toml(), start_toml())
    covered = {field_kind(n) for n in CHANGED}
    assert covered >= WIDGET_KINDS - {"model", "unit", "resolution"}, covered  # the fields' kinds: test_train_tab
    for name, value in CHANGED.items():
        assert getattr(base, name) != value, name
        setattr(base, name, value)
    widgets = config_to_form(base)
    assert widgets["min_snr_gamma"] == 5.0 and widgets["v_parameterization"] == "false"
    assert widgets["network_exclude"] == "*time_emb_proj\n*.attn2.*"
    assert widgets["network_reg_dims"] == "{ up_blocks_1_.*attn = 16, lora_te_ = 4 }".replace(
        "up_blocks_1_.*attn", '"up_blocks_1_.*attn"')
    back = build_config(policy, widgets, "", "")
    assert {n: getattr(back, n) for n in CHANGED} == CHANGED
    assert back.to_dict() == base.to_dict()


def test_what_a_widget_reads_as():
    assert from_widget("min_snr_gamma", None) is None and from_widget("min_snr_gamma", 5) == 5
    assert from_widget("min_timestep", 0) == 0  # 0 is a legal min_timestep: it stays
    assert from_widget("save_every_n_steps", 0) is None  # 0 is no legal interval: "0 = only at the end"
    assert from_widget("multires_noise_iterations", 6.0) == 6 and from_widget("clip_skip", 2.5) == 2.5
    assert from_widget("v_parameterization", NOT_SET) is None and from_widget("v_parameterization", "true") is True
    assert from_widget("network_reg_dims", "") is None  # empty: the default
    # a "toml" widget reads as --set NAME=TEXT: a TOML value, or kohya's strings, which the option's parser reads
    assert from_widget("network_reg_dims", "{ 'a.*b' = 8 }") == {"a.*b": 8}
    assert from_widget("network_reg_dims", "up_blocks_1=16,lora_te_=4") == "up_blocks_1=16,lora_te_=4"
    assert from_widget("sample_strengths", "[0, 0.5, 1]") == [0, 0.5, 1]
    assert from_widget("network_exclude", " a \n\n b\n") == ["a", "b"]
    assert to_widget("sample_strengths", [0.0, 1.0]) == "[0.0, 1.0]" and to_widget("min_snr_gamma", None) is None


def test_kohya_strings_and_errors_in_section_widgets(policy, form):
    cfg = build_config(policy, {**form, "network_reg_dims": "up_blocks_1=16,lora_te_=4", "sample_strengths": "0, 1"})
    assert cfg.network_reg_dims == {"up_blocks_1": 16, "lora_te_": 4} and cfg.sample_strengths == [0.0, 1.0]
    with pytest.raises(ConfigError, match=r"fields: min_snr_gamma must be > 0, got -1"):
        build_config(policy, {**form, "min_snr_gamma": -1})
    with pytest.raises(ConfigError, match=r"fields: network_reg_dims: the value of 'a' must be an integer"):
        build_config(policy, {**form, "network_reg_dims": "{ a = 1.5 }"})
    # the cross-option checks see the sections' values like any other: masked_loss needs a mask source
    with pytest.raises(ConfigError, match="fields: masked_loss = true needs masks"):
        build_config(policy, {**form, "masked_loss": True})


def test_an_option_added_to_the_table_gets_a_widget(policy, form, monkeypatch):
    """A new option (even of a kind this UI has never seen) is in its table's section with its help, and the
    settings still build while it is empty (not set)."""
    fake = {"fake_gain": OptionSpec(group="training", kind="float", help="A gain nobody has.", optional=True,
                                    min=0.0, name="fake_gain"),
            "fake_curve": OptionSpec(group="logging", kind="curve", help="A kind nobody has.", optional=True,
                                     name="fake_curve")}
    for name, spec in fake.items():
        monkeypatch.setitem(OPTIONS, name, spec)
        monkeypatch.setattr(TrainConfig, name, None, raising=False)
    assert section_options()["training"][-1] == "fake_gain" and section_options()["logging"][-1] == "fake_curve"
    assert field_kind("fake_gain") == "optfloat" and field_kind("fake_curve") == "toml"
    assert option_info("fake_gain") == "A gain nobody has. Range: >= 0. Default: not set."
    f = default_form(policy)
    assert f["fake_gain"] is None and f["fake_curve"] == ""
    assert from_widget("fake_gain", 2) == 2 and from_widget("fake_curve", "[1, 2]") == [1, 2]
    build_config(policy, {**f, "train_data_dir": "demo"}, start_toml(), start_toml())
    gr = pytest.importorskip("gradio")
    from webui.app import build_app

    comps = {b.elem_id: b for b in build_app(policy).blocks.values() if getattr(b, "elem_id", None)}
    assert isinstance(comps["train-fake-gain"], gr.Number) and comps["train-fake-gain"].info == option_info("fake_gain")
    assert isinstance(comps["train-fake-curve"], gr.Textbox)


def test_the_page_has_a_collapsed_section_per_table_and_a_widget_per_option(policy):
    gr = pytest.importorskip("gradio")
    from webui.app import build_app

    comps = {b.elem_id: b for b in build_app(policy).blocks.values() if getattr(b, "elem_id", None)}
    for group, names in section_options().items():
        acc = comps[f"train-group-{group}"]
        assert isinstance(acc, gr.Accordion) and acc.open is False and f"[{group}]" in acc.label
        for name in names:
            c = comps["train-" + name.replace("_", "-")]
            assert c.label == name and c.info == option_info(name)
    kinds = {"train-masked-loss": gr.Checkbox, "train-loss-type": gr.Dropdown, "train-min-snr-gamma": gr.Number,
             "train-network-reg-dims": gr.Textbox, "train-v-parameterization": gr.Dropdown}
    assert all(isinstance(comps[eid], cls) for eid, cls in kinds.items())
    assert comps["train-min-snr-gamma"].value is None and comps["train-min-bucket-reso"].value == 64  # START's
    assert comps["train-preset"].allow_custom_value is True  # a preset file is typed in
    assert comps["train-loss-type"].allow_custom_value is False
    assert ".txt" in comps["train-sample-prompts"].label and "--n" in comps["train-sample-prompts"].label


def _preset_file(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "blocks.toml").write_text('unet_target_module = ["Transformer2DModel"]\n', encoding="utf-8")
    return folder / "blocks.toml"


def test_a_preset_file_is_checked_against_the_folders_before_it_is_read(policy, form, tmp_path, monkeypatch):
    assert set(READ_FILE_CHECKS) >= {n for n, s in OPTIONS.items() if s.file_suffix}
    inside = _preset_file(policy.data_dir / "presets")
    cfg = build_config(policy, {**form, "preset": "presets/blocks.toml"})  # found in the data folder, as paths are
    assert cfg.preset == str(inside)
    assert build_config(policy, form, "[network]\npreset = 'presets/blocks.toml'\n", start_toml()).preset == str(inside)
    outside = _preset_file(tmp_path / "elsewhere")
    outside.write_text("not = [valid", encoding="utf-8")  # read, it would fail as invalid TOML
    read = []
    monkeypatch.setattr("sd_loha.train.config.rules.read_preset", lambda p: read.append(p))
    for layers in (({**form, "preset": str(outside)}, ""), (form, f"[network]\npreset = '{outside}'\n")):
        with pytest.raises(ConfigError, match=r"paths refused:\n  - preset file '.*' is refused"):
            build_config(policy, layers[0], layers[1], start_toml())
    with pytest.raises(ConfigError, match="preset file '.*' is refused"):
        toml_box_config(policy, f"[network]\npreset = '{outside}'\n")
    assert read == []


def test_prompts_files_are_checked_against_the_folders(policy, form, tmp_path):
    (policy.data_dir / "prompts.txt").write_text("# two\na red circle --d 3\na blue square --w 128\n", encoding="utf-8")
    cfg = build_config(policy, {**form, "sample_prompts": "a cat --n blurry\nprompts.txt"})
    assert cfg.sample_prompts == ["a cat --n blurry", str(policy.data_dir / "prompts.txt")]
    (tmp_path / "x.txt").write_text("a dog\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"sample prompts file '.*x.txt' is refused"):
        build_config(policy, {**form, "sample_prompts": str(tmp_path / "x.txt")})


def test_apply_fills_the_sections_from_the_box(policy):
    cfg = toml_box_config(policy, "[dataset]\nmasked_loss = true\nalpha_mask = true\n[training]\nmin_snr_gamma = 5\n")
    f = config_to_form(cfg)
    assert (f["masked_loss"], f["alpha_mask"], f["min_snr_gamma"]) == (True, True, 5.0)
    assert dataclasses.asdict(cfg) == dataclasses.asdict(build_config(policy, f, "", ""))
