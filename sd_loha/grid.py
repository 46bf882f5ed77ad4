"""Labelled comparison grids: rows of adapter files × prompts, columns of strengths × seeds, drawn through one
GenerationSession with the adapters in the bypass (a new strength then rewrites no weight: bench/RESULTS.md,
"Bypass"). The web UI's Generate tab and `sd-loha generate --strength-grid` both draw with :func:`draw_grid`."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .generate import AdapterSpec, GenerationSession

#: The strengths a style adapter is judged at, as a curve from the base model (0: the picture every other column is
#: compared against) to the adapter as trained (1).
STRENGTH_SWEEP: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

# Cells smaller than this (toy-sd1 draws 64 px) are enlarged in the grid by a whole factor, pixels kept sharp, so
# the pictures can be seen and their labels get a readable font and width; the cells saved alone keep their size.
MIN_GRID_CELL = 128


@dataclass(frozen=True)
class GridCell:
    """One picture of a grid, with its A1111 parameters text and a short caption (file, strength, seed)."""

    image: Image.Image
    parameters: str
    caption: str
    seed: int


@dataclass(frozen=True)
class Grid:
    image: Image.Image
    parameters: str  # the first cell's, plus a "Grid:" line naming the rows and columns
    cells: list[GridCell]  # row by row, left to right
    row_labels: list[str]  # as drawn on the left
    col_labels: list[str]  # as drawn on top


def prompt_lines(text: str) -> list[str]:
    """The rows a prompt box gives: one prompt per line, blank lines dropped; an empty box is one empty prompt."""
    return [line.strip() for line in text.splitlines() if line.strip()] or [""]


def draw_grid(session: GenerationSession, files: Sequence[str | Path], prompts: Sequence[str],
              strengths: Sequence[float], seeds: Sequence[int], *, negative_prompt: str = "", steps: int = 20,
              guidance_scale: float = 7.0, width: int | None = None, height: int | None = None,
              scheduler: str | None = None, on_cell: Callable[[GridCell], None] | None = None) -> Grid:
    """Rows: each file × each prompt; columns: each strength × each seed (-1: one random seed, the same in every
    cell). Strength 0 is the base model's own picture. `on_cell` sees each cell as soon as it is drawn (to save it),
    in the grid's order: row by row, left to right."""
    if not files:
        raise ValueError("no adapter file for the grid's rows")
    prompts = list(prompts) or [""]
    strengths = list(strengths) or [1.0]
    seeds = [random.randrange(2**31) if s == -1 else int(s) for s in (seeds or [-1])]
    rows: list[list[GridCell]] = []
    for path in files:
        for prompt in prompts:
            row = []
            for strength in strengths:
                spec = AdapterSpec(str(path), strength)
                session.set_adapters([spec], merge=False)  # in the bypass a new strength only sets a number
                for seed in seeds:
                    image, params = session.generate(prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                                                     guidance_scale=guidance_scale, width=width, height=height,
                                                     scheduler=scheduler)[0]
                    cell = GridCell(image, params, f"{spec.name} {strength:g} · seed {seed}"
                                    + (f" · {prompt}" if len(prompts) > 1 else ""), seed)
                    if on_cell is not None:
                        on_cell(cell)
                    row.append(cell)
            rows.append(row)
    names = [Path(p).stem for p in files]
    row_labels = [(f"{n}: {pr}" if len(files) > 1 else pr or "(empty prompt)") if len(prompts) > 1 else n
                  for n in names for pr in prompts]
    col_labels = [f"strength {s:g}" + (" = base" if s == 0 else "") + (f" seed {sd}" if len(seeds) > 1 else "")
                  for s in strengths for sd in seeds]
    if len(seeds) == 1:
        col_labels = [f"{c} (seed {seeds[0]})" for c in col_labels]
    text = (rows[0][0].parameters + "\nGrid: rows = " + ", ".join(Path(p).name for p in files)
            + ("; prompts = " + " | ".join(prompts) if len(prompts) > 1 else "")
            + "; strengths = " + ", ".join(f"{s:g}" for s in strengths) + "; seeds = " + ", ".join(map(str, seeds)))
    image = labelled_grid([[c.image for c in row] for row in rows], row_labels, col_labels)
    return Grid(image, text, [c for row in rows for c in row], row_labels, col_labels)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def labelled_grid(cells: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """One image: rows × columns of equally sized cells, row labels on the left, column labels on top."""
    w, h = cells[0][0].size
    zoom = max(1, math.ceil(MIN_GRID_CELL / min(w, h)))
    w, h = w * zoom, h * zoom
    fsize = max(10, min(16, w // 8))
    font = _font(fsize)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(t: str) -> int:
        return int(probe.textlength(t, font=font))

    left = min(max((text_w(t) for t in row_labels), default=0) + 12, 260)
    col_lines = [_wrap(t, w - 4, text_w) for t in col_labels]
    top = (max(len(lines) for lines in col_lines) * (fsize + 3)) + 8
    grid = Image.new("RGB", (left + w * len(col_labels), top + h * len(row_labels)), "white")
    d = ImageDraw.Draw(grid)
    for j, lines in enumerate(col_lines):
        for k, line in enumerate(lines):
            d.text((left + j * w + (w - text_w(line)) // 2, 4 + k * (fsize + 3)), line, fill="black", font=font)
    for i, label in enumerate(row_labels):
        lines = _wrap(label, left - 8, text_w)
        y0 = top + i * h + max(0, (h - len(lines) * (fsize + 3)) // 2)
        for k, line in enumerate(lines):
            d.text((4, y0 + k * (fsize + 3)), line, fill="black", font=font)
        for j, im in enumerate(cells[i]):
            grid.paste(im.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (left + j * w, top + i * h))
    return grid


def _wrap(text: str, width: int, text_w) -> list[str]:
    words, lines, cur = text.split(" "), [], ""
    for word in words:
        trial = f"{cur} {word}".strip()
        if cur and text_w(trial) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + ([cur] if cur else [])
