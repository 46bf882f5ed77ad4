"""Regularization images (reg_data_dir): kohya's balance of an epoch, the preflight's account of it, and the
per-sample loss weight (prior_loss_weight) the batches carry."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from sd_loha.data import DatasetError, TrainDataset, collate_examples, run_preflight
from sd_loha.data.preflight import balance_regularization
from sd_loha.data.scan import ImageItem


def _kohya_balance(num_train_images: int, repeats: list[int]) -> list[int]:
    """sd-scripts' DreamBoothDataset loop, transcribed: register reg images in order with their repeats until
    n >= num_train_images, then raise num_repeats of the registered ones by one each, in order. 0 = not used."""

    class Info:
        def __init__(self, r: int) -> None:
            self.num_repeats = r

    infos = [Info(r) for r in repeats]
    registered: list[Info] = []
    n, first_loop = 0, True
    while n < num_train_images:
        for info in infos:
            if first_loop:
                registered.append(info)
                n += info.num_repeats
            else:
                info.num_repeats += 1
                n += 1
            if n >= num_train_images:
                break
        first_loop = False
    return [i.num_repeats if i in registered else 0 for i in infos]


def _items(repeats: list[int]) -> list[ImageItem]:
    return [ImageItem(path=Path(f"/reg/{i}.png"), caption="a person", repeats=r, subset_dir=Path("/reg"),
                      width=64, height=64) for i, r in enumerate(repeats)]


@pytest.mark.parametrize("train, repeats, expected", [
    (10, [1, 1, 1], [4, 3, 3]),  # fewer reg samples: one more repeat each, in order, until 10
    (5, [2, 2, 2, 2], [2, 2, 2]),  # more: the first ones until the count is reached, the 4th not used
    (3, [5, 1], [5]),  # the last one used keeps all its repeats
    (6, [2, 1], [4, 2]),
])
def test_balance_by_hand(train, repeats, expected):
    got = balance_regularization(train, _items(repeats))
    assert [it.repeats for it in got] == expected
    assert [it.path.name for it in got] == [f"{i}.png" for i in range(len(expected))]


def test_balance_matches_kohyas_loop():
    rng = random.Random(0)
    for _ in range(300):
        repeats = [rng.randint(1, 5) for _ in range(rng.randint(1, 6))]
        train = rng.randint(1, 40)
        want = [r for r in _kohya_balance(train, repeats) if r]
        assert [it.repeats for it in balance_regularization(train, _items(repeats))] == want, (train, repeats)


def _dataset(make_dataset, tmp_path: Path) -> tuple[Path, Path]:
    train = make_dataset({"3_style/a.png": (64, 64), "3_style/b.png": (64, 64)}, tmp_path / "train")
    reg = make_dataset({f"1_person/r{i}.png": (64, 64) for i in range(4)}, tmp_path / "reg")
    return train, reg


def test_preflight_balances_and_reports(make_dataset, tmp_path):
    train, reg = _dataset(make_dataset, tmp_path)
    rep = run_preflight(train, resolution=64, min_bucket_reso=64, max_bucket_reso=128, reg_data_dir=reg,
                        prior_loss_weight=0.25, batch_size=2)
    # 2 images x 3 repeats = 6 training samples; 4 reg images at 1 repeat fall short, so 2, 2, 1, 1
    assert [(it.path.name, it.repeats, it.is_reg) for it in rep.reg_items] == [
        ("r0.png", 2, True), ("r1.png", 2, True), ("r2.png", 1, True), ("r3.png", 1, True)]
    assert rep.num_samples == 12 and rep.steps_per_epoch == 6
    assert (rep.reg.samples, rep.reg.train_samples, rep.reg.images_used, rep.reg.images_unused) == (6, 6, 4, 0)
    text = rep.format()
    assert f"regularization: {reg}: 4 found, 4 used" in text
    assert "6 regularization samples per epoch for 6 training samples" in text and "prior_loss_weight 0.25" in text
    assert rep.to_dict()["regularization"]["samples"] == 6

    ds = TrainDataset(rep, prior_loss_weight=0.25)
    assert len(ds) == 12
    weights = sorted(float(ds[i]["loss_weight"]) for i in range(len(ds)))
    assert weights == [0.25] * 6 + [1.0] * 6
    batch = collate_examples([ds[0], ds[len(ds) - 1]])  # a training sample, then a regularization one
    assert torch.equal(batch["loss_weight"], torch.tensor([1.0, 0.25]))
    assert "loss_mask" not in batch


def test_unused_reg_images_are_reported_and_never_validation(make_dataset, tmp_path):
    train = make_dataset({f"t{i}.png": (64, 64) for i in range(4)}, tmp_path / "train")
    reg = make_dataset({f"r{i}.png": (64, 64) for i in range(5)}, tmp_path / "reg")
    rep = run_preflight(train, resolution=64, min_bucket_reso=64, reg_data_dir=reg, validation_split=0.25)
    assert len(rep.items) == 3 and len(rep.validation_items) == 1  # the split takes training images only
    assert [it.repeats for it in rep.reg_items] == [1, 1, 1]  # balanced against the 3 left for training
    assert rep.reg.images_unused == 2
    assert any("2 of 5 regularization images are not used" in w for w in rep.warnings)
    assert not any(it.is_reg for it in rep.validation_items)


def test_reg_folder_problems_are_clear_errors(make_dataset, tmp_path):
    train = make_dataset({"a.png": (64, 64)}, tmp_path / "train")
    with pytest.raises(DatasetError, match="reg_data_dir not found"):
        run_preflight(train, resolution=64, min_bucket_reso=64, reg_data_dir=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="reg_data_dir .* holds no usable images"):
        run_preflight(train, resolution=64, min_bucket_reso=64, reg_data_dir=tmp_path / "empty")
