"""Starting from a file (`network_weights`) and resuming: the file's alpha wins over the network's.

kohya's semantics: alpha is a buffer of each module, so loading a state dict sets it, and the forward scales
by the loaded alpha / rank. A network created with alpha 4 that loads a file with alpha 2 must train, sample
and save at alpha 2; the saved file and its `ss_network_alpha` say 2.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sd_loha import add_loha
from sd_loha.io import read_safetensors
from sd_loha.models import build_tiny_pipeline
from sd_loha.train import train

from .loader_helpers import randomize
from .train.helpers import base_config, read_file

RANK, FILE_ALPHA, NET_ALPHA = 4, 2.0, 4.0
CONV_RANK, FILE_CONV_ALPHA, NET_CONV_ALPHA = 3, 1.5, 3.0


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _start_file(path, preset="attn-mlp", **kw):
    """A file of the network base_config trains (attn-mlp, rank 4) at alpha 2, random factors."""
    pipe = build_tiny_pipeline("tiny-sd1")
    net = add_loha(pipe, preset=preset, rank=RANK, alpha=FILE_ALPHA, **kw)
    randomize(net.parameters(), seed=5, std=0.1)
    net.save(path, dtype=torch.float32)
    net.remove()
    return path


def _alphas(tensors: dict[str, torch.Tensor]) -> set[float]:
    return {float(t) for k, t in tensors.items() if k.endswith(".alpha")}


def test_loaded_alpha_sets_scale_forward_save_and_metadata(tmp_path):
    start = _start_file(tmp_path / "start.safetensors", "full", conv_rank=CONV_RANK, conv_alpha=FILE_CONV_ALPHA)
    file_sd, _ = read_safetensors(start)
    pipe = build_tiny_pipeline("tiny-sd1")
    net = add_loha(pipe, preset="full", rank=RANK, alpha=NET_ALPHA, conv_rank=CONV_RANK, conv_alpha=NET_CONV_ALPHA)
    assert net.load_state_dict(file_sd, strict=True) == []

    # The forward of a Linear layer equals the formula with the file's alpha: W + (2 / 4) · H.
    m = next(m for m in net.modules if m.layer.kind == "linear")
    f = {k.rsplit(".", 1)[1]: v for k, v in file_sd.items() if k.startswith(m.key + ".")}
    h = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    x = torch.randn(2, 5, m.layer.in_dim, generator=torch.Generator().manual_seed(0))
    base = m.layer.base
    with torch.no_grad():
        torch.testing.assert_close(m.layer(x), F.linear(x, base.weight + FILE_ALPHA / RANK * h, base.bias),
                                   rtol=1e-5, atol=1e-6)
    kinds = {m.layer.kind: m.layer.scale for m in net.modules}
    assert kinds["linear"] == FILE_ALPHA / RANK and kinds["conv"] == FILE_CONV_ALPHA / CONV_RANK

    saved, meta = read_file(net.save(tmp_path / "again.safetensors", dtype=torch.float32))
    for k, t in file_sd.items():
        assert torch.equal(saved[k], t), k  # factors and alphas: the file, unchanged
    assert meta["ss_network_alpha"] == str(FILE_ALPHA)
    assert json.loads(meta["ss_network_args"])["conv_alpha"] == str(FILE_CONV_ALPHA)
    assert {r["alpha"] for r in net.listing()} == {FILE_ALPHA, FILE_CONV_ALPHA}


def test_alpha_stored_as_shape_one_loads(tmp_path):
    start = _start_file(tmp_path / "start.safetensors")
    file_sd = {k: (v.reshape(1) if k.endswith(".alpha") else v) for k, v in read_safetensors(start)[0].items()}
    net = add_loha(build_tiny_pipeline("tiny-sd1"), preset="attn-mlp", rank=RANK, alpha=NET_ALPHA)
    net.load_state_dict(file_sd)
    assert {m.layer.scale for m in net.modules} == {FILE_ALPHA / RANK}


def _run(out, resume=None, **kw):
    # lr 1e-2: two steps at another alpha end 3e-2 away (measured), far outside TOL.
    return train(base_config(out, learning_rate=1e-2, max_train_steps=2, save_every_n_steps=1, save_state=True, **kw),
                 resume=resume, progress=False)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# Same machine, same thread count: the runs are bit-identical; the bound leaves room for other BLAS builds.
TOL = 1e-6


def test_trainer_trains_and_resumes_at_the_files_alpha(tmp_path):
    start = str(_start_file(tmp_path / "start.safetensors"))
    full = _run(tmp_path / "full", network_weights=start, network_alpha=NET_ALPHA)
    a, meta = read_file(full.output)
    assert _alphas(a) == {FILE_ALPHA} and meta["ss_network_alpha"] == str(FILE_ALPHA)

    # network_alpha does not matter once a file is loaded: a run created at alpha 2 ends where this one did.
    same, _ = read_file(_run(tmp_path / "same", network_weights=start, network_alpha=FILE_ALPHA).output)
    assert _max_diff(a, same) <= TOL

    # The resumable state carries the alpha too: a resume without network_weights (network_alpha 4) finishes
    # the run as the uninterrupted one did.
    state = tmp_path / "full" / "state-00000001"
    assert _alphas(read_safetensors(state / "network.safetensors")[0]) == {FILE_ALPHA}
    c, meta = read_file(_run(tmp_path / "resumed", resume=str(state), network_alpha=NET_ALPHA).output)
    assert _alphas(c) == {FILE_ALPHA} and meta["ss_network_alpha"] == str(FILE_ALPHA)
    assert _max_diff(a, c) <= TOL
