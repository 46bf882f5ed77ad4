"""Bytes autograd keeps between a forward and its backward, on real tensors or on the meta device.

The activation memory a training step holds at the end of its forward: every tensor the graph keeps for the
backward, counted once per storage (two views of one buffer are one allocation), parameters and buffers of
the model left out (they are resident anyway and counted as weights). What is counted:

- each tensor an autograd node saves (``torch.autograd.graph.saved_tensors_hooks`` sees it as it is
  packed) that is still alive when the forward has returned. Storages are told apart by
  ``untyped_storage()._cdata`` under a weak reference (on the meta device ``data_ptr()`` is 0 for every
  tensor, and a freed storage's address could be reused);
- with non-reentrant gradient checkpointing, the tensor arguments of each checkpointed call still alive when
  the forward has returned. Torch's checkpoint keeps them for the recomputation as long as the graph holds a
  placeholder saved inside the region (inside, its own hooks replace the outer ones and keep nothing else);
  a region that saved nothing (a frozen block no gradient passes through) keeps nothing. Torch 2.13 packs
  these arguments through the outer hooks (``_CheckpointFrame.save_inputs``) even for regions that keep
  nothing, hence "still alive"; older versions keep them in a closure the hooks never see, so
  :func:`counting_checkpoint_inputs` also follows the arguments of each module's
  ``_gradient_checkpointing_func`` (diffusers' default or a custom one). The CPU RNG state each region
  stashes (a few KB) is not counted.

Not counted: temporaries that die inside the forward, the recomputed activations that live during the
backward of one checkpointed block, gradients, and allocator rounding. The number is the activation memory resident
between forward and backward, the part of a step's peak that grows with resolution and batch.

Meta device: a forward on meta tensors runs every op's shape function and no arithmetic (seconds for SDXL at
1024 px), and autograd records and saves the same tensors as on real ones, with one exception this module
corrects: ``F.scaled_dot_product_attention`` picks its kernel by device, and on meta it falls back to the math
composite (which saves the whole attention matrix, in fp32). :func:`fused_attention_on_meta` routes meta
attention to the fused CPU flash kernel's op, which has a meta implementation and saves what fused kernels
save (q, k, v, the output and the per-row log-sum-exp: what a real CPU step saves; CUDA's flash kernel saves
the same plus two RNG scalars). One kernel differs by device and is left as it is: CPU's layer norm keeps
the mean and 1/std of a bf16 input in bf16, CUDA's and meta's in fp32 (4 bytes more per token and layer
norm; the meta count is CUDA's). Autocast does not apply to meta tensors: an accounting on meta runs the model
in its own dtype without autocast (tests/test_bench_memory.py checks meta == real, byte for byte).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode


class SavedBytes:
    """Unique storages kept for backward; ``exclude``: storages (``_cdata``) of parameters and buffers.

    Each tensor seen (packed by autograd, or an argument of a checkpointed call) is followed by a weak
    reference to its storage, which keeps the storage's identity from being reused by a later allocation
    without keeping its memory; :meth:`settle`, called while the forward's output (the graph) is still held,
    counts those still alive: what the graph really keeps, not what it saw once."""

    def __init__(self, exclude: set[int], exclude_tensors: set[int] | None = None) -> None:
        self.exclude, self.exclude_tensors = exclude, exclude_tensors or set()
        self.kept: dict[int, int] = {}  # storage identity -> bytes, filled by settle()
        self._followed: dict[int, tuple[StorageWeakRef, int]] = {}
        self._pins: list[StorageWeakRef] = []

    def follow(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t._cdata in self.exclude_tensors:
            return
        st = t.untyped_storage()
        key = st._cdata
        if key not in self.exclude:
            old = self._followed.get(key)
            self._followed[key] = (old[0] if old else StorageWeakRef(st), max(st.nbytes(), old[1] if old else 0))

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.follow(t)
        return t

    def settle(self) -> None:
        for key, (ref, n) in self._followed.items():
            if not ref.expired():
                self.kept[key] = max(n, self.kept.get(key, 0))

    @property
    def total(self) -> int:
        return sum(self.kept.values())

    @classmethod
    def for_model(cls, model: nn.Module) -> "SavedBytes":
        """Parameters and buffers left out by their storage and, for a parameter whose storage a hook swaps
        around its forward (fp8 layerwise casting), by the tensor itself: a saved parameter keeps whatever
        storage it has, a saved view of the cast copy keeps the copy. The storages left out are pinned by weak
        references too: one that the swap frees would otherwise hand its identity to a later allocation (a
        cast copy), which would then be left out as well."""
        tensors = list(model.parameters()) + list(model.buffers())
        sb = cls({t.untyped_storage()._cdata for t in tensors}, {t._cdata for t in tensors})
        sb._pins = [StorageWeakRef(t.untyped_storage()) for t in tensors]
        return sb


@contextlib.contextmanager
def counting_checkpoint_inputs(model: nn.Module, sb: SavedBytes) -> Iterator[None]:
    """While active, every module's gradient-checkpointing function also counts its tensor arguments."""
    patched = []
    for m in model.modules():
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if fn is None or not getattr(m, "gradient_checkpointing", False):
            continue

        def counted(*args: Any, _fn: Callable[..., Any] = fn, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                for a in list(args[1:]) + list(kwargs.values()):
                    sb.follow(a)
            return _fn(*args, **kwargs)

        m._gradient_checkpointing_func = counted
        patched.append((m, fn))
    try:
        yield
    finally:
        for m, fn in patched:
            m._gradient_checkpointing_func = fn


class fused_attention_on_meta(TorchFunctionMode):
    """Meta-device attention through the fused CPU flash kernel's op (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].device.type == "meta":
            return _flash_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa:
        raise NotImplementedError("meta accounting: grouped-query attention")
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    return out[0]


def account(model: nn.Module, run: Callable[[], Any]) -> SavedBytes:
    """What ``run()`` (a forward returning what the backward would start from) keeps for backward, on
    whatever device the model and ``run``'s inputs are; nothing is back-propagated."""
    sb = SavedBytes.for_model(model)
    with counting_checkpoint_inputs(model, sb), fused_attention_on_meta(), \
            torch.autograd.graph.saved_tensors_hooks(sb.pack, lambda t: t):
        out = run()
    sb.settle()
    del out
    return sb


def saved_bytes(model: nn.Module, run: Callable[[], Any]) -> int:
    """Bytes :func:`account` counts."""
    return account(model, run).total
