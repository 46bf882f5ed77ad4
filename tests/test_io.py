"""Reading adapter files: every variant FORMAT.md lists, every kind of bad input, and atomic writing.

Bad input: each test checks the message (names the file or module and says what to do) and that the
pipeline is unchanged (every UNet / text-encoder / VAE tensor torch.equal to a snapshot).
Hand-computed deltas are compared with rtol 1e-5 / atol 1e-6 (fp32, different operation order).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sd_loha.io as sd_io
from sd_loha import (
    AdapterFileError,
    ArchitectureMismatchError,
    apply_loha,
    list_loha,
    remove_loha,
)
from sd_loha.atomic import write_text_atomic
from sd_loha.formats import load_adapter
from sd_loha.io import read_safetensors, save_safetensors_atomic

from .loader_helpers import assert_unchanged, changed, make_loha_file, snapshot

W_TOL = dict(rtol=1e-5, atol=1e-6)
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 32 -> 32 in tiny-sd1
TO_K2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 32 (text) -> 32
CONV = "down_blocks.0.resnets.0.conv1"  # Conv2d 32 -> 32, 3x3
PROJ_IN = "down_blocks.0.attentions.0.proj_in"  # Conv2d 1x1 in tiny-sd1


def kname(path: str, prefix: str = "lora_unet") -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def rand(*shape, seed=0, std=0.3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def loha_sd(name, out, flat_in, r=3, alpha=None, seed=0, **extra):
    sd = {
        f"{name}.hada_w1_a": rand(out, r, seed=seed),
        f"{name}.hada_w1_b": rand(r, flat_in, seed=seed + 1),
        f"{name}.hada_w2_a": rand(out, r, seed=seed + 2),
        f"{name}.hada_w2_b": rand(r, flat_in, seed=seed + 3),
    }
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    sd.update({f"{name}.{k}": v for k, v in extra.items()})
    return sd


def hada(sd, name):
    return (sd[f"{name}.hada_w1_a"] @ sd[f"{name}.hada_w1_b"]) * (sd[f"{name}.hada_w2_a"] @ sd[f"{name}.hada_w2_b"])


@pytest.fixture
def sd1(tiny_pipe):
    return tiny_pipe("tiny-sd1")


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    from sd_loha.models import build_tiny_pipeline

    path = tmp_path_factory.mktemp("f") / "style.safetensors"
    make_loha_file(build_tiny_pipeline("tiny-sd1"), path, seed=3)
    return path


def weight(pipe, path):
    return pipe.unet.get_submodule(path).weight


# ------------------------------------------------------------------------------------------------
# 5. reading variants
# ------------------------------------------------------------------------------------------------
def test_lycoris_prefix(tiny_pipe, sd1_file):
    sd = load_file(sd1_file)
    lyco = {("lycoris_" + k[len("lora_unet_"):] if k.startswith("lora_unet_") else k): v for k, v in sd.items()}
    assert any(k.startswith("lycoris_down_blocks_0_") for k in lyco)
    a, b = tiny_pipe("tiny-sd1"), tiny_pipe("tiny-sd1")
    ra, rb = apply_loha(a, sd1_file, strict=True), apply_loha(b, lyco, strict=True)
    assert ra.patched == rb.patched
    assert_unchanged(b, snapshot(a))


def test_missing_alpha_means_scale_one(sd1):
    name = kname(TO_Q)
    sd = loha_sd(name, 32, 32)
    w = weight(sd1, TO_Q).detach().clone()
    apply_loha(sd1, sd)
    torch.testing.assert_close(weight(sd1, TO_Q), w + hada(sd, name), **W_TOL)


def test_scale_key_overrides_alpha(sd1):
    name = kname(TO_Q)
    sd = loha_sd(name, 32, 32, r=4, alpha=2.0, scale=torch.tensor(3.0))
    w = weight(sd1, TO_Q).detach().clone()
    apply_loha(sd1, sd, strength=0.5)
    torch.testing.assert_close(weight(sd1, TO_Q), w + 0.5 * 3.0 * hada(sd, name), **W_TOL)


def test_rs_lora_alpha_times_sqrt_r(sd1):
    """rs-LoRA files store alpha·√r; alpha / r then gives the rs-LoRA scale alpha_rs / √r with no flag."""
    r, alpha_rs = 9, 1.5
    name = kname(TO_Q)
    up, down = rand(32, r, seed=1), rand(r, 32, seed=2)
    sd = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
          f"{name}.alpha": torch.tensor(alpha_rs * math.sqrt(r))}
    assert load_adapter(sd).modules[name].scale == pytest.approx(alpha_rs / math.sqrt(r))
    w = weight(sd1, TO_Q).detach().clone()
    apply_loha(sd1, sd)
    torch.testing.assert_close(weight(sd1, TO_Q), w + alpha_rs / math.sqrt(r) * (up @ down), **W_TOL)


def test_tucker_conv(tiny_pipe, tmp_path):
    pipe = tiny_pipe("tiny-sd1")
    path = tmp_path / "tucker.safetensors"
    make_loha_file(pipe, path, use_tucker=True, conv_rank=3, conv_alpha=1.5)
    sd = load_file(path)
    name = kname(CONV)
    assert sd[f"{name}.hada_t1"].shape == (3, 3, 3, 3)
    assert sd[f"{name}.hada_w1_a"].shape == (3, 32)  # (r, out): transposed in the Tucker form
    w = weight(pipe, CONV).detach().clone()
    apply_loha(pipe, path, strict=True)

    def factor(i):
        return torch.einsum("jkyx,jo,kc->ocyx", sd[f"{name}.hada_t{i}"], sd[f"{name}.hada_w{i}_a"],
                            sd[f"{name}.hada_w{i}_b"])

    torch.testing.assert_close(weight(pipe, CONV), w + 0.5 * factor(1) * factor(2), **W_TOL)


def test_flat_conv_factors_stored_4d(tiny_pipe):
    """Some trainers wrote flat k×k conv factors as 4-D tensors ((out, r, 1, 1) / (r, in, kh, kw));
    they mean the same thing as the 2-D form and must merge to the same weights."""
    name = kname(CONV)
    flat = loha_sd(name, 32, 32 * 9, r=3, alpha=1.5)
    four_d = dict(flat)
    for i in ("1", "2"):
        four_d[f"{name}.hada_w{i}_a"] = flat[f"{name}.hada_w{i}_a"].reshape(32, 3, 1, 1)
        four_d[f"{name}.hada_w{i}_b"] = flat[f"{name}.hada_w{i}_b"].reshape(3, 32, 3, 3)
    a, b = tiny_pipe("tiny-sd1"), tiny_pipe("tiny-sd1")
    base = snapshot(a)
    apply_loha(a, flat)
    apply_loha(b, four_d)
    assert changed(a, base) == [f"unet:{CONV}.weight"]
    assert_unchanged(b, snapshot(a))


def _dora_reference(w, delta, ds, axis, s):
    merged = w + delta
    if axis == "out":
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1).reshape(1, -1, *([1] * (w.dim() - 2)))
    target = merged * ds / (norm + torch.finfo(torch.float32).eps)
    return w + s * (target - w)


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_dora_scale_both_axes(tiny_pipe, axis, layer):
    path = TO_Q if layer == "linear" else CONV
    pipe = tiny_pipe("tiny-sd1")
    w = weight(pipe, path).detach().clone()
    name = kname(path)
    out, inn = w.shape[0], w.shape[1]
    ones = [1] * (w.dim() - 2)
    ds_shape = (out, 1, *ones) if axis == "out" else (1, inn, *ones)
    norm_axis = 1 if axis == "out" else 0
    base_norm = (w.reshape(out, -1).norm(dim=1).reshape(ds_shape) if axis == "out"
                 else w.transpose(0, 1).reshape(inn, -1).norm(dim=1).reshape(ds_shape))
    ds = base_norm * (1 + rand(*ds_shape, seed=9, std=0.2))
    sd = loha_sd(name, out, w[0].numel(), r=3, alpha=1.5, dora_scale=ds)
    delta = (0.5 * hada(sd, name)).reshape(w.shape)
    snap = snapshot(pipe)
    apply_loha(pipe, sd, strength=0.0)
    assert_unchanged(pipe, snap)  # DoRA at strength 0 is the base model exactly
    from sd_loha import set_loha_strength

    for s in (1.0, 0.6):
        set_loha_strength(pipe, "adapter0", s)
        torch.testing.assert_close(weight(pipe, path), _dora_reference(w, delta, ds, axis, s), **W_TOL)
    # the norm of the merged rows/columns (s=1) is dora_scale: the axis really was honoured
    set_loha_strength(pipe, "adapter0", 1.0)
    got = weight(pipe, path)
    norms = got.reshape(out, -1).norm(dim=1) if axis == "out" else got.transpose(0, 1).reshape(inn, -1).norm(dim=1)
    torch.testing.assert_close(norms, ds.flatten(), rtol=1e-5, atol=1e-5)
    assert norm_axis in (0, 1)


def test_mixed_loha_lora_locon_file(sd1):
    """One file with LoHA, plain LoRA (Linear), LoCon 3x3 conv flat, LoCon with lora_mid (Tucker)."""
    conv2 = "down_blocks.0.resnets.0.conv2"
    sd = {}
    n_loha, n_lora, n_locon, n_mid = kname(TO_Q), kname(TO_K2), kname(CONV), kname(conv2)
    sd.update(loha_sd(n_loha, 32, 32, r=2, alpha=1.0))
    sd.update({f"{n_lora}.lora_up.weight": rand(32, 4, seed=11), f"{n_lora}.lora_down.weight": rand(4, 32, seed=12),
               f"{n_lora}.alpha": torch.tensor(2.0)})
    sd.update({f"{n_locon}.lora_up.weight": rand(32, 4, 1, 1, seed=13),
               f"{n_locon}.lora_down.weight": rand(4, 32, 3, 3, seed=14), f"{n_locon}.alpha": torch.tensor(1.0)})
    sd.update({f"{n_mid}.lora_up.weight": rand(32, 4, 1, 1, seed=15), f"{n_mid}.lora_down.weight": rand(4, 32, 1, 1, seed=16),
               f"{n_mid}.lora_mid.weight": rand(4, 4, 3, 3, seed=17), f"{n_mid}.alpha": torch.tensor(4.0)})
    base = {p: weight(sd1, p).detach().clone() for p in (TO_Q, TO_K2, CONV, conv2)}
    report = apply_loha(sd1, sd, strict=True)
    assert report.total == 4
    expect = {
        TO_Q: base[TO_Q] + 0.5 * hada(sd, n_loha),
        TO_K2: base[TO_K2] + 0.5 * sd[f"{n_lora}.lora_up.weight"] @ sd[f"{n_lora}.lora_down.weight"],
        CONV: base[CONV] + 0.25 * torch.einsum("or,rcyx->ocyx", sd[f"{n_locon}.lora_up.weight"][:, :, 0, 0],
                                                sd[f"{n_locon}.lora_down.weight"]),
        conv2: base[conv2] + 1.0 * torch.einsum("oi,ijyx,jc->ocyx", sd[f"{n_mid}.lora_up.weight"][:, :, 0, 0],
                                                 sd[f"{n_mid}.lora_mid.weight"], sd[f"{n_mid}.lora_down.weight"][:, :, 0, 0]),
    }
    for p, e in expect.items():
        torch.testing.assert_close(weight(sd1, p), e, **W_TOL, msg=lambda m: f"{p}: {m}")


def test_half_precision_file(tiny_pipe, tmp_path):
    """Factors stored in fp16 / bf16 are upcast before any arithmetic: same result as the fp32 values."""
    pipe = tiny_pipe("tiny-sd1")
    p32, p16 = tmp_path / "x32.safetensors", tmp_path / "x16.safetensors"
    make_loha_file(pipe, p32, seed=4, dtype=torch.float16)
    sd16 = load_file(p32)
    assert sd16[next(k for k in sd16 if k.endswith("hada_w1_a"))].dtype == torch.float16
    save_file({k: v.float() for k, v in sd16.items()}, str(p16))
    a, b = tiny_pipe("tiny-sd1"), tiny_pipe("tiny-sd1")
    apply_loha(a, p32)
    apply_loha(b, p16)
    assert_unchanged(a, snapshot(b))


# ------------------------------------------------------------------------------------------------
# 6. bad input
# ------------------------------------------------------------------------------------------------
def _refused(pipe, source, exc=AdapterFileError, match=None, **kw) -> str:
    snap = snapshot(pipe)
    with pytest.raises(exc) as info:
        apply_loha(pipe, source, **kw)
    assert_unchanged(pipe, snap)
    assert list_loha(pipe) == {}
    msg = str(info.value)
    if match:
        for m in match if isinstance(match, (list, tuple)) else [match]:
            assert m.lower() in msg.lower(), f"{m!r} not in {msg!r}"
    return msg


def test_truncated_file(sd1, sd1_file, tmp_path):
    bad = tmp_path / "cut.safetensors"
    data = sd1_file.read_bytes()
    bad.write_bytes(data[: len(data) - 100])
    _refused(sd1, bad, match=[str(bad), "truncated", "re-download"])
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    _refused(sd1, tiny, match=[str(tiny), "re-download"])


def test_garbage_header(sd1, tmp_path):
    bad = tmp_path / "garbage.safetensors"
    junk = b"this is { not json" * 3
    bad.write_bytes(struct.pack("<Q", len(junk)) + junk + b"\0" * 64)
    _refused(sd1, bad, match=[str(bad), "not valid JSON", "corrupt"])
    huge = tmp_path / "huge_header.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**15) + b"{}")
    _refused(sd1, huge, match=[str(huge), "not a valid safetensors"])


def test_header_declaring_absurd_sizes(sd1, tmp_path):
    bad = tmp_path / "absurd.safetensors"
    name = kname(TO_Q)
    header = {f"{name}.hada_w1_a": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40000000000]},
              "__metadata__": {"ss_network_module": "lycoris.kohya"}}
    raw = json.dumps(header).encode()
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    _refused(sd1, bad, match=[str(bad), f"{name}.hada_w1_a", "re-download"])
    # shape and offsets that disagree: safetensors' own check, reported with the file and what to do
    header = {f"{name}.hada_w1_a": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    _refused(sd1, bad, match=[str(bad), "invalid shape, data type, or offset", "corrupt", "re-download"])


# Every safetensors dtype torch can hold (io.py once sized tensors from its own table, which lacked the
# unsigned and fp8 kinds, and called such valid files truncated).
EXTRA_DTYPES = [torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2, torch.int16,
                torch.bool, torch.float64]


@pytest.mark.parametrize("dtype", EXTRA_DTYPES, ids=str)
def test_files_with_any_safetensors_dtype_are_read(sd1, tmp_path, dtype):
    name = kname(TO_Q)
    sd = loha_sd(name, 32, 32, alpha=3)
    # An odd element count, so a wrong element size cannot line up with the offsets by chance.
    extra = torch.arange(7, dtype=torch.float32).to(dtype)
    path = tmp_path / "extra.safetensors"
    save_file({**sd, f"{name}.extra_tensor": extra}, str(path))
    tensors, _ = read_safetensors(path)
    assert tensors[f"{name}.extra_tensor"].dtype == dtype
    assert torch.equal(tensors[f"{name}.extra_tensor"].view(torch.uint8), extra.view(torch.uint8))
    before = weight(sd1, TO_Q).clone()
    report = apply_loha(sd1, path)  # the unknown tensor is reported, the module merged
    expected = before + 3 / 3 * hada(sd, name)
    torch.testing.assert_close(weight(sd1, TO_Q), expected, **W_TOL)
    assert report is not None
    remove_loha(sd1)

    # The same file cut short still gets the clear message.
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-3])
    msg = _refused(sd1, cut, match=[str(cut), "truncated", "re-download"])
    assert "extra_tensor" in msg or "hada" in msg  # names the tensor that runs past the end


def test_trailing_bytes_are_corrupt(sd1, tmp_path):
    path = tmp_path / "long.safetensors"
    save_file(loha_sd(kname(TO_Q), 32, 32), str(path))
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    _refused(sd1, path, match=[str(path), "corrupt", "re-download"])


class _Marker:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth", ".safetensors"])
def test_pickle_files_are_never_unpickled(sd1, tmp_path, suffix):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({"lora_unet_x.lora_up.weight": _Marker(marker)})
    probe = tmp_path / "probe"
    probe.mkdir()
    pickle.loads(pickle.dumps(_Marker(probe / "armed")))  # the payload is armed: unpickling makes a file
    assert (probe / "armed").exists()

    bad = tmp_path / f"evil{suffix}"
    bad.write_bytes(payload)
    msg = _refused(sd1, bad, match=[str(bad)])
    if suffix != ".safetensors":
        assert "pickle" in msg and ".safetensors version" in msg
    else:
        assert "not a valid safetensors" in msg
    assert not marker.exists()
    # torch.save's zip container too
    zipped = tmp_path / f"evil_zip{suffix}"
    torch.save({"x": _Marker(marker)}, zipped)
    _refused(sd1, zipped)
    assert not marker.exists()


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_values_name_the_module(sd1, tmp_path, bad_value):
    name = kname(TO_Q)
    sd = loha_sd(name, 32, 32, alpha=1.0)
    sd.update(loha_sd(kname(TO_K2), 32, 32, alpha=1.0))
    sd[f"{name}.hada_w2_b"][1, 3] = bad_value
    path = tmp_path / "diverged.safetensors"
    save_file(sd, str(path))
    _refused(sd1, path, match=[str(path), name, "NaN or Inf", "earlier checkpoint"])
    _refused(sd1, sd, match=[name, "hada_w2_b"])
    sd[f"{name}.hada_w2_b"][1, 3] = 0.0
    sd[f"{name}.alpha"] = torch.tensor(bad_value)
    _refused(sd1, sd, match=[name, "alpha"])


def test_shape_mismatch(sd1):
    name = kname(TO_Q)
    sd = loha_sd(name, 32, 33)  # rank fine, in-features 33 instead of 32
    msg = _refused(sd1, sd, ArchitectureMismatchError, match=[name, "(32, 32)", "nothing was changed"])
    assert "33" in msg
    # Only the second pair wrong: must be caught before merging too (used to fail half-way with a bare ValueError).
    sd = loha_sd(name, 32, 32)
    sd[f"{name}.hada_w2_b"] = rand(3, 31)
    _refused(sd1, sd, ArchitectureMismatchError, match=[name, "hada_w2_b (3, 31)"])
    # Tucker core with the wrong kernel size
    cname = kname(CONV)
    sd = {f"{cname}.hada_w1_a": rand(2, 32), f"{cname}.hada_w1_b": rand(2, 32), f"{cname}.hada_t1": rand(2, 2, 5, 5),
          f"{cname}.hada_w2_a": rand(2, 32), f"{cname}.hada_w2_b": rand(2, 32), f"{cname}.hada_t2": rand(2, 2, 5, 5)}
    _refused(sd1, sd, ArchitectureMismatchError, match=[cname, "hada_t1 (2, 2, 5, 5)"])
    # dora_scale of a shape that fits neither axis
    sd = loha_sd(name, 32, 32, dora_scale=torch.ones(32, 2))
    _refused(sd1, sd, ArchitectureMismatchError, match=[name, "dora_scale"])
    # LoRA with a wrong lora_mid kernel
    sd = {f"{cname}.lora_up.weight": rand(32, 2, 1, 1), f"{cname}.lora_down.weight": rand(2, 32, 1, 1),
          f"{cname}.lora_mid.weight": rand(2, 2, 1, 1)}
    _refused(sd1, sd, ArchitectureMismatchError, match=[cname, "lora_mid.weight"])


def test_sdxl_file_on_sd1_pipeline(tiny_pipe, tmp_path):
    path = tmp_path / "xl.safetensors"
    make_loha_file(tiny_pipe("tiny-sdxl"), path)
    _refused(tiny_pipe("tiny-sd1"), path, ArchitectureMismatchError, match=[str(path), "made for SDXL", "SD 1.x",
                                                                            "nothing was changed"])
    # UNet-only SDXL file: still recognised (shapes / metadata), still refused
    unet_only = tmp_path / "xl_unet.safetensors"
    make_loha_file(tiny_pipe("tiny-sdxl"), unet_only, text_encoder=False)
    _refused(tiny_pipe("tiny-sd1"), unet_only, ArchitectureMismatchError, match=["SDXL"])


def test_sd1_file_on_sdxl_pipeline(tiny_pipe, sd1_file):
    _refused(tiny_pipe("tiny-sdxl"), sd1_file, ArchitectureMismatchError,
             match=[str(sd1_file), "made for SD 1.x", "SDXL pipeline", "nothing was changed"])


def test_real_sd1_shapes_detected(sd1):
    """A file whose attn2_to_k takes 768 features (real SD 1.x text width) is reported as SD 1.x."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd = loha_sd(name, 320, 768)
    _refused(sd1, sd, ArchitectureMismatchError, match=["made for SD 1.x", name])


def test_file_without_adapter_modules(sd1, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.conv.weight": torch.zeros(2, 2)}, str(path))
    _refused(sd1, path, match=[str(path), "no LoHA", "Is this an adapter file?"])
    lokr = tmp_path / "lokr.safetensors"
    save_file({"lora_unet_x.lokr_w1": torch.zeros(2, 2), "lora_unet_x.lokr_w2": torch.zeros(2, 2)}, str(lokr))
    _refused(sd1, lokr, match=[str(lokr), "lokr_w1", "does not merge"])
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    _refused(sd1, empty, match=["no tensors"])
    _refused(sd1, tmp_path / "missing.safetensors", match=["no such file"])


def test_nothing_matches(sd1):
    sd = loha_sd("lora_unet_some_other_model_layer", 8, 8)
    _refused(sd1, sd, ArchitectureMismatchError, match=["none of its 1 modules match", "nothing was changed"])


def test_two_names_for_one_layer(sd1):
    """A diffusers-style and an LDM-style name for the same layer: ambiguous, refused (was: one silently dropped)."""
    sd = loha_sd(kname(TO_Q), 32, 32, seed=1)
    sd.update(loha_sd("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", 32, 32, seed=5))
    _refused(sd1, sd, match=["named twice", TO_Q])


def test_strict_and_not_strict(sd1, caplog):
    sd = loha_sd(kname(TO_Q), 32, 32)
    sd.update(loha_sd(kname(TO_K2), 32, 32, seed=4))
    sd.update(loha_sd("lora_unet_not_a_layer_a", 4, 4))
    sd.update(loha_sd("lora_unet_not_a_layer_b", 4, 4))
    _refused(sd1, sd, match=["2 modules match no layer", "lora_unet_not_a_layer_a", "lora_unet_not_a_layer_b",
                             "nothing was changed"], strict=True)
    snap = snapshot(sd1)
    with caplog.at_level(logging.WARNING, logger="sd_loha.merge"):
        report = apply_loha(sd1, sd, strict=False)
    assert report.total == 2 and sorted(report.unmatched) == ["lora_unet_not_a_layer_a", "lora_unet_not_a_layer_b"]
    assert "2 modules match no layer" in caplog.text
    assert sorted(changed(sd1, snap)) == sorted([f"unet:{TO_Q}.weight", f"unet:{TO_K2}.weight"])


def test_strict_refuses_unsupported_algorithms(sd1, caplog):
    sd = loha_sd(kname(TO_Q), 32, 32)
    sd.update({"lora_unet_x.lokr_w1": torch.zeros(2, 2), "lora_unet_x.lokr_w2": torch.zeros(2, 2)})
    _refused(sd1, sd, match=["algorithm sd-loha does not merge", "lora_unet_x"], strict=True)
    with caplog.at_level(logging.WARNING, logger="sd_loha.merge"):
        report = apply_loha(sd1, sd)
    assert report.unsupported == ["lora_unet_x"] and report.total == 1
    assert "does not merge" in caplog.text


def test_te_file_on_pipeline_without_that_encoder(tiny_pipe):
    sd = loha_sd("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 32, 32)
    msg = _refused(tiny_pipe("tiny-sd1"), sd, ArchitectureMismatchError, match=["made for SDXL", "CLIP-G"])
    assert "SD 1.x pipeline" in msg


def test_pipeline_without_text_encoder(tiny_pipe, sd1_file, caplog):
    """An SD 1.x file on an SD 1.x pipeline built without its text encoder: the UNet part applies, the
    text-encoder modules are unmatched (not an architecture mismatch)."""
    from diffusers import StableDiffusionPipeline

    full = tiny_pipe("tiny-sd1")
    pipe = StableDiffusionPipeline(**{**full.components, "text_encoder": None})
    _refused(pipe, sd1_file, match=["match no layer", "lora_te_text_model_encoder_layers_0"], strict=True)
    with caplog.at_level(logging.WARNING, logger="sd_loha.merge"):
        report = apply_loha(pipe, sd1_file)
    assert report.patched["unet"] > 0 and report.unmatched
    assert all(n.startswith("lora_te_") for n in report.unmatched)
    assert "match no layer" in caplog.text


def test_read_safetensors_refuses_pickle_suffix_without_opening(tmp_path, monkeypatch):
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"irrelevant")
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(AdapterFileError, match="never unpickles"):
        read_safetensors(path)


# ------------------------------------------------------------------------------------------------
# 7. atomic save
# ------------------------------------------------------------------------------------------------
def _folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("failure", ["enospc_at_fsync", "crash_in_serializer", "crash_at_rename"])
def test_atomic_save_keeps_old_file(tmp_path, monkeypatch, failure):
    target = tmp_path / "out.safetensors"
    old = {"lora_unet_a.alpha": torch.tensor(1.0)}
    save_safetensors_atomic(old, target, {"v": "1"})
    old_bytes = target.read_bytes()
    before = _folder_listing(tmp_path)

    if failure == "enospc_at_fsync":
        # The temp file has been written (the disk filled while flushing it): fsync reports ENOSPC.
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)
    elif failure == "crash_at_rename":
        def replace(src, dst):
            raise KeyboardInterrupt  # killed between writing the temp file and renaming it

        monkeypatch.setattr(os, "replace", replace)
    else:
        real = sd_io.serialize  # the module-level serializer save_safetensors_atomic calls

        def failing(tensors, *args, **kwargs):
            real(tensors, *args, **kwargs)  # do the work, then die before returning
            raise RuntimeError("killed")

        monkeypatch.setattr(sd_io, "serialize", failing)
    new = {"lora_unet_a.alpha": torch.tensor(2.0), "lora_unet_a.hada_w1_a": torch.ones(4, 4)}
    exc = {"enospc_at_fsync": OSError, "crash_in_serializer": RuntimeError, "crash_at_rename": KeyboardInterrupt}[failure]
    with pytest.raises(exc) as info:
        save_safetensors_atomic(new, target, {"v": "2"})
    if exc is OSError:
        assert info.value.errno == errno.ENOSPC
        assert str(target) in str(info.value) and "untouched" in str(info.value)
    monkeypatch.undo()
    assert target.read_bytes() == old_bytes
    assert _folder_listing(tmp_path) == before  # no temp file left behind
    tensors, meta = read_safetensors(target)
    assert meta == {"v": "1"} and float(tensors["lora_unet_a.alpha"]) == 1.0


def test_atomic_save_via_network_save(tiny_pipe, tmp_path, monkeypatch):
    """LoHANetwork.save goes through the atomic writer: a failure keeps the previous file."""
    pipe = tiny_pipe("tiny-sd1")
    target = tmp_path / "net.safetensors"
    make_loha_file(pipe, target, seed=1)
    old_bytes = target.read_bytes()

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OSError, match="No space left"):
        make_loha_file(pipe, target, seed=2)
    monkeypatch.undo()
    assert target.read_bytes() == old_bytes
    assert _folder_listing(tmp_path) == ["net.safetensors"]


def test_atomic_save_refuses_nan(tmp_path):
    target = tmp_path / "nan.safetensors"
    bad = {"lora_unet_a.hada_w1_a": torch.tensor([[1.0, float("nan")]])}
    with pytest.raises(AdapterFileError, match=r"refusing to write .*nan\.safetensors: tensor lora_unet_a.hada_w1_a"):
        save_safetensors_atomic(bad, target)
    assert not target.exists() and _folder_listing(tmp_path) == []
    bad = {"lora_unet_a.hada_w1_a": torch.tensor([[1.0, float("inf")]], dtype=torch.float16)}
    with pytest.raises(AdapterFileError, match="NaN or Inf"):
        save_safetensors_atomic(bad, target)


def test_atomic_save_file_mode(tmp_path):
    """The temp file is created 0600; the saved file must get the normal mode (was: left 0600)."""
    umask = os.umask(0o022)
    try:
        target = tmp_path / "mode.safetensors"
        save_safetensors_atomic({"a.alpha": torch.tensor(1.0)}, target)
        assert target.stat().st_mode & 0o777 == 0o644
        save_safetensors_atomic({"a.alpha": torch.tensor(2.0)}, target)  # overwriting too
        assert target.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_atomic_write_never_touches_the_process_umask(tmp_path, monkeypatch):
    """Reading the umask means setting it; two threads doing so at once (training thread, web UI worker) could
    leave it at 0 and every later file world-writable. Writes must leave it alone and still honour it."""
    calls = []
    real_umask = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
    previous = real_umask(0o027)
    try:
        target = tmp_path / "mode.safetensors"
        save_safetensors_atomic({"a.alpha": torch.tensor(1.0)}, target)
        write_text_atomic(tmp_path / "note.txt", "x")
        assert calls == []
        assert target.stat().st_mode & 0o777 == 0o640
        assert (tmp_path / "note.txt").stat().st_mode & 0o777 == 0o640
    finally:
        real_umask(previous)

