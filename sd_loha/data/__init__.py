"""Data layer: find, check, bucket, caption and cache training images.

No model code lives here: the VAE and text encoders are passed in as
callables (see cache.py), so this layer can be tested and run (preflight)
before any model is loaded.

Typical order (see each module for details):
    report = run_preflight(train_dir, resolution=1024, ...)   # before loading models
    print(report.format())
    ds = TrainDataset(report, captions=CaptionOptions(...), flip_aug=..., seed=...)
    LatentCache(encoder_id, cache_dir).build(ds, vae_encode)   # optional
    sampler = BucketBatchSampler(ds, batch_size, seed=...)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_examples)
    for epoch: sampler.set_epoch(epoch); ds.set_epoch(epoch); for batch in loader: ...
"""

from .buckets import BucketError, BucketManager, CropPlan, make_bucket_resolutions, plan_resize_crop, resize_and_crop
from .cache import CacheStats, LatentCache, LatentCacheMiss, TextEmbeddingCache
from .captions import CaptionOptions, caption_variants, is_static, process_caption
from .dataset import BucketBatchSampler, SampleKey, TrainDataset, collate_examples
from .images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, ImageError, ImageInfo, inspect_image, load_image, load_image_with_info, probe_image
from .preflight import DatasetError, PreflightReport, run_preflight
from .scan import ImageItem, ScanResult, Skipped, scan_dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "BucketBatchSampler",
    "BucketError",
    "BucketManager",
    "CacheStats",
    "CaptionOptions",
    "CropPlan",
    "DatasetError",
    "ImageError",
    "ImageInfo",
    "ImageItem",
    "LatentCache",
    "LatentCacheMiss",
    "PreflightReport",
    "SampleKey",
    "ScanResult",
    "Skipped",
    "TextEmbeddingCache",
    "TrainDataset",
    "caption_variants",
    "collate_examples",
    "inspect_image",
    "is_static",
    "load_image",
    "load_image_with_info",
    "make_bucket_resolutions",
    "plan_resize_crop",
    "probe_image",
    "process_caption",
    "resize_and_crop",
    "run_preflight",
    "scan_dataset",
]
