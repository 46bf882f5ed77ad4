"""Tests of sd_loha.train.config: parsing, overrides, every error kind, round trips, docs, path checks."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sd_loha.train import config as C
from sd_loha.train.config import (
    DEFAULT_MAX_TRAIN_STEPS,
    OPTIONS,
    ConfigError,
    TrainConfig,
    as_config,
    config_from_kwargs,
    load,
    load_config,
    loads_config,
)
from sd_loha.train.checks import check_output_dir, check_paths, find_previous_outputs
from sd_loha.train.config_docs import config_reference_markdown

REPO = Path(__file__).resolve().parents[2]
REQ = ["pretrained_model=tiny-sd1", "train_data_dir=data", "output_dir=out"]
REQ_TOML = 'pretrained_model = "tiny-sd1"\ntrain_data_dir = "data"\noutput_dir = "out"\n'


def errors_of(fn, *args, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        fn(*args, **kwargs)
    return ei.value.messages


def one_error(fn, *args, **kwargs) -> str:
    msgs = errors_of(fn, *args, **kwargs)
    assert len(msgs) == 1, msgs
    return msgs[0]


def cfg_with(*overrides: str) -> TrainConfig:
    return load_config(None, REQ + list(overrides))


def warnings_with(*overrides: str) -> tuple[str, ...]:
    return load({}, REQ + list(overrides)).warnings


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------


def test_defaults():
    c = cfg_with()
    assert c.max_train_steps == DEFAULT_MAX_TRAIN_STEPS and c.max_train_epochs is None
    assert c.resolution == (512, 512)
    assert (c.network_dim, c.network_alpha, c.conv_dim, c.preset) == (8, 4.0, 0, "attn-mlp")
    assert c.optimizer_type == "AdamW" and c.optimizer_args == {}
    assert c.effective_unet_lr == c.effective_text_encoder_lr == c.learning_rate == 1e-4
    assert c.sample_size == (512, 512)
    assert c.effective_logging_dir == os.path.join("out", "logs")
    assert warnings_with() == ()
    # every option has a group and help text; every default validates
    for spec in OPTIONS.values():
        assert spec.group in C.GROUPS and spec.help, spec.name


def test_v_parameterization_auto(tmp_path):
    assert cfg_with("v_parameterization=auto").v_parameterization is None
    assert cfg_with("v_parameterization=true").v_parameterization is True
    assert load_config(write(tmp_path, REQ_TOML + 'v_parameterization = "Auto"\n')).v_parameterization is None
    assert "v_parameterization must be true or false, got 'maybe'" in one_error(cfg_with, "v_parameterization=maybe")


def test_epochs_instead_of_steps():
    c = cfg_with("max_train_epochs=10")
    assert c.max_train_epochs == 10 and c.max_train_steps is None


def test_flat_and_grouped_toml_agree_and_wrong_table_is_accepted(tmp_path):
    flat = write(tmp_path, REQ_TOML + "network_dim = 16\nlearning_rate = 3e-4\n", "flat.toml")
    grouped = write(
        tmp_path,
        '[model]\npretrained_model = "tiny-sd1"\n[dataset]\ntrain_data_dir = "data"\n'
        '[network]\nnetwork_dim = 16\n[training]\noutput_dir = "out"\n'
        "[saving]\nlearning_rate = 3e-4\n",  # wrong table: the name is what counts
        "grouped.toml",
    )
    assert load_config(flat) == load_config(grouped)
    assert load_config(grouped).network_dim == 16


def test_set_twice_and_table_errors(tmp_path):
    p = write(tmp_path, REQ_TOML + "network_dim = 4\n[network]\nnetwork_dim = 8\n[netwrk]\nconv_dim = 2\n"
              "[training.network]\nconv_dim = 2\n")
    msgs = errors_of(load_config, p)
    assert any("network_dim is set twice" in m and "c.toml [network]" in m for m in msgs), msgs
    assert any("unknown table [netwrk] (did you mean 'network'?)" in m for m in msgs), msgs
    assert any("tables do not nest: [training.network]" in m for m in msgs), msgs


def test_group_name_used_as_option(tmp_path):
    p = write(tmp_path, REQ_TOML + 'network = "loha"\n')
    assert "'network' is a table name, not an option" in one_error(load_config, p)


# ---------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------


def test_override_types():
    c = cfg_with(
        "max_train_steps=50", "learning_rate=1e-4", "unet_lr=.5", "flip_aug=True", "cache_latents=false",
        "output_dir=out/run 1", 'trigger_word="a b"', "output_name=2024", "mixed_precision=BF16",
        "network_alpha=2",
    )
    assert c.max_train_steps == 50 and isinstance(c.max_train_steps, int)
    assert c.learning_rate == 1e-4 and c.unet_lr == 0.5
    assert c.flip_aug is True and c.cache_latents is False
    assert c.output_dir == "out/run 1" and c.trigger_word == "a b"
    assert c.output_name == "2024"  # a string option keeps the text, not the integer
    assert c.mixed_precision == "bf16"
    assert c.network_alpha == 2.0 and isinstance(c.network_alpha, float)


def test_override_lists_dicts_and_quoting():
    c = cfg_with('network_include=["attn1", "attn2"]', "network_exclude=time_emb",
                 "sample_prompts=a cat, oil painting", "optimizer_args={weight_decay=0.01}")
    assert c.network_include == ["attn1", "attn2"]
    assert c.network_exclude == ["time_emb"]
    assert c.sample_prompts == ["a cat, oil painting"]
    assert c.optimizer_args == {"weight_decay": 0.01}
    assert cfg_with("network_exclude=").network_exclude == []


def test_sample_strengths_parse_and_refuse():
    assert TrainConfig().sample_strengths == [0.0, 1.0]
    assert cfg_with("sample_strengths=0, 0.5, 1").sample_strengths == [0.0, 0.5, 1.0]  # --set, a form field
    assert cfg_with("sample_strengths=[0, 0.75]").sample_strengths == [0.0, 0.75]
    assert "sample_strengths must be a non-empty list of numbers" in one_error(cfg_with, "sample_strengths=[]")
    assert "sample_strengths must be a list of numbers, got 'half'" in one_error(cfg_with, "sample_strengths=half")
    assert "sample_strengths must be in [-2, 2], got 3.0" in one_error(cfg_with, "sample_strengths=[0, 3]")


def test_override_unset_prefix_and_optimizer_arg_merge(tmp_path):
    p = write(tmp_path, REQ_TOML + 'vae = "v/ae"\n[training]\noptimizer_args = { weight_decay = 0.01, eps = 1e-8 }\n')
    c = load_config(p, ["vae=none", "training.learning_rate=2e-4", "optimizer_args.weight_decay=0.05",
                        "optimizer_args.betas=0.9,0.99"])
    assert c.vae is None and c.learning_rate == 2e-4
    assert c.optimizer_args == {"weight_decay": 0.05, "eps": 1e-8, "betas": [0.9, 0.99]}


def test_override_later_wins_and_exclusive_pair_layers(tmp_path):
    p = write(tmp_path, REQ_TOML + "max_train_steps = 800\n")
    c = load_config(p, ["max_train_epochs=5"])  # --set epochs over a file with steps: steps unset
    assert (c.max_train_steps, c.max_train_epochs) == (None, 5)
    c = load_config(p, ["max_train_steps=10", "max_train_steps=20"])
    assert c.max_train_steps == 20
    c = load_config(p, base={"max_train_epochs": 3})  # file over base
    assert (c.max_train_steps, c.max_train_epochs) == (800, None)
    c = load_config(p, ["max_train_steps=none"])
    assert c.max_train_steps == DEFAULT_MAX_TRAIN_STEPS


def test_override_without_equals():
    assert "expected key=value" in one_error(load_config, None, REQ + ["max_train_steps"])


def test_kohya_optimizer_args_strings(tmp_path):
    p = write(tmp_path, REQ_TOML + 'optimizer_type = "Prodigy"\noptimizer_args = ["weight_decay=0.01", "betas=0.9,0.99", '
                                   '"decouple=True", "d_coef=2", "safeguard_warmup=False"]\n')
    assert load_config(p).optimizer_args == {
        "weight_decay": 0.01, "betas": [0.9, 0.99], "decouple": True, "d_coef": 2, "safeguard_warmup": False
    }
    assert "entries must be \"key=value\" strings" in one_error(cfg_with, 'optimizer_args=["oops"]')


# ---------------------------------------------------------------------------------------------
# error kinds and their messages
# ---------------------------------------------------------------------------------------------


def test_unknown_option_suggestion():
    m = one_error(cfg_with, "learning_rat=1e-4")
    assert m.startswith("--set learning_rat=1e-4: unknown option 'learning_rat' (did you mean 'learning_rate'?)")
    m = one_error(load_config, None, REQ, base={"netwrk_dim": 4})
    assert "base settings: unknown option 'netwrk_dim' (did you mean 'network_dim'?)" in m
    m = one_error(cfg_with, "zzzz=1")
    assert "unknown option 'zzzz'" in m and "docs/config.md" in m


def test_kohya_option_hints(tmp_path):
    p = write(tmp_path, 'pretrained_model_name_or_path = "x/y"\ntrain_data_dir = "d"\noutput_dir = "o"\n'
                        'network_module = "lycoris.kohya"\nnetwork_args = ["conv_dim=4", "algo=loha"]\nxformers = true\n')
    msgs = errors_of(load_config, p)
    text = "\n".join(msgs)
    assert "sd-loha calls it 'pretrained_model'" in text
    assert "always trains LoHA" in text
    assert "conv_dim, conv_alpha" in text
    assert "scaled-dot-product attention" in text
    assert any(m.startswith("missing required option pretrained_model") for m in msgs)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("network_dim=8x", "network_dim must be an integer, got '8x'. Write a whole number without quotes, e.g. network_dim = 8"),
        ("network_dim=8.5", "network_dim must be an integer, got 8.5"),
        ('learning_rate="1e-4"', "learning_rate must be a number, got '1e-4'"),
        ("learning_rate=fast", "learning_rate must be a number, got 'fast'"),
        ("learning_rate=nan", "learning_rate must be a finite number"),
        ("flip_aug=yes", "flip_aug must be true or false, got 'yes'"),
        ("network_include=[1, 2]", "network_include must be a list of strings, got [1, 2]"),
        ("optimizer_args=5", "optimizer_args must be a table of optimizer arguments"),
        ("lr_scheduler=cosin", "lr_scheduler must be one of linear, cosine, cosine_with_restarts, polynomial, "
                               "constant, constant_with_warmup; got 'cosin' (did you mean 'cosine'?)"),
        ("preset=attn_mlp", "(did you mean 'attn-mlp'?)"),
        ("sample_sampler=eular_a", "(did you mean 'euler_a'?)"),
        ("optimizer_type=adamw8bitt", "optimizer_type 'adamw8bitt' is not one of kohya's names (AdamW8bit, Prodigy, ...) "
                                      "or a torch.optim optimizer (did you mean 'AdamW8bit'?). For an optimizer from "
                                      "another package write its import path, e.g. 'torch.optim.RAdam'"),
        ("optimizer_type=LBFGS", "optimizer_type 'LBFGS' cannot be used"),
        ("optimizer_type=torch.optim.Adamw", "optimizer_type 'torch.optim.Adamw': torch.optim has no 'Adamw' "
                                             "(did you mean 'torch.optim.AdamW'?)"),
        ("optimizer_type=os.path", "optimizer_type 'os.path' is not an optimizer class"),
        ("optimizer_type=no_such_pkg.Opt", "optimizer_type 'no_such_pkg.Opt': there is no module 'no_such_pkg'. "
                                           "Install the package that provides it"),
        ("optimizer_args={betass=[0.9, 0.99]}", "--set optimizer_args={betass=[0.9, 0.99]}: optimizer_args: 'betass' is "
                                                "not an argument of optimizer_type 'AdamW' (did you mean 'betas'?). "
                                                "Its arguments: betas, eps, weight_decay"),
        ("optimizer_args={eps=-1.0}", "refused by optimizer_type 'AdamW': Invalid epsilon value: -1.0"),
        ("optimizer_args={lr=1e-3}", "optimizer_args: 'lr' cannot be given. Set learning_rate"),
        ("huber_schedule=snrr", "huber_schedule must be one of snr, exponential, constant; got 'snrr' (did you mean 'snr'?)"),
        ("huber_scale=0", "huber_scale must be > 0"),
        ("network_dim=0", "network_dim must be >= 1, got 0"),
        ("network_alpha=0", "network_alpha must be > 0, got 0.0"),
        ("rank_dropout=1", "rank_dropout must be in [0, 1), got 1.0"),
        ("validation_split=0.5", "validation_split must be in [0, 0.5), got 0.5"),
        ("validation_split=-0.1", "validation_split must be in [0, 0.5), got -0.1"),
        ("save_every_n_steps=0", "save_every_n_steps must be >= 1, got 0"),
        ("ema_decay=1", "ema_decay must be in (0, 1), got 1.0"),
        ("min_snr_gamma=0", "min_snr_gamma must be > 0"),
        ("clip_skip=13", "clip_skip must be in [1, 12], got 13"),
        ("bucket_reso_steps=60", "bucket_reso_steps must be a multiple of 8, got 60. Use 64"),
        ("sample_width=500", "sample_width must be a multiple of 8, got 500"),
        ("resolution=500", "resolution sides must be multiples of 8 and at least 64, got 500. Use e.g. 496"),
        ("resolution=big", "resolution must be a size in pixels, got 'big'"),
        ("resolution=[512, 512, 3]", "resolution must be one or two whole numbers"),
        ("lr_warmup_steps=2.5", "lr_warmup_steps must be a whole number of steps or a fraction below 1"),
        ("lr_warmup_steps=-1", "lr_warmup_steps must be a number of steps (>= 0) or a fraction below 1"),
        ("caption_extension=txt", "caption_extension 'txt' must start with a dot. Write caption_extension = \".txt\""),
        ("output_name=loha.safetensors", "must not include the file extension. Write output_name = \"loha\""),
        ("output_name=a/b", "output_name 'a/b' must be a file name stem, not a path"),
        ("output_name=", "output_name is empty"),
    ],
)
def test_error_messages(override, expected):
    m = one_error(cfg_with, override)
    assert expected in m, m
    if "=" in override and "output_name" not in override and "caption_extension" not in override:
        assert m.startswith(f"--set {override}: "), m


def test_file_errors_name_file_and_table(tmp_path):
    p = write(tmp_path, REQ_TOML + '[network]\nnetwork_dim = "8"\n[training]\nlearning_rat = 1e-4\n')
    msgs = errors_of(load_config, p)
    assert len(msgs) == 2
    assert any(m.startswith(f"{p} [network]: network_dim must be an integer, got '8'") for m in msgs), msgs
    assert any(m.startswith(f"{p} [training]: unknown option 'learning_rat' (did you mean 'learning_rate'?)")
               for m in msgs), msgs


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["max_train_steps=10", "max_train_epochs=2"],
         "--set max_train_steps=10 and --set max_train_epochs=2: max_train_steps (10) and max_train_epochs (2) are both set"),
        (["cache_text_encoder_outputs=true"],
         "cache_text_encoder_outputs = true needs a frozen text encoder, but train_text_encoder = true. "
         "Set train_text_encoder = false"),
        (["cache_latents=false", "cache_latents_to_disk=true"], "cache_latents_to_disk = true needs cache_latents = true"),
        (["min_bucket_reso=1024", "max_bucket_reso=512", "resolution=512"], "min_bucket_reso (1024) is larger than max_bucket_reso (512)"),
        (["min_bucket_reso=328", "bucket_reso_steps=64"], "min_bucket_reso (328) is not a multiple of bucket_reso_steps (64). Use min_bucket_reso = 320"),
        (["resolution=1024", "max_bucket_reso=768"], "resolution 1024x1024 does not fit the bucket range 256-768"),
    ],
)
def test_conflicts(overrides, expected):
    assert expected in one_error(cfg_with, *overrides)


def test_conflict_with_bad_value_is_not_reported_twice():
    # max_train_epochs is invalid, so the steps/epochs conflict is not reported on top of it
    m = one_error(cfg_with, "max_train_steps=10", "max_train_epochs=ten")
    assert "max_train_epochs must be an integer" in m


def test_caption_dropout_alone_allows_text_encoder_cache():
    assert warnings_with("train_text_encoder=false", "cache_text_encoder_outputs=true", "caption_dropout_rate=0.1") == ()


def test_bucket_check_skipped_without_bucketing():
    assert cfg_with("enable_bucket=false", "resolution=1280", "max_bucket_reso=1024").resolution == (1280, 1280)


def test_all_problems_at_once(tmp_path):
    p = write(tmp_path, '[network]\nnetwork_dim = "x"\nconv_dim = -1\n[training]\nlearning_rat = 1\n')
    e = pytest.raises(ConfigError, load_config, p, ["mixed_precision=fp8"]).value
    assert len(e.problems) == 7  # 3 in the file, 1 override, 3 missing required options
    assert str(e).startswith("invalid training config (7 problems):\n  - ")
    assert all(isinstance(x, C.Problem) for x in e.problems)


def test_missing_required_message():
    msgs = errors_of(load_config, None, ["pretrained_model=tiny-sd1", "train_data_dir=d"])
    assert msgs == [
        "missing required option output_dir (where the LoHA files are written). Add output_dir = "
        '"output/my_style" to the config file (under [training] or at the top) or pass --set output_dir=...'
    ]


def test_toml_syntax_error_and_missing_file(tmp_path):
    p = write(tmp_path, 'output_dir = C:\\out\n')
    m = one_error(load_config, p)
    assert m.startswith(f"{p}: not valid TOML:") and "line 1" in m and "single quotes" in m
    assert "config file not found" in one_error(load_config, tmp_path / "nope.toml")


# ---------------------------------------------------------------------------------------------
# values: case, aliases, resolution, warmup
# ---------------------------------------------------------------------------------------------


def test_case_insensitive_enums_aliases_and_optimizers():
    c = cfg_with("optimizer_type=adamw8bit", "lr_scheduler=Cosine", "save_precision=FP32",
                 "loss_type=MSE", "sample_sampler=k_euler_a", "preset=FULL", "log_with=None")
    assert (c.optimizer_type, c.lr_scheduler, c.save_precision, c.loss_type, c.sample_sampler, c.preset, c.log_with) == (
        "AdamW8bit", "cosine", "float", "l2", "euler_a", "full", "none")
    assert cfg_with("optimizer_type=sgd").optimizer_type == "SGD"
    assert cfg_with("optimizer_type=prodigy").optimizer_type == "Prodigy"
    assert cfg_with("optimizer_type=pagedadamw8bit").optimizer_type == "PagedAdamW8bit"
    assert cfg_with("optimizer_type=LION8BIT").optimizer_type == "Lion8bit"
    assert cfg_with("optimizer_type=torch.optim.RAdam").optimizer_type == "torch.optim.RAdam"  # import paths as written
    assert cfg_with("optimizer_type=bitsandbytes.optim.PagedAdamW8bit").optimizer_type == "bitsandbytes.optim.PagedAdamW8bit"
    assert cfg_with("huber_schedule=Exponential").huber_schedule == "exponential"
    assert cfg_with().huber_schedule == "snr" and cfg_with().huber_c == 0.1 and cfg_with().huber_scale == 1.0  # kohya's


@pytest.mark.parametrize(
    "value, expected",
    [("768", (768, 768)), ("768,512", (768, 512)), ('"768x512"', (768, 512)), ("[640, 1024]", (640, 1024)),
     ("1024.0", (1024, 1024))],
)
def test_resolution_forms(value, expected):
    assert cfg_with(f"resolution={value}").resolution == expected


def test_warmup_ratio_and_steps():
    c = cfg_with("lr_warmup_steps=0.1", "lr_scheduler=cosine", "max_train_steps=500")
    assert c.lr_warmup_steps == 0.1 and c.warmup_steps_for(500) == 50
    c = cfg_with("lr_warmup_steps=30.0", "lr_scheduler=cosine")
    assert c.lr_warmup_steps == 30 and isinstance(c.lr_warmup_steps, int) and c.warmup_steps_for(500) == 30


# ---------------------------------------------------------------------------------------------
# warnings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["random_crop=true"], "cache_latents with random_crop"),
        (["train_text_encoder=false", "cache_text_encoder_outputs=true", "shuffle_caption=true"],
         "cache_text_encoder_outputs with shuffle_caption"),
        (["train_text_encoder=false", "cache_text_encoder_outputs=true", "caption_tag_dropout_rate=0.1"],
         "their text-encoder outputs cannot be cached"),
        (["lr_warmup_steps=100"], "use 'constant_with_warmup'"),
        (["lr_scheduler=cosine", "lr_warmup_steps=100", "max_train_steps=100"], "is not shorter than max_train_steps"),
        (["conv_dim=4"], "conv_dim = 4 has no effect with preset 'attn-mlp'"),
        (["use_tucker=true"], "use_tucker has no effect"),
        (["network_alpha=16"], "network_alpha (16) is larger than network_dim (8)"),
        (["train_text_encoder=false", "text_encoder_lr=1e-5"], "text_encoder_lr is set but train_text_encoder = false"),
        (["keep_tokens=1"], "keep_tokens only matters"),
        (["random_crop=true", "cache_latents=true", "flip_aug=true"], "latents are not cached"),
        (["validation_every_n_steps=10"], "validation_split = 0"),
        (["save_last_n=2"], "only the final file is written"),
        (["save_every_n_steps=5000"], "no intermediate save"),
        (['sample_prompts=["a cat"]'], "no samples are made during training"),
        (["sample_every_n_steps=100"], "sample_prompts is empty"),
    ],
)
def test_warnings(overrides, expected, caplog):
    with caplog.at_level("WARNING", logger="sd_loha.train.config"):
        warnings = warnings_with(*overrides)
    assert len(warnings) == 1 and expected in warnings[0], warnings
    assert expected in caplog.text


# ---------------------------------------------------------------------------------------------
# round trips, Python API
# ---------------------------------------------------------------------------------------------


def test_to_toml_round_trip(tmp_path):
    c = config_from_kwargs(
        pretrained_model="tiny-sdxl",
        train_data_dir="C:\\data\\set 1",
        output_dir=tmp_path / "out",  # a Path is accepted
        output_name='it\'s "q"',
        trigger_word="ünïcode, tab\tnew\nline \x7f",
        resolution=[768, 512],
        max_train_epochs=7,
        learning_rate=3.3e-5,
        text_encoder_lr=1e-5,
        network_include=["attn1", 'we"ird\\'],
        optimizer_type="Prodigy",
        optimizer_args={"betas": [0.9, 0.99], "weight_decay": 0.01, "decouple": True, "d_coef": 2.0},
        loss_type="smooth_l1",
        huber_schedule="exponential",
        huber_scale=2.0,
        lr_warmup_steps=0.05,
        lr_scheduler="cosine",
        v_parameterization=False,
        ema_decay=0.999,
        sample_prompts=["a", "b, c"],
        sample_every_n_epochs=1,
    )
    assert c.output_dir == str(tmp_path / "out")
    for comments in (False, True):
        p = write(tmp_path, c.to_toml(comments=comments))
        assert load_config(p) == c
    assert as_config(c.to_dict()) == c
    assert as_config(c.to_dict(grouped=True)) == c
    table = tomllib.loads(c.to_toml())
    assert table["dataset"]["resolution"] == [768, 512] and table["dataset"]["train_data_dir"] == "C:\\data\\set 1"
    assert table["training"]["optimizer_args"]["betas"] == [0.9, 0.99]  # a table option: a sub-table
    assert C.toml_value({"odd key": "x", "ok": 1}) == '{ "odd key" = "x", ok = 1 }'  # keys that need quotes


def test_to_toml_of_defaults_round_trips_and_omits_unset(tmp_path):
    c = cfg_with()
    text = c.to_toml()
    assert "vae" not in text and "max_train_epochs" not in text and "resolution = 512" in text
    assert load_config(write(tmp_path, text)) == c
    assert "# vae = " in c.to_toml(comments=True)


def test_loads_config_and_base():
    c = loads_config("network_dim = 4\n", ["output_dir=o"], base={"model": {"pretrained_model": "tiny-sd2"},
                                                                   "train_data_dir": "d", "network_dim": 2})
    assert (c.pretrained_model, c.network_dim, c.output_dir) == ("tiny-sd2", 4, "o")


def test_python_dict_errors_have_no_location():
    msgs = errors_of(config_from_kwargs, pretrained_model="tiny-sd1", train_data_dir="d", output_dir="o",
                     network_dim="8x", learning_rat=1)
    assert msgs == [
        "unknown option 'learning_rat' (did you mean 'learning_rate'?)",
        "network_dim must be an integer, got '8x'. Write a whole number without quotes, e.g. network_dim = 8.",
    ]


def test_load_normalises_direct_construction():
    c = TrainConfig(pretrained_model="tiny-sd1", train_data_dir="d", output_dir="o", resolution=768,
                    optimizer_type="adamw", mixed_precision="BF16")  # type: ignore[arg-type]
    loaded = load(c)
    assert loaded.warnings == () and loaded.origins == {}
    assert (loaded.config.resolution, loaded.config.optimizer_type, loaded.config.mixed_precision) == \
        ((768, 768), "AdamW", "bf16")
    assert c.resolution == 768  # the object passed in is not changed behind the caller's back
    bad = TrainConfig(pretrained_model="tiny-sd1", train_data_dir="d", output_dir="o", network_dim=0)
    assert "network_dim must be >= 1, got 0" in one_error(load, bad)


def test_loaded_config_says_where_each_value_was_set(tmp_path):
    p = write(tmp_path, REQ_TOML + "[network]\nnetwork_dim = 4\n")
    loaded = load(p, ["seed=3"])
    assert loaded.origins["network_dim"] == f"{p} [network]" and loaded.origins["seed"] == "--set seed=3"
    assert loaded.origins["pretrained_model"] == str(p) and "learning_rate" not in loaded.origins
    assert not any(k.startswith("_") for k in vars(loaded.config))  # nothing stored on the config itself


def test_as_config(tmp_path):
    c = cfg_with()
    assert as_config(c) == c
    assert as_config(c, ["max_train_epochs=2"]).max_train_epochs == 2
    d = c.to_dict()
    assert as_config(d) == c and as_config(d, ["network_dim=4"]).network_dim == 4
    p = write(tmp_path, c.to_toml())
    assert as_config(p) == c and as_config(str(p)) == c
    with pytest.raises(TypeError):
        as_config(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# docs and example configs
# ---------------------------------------------------------------------------------------------


def test_docs_config_md_is_up_to_date():
    doc = REPO / "docs" / "config.md"
    assert doc.read_text(encoding="utf-8") == config_reference_markdown(), (
        "docs/config.md is stale: run  python -m sd_loha.train.config_docs > docs/config.md"
    )


def test_docs_list_every_default_that_differs_from_kohya_in_one_table():
    md = config_reference_markdown()
    table = md.split("## Defaults that differ from kohya sd-scripts", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.splitlines() if line.startswith("| `")}
    differing = {name for name, spec in OPTIONS.items() if spec.kohya_default is not None}
    assert set(rows) == differing
    assert {"caption_extension", "save_state", "cache_latents", "wd_on_output", "save_precision"} <= differing
    for name, spec in OPTIONS.items():  # a difference always says why; no reason without a difference
        assert (spec.kohya_default is None) == (spec.kohya_note is None), name
    assert md.count("kohya's default |") == 1  # one table


def test_docs_mention_every_option():
    md = config_reference_markdown()
    for name in OPTIONS:
        assert f"| `{name}` |" in md


@pytest.mark.parametrize("name", ["sd15_style", "sd2_style", "sdxl_style"])
def test_example_configs_are_valid(name):
    loaded = load(REPO / "train_configs" / f"{name}.toml")
    c = loaded.config
    assert loaded.warnings == ()
    assert c.preset == "full" and (c.network_dim, c.network_alpha, c.conv_dim, c.conv_alpha) == (8, 4.0, 4, 1.0)
    assert c.sample_prompts and c.save_every_n_steps and c.save_last_n == 4


def test_example_config_specifics():
    sd15 = load_config(REPO / "train_configs" / "sd15_style.toml")
    assert (sd15.resolution, sd15.learning_rate, sd15.train_batch_size) == ((512, 512), 2e-4, 2)
    assert not sd15.train_text_encoder  # styles train the UNet alone (bench/RESULTS.md, "Style against subject")
    assert (sd15.lr_scheduler, sd15.min_snr_gamma, sd15.mixed_precision) == ("cosine", 5.0, "fp16")
    sd2 = load_config(REPO / "train_configs" / "sd2_style.toml")
    assert sd2.resolution == (768, 768) and sd2.v_parameterization is None
    xl = load_config(REPO / "train_configs" / "sdxl_style.toml")
    assert (xl.resolution, xl.min_bucket_reso, xl.max_bucket_reso) == ((1024, 1024), 640, 1536)
    assert xl.mixed_precision == "bf16" and xl.cache_latents_to_disk and not xl.train_text_encoder


# ---------------------------------------------------------------------------------------------
# path checks
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def paths_cfg(tmp_path):
    (tmp_path / "data").mkdir()
    return cfg_with(f"train_data_dir={tmp_path / 'data'}", f"output_dir={tmp_path / 'out' / 'run'}")


def test_check_paths_ok(paths_cfg, tmp_path):
    check_paths(paths_cfg)  # tiny-sd1, existing data folder, creatable output folder
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    for m in (str(model), str(ckpt), "stabilityai/stable-diffusion-xl-base-1.0"):
        c = as_config(paths_cfg, [f"pretrained_model={m}", f"network_weights={weights}", "vae=madebyollin/sdxl-vae-fp16-fix"])
        check_paths(c)


def test_check_paths_errors(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "models").mkdir()
    (tmp_path / "notamodel").mkdir()
    loaded = load({}, REQ + [
        f"train_data_dir={tmp_path / 'missing'}",
        f"pretrained_model={tmp_path / 'notamodel'}",
        f"network_weights={tmp_path / 'nope.safetensors'}",
        f"output_dir={tmp_path / 'afile'}",
        f"vae={tmp_path / 'vae.safetensors'}",
        f"reg_data_dir={tmp_path / 'no_reg'}",
        "masked_loss=true", f"conditioning_data_dir={tmp_path / 'afile'}",
    ])
    c = loaded.config
    msgs = errors_of(check_paths, c, loaded.origins)  # each problem located where its option was set
    assert len(msgs) == 7, msgs
    assert any("reg_data_dir" in m and "does not exist" in m and "regularization images" in m for m in msgs)
    assert any("conditioning_data_dir" in m and "is a file, not a folder" in m for m in msgs)
    assert any("train_data_dir" in m and "does not exist" in m and "folder that holds your images" in m for m in msgs)
    assert any("is a folder but not a diffusers model (no model_index.json)" in m for m in msgs)
    assert any("network_weights" in m and "does not exist" in m for m in msgs)
    assert any("output_dir" in m and "is a file, not a folder" in m for m in msgs)
    assert any(m.startswith(f"--set vae={tmp_path / 'vae.safetensors'}: vae") for m in msgs)

    assert "is a file, not a folder" in one_error(check_paths, as_config(c, [
        f"train_data_dir={tmp_path / 'afile'}", "pretrained_model=tiny-sd1", "network_weights=none",
        "vae=none", f"output_dir={tmp_path / 'o'}", "reg_data_dir=none", "masked_loss=false"]))


def test_check_paths_model_names(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    base = ["train_data_dir=data", "output_dir=out"]
    m = one_error(check_paths, load_config(None, base + ["pretrained_model=tiny-sd5"]))
    assert "not an existing file or folder, a built-in model" in m and "(did you mean 'tiny-sd" in m
    m = one_error(check_paths, load_config(None, base + ["pretrained_model=models/sd15"]))
    assert "does not exist, though the folder 'models' does" in m
    m = one_error(check_paths, load_config(None, base + ["pretrained_model=models/v1-5.safetensors"]))
    assert "pretrained_model 'models/v1-5.safetensors' does not exist" in m
    check_paths(load_config(None, base + ["pretrained_model=org/name"]))


def test_check_paths_unwritable(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    c = cfg_with(f"train_data_dir={tmp_path / 'data'}", f"output_dir={ro / 'sub' / 'out'}")
    assert f"output_dir '{ro / 'sub' / 'out'}' cannot be created: '{ro}' is not writable" in one_error(check_paths, c)
    c = cfg_with(f"train_data_dir={tmp_path / 'data'}", f"output_dir={ro}")
    assert "is not writable. Choose a folder you can write to" in one_error(check_paths, c)


def test_check_output_dir(tmp_path):
    out = tmp_path / "out"
    c = cfg_with(f"output_dir={out}", "output_name=style")
    check_output_dir(c)  # missing folder
    out.mkdir()
    (out / "notes.txt").write_text("x")
    (out / "other-000400.safetensors").write_bytes(b"")
    (out / "stylefoo.safetensors").write_bytes(b"")  # another name that only shares a prefix
    check_output_dir(c)
    (out / "style-000400.safetensors").write_bytes(b"")
    (out / "style-000400-state").mkdir()
    m = one_error(check_output_dir, c)
    assert "already holds outputs of a run named 'style' (style-000400-state/, style-000400.safetensors)" in m
    assert "two runs writing to one folder" in m and "overwrite = true" in m and "--resume" in m
    check_output_dir(c, resume=True)
    check_output_dir(c, resume=str(out / "style-000400-state"))
    check_output_dir(as_config(c, ["overwrite=true"]))
    check_output_dir(as_config(c, ["output_name=new"]))


def test_find_previous_outputs(tmp_path):
    for n in ("loha.safetensors", "loha-step00400.safetensors", "loha_e3.safetensors", "lohax.safetensors",
              "loha.txt"):
        (tmp_path / n).write_bytes(b"")
    for d in ("state", "loha-000400-state", "samples", "logs"):
        (tmp_path / d).mkdir()
    assert [p.name for p in find_previous_outputs(tmp_path, "loha")] == [
        "loha-000400-state", "loha-step00400.safetensors", "loha.safetensors", "loha_e3.safetensors", "state"]


# ---------------------------------------------------------------------------------------------
# save_precision = "bf16": A1111 merges in the file's dtype
# ---------------------------------------------------------------------------------------------

BF16_WARNING = ('save_precision = "bf16": A1111 merges an adapter into the model in the file\'s dtype, so a bf16 '
                "file rounds every patched base weight to bf16, even on an fp16 model")


def test_bf16_save_precision_warns_that_a1111_rounds_merged_weights(caplog):
    with caplog.at_level("WARNING", logger="sd_loha.train.config"):
        c = load_config(None, REQ + ["save_precision=bfloat16"])
    assert c.save_precision == "bf16"
    logged = [r.getMessage() for r in caplog.records if BF16_WARNING in r.getMessage()]
    assert len(logged) == 1, caplog.text
    assert "2.5e-2" in logged[0] and "2.4e-3" in logged[0] and 'use save_precision = "fp16" (the default)' in logged[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="sd_loha.train.config"):
        assert load_config(None, REQ).save_precision == "fp16"  # the default: no warning
        load_config(None, REQ + ["save_precision=float"])
    assert "A1111" not in caplog.text


def test_bf16_warning_reaches_the_user_of_sd_loha_train(tmp_path):
    """The command line prints config warnings before it checks the paths (here a missing data folder)."""
    argv = ["train", "--set", "pretrained_model=tiny-sd1", "--set", f"train_data_dir={tmp_path / 'missing'}",
            "--set", f"output_dir={tmp_path / 'out'}", "--set", "save_precision=bf16"]
    run = subprocess.run([sys.executable, "-c", "import sys; from sd_loha.cli import main; sys.exit(main(sys.argv[1:]))",
                          *argv], capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert run.returncode == 2 and "train_data_dir" in run.stderr, run.stderr[-2000:]
    assert f"WARNING: config: {BF16_WARNING}" in run.stderr
