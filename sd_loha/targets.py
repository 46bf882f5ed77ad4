"""Which layers get an adapter: presets, conv rules and include/exclude patterns.

Presets select by the class of the containing block (as kohya and LyCORIS do), so they hold across
SD1.x, SD2.x and SDXL and across diffusers versions that rename submodules:

- attn-only: the attention projections (to_q, to_k, to_v, to_out.0; CLIP q/k/v/out_proj).
- attn-mlp (default): every Linear/Conv2d inside the transformer blocks (proj_in/proj_out, attention,
  feed-forward) and the CLIP attention + MLP.
- full: attn-mlp plus the resnet blocks (conv1, conv2, time_emb_proj, conv_shortcut) and the down/upsampler convs.

k×k convs are adapted only when conv_rank > 0 (with conv_rank/conv_alpha); 1×1 convs count as linear
layers and use rank/alpha. Patterns are shell globs (fnmatch) tested against the dotted module path
(`down_blocks.0.attentions.0.proj_in`) and against the kohya name (`lora_unet_down_blocks_0_…`):
`include` adds matching Linear/Conv2d layers outside the preset, `exclude` removes matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

PRESETS: dict[str, dict[str, frozenset[str]]] = {
    "attn-only": {"unet": frozenset({"Attention"}), "te": frozenset({"CLIPAttention"})},
    "attn-mlp": {"unet": frozenset({"Transformer2DModel"}), "te": frozenset({"CLIPAttention", "CLIPMLP"})},
    "full": {
        "unet": frozenset({"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}),
        "te": frozenset({"CLIPAttention", "CLIPMLP"}),
    },
}


@dataclass(frozen=True)
class Target:
    path: str  # dotted module path inside its model
    module: nn.Module
    rank: int
    alpha: float

    @property
    def is_kxk_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


def _matches(patterns: Sequence[str], path: str, kohya: str) -> bool:
    return any(fnmatchcase(path, p) or fnmatchcase(kohya, p) for p in patterns)


def select_targets(
    model: nn.Module,
    *,
    part: str,
    prefix: str,
    preset: str = "attn-mlp",
    rank: int = 8,
    alpha: float = 4.0,
    conv_rank: int = 0,
    conv_alpha: float = 1.0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[Target]:
    """Layers of `model` ("unet" or a text encoder) to adapt, in module order."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    block_classes = PRESETS[preset]["unet" if part == "unet" else "te"]
    include, exclude = list(include or []), list(exclude or [])

    in_preset: set[str] = set()
    for block_path, block in model.named_modules():
        if type(block).__name__ in block_classes:
            for sub_path, sub in block.named_modules():
                if isinstance(sub, (nn.Linear, nn.Conv2d)):
                    in_preset.add(f"{block_path}.{sub_path}" if sub_path else block_path)

    targets = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        kohya = f"{prefix}_{path.replace('.', '_')}"
        chosen = path in in_preset or (include and _matches(include, path, kohya))
        if not chosen or (exclude and _matches(exclude, path, kohya)):
            continue
        kxk = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
        if kxk and conv_rank <= 0:
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue  # grouped convs do not occur in SD UNets; LoHA's flat factors assume groups=1
        targets.append(Target(path, module, conv_rank if kxk else rank, conv_alpha if kxk else alpha))
    return targets


def layer_names(model: nn.Module, prefix: str) -> list[tuple[str, str]]:
    """(dotted path, kohya name) of every Linear/Conv2d of `model`: what include/exclude patterns are tested on."""
    return [(path, f"{prefix}_{path.replace('.', '_')}") for path, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))]


def unmatched_patterns(patterns: Sequence[str], names: Iterable[tuple[str, str]]) -> list[str]:
    """The patterns that match no layer name: most often a typo, or a path written without the globs
    (`attn1` instead of `*.attn1.*`), which would otherwise change nothing without a word."""
    names = list(names)
    return [p for p in patterns if not any(_matches([p], path, kohya) for path, kohya in names)]
