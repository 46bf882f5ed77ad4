"""The bypass path of apply_loha: adapters added in the forward (strength·ΔW·x) on layers that cannot take an exact
merge (bitsandbytes NF4 / LLM.int8 Linears, float8 layerwise casting) and on any layer with merge=False.

The reference is always the same file merged (apply_loha's merge path, tested against diffusers/PEFT and LyCORIS in
test_merge / test_dora) into an fp32 copy of the pipeline whose weights are the quantized pipeline's weights as the
library itself dequantizes them (bitsandbytes' dequantize_4bit / int8_vectorwise_dequant, float8 upcast): every
difference left is fp32 rounding, so layer outputs are compared at rtol 1e-4 / atol 1e-5 (ACT_TOL) and the change
a layer makes (its output at strength s minus at 0) at atol 1e-5 relative to changes of order 0.1-1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sd_loha import apply_loha, list_loha, remove_loha, set_loha_strength
from sd_loha.merge import BYPASS, MERGED, keep_merged

from .loader_helpers import all_models, assert_unchanged, changed, make_loha_file, quantize_unet_linears, snapshot

ACT_TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """LoHA files for tiny-sd1: full preset (Linear, 1×1 and 3×3 convs, text encoder); the same with Tucker 3×3
    convs; a LoHA + LoRA/LoCon (with a Tucker mid) file; DoRA files on each axis."""
    from sd_loha.models import build_tiny_pipeline

    d = tmp_path_factory.mktemp("bypass")
    pipe = build_tiny_pipeline("tiny-sd1")
    out = {"rows": make_loha_file(pipe, d / "a.safetensors", seed=1)}
    make_loha_file(pipe, d / "tucker.safetensors", seed=2, rank=2, alpha=1.0, conv_rank=2, conv_alpha=2.0,
                   use_tucker=True)
    make_loha_file(pipe, d / "dora_in.safetensors", seed=3, dora_wd=True, wd_on_output=False, std=0.1)
    make_loha_file(pipe, d / "dora_out.safetensors", seed=4, dora_wd=True, wd_on_output=True, std=0.1)
    _write_mixed(pipe, d / "a.safetensors", d / "mixed.safetensors")
    for name in ("a", "tucker", "dora_in", "dora_out", "mixed"):
        out[name] = d / f"{name}.safetensors"
    return out


def _write_mixed(pipe, loha_path, path) -> None:
    """Every other module of the LoHA file as a LoRA / LoCon instead (3×3 convs with a Tucker lora_mid)."""
    sd = load_file(str(loha_path))
    names = sorted({k.split(".")[0] for k in sd})
    g = torch.Generator().manual_seed(5)
    models = all_models(pipe)
    from sd_loha.model_names import ModelLayers

    layers = ModelLayers(pipe)
    for name in names[::2]:
        for k in [k for k in sd if k.startswith(name + ".")]:
            del sd[k]
        m = layers.match(name)
        w = models[m.part].get_submodule(m.path).weight
        r = 3
        if w.dim() == 4 and w.shape[-1] > 1:
            sd[f"{name}.lora_down.weight"] = torch.randn(r, w.shape[1], 1, 1, generator=g) * 0.2
            sd[f"{name}.lora_mid.weight"] = torch.randn(r, r, *w.shape[2:], generator=g) * 0.2
            sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], r, 1, 1, generator=g) * 0.2
        else:
            sd[f"{name}.lora_down.weight"] = torch.randn(r, *w.shape[1:], generator=g) * 0.2
            sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], r, *w.shape[2:], generator=g) * 0.2
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(path))


def _unet_inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    return (torch.randn(1, cfg.in_channels, 16, 16, generator=g), torch.tensor([500]),
            torch.randn(1, 7, cfg.cross_attention_dim, generator=g))


def _outputs(pipe, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(7).unsqueeze(0)
    with torch.no_grad():
        return pipe.unet(*inputs).sample, pipe.text_encoder(ids)[0]


def _library_dequantized(module: nn.Module) -> torch.Tensor:
    """The weight as bitsandbytes / torch dequantize it (not sd-loha's code)."""
    name = type(module.weight).__name__
    if name == "Params4bit":
        import bitsandbytes.functional as bnb_f

        return bnb_f.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if name == "Int8Params":
        import bitsandbytes.functional as bnb_f

        return bnb_f.int8_vectorwise_dequant(module.weight.data, module.weight.SCB).float()
    return module.weight.detach().float()


def _fp32_reference(tiny_pipe, quantized) -> object:
    """A plain fp32 tiny-sd1 whose UNet weights are the quantized UNet's, dequantized by the library."""
    ref = tiny_pipe("tiny-sd1")
    with torch.no_grad():
        for path, m in quantized.unet.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                r = ref.unet.get_submodule(path)
                r.weight.copy_(_library_dequantized(m).reshape(r.weight.shape))
                if m.bias is not None:
                    r.bias.copy_(m.bias.detach().float())
    return ref


def _quantized(tiny_pipe, kind: str):
    pipe = tiny_pipe("tiny-sd1")
    if kind == "fp8":
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    else:
        pytest.importorskip("bitsandbytes")  # an optional dependency of quantized pipelines, not of sd-loha
        assert quantize_unet_linears(pipe.unet, 4 if kind == "nf4" else 8) > 0
    return pipe


def _layer_input(module: nn.Module, g: torch.Generator) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return torch.randn(2, module.in_channels, 8, 8, generator=g)
    return torch.randn(3, module.in_features, generator=g)


KINDS = ["fp8", "nf4", "int8"]


@pytest.mark.parametrize("kind", KINDS)
def test_layer_change_is_strength_times_delta_of_the_merged_file(tiny_pipe, files, kind):
    """On each bypassed layer, output(s) − output(0) equals the same change of the file merged into the fp32 copy,
    at s = 1 and 0.6; strength 0 gives the base output exactly; no stored tensor is ever written."""
    pipe = _quantized(tiny_pipe, kind)
    ref = _fp32_reference(tiny_pipe, pipe)
    snap = snapshot(pipe)
    report = apply_loha(pipe, files["a"], strength=0.0)
    apply_loha(ref, files["a"], strength=0.0)
    bypassed = [k for k, p in report.paths.items() if p == BYPASS]
    assert bypassed and all(k[0] == "unet" for k in bypassed)
    assert all(p == MERGED for k, p in report.paths.items() if k[0] == "te")  # the plain text encoder merges
    expected = {"fp8": "float8_e4m3fn", "nf4": "bitsandbytes Linear4bit", "int8": "bitsandbytes Linear8bitLt"}[kind]
    assert any(expected in why for why in report.bypass_reasons) and "through bypass" in str(report)
    g = torch.Generator().manual_seed(0)
    models, ref_models = all_models(pipe), all_models(ref)
    xs = {k: _layer_input(models[k[0]].get_submodule(k[1]), g) for k in bypassed}
    with torch.no_grad():
        base = {k: models[k[0]].get_submodule(k[1])(x) for k, x in xs.items()}
        ref_base = {k: ref_models[k[0]].get_submodule(k[1])(x) for k, x in xs.items()}
        for s in (1.0, 0.6):
            set_loha_strength(pipe, "a", s)
            set_loha_strength(ref, "a", s)
            # instant: a number the hook reads; no tensor of a bypassed layer rewritten (plain ones are merged)
            now = snapshot(pipe)
            bypassed_tensors = [t for t in snap if any(t.startswith(f"{p}:{m}.") for p, m in bypassed)]
            assert len(bypassed_tensors) >= len(bypassed)
            assert all(torch.equal(now[t], snap[t]) for t in bypassed_tensors)
            for k, x in xs.items():
                got = models[k[0]].get_submodule(k[1])(x) - base[k]
                want = ref_models[k[0]].get_submodule(k[1])(x) - ref_base[k]
                assert want.abs().max() > 1e-3, k
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
        set_loha_strength(pipe, "a", 0.0)
        for k, x in xs.items():
            assert torch.equal(models[k[0]].get_submodule(k[1])(x), base[k]), k
    remove_loha(pipe)
    assert_unchanged(pipe, snap)


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_unet_equals_merged_fp32_copy(tiny_pipe, files, kind):
    """Whole UNet and text encoder: two stacked files (LoHA, then LoHA + LoRA/LoCon) with separate UNet / text
    encoder strengths and block weights, against the same merged into the fp32 copy; remove restores every byte."""
    pipe = _quantized(tiny_pipe, kind)
    ref = _fp32_reference(tiny_pipe, pipe)
    snap = snapshot(pipe)
    inputs = _unet_inputs(pipe)
    base = _outputs(pipe, inputs)
    for p in (pipe, ref):
        apply_loha(p, files["a"], unet_strength=0.8, text_encoder_strength=0.3)
        apply_loha(p, files["mixed"], strength=0.5, block_weights="1,0,0,0,0,0,0,0,1,1,1,1")
    got, want = _outputs(pipe, inputs), _outputs(ref, inputs)
    for g, w, b in zip(got, want, base):
        assert (w - b).abs().max() > 1e-2
        torch.testing.assert_close(g, w, **ACT_TOL)
    remove_loha(pipe, "a")
    remove_loha(ref, "a")
    torch.testing.assert_close(_outputs(pipe, inputs)[0], _outputs(ref, inputs)[0], **ACT_TOL)
    remove_loha(pipe)
    assert_unchanged(pipe, snap)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in pipe.unet.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and type(m).__module__.startswith("torch"))
    assert all(torch.equal(a, b) for a, b in zip(_outputs(pipe, inputs), base))


@pytest.mark.parametrize("name", ["a", "tucker", "mixed", "dora_in", "dora_out"])
def test_merge_false_equals_merged_on_fp32(tiny_pipe, files, name):
    """merge=False on a plain fp32 pipeline: the UNet and text encoder outputs equal the merged pipeline's to fp32
    rounding (flat and Tucker convs, LoRA/LoCon modules, DoRA on both axes), at two strengths; strength changes
    write no weight; removing leaves every tensor as it was and no hook behind."""
    merged, bypassed = tiny_pipe("tiny-sd1"), tiny_pipe("tiny-sd1")
    snap = snapshot(bypassed)
    inputs = _unet_inputs(merged)
    base = _outputs(bypassed, inputs)
    hooks_before = sum(len(m._forward_hooks) for m in bypassed.unet.modules())
    apply_loha(merged, files[name], strength=0.7)
    report = apply_loha(bypassed, files[name], strength=0.7, merge=False)
    assert set(report.paths.values()) == {BYPASS} and report.bypass_reasons == {"merge=False": report.total}
    for s in (0.7, -0.5):
        set_loha_strength(merged, name, s)
        set_loha_strength(bypassed, name, s)
        assert_unchanged(bypassed, snap)
        for g, w, b in zip(_outputs(bypassed, inputs), _outputs(merged, inputs), base):
            assert (w - b).abs().max() > 1e-3
            torch.testing.assert_close(g, w, **ACT_TOL)
    set_loha_strength(bypassed, name, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(bypassed, inputs), base))
    remove_loha(bypassed)
    assert_unchanged(bypassed, snap)
    assert sum(len(m._forward_hooks) for m in bypassed.unet.modules()) == hooks_before
    assert all(not m._forward_pre_hooks for m in bypassed.unet.modules())


@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_dora_on_quantized_layers_uses_the_dequantized_norm(tiny_pipe, files, kind):
    """DoRA rescales the whole weight by dora_scale / ‖W + ΔW‖: on quantized layers the norm is the dequantized
    weight's, so the layer outputs equal the file merged into the fp32 copy, after a LoHA on the same layers
    (stacking: the DoRA norm includes it), on both axes."""
    pipe = _quantized(tiny_pipe, kind)
    ref = _fp32_reference(tiny_pipe, pipe)
    snap = snapshot(pipe)
    inputs = _unet_inputs(pipe)
    for p in (pipe, ref):
        apply_loha(p, files["a"], strength=0.5)
        apply_loha(p, files["dora_in"], strength=0.8)
        apply_loha(p, files["dora_out"], strength=0.6)
    torch.testing.assert_close(_outputs(pipe, inputs)[0], _outputs(ref, inputs)[0], **ACT_TOL)
    for p in (pipe, ref):
        set_loha_strength(p, "a", 1.0)  # an earlier adapter's strength changes the later DoRA norms
        set_loha_strength(p, "dora_in", 0.0)
    torch.testing.assert_close(_outputs(pipe, inputs)[0], _outputs(ref, inputs)[0], **ACT_TOL)
    remove_loha(pipe)
    assert_unchanged(pipe, snap)


def test_merged_and_bypassed_adapters_stack_on_one_layer(tiny_pipe, files):
    """One file merged, another with merge=False on the same layers, then a DoRA file bypassed on top: equal to all
    three merged; list_loha knows them all; keep_merged refuses while an adapter is in the forward only."""
    mixed, ref = tiny_pipe("tiny-sd1"), tiny_pipe("tiny-sd1")
    inputs = _unet_inputs(ref)
    for p, bypass in ((mixed, True), (ref, False)):
        apply_loha(p, files["a"], strength=0.9)
        apply_loha(p, files["tucker"], strength=0.4, merge=not bypass)
        apply_loha(p, files["dora_out"], strength=0.7, merge=not bypass)
    for g, w in zip(_outputs(mixed, inputs), _outputs(ref, inputs)):
        torch.testing.assert_close(g, w, **ACT_TOL)
    set_loha_strength(mixed, "a", 0.2)  # the merged weight changes under the bypassed DoRA's norm
    set_loha_strength(ref, "a", 0.2)
    for g, w in zip(_outputs(mixed, inputs), _outputs(ref, inputs)):
        torch.testing.assert_close(g, w, **ACT_TOL)
    assert list_loha(mixed) == {"a": (0.2, 0.2), "tucker": (0.4, 0.4), "dora_out": (0.7, 0.7)}
    with pytest.raises(ValueError, match="bypass"):
        keep_merged(mixed)


def test_kr_and_delta_forms_agree(tiny_pipe, files, monkeypatch):
    """The per-call choice between U(Vx) and the full ΔW is a cost decision only: forcing each form gives the
    same outputs (both ways through flat and Tucker convs and LoRA modules)."""
    from sd_loha import ops

    pipe = tiny_pipe("tiny-sd1")
    inputs = _unet_inputs(pipe)
    apply_loha(pipe, files["mixed"], merge=False)
    apply_loha(pipe, files["tucker"], merge=False)
    outs = {}
    for path in ("kr", "delta"):
        monkeypatch.setattr(ops, "choose_path", lambda allow_merge=True, _p=path, **shape: _p)
        outs[path] = _outputs(pipe, inputs)
    for a, b in zip(outs["kr"], outs["delta"]):
        torch.testing.assert_close(a, b, **ACT_TOL)


def test_bypass_computes_in_the_layers_half_precision(tiny_pipe, files):
    """On an fp8-stored UNet computing in bf16, the hook's result is bf16 and close to the fp32 reference (the
    factors and ΔW are built in fp32 and cast once)."""
    pipe = tiny_pipe("tiny-sd1")
    ref = tiny_pipe("tiny-sd1")
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    apply_loha(pipe, files["a"])
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    ref_layer = ref.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    with torch.no_grad():
        ref_layer.weight.copy_(layer.weight.float())
    apply_loha(ref, files["a"])
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = layer(x.bfloat16())
        want = ref_layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    assert F.mse_loss(got.float(), want) < 1e-4


def test_generation_session_on_a_quantized_unet_and_with_merge_false(files):
    """GenerationSession needs nothing new for a quantized pipeline (apply_loha takes its 4-bit layers through
    bypass): strength 0 is the base image exactly, strength changes write no stored tensor; merge=False gives the
    merged session's image."""
    pytest.importorskip("bitsandbytes")
    import numpy as np

    from sd_loha.generate import AdapterSpec, GenerationSession

    gen = dict(seed=1, steps=2, width=64, height=64, scheduler="euler")
    quantized = GenerationSession("tiny-sd1", device="cpu")
    quantize_unet_linears(quantized.pipe.unet, 4)
    plain = np.asarray(quantized.generate("a poster", **gen)[0][0])
    quantized.set_adapters([AdapterSpec(str(files["a"]), 0.0)])
    assert np.array_equal(np.asarray(quantized.generate("a poster", **gen)[0][0]), plain)
    snap = snapshot(quantized.pipe)
    quantized.set_adapters([AdapterSpec(str(files["a"]), 1.0)])
    one = np.asarray(quantized.generate("a poster", **gen)[0][0])
    assert np.abs(one.astype(int) - plain.astype(int)).max() > 0
    bnb_weights = [k for k in snap if k.startswith("unet:") and snap[k].dtype == torch.uint8]
    assert bnb_weights and not set(bnb_weights) & set(changed(quantized.pipe, snap))

    merged, bypassed = GenerationSession("tiny-sd1", device="cpu"), GenerationSession("tiny-sd1", device="cpu",
                                                                                        merge=False)
    for s in (merged, bypassed):
        s.set_adapters([AdapterSpec(str(files["a"]), 0.8)])
    a, b = (np.asarray(s.generate("a poster", **gen)[0][0]).astype(int) for s in (merged, bypassed))
    assert np.abs(a - b).max() <= 1  # uint8 pixels: fp32 rounding may flip one level


def test_bench_bypass_runs_on_tiny(tmp_path):
    """bench/bench_bypass.py still runs (its timings are not asserted, only that each arm got a row)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "bench_bypass.py"), "--models", "tiny", "--rounds", "1",
                          "--threads", "1"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("| base (both adapters at strength 0) |", "| LoHA merged (strength 1) |",
                "| LoHA bypass, merge=False (strength 1) |", "Strength change"):
        assert row in out.stdout


def test_a_session_switches_an_adapter_between_merged_and_bypass(files):
    """set_adapters(merge=False) after a merged apply re-applies the file as a bypass: the stored weights are the
    base's again, bit for bit, and the picture is the merged one to fp32 rounding; and back."""
    import numpy as np

    from sd_loha.generate import AdapterSpec, GenerationSession

    gen = dict(seed=1, steps=2, width=64, height=64, scheduler="euler")
    session = GenerationSession("tiny-sd1", device="cpu")
    base = snapshot(session.pipe)
    spec = AdapterSpec(str(files["a"]), 0.8)
    session.set_adapters([spec])
    assert changed(session.pipe, base)  # merged into the weights
    merged = np.asarray(session.generate("a poster", **gen)[0][0]).astype(int)
    session.set_adapters([spec], merge=False)
    assert not changed(session.pipe, base)
    bypassed = np.asarray(session.generate("a poster", **gen)[0][0]).astype(int)
    assert np.abs(merged - bypassed).max() <= 1
    session.set_adapters([spec])  # the session's default again: merged
    assert changed(session.pipe, base)
