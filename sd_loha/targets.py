"""Which layers get an adapter, at which rank: presets, preset files, conv rules, include/exclude patterns and
block-wise ranks.

Presets select by the class of the containing block (as kohya and LyCORIS do), so they hold across
SD1.x, SD2.x and SDXL and across diffusers versions that rename submodules:

- attn-only: the attention projections (to_q, to_k, to_v, to_out.0; CLIP q/k/v/out_proj).
- attn-mlp (default): every Linear/Conv2d inside the transformer blocks (proj_in/proj_out, attention,
  feed-forward) and the CLIP attention + MLP.
- full: attn-mlp plus the resnet blocks (conv1, conv2, time_emb_proj, conv_shortcut) and the down/upsampler convs.

A preset can also be a LyCORIS preset file (TOML, :func:`read_preset`): target block classes and module names
for the UNet and the text encoders, and per-class / per-name rank and alpha (module_algo_map / name_algo_map),
with LyCORIS's kohya-network semantics (lycoris/kohya.py).

k×k convs are adapted only when their rank (conv_rank, or a per-module rank) is > 0; 1×1 convs count as linear
layers and use rank/alpha. Patterns are shell globs (fnmatch) tested against the dotted module path
(`down_blocks.0.attentions.0.proj_in`) and against the kohya name (`lora_unet_down_blocks_0_…`):
`include` adds matching Linear/Conv2d layers outside the preset, `exclude` removes matches. Block-wise ranks
(`reg_dims`, kohya's network_reg_dims) are regular expressions searched in the file's module name.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Override:
    """Per-module settings of a preset entry; None keeps the network's value for that kind of layer."""

    dim: int | None = None
    alpha: float | None = None
    use_tucker: bool | None = None


@dataclass(frozen=True)
class Preset:
    """Which layers to adapt (LyCORIS's preset keys) and their per-module overrides."""

    name: str
    unet_target_module: frozenset[str]
    text_encoder_target_module: frozenset[str]
    unet_target_name: tuple[str, ...] = ()
    text_encoder_target_name: tuple[str, ...] = ()
    module_algo_map: Mapping[str, Override] = field(default_factory=dict)
    name_algo_map: Mapping[str, Override] = field(default_factory=dict)  # in file order: the first match wins
    exclude_name: tuple[str, ...] = ()
    use_fnmatch: bool = False
    enable_conv: bool = True

    def block_classes(self, part: str) -> frozenset[str]:
        return self.unet_target_module if part == "unet" else self.text_encoder_target_module

    def target_names(self, part: str) -> tuple[str, ...]:
        return self.unet_target_name if part == "unet" else self.text_encoder_target_name

    def match(self, pattern: str, name: str) -> bool:
        """LyCORIS's match_fn: a shell glob with use_fnmatch, else a regular expression anchored at the start."""
        return fnmatch.fnmatch(name, pattern) if self.use_fnmatch else re.match(pattern, name) is not None

    def named(self, part: str, forms: Sequence[str]) -> bool:
        """Whether target_name selects a module known by these names (its path, and the path files use)."""
        names = self.target_names(part)
        return any(f in names or any(self.match(t, f) for t in names) for f in forms)

    def excluded(self, forms: Sequence[str]) -> bool:
        return any(self.match(p, f) for p in self.exclude_name for f in forms)

    def name_override(self, forms: Sequence[str]) -> Override | None:
        """LyCORIS's find_conf_for_name: the exact key first, then the first key that matches."""
        for f in forms:
            if f in self.name_algo_map:
                return self.name_algo_map[f]
        return next((o for k, o in self.name_algo_map.items() if any(self.match(k, f) for f in forms)), None)


# SD 3.x's MMDiT (diffusers' JointTransformerBlock) by its original-layout names (sd3_names.original_of), which
# only SD 3.x layers have: attention qkv/proj and MLP of both streams; SD3.5 Medium's second attention (attn2)
# and the adaLN modulations come with "full" (kohya's SingleDiTBlock set) or include patterns.
_MMDIT_ATTN = r"joint_blocks\.\d+\.(x|context)_block\.attn\.(qkv|proj)$"
_MMDIT_ATTN_MLP = r"joint_blocks\.\d+\.(x|context)_block\.(attn\.(qkv|proj)|mlp\.fc[12])$"
_MMDIT_ATTN2 = r"joint_blocks\.\d+\.x_block\.attn2\."
# T5-XXL (SD 3.x's te3, adapted only with train_t5xxl): kohya's lora_sd3 classes
_T5_ATTN, _T5_MLP = "T5Attention", "T5DenseGatedActDense"

PRESETS: dict[str, Preset] = {
    "attn-only": Preset("attn-only", frozenset({"Attention"}), frozenset({"CLIPAttention", _T5_ATTN}),
                        exclude_name=(_MMDIT_ATTN2,)),
    "attn-mlp": Preset("attn-mlp", frozenset({"Transformer2DModel"}),
                       frozenset({"CLIPAttention", "CLIPMLP", _T5_ATTN, _T5_MLP}), unet_target_name=(_MMDIT_ATTN_MLP,)),
    "full": Preset("full", frozenset({"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D",
                                      "JointTransformerBlock"}),
                   frozenset({"CLIPAttention", "CLIPMLP", _T5_ATTN, _T5_MLP})),
}

#: Class names in LyCORIS presets (written for kohya's own UNet or older libraries) -> the diffusers /
#: transformers class of the same block.
CLASS_ALIASES = {"CrossAttention": "Attention", "CLIPSdpaAttention": "CLIPAttention",
                 "CLIPFlashAttention2": "CLIPAttention"}


@dataclass(frozen=True)
class Target:
    path: str  # dotted module path inside its model
    module: nn.Module
    rank: int
    alpha: float
    use_tucker: bool | None = None  # None: the network's use_tucker
    key: str = ""  # the module name in the file (kohya name)

    @property
    def is_kxk_conv(self) -> bool:
        return _is_kxk(self.module)


def _is_kxk(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _matches(patterns: Sequence[str], *names: str) -> bool:
    return any(fnmatchcase(n, p) for p in patterns for n in names)


def _class(module: nn.Module) -> str:
    name = type(module).__name__
    return CLASS_ALIASES.get(name, name)


def _aliased(classes: Iterable[str]) -> frozenset[str]:
    return frozenset(CLASS_ALIASES.get(c, c) for c in classes)


def _preset_layers(model: nn.Module, part: str, preset: Preset,
                   forms: Callable[[str], tuple[str, ...]]) -> dict[str, Override | None]:
    """Path -> preset override of every Linear/Conv2d the preset selects, in LyCORIS's order of precedence: a
    layer inside a target block takes the entry of its innermost enclosing class in module_algo_map (the block's
    own class included); a layer named by target_name takes its name_algo_map entry, else its class's entry.
    Names are tested on each of `forms(path)`."""
    blocks = _aliased(preset.block_classes(part))
    class_map = {CLASS_ALIASES.get(k, k): v for k, v in preset.module_algo_map.items()}
    modules = dict(model.named_modules())
    chosen: dict[str, Override | None] = {}
    for block_path, block in modules.items():
        names = forms(block_path)
        if preset.excluded(names):
            continue
        if _class(block) in blocks and not preset.named(part, names):
            for sub_path, sub in block.named_modules():
                path = f"{block_path}.{sub_path}" if sub_path else block_path
                if isinstance(sub, (nn.Linear, nn.Conv2d)) and path not in chosen and not preset.excluded(forms(path)):
                    chosen[path] = _innermost_override(modules, block_path, path, class_map)
        elif preset.named(part, names) and isinstance(block, (nn.Linear, nn.Conv2d)) and block_path not in chosen:
            override = preset.name_override(names)
            chosen[block_path] = override if override is not None else class_map.get(_class(block))
    return chosen


def _innermost_override(modules: Mapping[str, nn.Module], block_path: str, path: str,
                        class_map: Mapping[str, Override]) -> Override | None:
    parts = path.split(".")
    depth = len(block_path.split(".")) if block_path else 0
    for n in range(len(parts), depth - 1, -1):  # the layer itself, its parents, ..., the block
        o = class_map.get(_class(modules[".".join(parts[:n])]))
        if o is not None:
            return o
    return None


def candidate_targets(
    model: nn.Module,
    *,
    part: str,
    prefix: str,
    preset: str | Preset = "attn-mlp",
    rank: int = 8,
    alpha: float = 4.0,
    conv_rank: int = 0,
    conv_alpha: float = 1.0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    reg_dims: Mapping[str, int] | None = None,
    key_of: Callable[[str], str] | None = None,
    path_forms: Callable[[str], tuple[str, ...]] | None = None,
) -> list[Target]:
    """Every layer of `model` that the preset and include/exclude select, with its resolved rank and alpha, in
    module order; rank 0 means "not adapted" (a k×k conv while conv_rank = 0, or a reg_dims value of 0).

    Rank precedence, lowest first: rank / conv_rank, the preset's entry (module_algo_map / name_algo_map), the
    first `reg_dims` regular expression found in the layer's key (kohya's network_reg_dims). A changed rank keeps
    the alpha of its kind (alpha, or conv_alpha for k×k convs) unless the preset entry sets one, as in kohya and
    LyCORIS, so the layer's scale becomes alpha / its rank. `key_of` gives a path's name in the file, `path_forms`
    the names a preset file's target_name / name_algo_map / exclude_name entries are tested on (default: the
    path)."""
    preset = load_preset(preset)
    include, exclude = list(include or []), list(exclude or [])
    key_of = key_of or (lambda path: f"{prefix}_{path.replace('.', '_')}")
    in_preset = _preset_layers(model, part, preset, path_forms or (lambda path: (path,)))

    targets = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        kohya = f"{prefix}_{path.replace('.', '_')}"
        key = key_of(path)  # SDXL's LDM name, SD 3.x's original-layout name: what users know from files
        chosen = path in in_preset or (include and _matches(include, path, kohya, key))
        if not chosen or (exclude and _matches(exclude, path, kohya, key)):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue  # grouped convs do not occur in SD UNets; LoHA's flat factors assume groups=1
        kxk = _is_kxk(module)
        base_rank = conv_rank if kxk and preset.enable_conv else 0 if kxk else rank
        override = in_preset.get(path) or Override()
        dim = first_match(reg_dims or {}, key)
        targets.append(Target(
            path, module,
            rank=int(dim if dim is not None else override.dim or base_rank),
            alpha=float(override.alpha or (conv_alpha if kxk else alpha)),
            use_tucker=override.use_tucker, key=key,
        ))
    return targets


def select_targets(model: nn.Module, **kwargs: Any) -> list[Target]:
    """Layers of `model` ("unet" or a text encoder) to adapt, in module order (see :func:`candidate_targets`)."""
    return [t for t in candidate_targets(model, **kwargs) if t.rank > 0]


def first_match(rules: Mapping[str, Any], name: str) -> Any | None:
    """The value of the first regular expression of `rules` (in order) found anywhere in `name` (re.search, as
    kohya's network_reg_dims / network_reg_lrs), or None."""
    return next((v for p, v in rules.items() if re.search(p, name)), None)


def unmatched_regexes(rules: Iterable[str], names: Iterable[str]) -> list[str]:
    names = list(names)
    return [p for p in rules if not any(re.search(p, n) for n in names)]


def layer_names(model: nn.Module, prefix: str, key_of: Callable[[str], str] | None = None) -> list[tuple[str, ...]]:
    """(dotted path, kohya name[, file name]) of every Linear/Conv2d of `model`: what include/exclude patterns are
    tested on (`key_of`: the path's name in the file, as candidate_targets takes it)."""
    return [(path, f"{prefix}_{path.replace('.', '_')}", *((key_of(path),) if key_of else ()))
            for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def unmatched_patterns(patterns: Sequence[str], names: Iterable[tuple[str, ...]]) -> list[str]:
    """The patterns that match no layer name: most often a typo, or a path written without the globs
    (`attn1` instead of `*.attn1.*`), which would otherwise change nothing without a word."""
    names = list(names)
    return [p for p in patterns if not any(_matches([p], *forms) for forms in names)]


# --------------------------------------------------------------------------------------------------
# LyCORIS preset files
# --------------------------------------------------------------------------------------------------

class PresetError(ValueError):
    """A preset file sd-loha cannot read or honour; `fix` says what to do."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message + (f"; {fix}" if fix else ""))
        self.message, self.fix = message, fix


_LIST_KEYS = ("unet_target_module", "unet_target_name", "text_encoder_target_module", "text_encoder_target_name",
              "exclude_name")
_BOOL_KEYS = ("use_fnmatch", "enable_conv")
_MAP_KEYS = ("module_algo_map", "name_algo_map")
_PRESET_KEYS = _LIST_KEYS + _BOOL_KEYS + _MAP_KEYS
#: LyCORIS preset keys that only its generic (non-kohya) wrapper reads, with what to write instead
_WRAPPER_KEYS = {
    "target_module": "use unet_target_module / text_encoder_target_module (the keys LyCORIS's kohya network reads)",
    "target_name": "use unet_target_name / text_encoder_target_name (the keys LyCORIS's kohya network reads)",
    "lora_prefix": "file names always start with lora_unet / lora_te; delete this key",
}
#: what a module_algo_map / name_algo_map entry may hold (the rest of LyCORIS's module arguments are not LoHA's
#: here: another algorithm, LoKr's factor, DoRA, ...)
_ENTRY_KEYS = ("algo", "dim", "alpha", "use_tucker")
_ENTRY_ALIASES = {"use_cp": "use_tucker", "use_conv_cp": "use_tucker"}  # LyCORIS's deprecated spellings


def is_preset_file(value: str) -> bool:
    return value.lower().endswith(".toml")


def load_preset(preset: str | Preset) -> Preset:
    """A built-in preset by name, a preset file (a path ending in .toml), or a Preset as it is."""
    if isinstance(preset, Preset):
        return preset
    if preset in PRESETS:
        return PRESETS[preset]
    if is_preset_file(preset):
        return read_preset(preset)
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}, or a LyCORIS preset file "
                     "ending in .toml")


def read_preset(path: str | Path) -> Preset:
    """Read a LyCORIS preset file (the keys of lycoris/config.py's presets and example_configs/preset_configs);
    raises PresetError naming the file and the key for anything sd-loha cannot honour."""
    where = f"preset file '{path}'"
    try:
        data = tomllib.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PresetError(f"{where} does not exist", "check the path, or use a built-in preset: "
                          + ", ".join(PRESETS)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PresetError(f"{where} cannot be read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise PresetError(f"{where} is not valid TOML: {e}") from None
    for key in data:
        if key in _WRAPPER_KEYS:
            raise PresetError(f"{where}: key '{key}' is read only by LyCORIS's generic wrapper", _WRAPPER_KEYS[key])
        if key not in _PRESET_KEYS:
            raise PresetError(f"{where}: unknown key '{key}'", "a preset file holds " + ", ".join(_PRESET_KEYS))
    values: dict[str, Any] = {}
    for key in _LIST_KEYS:
        v = data.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise PresetError(f"{where}: {key} must be a list of strings", f'write e.g. {key} = ["Transformer2DModel"]')
        values[key] = tuple(v)
    for key in _BOOL_KEYS:
        if key in data:
            if not isinstance(data[key], bool):
                raise PresetError(f"{where}: {key} must be true or false")
            values[key] = data[key]
    for key in _MAP_KEYS:
        table = data.get(key, {})
        if not isinstance(table, dict):
            raise PresetError(f"{where}: {key} must be a table of tables", f'write e.g. [{key}.Attention] then dim = 8')
        values[key] = {name: _entry(f"{where}: {key}.{name}", entry) for name, entry in table.items()}
    if not values.get("use_fnmatch"):
        for key in ("unet_target_name", "text_encoder_target_name", "exclude_name", "name_algo_map"):
            for p in values[key]:
                try:
                    re.compile(p)
                except re.error as e:
                    raise PresetError(f"{where}: {key} entry {p!r} is not a regular expression ({e})",
                                      "fix it, or set use_fnmatch = true for shell-style patterns") from None
    for key in ("unet_target_module", "text_encoder_target_module"):
        values[key] = frozenset(values[key])
    return Preset(name=Path(path).name, **values)


def _entry(where: str, entry: Any) -> Override:
    if not isinstance(entry, dict):
        raise PresetError(f"{where} must be a table", "write e.g. dim = 8 and alpha = 4 under it")
    entry = {_ENTRY_ALIASES.get(k, k): v for k, v in entry.items()}
    for k in entry:
        if k not in _ENTRY_KEYS:
            raise PresetError(f"{where}: sd-loha cannot honour '{k}'",
                              "an entry takes " + ", ".join(_ENTRY_KEYS) + " (sd-loha trains LoHA only); delete it")
    algo = entry.get("algo", "loha")
    if not isinstance(algo, str) or algo.lower() != "loha":
        raise PresetError(f"{where}: algo = {algo!r}, but sd-loha trains LoHA only",
                          'write algo = "loha" or leave algo out')
    dim, alpha, tucker = entry.get("dim"), entry.get("alpha"), entry.get("use_tucker")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise PresetError(f"{where}: dim must be a whole number >= 1, got {dim!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise PresetError(f"{where}: alpha must be a number > 0, got {alpha!r}")
    if tucker is not None and not isinstance(tucker, bool):
        raise PresetError(f"{where}: use_tucker must be true or false, got {tucker!r}")
    return Override(dim, None if alpha is None else float(alpha), tucker)


def preset_label(preset: str | Preset) -> str:
    """How the preset is recorded in a file's metadata: a built-in's name, a preset file's file name."""
    return preset.name if isinstance(preset, Preset) else Path(preset).name if is_preset_file(preset) else preset

