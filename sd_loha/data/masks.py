"""Loss masks (masked_loss): where they come from and how they follow the image onto the latents.

A mask is one 8-bit channel, read as value / 255 (kohya's mapping: a conditioning image's R channel in
[-1, 1] mapped back by x / 2 + 0.5, an alpha channel divided by 255), so grey weighs the loss partially.
It goes through the image's own crop plan (cover resize, centre or random crop) and flip, then is
area-averaged down to the latents' size (kohya's ``F.interpolate(mode="area")`` to the loss's size), so a
mask drawn where the image shows a shape weighs the latents that encode that shape.

Sources, one per run:
- alpha_mask: the image's alpha channel ("A"); images without one weigh 1 everywhere (kohya's ones);
- conditioning_data_dir: a mask image per training image ("R"), found only at the image's path relative to
  train_data_dir (any image extension); a file of the same name in another folder belongs to another image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .buckets import CropPlan, apply_plan
from .images import IMAGE_EXTENSIONS, load_mask
from .scan import ImageItem

__all__ = ["LATENT_FACTOR", "MaskIndex", "item_loss_mask", "mask_pixels", "to_latent_size"]

#: SD 1.x/2.x and SDXL VAEs: one latent pixel per 8 x 8 image pixels
LATENT_FACTOR = 8


@dataclass
class MaskIndex:
    """The image files of a conditioning_data_dir, by path relative to it without extension (case-insensitive).

    A mask belongs to the image at the same relative path only: kohya folders often repeat file names
    (``10_dogs/001.png`` and ``5_cats/001.png``), so a name found elsewhere in the folder is another image's mask."""

    root: Path
    by_relative: dict[str, Path] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    used: set[Path] = field(default_factory=set)

    @classmethod
    def scan(cls, root: Path) -> MaskIndex:
        index = cls(root)
        for folder, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                path = Path(folder) / name
                index.by_relative.setdefault(_relative_key(path, root), path)
                index.files.append(path)
        return index

    def find(self, image: Path, image_root: Path) -> Path | None:
        """The mask of `image` (under image_root): the file at the same relative path, any image extension."""
        try:
            found = self.by_relative.get(_relative_key(image, image_root))
        except ValueError:
            return None
        if found is not None:
            self.used.add(found)
        return found

    def expected(self, image: Path, image_root: Path) -> Path:
        """Where the mask of `image` belongs, without its extension (for messages)."""
        return self.root / image.relative_to(image_root).with_suffix("")

    def unused(self) -> list[Path]:
        return sorted(set(self.files) - self.used)


def _relative_key(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix().lower()


def mask_pixels(item: ImageItem, plan: CropPlan, flipped: bool) -> torch.Tensor:
    """The item's mask at its bucket's pixel size, (1, H, W) in [0, 1], cropped and flipped like its pixels."""
    assert item.mask_path is not None and item.mask_channel is not None
    loaded = load_mask(item.mask_path, item.mask_channel, needed_size=plan.bucket)
    arr = np.asarray(apply_plan(loaded.image, plan), dtype=np.float32) / 255.0
    mask = torch.from_numpy(arr.copy()).unsqueeze(0)
    return mask.flip(-1) if flipped else mask


def to_latent_size(mask: torch.Tensor, factor: int = LATENT_FACTOR) -> torch.Tensor:
    """(1, H, W) -> (1, H/factor, W/factor): each latent pixel gets the mean of the pixels it encodes."""
    h, w = mask.shape[-2] // factor, mask.shape[-1] // factor
    return F.interpolate(mask.unsqueeze(0), size=(h, w), mode="area").squeeze(0)


def item_loss_mask(item: ImageItem, plan: CropPlan, flipped: bool) -> torch.Tensor | None:
    """The loss mask at the latents' size (1, h, w) for an item with a mask, None for one without."""
    if item.mask_path is None:
        return None
    return to_latent_size(mask_pixels(item, plan, flipped))
