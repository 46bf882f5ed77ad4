"""The procedural world the toy base model `toy-sd1` is pretrained on (deterministic for a seed; no downloads).

Two generators:

- `scene(rng)`: a captioned 64x64 picture, "a {color} {shape} on a {background} background", with a random
  size and position (not in the caption), so the UNet and text encoder learn colors and shapes from words.
- `vae_image(rng)`: a broad mix of picture kinds (scenes, outlines, stripes, checkers, textures, palettes, frames,
  gradients, noise) so the VAE learns to reconstruct the styles users train, not only flat scenes.

Pictures are drawn at SS times the size and downscaled, so edges are anti-aliased like real images.
`HELDOUT_KINDS` are kinds the VAE never sees in training; its PSNR is measured on them (and on the bundled posters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
SS = 4  # supersampling factor

# The grammar's colors (objects and backgrounds draw from the same table).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 165, 60),
    "blue": (35, 70, 220),
    "yellow": (245, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 135, 20),
    "purple": (135, 45, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOR_JITTER = 12  # per channel, so the model learns a color word as a region of colors, not one exact value


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every caption of the grammar (object color differs from the background): 8 * 7 * 3 = 168."""
    return [Scene(c, s, b) for b in COLORS for c in COLORS if c != b for s in SHAPES]


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = COLOR_JITTER) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)  # type: ignore[return-value]


def _canvas(fill: tuple[int, int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (SIZE * SS, SIZE * SS), fill)
    return img, ImageDraw.Draw(img)


def _finish(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.uint8)


def _shape_box(rng: np.random.Generator) -> tuple[float, float, float]:
    """Center x, center y and half size (in supersampled pixels) of an object that stays inside the picture."""
    half = rng.uniform(0.22, 0.36) * SIZE * SS
    margin = half + 0.06 * SIZE * SS
    cx = rng.uniform(margin, SIZE * SS - margin)
    cy = rng.uniform(margin, SIZE * SS - margin)
    return cx, cy, half


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float,
               fill: tuple[int, int, int] | None, outline: tuple[int, int, int] | None = None, width: int = 0) -> None:
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif shape == "triangle":  # upright, apex at the top: fills half its bounding box
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill, outline=outline,
                     width=width)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def render_scene(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    img, draw = _canvas(_jitter(rng, COLORS[scene.background]))
    draw_shape(draw, scene.shape, *_shape_box(rng), fill=_jitter(rng, COLORS[scene.color]))
    return _finish(img)


def scene(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A random captioned picture of the grammar: (HxWx3 uint8, caption)."""
    scenes = all_scenes()
    s = scenes[int(rng.integers(len(scenes)))]
    return render_scene(s, rng), s.caption


# ---------------------------------------------------------------------------------------------
# The VAE's mix
# ---------------------------------------------------------------------------------------------

def _random_rgb(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.5:
        return _jitter(rng, list(COLORS.values())[int(rng.integers(len(COLORS)))], 40)
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _kind_scene(rng: np.random.Generator) -> np.ndarray:
    return scene(rng)[0]


def _kind_multi_shapes(rng: np.random.Generator) -> np.ndarray:
    img, draw = _canvas(_random_rgb(rng))
    for _ in range(int(rng.integers(2, 6))):
        cx, cy, half = _shape_box(rng)
        draw_shape(draw, SHAPES[int(rng.integers(3))], cx, cy, half * rng.uniform(0.3, 0.9), fill=_random_rgb(rng))
    return _finish(img)


def _kind_outlines(rng: np.random.Generator) -> np.ndarray:
    """Outlined shapes (filled or hollow), like the bold-outline styles users train."""
    img, draw = _canvas(_random_rgb(rng))
    ink = (20, 20, 20) if rng.random() < 0.7 else _random_rgb(rng)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, half = _shape_box(rng)
        fill = _random_rgb(rng) if rng.random() < 0.6 else None
        draw_shape(draw, SHAPES[int(rng.integers(3))], cx, cy, half * rng.uniform(0.4, 1.0), fill=fill, outline=ink,
                   width=int(rng.integers(1, 4)) * SS)
    return _finish(img)


def _kind_stripes(rng: np.random.Generator) -> np.ndarray:
    n = SIZE * SS
    period = rng.uniform(4, 24) * SS
    angle = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    phase = (x * np.cos(angle) + y * np.sin(angle)) / period
    colors = np.array([_random_rgb(rng) for _ in range(int(rng.integers(2, 4)))], dtype=np.uint8)
    idx = (np.floor(phase) % len(colors)).astype(int)
    return _finish(Image.fromarray(colors[idx]))


def _kind_checker(rng: np.random.Generator) -> np.ndarray:
    n = SIZE * SS
    cell = int(rng.integers(4, 17)) * SS
    y, x = np.mgrid[0:n, 0:n]
    a, b = np.array(_random_rgb(rng), np.uint8), np.array(_random_rgb(rng), np.uint8)
    mask = ((x // cell + y // cell) % 2).astype(bool)[..., None]
    return _finish(Image.fromarray(np.where(mask, a, b)))


def _kind_gradient(rng: np.random.Generator) -> np.ndarray:
    t = np.linspace(0, 1, SIZE, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.meshgrid(t, t, indexing="ij")
    w = np.clip((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle) + 0.5, 0, 1)[..., None]
    a, b = np.array(_random_rgb(rng), np.float32), np.array(_random_rgb(rng), np.float32)
    return (a * (1 - w) + b * w).astype(np.uint8)


def _kind_noise(rng: np.random.Generator) -> np.ndarray:
    """Smooth value noise at a random scale, colorized: texture-like."""
    cells = int(rng.integers(2, 17))
    small = rng.random((cells, cells, 3)).astype(np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    arr = np.asarray(img, np.float32)
    if rng.random() < 0.5:  # fine grain on top
        arr = arr + rng.normal(0, rng.uniform(3, 25), arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _kind_palette(rng: np.random.Generator) -> np.ndarray:
    """Flat color blocks from a small palette (posterized look)."""
    palette = np.array([_random_rgb(rng) for _ in range(int(rng.integers(2, 6)))], dtype=np.uint8)
    cells = int(rng.integers(2, 9))
    idx = rng.integers(0, len(palette), (cells, cells))
    img = Image.fromarray(palette[idx]).resize((SIZE, SIZE), Image.Resampling.NEAREST)
    return np.asarray(img)


def _kind_frame(rng: np.random.Generator) -> np.ndarray:
    """A scene or texture inside a thick frame."""
    inner = KINDS[int(rng.integers(0, 4))][1](rng)
    img = Image.fromarray(inner)
    draw = ImageDraw.Draw(img)
    width = int(rng.integers(2, 9))
    color = (20, 20, 20) if rng.random() < 0.6 else _random_rgb(rng)
    draw.rectangle((0, 0, SIZE - 1, SIZE - 1), outline=color, width=width)
    return np.asarray(img)


def _kind_dots(rng: np.random.Generator) -> np.ndarray:
    img, draw = _canvas(_random_rgb(rng))
    spacing = rng.uniform(6, 16) * SS
    radius = spacing * rng.uniform(0.15, 0.4)
    ink = _random_rgb(rng)
    offset = rng.uniform(0, spacing)
    for y in np.arange(-spacing + offset, SIZE * SS + spacing, spacing):
        for x in np.arange(-spacing + offset, SIZE * SS + spacing, spacing):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=ink)
    return _finish(img)


def _kind_lines(rng: np.random.Generator) -> np.ndarray:
    """Random strokes, like sketches and line art."""
    img, draw = _canvas(_random_rgb(rng) if rng.random() < 0.5 else (240, 236, 225))
    ink = (20, 20, 20) if rng.random() < 0.6 else _random_rgb(rng)
    for _ in range(int(rng.integers(3, 12))):
        pts = [tuple(rng.uniform(0, SIZE * SS, 2)) for _ in range(int(rng.integers(2, 5)))]
        draw.line(pts, fill=ink, width=int(rng.integers(1, 4)) * SS)
    return _finish(img)


# Held out from the VAE's training: its PSNR is measured on these (and on the bundled posters).

def _kind_rings(rng: np.random.Generator) -> np.ndarray:
    n = SIZE
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    cx, cy = rng.uniform(0, n, 2)
    r = np.hypot(x - cx, y - cy) / rng.uniform(3, 8)
    colors = np.array([_random_rgb(rng) for _ in range(3)], np.float32)
    w = (np.sin(r * np.pi) * 0.5 + 0.5)[..., None]
    return (colors[0] * w + colors[1] * (1 - w)).astype(np.uint8)


def _kind_blobs(rng: np.random.Generator) -> np.ndarray:
    img, draw = _canvas(_random_rgb(rng))
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0, SIZE * SS, 2)
        rx, ry = rng.uniform(4, 20, 2) * SS
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_random_rgb(rng))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(2, 10) * SS))
    return _finish(img)


def _kind_plaid(rng: np.random.Generator) -> np.ndarray:
    a = _kind_stripes(rng).astype(np.float32)
    b = np.transpose(_kind_stripes(rng), (1, 0, 2)).astype(np.float32)
    return ((a + b) / 2).astype(np.uint8)


Kind = tuple[str, Callable[[np.random.Generator], np.ndarray]]
# The first four are the "inner" kinds a frame may hold.
KINDS: tuple[Kind, ...] = (
    ("scene", _kind_scene),
    ("multi_shapes", _kind_multi_shapes),
    ("noise", _kind_noise),
    ("gradient", _kind_gradient),
    ("outlines", _kind_outlines),
    ("stripes", _kind_stripes),
    ("checker", _kind_checker),
    ("palette", _kind_palette),
    ("frame", _kind_frame),
    ("dots", _kind_dots),
    ("lines", _kind_lines),
)
HELDOUT_KINDS: tuple[Kind, ...] = (("rings", _kind_rings), ("blobs", _kind_blobs), ("plaid", _kind_plaid))


def vae_image(rng: np.random.Generator) -> np.ndarray:
    """One picture of the VAE's training mix (scenes weighted double: they are what the base model draws)."""
    i = int(rng.integers(len(KINDS) + 1))
    return KINDS[i if i < len(KINDS) else 0][1](rng)


def heldout_image(rng: np.random.Generator) -> np.ndarray:
    return HELDOUT_KINDS[int(rng.integers(len(HELDOUT_KINDS)))][1](rng)
