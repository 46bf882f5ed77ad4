"""bench/bench_tools_memory.py's pieces (the figures themselves live in bench/RESULTS.md): the LoHA it writes is a
real SDXL adapter by name and shape, and the peak it reports is the tool's own, not the benchmark process's."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_tools_memory as bench  # noqa: E402

from sd_loha.formats import load_adapter  # noqa: E402
from sd_loha.naming import text_encoder_module_names, unet_module_names  # noqa: E402


def test_loha_names_and_shapes_are_sdxl_layers(tmp_path):
    path = tmp_path / "loha.safetensors"
    n = bench.make_loha(path, "small", rank=2)
    parsed = load_adapter(path)
    assert len(parsed.modules) == n > 0 and not parsed.unsupported
    unet, encoders = bench.reference_models("small")
    tables = {"unet": (unet, unet_module_names(unet)),
              "te1": (encoders["text_encoder"], text_encoder_module_names(encoders["text_encoder"], "lora_te1")),
              "te2": (encoders["text_encoder_2"], text_encoder_module_names(encoders["text_encoder_2"], "lora_te2"))}
    seen = set()
    for name, mod in parsed.modules.items():
        part = next(p for p, (_, table) in tables.items() if name in table)
        model, table = tables[part]
        layer = model.get_submodule(table[name])
        assert (mod.out_features(), mod.in_features()) == tuple(layer.weight.shape), name
        seen.add(part)
    assert seen == {"unet", "te1", "te2"}

    block = tmp_path / "block.safetensors"
    m = bench.make_loha(block, "small", rank=2, block="down_blocks.1")
    names = unet_module_names(unet)
    assert 0 < m < n and all(names[k].startswith("down_blocks.1.") for k in load_adapter(block).modules)


def test_peak_is_the_tools_own_not_the_parents(tmp_path):
    """The benchmark process holds 512 MiB while it measures `sd-loha meta` of a small file: the reported peak is the
    tool's (far below that), which ru_maxrss would not give (Linux copies the parent's peak into the child's)."""
    path = tmp_path / "loha.safetensors"
    bench.make_loha(path, "small", rank=2)
    ballast = torch.ones(128 << 20)  # 512 MiB resident in this process
    run = bench.measure("meta", ["meta", str(path), "--json"], ROOT, threads=1)
    assert ballast.sum() > 0
    assert run.returncode == 0 and not run.stopped, run.stderr_tail
    assert 0.05 < run.peak_rss_gib < 0.45, run.peak_rss_gib
