"""Show and edit an adapter file's metadata (kohya's `ss_*`, SAI's `modelspec.*`) without touching its tensors.

A safetensors file is an 8-byte header length, a JSON header (`__metadata__` plus each tensor's dtype, shape
and byte offsets into the data), then the tensor data. An edit rewrites only the header: the data bytes are
copied verbatim, so the tensors stay byte-identical and the addnet hash (sha256 of the bytes after the
header, what A1111's `Lora hashes` and Civitai name a file by) stays the same. Only the header is read and
parsed; the data is streamed in 1 MiB chunks into a temp file (:func:`sd_loha.atomic.replace_file_atomic`)
that then replaces the target, so an edit needs no memory for the tensors and a failed write leaves the
original whole.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .atomic import replace_file_atomic
from .io import read_safetensors_header

__all__ = ["FIELDS", "read_metadata", "edit_metadata", "thumbnail_data_url", "format_metadata"]

# The fields `sd-loha meta` edits by name -> their modelspec key (what A1111, ComfyUI and Civitai read).
FIELDS: dict[str, str] = {
    "title": "modelspec.title",
    "trigger": "modelspec.trigger_phrase",
    "description": "modelspec.description",
    "thumbnail": "modelspec.thumbnail",
}

_IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_HEADER_ALIGN = 8  # safetensors pads its header with spaces so the data starts 8-byte aligned


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's `__metadata__` (empty when it has none)."""
    header, _ = read_safetensors_header(path)
    return dict(header.get("__metadata__") or {})


def thumbnail_data_url(image: str | os.PathLike) -> str:
    """A `data:image/...;base64,` URL of an image file (PNG, JPEG or WebP; its bytes as they are), the form
    `modelspec.thumbnail` takes."""
    p = Path(image)
    data = p.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = im.format
    except UnidentifiedImageError:
        kind = None
    if kind not in _IMAGE_TYPES:
        raise ValueError(f"thumbnail {p}: not a {', '.join(_IMAGE_TYPES)} image; give a PNG (or JPEG/WebP) file")
    return f"data:{_IMAGE_TYPES[kind]};base64,{base64.b64encode(data).decode('ascii')}"


def _header_bytes(header: Mapping) -> bytes:
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % _HEADER_ALIGN)


def edit_metadata(path: str | os.PathLike, changes: Mapping[str, str | None],
                  out: str | os.PathLike | None = None) -> dict[str, str]:
    """Set (a string) or remove (None) metadata keys of a safetensors file and write it to `out` (default: in
    place), atomically, with the tensor bytes copied verbatim. Returns the new metadata."""
    src = Path(path)
    bad = [k for k, v in changes.items() if not isinstance(k, str) or not (v is None or isinstance(v, str))]
    if bad:
        raise ValueError(f"{src}: metadata keys and values must be strings (None removes a key): {bad[:5]}")
    header, data_start = read_safetensors_header(src)
    meta = dict(header.get("__metadata__") or {})
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    header = {k: v for k, v in header.items() if k != "__metadata__"}
    if meta:
        header = {"__metadata__": meta, **header}
    head = _header_bytes(header)
    with replace_file_atomic(out if out is not None else src) as tmp, open(tmp, "wb") as dst, open(src, "rb") as data:
        dst.write(struct.pack("<Q", len(head)) + head)
        data.seek(data_start)
        shutil.copyfileobj(data, dst, 1 << 20)
    return meta


def _shown(value: str, width: int) -> str:
    if value.startswith("data:") and ";base64," in value:
        kind = value[5:value.index(";")]
        return f"{kind}, {len(value) * 3 // 4} bytes (base64)"
    return value if len(value) <= width else value[: width - 3] + "..."


def format_metadata(meta: Mapping[str, str], width: int = 120) -> str:
    """The metadata as `sd-loha meta` prints it: the editable fields first, then modelspec.*, ss_*, the rest."""
    named = {v: k for k, v in FIELDS.items()}
    order = sorted(meta, key=lambda k: (k not in named, not k.startswith("modelspec."), not k.startswith("ss_"), k))
    lines = [f"{k}: {_shown(meta[k], width)}" + (f"   (--{named[k]})" if k in named else "") for k in order]
    return "\n".join(lines) if lines else "(no metadata)"
