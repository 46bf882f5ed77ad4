"""Torch dataset and bucket-aware batch sampler.

Determinism: every random choice for a sample (flip, random crop, caption
shuffle/dropout) comes from an rng seeded by (seed, epoch, sample index), and
batch order from (seed, epoch). Resuming at (epoch, batch) therefore replays
exactly the same data, with or without DataLoader workers.

The sampler yields `SampleKey(index, epoch)` pairs, so the epoch reaches
the dataset even inside persistent worker processes; `dataset[i]` with a plain
int also works and uses `dataset.set_epoch()`'s epoch.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset, Sampler

from .buckets import Size, apply_plan, pil_to_tensor, plan_resize_crop
from .cache import LatentCache, LatentCacheMiss
from .captions import CaptionOptions, options_for
from .images import ImageError, load_image_with_info
from .masks import item_loss_mask
from .preflight import DatasetError, PreflightReport
from .scan import ImageItem

__all__ = ["BucketBatchSampler", "SampleKey", "TrainDataset", "collate_examples"]

logger = logging.getLogger("sd_loha.data")


class SampleKey(NamedTuple):
    index: int
    epoch: int


class TrainDataset(Dataset):
    """Preflight items expanded by repeats; one example per (image, repeat).

    Given a PreflightReport, an epoch is its training items then its
    regularization items (report.epoch_items).

    Example keys: pixel_values (3,H,W) float in [-1,1] — or `latents` when a
    LatentCache is attached —, caption (processed for this step), original_size
    (h,w), crop_top_left (y,x), target_size (h,w), key (stable image id),
    flipped, index, path, loss_weight (prior_loss_weight for a regularization
    image, else 1), and loss_mask (1,h,w) at the latents' size for an image
    with a mask (masked_loss).
    """

    def __init__(
        self,
        items: Sequence[ImageItem] | PreflightReport,
        *,
        captions: CaptionOptions | None = None,
        flip_aug: bool = False,
        random_crop: bool = False,
        seed: int = 0,
        use_repeats: bool = True,
        prior_loss_weight: float = 1.0,
    ) -> None:
        if isinstance(items, PreflightReport):
            items = items.epoch_items
        self.items: list[ImageItem] = list(items)
        if not self.items:
            raise DatasetError("no items to train on (the preflight found nothing usable)")
        missing = [it.path for it in self.items if it.bucket is None]
        if missing:
            raise ValueError(f"items need a bucket: pass the items from run_preflight() (e.g. {missing[0]})")
        self.captions = captions or CaptionOptions()
        self.flip_aug = flip_aug
        self.random_crop = random_crop
        self.seed = seed
        self.prior_loss_weight = float(prior_loss_weight)
        self.epoch = 0
        self.latent_cache: LatentCache | None = None
        # sample index -> item index, each image repeated `repeats` times (kohya)
        self._sample_item: list[int] = []
        for i, it in enumerate(self.items):
            self._sample_item.extend([i] * (it.repeats if use_repeats else 1))
        self.bucket_indices: dict[Size, list[int]] = {}
        for s, i in enumerate(self._sample_item):
            self.bucket_indices.setdefault(self.items[i].bucket, []).append(s)  # type: ignore[arg-type]
        self._bad: set[int] = set()  # item indices that failed to load this run
        self.failures: list[tuple[Path, str]] = []
        self._warned_changed: set[int] = set()

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        return len(self._sample_item)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def item_for(self, index: int) -> ImageItem:
        return self.items[self._sample_item[index]]

    def bucket_of(self, index: int) -> Size:
        return self.item_for(index).bucket  # type: ignore[return-value]

    def attach_latent_cache(self, cache: LatentCache | None) -> None:
        """Serve cached latents instead of pixels (LatentCache.build calls this)."""
        if cache is not None and self.random_crop:
            raise ValueError("latents cannot be cached with random_crop (every step crops differently)")
        self.latent_cache = cache

    def sample_rng(self, index: int, epoch: int) -> random.Random:
        # str seeds hash through SHA-512: stable across processes and Python runs.
        return random.Random(f"{self.seed}:{epoch}:{index}")

    # ------------------------------------------------------------------ access

    def __getitem__(self, key: int | SampleKey | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            index, epoch = int(key[0]), int(key[1])
        else:
            index, epoch = int(key), self.epoch
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = self.sample_rng(index, epoch)
        for candidate in self._candidates(index):
            item_idx = self._sample_item[candidate]
            try:
                ex = self._example(item_idx, rng)
            except (ImageError, OSError, LatentCacheMiss) as e:  # never crash mid-run on one bad file
                self._mark_bad(item_idx, e)
                continue
            ex["index"] = candidate
            return ex
        bucket = self.bucket_of(index)
        raise DatasetError(
            f"every image in bucket {bucket[0]}x{bucket[1]} has become unreadable during training "
            f"(first: {self.failures[0][0]}: {self.failures[0][1]})"
        )

    def _candidates(self, index: int) -> Iterator[int]:
        """The requested sample, then the others of its bucket in a fixed order:
        a substitute keeps the batch's tensor shapes equal."""
        if self._sample_item[index] not in self._bad:
            yield index
        same = self.bucket_indices[self.bucket_of(index)]
        start = same.index(index)
        for k in range(1, len(same)):
            cand = same[(start + k) % len(same)]
            if self._sample_item[cand] not in self._bad:
                yield cand

    def _mark_bad(self, item_idx: int, err: Exception) -> None:
        item = self.items[item_idx]
        reason = err.reason if isinstance(err, ImageError) else f"{type(err).__name__}: {err}"
        self._bad.add(item_idx)
        self.failures.append((item.path, reason))
        logger.warning(
            "%s: %s. It is skipped for the rest of this run; another image of bucket %dx%d is used instead.",
            item.path, reason, item.bucket[0], item.bucket[1],  # type: ignore[index]
        )

    def _example(self, item_idx: int, rng: random.Random) -> dict[str, Any]:
        item = self.items[item_idx]
        bucket: Size = item.bucket  # type: ignore[assignment]
        flipped = self.flip_aug and rng.random() < 0.5
        out: dict[str, Any] = {}
        if self.latent_cache is not None:
            # Latents are cached from the centre crop of the preflight size.
            plan = plan_resize_crop(item.width, item.height, bucket)
            out["latents"] = self.latent_cache.get(item, flipped)
            mask = self.latent_cache.get_mask(item, flipped)
        else:
            loaded = load_image_with_info(item.path, needed_size=bucket)
            ow, oh = loaded.original_size
            if (ow, oh) != (item.width, item.height) and item_idx not in self._warned_changed:
                self._warned_changed.add(item_idx)
                logger.warning("%s changed size since the preflight (%dx%d -> %dx%d); using the new size",
                               item.path, item.width, item.height, ow, oh)
            plan = plan_resize_crop(ow, oh, bucket, random_crop=self.random_crop, rng=rng)
            pixels = pil_to_tensor(apply_plan(loaded.image, plan))
            if flipped:
                pixels = pixels.flip(-1)
            out["pixel_values"] = pixels
            mask = item_loss_mask(item, plan, flipped)
        if mask is not None:
            out["loss_mask"] = mask
        ow, oh = plan.original_size
        out["caption"] = options_for(self.captions, item.is_reg).process(item.caption, rng)
        out["original_size"] = (oh, ow)
        out["crop_top_left"] = plan.flipped_crop_top_left() if flipped else plan.crop_top_left
        out["target_size"] = (bucket[1], bucket[0])
        out["key"] = item.key
        out["flipped"] = flipped
        out["path"] = str(item.path)
        out["loss_weight"] = self.prior_loss_weight if item.is_reg else 1.0
        return out


def collate_examples(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack examples of one bucket into a batch.

    Returns pixel_values (B,3,H,W) or latents (B,C,h,w), captions list[str],
    original_sizes / crop_top_lefts / target_sizes LongTensor (B,2) in SDXL's
    (h,w)/(y,x) order, flipped BoolTensor (B,), keys, paths, indices,
    loss_weight FloatTensor (B,), and loss_mask (B,1,h,w) when any example has
    a mask (the others weigh 1 everywhere, as in kohya).
    """
    batch: dict[str, Any] = {}
    for name in ("pixel_values", "latents"):
        if all(name in e for e in examples):
            batch[name] = torch.stack([e[name] for e in examples])
    batch["captions"] = [e["caption"] for e in examples]
    batch["original_sizes"] = torch.tensor([e["original_size"] for e in examples], dtype=torch.long)
    batch["crop_top_lefts"] = torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.long)
    batch["target_sizes"] = torch.tensor([e["target_size"] for e in examples], dtype=torch.long)
    batch["flipped"] = torch.tensor([bool(e["flipped"]) for e in examples], dtype=torch.bool)
    batch["keys"] = [e["key"] for e in examples]
    batch["paths"] = [e["path"] for e in examples]
    batch["indices"] = [e.get("index") for e in examples]
    batch["loss_weight"] = torch.tensor([float(e.get("loss_weight", 1.0)) for e in examples], dtype=torch.float32)
    masks = [e.get("loss_mask") for e in examples]
    shaped = next((m for m in masks if m is not None), None)
    if shaped is not None:
        batch["loss_mask"] = torch.stack([m if m is not None else torch.ones_like(shaped) for m in masks])
    return batch


class BucketBatchSampler(Sampler):
    """Batches that never mix buckets, reshuffled each epoch.

    Given (seed, epoch) the batch list is fixed, so resume is exact:
    `set_epoch(epoch, skip_batches=n)` continues after the n-th batch of this
    process. With num_processes > 1 every process builds the same global list,
    pads it (repeating leading batches) to a multiple of num_processes so all
    ranks run the same number of steps, and takes every num_processes-th batch.
    Do not also let accelerate shard this DataLoader (don't pass it through
    accelerator.prepare), or use num_processes=1 and let accelerate do it.
    """

    def __init__(
        self,
        dataset: TrainDataset | Mapping[Size, Sequence[int]],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        process_index: int = 0,
        num_processes: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in [0, {num_processes})")
        bi = dataset.bucket_indices if isinstance(dataset, TrainDataset) else dataset
        self.bucket_indices: dict[Size, list[int]] = {tuple(b): list(ix) for b, ix in bi.items()}  # type: ignore[misc]
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.process_index = process_index
        self.num_processes = num_processes
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Epoch to serve next; skip_batches = batches of this process already done (resume)."""
        self.epoch = int(epoch)
        self.skip_batches = max(0, int(skip_batches))

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All batches of an epoch, before sharding (same on every process)."""
        rng = random.Random(f"{self.seed}:{epoch}:batches")
        batches: list[list[int]] = []
        for bucket in sorted(self.bucket_indices):
            idx = list(self.bucket_indices[bucket])
            if self.shuffle:
                rng.shuffle(idx)
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                if self.drop_last and len(chunk) < self.batch_size:
                    continue
                batches.append(chunk)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This process's batches for an epoch (padding/sharding applied, no skipping)."""
        allb = self.global_batches(self.epoch if epoch is None else epoch)
        if self.num_processes > 1 and allb:
            pad = (-len(allb)) % self.num_processes
            allb = allb + [allb[i % len(allb)] for i in range(pad)]
            allb = allb[self.process_index :: self.num_processes]
        return allb

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch = self.epoch
        for b in self.batches(epoch)[self.skip_batches :]:
            yield [SampleKey(i, epoch) for i in b]

    def __len__(self) -> int:
        total = 0
        for ix in self.bucket_indices.values():
            n = len(ix)
            total += n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        per_proc = math.ceil(total / self.num_processes) if total else 0
        return max(0, per_proc - self.skip_batches)
