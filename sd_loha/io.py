"""Adapter files: safe reading, parsing into modules, and atomic writing.

Only safetensors is accepted: pickle-based formats (.ckpt/.pt/.bin/.pth) can run code when loaded,
and adapter files come from strangers on the internet.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .naming import split_key

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
TUCKER_PARAMS = ("hada_t1", "hada_t2")
LORA_PARAMS = ("lora_up.weight", "lora_down.weight", "lora_mid.weight")
KNOWN_PARAMS = set(LOHA_PARAMS + TUCKER_PARAMS + LORA_PARAMS + ("alpha", "scale", "dora_scale"))
# A header larger than this is not an adapter file (real ones are a few hundred KB of JSON at most).
MAX_HEADER_BYTES = 64 * 1024 * 1024
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


class AdapterFileError(ValueError):
    """An adapter file (or state dict) that cannot be used; the message names the file and the problem."""


@dataclass
class AdapterModule:
    """One adapted layer as stored in a file: its kohya name and its tensors."""

    name: str  # e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"
    algo: str  # "loha" | "lora"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # factor tensors by file param name
    alpha: float | None = None
    scale_override: float | None = None  # a `scale` key (A1111 honours it instead of alpha / r)
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        if self.algo == "loha":
            return int(self.tensors["hada_w1_b"].shape[0])
        return int(self.tensors["lora_down.weight"].shape[0])

    @property
    def tucker(self) -> bool:
        return "hada_t1" in self.tensors or "lora_mid.weight" in self.tensors

    @property
    def scale(self) -> float:
        """alpha / r; no alpha means 1.0 (what A1111 and ComfyUI do); an explicit `scale` key wins."""
        if self.scale_override is not None:
            return self.scale_override
        if self.alpha is None:
            return 1.0
        return self.alpha / self.rank

    def out_features(self) -> int:
        if self.algo == "loha":
            w = self.tensors["hada_w1_a"]
            return int(w.shape[1] if self.tucker else w.shape[0])
        return int(self.tensors["lora_up.weight"].shape[0])

    def in_features(self) -> int:
        """The flat input size (in · kh · kw for k×k convs), or in for Tucker."""
        if self.algo == "loha":
            return int(self.tensors["hada_w1_b"].shape[1])
        d = self.tensors["lora_down.weight"]
        return int(d[0].numel()) if not self.tucker else int(d.shape[1])


@dataclass
class ParsedFile:
    modules: dict[str, AdapterModule]
    metadata: dict[str, str]
    unsupported: dict[str, list[str]]  # module name -> params we do not know (LoKr, OFT, ...)
    source: str


def _check_header(path: Path) -> None:
    """Validate the safetensors header ourselves so truncated or absurd files get a clear message."""
    size = path.stat().st_size
    if size < 8:
        raise AdapterFileError(f"{path}: file is {size} bytes; a safetensors file is at least 8 bytes. Re-download it.")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise AdapterFileError(
                f"{path}: not a valid safetensors file (header claims {n} bytes, file has {size}). "
                "It is truncated or not safetensors; re-download or re-export it."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterFileError(f"{path}: safetensors header is not valid JSON ({e}); the file is corrupt.") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: safetensors header is not a JSON object; the file is corrupt.")
    data_size = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            numel = math.prod(int(d) for d in info["shape"])
            nbytes = numel * DTYPE_BYTES.get(info["dtype"], 1)
        except (KeyError, TypeError, ValueError):
            raise AdapterFileError(f"{path}: tensor {key!r} has a malformed header entry; the file is corrupt.") from None
        if not (0 <= start <= end <= data_size) or end - start != nbytes:
            raise AdapterFileError(
                f"{path}: tensor {key!r} declares {nbytes} bytes at offsets {start}..{end}, but the file holds "
                f"{data_size} bytes of data. The file is truncated or corrupt; re-download it."
            )


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, refusing anything that is not safetensors."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"{p}: {p.suffix} files are Python pickles, which can run code when loaded; sd-loha never unpickles. "
            "Ask for a .safetensors version of this adapter."
        )
    if not p.is_file():
        raise AdapterFileError(f"{p}: no such file")
    _check_header(p)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise AdapterFileError(f"{p}: cannot read safetensors file ({e})") from None
    return tensors, metadata


def parse_state_dict(state_dict: Mapping[str, torch.Tensor], *, source: str = "<state dict>",
                     metadata: Mapping[str, str] | None = None) -> ParsedFile:
    """Group flat keys into modules; refuse files with no LoHA/LoRA modules or non-finite values."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise AdapterFileError(f"{source}: value of {key!r} is {type(value).__name__}, expected a tensor")
        try:
            module, param = split_key(key)
        except ValueError:
            raise AdapterFileError(f"{source}: key {key!r} is not '<module>.<param>'; this is not a LoHA/LoRA file") from None
        grouped.setdefault(module, {})[param] = value

    modules: dict[str, AdapterModule] = {}
    unsupported: dict[str, list[str]] = {}
    for name, params in grouped.items():
        unknown = sorted(set(params) - KNOWN_PARAMS)
        if all(p in params for p in LOHA_PARAMS):
            algo = "loha"
        elif "lora_up.weight" in params and "lora_down.weight" in params:
            algo = "lora"
        else:
            unsupported[name] = sorted(params)
            continue
        if unknown:
            unsupported[name] = unknown
        if algo == "loha" and ("hada_t1" in params) != ("hada_t2" in params):
            raise AdapterFileError(f"{source}: module {name} has only one of hada_t1/hada_t2; the file is incomplete")
        tensors = {k: v for k, v in params.items() if k in LOHA_PARAMS + TUCKER_PARAMS + LORA_PARAMS}
        for k, v in list(tensors.items()) + [("dora_scale", params.get("dora_scale"))]:
            if v is not None and v.is_floating_point() and not torch.isfinite(v).all():
                raise AdapterFileError(f"{source}: module {name} has NaN or Inf values in {k}; the adapter is broken "
                                       "(often a diverged training run). Use an earlier checkpoint.")
        alpha = params.get("alpha")
        scale = params.get("scale")
        if alpha is not None and not torch.isfinite(alpha.float()).all():
            raise AdapterFileError(f"{source}: module {name} has a non-finite alpha")
        modules[name] = AdapterModule(
            name=name,
            algo=algo,
            tensors=tensors,
            alpha=float(alpha.float().item()) if alpha is not None else None,
            scale_override=float(scale.float().item()) if scale is not None else None,
            dora_scale=params.get("dora_scale"),
        )
    if not modules:
        sample = ", ".join(list(state_dict)[:5]) or "(no tensors)"
        raise AdapterFileError(
            f"{source}: no LoHA (hada_w1_a/…) or LoRA (lora_up/lora_down) modules found; keys start with: {sample}. "
            "Is this an adapter file?"
        )
    return ParsedFile(modules=modules, metadata=dict(metadata or {}), unsupported=unsupported, source=source)


def load_adapter(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> ParsedFile:
    """Parse an adapter from a path or an in-memory state dict."""
    if isinstance(source, Mapping):
        return parse_state_dict(source)
    tensors, metadata = read_safetensors(source)
    return parse_state_dict(tensors, source=str(source), metadata=metadata)


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Write to a temp file in the same folder and rename it over `path`, so a crash, a kill or a full
    disk never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise AdapterFileError(f"refusing to write {path}: tensor {k} has NaN or Inf values")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"could not write {path}: {e.strerror}; the previous file (if any) is untouched") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
