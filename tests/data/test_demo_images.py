from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import sd_loha
from sd_loha.data import BucketBatchSampler, TrainDataset, run_preflight

ASSETS = Path(sd_loha.__file__).parent / "assets"
TRAIN = ASSETS / "demo_images"
HELDOUT = ASSETS / "demo_images_heldout"


def _generator():
    spec = importlib.util.spec_from_file_location("make_demo_images", ASSETS / "make_demo_images.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_demo_images_present_small_and_captioned():
    pngs, held = sorted(TRAIN.glob("*.png")), sorted(HELDOUT.glob("*.png"))
    assert len(pngs) == 16 and len(held) == 4
    total = sum(p.stat().st_size for d in (TRAIN, HELDOUT) for p in d.iterdir())
    assert total < 400_000
    sizes = {Image.open(p).size for p in pngs}
    assert sizes == {(96, 96), (128, 96), (96, 128)}
    for p in pngs + held:
        cap = p.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert cap.startswith("sdlohastyle, poster, ")


def test_generator_reproduces_committed_files():
    gen = _generator()
    for posters, folder in ((gen.TRAIN, TRAIN), (gen.HELDOUT, HELDOUT)):
        for p in posters:
            on_disk = np.asarray(Image.open(folder / f"{p.name}.png").convert("RGB"))
            assert np.array_equal(np.asarray(gen.render(p)), on_disk), p.name
            assert (folder / f"{p.name}.txt").read_text(encoding="utf-8").strip() == p.caption()


def test_demo_preflight_buckets():
    rep = run_preflight(TRAIN, resolution=112, min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=32, batch_size=2)
    assert not rep.skipped and len(rep.items) == 16
    assert {b.bucket: b.images for b in rep.buckets} == {(96, 96): 12, (128, 96): 2, (96, 128): 2}
    ds = TrainDataset(rep)
    batch_keys = next(iter(BucketBatchSampler(ds, 2)))
    assert ds[batch_keys[0]]["pixel_values"].shape[0] == 3
    held = run_preflight(HELDOUT, resolution=112, min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=32)
    assert len(held.items) == 4
