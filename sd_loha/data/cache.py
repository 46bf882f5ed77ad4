"""Latent and text-embedding caches.

LatentCache keys every entry by a hash of everything that changes the
latents — the file (path, size, mtime_ns), its bucket and crop, the flip, and
the caller's `encoder_id` (VAE identity + dtype + scaling) — so a disk cache
is reused across runs while nothing changed and recomputed as soon as
anything did (kohya's "caching redone every run", and stale caches after a
settings change, are both avoided).

Differences from kohya, on purpose:
- flip_aug + caching: both the plain and the flipped latents are cached
  (kohya refuses the combination).
- random_crop + caching: caching is turned off with a warning, since each step
  crops differently (kohya refuses).

An image with a loss mask (masked_loss) caches its mask beside its latents, at
the latents' size, for each flip; the mask file (path, size, mtime_ns) and
channel are part of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as serialize
from tqdm.auto import tqdm

from ..atomic import write_atomic
from .buckets import apply_plan, pil_to_tensor, plan_resize_crop
from .images import ImageError, load_image_with_info
from .masks import mask_pixels, to_latent_size
from .scan import ImageItem

__all__ = ["CacheStats", "CacheableDataset", "LatentCache", "LatentCacheMiss", "TextEmbeddingCache"]

logger = logging.getLogger("sd_loha.data")

# Bump when the pixels fed to the encoder change for the same inputs
# (resize filter, crop rule, colour conversion): old cache files then miss.
CACHE_FORMAT_VERSION = 1


class LatentCacheMiss(LookupError):
    """No usable cached latents for an image (never cached, file deleted or damaged)."""


@dataclass
class CacheStats:
    enabled: bool
    encoded: int = 0  # latents computed now (image × variant)
    reused: int = 0  # found valid on disk
    failed: list[tuple[Path, str]] = field(default_factory=list)
    message: str = ""


class CacheableDataset(Protocol):
    """What LatentCache.build reads of a dataset (TrainDataset is one). Declared here rather than
    importing TrainDataset, because dataset.py imports this module: the dependency goes one way."""

    # read-only here (properties), so a dataset's list / plain attributes satisfy them
    @property
    def items(self) -> Sequence[ImageItem]: ...
    @property
    def flip_aug(self) -> bool: ...
    @property
    def random_crop(self) -> bool: ...

    def attach_latent_cache(self, cache: LatentCache | None) -> None: ...


class LatentCache:
    """Latents for every (image, flip) of a dataset, in memory or on disk.

    cache_dir=None keeps latents in memory for this run only. With cache_dir,
    each image+variant is one safetensors file, written atomically (sd_loha.atomic:
    temp file, fsync, rename) so an interrupted run never leaves a half-written entry, and
    read from disk on each access unless keep_in_memory=True.
    encoder_id must change whenever the encoder would produce different
    latents (e.g. hash of the VAE config + weights name, dtype, scaling factor).
    """

    def __init__(self, encoder_id: str, cache_dir: str | os.PathLike[str] | None = None, *, keep_in_memory: bool | None = None) -> None:
        if not encoder_id:
            raise ValueError("encoder_id must identify the encoder (e.g. VAE config hash + dtype)")
        self.encoder_id = encoder_id
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.keep_in_memory = (self.cache_dir is None) if keep_in_memory is None else keep_in_memory
        if self.cache_dir is None and not self.keep_in_memory:
            raise ValueError("keep_in_memory=False needs a cache_dir")
        self.enabled = True
        self._keys: dict[tuple[str, bool], str] = {}  # (item.key, flipped) -> entry hash
        self._mem: dict[str, torch.Tensor] = {}
        self._mem_masks: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ keys

    def entry_key(self, item: ImageItem, flipped: bool, st: os.stat_result | None = None) -> str:
        """Hash of everything that determines the cached latents."""
        st = st or os.stat(item.path)
        plan = plan_resize_crop(item.width, item.height, item.bucket)  # type: ignore[arg-type]
        fields = {
            "v": CACHE_FORMAT_VERSION,
            "path": str(Path(item.path).absolute()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "image_size": [item.width, item.height],
            "bucket": list(item.bucket),  # type: ignore[arg-type]
            "crop": {"mode": "center", "resized": list(plan.resized_size), "left": plan.crop_left, "top": plan.crop_top},
            "flip": bool(flipped),
            "encoder_id": self.encoder_id,
        }
        if item.mask_path is not None:  # only then: caches of unmasked runs keep their keys
            mst = os.stat(item.mask_path)
            fields["mask"] = {"path": str(Path(item.mask_path).absolute()), "size": mst.st_size,
                              "mtime_ns": mst.st_mtime_ns, "channel": item.mask_channel}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:40]

    def _file(self, h: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{h}.safetensors"

    def _valid_on_disk(self, h: str) -> bool:
        f = self._file(h)
        if not f.is_file():
            return False
        try:
            with safe_open(str(f), framework="pt") as sf:
                ok = "latents" in sf.keys() and (sf.metadata() or {}).get("encoder_id") == self.encoder_id
            return ok
        except Exception:  # damaged or foreign file: recompute
            return False

    def _write(self, h: str, latents: torch.Tensor, item: ImageItem, flipped: bool, mask: torch.Tensor | None) -> None:
        assert self.cache_dir is not None
        meta = {
            "encoder_id": self.encoder_id,
            "path": str(item.path),
            "bucket": f"{item.bucket[0]}x{item.bucket[1]}",  # type: ignore[index]
            "flipped": "1" if flipped else "0",
            "format_version": str(CACHE_FORMAT_VERSION),
        }
        tensors = {"latents": latents.contiguous()}
        if mask is not None:
            tensors["loss_mask"] = mask.contiguous()
        # Serialised in memory (an entry is at most a few hundred kB) so the shared writer fsyncs and renames it.
        write_atomic(self._file(h), serialize(tensors, metadata=meta))

    # ------------------------------------------------------------------ build / get

    def build(
        self,
        dataset: CacheableDataset,
        encode_fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        batch_size: int = 1,
        progress: bool = True,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> CacheStats:
        """Encode (or find on disk) latents for every image of `dataset` and
        attach this cache to it. encode_fn gets pixels (B,3,H,W) in [-1,1] on
        CPU (move them to the VAE's device/dtype yourself) and returns latents
        (B,C,H/8,W/8), stored as returned (scale them there if you want).
        on_progress(done, total) is for UIs; tqdm shows progress on the console.
        """
        if dataset.random_crop:
            self.enabled = False
            msg = (
                "latent caching is turned OFF because random_crop is on: each step crops a different region, "
                "so latents cannot be computed once. Training encodes images with the VAE every step "
                "(slower, more memory). Turn random_crop off to cache."
            )
            logger.warning(msg)
            dataset.attach_latent_cache(None)
            return CacheStats(enabled=False, message=msg)
        self.enabled = True
        variants = [False, True] if dataset.flip_aug else [False]
        stats = CacheStats(enabled=True)

        # Work list: per image, the variants not already cached.
        todo: list[tuple[ImageItem, list[tuple[bool, str]]]] = []
        for item in dataset.items:
            try:
                st = os.stat(item.path)
                hashes = [self.entry_key(item, flipped, st) for flipped in variants]
            except OSError as e:  # the image, or its mask file
                stats.failed.append((Path(e.filename or item.path), f"cannot read file ({e.strerror or e})"))
                continue
            need: list[tuple[bool, str]] = []
            for flipped, h in zip(variants, hashes):
                self._keys[(item.key, flipped)] = h
                if h in self._mem:
                    stats.reused += 1
                elif self.cache_dir is not None and self._valid_on_disk(h):
                    stats.reused += 1
                    if self.keep_in_memory:
                        self._remember(h, self._load(h))
                else:
                    need.append((flipped, h))
            if need:
                todo.append((item, need))

        total = sum(len(n) for _, n in todo)
        # Batches must share a shape: group by bucket.
        todo.sort(key=lambda t: (t[0].bucket, str(t[0].path)))
        bar = tqdm(total=total, desc="Caching latents", unit="img", disable=not progress or total == 0)
        done = 0
        pending: list[tuple[ImageItem, bool, str, torch.Tensor, torch.Tensor | None]] = []

        def flush() -> None:
            nonlocal done
            if not pending:
                return
            pixels = torch.stack([p[3] for p in pending])
            with torch.no_grad():
                lat = encode_fn(pixels)
            if not isinstance(lat, torch.Tensor) or lat.shape[0] != len(pending):
                raise TypeError(
                    f"encode_fn must return a tensor with batch size {len(pending)}, got "
                    f"{type(lat).__name__}{tuple(lat.shape) if isinstance(lat, torch.Tensor) else ''}"
                )
            lat = lat.detach().to("cpu")
            for (item, flipped, h, _, mask), one in zip(pending, lat):
                one = one.clone()
                if self.cache_dir is not None:
                    self._write(h, one, item, flipped, mask)
                if self.keep_in_memory:
                    self._remember(h, {"latents": one, "loss_mask": mask})
            stats.encoded += len(pending)
            done += len(pending)
            bar.update(len(pending))
            if on_progress is not None:
                on_progress(done, total)
            pending.clear()

        try:
            for item, need in todo:
                if pending and pending[0][0].bucket != item.bucket:
                    flush()
                plan = plan_resize_crop(item.width, item.height, item.bucket)  # type: ignore[arg-type]
                try:
                    loaded = load_image_with_info(item.path, needed_size=item.bucket)
                    mask = mask_pixels(item, plan, False) if item.mask_path is not None else None
                except ImageError as e:
                    stats.failed.append((item.path, e.reason))
                    logger.warning("%s: %s; not cached (it will be replaced by another image during training)", item.path, e.reason)
                    done += len(need)
                    bar.update(len(need))
                    continue
                px = pil_to_tensor(apply_plan(loaded.image, plan))
                for flipped, h in need:
                    m = None if mask is None else to_latent_size(mask.flip(-1) if flipped else mask)
                    pending.append((item, flipped, h, px.flip(-1) if flipped else px, m))
                    if len(pending) >= batch_size:
                        flush()
            flush()
        finally:
            bar.close()
        dataset.attach_latent_cache(self)
        where = f"in {self.cache_dir}" if self.cache_dir is not None else "in memory"
        stats.message = f"latents cached {where}: {stats.encoded} encoded, {stats.reused} reused" + (
            f", {len(stats.failed)} failed" if stats.failed else ""
        )
        logger.info(stats.message)
        return stats

    def _load(self, h: str) -> dict[str, torch.Tensor]:
        try:
            tensors = load_file(str(self._file(h)))
            tensors["latents"]  # noqa: B018 - a file without latents is damaged
            return tensors
        except Exception as e:
            raise LatentCacheMiss(f"cached latents {self._file(h).name} unreadable ({e})") from None

    def _remember(self, h: str, tensors: dict[str, torch.Tensor | None]) -> None:
        self._mem[h] = tensors["latents"]  # type: ignore[assignment]
        if tensors.get("loss_mask") is not None:
            self._mem_masks[h] = tensors["loss_mask"]  # type: ignore[assignment]

    def _entry(self, item: ImageItem, flipped: bool) -> dict[str, torch.Tensor]:
        h = self._keys.get((item.key, bool(flipped)))
        if h is None:
            raise LatentCacheMiss(f"{item.path}: no cached latents ({'flipped' if flipped else 'plain'})")
        t = self._mem.get(h)
        if t is not None:
            return {"latents": t, **({"loss_mask": self._mem_masks[h]} if h in self._mem_masks else {})}
        if self.cache_dir is None:
            raise LatentCacheMiss(f"{item.path}: latents were not cached (encoding failed earlier)")
        if not self._file(h).is_file():
            raise LatentCacheMiss(f"{item.path}: cache file {self._file(h).name} is missing")
        return self._load(h)

    def get(self, item: ImageItem, flipped: bool = False) -> torch.Tensor:
        """Cached latents (C, h, w) for an image; LatentCacheMiss if there are none."""
        return self._entry(item, flipped)["latents"]

    def get_mask(self, item: ImageItem, flipped: bool = False) -> torch.Tensor | None:
        """The cached loss mask (1, h, w) of an image with a mask (None for one without); LatentCacheMiss if
        the entry is gone or was written without its mask."""
        if item.mask_path is None:
            return None
        mask = self._entry(item, flipped).get("loss_mask")
        if mask is None:
            raise LatentCacheMiss(f"{item.path}: cached latents have no loss mask")
        return mask

    def __len__(self) -> int:
        return len(self._keys)


class TextEmbeddingCache:
    """Text-encoder outputs keyed by caption text (+ encoder_id).

    Only valid when captions are static (`captions.is_static`) or take a few
    known values (`captions.caption_variants`): a shuffled caption is new
    every step. Values are whatever encode_fn returns per caption: a tensor,
    or a tuple of tensors (SDXL: hidden states, pooled).
    """

    def __init__(self, encoder_id: str) -> None:
        self.encoder_id = encoder_id
        self._store: dict[tuple[str, str], Any] = {}

    def __contains__(self, caption: str) -> bool:
        return (self.encoder_id, caption) in self._store

    def __len__(self) -> int:
        return len(self._store)

    def get(self, caption: str) -> Any | None:
        return self._store.get((self.encoder_id, caption))

    def put(self, caption: str, value: Any) -> None:
        self._store[(self.encoder_id, caption)] = value

    def precompute(self, captions: Sequence[str], encode_fn: Callable[[list[str]], Any], *, batch_size: int = 16) -> int:
        """Encode the captions not yet cached; returns how many were encoded.
        encode_fn(list[str]) -> tensor (B, ...) or tuple of such tensors."""
        todo = list(dict.fromkeys(c for c in captions if c not in self))
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            with torch.no_grad():
                out = encode_fn(chunk)
            for i, cap in enumerate(chunk):
                if isinstance(out, (tuple, list)):
                    self.put(cap, tuple(t[i].detach() for t in out))
                else:
                    self.put(cap, out[i].detach())
        return len(todo)

    def encode_batch(self, captions: Sequence[str], encode_fn: Callable[[list[str]], Any] | None = None) -> Any:
        """Batched outputs for these captions, stacked like encode_fn's output;
        missing captions are encoded with encode_fn (KeyError without one)."""
        if encode_fn is not None:
            self.precompute(captions, encode_fn)
        vals = []
        for c in captions:
            v = self.get(c)
            if v is None:
                raise KeyError(f"caption not in the text-embedding cache: {c!r}")
            vals.append(v)
        if isinstance(vals[0], tuple):
            return tuple(torch.stack([v[k] for v in vals]) for k in range(len(vals[0])))
        return torch.stack(vals)
