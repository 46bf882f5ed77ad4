"""sd-loha convert --to lora: LoHA (and mixed) files as kohya LoRA/LoCon by truncated SVD of each ΔW.

Checked against the other side: diffusers' own load_lora_weights + fuse_lora must give the weights our
apply_loha merges (full rank; DoRA at two strengths).
Truncated ranks are checked against Eckart–Young (the error of the best rank-r approximation is the norm
of the dropped singular values), recomputed from the FORMAT.md formulas (loader_helpers.file_delta), not
from the converter's own merge_delta.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_loha import apply_loha, remove_loha
from sd_loha.blocks import BLOCK_IDS, OUTSIDE_BLOCKS, layer_block_id
from sd_loha.cli import main
from sd_loha.convert import (
    _reference_layers,
    choose_rank,
    convert_to_lora_file,
    loha_to_lora,
)
from sd_loha.io import AdapterFileError
from sd_loha.model_names import module_name_tables, pipeline_models

from .loader_helpers import file_delta, group_modules, make_loha_file

# Full rank reproduces the merge up to fp32 SVD rounding (measured worst 2e-7 on tiny-sd1 / tiny-sdxl).
RTOL, ATOL = 1e-5, 1e-6
FULL = 10**6  # a rank above every layer's, clipped to each layer's full rank
BLOCK_IDS_AND_OUTSIDE = [*BLOCK_IDS, OUTSIDE_BLOCKS]


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{part}.{n}": w.detach().clone() for part, m in pipeline_models(pipe).items() for n, w in m.named_parameters()}


def _layer_shapes(pipe) -> dict[str, tuple[int, ...]]:
    models = pipeline_models(pipe)
    return {name: tuple(models[part].get_submodule(path).weight.shape)
            for part, table in module_name_tables(models).items() for name, path in table.items()}


def _mixed_file(pipe, path, tmp_path):
    """Our LoHA file with one k×k conv as a LoCon module and one Linear as a LoRA module."""
    make_loha_file(pipe, tmp_path / "loha.safetensors")
    sd = load_file(tmp_path / "loha.safetensors")
    shapes = _layer_shapes(pipe)
    g = torch.Generator().manual_seed(5)
    conv = next(n for n in group_modules(sd) if n.endswith(("resnets_0_conv1", "_0_in_layers_2")))  # SDXL: LDM names
    lin = next(n for n in group_modules(sd) if n.endswith("attn1_to_q"))
    for name in (conv, lin):
        for k in [k for k in sd if k.startswith(name + ".")]:
            del sd[k]
        out, *rest = shapes[name]
        sd[f"{name}.lora_down.weight"] = torch.randn(3, *rest, generator=g) * 0.2
        sd[f"{name}.lora_up.weight"] = torch.randn(out, 3, *([1, 1] if rest[1:] else []), generator=g) * 0.2
        sd[f"{name}.alpha"] = torch.tensor(1.5)
    save_file(sd, path)
    return conv, lin


@pytest.mark.parametrize("family", ["tiny-sd1", "tiny-sdxl"])
def test_full_rank_loads_in_diffusers_with_our_merged_weights(tmp_path, tiny_pipe, family, one_thread):
    pipe = tiny_pipe(family)
    src = tmp_path / "src.safetensors"
    conv, lin = _mixed_file(pipe, src, tmp_path)
    out = tmp_path / "lora.safetensors"
    report = convert_to_lora_file(src, out, rank=FULL, model=pipe)

    written = load_file(out)
    shapes = _layer_shapes(pipe)
    for layer in report.layers:
        assert layer.rank == layer.max_rank == min(layer.shape[0], math.prod(layer.shape[1:]))
        down, up = written[f"{layer.name}.lora_down.weight"], written[f"{layer.name}.lora_up.weight"]
        if len(shapes[layer.source_name]) == 4:  # convs, 1x1 included: conv-shaped factors
            assert down.shape == (layer.rank, *shapes[layer.source_name][1:]) and up.shape == (layer.shape[0], layer.rank, 1, 1)
        else:
            assert down.dim() == 2 and up.dim() == 2
    assert any(x.shape[2:] == (1, 1) for x in report.layers) and any(x.shape[2:] == (3, 3) for x in report.layers)
    assert {conv, lin} <= {x.source_name for x in report.layers}

    apply_loha(pipe, src)
    ours = _weights(pipe)
    remove_loha(pipe)
    theirs = tiny_pipe(family)
    before = _weights(theirs)
    theirs.load_lora_weights(str(out.parent), weight_name=out.name)  # a folder + name: every diffusers version
    theirs.fuse_lora()
    theirs.unload_lora_weights()  # fused weights stay; the PEFT wrappers go
    after = _weights(theirs)
    assert after.keys() == ours.keys()
    changed = [k for k in ours if not torch.equal(ours[k], before[k])]
    assert len(changed) == len(report.layers)  # every converted layer, and only those, moved
    for k in ours:
        torch.testing.assert_close(after[k], ours[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")


def test_truncated_rank_error_matches_eckart_young_and_falls_with_rank(tmp_path, tiny_pipe, one_thread):
    pipe = tiny_pipe("tiny-sd1")
    src = tmp_path / "src.safetensors"
    make_loha_file(pipe, src)
    sd, shapes = group_modules(load_file(src)), _layer_shapes(pipe)
    deltas = {n: file_delta(t, shapes[n]) for n, t in sd.items()}
    sigmas = {n: torch.linalg.svdvals(d.reshape(d.shape[0], -1).double()) for n, d in deltas.items()}

    previous = None
    for rank in (1, 2, 4, 8):
        tensors, meta, report = loha_to_lora(src, rank=rank, model=pipe)
        alpha = float(meta["ss_network_alpha"])
        assert meta["ss_network_dim"] == str(rank) and alpha == rank  # one rank: alpha = rank, scale 1
        errors = {}
        for layer in report.layers:
            n, d = layer.name, deltas[layer.name]
            up = tensors[f"{n}.lora_up.weight"].double().reshape(d.shape[0], -1)
            down = tensors[f"{n}.lora_down.weight"].double().reshape(up.shape[1], -1)
            assert float(tensors[f"{n}.alpha"]) == alpha
            rebuilt = up @ down * (alpha / up.shape[1])
            err = float((d.reshape(rebuilt.shape).double() - rebuilt).norm() / d.norm())
            best = float(sigmas[n][rank:].norm() / sigmas[n].norm())  # Eckart–Young: the optimum at this rank
            assert layer.relative_error == pytest.approx(err, rel=1e-3, abs=1e-6)
            assert err == pytest.approx(best, rel=1e-3, abs=1e-6)
            assert layer.energy == pytest.approx(float((sigmas[n][:rank] ** 2).sum() / (sigmas[n] ** 2).sum()), rel=1e-5)
            errors[n] = (err * float(d.norm())) ** 2, float(d.norm()) ** 2
        for block, value in report.blocks.items():
            members = [x.name for x in report.layers if x.block == block]
            assert value == pytest.approx(math.sqrt(sum(errors[m][0] for m in members) / sum(errors[m][1] for m in members)),
                                          rel=1e-3)
        if previous is not None:
            assert all(x.relative_error <= previous[x.name] + 1e-6 for x in report.layers)
            assert any(x.relative_error < previous[x.name] - 1e-3 for x in report.layers)
        previous = {x.name: x.relative_error for x in report.layers}
    # The report's blocks are LoRA Block Weight's ids, each layer's the one block weights multiply it by.
    models = pipeline_models(pipe)
    paths = {name: (part, path) for part, table in module_name_tables(models).items() for name, path in table.items()}
    for layer in report.layers:
        assert layer.block == (layer_block_id(*paths[layer.source_name], pipe.unet.config) or OUTSIDE_BLOCKS)
    assert {"BASE", "M00"} <= set(report.blocks) <= {*BLOCK_IDS, OUTSIDE_BLOCKS}
    assert list(report.blocks) == sorted(report.blocks, key=BLOCK_IDS_AND_OUTSIDE.index)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_picks_the_smallest_rank_keeping_the_fraction(tmp_path, tiny_pipe, energy, one_thread):
    pipe = tiny_pipe("tiny-sd1")
    src = tmp_path / "src.safetensors"
    make_loha_file(pipe, src)
    sd, shapes = group_modules(load_file(src)), _layer_shapes(pipe)
    _, meta, report = loha_to_lora(src, energy=energy, model=pipe)
    ranks = set()
    for layer in report.layers:
        d = file_delta(sd[layer.name], shapes[layer.name])
        s2 = torch.linalg.svdvals(d.reshape(d.shape[0], -1).double()) ** 2
        kept = torch.cumsum(s2, 0) / s2.sum()
        r = layer.rank
        assert kept[r - 1] >= energy - 1e-9  # keeps at least the fraction ...
        assert r == 1 or kept[r - 2] < energy  # ... and one rank less would not
        assert layer.energy == pytest.approx(float(kept[r - 1]), rel=1e-6)
        ranks.add(r)
    assert len(ranks) > 1 and meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == str(max(ranks))


def test_choose_rank_edges():
    s = torch.tensor([3.0, 2.0, 1.0])
    assert choose_rank(s, rank=10) == 3 and choose_rank(s, rank=2) == 2
    assert choose_rank(s, energy=1.0) == 3
    assert choose_rank(s, energy=9 / 14) == 1 and choose_rank(s, energy=9 / 14 + 1e-6) == 2
    assert choose_rank(torch.zeros(4), energy=0.9) == 1  # a zero ΔW still needs a rank-1 module


def _loha_module(g, out, flat_in, rank=4):
    return {"hada_w1_a": torch.randn(out, rank, generator=g) * 0.1, "hada_w1_b": torch.randn(rank, flat_in, generator=g),
            "hada_w2_a": torch.randn(out, rank, generator=g) * 0.1, "hada_w2_b": torch.randn(rank, flat_in, generator=g),
            "alpha": torch.tensor(2.0)}


# (file name, shape in the real UNet) with flat factors only: the file alone cannot tell a Linear from a 1x1 conv.
REAL_LAYERS = {
    "sd15": ["lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
             "lora_unet_down_blocks_0_attentions_0_proj_in", "lycoris_mid_block_attentions_0_proj_out",
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"],
    "sd21": ["lora_unet_down_blocks_0_attentions_0_proj_in",
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"],
    "sdxl": ["lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_4_0_skip_connection",
             "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"],
}


@pytest.mark.parametrize("kind", sorted(REAL_LAYERS))
def test_real_architecture_from_the_file_alone(tmp_path, kind):
    from sd_loha.architectures import UNETS, meta_unet
    from sd_loha.naming import unet_module_names

    unet = meta_unet(UNETS[kind])  # the real UNet's shapes, a fresh build (not the converter's cached one)
    table = unet_module_names(unet)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in REAL_LAYERS[kind]:
        w = unet.get_submodule(table[name]).weight
        for k, v in _loha_module(g, w.shape[0], math.prod(w.shape[1:])).items():
            sd[f"{name}.{k}"] = v
    tensors, _, _ = loha_to_lora(sd, rank=FULL)
    for name in REAL_LAYERS[kind]:
        shape = tuple(unet.get_submodule(table[name]).weight.shape)
        out_name = name.replace("lycoris_", "lora_unet_")
        down, up = tensors[f"{out_name}.lora_down.weight"], tensors[f"{out_name}.lora_up.weight"]
        r = down.shape[0]
        assert down.shape == (r, *shape[1:]) and up.shape == (shape[0], r, *([1, 1] if len(shape) == 4 else []))
        params = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(name + ".")}
        expected = file_delta({f"x.{k}": v for k, v in params.items()}, shape)
        rebuilt = (up.reshape(shape[0], r) @ down.reshape(r, -1)).reshape(shape) * float(tensors[f"{out_name}.alpha"]) / r
        torch.testing.assert_close(rebuilt, expected, rtol=1e-4, atol=1e-5)
    assert _reference_layers.cache_info().currsize >= 1


def test_needs_the_model_where_the_file_does_not_say(tmp_path, tiny_pipe):
    pipe = tiny_pipe("tiny-sd1")
    src = tmp_path / "src.safetensors"
    make_loha_file(pipe, src)  # tiny-sd1 names and metadata saying SD 1.x, shapes of no real SD 1.x
    with pytest.raises(AdapterFileError, match=r"--model BASE.*lora_unet_"):
        loha_to_lora(src, rank=2)
    tucker = tmp_path / "tucker.safetensors"
    make_loha_file(pipe, tucker, use_tucker=True)
    said = {k: v for k, v in load_file(tucker).items()  # Tucker convs and text-encoder Linears say their shapes
            if k.startswith("lora_te_") or k.split(".")[0] in {n.split(".")[0] for n in load_file(tucker) if "hada_t1" in n}}
    shapes = _layer_shapes(pipe)
    tensors, _, report = loha_to_lora(said, rank=FULL)
    assert any(x.part == "unet" for x in report.layers) and any(x.part == "te" for x in report.layers)
    for layer in report.layers:
        assert layer.shape == shapes[layer.source_name]
        assert tensors[f"{layer.name}.lora_down.weight"].shape[1:] == shapes[layer.source_name][1:]


def test_dora_converts_against_the_base_weights(tmp_path, tiny_pipe, one_thread):
    pipe = tiny_pipe("tiny-sd1")
    src = tmp_path / "dora.safetensors"
    make_loha_file(pipe, src, preset="attn-only", dora_wd=True)
    with pytest.raises(AdapterFileError, match="dora_scale.*base model"):
        loha_to_lora(src, rank=FULL, model=None)
    out = tmp_path / "lora.safetensors"
    convert_to_lora_file(src, out, rank=FULL, model=pipe)
    for strength in (1.0, 0.5):  # sd-loha (like A1111 / ComfyUI) applies DoRA at s as W + s (W' - W)
        apply_loha(pipe, src, strength=strength)
        ours = _weights(pipe)
        remove_loha(pipe)
        theirs = tiny_pipe("tiny-sd1")
        theirs.load_lora_weights(str(out.parent), weight_name=out.name)  # a folder + name: every diffusers version
        theirs.fuse_lora(lora_scale=strength)
        theirs.unload_lora_weights()
        after = _weights(theirs)
        for k in ours:
            torch.testing.assert_close(after[k], ours[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of rank"), (["--rank", "2", "--energy", "0.9"], "exactly one of rank"),
    (["--rank", "0"], "rank must be"), (["--energy", "1.5"], "energy must be in"), (["--energy", "0"], "energy must be in"),
])
def test_cli_refuses_bad_targets_before_loading(tmp_path, capsys, args, message):
    src = tmp_path / "missing-is-fine.safetensors"
    code = main(["convert", str(src), "--to", "lora", "--out", str(tmp_path / "o.safetensors"), *args])
    assert code == 2 and message in capsys.readouterr().err


def test_cli_convert_prints_and_writes_the_report(tmp_path, tiny_pipe, capsys, one_thread):
    src, out = tmp_path / "src.safetensors", tmp_path / "lora.safetensors"
    make_loha_file(tiny_pipe("tiny-sd1"), src, metadata={"modelspec.title": "poster"})
    assert main(["convert", str(src), "--to", "lora", "--rank", "2", "--model", "tiny-sd1", "--dtype", "fp16",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "relative error per block" in text and "\n  M00 " in text and "\n  BASE " in text
    assert all(v.dtype == torch.float16 for v in load_file(out).values())
    assert main(["convert", str(src), "--to", "lora", "--energy", "0.9", "--model", "tiny-sd1", "--json",
                 "--out", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["target"] == "lora" and data["layers"] and 0 < data["total_relative_error"] < 1
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.title"] == "poster"
    assert "ss_network_args" not in meta and meta["sd_loha_converted_from"] == src.name
    assert main(["convert", str(src), "--to", "lora", "--rank", "2", "--out", str(tmp_path / "x.ckpt")]) == 2


def test_metadata_describes_the_lora_not_its_source(tmp_path, tiny_pipe, one_thread):
    """The source's modelspec fields about its own file (implementation, hash, date) are gone; the architecture
    says lora; what the LoRA draws (title, trigger) stays; the conversion names its source by name and hash."""
    from safetensors import safe_open

    from sd_loha.io import addnet_hash

    src, out = tmp_path / "src.safetensors", tmp_path / "lora.safetensors"
    make_loha_file(tiny_pipe("tiny-sd1"), src, metadata={
        "modelspec.title": "poster", "modelspec.trigger_phrase": "pstr", "modelspec.implementation":
        "https://github.com/KohakuBlueleaf/LyCORIS", "modelspec.hash_sha256": "0x" + "ab" * 32,
        "modelspec.date": "2024-01-01T00:00:00", "modelspec.architecture": "stable-diffusion-v1/lycoris",
        "ss_network_dim": "4", "ss_network_args": json.dumps({"algo": "loha"}), "ss_output_name": "poster"})
    assert main(["convert", str(src), "--to", "lora", "--rank", "3", "--model", "tiny-sd1", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    stale = {"modelspec.implementation", "modelspec.hash_sha256", "modelspec.date", "ss_network_args"}
    assert not stale & set(meta), stale & set(meta)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert (meta["modelspec.title"], meta["modelspec.trigger_phrase"], meta["ss_output_name"]) == ("poster", "pstr", "poster")
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "3"
    assert meta["sd_loha_converted_from"] == src.name and meta["sd_loha_converted_from_hash"] == addnet_hash(src)
    assert meta["sshs_model_hash"] == addnet_hash(out)


_PEAK_RSS = """
import sys
from sd_loha.convert import convert_to_lora_file
if sys.argv[1] == "convert":
    convert_to_lora_file(sys.argv[2], sys.argv[3], rank=2)
print(next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:")))
"""


def test_convert_holds_one_layer_delta_at_a_time(tmp_path):
    """48 text-encoder layers of 512x2048 (4 MiB of fp32 ΔW each, 192 MiB in all): converting takes far less
    than all of them at once above a process that only imports the converter. VmHWM, not ru_maxrss (Linux
    carries pytest's peak over fork and exec into a child's ru_maxrss)."""
    import os
    import subprocess
    import sys

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(48):
        name = f"lora_te_text_model_encoder_layers_{i}_mlp_fc1"
        for k in (1, 2):
            tensors[f"{name}.hada_w{k}_a"] = torch.randn(512, 2, generator=g)
            tensors[f"{name}.hada_w{k}_b"] = torch.randn(2, 2048, generator=g)
    src = tmp_path / "te.safetensors"
    save_file(tensors, src)

    def peak(mode: str) -> int:
        res = subprocess.run([sys.executable, "-c", _PEAK_RSS, mode, str(src), str(tmp_path / "lora.safetensors")],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        return int(res.stdout.split()[-1])

    all_deltas = 48 * 512 * 2048 * 4
    extra = peak("convert") - peak("import")
    assert extra < all_deltas // 3, f"converting took {extra / 2**20:.0f} MiB for {all_deltas / 2**20:.0f} MiB of ΔW"
    assert len(load_file(tmp_path / "lora.safetensors")) == 3 * 48
