"""Load: many apply / set-strength / remove cycles on one pipeline leave it bit-identical, with flat memory."""

import gc
import os

import pytest
import torch

from sd_loha import add_loha, apply_loha, list_loha, remove_loha, set_loha_strength


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _adapter(tiny_pipe, tmp_path, seed, name):
    pipe = tiny_pipe("tiny-sd1")
    net = add_loha(pipe, preset="attn-mlp", rank=4, alpha=2.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path / f"{name}.safetensors"
    net.save(path)
    return path


@pytest.mark.soak
def test_200_cycles_bit_identical_and_memory_flat(tiny_pipe, tmp_path):
    dtype = torch.float16  # half precision is where subtract-to-change-strength drifts
    a = _adapter(tiny_pipe, tmp_path, 0, "a")
    b = _adapter(tiny_pipe, tmp_path, 1, "b")
    pipe = tiny_pipe("tiny-sd1").to(dtype=dtype)
    original = {k: v.clone() for m in (pipe.unet, pipe.text_encoder) for k, v in m.state_dict().items()}
    original_ptrs = {k: v.data_ptr() for m in (pipe.unet, pipe.text_encoder) for k, v in m.state_dict().items()}

    rss = []
    for i in range(200):
        apply_loha(pipe, a, strength=0.7)
        apply_loha(pipe, b, unet_strength=-0.4, text_encoder_strength=0.2)
        set_loha_strength(pipe, "a", (i % 7) / 3.0)
        set_loha_strength(pipe, "b", unet_strength=0.9)
        remove_loha(pipe, "a" if i % 2 else "b")
        remove_loha(pipe)
        assert list_loha(pipe) == {}
        if i in (19, 199):
            gc.collect()
            rss.append(_rss_mb())

    state = {k: v for m in (pipe.unet, pipe.text_encoder) for k, v in m.state_dict().items()}
    for k, v in original.items():
        assert torch.equal(state[k], v), k
        assert state[k].data_ptr() == original_ptrs[k], f"{k}: weights were replaced, not restored in place"
    assert rss[1] - rss[0] < 25, f"memory grew {rss[1] - rss[0]:.1f} MB over 180 cycles"
