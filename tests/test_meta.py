"""`sd-loha meta`: metadata shown and edited without touching the tensors. The checks are against the file's
own bytes (the data section after the header is byte-identical) and the addnet hash recomputed by hashlib
here, plus safetensors' own reader for the new metadata; a failed write must leave the original whole."""

from __future__ import annotations

import base64
import hashlib
import os
import struct

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from sd_loha.cli import main
from sd_loha.io import AdapterFileError, addnet_hash
from sd_loha.meta import edit_metadata, read_metadata, thumbnail_data_url


def _data_section(path) -> bytes:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0  # safetensors' header alignment kept
    return raw[8 + n:]


@pytest.fixture
def adapter(tmp_path):
    path = tmp_path / "style.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_x.hada_w1_a": torch.randn(4, 2, generator=g), "lora_unet_x.hada_w1_b": torch.randn(2, 3, generator=g),
               "lora_unet_x.hada_w2_a": torch.randn(4, 2, generator=g).half(), "lora_unet_x.hada_w2_b": torch.randn(2, 3, generator=g),
               "lora_unet_x.alpha": torch.tensor(1.0)}
    save_file(tensors, path, metadata={"ss_network_module": "lycoris.kohya", "modelspec.title": "old",
                                       "ss_tag_frequency": '{"a": {"b": 1}}'})
    return path, tensors


def test_edit_keeps_tensor_bytes_and_addnet_hash(adapter, tmp_path):
    path, tensors = adapter
    data, before = _data_section(path), hashlib.sha256(_data_section(path)).hexdigest()
    thumb = tmp_path / "t.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(thumb)
    changes = {"modelspec.title": "Poster style", "modelspec.trigger_phrase": "pstr, ink frame",
               "modelspec.description": "flat colours — ünïcode", "modelspec.thumbnail": thumbnail_data_url(thumb),
               "ss_tag_frequency": None}
    meta = edit_metadata(path, changes)
    assert _data_section(path) == data
    assert addnet_hash(path) == before
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta == read_metadata(path)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k
    assert meta["modelspec.description"] == "flat colours — ünïcode" and "ss_tag_frequency" not in meta
    assert meta["ss_network_module"] == "lycoris.kohya"
    url = meta["modelspec.thumbnail"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == thumb.read_bytes()


def test_failed_write_leaves_the_original(adapter, monkeypatch):
    path, _ = adapter
    original = path.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="disk is full"):
        edit_metadata(path, {"modelspec.title": "new"})
    assert path.read_bytes() == original
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_refuses_what_is_not_safetensors(tmp_path):
    bad = tmp_path / "half.safetensors"
    bad.write_bytes(struct.pack("<Q", 500) + b'{"__metadata__"')
    with pytest.raises(AdapterFileError, match="half.safetensors"):
        edit_metadata(bad, {"modelspec.title": "x"})
    with pytest.raises(AdapterFileError, match="pickle"):
        read_metadata(tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="not a PNG"):
        thumbnail_data_url(bad)


def test_cli_meta_shows_and_edits(adapter, tmp_path, capsys):
    path, _ = adapter
    before = addnet_hash(path)
    out = tmp_path / "edited.safetensors"
    thumb = tmp_path / "t.png"
    Image.new("RGB", (4, 4)).save(thumb)
    assert main(["meta", str(path), "--title", "T", "--trigger", "pstr", "--description", "d", "--thumbnail", str(thumb),
                 "--set", "ss_output_name=style", "--unset", "ss_tag_frequency", "--out", str(out)]) == 0
    shown = capsys.readouterr()
    assert "addnet hash" in shown.err and "unchanged" in shown.err
    assert "modelspec.title: T   (--title)" in shown.out and "image/png" in shown.out and "base64," not in shown.out
    assert read_metadata(path)["modelspec.title"] == "old"  # --out: the source is left alone
    assert addnet_hash(out) == before and read_metadata(out)["ss_output_name"] == "style"
    assert main(["meta", str(out), "--json"]) == 0
    assert '"modelspec.trigger_phrase": "pstr"' in capsys.readouterr().out
    assert main(["meta", str(out), "--set", "novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


# VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) peak over fork and exec into ru_maxrss.
_PEAK_RSS = """
import sys
from sd_loha.meta import edit_metadata
if sys.argv[1] == "edit":
    edit_metadata(sys.argv[2], {"modelspec.title": "new"})
print(next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:")))
"""


def test_edit_reads_only_the_header(tmp_path):
    """Editing a 256 MiB file in place takes no memory for its tensors: the process peaks within a small part of
    the file's size above a process that only imports the module (the tools used to read it two or three times)."""
    import subprocess
    import sys

    path = tmp_path / "big.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.ones(64 << 20)}, path, metadata={"modelspec.title": "old"})
    data = _data_section(path)
    size = path.stat().st_size

    def peak(mode: str) -> int:
        res = subprocess.run([sys.executable, "-c", _PEAK_RSS, mode, str(path)], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return int(res.stdout.split()[-1])

    extra = peak("edit") - peak("import")
    assert extra < size // 8, f"the edit took {extra / 2**20:.0f} MiB more than the import, for a {size / 2**20:.0f} MiB file"
    assert read_metadata(path)["modelspec.title"] == "new" and _data_section(path) == data
