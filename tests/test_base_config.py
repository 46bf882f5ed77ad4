"""`base_config`: an SD 3.x single file that holds the MMDiT alone (as Stability ships sd3.5_*.safetensors) is
completed from a diffusers folder, through each entry point a user types: the trainer's option (a shipped config
through the CLI), `generate --base-config` and `merge --base-config`; without it, the error names the option."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sd_loha import cli
from sd_loha.merge import apply_loha
from sd_loha.models import ModelLoadError, build_tiny_pipeline, load_pipeline
from sd_loha.train.config import ConfigError, load
from sd_loha.train.checks import check_paths
from sd_loha.train.flow import FLOW_DIFFUSERS
from sd_loha.version import diffusers_at_least

from .test_sd3_model import _original_layout
from .train.helpers import DEMO_IMAGES, REPO


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """(the MMDiT alone in the original layout, tiny-sd3's diffusers folder)."""
    root = tmp_path_factory.mktemp("base_config")
    sd3 = build_tiny_pipeline("tiny-sd3")
    folder = root / "tiny-sd3"
    sd3.save_pretrained(folder)
    path = root / "mmdit.safetensors"
    save_file(_original_layout(sd3.transformer), str(path))
    return path, folder


def test_train_from_a_single_file_completed_by_base_config(single, tmp_path, capsys):
    if not diffusers_at_least(FLOW_DIFFUSERS):
        pytest.skip("SD 3.x training needs diffusers 0.33 (refused by name below it: test_shipped_configs)")
    path, folder = single
    args = ["train", "--config", str(REPO / "train_configs" / "sd35_style.toml")]
    common = [f"pretrained_model={path}", f"train_data_dir={DEMO_IMAGES}", "resolution=64", "min_bucket_reso=64",
              "max_bucket_reso=128", "bucket_reso_steps=64", "max_train_steps=2", "sample_every_n_steps=100",
              "save_every_n_steps=100", "sample_steps=2", "sample_width=64", "sample_height=64"]
    for o in common + [f"output_dir={tmp_path / 'bare'}"]:
        args += ["--set", o]
    assert cli.main(args) != 0
    assert "set base_config" in capsys.readouterr().err
    for o in [f"base_config={folder}", f"output_dir={tmp_path / 'out'}"]:
        args += ["--set", o]
    assert cli.main(args) == 0
    report = apply_loha(load_pipeline("tiny-sd3"), tmp_path / "out" / "sd35_style.safetensors", strict=True)
    assert report.patched["transformer"] > 10


def test_base_config_is_checked_before_any_model_loads(single, tmp_path):
    path, folder = single

    def problems(**kw) -> str:
        cfg = load({"train_data_dir": str(DEMO_IMAGES), "output_dir": str(tmp_path / "o"), **kw}).config
        with pytest.raises(ConfigError) as e:
            check_paths(cfg)
        return str(e.value)

    assert "is not a file" in problems(pretrained_model="tiny-sd3", base_config=str(folder))
    assert "does not exist" in problems(pretrained_model=str(path), base_config=str(tmp_path / "nowhere" / "x"))
    assert "no model_index.json" in problems(pretrained_model=str(path), base_config=str(tmp_path))


def test_generate_and_merge_take_base_config(single, tmp_path, capsys):
    path, folder = single
    with pytest.raises(ModelLoadError, match="--base-config"):
        load_pipeline(str(path))
    gen = ["generate", "--model", str(path), "--prompt", "a red dog", "--seed", "1", "--steps", "2", "--width", "64",
           "--height", "64", "--device", "cpu", "--guidance", "4.5"]
    assert cli.main(gen + ["--output-dir", str(tmp_path / "a"), "--base-config", str(folder)]) == 0
    assert cli.main(gen + ["--output-dir", str(tmp_path / "b"), "--model", "tiny-sd3"]) == 0
    a, b = (np.asarray(Image.open(next((tmp_path / d).glob("*.png"))), dtype=np.int16) for d in "ab")
    assert np.abs(a - b).max() <= 1  # the completed file is tiny-sd3 (its MMDiT round-tripped through the file)

    from tests.sd3_helpers import write_sd3_loha

    adapter = write_sd3_loha(build_tiny_pipeline("tiny-sd3"), tmp_path / "style.safetensors")
    out = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(path), "--base-config", str(folder), "--loha", f"{adapter}:1",
                     "--out", str(out), "--dtype", "fp32"]) == 0
    merged = load_pipeline(str(out)).transformer.state_dict()
    reference = build_tiny_pipeline("tiny-sd3")
    apply_loha(reference, adapter)
    want = reference.transformer.state_dict()
    assert max((merged[k] - want[k]).abs().max().item() for k in want) < 1e-5
    assert any(not torch.equal(want[k], build_tiny_pipeline("tiny-sd3").transformer.state_dict()[k]) for k in want)
