"""What a run leaves for people to look at: sample grids and a loss curve (PNG, drawn with Pillow)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from ..atomic import save_image_atomic


def image_grid(images: Sequence[Image.Image], labels: Sequence[str] | None = None, cols: int | None = None) -> Image.Image:
    cols = cols or min(len(images), 4)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    label_h = 14 if labels else 0
    grid = Image.new("RGB", (cols * w, rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + label_h)
        grid.paste(im.convert("RGB").resize((w, h)), (x, y + label_h))
        if labels:
            draw.text((x + 2, y + 1), labels[i][: max(4, w // 6)], fill="black")
    return grid


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curve(steps: Sequence[int], losses: Sequence[float], path: Path, *, val_steps: Sequence[int] = (),
               val_losses: Sequence[float] = (), size: tuple[int, int] = (640, 360)) -> Path:
    """Raw loss (light), moving average (dark) and validation loss (red dots) against the step."""
    w, h = size
    pad_l, pad_r, pad_t, pad_b = 56, 12, 24, 28
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    all_y = list(losses) + list(val_losses)
    if not all_y:
        d.text((pad_l, h // 2), "no steps recorded", fill="black")
        return save_image_atomic(img, path)
    lo, hi = min(all_y), max(all_y)
    hi = hi if hi > lo else lo + 1e-6
    x_max = max(list(steps) + list(val_steps) + [1])

    def xy(s: float, v: float) -> tuple[float, float]:
        return (pad_l + (w - pad_l - pad_r) * s / x_max, pad_t + (h - pad_t - pad_b) * (1 - (v - lo) / (hi - lo)))

    d.rectangle([pad_l, pad_t, w - pad_r, h - pad_b], outline="#888")
    for frac in (0, 0.5, 1):
        v = lo + frac * (hi - lo)
        _, y = xy(0, v)
        d.text((4, y - 6), f"{v:.4f}", fill="#444")
    d.text((pad_l, h - pad_b + 6), "0", fill="#444")
    d.text((w - pad_r - 40, h - pad_b + 6), f"step {x_max}", fill="#444")
    d.text((pad_l, 4), "training loss (grey: per step, blue: moving average, red: validation)", fill="black")
    if len(steps) > 1:
        d.line([xy(s, v) for s, v in zip(steps, losses)], fill="#c8c8c8", width=1)
        d.line([xy(s, v) for s, v in zip(steps, _smooth(list(losses), max(1, len(losses) // 20)))], fill="#1f4e9c", width=2)
    for s, v in zip(val_steps, val_losses):
        x, y = xy(s, v)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill="#c0392b")
    return save_image_atomic(img, path)
