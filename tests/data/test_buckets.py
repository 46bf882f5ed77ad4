from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from sd_loha.data.buckets import BucketError, BucketManager, make_bucket_resolutions, plan_resize_crop, resize_and_crop

# kohya sd-scripts make_bucket_resolutions((512, 512), 256, 1024, 64), as printed by its bucket manager
KOHYA_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_kohya_512_buckets():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == KOHYA_512
    assert BucketManager(512).resolutions == KOHYA_512


def test_kohya_sdxl_1024_buckets():
    b = set(BucketManager(1024, max_bucket_reso=2048).resolutions)
    for r in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344), (1536, 640), (640, 1536)]:
        assert r in b
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in b)
    assert all(256 <= w <= 2048 and 256 <= h <= 2048 for w, h in b)


def test_non_square_resolution_uses_its_area():
    bm = BucketManager((768, 512), max_bucket_reso=1024)
    assert all(w * h <= 768 * 512 for w, h in bm.resolutions)
    assert (576, 576) in bm.resolutions  # square side = sqrt(area) rounded down to the step


def test_assign_nearest_aspect():
    bm = BucketManager(1024, max_bucket_reso=2048)
    assert bm.assign(1024, 1024) == (1024, 1024)
    assert bm.assign(3000, 3000) == (1024, 1024)
    assert bm.assign(1500, 1000) == (1216, 832)  # 1.5 -> 1.46
    assert bm.assign(832, 1216) == (832, 1216)  # exact size preferred
    assert bm.assign(1920, 1080) == (1344, 768)  # 16:9 -> 1.75
    assert bm.assign(100, 100) == (1024, 1024)  # upscaled without no_upscale


def test_no_upscale():
    bm = BucketManager(512, min_bucket_reso=128, bucket_no_upscale=True)
    assert bm.assign(2000, 2000) == (512, 512)  # big images still use the standard buckets
    assert bm.assign(300, 200) == (256, 192)  # own size rounded down to 64
    assert bm.assign(300, 200, no_upscale=False) == (640, 384)  # 1.5: 1.67 is nearer than 1.29
    w, h = bm.assign(4000, 300)  # very wide: clamped to max_bucket_reso and the area
    assert w <= 1024 and w * h <= 512 * 512 and h % 64 == 0
    with pytest.raises(BucketError, match="min_bucket_reso"):
        bm.assign(100, 100)
    strict = BucketManager(512, bucket_no_upscale=True)
    with pytest.raises(BucketError):
        strict.assign(300, 200)  # 192 < min 256


def test_bucketing_disabled():
    bm = BucketManager((512, 384), enable_bucket=False, bucket_no_upscale=True)
    assert bm.resolutions == [(512, 384)]
    assert bm.assign(100, 1000) == (512, 384)
    assert bm.notes  # no_upscale ignored, said so


def test_settings_errors_and_small_resolutions():
    with pytest.raises(ValueError, match="max_bucket_reso"):
        BucketManager(1536)  # default max 1024
    with pytest.raises(ValueError, match="multiple of 8"):
        BucketManager(512, bucket_reso_steps=60)
    bm = BucketManager(112, bucket_reso_steps=32, min_bucket_reso=64)
    assert {(96, 96), (128, 96), (96, 128)} <= set(bm.resolutions)
    small = BucketManager(96, bucket_reso_steps=32)  # min 256 > resolution: clamped, with a note
    assert small.min_reso == 96 and small.notes and (96, 96) in small.resolutions


def test_plan_and_resize_and_crop():
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 100, 100))
    t, crop, orig = resize_and_crop(img, (64, 64))
    assert t.shape == (3, 64, 64) and t.dtype == torch.float32
    assert crop == (0, 32)  # resized to 128x64, centre crop from x=32
    assert orig == (100, 200)  # (h, w)
    assert t.min() >= -1 and t.max() <= 1
    assert t[:, 32, 2].tolist() == [-1.0, -1.0, -1.0] and t[:, 32, 60].tolist() == [1.0, 1.0, 1.0]
    crops = {resize_and_crop(img, (64, 64), True, random.Random(s))[1] for s in range(30)}
    assert len(crops) > 5 and all(c[0] == 0 and 0 <= c[1] <= 64 for c in crops)
    a = resize_and_crop(img, (64, 64), True, random.Random(7))
    b = resize_and_crop(img, (64, 64), True, random.Random(7))
    assert a[1] == b[1] and torch.equal(a[0], b[0])
    with pytest.raises(ValueError):
        plan_resize_crop(10, 10, (8, 8), random_crop=True)


def test_original_size_for_load_time_reduced_images():
    reduced = Image.new("RGB", (500, 250))  # a 2000x1000 original reduced by 4 on load
    t, crop, orig = resize_and_crop(reduced, (256, 128), original_size=(2000, 1000))
    assert orig == (1000, 2000) and t.shape == (3, 128, 256) and crop == (0, 0)
    plan = plan_resize_crop(300, 100, (128, 128))
    assert plan.resized_size == (384, 128) and plan.crop_top_left == (0, 128)
    assert plan.flipped_crop_top_left() == (0, 384 - 128 - 128)
