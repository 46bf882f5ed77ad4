"""PEFT LoHa adapters against PEFT itself: adapters made by peft.LoHaConfig + save_pretrained load in apply_loha
(strict) and give PEFT's model's outputs; kohya files written as PEFT load in PeftModel.from_pretrained and give
apply_loha's outputs; kohya -> PEFT -> kohya keeps every factor and alpha."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoHaConfig, PeftModel, get_peft_model  # noqa: E402

from sd_loha import apply_loha  # noqa: E402
from sd_loha.cli import main  # noqa: E402
from sd_loha.formats import load_adapter  # noqa: E402
from sd_loha.io import AdapterFileError, read_safetensors  # noqa: E402
from sd_loha.peft_format import layer_rank_alpha, pattern_key, read_peft, write_kohya, write_peft  # noqa: E402
from tests.loader_helpers import make_loha_file  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut"]


def _randomize_peft(model: torch.nn.Module, seed: int) -> None:
    """Every LoHa factor random and non-zero (PEFT zeroes w2_b at init), large enough to move the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _peft_unet_config() -> LoHaConfig:
    return LoHaConfig(r=4, alpha=8, target_modules=UNET_TARGETS, use_effective_conv2d=True, init_weights=False,
                      rank_pattern={"attn1.to_k": 2}, alpha_pattern={"conv1": 3, "attn2.to_v": 5}, module_dropout=0.1)


def _save_peft(model: torch.nn.Module, config: LoHaConfig, folder: Path, seed: int) -> torch.nn.Module:
    """PEFT wraps a copy of `model` and saves it with its own save_pretrained; returns the adapted model."""
    wrapped = get_peft_model(copy.deepcopy(model), config)
    _randomize_peft(wrapped, seed)
    wrapped.save_pretrained(str(folder))
    return wrapped.eval()


def _unet_inputs(unet: torch.nn.Module, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    return dict(sample=torch.randn(2, c.in_channels, 16, 16, generator=g), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 7, c.cross_attention_dim, generator=g))


def _unet_out(unet: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def _ids(te: torch.nn.Module) -> torch.Tensor:
    return torch.randint(0, te.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(3))


def _te_out(te: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return te(ids).last_hidden_state


def test_pattern_key_is_peft_rule() -> None:
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:  # PEFT < 0.14 applies the same rule inline; test_peft_output_loads_in_peft checks the outcome
        pytest.skip("this PEFT has no get_pattern_key")

    patterns = {"attn1.to_k": 2, "conv1": 3, r"down_blocks\.1.*to_q": 6}
    for path in ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", "up_blocks.1.resnets.0.conv1",
                 "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.resnets.0.conv1x",
                 "x.attn2.to_k"]:
        ours = pattern_key(patterns, path)
        assert (ours if ours is not None else path) == get_pattern_key(list(patterns), path)
    assert layer_rank_alpha({"r": 4, "alpha": 8, "rank_pattern": patterns}, "up_blocks.1.resnets.0.conv1") == (3, 8.0)


@pytest.fixture(scope="module")
def peft_sd1(tmp_path_factory):
    """tiny-sd1 plus PEFT-made LoHa adapters for its UNet and text encoder, in diffusers' pipeline layout."""
    from sd_loha.models import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-sd1")
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    unet = _save_peft(pipe.unet, _peft_unet_config(), folder / "unet", seed=1)
    te_config = LoHaConfig(r=3, alpha=2, target_modules=["q_proj", "v_proj", "fc1"], init_weights=False)
    te = _save_peft(pipe.text_encoder, te_config, folder / "text_encoder", seed=2)
    return pipe, folder, unet, te


def test_peft_made_adapter_gives_peft_outputs(peft_sd1, one_thread) -> None:
    pipe, folder, peft_unet, peft_te = peft_sd1
    inputs, ids = _unet_inputs(pipe.unet), _ids(pipe.text_encoder)
    base = _unet_out(pipe.unet, inputs)
    report = apply_loha(pipe, folder, strict=True, name="peft")
    try:
        n_unet = sum(1 for n, _ in peft_unet.named_modules() if n.endswith(tuple(UNET_TARGETS)) and "base_layer" not in n
                     and hasattr(_, "hada_w1_a"))
        assert report.patched == {"unet": n_unet, "te": 3 * pipe.text_encoder.config.num_hidden_layers}
        ours, theirs = _unet_out(pipe.unet, inputs), _unet_out(peft_unet, inputs)
        assert (theirs - base).abs().max() > 0.1  # the adapter really changes the outputs
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(_te_out(pipe.text_encoder, ids), _te_out(peft_te, ids), rtol=1e-4, atol=1e-5)
    finally:
        from sd_loha import remove_loha

        remove_loha(pipe, "peft")


def test_peft_pipeline_outputs_equal(peft_sd1, one_thread) -> None:
    """The whole pipeline: ours with the adapter merged vs the same pipeline running PEFT's adapted models."""
    pipe, folder, peft_unet, peft_te = peft_sd1
    theirs_pipe = type(pipe)(**{**pipe.components, "unet": peft_unet.get_base_model(),
                                "text_encoder": peft_te.get_base_model()})
    call = dict(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="np")
    theirs = theirs_pipe(**call, generator=torch.Generator().manual_seed(0)).images
    apply_loha(pipe, folder / "unet" / "adapter_model.safetensors", strict=True, name="u")  # the file, JSON beside it
    apply_loha(pipe, folder / "text_encoder", strict=True, name="t")
    try:
        ours = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    finally:
        from sd_loha import remove_loha

        remove_loha(pipe)
    assert abs(ours - theirs).max() < 1e-4


def test_read_peft_scales_and_patterns(peft_sd1) -> None:
    """alpha / r of each module is PEFT's scaling of that layer (rank_pattern and alpha_pattern honoured)."""
    _, folder, peft_unet, _ = peft_sd1
    parsed = load_adapter(folder)
    scaling = {n.replace(".", "_"): m.scaling["default"] for n, m in peft_unet.get_base_model().named_modules()
               if hasattr(m, "scaling") and "default" in m.scaling}
    unet_modules = {n: m for n, m in parsed.modules.items() if n.startswith("lora_unet_")}
    assert len(unet_modules) == len(scaling)
    for name, mod in unet_modules.items():
        assert mod.scale == pytest.approx(scaling[name.removeprefix("lora_unet_")])
    ranks = {n: m.rank for n, m in unet_modules.items()}
    assert {r for n, r in ranks.items() if n.endswith("attn1_to_k")} == {2}
    assert {m.alpha for n, m in unet_modules.items() if n.endswith("conv1")} == {3.0}
    assert {m.alpha for n, m in unet_modules.items() if n.endswith("attn2_to_v")} == {5.0}
    assert any(m.tucker for m in unet_modules.values())  # use_effective_conv2d: Tucker 3x3 convs


def _kohya_sdxl(tmp_path: Path, pipe) -> Path:
    """A sd-loha LoHA file for tiny-sdxl (LDM UNet names, te1/te2, Tucker convs) with per-layer alphas."""
    path = tmp_path / "k.safetensors"
    make_loha_file(pipe, path, use_tucker=True, seed=4)
    tensors, meta = read_safetensors(path)
    for i, key in enumerate(sorted(k for k in tensors if k.endswith(".alpha"))):
        tensors[key] = torch.tensor(float(1 + i % 3))
    from safetensors.torch import save_file

    save_file(tensors, str(path), meta)
    return path


def _weights(pipe) -> dict[str, torch.Tensor]:
    from tests.loader_helpers import all_models

    return {f"{p}.{n}": t.detach().clone() for p, m in all_models(pipe).items() for n, t in m.state_dict().items()}


def test_kohya_peft_kohya_is_exact(tmp_path, tiny_pipe, one_thread) -> None:
    pipe = tiny_pipe("tiny-sdxl")
    src = _kohya_sdxl(tmp_path, pipe)
    written = write_peft(src, tmp_path / "peft", pipe)
    assert set(written) == {"unet", "text_encoder", "text_encoder_2"}
    back = write_kohya(tmp_path / "peft", tmp_path / "back.safetensors")
    a, b = load_adapter(src), load_adapter(back)
    assert len(a.modules) == len(b.modules)
    from sd_loha.peft_format import _by_model

    ma, mb = _by_model(a, pipe), _by_model(b, pipe)
    for attr in ma:
        assert set(ma[attr]) == set(mb[attr])
        for path, mod in ma[attr].items():
            other = mb[attr][path]
            assert other.alpha == mod.alpha and other.rank == mod.rank
            for k, v in mod.tensors.items():
                assert torch.equal(v.reshape(other.tensors[k].shape), other.tensors[k])
    # with the UNet's config the names are kohya's own too (LDM paths on SDXL): the very same file
    same = write_kohya(tmp_path / "peft", tmp_path / "same.safetensors", unet_config=pipe.unet.config)
    ta, tb = read_safetensors(src)[0], read_safetensors(same)[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k].float().reshape(tb[k].shape), tb[k].float()) for k in ta)
    # and so the merged weights are bit for bit the same
    apply_loha(pipe, src, name="a", strict=True)
    wa = _weights(pipe)
    from sd_loha import remove_loha

    remove_loha(pipe)
    apply_loha(pipe, back, name="b", strict=True)
    wb = _weights(pipe)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_peft_output_loads_in_peft(tmp_path, tiny_pipe, one_thread) -> None:
    """A kohya file written as PEFT: PEFT's own PeftModel.from_pretrained gives apply_loha's outputs."""
    pipe = tiny_pipe("tiny-sdxl")
    src = _kohya_sdxl(tmp_path, pipe)
    write_peft(src, tmp_path / "peft", pipe)
    inputs = _unet_inputs(pipe.unet)
    g = torch.Generator().manual_seed(1)
    inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=g),
                                   "time_ids": torch.randn(2, 6, generator=g)}
    theirs_unet = PeftModel.from_pretrained(copy.deepcopy(pipe.unet), str(tmp_path / "peft" / "unet")).eval()
    theirs_te2 = PeftModel.from_pretrained(copy.deepcopy(pipe.text_encoder_2), str(tmp_path / "peft" / "text_encoder_2"))
    ids = _ids(pipe.text_encoder_2)
    theirs, theirs_te = _unet_out(theirs_unet.get_base_model(), inputs), _te_out(theirs_te2.eval(), ids)
    base = _unet_out(pipe.unet, inputs)
    apply_loha(pipe, src, strict=True)
    ours = _unet_out(pipe.unet, inputs)
    assert (ours - base).abs().max() > 0.01  # the adapter moves the outputs far beyond the tolerance below
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_te_out(pipe.text_encoder_2, ids), theirs_te, rtol=1e-4, atol=1e-5)
    cfg = json.loads((tmp_path / "peft" / "unet" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOHA" and cfg["use_effective_conv2d"] and cfg["alpha_pattern"]


def test_cli_convert_both_ways(tmp_path, tiny_pipe, one_thread) -> None:
    pipe = tiny_pipe("tiny-sd1")
    src = tmp_path / "k.safetensors"
    make_loha_file(pipe, src, seed=5)
    assert main(["convert", str(src), "--to", "peft", "--model", "tiny-sd1", "--out", str(tmp_path / "p")]) == 0
    assert main(["convert", str(tmp_path / "p"), "--to", "kohya", "--out", str(tmp_path / "b.safetensors")]) == 0
    a, b = read_safetensors(src)[0], read_safetensors(tmp_path / "b.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)
    # without --model the real SD 1.x architecture (meta device) names the layers: the same folder
    assert main(["convert", str(src), "--to", "peft", "--out", str(tmp_path / "q")]) == 0
    for part in ("unet", "text_encoder"):
        p = read_safetensors(tmp_path / "p" / part / "adapter_model.safetensors")[0]
        q = read_safetensors(tmp_path / "q" / part / "adapter_model.safetensors")[0]
        assert p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p), part


def test_refusals(tmp_path, peft_sd1) -> None:
    _, folder, _, _ = peft_sd1
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterFileError, match="PEFT LORA adapter.*load_lora_weights"):
        read_peft(lora)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((folder / "unet" / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((folder / "unet" / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {}}))
    with pytest.raises(AdapterFileError, match="rank 2 in the weights but 4"):
        read_peft(bad)


def test_kohya_file_beside_a_peft_adapter_is_kohya(tmp_path, tiny_pipe, one_thread) -> None:
    """Hub repos often ship a kohya file and a PEFT adapter in one folder: the kohya file still loads as kohya,
    changing the weights exactly as it does alone; PEFT's own file there is PEFT."""
    pipe = tiny_pipe("tiny-sd1")
    alone = tmp_path / "alone" / "style.safetensors"
    alone.parent.mkdir()
    make_loha_file(pipe, alone, seed=3)
    base = _weights(pipe)
    apply_loha(pipe, alone, name="alone", strict=True)
    want = _weights(pipe)
    from sd_loha import remove_loha

    remove_loha(pipe)
    write_peft(alone, tmp_path / "peft", pipe)
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (repo / f).write_bytes((tmp_path / "peft" / "unet" / f).read_bytes())
    kohya = repo / "style.safetensors"
    kohya.write_bytes(alone.read_bytes())
    apply_loha(pipe, kohya, name="beside", strict=True)
    got = _weights(pipe)
    assert any(not torch.equal(base[k], want[k]) for k in base)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert load_adapter(kohya).metadata.get("sd_loha_source_format") != "peft"
    assert load_adapter(repo / "adapter_model.safetensors").metadata["sd_loha_source_format"] == "peft"


def test_convert_into_a_used_folder_replaces_it_whole(tmp_path, tiny_pipe, one_thread) -> None:
    """Converting a UNet-only file into a folder that holds an earlier conversion leaves no text_encoder/ of the
    old adapter behind for read_peft to merge with the new one."""
    pipe = tiny_pipe("tiny-sd1")
    full = tmp_path / "full.safetensors"
    make_loha_file(pipe, full, seed=1)
    tensors, meta = read_safetensors(full)
    unet_only = tmp_path / "unet_only.safetensors"
    from safetensors.torch import save_file

    save_file({k: v for k, v in tensors.items() if k.startswith("lora_unet_")}, str(unet_only), meta)
    out = tmp_path / "out"
    assert main(["convert", str(full), "--to", "peft", "--model", "tiny-sd1", "--out", str(out)]) == 0
    assert (out / "text_encoder" / "adapter_config.json").is_file()
    assert main(["convert", str(unet_only), "--to", "peft", "--model", "tiny-sd1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["unet"]
    state, _ = read_peft(out)
    assert state and all(k.startswith("lora_unet_") for k in state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.safetensors", "out", "unet_only.safetensors"]


def test_convert_to_peft_refuses_a_folder_of_other_files(tmp_path, tiny_pipe, capsys) -> None:
    pipe = tiny_pipe("tiny-sd1")
    src = tmp_path / "k.safetensors"
    make_loha_file(pipe, src, seed=1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["convert", str(src), "--to", "peft", "--model", "tiny-sd1", "--out", str(busy)]) == 2
    assert "other files" in capsys.readouterr().err and (busy / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("to, extra", [("peft", ["--rank", "4"]), ("peft", ["--energy", "0.9"]), ("peft", ["--dtype", "fp16"]),
                                       ("kohya", ["--dtype", "bf16"]), ("kohya", ["--rank", "2", "--energy", "0.5"])])
def test_cli_convert_refuses_lora_options_for_peft_and_kohya(to, extra, tmp_path, capsys) -> None:
    """--rank/--energy/--dtype shape a LoRA; peft/kohya copy the factors, so giving them is a mistake, not a no-op."""
    out = tmp_path / ("o" if to == "peft" else "o.safetensors")
    assert main(["convert", str(tmp_path / "src.safetensors"), "--to", to, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "for --to lora only" in err and all(opt in err for opt in extra if opt.startswith("--"))
    assert not out.exists()
