"""Atomic file writes: a crash, a kill or a full disk never leaves a half-written file under the final name.

Everything a run leaves behind (adapter files, states, sample grids, the loss curve and its CSV, latent cache
entries) goes through :func:`write_atomic`: the bytes go to a temp file in the same folder (`.<name>.<random>.tmp`,
which `sd_loha.train.state.clean_stale_temp` removes from an output folder after a kill), are fsynced, and the
temp file is renamed over the final path. A folder (a diffusers pipeline, PEFT adapters) is written the same way
by :func:`write_folder_atomic`: into a temp folder beside it, then swapped in whole, the old one put back if the
swap fails.
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from typing import TypeVar

from PIL import Image

T = TypeVar("T")


def _create_beside(folder: Path, name: str, create: Callable[[Path], T], suffix: str = "tmp") -> tuple[T, Path]:
    """`create(path)` on a new hidden path `.<name>.<random>.<suffix>` in `folder`, retried while the name is taken."""
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(4)}.{suffix}"
        try:
            return create(tmp), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"could not create a temp path beside {folder / name}")


def _create_temp(folder: Path, name: str) -> tuple[int, str]:
    """A new temp file beside `name`, created 0666 so the kernel applies the process umask itself.

    (mkstemp creates 0600, and reading the umask means setting it: two threads doing that at once, the training
    thread and a web UI worker, can leave the process umask at 0 and every later file world-writable.)
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd, tmp = _create_beside(folder, name, lambda p: os.open(p, flags, 0o666))
    return fd, str(tmp)


@contextmanager
def replace_file_atomic(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path beside `path` for the caller to write (by any writer, e.g. safetensors'
    save_file, so nothing needs the whole file in memory); when the block ends without an error the file is
    fsynced and renamed over `path`. On an error the temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = _create_temp(path.parent, path.name)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        hint = " (disk is full: free space or choose another output folder)" if e.errno == errno.ENOSPC else ""
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e}{hint}; the previous file (if any) is "
                               "untouched") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file and a rename; the previous file stays whole on failure."""
    with replace_file_atomic(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, text.encode("utf-8"))


def save_image_atomic(image: Image.Image, path: str | os.PathLike, **pil_kwargs) -> Path:
    """Encode in memory (format from the suffix), then write atomically."""
    buf = io.BytesIO()
    image.save(buf, format=Image.registered_extensions().get(Path(path).suffix.lower(), "PNG"), **pil_kwargs)
    return write_atomic(path, buf.getvalue())


def remove_atomic(path: str | os.PathLike) -> None:
    """Delete a file, or a folder by first renaming it to a hidden temp name beside it: a kill in the middle of
    the rmtree leaves a `.<name>.<random>.tmp` leftover (which state.clean_stale_temp removes), never a
    half-deleted folder under its real name."""
    path = Path(path)
    if not path.is_dir():
        path.unlink(missing_ok=True)
        return
    _, doomed = _create_beside(path.parent, path.name, lambda p: os.mkdir(p, 0o700))
    os.replace(path, doomed)  # onto the empty temp folder: an atomic rename on POSIX
    shutil.rmtree(doomed, ignore_errors=True)


def _swap_folder(new: Path, path: Path) -> None:
    """Put the folder `new` at `path`; an existing `path` is renamed aside first and put back if the second
    rename fails, so `path` is always either the old folder or the new one."""
    if not path.exists() and not path.is_symlink():
        os.replace(new, path)
        return
    old = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")  # unique: never another run's leftover
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def write_folder_atomic(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path` to write into; when the block ends without an error it replaces
    `path` (a folder, or nothing) as a whole: no mix of old and new files. On an error the temp folder is
    removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0777 so the kernel applies the umask (mkdtemp makes 0700; other tools, A1111 as another user, must read it)
    _, tmp = _create_beside(path.parent, path.name, lambda p: os.mkdir(p, 0o777))
    try:
        yield tmp
        _swap_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
