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
import tempfile
from pathlib import Path

from PIL import Image


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file and a rename; the previous file stays whole on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; other tools (A1111 as another user) must read it
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
