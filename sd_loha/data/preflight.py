"""Dataset preflight: everything about the data that can go wrong, said before
any model is loaded (kohya's "No data found" / "batch larger than bucket"
surprises arrive minutes into a run, after the model load).
"""

from __future__ import annotations

import difflib
import math
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .buckets import BucketError, BucketManager, Size
from .images import IMAGE_EXTENSIONS, ImageError, inspect_image
from .masks import MaskIndex
from .scan import CAPTION_EXTENSIONS, ImageItem, Skipped, scan_dataset

__all__ = ["BucketStat", "DatasetError", "MaskStat", "PreflightReport", "RegStat", "SubsetStat", "balance_regularization",
           "run_preflight"]

# Plain-words headings for skip categories (ImageError.kind / Skipped.kind).
SKIP_LABELS = {
    "empty": "empty file (0 bytes)",
    "truncated": "truncated file",
    "decode_error": "damaged image data",
    "not_an_image": "not an image",
    "unsupported": "unsupported format",
    "too_large": "too large (decompression-bomb limit)",
    "too_small": "too small for any bucket (bucket_no_upscale)",
    "permission": "no read permission",
    "broken_link": "broken symbolic link",
    "link_loop": "symbolic link loop",
    "not_a_file": "not a regular file",
    "not_found": "file vanished during the scan",
    "zero_repeats": "folder sets 0 repeats",
    "unreadable": "unreadable",
}


class DatasetError(ValueError):
    """The dataset folder cannot be trained on; the message says why and what to change."""


@dataclass(frozen=True)
class BucketStat:
    bucket: Size  # (w, h)
    images: int  # distinct images
    samples: int  # images × repeats: what one epoch sees
    batches: int  # ceil(samples / batch_size)


@dataclass(frozen=True)
class SubsetStat:
    folder: Path
    repeats: int
    images: int
    folder_caption: str | None
    missing_captions: int


@dataclass(frozen=True)
class RegStat:
    """The regularization images of an epoch (kohya's balance against the training samples)."""

    folder: Path
    images_found: int
    images_used: int  # images that appear in an epoch
    images_unused: int  # usable images the balance leaves out (more reg samples than training samples)
    samples: int  # regularization samples per epoch (their repeats after the balance)
    train_samples: int  # training samples per epoch (images x folder repeats) they are balanced against
    min_repeats: int
    max_repeats: int
    prior_loss_weight: float


@dataclass(frozen=True)
class MaskStat:
    """Where the loss masks come from and which images have one."""

    source: str  # "alpha_mask" or the conditioning_data_dir
    channel: str  # "A" or "R"
    with_mask: int  # training (and validation) images with a mask
    full_weight: list[Path]  # of those, images whose mask is 1 everywhere by construction (no alpha channel)
    reg_with_mask: int  # regularization images with a mask (the others weigh 1 everywhere)
    reg_images: int


@dataclass
class PreflightReport:
    train_data_dir: Path
    settings: dict[str, Any]
    images_found: int
    items: list[ImageItem]  # training items, bucket assigned
    validation_items: list[ImageItem]
    skipped: list[Skipped]
    warnings: list[str]
    buckets: list[BucketStat]
    subsets: list[SubsetStat]
    caption_sources: dict[str, int]  # "file"/"metadata"/"folder"/"missing" -> images
    missing_captions: list[Path]
    missing_caption_fallback: str
    batch_size: int
    steps_per_epoch: int  # batches per epoch per process (before gradient accumulation)
    bucket_manager: BucketManager
    reg_items: list[ImageItem] = field(default_factory=list)  # regularization items, repeats after the balance
    reg: RegStat | None = None
    masks: MaskStat | None = None

    @property
    def num_samples(self) -> int:
        """Samples per epoch: training images x repeats, plus the regularization samples."""
        return sum(b.samples for b in self.buckets)

    @property
    def epoch_items(self) -> list[ImageItem]:
        """What one epoch trains on: the training items, then the regularization items."""
        return self.items + self.reg_items

    def skipped_by_kind(self) -> dict[str, list[Skipped]]:
        groups: dict[str, list[Skipped]] = defaultdict(list)
        for s in self.skipped:
            groups[s.kind].append(s)
        return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))

    def _rel(self, p: Path) -> str:
        try:
            return p.relative_to(self.train_data_dir).as_posix()
        except ValueError:
            return str(p)

    # ------------------------------------------------------------------ output

    def format(self) -> str:
        """Human-readable summary, ~20 lines for a typical dataset."""
        s = self.settings
        res = s["resolution"]
        lines = [f"Dataset preflight: {self.train_data_dir}"]
        lines.append(
            f"  images: {self.images_found} found, {len(self.items)} used for training"
            + (f", {len(self.validation_items)} held out for validation" if self.validation_items else "")
            + f", {len(self.skipped)} skipped"
        )
        cs = self.caption_sources
        parts = [f"{cs.get('file', 0)} from {s['caption_extension']}/{'/'.join(e for e in CAPTION_EXTENSIONS if e != s['caption_extension'])} files"]
        if cs.get("metadata"):
            parts.append(f"{cs['metadata']} from metadata.jsonl")
        if cs.get("folder"):
            parts.append(f"{cs['folder']} from folder names")
        parts.append(f"{cs.get('missing', 0)} missing")
        lines.append("  captions: " + ", ".join(parts))
        if cs.get("missing"):
            lines.append(f"    images without a caption are trained with {self.missing_caption_fallback}")
        lines.append(f"  resolution {res[0]}x{res[1]}; {self.bucket_manager.describe()}")
        lines.extend(self._reg_lines())
        lines.extend(self._mask_lines())

        if len(self.subsets) > 1 or any(st.repeats != 1 for st in self.subsets):
            lines.append("")
            lines.append(f"  {'folder':<32} {'repeats':>7} {'images':>6}  folder caption")
            for st in self.subsets:
                name = self._rel(st.folder) if st.folder != self.train_data_dir else "."
                lines.append(f"  {name[:32]:<32} {st.repeats:>7} {st.images:>6}  {st.folder_caption or '-'}")

        lines.append("")
        lines.append(f"  {'bucket (WxH)':<14} {'images':>6} {'samples':>8} {'batches':>8}")
        for b in self.buckets:
            flag = "  < batch size" if b.samples < self.batch_size else ""
            lines.append(f"  {b.bucket[0]:>5}x{b.bucket[1]:<8} {b.images:>6} {b.samples:>8} {b.batches:>8}{flag}")
        lines.append(
            f"  {'total':<14} {sum(b.images for b in self.buckets):>6} {self.num_samples:>8} "
            f"{sum(b.batches for b in self.buckets):>8}"
        )
        nproc = s.get("num_processes", 1)
        lines.append(
            f"  steps per epoch: {self.steps_per_epoch} (batch size {self.batch_size}"
            + (f", {nproc} processes" if nproc > 1 else "")
            + ", before gradient accumulation)"
        )

        groups = self.skipped_by_kind()
        if groups:
            lines.append("")
            lines.append(f"  skipped {len(self.skipped)} file(s):")
            for kind, entries in groups.items():
                shown = ", ".join(self._rel(e.path) for e in entries[:3]) + (" ..." if len(entries) > 3 else "")
                lines.append(f"    {SKIP_LABELS.get(kind, kind)} ({len(entries)}): {shown}")
                if len(entries) == 1 or len({e.reason for e in entries}) == 1:
                    lines.append(f"      {entries[0].reason}")
        if self.warnings:
            lines.append("")
            lines.append("  warnings:")
            lines.extend(f"    - {w}" for w in self.warnings)
        return "\n".join(lines)

    def _reg_lines(self) -> list[str]:
        r = self.reg
        if r is None:
            return []
        reps = f"{r.min_repeats}" if r.min_repeats == r.max_repeats else f"{r.min_repeats}-{r.max_repeats}"
        lines = [
            f"  regularization: {r.folder}: {r.images_found} found, {r.images_used} used"
            + (f", {r.images_unused} not used (more than the training samples)" if r.images_unused else ""),
            f"    {r.samples} regularization samples per epoch for {r.train_samples} training samples (kohya's "
            f"balance; each used image {reps} time(s)); their loss x prior_loss_weight {r.prior_loss_weight:g}",
        ]
        return lines

    def _mask_lines(self) -> list[str]:
        m = self.masks
        if m is None:
            return []
        what = "alpha channel of each image" if m.channel == "A" else f"red channel of the masks in {m.source}"
        lines = [f"  masked loss: loss weighted by the {what} (value/255): {m.with_mask} image(s)"]
        if m.full_weight:
            shown = ", ".join(self._rel(p) for p in m.full_weight[:5]) + (" ..." if len(m.full_weight) > 5 else "")
            lines.append(f"    {len(m.full_weight)} have no alpha channel and weigh 1 everywhere: {shown}")
        if m.reg_images:
            lines.append(f"    regularization images: {m.reg_with_mask} with a mask, "
                         f"{m.reg_images - m.reg_with_mask} weigh 1 everywhere")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form for the web UI."""

        def item(it: ImageItem) -> dict[str, Any]:
            return {
                "path": self._rel(it.path),
                "caption": it.caption,
                "caption_source": it.caption_source,
                "repeats": it.repeats,
                "width": it.width,
                "height": it.height,
                "bucket": list(it.bucket) if it.bucket else None,
                "mask": str(it.mask_path) if it.mask_path else None,
            }

        return {
            "train_data_dir": str(self.train_data_dir),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.settings.items()},
            "images_found": self.images_found,
            "images_used": len(self.items),
            "validation_images": len(self.validation_items),
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "buckets": [
                {"width": b.bucket[0], "height": b.bucket[1], "images": b.images, "samples": b.samples,
                 "batches": b.batches, "smaller_than_batch": b.samples < self.batch_size}
                for b in self.buckets
            ],
            "subsets": [
                {"folder": self._rel(st.folder) if st.folder != self.train_data_dir else ".", "repeats": st.repeats,
                 "images": st.images, "folder_caption": st.folder_caption, "missing_captions": st.missing_captions}
                for st in self.subsets
            ],
            "captions": dict(self.caption_sources),
            "missing_captions": [self._rel(p) for p in self.missing_captions],
            "missing_caption_fallback": self.missing_caption_fallback,
            "skipped": [{"path": self._rel(s.path), "reason": s.reason, "kind": s.kind} for s in self.skipped],
            "skipped_by_kind": {k: len(v) for k, v in self.skipped_by_kind().items()},
            "warnings": list(self.warnings),
            "items": [item(i) for i in self.items],
            "validation_items": [item(i) for i in self.validation_items],
            "reg_items": [item(i) for i in self.reg_items],
            "regularization": None if self.reg is None else {
                "folder": str(self.reg.folder), "images_found": self.reg.images_found,
                "images_used": self.reg.images_used, "images_unused": self.reg.images_unused,
                "samples": self.reg.samples, "train_samples": self.reg.train_samples,
                "prior_loss_weight": self.reg.prior_loss_weight},
            "masks": None if self.masks is None else {
                "source": self.masks.source, "channel": self.masks.channel, "with_mask": self.masks.with_mask,
                "full_weight": [self._rel(p) for p in self.masks.full_weight],
                "reg_with_mask": self.masks.reg_with_mask, "reg_images": self.masks.reg_images},
        }


# ---------------------------------------------------------------------- errors


def _missing_dir_error(path: Path, key: str = "train_data_dir") -> DatasetError:
    msg = f"{key} not found: {path.absolute()}"
    parent = path.absolute().parent
    if parent.is_dir():
        try:
            names = [n for n in os.listdir(parent) if (parent / n).is_dir()]
        except OSError:
            names = []
        close = difflib.get_close_matches(path.name, names, n=3)
        if close:
            msg += "\n  did you mean: " + ", ".join(str(parent / c) for c in close)
    else:
        msg += f"\n  (its parent folder {parent} does not exist either)"
    msg += f"\n  relative paths are resolved from the working folder {Path.cwd()}"
    return DatasetError(msg)


def _nothing_usable_error(root: Path, scan, caption_ext: str, skipped: list[Skipped]) -> DatasetError:
    lines = [f"no usable training images in {root.absolute()}"]
    lines.append(
        f"  looked for: {' '.join(IMAGE_EXTENSIONS)} (any case), in this folder and all subfolders "
        f"({scan.folders_scanned} folder(s) scanned), hidden files and folders excluded"
    )
    lines.append(
        f"  captions: same-name {caption_ext} file (or {'/'.join(e for e in CAPTION_EXTENSIONS if e != caption_ext)}), "
        "metadata.jsonl, or the name of a kohya repeat folder"
    )
    lines.append(
        "  layouts: train_data_dir/*.png + *.txt  |  train_data_dir/10_sks dog/*.png (kohya: 10 repeats, "
        "caption 'sks dog')  |  train_data_dir/metadata.jsonl (Hugging Face imagefolder)"
    )
    if skipped:
        lines.append(f"  {len(skipped)} file(s) were skipped; the first ones:")
        for s in skipped[:5]:
            try:
                rel = s.path.relative_to(root).as_posix()
            except ValueError:
                rel = str(s.path)
            lines.append(f"    {rel}: {s.reason}")
    if scan.other_files:
        top = ", ".join(f"{ext} ({n})" for ext, n in scan.other_files.most_common(6))
        lines.append(f"  other files found and ignored: {top}")
    if scan.hidden_ignored:
        lines.append(f"  {scan.hidden_ignored} hidden file(s)/folder(s) ignored (names starting with '.')")
    if not skipped and not scan.other_files:
        lines.append("  the folder (and its subfolders) contain no files at all")
    return DatasetError("\n".join(lines))


# ---------------------------------------------------------------------- main entry


def run_preflight(
    train_data_dir: str | os.PathLike[str],
    *,
    resolution: int | Size,
    enable_bucket: bool = True,
    min_bucket_reso: int = 256,
    max_bucket_reso: int = 1024,
    bucket_reso_steps: int = 64,
    bucket_no_upscale: bool = False,
    caption_extension: str = ".txt",
    batch_size: int = 1,
    validation_split: float = 0.0,
    seed: int = 0,
    trigger_word: str | None = None,
    verify: bool = True,
    num_processes: int = 1,
    reg_data_dir: str | os.PathLike[str] | None = None,
    prior_loss_weight: float = 1.0,
    alpha_mask: bool = False,
    conditioning_data_dir: str | os.PathLike[str] | None = None,
) -> PreflightReport:
    """Scan, verify and bucket the dataset; raise DatasetError when it cannot be used.

    verify=True decodes every image (JPEGs at 1/8 scale) so damaged files are
    reported now, not mid-training; set False for very large datasets.
    Settings errors (bad bucket sizes...) raise ValueError.
    reg_data_dir: regularization images, balanced against the training samples
    (:func:`balance_regularization`); prior_loss_weight is only shown here (the
    dataset weighs their loss). alpha_mask / conditioning_data_dir: where each
    image's loss mask comes from (sd_loha.data.masks).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if alpha_mask and conditioning_data_dir is not None:
        raise ValueError("choose one mask source: alpha_mask or conditioning_data_dir, not both")
    root, reg_root, mask_root = _checked_folders(train_data_dir, reg_data_dir, conditioning_data_dir)

    bm = BucketManager(
        resolution,
        enable_bucket=enable_bucket,
        min_bucket_reso=min_bucket_reso,
        max_bucket_reso=max_bucket_reso,
        bucket_reso_steps=bucket_reso_steps,
        bucket_no_upscale=bucket_no_upscale,
    )
    cap_ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    scan = scan_dataset(root, caption_extension=cap_ext, verify=verify)
    skipped = list(scan.skipped)
    warnings = list(scan.warnings) + list(bm.notes)
    items, upscaled = _bucketed(scan.items, bm, skipped)
    if not items:
        raise _nothing_usable_error(root, scan, cap_ext, skipped)

    items, validation = _split_validation(items, validation_split, seed, warnings)
    reg_items: list[ImageItem] = []
    reg_stat: RegStat | None = None
    if reg_root is not None:
        reg_items, reg_stat = _regularization(reg_root, items, bm, cap_ext, verify=verify,
                                              prior_loss_weight=prior_loss_weight, skipped=skipped,
                                              upscaled=upscaled, warnings=warnings)
    skipped.sort(key=lambda s: str(s.path))
    mask_stat: MaskStat | None = None
    if alpha_mask or mask_root is not None:
        items, validation, reg_items, mask_stat, mask_warnings = _attach_masks(
            root, items, validation, reg_items, mask_root, verify=verify)
        warnings.extend(mask_warnings)
    buckets = _bucket_stats(items + reg_items, batch_size, upscaled, warnings)
    subsets, missing, fallback = _caption_stats(items + validation, trigger_word, cap_ext, warnings)

    settings = {
        "resolution": bm.resolution,
        "enable_bucket": enable_bucket,
        "min_bucket_reso": bm.min_reso,
        "max_bucket_reso": bm.max_reso,
        "bucket_reso_steps": bucket_reso_steps,
        "bucket_no_upscale": bm.no_upscale,
        "caption_extension": cap_ext,
        "batch_size": batch_size,
        "validation_split": validation_split,
        "seed": seed,
        "trigger_word": trigger_word,
        "verify": verify,
        "num_processes": num_processes,
        "reg_data_dir": str(reg_root) if reg_root is not None else None,
        "prior_loss_weight": prior_loss_weight,
        "alpha_mask": alpha_mask,
        "conditioning_data_dir": str(mask_root) if mask_root is not None else None,
    }
    return PreflightReport(
        train_data_dir=root,
        settings=settings,
        images_found=len(scan.items) + len(scan.skipped),
        items=items,
        validation_items=validation,
        skipped=skipped,
        warnings=warnings,
        buckets=buckets,
        subsets=subsets,
        caption_sources=dict(Counter(it.caption_source or "missing" for it in items + validation)),
        missing_captions=missing,
        missing_caption_fallback=fallback,
        batch_size=batch_size,
        steps_per_epoch=math.ceil(sum(b.batches for b in buckets) / num_processes),
        bucket_manager=bm,
        reg_items=reg_items,
        reg=reg_stat,
        masks=mask_stat,
    )


def _checked_folders(train_data_dir: str | os.PathLike[str], reg_data_dir: str | os.PathLike[str] | None,
                     conditioning_data_dir: str | os.PathLike[str] | None) -> tuple[Path, Path | None, Path | None]:
    """The three folders as absolute paths (items stay valid if the trainer or a worker changes cwd), each
    checked to exist and be a folder."""
    root = Path(train_data_dir).expanduser().absolute()
    _check_folder(root, "train_data_dir")
    reg_root = Path(reg_data_dir).expanduser().absolute() if reg_data_dir is not None else None
    mask_root = Path(conditioning_data_dir).expanduser().absolute() if conditioning_data_dir is not None else None
    for folder, key in ((reg_root, "reg_data_dir"), (mask_root, "conditioning_data_dir")):
        if folder is not None:
            _check_folder(folder, key)
    return root, reg_root, mask_root


def _split_validation(items: list[ImageItem], validation_split: float, seed: int,
                      warnings: list[str]) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training, validation): held out by image (before repeats), deterministic in the seed."""
    if validation_split <= 0:
        return items, []
    n_val = min(len(items) - 1, max(1, round(len(items) * validation_split)))
    if n_val < 1:
        warnings.append("validation_split ignored: a single image cannot be split into training and validation")
        return items, []
    chosen = set(random.Random(f"{seed}:validation").sample(range(len(items)), n_val))
    return ([it for i, it in enumerate(items) if i not in chosen], [it for i, it in enumerate(items) if i in chosen])


def _regularization(reg_root: Path, items: list[ImageItem], bm: BucketManager, cap_ext: str, *, verify: bool,
                    prior_loss_weight: float, skipped: list[Skipped], upscaled: list[tuple[ImageItem, float]],
                    warnings: list[str]) -> tuple[list[ImageItem], RegStat]:
    """The regularization images balanced against the training samples (kohya), never held out for
    validation; their skipped files, enlargements and warnings join the training set's lists."""
    reg_scan = scan_dataset(reg_root, caption_extension=cap_ext, verify=verify)
    skipped.extend(reg_scan.skipped)
    warnings.extend(f"reg_data_dir: {w}" for w in reg_scan.warnings)
    usable, reg_upscaled = _bucketed(reg_scan.items, bm, skipped)
    upscaled.extend(reg_upscaled)
    found = len(reg_scan.items) + len(reg_scan.skipped)
    if not usable:
        raise DatasetError(f"reg_data_dir {reg_root} holds no usable images ({found} found, {found - len(usable)} "
                           "skipped); add regularization images (same layout as train_data_dir) or remove reg_data_dir")
    train_samples = sum(it.repeats for it in items)
    reg_items = [replace(it, is_reg=True) for it in balance_regularization(train_samples, usable)]
    repeats = [it.repeats for it in reg_items]
    stat = RegStat(folder=reg_root, images_found=found, images_used=len(reg_items),
                   images_unused=len(usable) - len(reg_items), samples=sum(repeats), train_samples=train_samples,
                   min_repeats=min(repeats), max_repeats=max(repeats), prior_loss_weight=prior_loss_weight)
    if stat.images_unused:
        warnings.append(f"{stat.images_unused} of {len(usable)} regularization images are not used: an epoch "
                        f"balances {train_samples} training samples with as many regularization samples (kohya)")
    return reg_items, stat


def _bucket_stats(items: list[ImageItem], batch_size: int, upscaled: list[tuple[ImageItem, float]],
                  warnings: list[str]) -> list[BucketStat]:
    """Images, samples (repeats counted) and batches per bucket, most samples first; warns of buckets that
    cannot fill a batch and of images enlarged more than 2x."""
    per_bucket_images: Counter = Counter()
    per_bucket_samples: Counter = Counter()
    for it in items:
        per_bucket_images[it.bucket] += 1
        per_bucket_samples[it.bucket] += it.repeats
    buckets = [
        BucketStat(bucket=b, images=per_bucket_images[b], samples=per_bucket_samples[b],
                   batches=math.ceil(per_bucket_samples[b] / batch_size))
        for b in sorted(per_bucket_images, key=lambda b: (-per_bucket_samples[b], b))
    ]
    small = [b for b in buckets if b.samples < batch_size]
    if small:
        shown = ", ".join(f"{b.bucket[0]}x{b.bucket[1]} ({b.samples})" for b in small[:6]) + (" ..." if len(small) > 6 else "")
        warnings.append(
            f"{len(small)} bucket(s) hold fewer samples than batch_size {batch_size}: {shown}. A batch never mixes "
            f"buckets, so these batches will be smaller than {batch_size}. To fill batches: lower batch_size, "
            "add repeats, raise bucket_reso_steps, or turn off bucket_no_upscale."
        )
    if upscaled:
        upscaled.sort(key=lambda t: -t[1])
        shown = ", ".join(f"{it.path.name} ({it.width}x{it.height}, x{s:.1f})" for it, s in upscaled[:4])
        warnings.append(
            f"{len(upscaled)} image(s) are enlarged more than 2x to fill their bucket and will look soft: {shown}"
        )
    return buckets


def _caption_stats(items: list[ImageItem], trigger_word: str | None, cap_ext: str,
                   warnings: list[str]) -> tuple[list[SubsetStat], list[Path], str]:
    """(one SubsetStat per image folder, the images without a caption, what those train with); warns when no
    image has a caption and of empty caption files."""
    by_subset: dict[Path, list[ImageItem]] = defaultdict(list)
    for it in items:
        by_subset[it.subset_dir].append(it)
    subsets = [
        SubsetStat(folder=sub, repeats=its[0].repeats, images=len(its), folder_caption=its[0].folder_caption,
                   missing_captions=sum(1 for i in its if i.caption is None))
        for sub, its in sorted(by_subset.items(), key=lambda kv: str(kv[0]))
    ]
    missing = [it.path for it in items if it.caption is None]
    fallback = (
        f"the trigger word '{trigger_word}' as their whole caption" if trigger_word
        else "an empty caption (trained unconditionally)"
    )
    if missing and len(missing) == len(items):
        warnings.append(
            f"no image has a caption (looked for same-name {cap_ext} files, metadata.jsonl and kohya folder names): "
            f"every image is trained with {fallback}"
        )
    empty_files = [it.caption_path for it in items if it.caption is None and it.caption_path is not None]
    if empty_files:
        shown = ", ".join(p.name for p in empty_files[:5]) + (" ..." if len(empty_files) > 5 else "")
        warnings.append(f"{len(empty_files)} caption file(s) are empty and count as missing ({shown})")
    return subsets, missing, fallback


def _check_folder(root: Path, key: str) -> None:
    if not root.exists():
        if root.is_symlink():
            raise DatasetError(f"{key} is a broken symbolic link: {root} -> {os.readlink(root)}")
        raise _missing_dir_error(root, key)
    if not root.is_dir():
        hint = ""
        if root.suffix.lower() in IMAGE_EXTENSIONS:
            hint = f"; did you mean its folder {root.parent}?"
        raise DatasetError(f"{key} is a file, not a folder: {root.absolute()}{hint}")


def _bucketed(found: list[ImageItem], bm: BucketManager,
              skipped: list[Skipped]) -> tuple[list[ImageItem], list[tuple[ImageItem, float]]]:
    """The items with their bucket (those no bucket fits go to `skipped`), and the ones enlarged over 2x."""
    items: list[ImageItem] = []
    upscaled: list[tuple[ImageItem, float]] = []
    for it in found:
        try:
            bucket = bm.assign(it.width, it.height)
        except BucketError as e:
            skipped.append(Skipped(it.path, str(e), "too_small"))
            continue
        scale = max(bucket[0] / it.width, bucket[1] / it.height)
        if scale > 2.0:
            upscaled.append((it, scale))
        items.append(replace(it, bucket=bucket))
    return items, upscaled


def balance_regularization(train_samples: int, reg_items: list[ImageItem]) -> list[ImageItem]:
    """kohya's DreamBoothDataset balance: one epoch holds as many regularization samples as training samples.

    In order, each regularization image joins with its folder repeats until the count reaches
    train_samples (the last one keeps all its repeats; the rest are left out). If a whole pass falls
    short, the images get one more repeat each, in order, until the count is reached. Returns the
    images used, with their repeats for the epoch.
    """
    repeats: list[int] = []
    total = 0
    for it in reg_items:
        if total >= train_samples:
            break
        repeats.append(it.repeats)
        total += it.repeats
    k = 0
    while total < train_samples:
        repeats[k % len(repeats)] += 1
        total += 1
        k += 1
    return [replace(it, repeats=r) for it, r in zip(reg_items, repeats)]


def _attach_masks(root: Path, items: list[ImageItem], validation: list[ImageItem], reg_items: list[ImageItem],
                  mask_root: Path | None, *, verify: bool):
    """Give every image its loss mask: its own alpha channel (alpha_mask), or the file at its relative path in
    conditioning_data_dir (training and validation images; regularization images then weigh 1 everywhere).
    A training image without a mask, or with a mask of another size, is an error naming the file."""
    warnings: list[str] = []
    if mask_root is None:
        def with_alpha(its: list[ImageItem]) -> list[ImageItem]:
            return [replace(it, mask_path=it.path, mask_channel="A") for it in its]

        items, validation, reg_items = with_alpha(items), with_alpha(validation), with_alpha(reg_items)
        full = [it.path for it in items + validation if not it.has_alpha]
        stat = MaskStat(source="alpha_mask", channel="A", with_mask=len(items) + len(validation), full_weight=full,
                        reg_with_mask=len(reg_items), reg_images=len(reg_items))
        if full and len(full) == len(items) + len(validation):
            warnings.append("alpha_mask: no training image has an alpha channel, so every mask is 1 everywhere and "
                            "the loss is not masked; save the images as PNG/WebP with transparency")
        return items, validation, reg_items, stat, warnings

    index = MaskIndex.scan(mask_root)
    missing: list[str] = []
    wrong_size: list[str] = []

    def with_file(its: list[ImageItem]) -> list[ImageItem]:
        out = []
        for it in its:
            mask = index.find(it.path, root)
            if mask is None:
                missing.append(f"{it.path} (its mask: {index.expected(it.path, root)}.png or another image type)")
                continue
            try:
                size = inspect_image(mask, verify=verify).size
            except ImageError as e:
                raise DatasetError(f"conditioning_data_dir: the mask {mask} of {it.path} cannot be used: {e.reason}") from None
            if size != (it.width, it.height):
                wrong_size.append(f"{mask} is {size[0]}x{size[1]}, its image {it.path.name} {it.width}x{it.height}")
            out.append(replace(it, mask_path=mask, mask_channel="R"))
        return out

    items, validation = with_file(items), with_file(validation)
    if missing:
        shown = "\n    ".join(missing[:10]) + ("\n    ..." if len(missing) > 10 else "")
        raise DatasetError(
            f"masked_loss: {len(missing)} training image(s) have no mask in conditioning_data_dir {mask_root} "
            f"(a mask is the image file at the image's same path relative to {root}, any image extension; "
            f"a file of the same name in another folder is another image's mask):"
            f"\n    {shown}\n  add a mask for each (white = full weight, black = none), or remove these images")
    if wrong_size:
        raise DatasetError("masked_loss: a mask must have its image's size (kohya requires it too):\n    "
                           + "\n    ".join(wrong_size[:10]) + "\n  resize the masks to their images' sizes")
    extra = index.unused()
    if extra:
        shown = ", ".join(p.name for p in extra[:5]) + (" ..." if len(extra) > 5 else "")
        warnings.append(f"conditioning_data_dir: {len(extra)} mask file(s) match no training image and are not used "
                        f"({shown})")
    stat = MaskStat(source=str(mask_root), channel="R", with_mask=len(items) + len(validation), full_weight=[],
                    reg_with_mask=0, reg_images=len(reg_items))
    return items, validation, reg_items, stat, warnings
