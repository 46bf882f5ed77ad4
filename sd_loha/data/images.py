"""Robust image loading for training data.

Every way an image file can be bad in a real dataset folder ends in one
`ImageError(path, reason)` with a reason written for the user, never in a
Pillow traceback halfway through an epoch. The loader always returns an
upright RGB image: EXIF rotation applied, transparency composited on white,
16-bit and CMYK data converted to 8-bit RGB.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "ImageError",
    "ImageInfo",
    "LoadedImage",
    "inspect_image",
    "load_image",
    "load_image_with_info",
    "load_mask",
    "probe_image",
]

# Extensions we treat as training images (compared lower-case). AVIF only when
# this Pillow build can decode it, so a listed extension is always readable.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff") + (
    (".avif",) if features.check("avif") else ()
)

# Our own decompression-bomb limit: 4 × 8192² pixels (~268 MP, ~800 MB as RGB).
# Pillow's default (~89 MP warning, ~179 MP error) refuses some real
# high-resolution scans; anything above ours is refused before decoding.
MAX_IMAGE_PIXELS: int = 8192 * 8192 * 4

_WHITE = (255, 255, 255)
#: loss-mask channels load_mask reads: kohya's alpha_mask ("A") and conditioning_data_dir masks ("R")
MASK_CHANNELS: tuple[str, ...] = ("A", "R")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Image.MAX_IMAGE_PIXELS is a Pillow global; we swap it only around
# Image.open (where Pillow checks it) and under a lock so concurrent loads in
# threads (preflight verification) do not restore each other's values.
_PIL_LIMIT_LOCK = threading.Lock()

_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90°/270°


class ImageError(Exception):
    """An image file that cannot be used, with a reason in plain words.

    `kind` is a short machine-readable category (used to group skip reasons
    in the preflight report): empty, not_found, broken_link, link_loop,
    not_a_file, permission, not_an_image, unsupported, too_large, truncated,
    decode_error, too_small.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, kind: str = "unreadable") -> None:
        self.path = Path(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason, kind) across DataLoader worker pickling
        return (type(self), (self.path, self.reason, self.kind))


@dataclass(frozen=True)
class ImageInfo:
    """Header facts about an image; width/height are upright (after EXIF rotation)."""

    width: int
    height: int
    format: str
    mode: str
    animated: bool = False
    notes: tuple[str, ...] = ()
    has_alpha: bool = False  # an alpha channel or a transparent colour (alpha_mask reads it)

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)


@dataclass
class LoadedImage:
    """A decoded RGB image plus what the caller needs to know about it.

    `original_size` is the upright (width, height) of the file before any
    load-time downscaling; SDXL micro-conditioning wants this, not the
    (possibly reduced) size of `image`.
    """

    image: Image.Image
    original_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- path checks


def _check_path(path: Path) -> os.stat_result:
    """Stat the file, turning every filesystem failure into a clear ImageError."""
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        raise ImageError(path, "file not found (deleted or moved?)", "not_found") from None
    except PermissionError:
        raise ImageError(path, "no permission to access this file", "permission") from None
    except OSError as e:
        raise ImageError(path, f"cannot access file ({e.strerror or e})", "unreadable") from None
    st = lst
    if stat.S_ISLNK(lst.st_mode):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise ImageError(path, f"broken symbolic link (points to {target!r}, which does not exist)", "broken_link") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ImageError(path, "symbolic link loop (the link points back to itself)", "link_loop") from None
            raise ImageError(path, f"cannot follow symbolic link ({e.strerror or e})", "broken_link") from None
    # Opening a FIFO or device would block or read forever; refuse up front.
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(path, "is a folder, not an image file", "not_a_file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(path, "not a regular file (device, pipe or socket)", "not_a_file")
    if st.st_size == 0:
        raise ImageError(path, "file is empty (0 bytes)", "empty")
    return st


def _sniff_non_image(head: bytes) -> tuple[str, str]:
    """Say what a file Pillow could not identify most likely is (reason, kind)."""
    low = head[:512].lstrip().lower()
    if low.startswith((b"<!doctype html", b"<html")) or b"<html" in low[:256]:
        return "an HTML page, not an image (a failed download saved with an image name?)", "not_an_image"
    if low.startswith(b"<?xml") and b"<svg" in low or low.startswith(b"<svg"):
        return "an SVG vector drawing; convert it to PNG first", "unsupported"
    if head.startswith(b"%PDF"):
        return "a PDF document, not an image", "not_an_image"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftyphevc"):
        return "a HEIC/HEIF photo, which Pillow cannot read; convert it to JPEG or PNG", "unsupported"
    if head[4:12] in (b"ftypavif", b"ftypavis"):
        return "an AVIF image, which this Pillow build cannot read; convert it to PNG or JPEG", "unsupported"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")):
        return "a JPEG XL image, which Pillow cannot read; convert it to PNG or JPEG", "unsupported"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8"):
        return "damaged image: the header is unreadable", "decode_error"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "a text file, not an image", "not_an_image"
        except UnicodeDecodeError:
            pass
    return "not an image format Pillow can read", "not_an_image"


def _open(path: Path) -> tuple[Image.Image, io.BufferedReader]:
    """Open the header with our own bomb limit. Caller closes the returned file."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - kept open for lazy decoding, closed by caller
    except PermissionError:
        raise ImageError(path, "no permission to read this file", "permission") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(path, "symbolic link loop (the link points back to itself)", "link_loop") from None
        raise ImageError(path, f"cannot open file ({e.strerror or e})", "unreadable") from None
    try:
        with _PIL_LIMIT_LOCK:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            try:
                with warnings.catch_warnings():
                    # Between our limit and 2× it Pillow only warns; we refuse below.
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    im = Image.open(fh)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except Image.DecompressionBombError:
        fh.close()
        raise ImageError(
            path,
            f"image declares more than {2 * MAX_IMAGE_PIXELS:,} pixels (limit {MAX_IMAGE_PIXELS:,}); "
            "refused as a possible decompression bomb",
            "too_large",
        ) from None
    except UnidentifiedImageError:
        fh.seek(0)
        head = fh.read(512)
        fh.close()
        reason, kind = _sniff_non_image(head)
        raise ImageError(path, reason, kind) from None
    except PermissionError:
        fh.close()
        raise ImageError(path, "no permission to read this file", "permission") from None
    except Exception as e:  # damaged headers raise SyntaxError, struct.error, ValueError, EOFError...
        fh.close()
        raise ImageError(path, f"damaged image header ({type(e).__name__}: {e})", "decode_error") from None

    w, h = im.size
    if w <= 0 or h <= 0:
        fh.close()
        raise ImageError(path, f"image declares an empty size {w}×{h}", "decode_error")
    if w * h > MAX_IMAGE_PIXELS:
        fh.close()
        raise ImageError(
            path,
            f"image is too large ({w}×{h} = {w * h:,} pixels, limit {MAX_IMAGE_PIXELS:,}); "
            "refused as a possible decompression bomb — downscale it first",
            "too_large",
        )
    return im, fh


def _orientation(im: Image.Image) -> int:
    """EXIF orientation from the header only.

    For PNG, Pillow's getexif() decodes the whole image when the eXIf chunk is
    not before the pixel data, so we only trust what the header parse found.
    """
    try:
        if im.format == "PNG" and "exif" not in im.info:
            return 1
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # a garbled EXIF block must not make the image unusable
        return 1


def _is_animated(im: Image.Image) -> bool:
    try:
        return bool(getattr(im, "is_animated", False))
    except Exception:
        return False


# --------------------------------------------------------------------------- public API


def inspect_image(path: str | os.PathLike[str], *, verify: bool = False) -> ImageInfo:
    """Header facts (cheap); with verify=True also decode the pixels to catch damaged files.

    Verification decodes JPEGs at 1/8 scale (still reads every byte, so
    truncation is caught) to keep a preflight over hundreds of photos fast.
    """
    p = Path(path)
    _check_path(p)
    im, fh = _open(p)
    try:
        w, h = im.size
        orient = _orientation(im)
        if orient in _SWAPS_AXES:
            w, h = h, w
        animated = _is_animated(im)
        notes: list[str] = []
        if animated:
            notes.append("animated image: only the first frame is used")
        has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
        info = ImageInfo(width=w, height=h, format=str(im.format or "?"), mode=im.mode, animated=animated,
                         notes=tuple(notes), has_alpha=has_alpha)
    finally:
        fh.close()
    if verify:
        load_image_with_info(p, needed_size=(1, 1))
    return info


def probe_image(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Upright (width, height) from the header only; raises ImageError if unusable."""
    return inspect_image(path).size


def load_image(path: str | os.PathLike[str], *, needed_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode to an upright RGB image. See `load_image_with_info`."""
    return load_image_with_info(path, needed_size=needed_size).image


def load_image_with_info(path: str | os.PathLike[str], *, needed_size: tuple[int, int] | None = None) -> LoadedImage:
    """Decode to an upright RGB image, or raise ImageError.

    needed_size: the (width, height) the caller will cover-resize and crop to
    (its bucket). Huge images are shrunk while decoding (JPEG DCT scaling, then
    integer box reduction) but never below what is needed to cover that size,
    so a 50 MP photo costs a fraction of the memory and time.
    """
    p = Path(path)
    im, original, notes = _decode_upright(p, needed_size)
    try:
        rgb = _to_rgb(im)
    except Exception as e:
        raise ImageError(p, f"cannot convert image to RGB (colour mode {im.mode}: {e})", "unsupported") from None
    return LoadedImage(image=_reduce_for(rgb, needed_size), original_size=original, notes=notes)


def load_mask(path: str | os.PathLike[str], channel: str, *, needed_size: tuple[int, int] | None = None) -> LoadedImage:
    """One channel of an image as an upright 8-bit "L" image: the loss mask of masked_loss.

    channel "A": the alpha channel (255 where the image has no transparency: full weight), as kohya's
    alpha_mask reads it; "R": the red channel of the file converted to RGB without compositing (a greyscale
    mask's grey value), as kohya reads a conditioning_data_dir mask. The shape is decoded like
    :func:`load_image_with_info`, so the same crop plan puts the mask on the image's pixels.
    """
    if channel not in MASK_CHANNELS:
        raise ValueError(f"mask channel must be one of {MASK_CHANNELS}, got {channel!r}")
    p = Path(path)
    im, original, notes = _decode_upright(p, needed_size)
    try:
        if channel == "A":
            band = im.convert("RGBA").getchannel("A")
        else:
            wide = im.mode.startswith("I;16") or im.mode in ("I", "F")
            band = (_scale_to_8bit(im) if wide else im.convert("RGB")).getchannel("R")
    except Exception as e:
        raise ImageError(p, f"cannot read the mask's {channel} channel (colour mode {im.mode}: {e})", "unsupported") from None
    return LoadedImage(image=_reduce_for(band, needed_size), original_size=original, notes=notes)


def _decode_upright(p: Path, needed_size: tuple[int, int] | None) -> tuple[Image.Image, tuple[int, int], list[str]]:
    """Decode the first frame, EXIF rotation applied; JPEGs shrunk while decoding when needed_size allows."""
    _check_path(p)
    im, fh = _open(p)
    notes: list[str] = []
    try:
        stored_w, stored_h = im.size
        orient = _orientation(im)
        swap = orient in _SWAPS_AXES
        original = (stored_h, stored_w) if swap else (stored_w, stored_h)
        if _is_animated(im):
            notes.append("animated image: only the first frame is used")
            im.seek(0)

        if needed_size is not None and im.format == "JPEG":
            # draft() works in stored (pre-rotation) coordinates.
            nw, nh = (needed_size[1], needed_size[0]) if swap else needed_size
            f = min(stored_w / max(1, nw), stored_h / max(1, nh))
            if f >= 2:
                try:
                    im.draft(im.mode if im.mode in ("RGB", "L", "CMYK") else "RGB", (math.ceil(stored_w / f), math.ceil(stored_h / f)))
                except Exception:
                    pass  # draft is only an optimisation

        try:
            im.load()
        except MemoryError:
            raise ImageError(p, "not enough memory to decode this image", "too_large") from None
        except Exception as e:
            msg = str(e)
            if isinstance(e, EOFError) or "truncated" in msg.lower() or "premature end" in msg.lower():
                raise ImageError(p, "file is truncated (incomplete download or copy?)", "truncated") from None
            if isinstance(e, PermissionError):
                raise ImageError(p, "no permission to read this file", "permission") from None
            raise ImageError(p, f"image data is damaged ({msg or type(e).__name__})", "decode_error") from None

        if orient != 1:
            try:
                im = ImageOps.exif_transpose(im)
            except Exception as e:
                raise ImageError(p, f"cannot apply the EXIF rotation (colour mode {im.mode}: {e})", "unsupported") from None
    finally:
        fh.close()
    return im, original, notes


def _reduce_for(im: Image.Image, needed_size: tuple[int, int] | None) -> Image.Image:
    """Integer box reduction that still covers needed_size (the crop plan resizes the rest of the way)."""
    if needed_size is None:
        return im
    nw, nh = max(1, needed_size[0]), max(1, needed_size[1])
    factor = int(min(im.width / nw, im.height / nh))
    return im.reduce(factor) if factor >= 2 else im


# --------------------------------------------------------------------------- colour conversion


def _composite_on_white(im: Image.Image) -> Image.Image:
    """Transparent pixels become white (what the image looks like in a viewer),
    not the black or garbage colour stored under alpha=0."""
    rgba = im.convert("RGBA")
    bg = Image.new("RGB", rgba.size, _WHITE)
    bg.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return bg


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit/32-bit greyscale to 8-bit. Pillow's convert('RGB') clips instead of
    scaling, turning most 16-bit images white."""
    arr = np.asarray(im)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64)
        arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
    elif im.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        arr = arr.astype(np.float64) / 257.0  # 65535 -> 255
    arr = np.nan_to_num(arr, nan=0.0)
    out = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(out).convert("RGB")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """Use the embedded ICC profile when there is one; the naive formula makes
    print-prepared CMYK files noticeably off-colour."""
    icc = im.info.get("icc_profile")
    if icc and features.check("littlecms2"):
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except Exception:
            pass
    return im.convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _ALPHA_MODES:
        return _composite_on_white(im)
    if mode in ("P", "L", "RGB", "1") and "transparency" in im.info:
        return _composite_on_white(im)
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _scale_to_8bit(im)
    # YCbCr, LAB, HSV, RGBX, ...: Pillow converts these; failures are reported
    # by the caller as "cannot convert image to RGB".
    return im.convert("RGB")
