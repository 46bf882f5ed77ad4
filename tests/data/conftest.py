"""Helpers that build real (small) image files in tmp_path."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def save_rgb(path: Path, size=(64, 64), color=(200, 30, 30), fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt, **kw)
    return path


def save_noise(path: Path, size=(64, 64), fmt: str | None = None, seed: int = 0, **kw) -> Path:
    """Incompressible content, so cutting the file really removes pixel data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return path


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width×height with almost no pixel data —
    a decompression bomb as far as the header is concerned."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")
    )
    return path


def write_caption(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


@pytest.fixture
def make_dataset(tmp_path):
    """make_dataset({"rel/path.png": (w, h) or (w, h, color), "rel/cap.txt": "text"}) -> root."""

    def _make(spec: dict, root: Path | None = None) -> Path:
        root = root or tmp_path / "train"
        root.mkdir(parents=True, exist_ok=True)
        for i, (rel, val) in enumerate(spec.items()):
            p = root / rel
            if isinstance(val, (str, bytes)):
                write_caption(p, val)
            else:
                color = val[2] if len(val) > 2 else ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
                save_rgb(p, size=(val[0], val[1]), color=color)
        return root

    return _make
