from __future__ import annotations

import logging
import os

import pytest
import torch
from torch.utils.data import DataLoader

from sd_loha.data import (
    BucketBatchSampler,
    CaptionOptions,
    DatasetError,
    SampleKey,
    TrainDataset,
    collate_examples,
    run_preflight,
)

PF = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)


@pytest.fixture
def report(make_dataset):
    root = make_dataset({
        "3_sq/a.png": (64, 64), "3_sq/a.txt": "alpha, one, two, three",
        "3_sq/b.png": (80, 80), "3_sq/b.txt": "beta, one, two",
        "3_sq/c.png": (70, 70),
        "wide/d.png": (272, 80), "wide/d.txt": "delta",  # aspect 3.4 -> bucket 96x32, resized 109x32
        "wide/e.png": (300, 100), "wide/e.txt": "epsilon",
    })
    return run_preflight(root, batch_size=2, **PF)


def test_examples(report):
    ds = TrainDataset(report, captions=CaptionOptions(trigger_word="sks"), seed=1)
    assert len(ds) == 3 * 3 + 2
    assert {b: len(ix) for b, ix in ds.bucket_indices.items()} == {(64, 64): 9, (96, 32): 2}
    ex = ds[0]
    assert ex["pixel_values"].shape == (3, 64, 64) and ex["pixel_values"].dtype == torch.float32
    assert -1.0 <= float(ex["pixel_values"].min()) and float(ex["pixel_values"].max()) <= 1.0
    assert ex["caption"] == "sks, alpha, one, two, three"
    assert ex["original_size"] == (64, 64) and ex["target_size"] == (64, 64) and ex["crop_top_left"] == (0, 0)
    assert ex["flipped"] is False and ex["key"] == report.items[0].key
    wide = ds[len(ds) - 1]
    assert wide["pixel_values"].shape == (3, 32, 96)
    assert wide["original_size"] == (100, 300) and wide["target_size"] == (32, 96)
    no_cap = ds[6]
    assert no_cap["caption"] == "sks, sq"  # folder caption, then the trigger word in front


def test_determinism_per_epoch_and_index(report):
    opts = CaptionOptions(shuffle=True, tag_dropout_rate=0.3)
    ds = TrainDataset(report, captions=opts, flip_aug=True, random_crop=True, seed=5)
    a = ds[SampleKey(3, 0)]
    b = ds[SampleKey(3, 0)]
    assert a["caption"] == b["caption"] and a["flipped"] == b["flipped"] and torch.equal(a["pixel_values"], b["pixel_values"])
    ds.set_epoch(0)
    assert ds[3]["caption"] == a["caption"]
    variants = {(ds[SampleKey(3, e)]["caption"], ds[SampleKey(3, e)]["flipped"]) for e in range(12)}
    assert len(variants) > 2  # changes from epoch to epoch
    ds2 = TrainDataset(report, captions=opts, flip_aug=True, random_crop=True, seed=5)
    assert ds2[SampleKey(3, 0)]["caption"] == a["caption"]  # a fresh process replays it


def test_flip_adjusts_crop(report):
    ds = TrainDataset(report, flip_aug=True, seed=0)
    idx = ds.bucket_indices[(96, 32)][0]  # d.png 272x80 -> resized 109x32: 13 px to crop
    seen = {}
    for e in range(20):
        ex = ds[SampleKey(idx, e)]
        seen[ex["flipped"]] = ex
    assert set(seen) == {True, False}
    assert seen[False]["crop_top_left"] == (0, 6)
    assert seen[True]["crop_top_left"] == (0, 7)  # the left margin of the flipped crop
    assert torch.equal(seen[True]["pixel_values"], seen[False]["pixel_values"].flip(-1))


def test_sampler_batches_stay_in_one_bucket_and_cover_epoch(report):
    ds = TrainDataset(report)
    s = BucketBatchSampler(ds, 2, seed=7)
    batches = s.batches(0)
    assert len(s) == len(batches) == 5 + 1
    for b in batches:
        assert len({ds.bucket_of(i) for i in b}) == 1
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert s.batches(0) == BucketBatchSampler(ds, 2, seed=7).batches(0)  # deterministic
    assert s.batches(1) != s.batches(0)  # reshuffled per epoch
    assert BucketBatchSampler(ds, 2, seed=8).batches(0) != batches
    s.set_epoch(3)
    keys = list(s)
    assert all(isinstance(k, SampleKey) and k.epoch == 3 for b in keys for k in b)
    assert [[k.index for k in b] for b in keys] == s.batches(3)
    dl = BucketBatchSampler(ds, 2, seed=7, drop_last=True)
    assert all(len(b) == 2 for b in dl.batches(0)) and len(dl) == len(dl.batches(0))


def test_sampler_resume_and_sharding(report):
    ds = TrainDataset(report)
    s = BucketBatchSampler(ds, 2, seed=1)
    s.set_epoch(2)
    full = [[k.index for k in b] for b in s]
    s.set_epoch(2, skip_batches=4)
    assert len(s) == len(full) - 4
    assert [[k.index for k in b] for b in s] == full[4:]

    shards = [BucketBatchSampler(ds, 2, seed=1, process_index=r, num_processes=4) for r in range(4)]
    per = [sh.batches(2) for sh in shards]
    assert len({len(p) for p in per}) == 1  # every rank runs the same number of steps
    assert all(len(sh) == len(per[0]) for sh in shards)
    flat = [i for p in per for b in p for i in b]
    assert set(flat) == set(range(len(ds)))  # padded by repeating, nothing lost
    global_b = s.global_batches(2)
    assert per[1][0] == global_b[1]
    with pytest.raises(ValueError):
        BucketBatchSampler(ds, 2, process_index=4, num_processes=4)


def test_dataloader_with_collate(report):
    ds = TrainDataset(report, captions=CaptionOptions(shuffle=True))
    s = BucketBatchSampler(ds, 2, seed=0)
    loader = DataLoader(ds, batch_sampler=s, collate_fn=collate_examples)
    n = 0
    for batch in loader:
        b = len(batch["captions"])
        assert batch["pixel_values"].shape[0] == b
        assert batch["original_sizes"].shape == (b, 2) and batch["crop_top_lefts"].shape == (b, 2)
        assert batch["target_sizes"][0].tolist() == list(batch["pixel_values"].shape[-2:])
        assert batch["flipped"].dtype == torch.bool and len(batch["keys"]) == b
        n += 1
    assert n == len(s)


def test_image_deleted_after_preflight_is_replaced(report, caplog):
    ds = TrainDataset(report)
    victim = report.items[0].path  # a.png: bucket 64x64
    os.remove(victim)
    with caplog.at_level(logging.WARNING, logger="sd_loha.data"):
        ex = ds[0]
    assert ex["path"] != str(victim) and ex["target_size"] == (64, 64)
    assert any(str(victim) in r.message and "another image" in r.message for r in caplog.records)
    assert ds.failures and ds.failures[0][0] == victim
    # all its repeats are substituted too, without more warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sd_loha.data"):
        for i in range(3):
            assert ds[i]["path"] != str(victim)
    assert not caplog.records
    # a file corrupted mid-run is handled the same way
    b = report.items[1].path
    b.write_bytes(b"garbage")
    assert ds[3]["path"] != str(b)


def test_whole_bucket_gone_raises_clear_error(report):
    ds = TrainDataset(report)
    for it in report.items:
        if it.bucket == (96, 32):
            os.remove(it.path)
    idx = ds.bucket_indices[(96, 32)][0]
    with pytest.raises(DatasetError, match="96x32"):
        ds[idx]


def test_validation_dataset_without_repeats(make_dataset):
    root = make_dataset({f"5_x/i{i}.png": (64, 64) for i in range(4)})
    rep = run_preflight(root, validation_split=0.25, **PF)
    val = TrainDataset(rep.validation_items, use_repeats=False)
    assert len(val) == 1
    with pytest.raises(ValueError, match="bucket"):
        TrainDataset([it.__class__(**{**it.__dict__, "bucket": None}) for it in rep.items])


def test_persistent_workers_see_the_epoch(report):
    """The sampler carries the epoch to worker processes: same data as in-process."""
    opts = CaptionOptions(shuffle=True)

    def run(num_workers):
        ds = TrainDataset(report, captions=opts, flip_aug=True, seed=3)
        s = BucketBatchSampler(ds, 2, seed=3)
        kw = dict(num_workers=num_workers, persistent_workers=True) if num_workers else {}
        loader = DataLoader(ds, batch_sampler=s, collate_fn=collate_examples, **kw)
        out = []
        for epoch in range(2):
            s.set_epoch(epoch)  # ds.set_epoch is not needed (and would not reach the workers)
            out += [(tuple(b["captions"]), b["flipped"].tolist()) for b in loader]
        return out

    assert run(0) == run(2)
