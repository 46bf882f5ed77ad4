"""Adapter files: safe reading, parsing kohya-style keys into modules, and atomic writing.

Only safetensors is accepted: pickle-based formats (.ckpt/.pt/.bin/.pth) can run code when loaded,
and adapter files come from strangers on the internet.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from .atomic import write_atomic
from .naming import name_part, split_key

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
TUCKER_PARAMS = ("hada_t1", "hada_t2")
LORA_PARAMS = ("lora_up.weight", "lora_down.weight", "lora_mid.weight")
KNOWN_PARAMS = set(LOHA_PARAMS + TUCKER_PARAMS + LORA_PARAMS + ("alpha", "scale", "dora_scale"))
# Headers beyond this are not read back to explain a failure (real adapters have a few hundred KB of JSON;
# safetensors itself refuses headers over 100 MB).
MAX_HEADER_BYTES = 64 * 1024 * 1024


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
            b = self.tensors["hada_w1_b"]
            # Flat factors may come 4-D from some trainers ((r, in, kh, kw)); the flat size is what counts.
            return int(b.shape[1]) if self.tucker else int(b[0].numel())
        d = self.tensors["lora_down.weight"]
        return int(d[0].numel()) if not self.tucker else int(d.shape[1])

    def shape_problem(self, weight_shape: tuple[int, ...] | torch.Size) -> str | None:
        """Why this module's tensors cannot make a delta for a weight of `weight_shape` (None if they can).

        Checks every factor (not only the first pair), the Tucker core's kernel size and `dora_scale`, so a
        bad file is refused before any weight changes instead of failing half-way through a merge.
        """
        ws = tuple(int(d) for d in weight_shape)
        out, inn, kernel = ws[0], (ws[1] if len(ws) > 1 else 1), ws[2:]
        flat_in = math.prod(ws[1:]) if len(ws) > 1 else 1
        t = {k: tuple(v.shape) for k, v in self.tensors.items()}

        def show(*keys: str) -> str:
            return ", ".join(f"{k} {t[k]}" for k in keys if k in t)

        if self.algo == "loha":
            if self.tucker:
                ok = len(ws) >= 3
                for i in ("1", "2"):
                    a, b, c = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"], t[f"hada_t{i}"]
                    ok = ok and len(a) == 2 and len(b) == 2 and len(c) >= 3
                    ok = ok and a[1] == out and b[1] == inn and c[0] == a[0] and c[1] == b[0] and c[2:] == kernel
                if not ok:
                    return (f"Tucker factors {show(*LOHA_PARAMS, *TUCKER_PARAMS)} do not fit a weight of shape {ws} "
                            "(want hada_w_a (r, out), hada_w_b (r, in), hada_t (r, r, kh, kw))")
            else:
                ok = True
                for i in ("1", "2"):
                    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
                    flat_a = (a[0], math.prod(a[1:])) if len(a) >= 2 else None
                    flat_b = (b[0], math.prod(b[1:])) if len(b) >= 2 else None
                    ok = ok and flat_a is not None and flat_b is not None
                    ok = ok and flat_a[0] == out and flat_a[1] == flat_b[0] and flat_b[1] == flat_in
                if not ok:
                    return (f"factors {show(*LOHA_PARAMS)} do not fit a weight of shape {ws} "
                            f"(want hada_w_a ({out}, r), hada_w_b (r, {flat_in}))")
        else:
            up, down = t["lora_up.weight"], t["lora_down.weight"]
            r_up = math.prod(up[1:]) if len(up) >= 2 else -1
            if "lora_mid.weight" in t:
                mid = t["lora_mid.weight"]
                ok = (len(ws) >= 3 and len(mid) >= 3 and up[0] == out and mid[0] == r_up and mid[1] == down[0]
                      and math.prod(down[1:]) == inn and mid[2:] == kernel)
            else:
                ok = len(up) >= 2 and len(down) >= 2 and up[0] == out and r_up == down[0] and math.prod(down[1:]) == flat_in
            if not ok:
                return (f"LoRA factors {show(*LORA_PARAMS)} do not fit a weight of shape {ws}")
        if self.dora_scale is not None:
            ds = tuple(self.dora_scale.shape)
            ones = (1,) * len(kernel)
            if len(ws) < 2 or ds not in ((out, 1, *ones), (out,), (1, inn, *ones)):
                return (f"dora_scale {ds} fits neither ({out}, 1{', 1' * len(kernel)}) nor (1, {inn}{', 1' * len(kernel)}) "
                        f"for a weight of shape {ws}")
        return None


@dataclass
class ParsedFile:
    modules: dict[str, AdapterModule]
    metadata: dict[str, str]
    unsupported: dict[str, list[str]]  # module name -> params of an algorithm we do not merge (LoKr, OFT, ...)
    source: str
    ignored: dict[str, list[str]] = field(default_factory=dict)  # merged module -> extra params we do not know


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf in `t`. One fp64 sum instead of isfinite(): NaN and Inf survive a sum (+Inf plus -Inf
    is NaN) and finite fp32 values cannot overflow an fp64 total, while isfinite() on half-precision tensors
    is a slow, allocating pass (seconds over a full SD file's factors)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype == torch.float64:
        return bool(torch.isfinite(t).all())
    return math.isfinite(float(t.sum(dtype=torch.float64)))


def _header_length(f: BinaryIO, size: int) -> int:
    """The safetensors header length n (the first 8 bytes, little-endian), or -1 when the file cannot hold
    that header."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        return -1
    (n,) = struct.unpack("<Q", head)
    return n if n <= size - 8 else -1


def _unreadable(path: Path, reason: str) -> AdapterFileError:
    """Why safetensors refused `path`, in words a user can act on. Only the failure path reads the header
    here: safetensors itself validates headers, dtypes and offsets; this names what it found wrong."""
    size = path.stat().st_size
    if size < 8:
        return AdapterFileError(f"{path}: file is {size} bytes; a safetensors file is at least 8 bytes. Re-download it.")
    with open(path, "rb") as f:
        n = _header_length(f, size)
        if n < 0 or n > MAX_HEADER_BYTES:
            f.seek(0)
            (claimed,) = struct.unpack("<Q", f.read(8))
            return AdapterFileError(
                f"{path}: not a valid safetensors file (header claims {claimed} bytes, file has {size}). "
                "It is truncated or not safetensors; re-download or re-export it."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return AdapterFileError(f"{path}: safetensors header is not valid JSON ({e}); the file is corrupt. "
                                    "Re-download or re-export it.")
    data_size = size - 8 - n
    entries = header.items() if isinstance(header, dict) else ()
    ends = {k: v.get("data_offsets") for k, v in entries if k != "__metadata__" and isinstance(v, dict)}
    ends = {k: o[1] for k, o in ends.items() if isinstance(o, list) and len(o) == 2 and isinstance(o[1], int)}
    if ends and max(ends.values()) > data_size:
        last = max(ends, key=ends.get)
        return AdapterFileError(
            f"{path}: tensor {last!r} ends at byte {ends[last]} of the data, but the file holds {data_size} bytes "
            "of data. The file is truncated or corrupt; re-download it."
        )
    return AdapterFileError(f"{path}: not a valid safetensors file ({reason}). The file is corrupt; "
                            "re-download or re-export it.")


def _readable_path(path: str | os.PathLike) -> Path:
    """`path` as a Path, or the error for a pickle or a missing file (before safetensors sees it)."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"{p}: {p.suffix} files are Python pickles, which can run code when loaded; sd-loha never unpickles. "
            "Ask for a .safetensors version of this adapter."
        )
    if not p.is_file():
        raise AdapterFileError(f"{p}: no such file")
    return p


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The parsed JSON header of a safetensors file and the byte offset where its data starts, with no tensor
    read; refused as read_safetensors refuses (safetensors validates the header, dtypes and offsets)."""
    p = _readable_path(path)
    try:
        with safe_open(str(p), framework="pt", device="cpu"):
            pass
        with open(p, "rb") as f:
            n = _header_length(f, p.stat().st_size)
            return json.loads(f.read(n)), 8 + n
    except OSError as e:
        raise AdapterFileError(f"{p}: cannot read the file ({e.strerror or e}); check its permissions") from None
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise _unreadable(p, str(e)) from None


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, refusing anything that is not safetensors."""
    p = _readable_path(path)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except OSError as e:  # the file is fine or not, but this process cannot read it
        raise AdapterFileError(f"{p}: cannot read the file ({e.strerror or e}); check its permissions") from None
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise _unreadable(p, str(e)) from None
    return tensors, metadata


# A1111 prints this many hex digits of the addnet hash (its "shorthash"); Civitai looks files up by them.
SHORTHASH_DIGITS = 12
ADDNET_HASH_KEY = "sshs_model_hash"  # kohya's metadata key for the full addnet hash


def _addnet_hash_of(f: BinaryIO, size: int, name: str) -> str:
    n = _header_length(f, size)
    if n < 0:
        raise AdapterFileError(f"{name}: not a safetensors file (no complete header), so it has no addnet hash")
    f.seek(8 + n)
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def addnet_hash(source: str | os.PathLike | bytes) -> str:
    """The "addnet" hash (64 hex digits) of a safetensors file or its bytes: sha256 of everything after the
    header. A1111's `Lora hashes`, Civitai and kohya's `sshs_model_hash` name adapters by it; because the
    header is left out, editing the metadata does not change it. The file is read in 1 MiB chunks."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _addnet_hash_of(io.BytesIO(source), len(source), "<bytes>")
    with open(source, "rb") as f:
        return _addnet_hash_of(f, os.fstat(f.fileno()).st_size, str(source))


def short_addnet_hash(source: str | os.PathLike | bytes) -> str:
    """The first 12 hex digits of :func:`addnet_hash`, as A1111 writes them into PNG parameters."""
    return addnet_hash(source)[:SHORTHASH_DIGITS]


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
    ignored: dict[str, list[str]] = {}
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
            ignored[name] = unknown  # the module is merged; these extra params are not (reported, not hidden)
        if algo == "loha" and ("hada_t1" in params) != ("hada_t2" in params):
            raise AdapterFileError(f"{source}: module {name} has only one of hada_t1/hada_t2; the file is incomplete")
        tensors = {k: v for k, v in params.items() if k in LOHA_PARAMS + TUCKER_PARAMS + LORA_PARAMS}
        for k, v in list(tensors.items()) + [("dora_scale", params.get("dora_scale"))]:
            if v is not None and not all_finite(v):
                raise AdapterFileError(f"{source}: module {name} has NaN or Inf values in {k}; the adapter is broken "
                                       "(often a diverged training run). Use an earlier checkpoint.")
        alpha = params.get("alpha")
        scale = params.get("scale")
        for k, v in (("alpha", alpha), ("scale", scale)):
            if v is None:
                continue
            if v.numel() != 1:
                raise AdapterFileError(f"{source}: module {name} has a {k} of shape {tuple(v.shape)}; "
                                       f"{k} must be a single number. The file is malformed.")
            if not torch.isfinite(v.float()).all():
                raise AdapterFileError(f"{source}: module {name} has a non-finite {k}; the adapter is broken.")
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
        # Adapter-named modules with parameters we do not know: another algorithm (LoKr, OFT, …).
        adapters = [n for n in unsupported if name_part(n) is not None]
        other = sorted({p for n in adapters for p in unsupported[n]} - KNOWN_PARAMS)
        hint = (f" Its {len(adapters)} adapter modules use parameters of another algorithm ({', '.join(other[:6])}), "
                "which sd-loha does not merge." if other else " Is this an adapter file?")
        raise AdapterFileError(
            f"{source}: no LoHA (hada_w1_a/…) or LoRA (lora_up/lora_down) modules found; keys start with: {sample}."
            + hint
        )
    return ParsedFile(modules=modules, metadata=dict(metadata or {}), unsupported=unsupported, source=source,
                      ignored=ignored)


def load_kohya(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> ParsedFile:
    """Parse a kohya-style adapter (kohya, LyCORIS, OneTrainer and A1111 all use its keys) from a .safetensors
    path or an in-memory state dict. sd_loha.formats.load_adapter picks this reader or PEFT's for a source."""
    if isinstance(source, Mapping):
        return parse_state_dict(source)
    tensors, metadata = read_safetensors(source)
    return parse_state_dict(tensors, source=str(source), metadata=metadata)


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None, *, with_addnet_hash: bool = False) -> Path:
    """Write to a temp file in the same folder and rename it over `path`, so a crash, a kill or a full
    disk never leaves a half-written file under the final name.

    with_addnet_hash: also write `sshs_model_hash` (the :func:`addnet_hash` of this very file, as kohya
    does), which A1111 takes from the metadata instead of hashing the file itself.
    """
    path = Path(path)
    for k, v in tensors.items():
        if not all_finite(v):
            raise AdapterFileError(f"refusing to write {path}: tensor {k} has NaN or Inf values")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    # Serialise in memory and write with Python's file I/O: a full disk then raises a real OSError (ENOSPC)
    # instead of safetensors' opaque error. Adapter files are megabytes, so the extra copy is cheap.
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = serialize(plain, metadata=meta)
    if with_addnet_hash:
        # The hash covers only the bytes after the header, which metadata cannot change: the second
        # serialisation has the same tensor bytes as the first, so the hash is the final file's.
        data = serialize(plain, metadata={**meta, ADDNET_HASH_KEY: addnet_hash(data)})
    return write_atomic(path, data)
