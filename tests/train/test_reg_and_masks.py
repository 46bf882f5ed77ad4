"""Regularization images and masked loss in the trainer: a batch's loss is kohya's formula recomputed by hand
(the mask area-averaged to the latents, mean(loss x mask), times prior_loss_weight for regularization images),
and whole runs through train() with both on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sd_loha.data import collate_examples
from sd_loha.train import train
from sd_loha.train.config import config_from_kwargs
from sd_loha.train.loop import Trainer

from .helpers import base_config, read_file

PRIOR = 0.3


def _folders(tmp_path: Path, *, mask_value: int | None = None) -> dict[str, str]:
    """4 training images (64 px: no resize, no crop) with a mask each, 2 regularization images."""
    rng = np.random.default_rng(0)
    train_dir, reg_dir, mask_dir = tmp_path / "train", tmp_path / "reg" / "1_person", tmp_path / "masks"
    for d in (train_dir, reg_dir, mask_dir):
        d.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(train_dir / f"t{i}.png")
        (train_dir / f"t{i}.txt").write_text(f"a picture number {i}")
        mask = Image.new("L", (64, 64), 0 if mask_value is None else mask_value)
        if mask_value is None:
            draw = ImageDraw.Draw(mask)
            draw.rectangle((4 * i, 8, 4 * i + 30, 40), fill=255)
            draw.rectangle((40, 44, 63, 63), fill=100)  # grey: partial weight
        mask.save(mask_dir / f"t{i}.png")
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(reg_dir / f"r{i}.png")
    return dict(train_data_dir=str(train_dir), reg_data_dir=str(tmp_path / "reg"), conditioning_data_dir=str(mask_dir))


def test_batch_loss_is_kohyas_masked_and_prior_weighted_formula(tmp_path):
    out = tmp_path / "out"
    cfg = config_from_kwargs(**base_config(out, **_folders(tmp_path), masked_loss=True, prior_loss_weight=PRIOR,
                                           train_text_encoder=False, flip_aug=True))
    t = Trainer(cfg, out, progress=False)
    t.setup()
    assert "regularization:" in t.preflight_text and "masked loss:" in t.preflight_text
    # kohya's epoch: 4 training samples, so the 2 reg images get 2 repeats each
    assert sorted((Path(it.path).name, it.repeats) for it in t.dataset.items if it.is_reg) == [("r0.png", 2), ("r1.png", 2)]
    assert len(t.dataset) == 8 and t.batches_per_epoch == 4

    by_name = {Path(t.dataset[(i, 0)]["path"]).name: i for i in range(len(t.dataset))}
    batch = collate_examples([t.dataset[(by_name["t1.png"], 0)], t.dataset[(by_name["r0.png"], 0)],
                              t.dataset[(by_name["t3.png"], 0)]])
    preds = []
    t.unet.register_forward_hook(lambda m, args, output: preds.append(output.sample.detach().float()))
    loss = float(t.loss_step(batch, torch.Generator().manual_seed(5)).detach())

    # by hand: the mask files' values / 255, flipped like the sample, 8x8 block means; reg images weigh 1
    masks = []
    for name, flipped in zip(("t1.png", None, "t3.png"), batch["flipped"].tolist()):
        if name is None:
            masks.append(torch.ones(8, 8, dtype=torch.float64))
            continue
        m = torch.from_numpy(np.asarray(Image.open(Path(cfg.conditioning_data_dir) / name), dtype=np.float64) / 255)
        m = m.flip(-1) if flipped else m
        masks.append(m.reshape(8, 8, 8, 8).mean(dim=(1, 3)))
    mask = torch.stack(masks)[:, None]
    weights = torch.tensor([1.0, PRIOR, 1.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)  # loss_step draws the noise, then the timesteps
    noise = torch.randn(batch["latents"].shape, generator=gen)
    per_sample = ((preds[0].double() - noise.double()) ** 2 * mask).mean(dim=(1, 2, 3))
    assert loss == pytest.approx(float((per_sample * weights).mean()), rel=1e-5)
    # and it is not the unmasked or unweighted loss
    plain = ((preds[0].double() - noise.double()) ** 2).mean(dim=(1, 2, 3))
    assert abs(loss - float(plain.mean())) > 1e-3 * loss
    assert abs(loss - float(per_sample.mean())) > 1e-3 * loss


def test_run_with_reg_images_and_masks(tmp_path):
    """Through train(): black masks and prior_loss_weight 0 make every loss exactly 0 (nothing is learnt);
    ordinary masks and weights train, with the preflight showing both."""
    zero = train(base_config(tmp_path / "zero", **_folders(tmp_path / "z", mask_value=0), masked_loss=True,
                             prior_loss_weight=0.0, max_train_steps=3), progress=False)
    assert zero.losses == [0.0, 0.0, 0.0]
    res = train(base_config(tmp_path / "run", **_folders(tmp_path / "r"), masked_loss=True, prior_loss_weight=PRIOR,
                            max_train_steps=4, flip_aug=True), progress=False)
    assert len(res.losses) == 4 and all(0 < v < 10 for v in res.losses)
    assert "4 regularization samples per epoch for 4 training samples" in res.preflight
    assert "masked loss: loss weighted by the red channel" in res.preflight
    meta = read_file(res.output)[1]  # kohya's metadata keys for the reg images
    assert meta["ss_num_reg_images"] == "4" and float(meta["ss_prior_loss_weight"]) == PRIOR


def test_run_with_alpha_mask(tmp_path):
    data = tmp_path / "train"
    data.mkdir()
    for i in range(2):
        im = Image.new("RGBA", (64, 64), (200, 30 * i, 30, 0))
        ImageDraw.Draw(im).ellipse((10, 10, 50, 50), fill=(200, 30 * i, 30, 255))
        im.save(data / f"a{i}.png")
        (data / f"a{i}.txt").write_text("a red circle")
    res = train(base_config(tmp_path / "out", train_data_dir=str(data), alpha_mask=True, max_train_steps=2,
                            flip_aug=True), progress=False)
    assert len(res.losses) == 2 and "alpha channel of each image" in res.preflight


def test_trigger_word_goes_on_training_captions_not_on_regularization_images(tmp_path):
    """Prior preservation: the regularization images teach that prompts without the trigger still draw what the
    base model drew, so their captions stay without it, also in the cached text-encoder outputs."""
    folders = _folders(tmp_path)
    for i in range(2):
        (Path(folders["reg_data_dir"]) / "1_person" / f"r{i}.txt").write_text(f"a person number {i}")
    out = tmp_path / "out"
    cfg = config_from_kwargs(**base_config(out, **folders, trigger_word="sks style", train_text_encoder=False,
                                           cache_text_encoder_outputs=True))
    t = Trainer(cfg, out, progress=False)
    t.setup()
    captions = {Path(t.dataset[(i, 0)]["path"]).name: t.dataset[(i, 0)]["caption"] for i in range(len(t.dataset))}
    assert captions["t2.png"] == "sks style, a picture number 2"
    assert captions["r1.png"] == "a person number 1"
    # every caption a step sees is in the cache, and the reg captions only without the trigger
    assert all(c in t.text_cache for c in captions.values()) and len(t.text_cache) == len(set(captions.values()))
    assert "sks style, a person number 0" not in t.text_cache
