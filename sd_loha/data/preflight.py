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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .buckets import BucketError, BucketManager, Size
from .images import IMAGE_EXTENSIONS
from .scan import CAPTION_EXTENSIONS, ImageItem, Skipped, scan_dataset

__all__ = ["BucketStat", "DatasetError", "PreflightReport", "SubsetStat", "run_preflight"]

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

    @property
    def num_samples(self) -> int:
        return sum(b.samples for b in self.buckets)

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
        }


# ---------------------------------------------------------------------- errors


def _missing_dir_error(path: Path) -> DatasetError:
    msg = f"train_data_dir not found: {path.absolute()}"
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
) -> PreflightReport:
    """Scan, verify and bucket the dataset; raise DatasetError when it cannot be used.

    verify=True decodes every image (JPEGs at 1/8 scale) so damaged files are
    reported now, not mid-training; set False for very large datasets.
    Settings errors (bad bucket sizes...) raise ValueError.
    """
    # Absolute paths: items stay valid if the trainer or a worker changes cwd.
    root = Path(train_data_dir).expanduser().absolute()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not root.exists():
        if root.is_symlink():
            raise DatasetError(f"train_data_dir is a broken symbolic link: {root} -> {os.readlink(root)}")
        raise _missing_dir_error(root)
    if not root.is_dir():
        hint = ""
        if root.suffix.lower() in IMAGE_EXTENSIONS:
            hint = f"; did you mean its folder {root.parent}?"
        raise DatasetError(f"train_data_dir is a file, not a folder: {root.absolute()}{hint}")

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

    items: list[ImageItem] = []
    upscaled: list[tuple[ImageItem, float]] = []
    for it in scan.items:
        try:
            bucket = bm.assign(it.width, it.height)
        except BucketError as e:
            skipped.append(Skipped(it.path, str(e), "too_small"))
            continue
        scale = max(bucket[0] / it.width, bucket[1] / it.height)
        if scale > 2.0:
            upscaled.append((it, scale))
        items.append(replace(it, bucket=bucket))
    skipped.sort(key=lambda s: str(s.path))
    images_found = len(scan.items) + len(scan.skipped)

    if not items:
        raise _nothing_usable_error(root, scan, cap_ext, skipped)

    # Validation split: by image (before repeats), deterministic in the seed.
    validation: list[ImageItem] = []
    if validation_split > 0:
        n_val = min(len(items) - 1, max(1, round(len(items) * validation_split)))
        if n_val < 1:
            warnings.append("validation_split ignored: a single image cannot be split into training and validation")
        else:
            chosen = set(random.Random(f"{seed}:validation").sample(range(len(items)), n_val))
            validation = [it for i, it in enumerate(items) if i in chosen]
            items = [it for i, it in enumerate(items) if i not in chosen]

    # Buckets (training items, repeats counted).
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
    total_batches = sum(b.batches for b in buckets)
    steps_per_epoch = math.ceil(total_batches / num_processes)

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

    # Subsets and captions.
    by_subset: dict[Path, list[ImageItem]] = defaultdict(list)
    for it in items + validation:
        by_subset[it.subset_dir].append(it)
    subsets = [
        SubsetStat(folder=sub, repeats=its[0].repeats, images=len(its), folder_caption=its[0].folder_caption,
                   missing_captions=sum(1 for i in its if i.caption is None))
        for sub, its in sorted(by_subset.items(), key=lambda kv: str(kv[0]))
    ]
    sources: Counter = Counter(it.caption_source or "missing" for it in items + validation)
    missing = [it.path for it in items + validation if it.caption is None]
    fallback = (
        f"the trigger word '{trigger_word}' as their whole caption" if trigger_word
        else "an empty caption (trained unconditionally)"
    )
    if missing and len(missing) == len(items) + len(validation):
        warnings.append(
            f"no image has a caption (looked for same-name {cap_ext} files, metadata.jsonl and kohya folder names): "
            f"every image is trained with {fallback}"
        )
    empty_files = [it.caption_path for it in items + validation if it.caption is None and it.caption_path is not None]
    if empty_files:
        shown = ", ".join(p.name for p in empty_files[:5]) + (" ..." if len(empty_files) > 5 else "")
        warnings.append(f"{len(empty_files)} caption file(s) are empty and count as missing ({shown})")

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
    }
    return PreflightReport(
        train_data_dir=root,
        settings=settings,
        images_found=images_found,
        items=items,
        validation_items=validation,
        skipped=skipped,
        warnings=warnings,
        buckets=buckets,
        subsets=subsets,
        caption_sources=dict(sources),
        missing_captions=missing,
        missing_caption_fallback=fallback,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        bucket_manager=bm,
    )
