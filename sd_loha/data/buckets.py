"""Aspect-ratio bucketing, following kohya sd-scripts.

Sizes are (width, height) like kohya's buckets; the SDXL conditioning values
returned by `resize_and_crop` are (height, width) / (top, left) like SDXL's
micro-conditioning (and kohya's original_sizes_hw / crop_top_lefts).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = [
    "BucketError",
    "BucketManager",
    "CropPlan",
    "Size",
    "make_bucket_resolutions",
    "plan_resize_crop",
    "resize_and_crop",
]

Size = tuple[int, int]  # (width, height)


class BucketError(ValueError):
    """An image that fits no bucket (only possible with bucket_no_upscale)."""


def _as_size(resolution: int | tuple[int, int] | list[int]) -> Size:
    if isinstance(resolution, int):
        return (resolution, resolution)
    w, h = (int(v) for v in resolution)
    return (w, h)


def make_bucket_resolutions(max_reso: int | Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64) -> list[Size]:
    """kohya's `make_bucket_resolutions`, same output.

    For every width from min_size to max_size in steps of `divisible`, the
    tallest height (multiple of `divisible`, <= max_size) whose area fits in
    max_reso's area, plus its transpose, plus the square. Not every (w, h)
    under the area: only the largest for each width, so each aspect ratio has
    one bucket and images of similar shape share batches.
    """
    mw, mh = _as_size(max_reso)
    max_area = mw * mh
    resos: set[Size] = set()
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class CropPlan:
    """How one image maps onto its bucket: cover-resize then crop."""

    original_size: Size  # (w, h) of the upright source image
    resized_size: Size  # (w, h) after the cover resize
    bucket: Size  # (w, h)
    crop_left: int
    crop_top: int

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) — SDXL order."""
        return (self.crop_top, self.crop_left)

    def flipped_crop_top_left(self) -> tuple[int, int]:
        """Crop (top, left) as seen after a horizontal flip of the crop — what
        SDXL should be told for a flipped sample (the left margin becomes the
        right one)."""
        return (self.crop_top, self.resized_size[0] - self.crop_left - self.bucket[0])


def plan_resize_crop(width: int, height: int, bucket: Size, *, random_crop: bool = False, rng: random.Random | None = None) -> CropPlan:
    """Scale so the image covers the bucket (short side matches), then crop the
    overflow: centred, or at a random offset when random_crop (needs rng)."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw = max(bw, int(width * scale + 0.5))
    rh = max(bh, int(height * scale + 0.5))
    if random_crop:
        if rng is None:
            raise ValueError("random_crop needs an rng")
        left = rng.randint(0, rw - bw)
        top = rng.randint(0, rh - bh)
    else:
        left = (rw - bw) // 2
        top = (rh - bh) // 2
    return CropPlan(original_size=(width, height), resized_size=(rw, rh), bucket=(bw, bh), crop_left=left, crop_top=top)


def apply_plan(image: Image.Image, plan: CropPlan) -> Image.Image:
    """Resize `image` (which may be a load-time-reduced copy of the original)
    to plan.resized_size and crop the bucket out of it."""
    if image.size != plan.resized_size:
        # LANCZOS antialiases properly when shrinking; reducing_gap makes large
        # downscales cheaper with no visible difference.
        image = image.resize(plan.resized_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    bw, bh = plan.bucket
    if image.size != plan.bucket:
        image = image.crop((plan.crop_left, plan.crop_top, plan.crop_left + bw, plan.crop_top + bh))
    return image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1] (what SD VAEs take)."""
    arr = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def resize_and_crop(
    image: Image.Image,
    bucket: Size,
    random_crop: bool = False,
    rng: random.Random | None = None,
    *,
    original_size: Size | None = None,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Image -> (pixels (3, H, W) in [-1, 1], crop_top_left (y, x), original_size (h, w)).

    original_size: upright (w, h) of the file when `image` was shrunk on load;
    the crop is planned on the original so SDXL conditioning is unaffected by
    load-time downscaling.
    """
    ow, oh = original_size if original_size is not None else image.size
    plan = plan_resize_crop(ow, oh, bucket, random_crop=random_crop, rng=rng)
    out = apply_plan(image, plan)
    return pil_to_tensor(out), plan.crop_top_left, (oh, ow)


class BucketManager:
    """Bucket set for one dataset and the rule that assigns images to buckets.

    resolution: int or (w, h); its area bounds every bucket's area.
    enable_bucket=False: a single bucket equal to `resolution` (images are
    cover-resized and cropped to it).
    bucket_no_upscale: an image is never enlarged; if its nearest bucket is
    bigger than the image, it gets a bucket of its own size (shrunk to the area
    and max_bucket_reso, rounded down to the step), like kohya.
    """

    def __init__(
        self,
        resolution: int | Size,
        *,
        enable_bucket: bool = True,
        min_bucket_reso: int = 256,
        max_bucket_reso: int = 1024,
        bucket_reso_steps: int = 64,
        bucket_no_upscale: bool = False,
    ) -> None:
        self.resolution = _as_size(resolution)
        rw, rh = self.resolution
        if rw <= 0 or rh <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if bucket_reso_steps <= 0 or bucket_reso_steps % 8:
            # The VAE downsamples by 8: any other size breaks latent shapes.
            raise ValueError(f"bucket_reso_steps must be a positive multiple of 8, got {bucket_reso_steps}")
        self.enable_bucket = enable_bucket
        self.step = bucket_reso_steps
        self.no_upscale = bucket_no_upscale and enable_bucket
        self.area = rw * rh
        self.notes: list[str] = []
        if not enable_bucket:
            if rw % 8 or rh % 8:
                raise ValueError(f"resolution must be a multiple of 8 (VAE), got {rw}x{rh}")
            if bucket_no_upscale:
                self.notes.append("bucket_no_upscale is ignored because bucketing is off")
            self.min_reso = self.max_reso = max(rw, rh)
            self.resolutions: list[Size] = [self.resolution]
        else:
            if max_bucket_reso < max(rw, rh):
                raise ValueError(
                    f"max_bucket_reso ({max_bucket_reso}) is smaller than the resolution {rw}x{rh}; "
                    f"set max_bucket_reso to at least {max(rw, rh)} (kohya users set 2048 for SDXL)"
                )
            if min_bucket_reso > max_bucket_reso:
                raise ValueError(f"min_bucket_reso ({min_bucket_reso}) is larger than max_bucket_reso ({max_bucket_reso})")
            square = int(math.sqrt(self.area) // self.step) * self.step
            if square < self.step:
                raise ValueError(f"resolution {rw}x{rh} is smaller than one bucket step ({self.step})")
            self.min_reso = min_bucket_reso
            if min_bucket_reso > square:
                # kohya would silently leave only the square bucket and (with
                # no_upscale) drop every image; small test/demo resolutions need this.
                self.min_reso = square
                self.notes.append(
                    f"min_bucket_reso {min_bucket_reso} is larger than the resolution; using {square} instead"
                )
            self.max_reso = max_bucket_reso
            self.resolutions = make_bucket_resolutions((rw, rh), self.min_reso, self.max_reso, self.step)
        self._set = set(self.resolutions)
        self._ratios = np.array([w / h for w, h in self.resolutions])

    def __repr__(self) -> str:
        return (
            f"BucketManager(resolution={self.resolution}, enable_bucket={self.enable_bucket}, "
            f"min={self.min_reso}, max={self.max_reso}, step={self.step}, no_upscale={self.no_upscale}, "
            f"buckets={len(self.resolutions)})"
        )

    def nearest(self, width: int, height: int) -> Size:
        """Predefined bucket with the closest aspect ratio (exact size preferred)."""
        if (width, height) in self._set:
            return (width, height)
        idx = int(np.abs(self._ratios - width / height).argmin())
        return self.resolutions[idx]

    def assign(self, width: int, height: int, no_upscale: bool | None = None) -> Size:
        """Bucket (w, h) for an upright image of width×height.

        Raises BucketError when bucket_no_upscale leaves the image smaller than
        min_bucket_reso on a side.
        """
        if width <= 0 or height <= 0:
            raise BucketError(f"image has no pixels ({width}x{height})")
        if not self.enable_bucket:
            return self.resolution
        no_up = self.no_upscale if no_upscale is None else no_upscale
        bucket = self.nearest(width, height)
        if not no_up or (width >= bucket[0] and height >= bucket[1]):
            return bucket
        # Would need enlarging: use the image's own size, shrunk to fit the
        # area and the max side, rounded down to the step (kohya's rule).
        s = min(1.0, math.sqrt(self.area / (width * height)), self.max_reso / width, self.max_reso / height)
        bw = int(width * s) // self.step * self.step
        bh = int(height * s) // self.step * self.step
        if bw < self.min_reso or bh < self.min_reso:
            raise BucketError(
                f"image is {width}x{height}: with bucket_no_upscale its bucket would be {bw}x{bh}, "
                f"below min_bucket_reso {self.min_reso}; lower min_bucket_reso or turn bucket_no_upscale off"
            )
        return (bw, bh)

    def describe(self) -> str:
        if not self.enable_bucket:
            return f"bucketing off: every image cover-resized and cropped to {self.resolution[0]}x{self.resolution[1]}"
        return (
            f"{len(self.resolutions)} buckets, area {self.resolution[0]}x{self.resolution[1]}, "
            f"sides {self.min_reso}-{self.max_reso} step {self.step}"
            + (", no upscale" if self.no_upscale else "")
        )
