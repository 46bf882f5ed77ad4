"""What a run leaves for people to look at: sample grids and a loss curve (PNG, drawn with Pillow)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from ..atomic import save_image_atomic, write_text_atomic


LABEL_H = 14  # one line of Pillow's default font
MIN_CELL = 128  # smaller pictures (the toy models' 64 px) are enlarged, pixel for pixel, so labels fit and details show


def column_grid(columns: Sequence[tuple[str, Sequence[Image.Image]]], row_labels: Sequence[str]) -> Image.Image:
    """A table of pictures: a header with each column's label, then per row its label above its pictures.

    Columns are e.g. the adapter strengths of one sample step, or the sample steps of a run; rows are the
    prompts. Pictures smaller than MIN_CELL are scaled up by a whole factor (nearest neighbour: no blur).
    """
    w, h = columns[0][1][0].size
    scale = max(1, -(-MIN_CELL // max(w, h)))
    cw, ch = w * scale, h * scale
    grid = Image.new("RGB", (cw * len(columns), LABEL_H + len(row_labels) * (LABEL_H + ch)), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(4, cw // 6)
    for c, (label, _) in enumerate(columns):
        draw.text((c * cw + 2, 1), label[:chars], fill="black")
    for r, row_label in enumerate(row_labels):
        y = LABEL_H + r * (LABEL_H + ch)
        draw.text((2, y + 1), row_label[: chars * len(columns)], fill="black")
        for c, (_, images) in enumerate(columns):
            im = images[r].convert("RGB").resize((cw, ch), Image.Resampling.NEAREST)
            grid.paste(im, (c * cw, y + LABEL_H))
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


def write_loss_log(folder: Path, last_step: int, losses: Sequence[float],
                   val_losses: Sequence[tuple[int, float]]) -> Path:
    """loss.csv and loss.png in `folder`, both written atomically; `losses` end at `last_step`. Returns the
    curve's path."""
    steps = list(range(last_step - len(losses) + 1, last_step + 1))
    write_text_atomic(folder / "loss.csv", "step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in zip(steps, losses)))
    return loss_curve(steps, losses, folder / "loss.png",
                      val_steps=[s for s, _ in val_losses], val_losses=[v for _, v in val_losses])
