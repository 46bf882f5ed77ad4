"""Training LoHA on SD 3.x's MMDiT in the file form its users load.

kohya sd-scripts, LyCORIS as its network module and ComfyUI name the transformer's layers in the original (MMDiT)
layout, where q, k and v are one fused ``attn.qkv`` Linear; diffusers' SD3Transformer2DModel has three. To write
that form without any conversion, a fused layer trains as ONE LoHA (:func:`fused_owner`, in the file's layout: rows
q | k | v) whose parameters the three diffusers layers share through :class:`RowSlice` wrappers, each computing its
own rows of ΔW·x: ΔW's rows [a, b) are scale · (w1_a[a:b] w1_b) ⊙ (w2_a[a:b] w2_b), a LoHA with the A factors'
rows cut (sd3_ops.slice_rows's rule), so gradients of all three reach the one set of factors. The two adaLN layers
whose row halves the original layout stores the other way round (sd3_names.Target.swap_halves) train the same way,
one owner in the file's (shift, scale) order read by one slice in the model's (scale, shift) order.

:data:`SD3_FILE_FORMS` are the forms training writes: "kohya" (the default) and "simpletuner", LyCORIS on the
diffusers transformer (split q/k/v modules ``lycoris_transformer_blocks_N_attn_to_q``), where every diffusers layer
is a plain LoHALayer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .layers import LoHALayer
from .naming import SD3_PART, kohya_name, text_encoder_canonical_path
from .sd3_names import Target as RowsTarget
from .sd3_names import flat, form_name, original_layout

__all__ = ["SD3_FILE_FORMS", "FusedLoHA", "RowSlice", "fused_owner", "SD3Keys"]

#: file forms a training run writes for SD 3.x (keys of sd3_names.FORMS), the default first
SD3_FILE_FORMS = ("kohya", "simpletuner")


class FusedLoHA(LoHALayer):
    """The factors of one file module that several model layers compute through RowSlices: a LoHALayer without a
    base (never called; module walks that want the adapted layers and their bases take the RowSlices)."""


class RowSlice(LoHALayer):
    """One model layer that is rows of a LoHA spanning several (a fused qkv's q, k or v) or stored with its row
    halves exchanged (an adaLN in the original layout): the factors are `owner`'s, the A factors cut to the rows
    ``target`` names (halves exchanged back when it says so); multiplier, alpha, dropout and the forward path
    choice are the LoHALayer's, on those rows."""

    def __init__(self, base: nn.Module, owner: FusedLoHA, target: RowsTarget) -> None:
        nn.Module.__init__(self)  # no factors of its own: LoHALayer.__init__ would make them
        if not isinstance(base, nn.Linear) and not hasattr(base, "in_features"):
            raise TypeError(f"RowSlice wraps a Linear layer, not {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.owner = owner  # a submodule here, so it moves with the model
        self.kind, self.rank, self.kernel = "linear", owner.rank, ()
        self.out_dim, self.in_dim = int(base.out_features), int(base.in_features)
        if target.stop - target.start != self.out_dim or owner.in_dim != self.in_dim:
            raise ValueError(f"RowSlice: rows {target.start}:{target.stop} of a {owner.out_dim}x{owner.in_dim} LoHA "
                             f"do not fit a {self.out_dim}x{self.in_dim} layer")
        self.weight_shape = torch.Size((self.out_dim, self.in_dim))
        self.rank_dropout, self.module_dropout = owner.rank_dropout, owner.module_dropout
        self.rank_dropout_scale, self.use_scalar = owner.rank_dropout_scale, owner.use_scalar
        self.wd_on_output, self.dora_scale = owner.wd_on_output, None
        self.path, self.last_path = "auto", None
        self.rows = target

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        part = t[self.rows.start:self.rows.stop]
        if not self.rows.swap_halves:
            return part
        half = part.shape[0] // 2
        return torch.cat([part[half:], part[:half]])  # the file's (shift, scale) -> the model's (scale, shift)

    @property
    def hada_w1_a(self) -> torch.Tensor:
        return self._rows(self.owner.hada_w1_a)

    @property
    def hada_w2_a(self) -> torch.Tensor:
        return self._rows(self.owner.hada_w2_a)

    @property
    def hada_w1_b(self) -> torch.Tensor:
        return self.owner.hada_w1_b

    @property
    def hada_w2_b(self) -> torch.Tensor:
        return self.owner.hada_w2_b

    @property
    def scalar(self) -> torch.Tensor | None:
        return self.owner.scalar

    @property
    def multiplier(self) -> float:
        return self.owner.multiplier

    @property
    def alpha_value(self) -> float:
        return self.owner.alpha_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LoHALayer's forward on these rows; module dropout drops the whole file module, as kohya's does: the
        first rows' layer (q, which attention calls first) draws, k and v follow its draw."""
        owner = self.owner
        if self.training and self.module_dropout > 0:
            if self.rows.start == 0:
                owner.__dict__["_dropped"] = torch.rand(()).item() < self.module_dropout
            if owner.__dict__.get("_dropped", False):
                return self.base(x)
        return self._adapted(x)

    def _adapted(self, x: torch.Tensor) -> torch.Tensor:
        dropout, self.module_dropout = self.module_dropout, 0.0  # drawn above, for the whole module
        try:
            return super().forward(x)
        finally:
            self.module_dropout = dropout

    def factors(self) -> dict[str, torch.Tensor]:
        raise TypeError("a RowSlice has no factors of its own; save its owner (the file's module)")

    raw_tensors = load_factors = factors

    def extra_repr(self) -> str:
        swap = ", halves swapped" if self.rows.swap_halves else ""
        return f"rows {self.rows.start}:{self.rows.stop} of a rank-{self.rank} LoHA{swap}"


def fused_owner(bases: Sequence[nn.Module], **kw) -> FusedLoHA:
    """The LoHA of a layer the file stores as one and the model as `bases` (rows stacked in order): a LoHALayer of
    the stacked shape whose parameters live on the bases' device; it is never called (its RowSlices are), so it
    keeps no base weight. `kw`: LoHALayer's settings (rank, alpha, dropout, use_scalar; no dora_wd)."""
    if kw.get("dora_wd"):
        raise ValueError("dora_wd on an SD 3.x layer the kohya file form fuses (attn.qkv) or stores with swapped "
                         "halves (adaLN): not supported; set sd3_file_form = \"simpletuner\" (split modules) or "
                         "leave dora_wd off")
    rows = sum(int(b.out_features) for b in bases)
    in_dim = int(bases[0].in_features)
    device = bases[0].weight.device
    alpha = kw.pop("alpha", None)
    owner = FusedLoHA(nn.Linear(in_dim, rows, bias=False, device="meta"), alpha=alpha, **kw)
    del owner._modules["base"]  # the shape was all it gave: the model's layers compute, through the slices
    owner.to_empty(device=device)
    owner.reset_parameters()
    owner.set_alpha(alpha)
    return owner


class SD3Keys:
    """File names and the names preset files / patterns are tested on, for each layer of an SD 3.x pipeline's
    models, in one file form: the transformer by its original-layout name (kohya) or its diffusers path
    (simpletuner); CLIPs in the transformers-4 layout; T5 by its own paths."""

    def __init__(self, transformer: nn.Module, form: str) -> None:
        if form not in SD3_FILE_FORMS:
            raise ValueError(f"sd3_file_form = {form!r}: choose one of {', '.join(SD3_FILE_FORMS)}")
        self.form = form
        self.layout = original_layout(transformer)  # original layer -> its diffusers layers, with their rows
        self.original = {t.path: name for name, targets in self.layout.items() for t in targets}

    def fused(self, path: str) -> tuple[str, tuple[RowsTarget, ...]] | None:
        """(original layer, its targets) when the kohya form stores `path` with other layers or swapped, else None."""
        name = self.original.get(path)
        if self.form != "kohya" or name is None:
            return None
        targets = self.layout[name]
        return (name, targets) if len(targets) > 1 or targets[0].swap_halves else None

    def key_of(self, part: str) -> Callable[[str], str]:
        prefix = SD3_PART["transformer" if part == "unet" else part].prefix
        if part == "te3":
            return lambda path: kohya_name(prefix, path)
        if part != "unet":
            return lambda path: kohya_name(prefix, text_encoder_canonical_path(path))
        if self.form == "kohya":
            return lambda path: kohya_name(prefix, self.original.get(path, path))
        return lambda path: flat(form_name(self.form, "transformer", path))

    def path_forms(self, part: str) -> Callable[[str], tuple[str, ...]]:
        if part == "te3":
            return lambda path: (path,)
        if part != "unet":
            return lambda path: tuple(dict.fromkeys((path, text_encoder_canonical_path(path))))
        return lambda path: tuple(dict.fromkeys((path, self.original.get(path, path))))
