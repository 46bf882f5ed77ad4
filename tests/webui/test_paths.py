"""The allowed-folder policy: every typed path is resolved and must lie in the data/models/outputs folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from webui.paths import DEMO_IMAGES, PathPolicy, PathRefused, loopback


@pytest.fixture
def policy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return PathPolicy(tmp_path / "data", tmp_path / "models", tmp_path / "output")


def test_folders_are_created_and_are_exactly_the_allowed_paths(policy, tmp_path):
    assert policy.data_dir.is_dir() and policy.models_dir.is_dir() and policy.outputs_dir.is_dir()
    assert policy.allowed_paths() == [str(tmp_path / "data"), str(tmp_path / "models"), str(tmp_path / "output"),
                                      str(DEMO_IMAGES)]


def test_paths_inside_are_resolved(policy, tmp_path):
    (policy.data_dir / "style").mkdir()
    # relative to the allowed folder, relative to the working folder, absolute: all the same folder
    assert policy.resolve("style", "dataset", must_exist=True) == tmp_path / "data" / "style"
    assert policy.resolve("data/style", "dataset", must_exist=True) == tmp_path / "data" / "style"
    assert policy.resolve(str(tmp_path / "data" / "style"), "dataset") == tmp_path / "data" / "style"
    assert policy.resolve("data/../data/style", "dataset") == tmp_path / "data" / "style"
    # new output folders may not exist yet
    assert policy.resolve("run1", "output_dir") == tmp_path / "output" / "run1"
    # the bundled demo images are readable, not writable
    assert policy.resolve(str(DEMO_IMAGES), "dataset", must_exist=True) == DEMO_IMAGES
    with pytest.raises(PathRefused):
        policy.resolve(str(DEMO_IMAGES / "out"), "output_dir")


@pytest.mark.parametrize("bad", ["../..", "../../etc", "/etc", "/etc/passwd", "~", "data/../../x", "output/../.."])
def test_paths_outside_are_refused(policy, bad):
    with pytest.raises(PathRefused, match="outside the folders this web UI may use"):
        policy.resolve(bad, "dataset")
    with pytest.raises(PathRefused, match="outside the folders"):
        policy.resolve(bad, "output_dir")


def test_symlinks_pointing_out_are_refused(policy, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.safetensors").write_bytes(b"x")
    (policy.data_dir / "link").symlink_to(secret, target_is_directory=True)
    with pytest.raises(PathRefused, match="symbolic link"):
        policy.resolve("link", "dataset", must_exist=True)
    (policy.outputs_dir / "file.safetensors").symlink_to(secret / "key.safetensors")
    with pytest.raises(PathRefused, match="outside"):
        policy.check_adapter("file.safetensors")
    # a link that stays inside is fine
    (policy.data_dir / "real").mkdir()
    (policy.data_dir / "alias").symlink_to(policy.data_dir / "real", target_is_directory=True)
    assert policy.resolve("alias", "dataset", must_exist=True) == policy.data_dir / "real"


def test_each_use_has_its_own_folders(policy):
    (policy.data_dir / "x.safetensors").write_bytes(b"x")
    with pytest.raises(PathRefused, match="outside"):  # adapters come from outputs or models, not data
        policy.check_adapter(str(policy.data_dir / "x.safetensors"))
    with pytest.raises(PathRefused, match="outside"):  # runs are written to outputs only
        policy.resolve(str(policy.models_dir / "run"), "output_dir")


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "weights.pth"])
def test_pickle_files_are_refused(policy, name):
    (policy.models_dir / name).write_bytes(b"x")
    with pytest.raises(PathRefused, match="pickle"):
        policy.check_model(str(policy.models_dir / name))
    (policy.outputs_dir / name).write_bytes(b"x")
    with pytest.raises(PathRefused, match="pickle"):
        policy.check_adapter(name)


def test_models(policy):
    assert policy.check_model("tiny-sd1") == "tiny-sd1"
    assert policy.check_model("stabilityai/sdxl-turbo") == "stabilityai/sdxl-turbo"  # a hub id: no local path
    folder = policy.models_dir / "sd15"
    folder.mkdir()
    with pytest.raises(PathRefused, match="model_index.json"):
        policy.check_model("sd15")
    (folder / "model_index.json").write_text("{}")
    assert policy.check_model("sd15") == str(folder)
    (policy.models_dir / "m.safetensors").write_bytes(b"x")
    assert policy.check_model("m.safetensors") == str(policy.models_dir / "m.safetensors")
    with pytest.raises(PathRefused):
        policy.check_model("/etc/passwd")
    with pytest.raises(PathRefused):
        policy.check_model("")


def test_nothing_typed(policy):
    with pytest.raises(PathRefused, match="no path given"):
        policy.resolve("  ", "dataset")


def test_loopback():
    assert loopback("127.0.0.1") and loopback("localhost") and loopback("::1")
    assert not loopback("0.0.0.0") and not loopback("192.168.1.5")


def test_listings_skip_states_and_non_adapters(policy):
    import torch
    from safetensors.torch import save_file

    run = policy.outputs_dir / "run"
    (run / "state-00000010").mkdir(parents=True)
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(1)}, run / "a.safetensors")
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(1)}, run / "state-00000010" / "network.safetensors")
    save_file({"model.diffusion_model.x": torch.zeros(1)}, policy.models_dir / "base.safetensors")
    assert policy.adapter_files() == [str(run / "a.safetensors")]
    assert str(policy.models_dir / "base.safetensors") in policy.model_choices()
    assert policy.model_choices()[:4] == ["toy-sd1", "tiny-sd1", "tiny-sd2", "tiny-sdxl"]  # the pretrained default first
    assert str(Path(policy.data_dir)) not in policy.dataset_choices()
