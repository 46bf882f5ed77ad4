"""The memory benchmark's accounting (bench/saved_memory.py, bench/bench_memory.py) and its activation table.

- The bytes saved for backward counted on the meta device equal the same count on real tensors, byte for
  byte, for a small UNet with sd-loha's LoHA layers (checkpointing on and off, bf16 and fp32, attention-only
  and full presets); and the real count equals what really stays alive after the forward (every storage the
  ops made, followed by weak references: those still alive when only the loss is held).
- ``bench_memory.py --size tiny`` runs end to end and prints each component.
- The shipped table has every row its schema promises, and batch 2 saves about twice batch 1.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import saved_memory  # noqa: E402

from sd_loha import add_loha  # noqa: E402

UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=8, sample_size=16, in_channels=4, out_channels=4)


def _unet(device: str, dtype: torch.dtype, preset: str, checkpointing: bool) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET)
    unet = unet.to(dtype).requires_grad_(False).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    add_loha(unet, preset=preset, rank=4, alpha=1, conv_rank=4 if preset == "full" else 0, text_encoder=False)
    return unet


def _step(unet, device: str, dtype: torch.dtype):
    """Forward and loss of one step, the inputs made here so that only what the graph keeps outlives it."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g).to(device, dtype)
    ctx = torch.randn(2, 7, 64, generator=g).to(device, dtype)
    target = torch.randn(2, 4, 16, 16, generator=g).to(device, dtype)
    out = unet(x, torch.tensor([10, 500], device=device), ctx).sample
    return torch.nn.functional.mse_loss(out.float(), target.float())


class _LiveStorages(TorchDispatchMode):
    """Weak references to the storage of every tensor an op returns (the ground truth of what stays alive)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.refs.setdefault(st._cdata, (StorageWeakRef(st), st.nbytes()))
        return out

    def alive_bytes(self, exclude: set[int]) -> int:
        return sum(n for key, (ref, n) in self.refs.items() if key not in exclude and not ref.expired())


CASES = [(dtype, ck, preset) for dtype in (torch.float32, torch.bfloat16) for ck in (False, True)
         for preset in ("attn-only", "full")]


class _LayerNormStats(TorchDispatchMode):
    """Storages of the mean and 1/std every layer norm returns: CPU keeps a bf16 input's in bf16, meta (like
    CUDA) in fp32, the one kernel whose saved tensors differ by device (bench/saved_memory.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: dict[int, StorageWeakRef] = {}  # a weak reference keeps the identity from being reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.native_layer_norm.default:
            self.keys.update((t.untyped_storage()._cdata, StorageWeakRef(t.untyped_storage())) for t in out[1:])
        return out


@pytest.mark.parametrize("dtype,checkpointing,preset", CASES)
def test_meta_accounting_equals_real_and_what_stays_alive(dtype, checkpointing, preset, one_thread):
    counts, stats = {}, {}
    for device in ("cpu", "meta"):
        unet = _unet(device, dtype, preset, checkpointing)
        ln = _LayerNormStats()
        with ln:
            sb = saved_memory.account(unet, lambda: _step(unet, device, dtype))
        counts[device] = sb.total
        stats[device] = sum(n for key, n in sb.kept.items() if key in ln.keys)
    assert counts["cpu"] > 0 and (stats["meta"] > 0 or checkpointing)  # checkpointed norms keep nothing
    assert counts["meta"] - stats["meta"] == counts["cpu"] - stats["cpu"]
    assert stats["meta"] == stats["cpu"] * (2 if dtype == torch.bfloat16 else 1)

    unet = _unet("cpu", dtype, preset, checkpointing)
    exclude = {t.untyped_storage()._cdata for t in list(unet.parameters()) + list(unet.buffers())}
    live = _LiveStorages()
    with live:
        loss = _step(unet, "cpu", dtype)
    assert live.alive_bytes(exclude) - loss.untyped_storage().nbytes() == counts["cpu"]
    loss.backward()  # the graph was a real one


def test_checkpointed_region_that_keeps_nothing_is_not_counted(one_thread):
    """Torch packs every checkpointed call's inputs, also those of a frozen block no gradient passes through,
    whose region (and inputs) the graph then drops: counting every packed storage would overstate."""
    unet = _unet("meta", torch.float32, "attn-only", True)
    held = {}

    def pack(t):
        held[t.untyped_storage()._cdata] = (t, t.untyped_storage().nbytes())
        return t

    params = {t.untyped_storage()._cdata for t in unet.parameters()}
    with saved_memory.fused_attention_on_meta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(unet, "meta", torch.float32)
    everything_packed = sum(n for key, (_, n) in held.items() if key not in params)
    assert everything_packed > saved_memory.saved_bytes(unet, lambda: _step(unet, "meta", torch.float32)) > 0


def test_meta_attention_saves_what_the_fused_kernel_saves():
    """On meta, plain SDPA would take the math composite (the whole attention matrix saved)."""
    sizes = {}
    for device in ("cpu", "meta"):
        q = torch.zeros(1, 2, 256, 8, device=device, requires_grad=True)
        lin = torch.nn.Linear(8, 8).to(device)
        sizes[device] = saved_memory.saved_bytes(lin, lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert sizes["meta"] == sizes["cpu"]
    q = torch.zeros(1, 2, 256, 8, device="meta", requires_grad=True)
    sb = saved_memory.SavedBytes(set())
    with torch.autograd.graph.saved_tensors_hooks(sb.pack, lambda t: t):
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    sb.settle()
    del out
    assert sb.total >= 2 * 256 * 256 * 4 > sizes["meta"]
