"""dora_wd / wd_on_output / use_scalar through the trainer and through a network's file round trip (a use_scalar
layer's file hada_w1_a is the product hada_w1_a · scalar that LyCORIS writes, so loading goes through
``LoHALayer.load_factors``)."""

from __future__ import annotations

import json

import torch

from sd_loha import add_loha, apply_loha
from sd_loha.models import build_tiny_pipeline
from sd_loha.train import train
from tests.train.helpers import base_config, read_file


def test_train_run_with_dora_wd_and_use_scalar(tmp_path):
    """A short train() run with the options on: every module of the file carries an input-column dora_scale
    (wd_on_output = false by default), no scalar key, and the file loads strictly and changes the model."""
    result = train(base_config(tmp_path / "out", dora_wd=True, use_scalar=True, max_train_steps=2,
                               preset="attn-only", train_text_encoder=False), progress=False)
    tensors, meta = read_file(result.output)
    modules = {k.split(".")[0] for k in tensors}
    ds = {k: v for k, v in tensors.items() if k.endswith(".dora_scale")}
    assert len(ds) == len(modules) and all(v.shape[0] == 1 for v in ds.values())
    assert not any("scalar" in k for k in tensors)
    args = json.loads(meta["ss_network_args"])  # LyCORIS's network_args, as kohya's metadata records them
    assert (args["dora_wd"], args["wd_on_output"], args["use_scalar"]) == ("True", "False", "True")
    pipe, base = build_tiny_pipeline("tiny-sd1"), build_tiny_pipeline("tiny-sd1")
    report = apply_loha(pipe, result.output, strict=True)
    assert report.unmatched == [] and report.total == len(modules)
    assert any(not torch.equal(a, b) for a, b in zip(base.unet.state_dict().values(), pipe.unet.state_dict().values()))


def test_network_file_round_trip_with_use_scalar(tmp_path):
    """network_weights / resume: a saved use_scalar + DoRA network loads into a fresh one with the same outputs."""
    pipe = build_tiny_pipeline("tiny-sd1")
    net = add_loha(pipe, preset="attn-only", rank=2, alpha=1.0, text_encoder=False, dora_wd=True, use_scalar=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    path = net.save(tmp_path / "a.safetensors", dtype=torch.float32)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    cond = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = pipe.unet(x, t, cond).sample
    fresh = build_tiny_pipeline("tiny-sd1")
    net2 = add_loha(fresh, preset="attn-only", rank=2, alpha=1.0, text_encoder=False, dora_wd=True, use_scalar=True)
    net2.load_state_dict(read_file(path)[0])
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(x, t, cond).sample, want, rtol=1e-4, atol=1e-5)


def test_resume_with_dora_wd_and_use_scalar_equals_the_uninterrupted_run(tmp_path):
    """The resumable state holds the raw tensors (w1_a and the scalar apart, dora_scale), not the file's product,
    so AdamW's moments still fit their parameters and a resumed run ends where the uninterrupted one does."""
    kw = dict(max_train_steps=4, train_batch_size=4, save_every_n_steps=2, save_state=True, dora_wd=True,
              use_scalar=True, preset="attn-only", train_text_encoder=False, lr_scheduler="cosine")
    full = train(base_config(tmp_path / "full", **kw), progress=False)
    state = tmp_path / "full" / "state-00000002"
    raw = read_file(state / "network.safetensors")[0]
    assert any(k.endswith(".scalar") for k in raw) and any(k.endswith(".dora_scale") for k in raw)
    resumed = train(base_config(tmp_path / "resumed", **kw), resume=str(state), progress=False)
    a, b = read_file(full.output)[0], read_file(resumed.output)[0]
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-6
