"""Generate the bundled demo dataset (deterministic; no randomness, no downloads).

    python sd_loha/assets/make_demo_images.py

Writes `demo_images/` (16 training images) and `demo_images_heldout/` (4
images of the same style, never trained on) next to this file. The style is
one consistent "poster" look the adapter can learn quickly: bold flat shapes
from a fixed palette, black outlines and a thick black frame on a warm
background. Each PNG has a kohya-style tag caption in a same-name .txt whose
first tag is the trigger word `sdlohastyle`, and a `.caption` file with the same picture described in the
words the built-in pretrained base `toy-sd1` knows ("a red circle on a white background": the grammar's
word for each palette color, TOY_COLOR; see docs/toy-model.md). The demo trains on those (caption_extension = ".caption"),
so the style, not new words, is what the adapter has to learn.

Sizes: mostly 96x96, plus 128x96 and 96x128 so aspect-ratio buckets get
exercised (e.g. resolution 112, bucket_reso_steps 32, min_bucket_reso 64 gives
the buckets 96x96, 128x96 and 96x128).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

TRIGGER = "sdlohastyle"
SS = 4  # supersampling factor: draw large, downscale for clean edges
OUTLINE = (31, 31, 31)
PALETTE = {
    "red": (209, 73, 91),
    "blue": (46, 94, 170),
    "yellow": (237, 174, 73),
    "teal": (0, 121, 140),
    "black": (31, 31, 31),
}
BACKGROUNDS = {"cream": (243, 230, 208), "peach": (245, 203, 167)}
# The nearest color of toy-sd1's grammar (sd_loha/toy/world.py), for the .caption files.
TOY_COLOR = {"red": "red", "blue": "blue", "yellow": "yellow", "teal": "green", "black": "black",
             "cream": "white", "peach": "orange"}


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | stripes | triangle | square | half circle
    color: str
    box: tuple[float, float, float, float]  # fractions of the canvas: x0, y0, x1, y1
    orientation: str = ""  # stripes: horizontal | vertical | diagonal
    count: int = 3

    def tag(self) -> str:
        if self.kind == "stripes":
            return f"{self.color} {self.orientation} stripes"
        return f"{self.color} {self.kind}"

    def toy_words(self) -> str:
        color = TOY_COLOR[self.color]
        if self.kind == "stripes":
            return f"{color} stripes"
        return f"a {color} {'circle' if self.kind == 'half circle' else self.kind}"


@dataclass(frozen=True)
class Poster:
    name: str
    size: tuple[int, int]
    background: str
    shapes: tuple[Shape, ...]

    def caption(self) -> str:
        return ", ".join([TRIGGER, "poster", "flat colors", f"{self.background} background", *[s.tag() for s in self.shapes]])

    def toy_caption(self) -> str:
        """The picture in toy-sd1's grammar: `a {color} {shape} on a {background} background`, and the rest."""
        first, *rest = self.shapes
        text = f"{first.toy_words()} on a {TOY_COLOR[self.background]} background"
        return ", ".join([text, *[f"with {s.toy_words()}" for s in rest]])


def _px(box: tuple[float, float, float, float], w: int, h: int) -> tuple[int, int, int, int]:
    return (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))


def _draw_shape(img: Image.Image, d: ImageDraw.ImageDraw, s: Shape, w: int, h: int) -> None:
    x0, y0, x1, y1 = _px(s.box, w, h)
    fill = PALETTE[s.color]
    lw = 2 * SS
    if s.kind == "circle":
        side = min(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        d.ellipse((cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2), fill=fill, outline=OUTLINE, width=lw)
    elif s.kind == "half circle":
        # A setting sun: the upper half of a circle sitting on y1.
        r = (x1 - x0) // 2
        cx = (x0 + x1) // 2
        d.pieslice((cx - r, y1 - r, cx + r, y1 + r), 180, 360, fill=fill, outline=OUTLINE, width=lw)
    elif s.kind == "square":
        d.rectangle((x0, y0, x1, y1), fill=fill, outline=OUTLINE, width=lw)
    elif s.kind == "triangle":
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill, outline=OUTLINE, width=lw)
    elif s.kind == "stripes":
        n = s.count
        if s.orientation == "horizontal":
            band = (y1 - y0) / (2 * n - 1)
            for i in range(n):
                top = round(y0 + 2 * i * band)
                d.rectangle((x0, top, x1, round(top + band)), fill=fill, outline=OUTLINE, width=lw)
        elif s.orientation == "vertical":
            band = (x1 - x0) / (2 * n - 1)
            for i in range(n):
                left = round(x0 + 2 * i * band)
                d.rectangle((left, y0, round(left + band), y1), fill=fill, outline=OUTLINE, width=lw)
        else:  # diagonal, clipped to the box by drawing on a mask
            band = (x1 - x0) / (2 * n - 1)
            mask = Image.new("L", img.size, 0)
            md = ImageDraw.Draw(mask)
            span = (y1 - y0)
            for i in range(-n, 2 * n):
                left = x0 + 2 * i * band
                md.polygon([(left, y1), (left + band, y1), (left + band + span, y0), (left + span, y0)], fill=255)
            box_mask = Image.new("L", mask.size, 0)
            ImageDraw.Draw(box_mask).rectangle((x0, y0, x1, y1), fill=255)
            mask = Image.composite(mask, Image.new("L", mask.size, 0), box_mask)
            img.paste(fill, (0, 0, *mask.size), mask)
            d.rectangle((x0, y0, x1, y1), outline=OUTLINE, width=lw)
    else:
        raise ValueError(s.kind)


def render(p: Poster) -> Image.Image:
    w, h = p.size[0] * SS, p.size[1] * SS
    img = Image.new("RGB", (w, h), BACKGROUNDS[p.background])
    d = ImageDraw.Draw(img)
    for s in p.shapes:
        _draw_shape(img, d, s, w, h)
    frame = 4 * SS  # the thick black frame is part of the style
    d.rectangle((0, 0, w - 1, h - 1), outline=OUTLINE, width=frame)
    return img.resize(p.size, Image.Resampling.LANCZOS)


def S(kind: str, color: str, box: tuple[float, float, float, float], orientation: str = "", count: int = 3) -> Shape:
    return Shape(kind, color, box, orientation, count)


SQ = (96, 96)
WIDE = (128, 96)
TALL = (96, 128)

TRAIN: tuple[Poster, ...] = (
    Poster("poster_01", SQ, "cream", (S("circle", "red", (0.25, 0.25, 0.75, 0.75)),)),
    Poster("poster_02", SQ, "cream", (S("stripes", "blue", (0.15, 0.15, 0.85, 0.85), "horizontal"),)),
    Poster("poster_03", SQ, "peach", (S("stripes", "teal", (0.15, 0.15, 0.85, 0.85), "vertical"), S("circle", "yellow", (0.35, 0.35, 0.65, 0.65)))),
    Poster("poster_04", SQ, "cream", (S("triangle", "yellow", (0.2, 0.2, 0.8, 0.8)),)),
    Poster("poster_05", SQ, "peach", (S("half circle", "red", (0.2, 0.3, 0.8, 0.75)), S("stripes", "blue", (0.12, 0.78, 0.88, 0.9), "horizontal", 1))),
    Poster("poster_06", SQ, "cream", (S("square", "teal", (0.22, 0.22, 0.78, 0.78)), S("circle", "red", (0.38, 0.38, 0.62, 0.62)))),
    Poster("poster_07", SQ, "cream", (S("stripes", "red", (0.12, 0.12, 0.88, 0.88), "diagonal"),)),
    Poster("poster_08", SQ, "peach", (S("circle", "blue", (0.12, 0.12, 0.52, 0.52)), S("circle", "yellow", (0.48, 0.48, 0.88, 0.88)))),
    Poster("poster_09", SQ, "cream", (S("stripes", "yellow", (0.12, 0.15, 0.88, 0.85), "vertical", 4), S("triangle", "black", (0.3, 0.3, 0.7, 0.7)))),
    Poster("poster_10", SQ, "peach", (S("square", "blue", (0.15, 0.15, 0.55, 0.55)), S("square", "red", (0.45, 0.45, 0.85, 0.85)))),
    Poster("poster_11", SQ, "cream", (S("half circle", "teal", (0.15, 0.2, 0.85, 0.8)),)),
    Poster("poster_12", SQ, "peach", (S("triangle", "red", (0.15, 0.25, 0.85, 0.85)), S("circle", "yellow", (0.62, 0.12, 0.86, 0.36)))),
    Poster("poster_13", WIDE, "cream", (S("stripes", "teal", (0.1, 0.15, 0.9, 0.85), "horizontal", 4), S("circle", "red", (0.55, 0.3, 0.85, 0.7)))),
    Poster("poster_14", WIDE, "peach", (S("circle", "blue", (0.1, 0.2, 0.45, 0.8)), S("triangle", "yellow", (0.52, 0.2, 0.9, 0.8)))),
    Poster("poster_15", TALL, "cream", (S("circle", "yellow", (0.2, 0.1, 0.8, 0.45)), S("stripes", "blue", (0.15, 0.55, 0.85, 0.9), "horizontal"))),
    Poster("poster_16", TALL, "peach", (S("stripes", "red", (0.15, 0.1, 0.85, 0.9), "vertical"),)),
)

HELDOUT: tuple[Poster, ...] = (
    Poster("heldout_01", SQ, "cream", (S("circle", "teal", (0.25, 0.25, 0.75, 0.75)), S("stripes", "red", (0.12, 0.8, 0.88, 0.9), "horizontal", 1))),
    Poster("heldout_02", SQ, "peach", (S("stripes", "black", (0.15, 0.15, 0.85, 0.85), "diagonal"),)),
    Poster("heldout_03", SQ, "cream", (S("triangle", "blue", (0.2, 0.2, 0.8, 0.8)), S("circle", "red", (0.4, 0.5, 0.6, 0.7)))),
    Poster("heldout_04", WIDE, "peach", (S("half circle", "yellow", (0.25, 0.2, 0.75, 0.75)), S("stripes", "teal", (0.1, 0.78, 0.9, 0.9), "horizontal", 1))),
)


def write(posters: tuple[Poster, ...], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in posters:
        render(p).save(out_dir / f"{p.name}.png", optimize=True)
        (out_dir / f"{p.name}.txt").write_text(p.caption() + "\n", encoding="utf-8", newline="\n")
        (out_dir / f"{p.name}.caption").write_text(p.toy_caption() + "\n", encoding="utf-8", newline="\n")


def main(argv: list[str] | None = None) -> None:
    here = Path(__file__).resolve().parent
    root = Path(argv[0]) if argv else here
    write(TRAIN, root / "demo_images")
    write(HELDOUT, root / "demo_images_heldout")


if __name__ == "__main__":
    main(sys.argv[1:])
