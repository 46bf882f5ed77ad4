"""Atomic file writes: a crash, a kill or a full disk never leaves a half-written file under the final name.

Everything a run leaves behind (adapter files, states, sample grids, the loss curve and its CSV, latent cache
entries) goes through :func:`write_atomic`: the bytes go to a temp file in the same folder (`.<name>.<random>.tmp`,
which `sd_loha.train.state.clean_stale_temp` removes from an output folder after a kill), are fsynced, and the
temp file is renamed over the final path.
"""

from __future__ import annotations

import errno
import io
import os
import secrets
from pathlib import Path

from PIL import Image


def _create_temp(folder: Path, name: str) -> tuple[int, str]:
    """A new temp file beside `name`, created 0666 so the kernel applies the process umask itself.

    (mkstemp creates 0600, and reading the umask means setting it: two threads doing that at once, the training
    thread and a web UI worker, can leave the process umask at 0 and every later file world-writable.)
    """
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"could not create a temp file beside {folder / name}")


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file and a rename; the previous file stays whole on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        hint = " (disk is full: free space or choose another output folder)" if e.errno == errno.ENOSPC else ""
        raise OSError(e.errno, f"could not write {path}: {e.strerror}{hint}; the previous file (if any) is untouched") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, text.encode("utf-8"))


def save_image_atomic(image: Image.Image, path: str | os.PathLike, **pil_kwargs) -> Path:
    """Encode in memory (format from the suffix), then write atomically."""
    buf = io.BytesIO()
    image.save(buf, format=Image.registered_extensions().get(Path(path).suffix.lower(), "PNG"), **pil_kwargs)
    return write_atomic(path, buf.getvalue())
