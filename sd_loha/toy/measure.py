"""Judge a picture of the toy world: which background color, object color and shape it shows.

A simple, explainable measurement (no learned classifier), so a test of the toy model says plainly what failed:

- background: the median color of the border ring, named by the nearest color of the grammar;
- object: the largest connected region of pixels that differ clearly from that median; their most common nearest
  grammar color (the background's color excluded);
- shape: how much of its bounding box the object fills (square 1.0, circle pi/4 = 0.79, upright triangle 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import world

BORDER = 3  # pixels of the ring that give the background (objects keep a margin of ~4 px at 64 px)
OBJECT_DISTANCE = 45.0  # RGB distance from the background median that counts as object (yellow-orange: 87)
MIN_OBJECT_FRACTION = 0.02  # fewer object pixels than this: no object
# Fill ratio boundaries between the shapes (ideal: triangle 0.5, circle 0.785, square 1.0), set in the gaps that
# the world's scenes leave after a round trip through toy-sd1's VAE, which softens corners: triangles <= 0.66,
# circles 0.75-0.82, squares >= 0.93 (200 scenes).
TRIANGLE_BELOW = 0.70
SQUARE_ABOVE = 0.875

_NAMES = list(world.COLORS)
_RGB = np.array([world.COLORS[n] for n in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Judgement:
    background: str
    color: str  # "none" when no object was found
    shape: str  # "none" when no object was found
    fill: float  # object pixels / bounding box pixels


def nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_RGB - np.asarray(rgb, np.float32)) ** 2).sum(-1)))]


def _border(img: np.ndarray) -> np.ndarray:
    ring = np.ones(img.shape[:2], bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    return img[ring]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of the mask (decoders leave specks and edge fringes that are not the object)."""
    labels = np.zeros(mask.shape, np.int32)
    h, w = mask.shape
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else mask


def _bbox_fill(mask: np.ndarray) -> float:
    """Fill ratio of the mask in its bounding box."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if len(rows) == 0:
        return 0.0
    return float(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].mean())


def shape_from_fill(fill: float) -> str:
    if fill < TRIANGLE_BELOW:
        return "triangle"
    return "square" if fill > SQUARE_ABOVE else "circle"


def judge(img: np.ndarray) -> Judgement:
    """Judge an HxWx3 uint8 picture (or a PIL image)."""
    img = np.asarray(img)[..., :3].astype(np.float32)
    bg_rgb = np.median(_border(img), axis=0)
    background = nearest_color(bg_rgb)
    mask = np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > OBJECT_DISTANCE
    mask = largest_component(mask)
    if mask.mean() < MIN_OBJECT_FRACTION:
        return Judgement(background, "none", "none", 0.0)
    dist = ((img[mask][:, None, :] - _RGB[None]) ** 2).sum(-1)
    dist[:, _NAMES.index(background)] = np.inf
    counts = np.bincount(dist.argmin(1), minlength=len(_NAMES))
    fill = _bbox_fill(mask)
    return Judgement(background, _NAMES[int(counts.argmax())], shape_from_fill(fill), fill)


@dataclass(frozen=True)
class Score:
    n: int
    background: float  # fraction right
    color: float
    shape: float
    all_three: float


def score(scenes: list[world.Scene], images: list[np.ndarray]) -> tuple[Score, list[Judgement]]:
    """Fractions of pictures whose background, object color, shape (and all three) match their scene."""
    judged = [judge(im) for im in images]
    bg = [j.background == s.background for s, j in zip(scenes, judged)]
    col = [j.color == s.color for s, j in zip(scenes, judged)]
    shp = [j.shape == s.shape for s, j in zip(scenes, judged)]
    allr = [a and b and c for a, b, c in zip(bg, col, shp)]
    n = len(scenes)
    return Score(n, sum(bg) / n, sum(col) / n, sum(shp) / n, sum(allr) / n), judged


def prompt_set(n: int = 24) -> list[world.Scene]:
    """A fixed spread over the grammar: every background and every object color n/8 times, shapes in turn."""
    colors = list(world.COLORS)
    scenes = []
    for i in range(n):
        background = colors[i % 8]
        color = colors[(i % 8 + 1 + (i // 8) * 3) % 8]
        if color == background:
            color = colors[(colors.index(color) + 1) % 8]
        scenes.append(world.Scene(color, world.SHAPES[i % 3], background))
    return scenes
