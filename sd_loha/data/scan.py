"""Find training images and their captions under a train_data_dir.

Layouts understood (they can be mixed):
- flat or nested folders of images with same-name caption files
  (`cat.png` + `cat.txt`, or `.caption`);
- kohya repeat folders `train_data_dir/10_sks dog/...`: 10 repeats, and
  "sks dog" is the caption of images in it that have no caption file;
- Hugging Face imagefolder `metadata.jsonl` ({"file_name": ..., "text"|"caption": ...}).

Caption precedence for one image: its caption file, then metadata.jsonl,
then the repeat folder's name. Nothing found = caption None (missing).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .captions import decode_caption_bytes
from .images import IMAGE_EXTENSIONS, ImageError, inspect_image

__all__ = [
    "CAPTION_EXTENSIONS",
    "ImageItem",
    "ScanResult",
    "Skipped",
    "parse_repeat_folder",
    "read_caption_file",
    "scan_dataset",
]

CAPTION_EXTENSIONS = (".txt", ".caption")
METADATA_FILE = "metadata.jsonl"
METADATA_CAPTION_KEYS = ("text", "caption")

# Image-like files we cannot train on, reported (not silently ignored) so a
# folder of iPhone .heic photos explains itself.
_UNSUPPORTED_IMAGE_HINTS = {
    ".heic": "HEIC photo (iPhone); convert to JPEG or PNG",
    ".heif": "HEIF photo; convert to JPEG or PNG",
    ".avif": "AVIF image, not readable by this Pillow build; convert to PNG or JPEG",
    ".jxl": "JPEG XL image; convert to PNG or JPEG",
    ".jfif": "JPEG saved with a .jfif name; rename it to .jpg",
    ".svg": "SVG vector drawing; export it as PNG",
    ".psd": "Photoshop file; export it as PNG",
    ".ico": "icon file; convert to PNG",
    ".tga": "TGA image; convert to PNG",
    ".dng": "camera raw file; export it as JPEG or PNG",
    ".cr2": "camera raw file; export it as JPEG or PNG",
    ".cr3": "camera raw file; export it as JPEG or PNG",
    ".nef": "camera raw file; export it as JPEG or PNG",
    ".arw": "camera raw file; export it as JPEG or PNG",
}
# Files that belong in a dataset folder and are not worth mentioning.
_COMPANION_EXTENSIONS = {".txt", ".caption", ".json", ".jsonl", ".npz", ".safetensors", ".toml", ".md", ".csv"}

_REPEAT_RE = re.compile(r"^(\d+)_(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Skipped:
    """A file left out, and why. Unpacks as (path, reason)."""

    path: Path
    reason: str
    kind: str = "unreadable"

    def __iter__(self):
        return iter((self.path, self.reason))


@dataclass(frozen=True)
class ImageItem:
    """One training image. width/height are upright (EXIF rotation applied)."""

    path: Path
    caption: str | None
    repeats: int
    subset_dir: Path
    width: int
    height: int
    caption_source: str | None = None  # "file" | "metadata" | "folder" | None
    caption_path: Path | None = None  # caption file found (even if it was empty)
    folder_caption: str | None = None  # from a "10_name" folder, if any
    file_size: int = 0
    mtime_ns: int = 0
    bucket: tuple[int, int] | None = None  # (w, h), set by the preflight
    notes: tuple[str, ...] = ()
    has_alpha: bool = False
    is_reg: bool = False  # a regularization (prior-preservation) image: its loss is weighted by prior_loss_weight
    mask_path: Path | None = None  # the file whose mask_channel weights this image's loss (masked_loss)
    mask_channel: str | None = None  # "A" (alpha_mask: the image's own alpha) or "R" (a conditioning_data_dir mask)

    @property
    def key(self) -> str:
        """Stable id of this image across runs (its absolute path, hashed)."""
        return hashlib.sha1(str(self.path.absolute()).encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass
class ScanResult:
    root: Path
    items: list[ImageItem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    caption_extension: str = ".txt"
    other_files: Counter = field(default_factory=Counter)  # extension -> count, files we ignored
    hidden_ignored: int = 0
    folders_scanned: int = 0


def parse_repeat_folder(name: str) -> tuple[int, str] | None:
    """kohya folder name "10_sks dog" -> (10, "sks dog"); None if not that form."""
    m = _REPEAT_RE.match(name)
    if not m:
        return None
    return int(m.group(1)), m.group(2).strip()


def read_caption_file(path: Path) -> tuple[str | None, list[str]]:
    """(caption or None when empty, warnings). Uses the first non-empty line,
    as kohya does; extra lines are reported, not silently merged."""
    warns: list[str] = []
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, [f"{path}: cannot read caption file ({e.strerror or e}); treated as missing"]
    text, warn = decode_caption_bytes(data)
    if warn:
        warns.append(f"{path}: {warn}")
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:
        return None, warns
    if len(lines) > 1:
        warns.append(f"__multiline__{path}")
    return lines[0], warns


def _normalise_ext(ext: str) -> str:
    ext = ext.strip()
    return ext if ext.startswith(".") else "." + ext


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


@dataclass
class _Dir:
    path: Path
    files: list[os.DirEntry]
    repeats: int
    folder_caption: str | None
    subset_dir: Path


def _walk(root: Path, result: ScanResult, recursive: bool) -> list[_Dir]:
    """Depth-first, name-sorted walk following folder symlinks but never into a
    folder already visited (symlink loops, links back to a parent)."""
    out: list[_Dir] = []
    visited: set[tuple[int, int]] = set()
    stack: list[tuple[Path, int, str | None, Path]] = [(root, 1, None, root)]
    while stack:
        d, repeats, fcap, subset = stack.pop()
        try:
            st = d.stat()
        except OSError as e:
            result.warnings.append(f"{d}: cannot open folder ({e.strerror or e}); skipped")
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in visited:
            result.warnings.append(f"{d}: links back to a folder already scanned (symlink loop); not followed")
            continue
        visited.add(ident)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            result.warnings.append(f"{d}: cannot list folder ({e.strerror or e}); skipped")
            continue
        result.folders_scanned += 1
        files: list[os.DirEntry] = []
        subdirs: list[Path] = []
        for e in entries:
            if _hidden(e.name):
                result.hidden_ignored += 1
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks; False for broken links and loops
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(Path(e.path))
            else:
                files.append(e)
        out.append(_Dir(d, files, repeats, fcap, subset))
        if not recursive:
            continue
        for sub in reversed(subdirs):  # reversed: the stack pops them in name order
            parsed = parse_repeat_folder(sub.name)
            if parsed is not None:
                stack.append((sub, parsed[0], parsed[1] or None, sub))
            else:
                stack.append((sub, repeats, fcap, subset))
    return out


def _read_metadata(d: Path, result: ScanResult) -> dict[str, str]:
    """metadata.jsonl -> {normalised image path: caption}."""
    path = d / METADATA_FILE
    out: dict[str, str] = {}
    try:
        data = path.read_bytes()
    except OSError as e:
        result.warnings.append(f"{path}: cannot read ({e.strerror or e}); ignored")
        return out
    text, warn = decode_caption_bytes(data)
    if warn:
        result.warnings.append(f"{path}: {warn}")
    bad: list[int] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(lineno)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            bad.append(lineno)
            continue
        caption = next((row[k] for k in METADATA_CAPTION_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
        if caption is None:
            continue
        caption = caption.replace("\r\n", "\n").replace("\r", "\n").strip()
        out[os.path.normpath(os.path.join(d, row["file_name"]))] = caption
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        result.warnings.append(
            f"{path}: {len(bad)} line(s) are not JSON objects with a \"file_name\" (lines {shown}); ignored"
        )
    return out


def scan_dataset(
    train_data_dir: str | os.PathLike[str],
    *,
    caption_extension: str = ".txt",
    recursive: bool = True,
    verify: bool = False,
    num_threads: int | None = None,
) -> ScanResult:
    """Find images, captions and repeats under train_data_dir.

    Reads image headers only (cheap) unless verify=True, which decodes every
    image to catch truncated/damaged files before training. The caller checks
    that train_data_dir exists (the preflight does, with a friendlier error).
    """
    root = Path(train_data_dir)
    cap_ext = _normalise_ext(caption_extension)
    other_cap_exts = [e for e in CAPTION_EXTENSIONS if e != cap_ext.lower()]
    result = ScanResult(root=root, caption_extension=cap_ext)

    own = parse_repeat_folder(root.name)
    if own is not None:
        result.warnings.append(
            f"train_data_dir's own name '{root.name}' looks like a kohya repeat folder, but repeats and folder "
            f"captions are read from its SUBfolders: these images get 1 repeat and no folder caption. "
            f"Point train_data_dir at the parent folder ({root.parent}) to use them."
        )

    dirs = _walk(root, result, recursive)

    metadata: dict[str, str] = {}
    for d in dirs:
        if any(e.name == METADATA_FILE for e in d.files):
            metadata.update(_read_metadata(d.path, result))

    # Collect candidate images with their caption, then probe headers in threads.
    candidates: list[tuple[Path, _Dir, str | None, str | None, Path | None]] = []
    multiline: list[Path] = []
    metadata_used: set[str] = set()
    for d in dirs:
        by_lower: dict[str, str] = {}
        for e in d.files:
            by_lower.setdefault(e.name.lower(), e.name)
        names = {e.name for e in d.files}
        for e in d.files:
            ext = os.path.splitext(e.name)[1].lower()
            if ext not in IMAGE_EXTENSIONS:
                if ext in _UNSUPPORTED_IMAGE_HINTS:
                    result.skipped.append(Skipped(Path(e.path), f"unsupported file type: {_UNSUPPORTED_IMAGE_HINTS[ext]}", "unsupported"))
                elif ext not in _COMPANION_EXTENSIONS and e.name != METADATA_FILE:
                    result.other_files[ext or "(no extension)"] += 1
                continue
            stem = os.path.splitext(e.name)[0]
            caption = source = None
            cap_path: Path | None = None
            for cext in [cap_ext, *other_cap_exts]:
                want = stem + cext
                found = want if want in names else by_lower.get(want.lower())
                if found is None:
                    continue
                cap_path = d.path / found
                caption, warns = read_caption_file(cap_path)
                for w in warns:
                    if w.startswith("__multiline__"):
                        multiline.append(cap_path)
                    else:
                        result.warnings.append(w)
                if caption is not None:
                    source = "file"
                    break
            if caption is None:
                key = os.path.normpath(e.path)
                if key in metadata:
                    caption, source = metadata[key], "metadata"
                    metadata_used.add(key)
            if caption is None and d.folder_caption:
                caption, source = d.folder_caption, "folder"
            candidates.append((Path(e.path), d, caption, source, cap_path))

    if multiline:
        shown = ", ".join(p.name for p in multiline[:5]) + (" ..." if len(multiline) > 5 else "")
        result.warnings.append(
            f"{len(multiline)} caption file(s) have more than one line; only the first line is used, as in kohya ({shown})"
        )
    unused_meta = [k for k in metadata if k not in metadata_used and not os.path.exists(k)]
    if unused_meta:
        shown = ", ".join(os.path.basename(k) for k in unused_meta[:5])
        result.warnings.append(f"{len(unused_meta)} metadata.jsonl entries name files that do not exist (e.g. {shown})")

    def probe(path: Path):
        try:
            info = inspect_image(path, verify=verify)
            st = os.stat(path)
            return info, st, None
        except ImageError as err:
            return None, None, err
        except OSError as err:  # raced with a deletion between listing and stat
            return None, None, ImageError(path, f"cannot read file ({err.strerror or err})", "unreadable")

    threads = num_threads or min(8, 2 * (os.cpu_count() or 1))
    if len(candidates) > 8 and threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            probed = list(pool.map(probe, [c[0] for c in candidates]))
    else:
        probed = [probe(c[0]) for c in candidates]

    animated: list[Path] = []
    for (path, d, caption, source, cap_path), (info, st, err) in zip(candidates, probed):
        if err is not None:
            result.skipped.append(Skipped(path, err.reason, err.kind))
            continue
        if d.repeats == 0:
            result.skipped.append(Skipped(path, f"its folder '{d.subset_dir.name}' sets 0 repeats", "zero_repeats"))
            continue
        if info.animated:
            animated.append(path)
        result.items.append(
            ImageItem(
                path=path,
                caption=caption,
                repeats=d.repeats,
                subset_dir=d.subset_dir,
                width=info.width,
                height=info.height,
                caption_source=source,
                caption_path=cap_path,
                folder_caption=d.folder_caption,
                file_size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                notes=info.notes,
                has_alpha=info.has_alpha,
            )
        )
    result.skipped.sort(key=lambda sk: str(sk.path))
    if animated:
        shown = ", ".join(p.name for p in animated[:5]) + (" ..." if len(animated) > 5 else "")
        result.warnings.append(f"{len(animated)} animated image(s): only the first frame is used ({shown})")
    big = sorted({(d.subset_dir, d.repeats) for d in dirs if d.repeats > 200}, key=lambda t: str(t[0]))
    for sub, reps in big:
        result.warnings.append(
            f"folder name '{sub.name}' is read as {reps} repeats (kohya 'N_name' convention); rename it if that is not intended"
        )
    return result
