"""Block-wise ranks and learning rates (network_reg_dims / network_reg_lrs, kohya sd-scripts' names and rules) and
LyCORIS preset files (preset = "x.toml"), against their references: kohya's networks/lora_flux.py (each pattern
re.search-ed in the module's kohya name, the first one in order wins, alpha stays network_alpha, 0 = left out; one
optimizer group per pattern) and the real LyCORIS package building its own network from the same preset file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from sd_loha.models import build_tiny_pipeline
from sd_loha.network import add_loha
from sd_loha.train.config import ConfigError, config_from_kwargs, load_config
from sd_loha.train.loop import Trainer, train

from .helpers import REPO, _TextModelShim, assert_file_loads_everywhere, base_config, read_file

PRESET_FILE = REPO / "train_configs" / "presets" / "style_blocks.toml"
FULL_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def _kohya_rank(rules: dict[str, int], key: str) -> int | None:
    """kohya's LoRANetwork.create_modules: `for reg, d in reg_dims.items(): if re.search(reg, lora_name): ...; break`."""
    for pattern, dim in rules.items():
        if re.search(pattern, key):
            return dim
    return None


def _full_preset_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """kohya name -> layer of every Linear/Conv2d inside the full preset's blocks, found without targets.py."""
    out = {}
    for block_path, block in unet.named_modules():
        if type(block).__name__ in FULL_BLOCKS:
            for sub_path, sub in block.named_modules():
                if isinstance(sub, (nn.Linear, nn.Conv2d)):
                    out["lora_unet_" + f"{block_path}.{sub_path}".replace(".", "_")] = sub
    return out


def _randomize(params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_reg_dims_follow_kohya_first_match_keep_alpha_and_zero_leaves_out():
    rules = {"attn1": 6, "to_q": 3, r"up_blocks_1_attentions_0_.*ff_net": 0, "down_blocks_0_resnets_0_conv1": 5}
    pipe = build_tiny_pipeline("tiny-sd1")
    layers = _full_preset_layers(pipe.unet)
    net = add_loha(pipe.unet, preset="full", rank=4, alpha=2.0, conv_rank=0, conv_alpha=1.5, reg_dims=rules)
    rows = {r["key"]: r for r in net.listing()}
    expected = {}
    for key, layer in layers.items():
        kxk = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
        rank = _kohya_rank(rules, key)
        rank = rank if rank is not None else (0 if kxk else 4)  # conv_dim = 0: k x k convs only by a pattern
        if rank:
            expected[key] = (rank, 1.5 if kxk else 2.0)
    assert {k: (r["rank"], r["alpha"]) for k, r in rows.items()} == expected
    # spot checks of the rule itself: attn1_to_q takes the first pattern (6), not "to_q" (3)
    assert rows["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]["rank"] == 6
    assert rows["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"]["rank"] == 3
    assert rows["lora_unet_down_blocks_0_resnets_0_conv1"]["rank"] == 5  # a 3x3 conv, adapted with conv_dim = 0
    assert not any("up_blocks_1_attentions_0" in k and "ff_net" in k for k in rows)
    # the file: each module's own factor shapes and alpha; the forward scale is alpha / the module's rank
    sd = net.state_dict()
    for key, (rank, alpha) in expected.items():
        assert sd[f"{key}.hada_w1_b"].shape[0] == rank and sd[f"{key}.hada_w2_a"].shape[1] == rank
        assert float(sd[f"{key}.alpha"]) == alpha
    m = next(m for m in net.modules if m.key.endswith("attn1_to_q"))
    _randomize(m.layer.parameters(recurse=False))
    x = torch.randn(3, m.layer.base.in_features)
    f = m.layer.factors()
    delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * (2.0 / 6)
    torch.testing.assert_close(m.layer(x) - m.layer.base(x), x @ delta.T, rtol=1e-4, atol=1e-5)
    # the metadata says which ranks differ instead of claiming one
    meta = net.metadata()
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "2.0"
    args = json.loads(meta["ss_network_args"])
    assert args["conv_dim"] == "5" and args["network_reg_dims"] == ",".join(f"{p}={d}" for p, d in rules.items())


def test_one_rank_everywhere_keeps_numeric_metadata():
    net = add_loha(build_tiny_pipeline("tiny-sd1").unet, preset="attn-only", rank=4, reg_dims={"lora_unet_": 4})
    assert net.metadata()["ss_network_dim"] == "4"


def test_pattern_that_matches_no_adapted_module_is_an_error_before_anything_changes():
    pipe = build_tiny_pipeline("tiny-sd1")
    # resnets exist, but attn-mlp does not adapt them: the pattern would change nothing
    with pytest.raises(ValueError, match=r"network_reg_dims pattern 'resnets_0_conv1' matches no module that preset "
                                         r"'attn-mlp' adapts.*such as lora_"):
        add_loha(pipe, preset="attn-mlp", reg_dims={"attn1": 2, "resnets_0_conv1": 8})
    with pytest.raises(ValueError, match=r"network_reg_lrs pattern 'down_blocks\\\\.0'"):  # a dotted path, not the file's
        add_loha(pipe, preset="attn-mlp", reg_lrs={r"down_blocks\.0": 1e-4, "lora_unet_": 1e-4})
    assert not any(type(m).__name__ == "LoHALayer" for m in pipe.unet.modules())  # nothing was wrapped


def test_kohya_string_form_and_toml_table_mean_the_same(tmp_path):
    base = base_config(tmp_path)
    text = config_from_kwargs(**base, network_reg_dims=r"up_blocks_.*attn=16, lora_te_.*mlp=2",
                              network_reg_lrs="lora_te_=5e-5,mid_block=2e-4")
    table = config_from_kwargs(**base, network_reg_dims={r"up_blocks_.*attn": 16, "lora_te_.*mlp": 2},
                               network_reg_lrs={"lora_te_": 5e-5, "mid_block": 2e-4})
    assert text.network_reg_dims == table.network_reg_dims == {r"up_blocks_.*attn": 16, "lora_te_.*mlp": 2}
    assert list(text.network_reg_lrs.items()) == [("lora_te_", 5e-5), ("mid_block", 2e-4)]  # order kept: first wins
    assert load_config(None, [r"network_reg_dims=a_(\d)_b=3"], base=base).network_reg_dims == {r"a_(\d)_b": 3}
    (tmp_path / "c.toml").write_text(table.to_toml(), encoding="utf-8")  # written and read back unchanged
    assert load_config(tmp_path / "c.toml").network_reg_dims == table.network_reg_dims


@pytest.mark.parametrize("option, value, message", [
    ("network_reg_dims", {"attn(": 4}, r"'attn\(' is not a regular expression"),
    ("network_reg_dims", "attn1=2.5", "must be an integer, got 2.5"),
    ("network_reg_dims", {"attn1": -1}, "must be >= 0, got -1"),
    ("network_reg_dims", "attn1", r'entries must be "pattern=value"'),
    ("network_reg_lrs", {"attn1": 0}, "must be > 0, got 0"),
    ("network_reg_lrs", "attn1=fast", "must be a number, got 'fast'"),
])
def test_bad_patterns_are_refused_before_any_model_loads(tmp_path, option, value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_kwargs(**base_config(tmp_path), **{option: value})


# ---------------------------------------------------------------------------------------------
# LyCORIS preset files
# ---------------------------------------------------------------------------------------------

def _lycoris_network(monkeypatch, preset: Path, family: str, **kw) -> dict[str, tuple[int, float, bool]]:
    """kohya name -> (rank, alpha, Tucker) of the network the real LyCORIS builds from the preset file."""
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    from lycoris.utils.preset import read_preset

    cls = lycoris_kohya.LycorisNetworkKohya
    for attr in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                 "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                 "NAME_ALGO_MAP", "USE_FNMATCH"):
        monkeypatch.setattr(cls, attr, getattr(cls, attr))  # apply_preset sets class attributes: undo after
    cls.apply_preset(read_preset(str(preset)))
    pipe = build_tiny_pipeline(family)
    net = cls(_TextModelShim(pipe.text_encoder), pipe.unet, network_module="loha", **kw)
    return {m.lora_name: (m.lora_dim, float(m.alpha), m.tucker) for m in net.loras}


def _ours(preset: Path, family: str, **kw) -> dict[str, tuple[int, float, bool]]:
    net = add_loha(build_tiny_pipeline(family), preset=str(preset), **kw)
    return {r["key"]: (r["rank"], r["alpha"], r["kind"] == "conv_tucker") for r in net.listing()}


def test_shipped_preset_builds_the_network_lycoris_builds(monkeypatch):
    theirs = _lycoris_network(monkeypatch, PRESET_FILE, "tiny-sd1", lora_dim=6, alpha=3.0, conv_lora_dim=0,
                              conv_alpha=1.0)
    ours = _ours(PRESET_FILE, "tiny-sd1", rank=6, alpha=3.0, conv_rank=0, conv_alpha=1.0)
    assert ours == theirs
    # what the file asks for is indeed there: several ranks, 3x3 convs of the ResNets, TE attention at rank 2
    assert {r for r, _, _ in ours.values()} == {2, 4, 6, 8}
    assert ours["lora_unet_down_blocks_0_resnets_0_conv1"] == (4, 1.0, False)
    assert ours["lora_unet_time_embedding_linear_1"] == (2, 1.0, False)
    assert ours["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == (2, 1.0, False)
    assert not any("mlp" in k for k in ours)


def test_preset_precedence_and_globs_match_lycoris(tmp_path, monkeypatch):
    """The innermost class in module_algo_map wins inside a block (BasicTransformerBlock over Transformer2DModel,
    Attention over both); a name_algo_map entry beats the class entry of a target_name layer; use_fnmatch globs;
    conv_dim > 0 with a class entry that sets only alpha and Tucker."""
    preset = tmp_path / "p.toml"
    preset.write_text("""
use_fnmatch = true
unet_target_module = ["Transformer2DModel", "Downsample2D", "SomeOtherModelsBlock"]
unet_target_name = ["time_embedding.*", "conv_in"]
text_encoder_target_module = ["CLIPMLP"]
text_encoder_target_name = ["*layers.1.self_attn.q_proj"]
[module_algo_map.Transformer2DModel]
dim = 3
[module_algo_map.BasicTransformerBlock]
dim = 5
alpha = 2
[module_algo_map.CrossAttention]
dim = 7
[module_algo_map.Downsample2D]
alpha = 0.5
use_tucker = true
[name_algo_map."time_embedding.linear_2"]
dim = 1
""", encoding="utf-8")
    kw = dict(alpha=1.5, conv_alpha=0.25)
    theirs = _lycoris_network(monkeypatch, preset, "tiny-sd1", lora_dim=4, conv_lora_dim=2, **kw)
    ours = _ours(preset, "tiny-sd1", rank=4, conv_rank=2, **kw)
    # LyCORIS on a diffusers UNet knows no "CrossAttention" (kohya's UNet's class name): sd-loha reads it as
    # diffusers' Attention, so there those layers take its entry (dim 7, network_alpha: entries do not merge)
    # where LyCORIS falls back to the next enclosing class in the map, BasicTransformerBlock
    attn = {k for k in ours if re.search(r"attn[12]_(to_q|to_k|to_v|to_out_0)$", k)}
    assert attn and {ours[k] for k in attn} == {(7, 1.5, False)} and {theirs[k] for k in attn} == {(5, 2.0, False)}
    assert {k: v for k, v in ours.items() if k not in attn} == {k: v for k, v in theirs.items() if k not in attn}
    assert ours["lora_unet_down_blocks_0_attentions_0_proj_in"] == (3, 1.5, False)
    assert ours["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"] == (5, 2.0, False)
    assert ours["lora_unet_down_blocks_0_downsamplers_0_conv"] == (2, 0.5, True)
    assert ours["lora_unet_time_embedding_linear_1"] == (4, 1.5, False)
    assert ours["lora_unet_time_embedding_linear_2"] == (1, 1.5, False)
    assert ours["lora_unet_conv_in"] == (2, 0.25, False)
    assert ours["lora_te_text_model_encoder_layers_1_self_attn_q_proj"] == (4, 1.5, False)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" not in ours


@pytest.mark.parametrize("text, message", [
    ('[module_algo_map.Attention]\nalgo = "lokr"\ndim = 8', r"module_algo_map\.Attention: algo = 'lokr', but "
                                                          "sd-loha trains LoHA only"),
    ("[module_algo_map.FeedForward]\nfactor = 8", r"module_algo_map\.FeedForward: sd-loha cannot honour 'factor'"),
    ("[name_algo_map.'conv_in']\nweight_decompose = true", "sd-loha cannot honour 'weight_decompose'"),
    ('target_module = ["Attention"]', "key 'target_module' is read only by LyCORIS's generic wrapper.*"
                                      "unet_target_module"),
    ('unet_target_modules = ["Attention"]', "unknown key 'unet_target_modules'"),
    ('unet_target_name = ["up_blocks.(0"]', r"unet_target_name entry 'up_blocks.\(0' is not a regular expression"),
    ("[module_algo_map.Attention]\ndim = 0", "dim must be a whole number >= 1, got 0"),
    ("unet_target_module = [", "is not valid TOML"),
])
def test_preset_file_keys_sd_loha_cannot_honour_are_refused_from_the_config(tmp_path, text, message):
    preset = tmp_path / "bad_preset.toml"
    preset.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"preset file '.*bad_preset\.toml'.*{message}"):
        config_from_kwargs(**base_config(tmp_path, preset=str(preset)))
    with pytest.raises(ConfigError, match=r"preset file 'nowhere\.toml' does not exist"):
        config_from_kwargs(**base_config(tmp_path, preset="nowhere.toml"))


# ---------------------------------------------------------------------------------------------
# Through the trainer
# ---------------------------------------------------------------------------------------------

REG_LRS = {"lora_te_": 2e-4, r"up_blocks_1_.*attn2": 5e-4, "mid_block": 3e-3}


def test_reg_lrs_become_param_groups_at_their_rates(tmp_path):
    out = tmp_path / "out"
    t = Trainer(config_from_kwargs(**base_config(out, cache_latents=False, learning_rate=1e-3, unet_lr=7e-4,
                                                 network_reg_lrs=REG_LRS)), out, progress=False)
    t.setup()
    expected: dict[int, float] = {}
    for m in t.network.modules:
        lr = next((v for p, v in REG_LRS.items() if re.search(p, m.key)), None)
        for p in m.layer.parameters(recurse=False):
            expected[id(p)] = lr if lr is not None else 7e-4 if m.part == "unet" else 1e-3
    got = {id(p): g["lr"] for g in t.optimizer.param_groups for p in g["params"]}
    assert got == expected
    names = [g["name"] for g in t.optimizer.param_groups]
    assert names == ["unet", "unet_reg_lr_1", "unet_reg_lr_2", "text_encoder_reg_lr_0"], names  # kohya's reg_lr_<i>
    assert len(t.lr_scheduler.base_lrs) == len(names)  # the schedule scales every group from its own rate


def test_blockwise_run_trains_each_module_at_its_rate_and_its_file_loads_everywhere(tmp_path, monkeypatch):
    """One step of AdamW from LoHA's initialisation (hada_w2_a = 0) moves every element of hada_w2_a by exactly
    its group's learning rate (Adam's first update is lr · g / (|g| + eps)): the per-module rates reached the
    optimizer through train(). The file holds each module's own rank and alpha; sd-loha's loader and the real
    LyCORIS read it and compute the same outputs."""
    reg_dims = {r"up_blocks_1_attentions_\d_transformer_blocks_0_attn1": 12, "lora_te_.*layers_1_": 3}
    cfg = base_config(tmp_path / "out", preset=str(PRESET_FILE), network_dim=6, network_alpha=3.0,
                      network_reg_dims=reg_dims, network_reg_lrs=REG_LRS, max_train_steps=1, train_batch_size=1,
                      learning_rate=1e-3, optimizer_args={"weight_decay": 0.0})
    result = train(cfg, progress=False)
    tensors, meta = read_file(result.output)
    keys = sorted({k.rsplit(".", 1)[0] for k in tensors})
    for key in keys:
        rank = _kohya_rank(reg_dims, key)
        if rank is not None:
            assert tensors[f"{key}.hada_w1_b"].shape[0] == rank, key
        lr = next((v for p, v in REG_LRS.items() if re.search(p, key)), 1e-3)
        moved = tensors[f"{key}.hada_w2_a"].abs().flatten()  # lr, or a little less where |g| is near eps
        assert float(moved.max()) == pytest.approx(lr, rel=1e-3) and float(moved.median()) == pytest.approx(
            lr, rel=1e-2), (key, lr)
    assert tensors["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_b"].shape[0] == 12
    assert float(tensors["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 4.0  # preset's
    assert meta["ss_network_dim"] == "Dynamic"
    assert json.loads(meta["ss_network_args"])["preset"] == "style_blocks.toml"
    assert_file_loads_everywhere(result.output, "tiny-sd1", monkeypatch, ("te",))


def test_sdxl_patterns_use_the_ldm_names_and_both_text_encoders():
    """SDXL files name UNet modules the LDM way (lora_unet_input_blocks_…), which is what kohya SDXL users write."""
    rules = {r"lora_unet_input_blocks_\d+_1_": 6, "lora_te2_": 2, "lora_te1_.*mlp": 3}
    net = add_loha(build_tiny_pipeline("tiny-sdxl"), preset="attn-mlp", rank=4, reg_dims=rules)
    ranks = {m.key: m.layer.rank for m in net.modules}
    assert not any("down_blocks" in k for k in ranks)
    for key, rank in ranks.items():
        assert rank == (_kohya_rank(rules, key) or 4), key
    assert {r for k, r in ranks.items() if k.startswith("lora_unet_input_blocks_")} == {6}
    assert {r for k, r in ranks.items() if k.startswith("lora_te2_")} == {2}
    assert {r for k, r in ranks.items() if k.startswith("lora_te1_")} == {3, 4}
