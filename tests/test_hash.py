"""The "addnet" hash A1111, Civitai and kohya name adapter files by (FORMAT.md, "How tools identify a file"):
sha256 of the bytes after the safetensors header; A1111 prints its first 12 hex digits as `Lora hashes`."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from safetensors.torch import save_file

from sd_loha import add_loha
from sd_loha.cli import main
from sd_loha.generate import AdapterSpec, a1111_parameters
from sd_loha.io import (
    AdapterFileError,
    addnet_hash,
    read_safetensors,
    short_addnet_hash,
)
from sd_loha.models import build_tiny_pipeline

from .loader_helpers import randomize


def reference_addnet_hash(data: bytes) -> str:
    """Straight from the definition, on the whole file in memory."""
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """One small LoHA module."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"hada_w1_a": (8, 2), "hada_w1_b": (2, 8), "hada_w2_a": (8, 2), "hada_w2_b": (2, 8)}
    return {"lora_unet_x.alpha": torch.tensor(1.0),
            **{f"lora_unet_x.{k}": torch.randn(*v, generator=g) for k, v in shapes.items()}}


def test_hash_is_sha256_after_the_header_and_ignores_metadata(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(_tensors(), str(a), metadata={"ss_output_name": "a"})
    save_file(_tensors(), str(b), metadata={"ss_output_name": "a much longer name", "modelspec.title": "b"})
    data_a, data_b = a.read_bytes(), b.read_bytes()
    assert hashlib.sha256(data_a).hexdigest() != hashlib.sha256(data_b).hexdigest()  # the files differ
    assert addnet_hash(a) == reference_addnet_hash(data_a) == addnet_hash(b)  # only in their metadata
    assert addnet_hash(data_a) == addnet_hash(a)
    assert short_addnet_hash(a) == reference_addnet_hash(data_a)[:12] and re.fullmatch(r"[0-9a-f]{12}", short_addnet_hash(a))
    save_file(_tensors(seed=1), str(b))
    assert addnet_hash(b) != addnet_hash(a)  # other tensors, other hash


def test_hash_streams_files_larger_than_one_chunk(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.arange(700_000, dtype=torch.float32)}, str(path))  # 2.8 MB
    assert addnet_hash(path) == reference_addnet_hash(path.read_bytes())


def test_hash_of_a_file_without_a_header_is_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(AdapterFileError, match="bad.safetensors"):
        addnet_hash(bad)


def test_saved_network_carries_its_own_hash(tmp_path):
    net = add_loha(build_tiny_pipeline("tiny-sd1"), preset="attn-only", rank=2)
    randomize(net.parameters(), seed=0)
    path = net.save(tmp_path / "net.safetensors", metadata={"ss_output_name": "net"})
    _, meta = read_safetensors(path)
    assert meta["sshs_model_hash"] == reference_addnet_hash(path.read_bytes())


def test_png_parameters_lora_hashes_field(tmp_path):
    files = []
    for i, name in enumerate(("style", "my,odd")):
        files.append(tmp_path / f"{name}.safetensors")
        save_file(_tensors(seed=i), str(files[-1]))
    text = a1111_parameters("p", "", steps=2, sampler="Euler", cfg=7, seed=3, width=64, height=64, model="tiny-sd1",
                            adapters=[AdapterSpec(str(f), 0.5) for f in files])
    h = [reference_addnet_hash(f.read_bytes())[:12] for f in files]
    # A1111: "alias: shorthash" joined by ", ", the alias without ':' or ',', the value JSON-quoted.
    assert f'Lora hashes: "style: {h[0]}, myodd: {h[1]}"' in text.splitlines()[-1]
    assert "<lora:style:0.5> <lora:my,odd:0.5>" in text.splitlines()[0]


def test_inspect_shows_the_hash(tmp_path, capsys):
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), str(path))
    assert main(["inspect", str(path)]) == 0
    assert f"addnet hash:   {reference_addnet_hash(path.read_bytes())[:12]}" in capsys.readouterr().out
