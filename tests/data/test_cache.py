from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from sd_loha.data import LatentCache, TextEmbeddingCache, TrainDataset, run_preflight
from sd_loha.data.cache import LatentCacheMiss

PF = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)


class FakeVAE:
    """Counts calls; latents = 8x average pool plus a constant 4th channel."""

    def __init__(self):
        self.images = 0
        self.calls = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += pixels.shape[0]
        lat = F.avg_pool2d(pixels, 8)
        return torch.cat([lat, torch.ones_like(lat[:, :1])], dim=1)


@pytest.fixture
def root(make_dataset):
    return make_dataset({
        "a.png": (64, 64), "b.png": (80, 80), "c.png": (64, 64),
        "d.png": (240, 80), "d.txt": "wide",  # bucket 96x32
    })


def build(root, cache_dir, *, encoder_id="vae-A:fp32", flip=False, random_crop=False, res=64, vae=None, batch_size=2):
    rep = run_preflight(root, **{**PF, "resolution": res})
    ds = TrainDataset(rep, flip_aug=flip, random_crop=random_crop)
    vae = vae or FakeVAE()
    cache = LatentCache(encoder_id, cache_dir)
    stats = cache.build(ds, vae, batch_size=batch_size, progress=False)
    return ds, cache, stats, vae


def test_disk_cache_reused_and_invalidated(root, tmp_path):
    cdir = tmp_path / "cache"
    ds, cache, stats, vae = build(root, cdir)
    assert (stats.encoded, stats.reused, vae.images) == (4, 0, 4)
    assert vae.calls == 3  # batch of 2 in 64x64, then 1, then 1 wide (buckets never mixed)
    assert len(list(cdir.glob("*.safetensors"))) == 4
    assert not list(cdir.glob("*.tmp"))  # atomic writes leave no temp files

    _, _, stats, vae = build(root, cdir)  # next run: all reused
    assert (stats.encoded, stats.reused, vae.images) == (0, 4, 0)

    st = os.stat(root / "b.png")  # touching a file re-encodes just that one
    os.utime(root / "b.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    _, _, stats, vae = build(root, cdir)
    assert (stats.encoded, stats.reused) == (1, 3)

    _, _, stats, vae = build(root, cdir, encoder_id="vae-A:fp16")  # other encoder/dtype
    assert stats.encoded == 4

    _, _, stats, vae = build(root, cdir, res=96)  # other buckets
    assert stats.encoded == 4


def test_dataset_serves_cached_latents(root, tmp_path):
    ds, cache, stats, vae = build(root, tmp_path / "c")
    ex = ds[0]
    assert "latents" in ex and "pixel_values" not in ex
    assert ex["latents"].shape == (4, 8, 8)
    ds_px = TrainDataset(ds.items)
    expected = FakeVAE()(ds_px[0]["pixel_values"][None])[0]
    assert torch.allclose(ex["latents"], expected)
    wide = ds[len(ds) - 1]
    assert wide["latents"].shape == (4, 4, 12) and wide["original_size"] == (80, 240)
    assert vae.images == 4  # serving does not encode again


def test_flip_caches_both_variants(root, tmp_path):
    ds, cache, stats, vae = build(root, tmp_path / "c", flip=True)
    assert stats.encoded == 8 and vae.images == 8
    item = ds.items[0]
    plain, flipped = cache.get(item, False), cache.get(item, True)
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-6)  # pooling commutes with flipping
    flips = {ds[(0, e)]["flipped"] for e in range(16)}
    assert flips == {True, False}
    _, _, stats, _ = build(root, tmp_path / "c", flip=True)
    assert (stats.encoded, stats.reused) == (0, 8)


def test_random_crop_disables_caching_with_warning(root, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sd_loha.data"):
        ds, cache, stats, vae = build(root, tmp_path / "c", random_crop=True)
    assert not stats.enabled and not cache.enabled and vae.calls == 0
    assert "random_crop" in stats.message and any("random_crop" in r.message for r in caplog.records)
    assert "pixel_values" in ds[0]
    with pytest.raises(ValueError):
        ds.attach_latent_cache(cache)


def test_memory_cache_and_corrupt_or_missing_files(root, tmp_path):
    ds, cache, stats, vae = build(root, None)
    assert stats.encoded == 4 and cache.cache_dir is None
    assert ds[0]["latents"].shape == (4, 8, 8)

    cdir = tmp_path / "c"
    build(root, cdir)
    victim = sorted(cdir.glob("*.safetensors"))[0]
    victim.write_bytes(b"not a safetensors file")
    ds, cache, stats, vae = build(root, cdir)
    assert (stats.encoded, stats.reused) == (1, 3)  # damaged entry recomputed

    first = ds.items[0]
    cache._file(cache.entry_key(first, False)).unlink()  # cache file deleted mid-run
    with pytest.raises(LatentCacheMiss):
        cache.get(first)
    ex = ds[0]  # no crash: another image of the same bucket is served
    assert "latents" in ex and ex["path"] != str(first.path) and ex["target_size"] == (64, 64)


def test_keep_in_memory_with_disk(root, tmp_path):
    cdir = tmp_path / "c"
    build(root, cdir)
    rep = run_preflight(root, **PF)
    ds = TrainDataset(rep)
    cache = LatentCache("vae-A:fp32", cdir, keep_in_memory=True)
    stats = cache.build(ds, FakeVAE(), progress=False)
    assert stats.reused == 4
    for f in cdir.glob("*.safetensors"):
        f.unlink()
    assert ds[0]["latents"].shape == (4, 8, 8)  # served from memory


def test_bad_encode_fn_output(root, tmp_path):
    rep = run_preflight(root, **PF)
    ds = TrainDataset(rep)
    with pytest.raises(TypeError, match="encode_fn"):
        LatentCache("x", tmp_path / "c").build(ds, lambda px: px[:1], batch_size=2, progress=False)
    with pytest.raises(ValueError):
        LatentCache("")


def test_progress_callback(root, tmp_path):
    rep = run_preflight(root, **PF)
    ds = TrainDataset(rep)
    calls = []
    LatentCache("x", tmp_path / "c").build(ds, FakeVAE(), on_progress=lambda d, t: calls.append((d, t)), progress=False)
    assert calls[-1] == (4, 4)


def test_text_embedding_cache():
    n_encoded = []

    def encode(captions):
        n_encoded.append(len(captions))
        hidden = torch.stack([torch.full((3, 2), float(len(c))) for c in captions])
        pooled = torch.stack([torch.full((2,), float(len(c))) for c in captions])
        return hidden, pooled

    tc = TextEmbeddingCache("clip-l:fp16")
    assert tc.precompute(["a", "bb", "a", ""], encode) == 3
    hidden, pooled = tc.encode_batch(["bb", "a", "bb"])
    assert hidden.shape == (3, 3, 2) and pooled[:, 0].tolist() == [2.0, 1.0, 2.0]
    assert "bb" in tc and len(tc) == 3
    tc.encode_batch(["ccc", "a"], encode)
    assert n_encoded == [3, 1]
    with pytest.raises(KeyError):
        tc.encode_batch(["never seen"])
    single = TextEmbeddingCache("te")
    single.precompute(["x"], lambda cs: torch.zeros(len(cs), 4))
    assert single.encode_batch(["x", "x"]).shape == (2, 4)
