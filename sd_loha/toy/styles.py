"""Measure a trained style in a picture: how much of a style a generated picture shows, as one number.

Each style has a measurement that reads plainly (no learned classifier), so a test or a benchmark can say how
strongly an adapter draws its style, at strength 0 (the base model: none), 0.5 and 1:

- poster (the bundled demo images, sd_loha/assets/demo_images): a thick dark frame around a light warm picture.
  `frame_contrast` is the luminance of the ring just inside the frame minus that of the outer ring, in [-1, 1]:
  about 0.75 on the posters at 64 px, about 0 on a toy-world scene (its border is the background).
  `palette_shift` is how much nearer the picture's pixels lie to the posters' palette (muted rose, blue, ochre,
  teal, cream, peach, ink) than to the toy world's saturated colors, in units of 255: 0.11-0.25 on the posters,
  about -0.17 on the base model's pictures. The frame appears only near full strength; the palette moves
  gradually, so it is the measure that shows strength 0.5 lying between 0 and 1.
- hatch (made here for bench/bench_styles.py: toy-world scenes with diagonal hatching on the background):
  `hatch_amplitude` is the hatching's square-wave amplitude at its frequency.

The object a prompt asks for is read inside the frame (`object_color`), so a test can check that the style changed
the look and kept the content. A style may shift colors toward its own palette (the posters' red is a muted
rose): the object's mean color is named by the nearest of the colors a test chose (e.g. red, blue, yellow), not
of the whole grammar.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..assets.make_demo_images import BACKGROUNDS, OUTLINE, PALETTE
from . import world
from .measure import OBJECT_DISTANCE, Judgement, judge, largest_component

FRAME = 2  # outer ring that holds the poster frame (4 px at 96 px, 2.7 px at 64 px)
INSIDE = (4, 8)  # the ring just inside it: the poster's background
INSET = 6  # crop that removes the frame before the content is judged


def _luminance(img: np.ndarray) -> np.ndarray:
    rgb = np.asarray(img)[..., :3].astype(np.float32)
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def _ring(shape: tuple[int, int], outer: int, inner: int) -> np.ndarray:
    """Pixels at distance [outer, inner) from the picture's edge."""
    h, w = shape
    y, x = np.mgrid[:h, :w]
    d = np.minimum(np.minimum(y, h - 1 - y), np.minimum(x, w - 1 - x))
    return (d >= outer) & (d < inner)


def frame_contrast(img: np.ndarray) -> float:
    """How much darker the outer ring is than the ring inside it (0: no frame; ~0.75: the posters' frame)."""
    lum = _luminance(img)
    outer = lum[_ring(lum.shape, 0, FRAME)].mean()
    inside = lum[_ring(lum.shape, *INSIDE)].mean()
    return float((inside - outer) / 255.0)


_WORLD_RGB = np.array(list(world.COLORS.values()), np.float32)
_POSTER_RGB = np.array([*PALETTE.values(), *BACKGROUNDS.values(), OUTLINE], np.float32)


def palette_shift(img: np.ndarray) -> float:
    """Mean over pixels of (distance to the nearest world color - distance to the nearest poster color) / 255."""
    px = np.asarray(img)[..., :3].reshape(-1, 1, 3).astype(np.float32)
    to_world = np.sqrt(((px - _WORLD_RGB) ** 2).sum(-1)).min(1)
    to_poster = np.sqrt(((px - _POSTER_RGB) ** 2).sum(-1)).min(1)
    return float((to_world - to_poster).mean() / 255.0)


def judge_inside(img: np.ndarray) -> Judgement:
    """The toy-world judgement (background, object color, shape) of the picture without its frame."""
    arr = np.asarray(img)[..., :3]
    return judge(arr[INSET:-INSET, INSET:-INSET])


def object_color(img: np.ndarray, candidates: tuple[str, ...]) -> str:
    """The object inside the frame (the largest region that differs from the inner background), named by the
    nearest of `candidates` (grammar color names) to its mean color; "none" when there is no object."""
    inner = np.asarray(img)[INSET:-INSET, INSET:-INSET, :3].astype(np.float32)
    ring = _ring(inner.shape[:2], 0, 3)
    background = np.median(inner[ring], axis=0)
    mask = largest_component(np.sqrt(((inner - background) ** 2).sum(-1)) > OBJECT_DISTANCE)
    if mask.mean() < 0.02:
        return "none"
    mean = inner[mask].mean(0)
    rgb = np.array([world.COLORS[c] for c in candidates], np.float32)
    return candidates[int(np.argmin(((rgb - mean) ** 2).sum(-1)))]


STYLE_MEASURES = {"poster": frame_contrast}



# ---------------------------------------------------------------------------------------------
# hatch: the toy world's scenes with diagonal stripes on the background, the second style of the
# LoHA/LoRA/LoCon benchmark (bench/bench_styles.py). The base model never draws texture on a background,
# so the stripes' amplitude at their own frequency, fitted on the background, is ~0 on its pictures. The
# stripes differ from the background by less than measure.OBJECT_DISTANCE, so `judge` still finds the
# object and its color on a hatched picture.
# ---------------------------------------------------------------------------------------------

HATCH_CYCLES = 4  # stripes per picture width along x and along y (x + y diagonals, period 11 px across them)
HATCH_DUTY = 0.5  # fraction of each period drawn as stripe
# Per channel, toward black on light backgrounds, toward white on dark ones: RGB distance 43, under the
# judge's 45. Through toy-sd1's VAE about half the amplitude survives (finer or fainter stripes fared worse).
HATCH_SHIFT = 25
HATCH_MARGIN = 2  # pixels around the object left out of the fit (its anti-aliased edge is not background)


def hatch_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    shift = -HATCH_SHIFT if lum > 110 else HATCH_SHIFT
    return tuple(int(np.clip(v + shift, 0, 255)) for v in rgb)  # type: ignore[return-value]


def render_hatched(scene: world.Scene, rng: np.random.Generator) -> np.ndarray:
    """The scene as `world.render_scene` draws it, with diagonal stripes (random phase) on the background."""
    n = world.SIZE * world.SS
    background = world._jitter(rng, world.COLORS[scene.background])
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    stripe = ((x + y) * HATCH_CYCLES / n + rng.uniform()) % 1.0 < HATCH_DUTY
    pixels = np.where(stripe[..., None], np.array(hatch_color(background), np.uint8), np.array(background, np.uint8))
    img = Image.fromarray(pixels)
    world.draw_shape(ImageDraw.Draw(img), scene.shape, *world._shape_box(rng),
                     fill=world._jitter(rng, world.COLORS[scene.color]))
    return world._finish(img)


def hatched_set(n: int, seed: int, skip: int = 0) -> list[tuple[np.ndarray, str]]:
    """`n` hatched pictures with their captions, of distinct scenes in a seeded order of the grammar; `skip`
    leaves out the first ones of that order (a held-out set: `hatched_set(8, seed, skip=16)`)."""
    scenes = world.all_scenes()
    order = np.random.default_rng(seed).permutation(len(scenes))[skip:skip + n]
    rng = np.random.default_rng(seed + 1 + skip)
    return [(render_hatched(scenes[i], rng), scenes[i].caption) for i in order]


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(px):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def hatch_amplitude(img: np.ndarray) -> float:
    """Amplitude of the diagonal stripes at the hatching frequency on the background, as a fraction of full
    scale: a least-squares fit of a constant + cos + sin over the pixels outside the object (judge's object
    region, widened by HATCH_MARGIN). 0.061 on the drawn pictures, ~0.03 after toy-sd1's VAE, < 0.005 on the
    base model's pictures (flat backgrounds). Fitted on the background only, so the object's own edges,
    which have energy at every frequency, do not count."""
    from .measure import BORDER  # the ring judge() reads the background from

    rgb = np.asarray(img)[..., :3].astype(np.float32)
    lum = _luminance(rgb)
    background = np.median(rgb[_ring(lum.shape, 0, BORDER)], axis=0)
    obj = largest_component(np.sqrt(((rgb - background) ** 2).sum(-1)) > OBJECT_DISTANCE)
    ys, xs = np.nonzero(~_dilate(obj, HATCH_MARGIN))
    phase = 2 * np.pi * HATCH_CYCLES * (xs + ys) / lum.shape[1]
    basis = np.stack([np.ones_like(phase), np.cos(phase), np.sin(phase)], 1)
    coef = np.linalg.lstsq(basis, lum[ys, xs], rcond=None)[0]
    return float(np.hypot(coef[1], coef[2]) / 255.0)


STYLE_MEASURES["hatch"] = hatch_amplitude
