"""Loss masks (masked_loss): found for each image, refused with the file named when missing or misfit, and carried
onto the latents exactly where the image's own pixels land (bucket resize, random crop, flip, latent cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sd_loha.data import DatasetError, LatentCache, TrainDataset, collate_examples, run_preflight

# 250x80 at resolution 128 (buckets 64-256 step 64): bucket 192x64, cover-resized to 200x64, so every example is
# resized and cropped (8 px of slack for random_crop).
SIZE = (250, 80)
PREFLIGHT = dict(resolution=128, min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=64)


def _shape(draw: ImageDraw.ImageDraw, fill) -> None:
    """An asymmetric figure: a bar near the left edge, a square right of centre, a grey strip."""
    draw.rectangle((8, 8, 40, 72), fill=fill[0])
    draw.rectangle((150, 16, 190, 56), fill=fill[0])
    draw.rectangle((200, 0, 249, 30), fill=fill[1])


def _image_and_mask(tmp_path: Path, name: str = "a") -> tuple[Path, Path]:
    """The same figure as the image's red channel and as a mask file's grey values."""
    train, masks = tmp_path / "train", tmp_path / "masks"
    train.mkdir(exist_ok=True)
    masks.mkdir(exist_ok=True)
    img = Image.new("RGB", SIZE, (0, 40, 90))
    _shape(ImageDraw.Draw(img), [(255, 40, 90), (128, 40, 90)])
    img.save(train / f"{name}.png")
    (train / f"{name}.txt").write_text("a figure")
    mask = Image.new("L", SIZE, 0)
    _shape(ImageDraw.Draw(mask), [255, 128])
    mask.save(masks / f"{name}.png")
    return train, masks


def _area(x: torch.Tensor) -> torch.Tensor:
    """(H, W) -> (H/8, W/8): the mean of each 8x8 block, by reshaping."""
    h, w = x.shape
    return x.reshape(h // 8, 8, w // 8, 8).mean(dim=(1, 3))


def _red01(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels[0] + 1) / 2  # [-1, 1] -> [0, 1], as the mask's value / 255


def test_mask_lands_where_the_image_lands(tmp_path):
    train, masks = _image_and_mask(tmp_path)
    rep = run_preflight(train, conditioning_data_dir=masks, **PREFLIGHT)
    assert rep.items[0].bucket == (192, 64) and rep.items[0].mask_path == masks / "a.png"
    ds = TrainDataset(rep, flip_aug=True, random_crop=True, seed=3)
    seen = set()
    for epoch in range(12):
        ex = ds[(0, epoch)]
        seen.add((ex["flipped"], ex["crop_top_left"]))
        assert ex["loss_mask"].shape == (1, 8, 24)
        torch.testing.assert_close(ex["loss_mask"][0], _area(_red01(ex["pixel_values"])), atol=1.5 / 255, rtol=0)
    assert {f for f, _ in seen} == {True, False} and len({c for _, c in seen}) > 2  # flips and several crops


def test_alpha_mask_follows_the_image(tmp_path):
    """alpha 255 on the figure, 64 elsewhere; the image is red everywhere, so after compositing on white its
    green channel is 255 - alpha: the mask must be 1 - green."""
    train = tmp_path / "train"
    train.mkdir()
    alpha = Image.new("L", SIZE, 64)
    _shape(ImageDraw.Draw(alpha), [255, 255])
    rgba = Image.new("RGBA", SIZE, (255, 0, 0, 255))
    rgba.putalpha(alpha)
    rgba.save(train / "a.png")
    Image.new("RGB", SIZE, (9, 9, 9)).save(train / "opaque.png")
    rep = run_preflight(train, alpha_mask=True, **PREFLIGHT)
    assert rep.masks.full_weight == [train / "opaque.png"]
    assert "1 have no alpha channel and weigh 1 everywhere: opaque.png" in rep.format()
    ds = TrainDataset(rep, flip_aug=True, random_crop=True, seed=1)
    by_name = {Path(ds[(i, 0)]["path"]).name: i for i in range(len(ds))}
    for epoch in range(6):
        ex = ds[(by_name["a.png"], epoch)]
        green = (ex["pixel_values"][1] + 1) / 2
        torch.testing.assert_close(ex["loss_mask"][0], _area(1 - green), atol=1.5 / 255, rtol=0)
        assert torch.equal(ds[(by_name["opaque.png"], epoch)]["loss_mask"], torch.ones(1, 8, 24))


def test_cached_latents_carry_their_masks_both_flips(tmp_path):
    train, masks = _image_and_mask(tmp_path)
    rep = run_preflight(train, conditioning_data_dir=masks, **PREFLIGHT)
    plain = TrainDataset(rep, flip_aug=True, seed=0)
    want = {}
    for epoch in range(8):
        ex = plain[(0, epoch)]
        want[ex["flipped"]] = ex["loss_mask"]
    assert set(want) == {True, False}
    assert not torch.allclose(want[True], want[False])
    torch.testing.assert_close(want[True], want[False].flip(-1))  # the same block means, summed in another order

    def encode(px: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(px, 8)

    for round_ in range(2):  # the second round reads the disk cache
        cached = TrainDataset(rep, flip_aug=True, seed=0)
        stats = LatentCache("enc", tmp_path / "cache", keep_in_memory=False).build(cached, encode, progress=False)
        assert (stats.encoded, stats.reused) == ((2, 0) if round_ == 0 else (0, 2))
        for epoch in range(8):
            ex = cached[(0, epoch)]
            assert "pixel_values" not in ex
            torch.testing.assert_close(ex["loss_mask"], want[ex["flipped"]])

    # a changed mask file is a changed entry: re-encoded, and the new mask is served
    Image.new("L", SIZE, 255).save(masks / "a.png")
    rep = run_preflight(train, conditioning_data_dir=masks, **PREFLIGHT)
    cached = TrainDataset(rep, flip_aug=True, seed=0)
    stats = LatentCache("enc", tmp_path / "cache").build(cached, encode, progress=False)
    assert stats.encoded == 2
    assert torch.equal(cached[(0, 0)]["loss_mask"], torch.ones(1, 8, 24))


def test_masks_found_by_relative_path_or_name(make_dataset, tmp_path):
    train = make_dataset({"2_style/a.png": (64, 64), "2_style/b.png": (64, 64), "1_other/b.png": (64, 64)})
    masks = tmp_path / "masks"
    for rel in ("2_style/a.webp", "2_style/b.png", "1_other/b.png", "stray.png"):
        (masks / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (64, 64), 200).save(masks / rel)
    rep = run_preflight(train, resolution=64, min_bucket_reso=64, conditioning_data_dir=masks)
    assert {it.path.relative_to(train).as_posix(): it.mask_path.relative_to(masks).as_posix() for it in rep.items} == {
        "2_style/a.png": "2_style/a.webp", "2_style/b.png": "2_style/b.png", "1_other/b.png": "1_other/b.png"}
    assert any("1 mask file(s) match no training image" in w and "stray.png" in w for w in rep.warnings)
    assert "masked loss: loss weighted by the red channel of the masks in" in rep.format()
    # a flat training folder pairs with a flat mask folder: the relative path is the file name
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (64, 64), 200).save(flat / "a.png")
    train2 = make_dataset({"a.png": (64, 64)}, tmp_path / "train2")
    assert run_preflight(train2, resolution=64, min_bucket_reso=64, conditioning_data_dir=flat).items[0].mask_path == flat / "a.png"


def test_a_mask_in_another_folder_is_not_the_images_mask(make_dataset, tmp_path):
    """10_dogs/001.png and 5_cats/001.png share a file name; the only mask is the dog's. The cat image has no mask
    (an error naming it), never the dog's, and the error says where its mask belongs."""
    train = make_dataset({"10_dogs/001.png": (64, 64), "5_cats/001.png": (64, 64)})
    masks = tmp_path / "masks"
    (masks / "10_dogs").mkdir(parents=True)
    Image.new("L", (64, 64), 255).save(masks / "10_dogs" / "001.png")
    with pytest.raises(DatasetError, match=r"1 training image\(s\) have no mask") as e:
        run_preflight(train, resolution=64, min_bucket_reso=64, conditioning_data_dir=masks)
    text = str(e.value)
    assert str(train / "5_cats" / "001.png") in text and str(train / "10_dogs" / "001.png") not in text
    assert "same path relative to" in text and "directly in the folder" not in text
    # a flat mask folder for images in subfolders: the name alone does not make a mask either
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (64, 64), 255).save(flat / "001.png")
    train2 = make_dataset({"5_cats/001.png": (64, 64)}, tmp_path / "train2")
    with pytest.raises(DatasetError, match=r"1 training image\(s\) have no mask") as e:
        run_preflight(train2, resolution=64, min_bucket_reso=64, conditioning_data_dir=flat)
    assert str(flat / "5_cats" / "001") in str(e.value)  # where its mask belongs


def test_missing_or_misfit_masks_are_errors_naming_the_file(make_dataset, tmp_path):
    train = make_dataset({"a.png": (64, 64), "b.png": (64, 64)})
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 64), 255).save(masks / "a.png")
    with pytest.raises(DatasetError, match=r"1 training image\(s\) have no mask") as e:
        run_preflight(train, resolution=64, min_bucket_reso=64, conditioning_data_dir=masks)
    assert str(train / "b.png") in str(e.value)
    Image.new("L", (32, 64), 255).save(masks / "b.png")
    with pytest.raises(DatasetError, match=r"b.png is 32x64, its image b.png 64x64"):
        run_preflight(train, resolution=64, min_bucket_reso=64, conditioning_data_dir=masks)
    with pytest.raises(DatasetError, match="conditioning_data_dir not found"):
        run_preflight(train, resolution=64, min_bucket_reso=64, conditioning_data_dir=tmp_path / "nope")


def test_reg_images_weigh_one_with_a_mask_folder(make_dataset, tmp_path):
    train = make_dataset({"a.png": (64, 64)}, tmp_path / "train")
    reg = make_dataset({"r.png": (64, 64)}, tmp_path / "reg")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 64), 0).save(masks / "a.png")
    rep = run_preflight(train, resolution=64, min_bucket_reso=64, conditioning_data_dir=masks, reg_data_dir=reg)
    assert "regularization images: 0 with a mask, 1 weigh 1 everywhere" in rep.format()
    ds = TrainDataset(rep, prior_loss_weight=0.5)
    batch = collate_examples([ds[0], ds[1]])
    assert batch["loss_mask"].shape == (2, 1, 8, 8)
    assert torch.equal(batch["loss_mask"][0], torch.zeros(1, 8, 8))  # the black mask
    assert torch.equal(batch["loss_mask"][1], torch.ones(1, 8, 8))  # the reg image: kohya's ones
    assert torch.equal(batch["loss_weight"], torch.tensor([1.0, 0.5]))
    assert np.isclose(float(batch["loss_mask"].mean()), 0.5)
