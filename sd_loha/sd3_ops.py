"""Exact tensor moves between SD3's two layouts (sd_loha.sd3_names): fused qkv <-> split q/k/v, swapped halves.

Pure functions on io.AdapterModule; nothing here touches a model.

* Rows of ΔW are rows of the "A" factors: LoHA's ΔW = s·(A1 B1) ⊙ (A2 B2) has rows (A1[i] B1) ⊙ (A2[i] B2),
  LoRA's s·U D rows U[i] D. So a fused qkv module splits **exactly** onto q, k and v by slicing the rows of
  hada_w1_a and hada_w2_a (lora_up), sharing the B factors (lora_down), alpha and rank (:func:`slice_rows`).
  An output-row dora_scale is one number per row: it is sliced too. An input-column dora_scale divides by the
  norm of a column over *all* of q, k and v (and their base weights), so no per-slice module reproduces it: the
  exact per-layer change then needs the base weights (:func:`dense_deltas`).
* Three split modules fuse into one only at rank r_q + r_k + r_v (:func:`fuse_rows`): B factors stacked,
  A factors block-diagonal, for *both* Hadamard halves: row i of slice j is then (A1_j[i] B1_j) ⊙ (A2_j[i] B2_j),
  slice j's own product, while the other slices' B blocks meet zeros. A shared B with block A in one half only
  would mix slices in the other half. Each slice's alpha/r is folded into its A1 block, exactly.
* Exchanging ΔW's row halves (the two adaLN layers, :func:`swap_halves`) is exchanging the A factors' row halves;
  an output-row dora_scale swaps with them, an input-column one is a norm over all rows and stays.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .bypass import full_delta
from .io import AdapterModule
from .ops import apply_dora
from .sd3_names import Target

__all__ = ["ROW_FACTORS", "DenseSplitNeeded", "dora_axis", "slice_rows", "split_rows", "swap_halves", "fuse_rows",
           "dense_deltas"]

# Factors whose rows are ΔW's output rows; every other tensor of a module is shared by all rows.
ROW_FACTORS = ("hada_w1_a", "hada_w2_a", "lora_up.weight")


class DenseSplitNeeded(ValueError):
    """A fused module no per-slice module reproduces exactly (an input-column dora_scale): use dense_deltas."""


def _row_axis(mod: AdapterModule, key: str) -> int:
    # Tucker LoHA stores hada_w_a transposed, (r, out).
    return 1 if (mod.tucker and key.startswith("hada_")) else 0


def dora_axis(mod: AdapterModule) -> str | None:
    """"out" (one magnitude per output row), "in" (per input column) or None (no DoRA), from dora_scale's shape."""
    ds = mod.dora_scale
    if ds is None:
        return None
    if ds.dim() >= 2 and ds.shape[0] == 1 and mod.out_features() != 1:
        return "in"
    return "out"


def _with(mod: AdapterModule, name: str, tensors: dict[str, torch.Tensor], dora: torch.Tensor | None,
          alpha: float | None = None, scale: float | None = None) -> AdapterModule:
    return AdapterModule(name=name, algo=mod.algo, tensors=tensors, alpha=mod.alpha if alpha is None else alpha,
                         scale_override=mod.scale_override if scale is None else scale, dora_scale=dora)


def slice_rows(mod: AdapterModule, start: int, stop: int, name: str | None = None) -> AdapterModule:
    """The module whose ΔW is rows [start, stop) of `mod`'s, exactly: the A factors' rows, everything else shared
    (same rank and alpha). Raises DenseSplitNeeded for an input-column dora_scale on fewer than all rows."""
    if start == 0 and stop == mod.out_features():
        return _with(mod, name or mod.name, dict(mod.tensors), mod.dora_scale)
    if dora_axis(mod) == "in":
        raise DenseSplitNeeded(
            f"{mod.name}: its dora_scale is per input column, a norm over all the rows being split, so no module "
            "on a slice of them reproduces it; take the exact per-layer change from the base weights (dense_deltas)")
    tensors = {k: (v.narrow(_row_axis(mod, k), start, stop - start) if k in ROW_FACTORS else v)
               for k, v in mod.tensors.items()}
    dora = None if mod.dora_scale is None else mod.dora_scale[start:stop]
    return _with(mod, name or mod.name, tensors, dora)


def split_rows(mod: AdapterModule, targets: Sequence[Target], names: Sequence[str] | None = None) -> list[AdapterModule]:
    """One module per target (a fused qkv onto q, k, v), each exact (:func:`slice_rows`), halves swapped where the
    target says so (:func:`swap_halves`)."""
    out = []
    for i, t in enumerate(targets):
        part = slice_rows(mod, t.start, t.stop, names[i] if names else None)
        out.append(swap_halves(part) if t.swap_halves else part)
    return out


def _swap_dim(t: torch.Tensor, dim: int) -> torch.Tensor:
    n = t.shape[dim]
    if n % 2:
        raise ValueError(f"cannot swap the halves of {n} rows (an odd count)")
    first, second = t.split(n // 2, dim=dim)
    return torch.cat([second, first], dim=dim)


def swap_halves(mod: AdapterModule, name: str | None = None) -> AdapterModule:
    """The module whose ΔW is `mod`'s with its two row halves exchanged ((shift, scale) <-> (scale, shift)), exact
    for LoHA (flat or Tucker), LoRA/LoCon and either dora_scale axis. Its own inverse."""
    tensors = {k: (_swap_dim(v, _row_axis(mod, k)) if k in ROW_FACTORS else v) for k, v in mod.tensors.items()}
    dora = mod.dora_scale
    if dora is not None and dora_axis(mod) == "out":
        dora = _swap_dim(dora, 0)
    return _with(mod, name or mod.name, tensors, dora)


def _block_diagonal(blocks: Sequence[torch.Tensor | None], rows: Sequence[int], ranks: Sequence[int]) -> torch.Tensor:
    out = torch.zeros(sum(rows), sum(ranks), dtype=torch.float32)
    r0 = c0 = 0
    for block, n, r in zip(blocks, rows, ranks):
        if block is not None:
            out[r0:r0 + n, c0:c0 + r] = block
        r0, c0 = r0 + n, c0 + r
    return out


def _fuse_dora(mods: Sequence[AdapterModule | None], rows: Sequence[int], name: str) -> torch.Tensor | None:
    axes = {dora_axis(m) if m is not None else None for m in mods}
    if axes == {None}:
        return None
    if axes != {"out"}:
        raise ValueError(
            f"{name}: cannot fuse: a fused module has one dora_scale for all its rows; the split modules have "
            + ("per-input-column dora_scales, each normalising its own rows only" if "in" in axes
               else "dora_scale on some slices only (the others' magnitudes would need the base weights)"))
    return torch.cat([m.dora_scale.float().reshape(n, *m.dora_scale.shape[1:]) for m, n in zip(mods, rows)])


def fuse_rows(mods: Sequence[AdapterModule | None], rows: Sequence[int], name: str) -> AdapterModule:
    """One module whose ΔW stacks the ΔWs of `mods` (q, k, v; None for a slice the file does not adapt, zero),
    `rows[i]` rows each; exact, at rank Σ r_i, in fp32: B factors stacked, A factors block-diagonal in both
    Hadamard halves (LoHA) or in lora_up (LoRA), each slice's alpha/r folded into its A block against the
    fused alpha/r (the first slice's, so equal scales fold nothing). Output-row dora_scales are stacked; an
    input-column one, or DoRA on only some slices, is refused (ValueError): no one fused magnitude equals it."""
    present = [m for m in mods if m is not None]
    if not present or len(mods) != len(rows):
        raise ValueError(f"{name}: fuse_rows needs one entry per slice, at least one a module")
    algos = {m.algo for m in present}
    if len(algos) > 1 or any(m.tucker for m in present):
        raise ValueError(f"{name}: cannot fuse {sorted(algos)} modules{' (Tucker)' if present[0].tucker else ''} "
                         "into one: the slices must all be flat LoHA or all LoRA")
    inputs = {m.in_features() for m in present}
    if len(inputs) > 1:
        raise ValueError(f"{name}: the slices' input sizes differ ({sorted(inputs)})")
    dora = _fuse_dora(mods, rows, name)
    scale = next((m.scale for m in present if m.scale != 0), 1.0)
    f = [None if m is None else {k: v.float().reshape(v.shape[0], -1) for k, v in m.tensors.items()} for m in mods]
    ratio = [1.0 if m is None else m.scale / scale for m in mods]
    if present[0].algo == "loha":
        pairs = (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b"))
    else:
        pairs = (("lora_up.weight", "lora_down.weight"),)
    tensors: dict[str, torch.Tensor] = {}
    for half, (a_key, b_key) in enumerate(pairs):
        ranks = [0 if t is None else t[b_key].shape[0] for t in f]
        blocks = [None if t is None else t[a_key] * (ratio[i] if half == 0 else 1.0) for i, t in enumerate(f)]
        tensors[a_key] = _block_diagonal(blocks, rows, ranks)
        tensors[b_key] = torch.cat([t[b_key] for t in f if t is not None])
    rank = tensors[pairs[0][1]].shape[0]
    return AdapterModule(name=name, algo=present[0].algo, tensors=tensors, alpha=scale * rank, dora_scale=dora)


def _to_file_rows(t: torch.Tensor, target: Target) -> torch.Tensor:
    return _swap_dim(t, 0) if target.swap_halves else t


@torch.no_grad()
def dense_deltas(mod: AdapterModule, targets: Sequence[Target], weights: Sequence[torch.Tensor],
                 strength: float = 1.0) -> list[torch.Tensor]:
    """The exact fp32 change each target layer gets from `mod` at `strength`, from the layers' base `weights`:
    the file-layout base weight is rebuilt from them (rows stacked, halves swapped back), ΔW taken on it, DoRA
    (either axis) applied there as W + s·(W' − W), and the result cut into the layers' rows. What
    :func:`slice_rows` cannot do (an input-column dora_scale over a fused qkv) this does, at the cost of
    dense deltas."""
    if len(targets) != len(weights):
        raise ValueError(f"{mod.name}: {len(targets)} targets but {len(weights)} weights")
    base = torch.cat([_to_file_rows(w.detach().float().cpu(), t) for w, t in zip(weights, targets)])
    if base.shape[0] != targets[-1].stop or targets[0].start != 0:
        raise ValueError(f"{mod.name}: the weights' {base.shape[0]} rows do not fill the targets' rows")
    delta = full_delta(mod, base.shape, "cpu")
    if mod.dora_scale is not None:
        change = (apply_dora(base, delta, mod.dora_scale) - base).mul_(strength)
    else:
        change = delta.mul_(strength)
    return [_to_file_rows(change[t.start:t.stop], t) for t in targets]
