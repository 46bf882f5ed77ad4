"""`sd-loha generate` and GenerationSession: PNG parameters A1111 can read back, strengths, --loha parsing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sd_loha.cli import main
from sd_loha.generate import AdapterSpec, GenerationSession, a1111_parameters

from .loader_helpers import make_loha_file
from .test_hash import reference_addnet_hash

GEN = dict(seed=1, steps=2, width=64, height=64, guidance_scale=7.0, scheduler="euler")


@pytest.fixture(scope="module")
def style_file(tmp_path_factory):
    from sd_loha.models import build_tiny_pipeline

    path = tmp_path_factory.mktemp("gen") / "style.safetensors"
    make_loha_file(build_tiny_pipeline("tiny-sd1"), path, std=0.5)
    return path


def test_cli_generate_writes_png_with_parameters(style_file, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code = main(["generate", "--model", "tiny-sd1", "--loha", f"{style_file}:0.8", "--prompt", "a red poster, Seed: 99",
                 "--seed", "1", "--steps", "2", "--width", "64", "--height", "64", "--output-dir", str(out_dir)])
    assert code == 0
    printed = capsys.readouterr().out.split()
    pngs = sorted(out_dir.glob("*.png"))
    assert [str(p) for p in pngs] == printed and len(pngs) == 1
    assert pngs[0].name == "000-1.png"  # the seed in the name comes from the fields, not from the prompt
    image = Image.open(pngs[0])
    assert image.size == (64, 64)
    text = image.text["parameters"]
    first, fields = text.splitlines()[0], text.splitlines()[-1]
    assert first == "a red poster, Seed: 99 <lora:style:0.8>"
    shorthash = reference_addnet_hash(style_file.read_bytes())[:12]  # what A1111 and Civitai look the file up by
    for part in ("Steps: 2", "Seed: 1", "Size: 64x64", "Model: tiny-sd1", f'Lora hashes: "style: {shorthash}"'):
        assert part in fields, part


def test_strengths_change_the_image(style_file):
    session = GenerationSession("tiny-sd1", device="cpu")
    plain = np.asarray(session.generate("a poster", **GEN)[0][0])
    session.set_adapters([AdapterSpec(str(style_file), 0.0)])
    zero = np.asarray(session.generate("a poster", **GEN)[0][0])
    session.set_adapters([AdapterSpec(str(style_file), 1.0)])  # re-strengthened, not reloaded
    one, text = session.generate("a poster", **GEN)[0]
    one = np.asarray(one)
    assert np.array_equal(zero, plain)  # strength 0 is the base model exactly
    assert np.abs(one.astype(int) - zero.astype(int)).max() > 0
    assert "<lora:style:1>" in text
    session.set_adapters([])
    assert np.array_equal(np.asarray(session.generate("a poster", **GEN)[0][0]), plain)


def test_te_strength_tag_and_external_adapter(style_file):
    session = GenerationSession("tiny-sd1", device="cpu")
    from sd_loha import apply_loha, list_loha

    apply_loha(session.pipe, style_file, strength=0.3)  # merged outside the session under the same name
    session.set_adapters([AdapterSpec(str(style_file), 0.5, 0.25)])
    assert list_loha(session.pipe) == {"style": (0.5, 0.25)}
    text = a1111_parameters("p", "", steps=2, sampler="Euler", cfg=7, seed=3, width=64, height=64, model="tiny-sd1",
                            adapters=session.adapters)
    assert "<lora:style:0.25:0.5>" in text  # A1111 order: <lora:name:te:unet>


@pytest.mark.parametrize("text,expected", [
    ("style.safetensors", ("style.safetensors", 1.0, None)),
    ("style.safetensors:0.8", ("style.safetensors", 0.8, None)),
    ("style.safetensors:0.8:0.4", ("style.safetensors", 0.8, 0.4)),
    ("C:\\loras\\x.safetensors:0.5", ("C:\\loras\\x.safetensors", 0.5, None)),
    ("C:\\loras\\x.safetensors", ("C:\\loras\\x.safetensors", 1.0, None)),
    ("C:\\loras\\x.safetensors:1:-0.5", ("C:\\loras\\x.safetensors", 1.0, -0.5)),
    ("/data/a:b/x.safetensors:0.7", ("/data/a:b/x.safetensors", 0.7, None)),
    ("/data/v1.5:ft/x.safetensors", ("/data/v1.5:ft/x.safetensors", 1.0, None)),
])
def test_adapter_spec_parse(text, expected):
    spec = AdapterSpec.parse(text)
    assert (spec.path, spec.strength, spec.te_strength) == expected


@pytest.mark.parametrize("text", ["x.safetensors:nan", "x.safetensors:inf", ":0.5"])
def test_adapter_spec_parse_rejects(text):
    with pytest.raises(ValueError):
        AdapterSpec.parse(text)
