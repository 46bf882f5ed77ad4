"""The memory benchmark's accounting (bench/saved_memory.py, bench/bench_memory.py) and its activation table.

- The bytes saved for backward counted on the meta device equal the same count on real tensors, byte for
  byte, for a small UNet with sd-loha's LoHA layers (checkpointing on and off, bf16 and fp32, attention-only
  and full presets); and the real count equals what really stays alive after the forward (every storage the
  ops made, followed by weak references: those still alive when only the loss is held).
- ``bench_memory.py --size tiny`` runs end to end and prints each component.
- The shipped table has every row its schema promises, and batch 2 saves about twice batch 1 (at most twice:
  some layers keep weight-sized adapter deltas, which do not grow with the batch).
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


def _unet(device: str, dtype: torch.dtype, preset: str, checkpointing: bool, storage: str = "auto") -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    from sd_loha.train.lowmem import checkpointing_func, store_frozen_base

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET)
    unet = unet.to(dtype).requires_grad_(False).train()
    store_frozen_base(unet, storage, dtype)
    if checkpointing:
        custom = checkpointing_func(storage)
        unet.enable_gradient_checkpointing(*([custom] if custom is not None else []))
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


CASES = [(dtype, ck, preset, "auto") for dtype in (torch.float32, torch.bfloat16) for ck in (False, True)
         for preset in ("attn-only", "full")]
# fp8 layerwise casting swaps each layer's weight storage around its forward: the cast copies that saved views
# keep alive count, and a freed fp8 storage must not hand its identity to one of them
CASES += [(torch.bfloat16, ck, "full", "fp8") for ck in (False, True)]


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


@pytest.mark.parametrize("dtype,checkpointing,preset,storage", CASES)
def test_meta_accounting_equals_real_and_what_stays_alive(dtype, checkpointing, preset, storage, one_thread):
    counts, stats = {}, {}
    for device in ("cpu", "meta"):
        unet = _unet(device, dtype, preset, checkpointing, storage)
        ln = _LayerNormStats()
        with ln:
            sb = saved_memory.account(unet, lambda: _step(unet, device, dtype))
        counts[device] = sb.total
        stats[device] = sum(n for key, n in sb.kept.items() if key in ln.keys)
    assert counts["cpu"] > 0 and (stats["meta"] > 0 or checkpointing)  # checkpointed norms keep nothing
    assert counts["meta"] - stats["meta"] == counts["cpu"] - stats["cpu"]
    assert stats["meta"] == stats["cpu"] * (2 if dtype == torch.bfloat16 else 1)

    unet = _unet("cpu", dtype, preset, checkpointing, storage)

    pins = []  # weak references: a freed fp8 storage's identity is not handed to a later one

    def weights() -> set[int]:
        storages = [t.untyped_storage() for t in list(unet.parameters()) + list(unet.buffers())]
        pins.extend(StorageWeakRef(st) for st in storages)
        return {st._cdata for st in storages}

    exclude = weights()
    live = _LiveStorages()
    with live:
        loss = _step(unet, "cpu", dtype)
    exclude |= weights()  # fp8: the storages the layers went back to after their forward
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


@pytest.mark.slow  # 40-70 s on 2 shared cores: a real forward per storage and adapter, imports of three libraries
def test_bench_tiny_prints_every_component(tmp_path):
    out_json = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_memory.py"), "--size", "tiny", "--storages", "bf16,nf4",
           "--variants", "sd-loha,peft-lora", "--json", str(out_json)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    table = re.findall(r"^\| (bf16|nf4) \| (sd-loha|peft-lora) \| (.*) \|$", res.stdout, re.M)
    assert sorted((s, v) for s, v, _ in table) == [("bf16", "peft-lora"), ("bf16", "sd-loha"),
                                                    ("nf4", "peft-lora"), ("nf4", "sd-loha")]
    rows = {(r["storage"], r["variant"]): r for r in json.loads(out_json.read_text())}
    for (storage, variant), r in rows.items():
        assert "error" not in r, r
        assert r["gradients"] == r["adapter"] > 0 and r["optimizer"] == 2 * r["adapter"]  # AdamW: two fp32 moments
        assert r["saved"] > 0
    # nf4 packs two weights a byte (plus per-block scales): its Linear weights take about a quarter of bf16's
    bf16, nf4 = rows[("bf16", "sd-loha")]["base"], rows[("nf4", "sd-loha")]["base"]
    assert set(bf16) == {"bf16"} and {"nf4 packed", "nf4 state"} <= set(nf4)
    assert nf4["nf4 packed"] < 0.3 * (bf16["bf16"] - nf4["bf16"])
    # bf16: the meta count is the real one (checkpointed layer norms keep nothing, so no kernel differs)
    assert rows[("bf16", "sd-loha")]["saved"] == rows[("bf16", "sd-loha")]["saved (real)"]
    assert rows[("nf4", "sd-loha")]["saved (real)"] > 0
    # equal parameter counts by construction (LoRA r16 vs LoHA 2x r8)
    assert rows[("bf16", "sd-loha")]["adapter"] == rows[("bf16", "peft-lora")]["adapter"]


def _table() -> dict:
    return json.loads((ROOT / "sd_loha" / "assets" / "activation_memory.json").read_text())


def test_table_has_every_promised_row():
    table = _table()
    assert table["measured_by"] == "python bench/bench_memory.py --table"
    assert {"torch", "diffusers", "adapter"} <= set(table)
    keys = {(r["family"], r["preset"], r["width"], r["height"], r["batch"], r["checkpointing"], r["element_bytes"])
            for r in table["rows"]}
    assert len(keys) == len(table["rows"])  # no duplicates
    sizes = {"sd1": (512, 768, 1024), "sd2": (512, 768, 1024), "sdxl": (512, 768, 1024, 1280)}
    for family, sides in sizes.items():
        for preset in ("attn-only", "attn-mlp", "full"):
            for side in sides:
                for batch in (1, 2):
                    for ck in (True, False):
                        for eb in (2, 4):
                            assert (family, preset, side, side, batch, ck, eb) in keys
    for r in table["rows"]:
        assert isinstance(r["saved_bytes"], int) and r["saved_bytes"] > 0


def test_table_batch_two_is_about_twice_batch_one():
    """1.8-2x: sd_loha.train.memory takes the part that does not grow with the batch from the two rows."""
    rows = _table()["rows"]
    one = {(r["family"], r["preset"], r["width"], r["checkpointing"], r["element_bytes"]): r["saved_bytes"]
           for r in rows if r["batch"] == 1}
    for r in rows:
        if r["batch"] == 2:
            ratio = r["saved_bytes"] / one[(r["family"], r["preset"], r["width"], r["checkpointing"], r["element_bytes"])]
            assert 1.8 < ratio <= 2.0, (r, ratio)


def test_table_grows_with_what_should_grow():
    rows = {(r["family"], r["preset"], r["width"], r["batch"], r["checkpointing"], r["element_bytes"]): r["saved_bytes"]
            for r in _table()["rows"]}
    for (family, preset, side, batch, ck, eb), n in rows.items():
        assert n > rows.get((family, preset, side, batch, True, eb), 0) or ck  # checkpointing saves memory
        assert eb == 2 or n > rows[(family, preset, side, batch, ck, 2)]  # fp32 keeps more than bf16
        assert preset == "attn-only" or n >= rows[(family, "attn-only", side, batch, ck, eb)]

