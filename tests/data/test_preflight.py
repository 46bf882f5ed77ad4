from __future__ import annotations

import json

import pytest

from sd_loha.data.preflight import DatasetError, run_preflight

KW = dict(resolution=512, min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64)


def test_report_content(make_dataset):
    root = make_dataset({
        "10_sks dog/a.png": (512, 512), "10_sks dog/b.png": (512, 512), "10_sks dog/b.txt": "sks dog, sitting",
        "2_style/w1.png": (960, 540), "2_style/w1.txt": "wide one",
        "2_style/w2.png": (960, 540),
        "plain.png": (300, 600), "plain.txt": "tall",
        "nocap.png": (512, 512),
        "broken.png": "not an image",
        "photo.heic": "x",
    })
    (root / "trunc.jpg").write_bytes(b"")
    rep = run_preflight(root, batch_size=4, trigger_word="sks", **KW)
    assert rep.images_found == 9
    assert len(rep.items) == 6 and len(rep.skipped) == 3
    assert {b.bucket: (b.images, b.samples) for b in rep.buckets} == {(512, 512): (3, 21), (640, 384): (2, 4), (320, 704): (1, 1)}
    # ceil(21/4) + ceil(4/4) + ceil(1/4)
    assert rep.steps_per_epoch == 6 + 1 + 1
    assert rep.caption_sources == {"folder": 2, "file": 3, "missing": 1}
    assert [p.name for p in rep.missing_captions] == ["nocap.png"]
    assert "trigger word 'sks'" in rep.missing_caption_fallback
    assert any("fewer samples than batch_size 4" in w and "320x704 (1)" in w for w in rep.warnings)
    kinds = {k: len(v) for k, v in rep.skipped_by_kind().items()}
    assert kinds == {"not_an_image": 1, "unsupported": 1, "empty": 1}

    text = rep.format()
    for needle in ["6 used", "3 skipped", "bucket (WxH)", "512x512", "steps per epoch: 8", "< batch size",
                   "10_sks dog", "sks dog", "not an image (1): broken.png", "HEIC", "missing"]:
        assert needle in text, (needle, text)
    assert len(text.splitlines()) < 40

    d = rep.to_dict()
    json.dumps(d)  # serialisable for the web UI
    assert d["steps_per_epoch"] == 8 and d["images_used"] == 6
    assert {(b["width"], b["height"]) for b in d["buckets"] if b["smaller_than_batch"]} == {(320, 704)}
    assert d["skipped_by_kind"]["empty"] == 1
    assert all(i["bucket"] for i in d["items"])


def test_nothing_usable_error(make_dataset):
    root = make_dataset({"a.heic": "x", "b.png": "text", "notes.doc": "x", "sub/c.psd": "x"})
    with pytest.raises(DatasetError) as ei:
        run_preflight(root, caption_extension=".caption", **KW)
    msg = str(ei.value)
    for needle in [str(root), ".png", ".jpg", ".webp", ".caption", "10_", "metadata.jsonl", "b.png", "HEIC", ".doc"]:
        assert needle in msg, (needle, msg)


def test_empty_folder_and_missing_and_file(tmp_path, make_dataset):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no files at all"):
        run_preflight(tmp_path / "empty", **KW)
    (tmp_path / "training_images").mkdir()
    with pytest.raises(DatasetError, match="not found") as ei:
        run_preflight(tmp_path / "training_imgs", **KW)
    assert "did you mean" in str(ei.value) and "training_images" in str(ei.value)
    root = make_dataset({"a.png": (64, 64)})
    with pytest.raises(DatasetError, match="is a file, not a folder") as ei:
        run_preflight(root / "a.png", **KW)
    assert "did you mean its folder" in str(ei.value)


def test_all_too_small_with_no_upscale(make_dataset):
    root = make_dataset({"a.png": (100, 100), "b.png": (120, 90)})
    with pytest.raises(DatasetError) as ei:
        run_preflight(root, bucket_no_upscale=True, **KW)
    assert "min_bucket_reso" in str(ei.value)


def test_upscale_warning_and_empty_caption_warning(make_dataset):
    root = make_dataset({"tiny.png": (64, 64), "tiny.txt": "", "ok.png": (512, 512), "ok.txt": "fine"})
    rep = run_preflight(root, **KW)
    assert any("enlarged more than 2x" in w and "tiny.png" in w for w in rep.warnings)
    assert any("empty" in w and "tiny.txt" in w for w in rep.warnings)
    assert "empty caption (trained unconditionally)" in rep.missing_caption_fallback


def test_validation_split_is_deterministic(make_dataset):
    root = make_dataset({f"i{i}.png": (64, 64) for i in range(10)})
    kw = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    a = run_preflight(root, validation_split=0.2, seed=3, **kw)
    b = run_preflight(root, validation_split=0.2, seed=3, **kw)
    assert len(a.validation_items) == 2 and len(a.items) == 8
    assert [i.path for i in a.validation_items] == [i.path for i in b.validation_items]
    assert not {i.path for i in a.validation_items} & {i.path for i in a.items}
    one = make_dataset({"x.png": (64, 64)}, root=root.parent / "one")
    rep = run_preflight(one, validation_split=0.5, **kw)
    assert len(rep.items) == 1 and not rep.validation_items
    assert any("validation_split ignored" in w for w in rep.warnings)


def test_bucketing_off_and_num_processes(make_dataset):
    root = make_dataset({f"i{i}.png": (100 + 10 * i, 80) for i in range(5)})
    rep = run_preflight(root, resolution=64, enable_bucket=False, batch_size=2, num_processes=2)
    assert [b.bucket for b in rep.buckets] == [(64, 64)]
    assert rep.steps_per_epoch == 2  # 3 batches over 2 processes
    assert "bucketing off" in rep.format()


def test_bad_settings_raise_value_error(make_dataset):
    root = make_dataset({"a.png": (64, 64)})
    with pytest.raises(ValueError):
        run_preflight(root, batch_size=0, **KW)
    with pytest.raises(ValueError):
        run_preflight(root, validation_split=1.0, **KW)
    with pytest.raises(ValueError, match="max_bucket_reso"):
        run_preflight(root, resolution=2048, max_bucket_reso=1024)


def test_verify_catches_truncated_files(make_dataset):
    from .conftest import save_noise

    root = make_dataset({"good.png": (64, 64)})
    p = save_noise(root / "cut.png", (64, 64))
    p.write_bytes(p.read_bytes()[:300])
    rep = run_preflight(root, resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    assert [s.kind for s in rep.skipped] == ["truncated"]
    fast = run_preflight(root, resolution=64, min_bucket_reso=64, max_bucket_reso=128, verify=False)
    assert len(fast.items) == 2  # header-only preflight cannot see it; the dataset skips it later
