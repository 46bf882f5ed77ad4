"""The demo learns its style, measured in pictures.

After the demo run (train_configs/demo.toml: the bundled posters on top of toy-sd1), pictures generated at
strength 1 show the posters' look and at strength 0 they do not, strength 0.5 lies between, and the prompted
object keeps its color. The measurements are sd_loha/toy/styles.py's: `palette_shift` (how much nearer the pixels
lie to the posters' palette than to the toy world's colors; moves gradually with the strength) and
`frame_contrast` (the posters' dark frame; appears near full strength). The denoising loss on held-out posters
falls too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd_loha import apply_loha, set_loha_strength
from sd_loha.models import load_pipeline
from sd_loha.toy.styles import frame_contrast, object_color, palette_shift

from .helpers import DEMO_IMAGES, HELDOUT_IMAGES, denoising_loss

# Objects in colors the posters share with the toy world, on the posters' light backgrounds; a yellow object on
# orange is left out (the posters draw yellow on peach only as stripes, and the style turns it into those).
PROMPTS = [("red", "circle", "white"), ("blue", "square", "orange"), ("yellow", "triangle", "white"),
           ("red", "triangle", "orange"), ("blue", "circle", "white"), ("red", "square", "white")]
SEEDS = (0, 1)
COLORS = ("red", "blue", "yellow")


def _pictures(pipe, strength: float) -> list[tuple[str, np.ndarray]]:
    set_loha_strength(pipe, "demo", strength)
    out = []
    for seed in SEEDS:
        for i, (color, shape, background) in enumerate(PROMPTS):
            gen = torch.Generator().manual_seed(100 * seed + i)
            image = pipe(f"a {color} {shape} on a {background} background", num_inference_steps=20,
                         guidance_scale=4.0, generator=gen).images[0]
            out.append((color, np.asarray(image)))
    return out


def _losses(pipe) -> tuple[float, float]:
    """Plain denoising loss on the training and the held-out posters, with the captions the demo trains on."""
    return tuple(denoising_loss(pipe, folder, caption_extension=".caption") for folder in (DEMO_IMAGES, HELDOUT_IMAGES))


@pytest.mark.slow
def test_demo_adapter_draws_the_poster_style_and_keeps_the_content(demo_run):
    out, proc, _, _ = demo_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    pipe = load_pipeline("toy-sd1")
    pipe.set_progress_bar_config(disable=True)
    base_train, base_heldout = _losses(pipe)
    apply_loha(pipe, out / "demo.safetensors", name="demo", strict=True)

    stats = {}
    for strength in (0.0, 0.5, 1.0):
        pictures = _pictures(pipe, strength)
        objects = [object_color(im, COLORS) for _, im in pictures]
        stats[strength] = (np.mean([palette_shift(im) for _, im in pictures]),
                           np.mean([frame_contrast(im) for _, im in pictures]),
                           np.mean([got == color for got, (color, _) in zip(objects, pictures)]),
                           np.mean([got != "none" for got in objects]))
        print(f"strength {strength}: palette shift {stats[strength][0]:+.3f}, frame contrast "
              f"{stats[strength][1]:+.3f}, object color right {stats[strength][2]:.0%}, "
              f"object drawn {stats[strength][3]:.0%}")
    (p0, f0, c0, _), (p5, f5, c5, _), (p1, f1, c1, d1) = stats[0.0], stats[0.5], stats[1.0]
    # The posters measure 0.11-0.25 (palette) and 0.6-0.8 (frame); the base model's pictures about -0.17 and 0.
    assert p0 < -0.1 and p1 > 0.05
    assert p0 + 0.05 < p5 < p1 - 0.02  # halfway lies between
    assert f0 < 0.05 and f1 > 0.3 and f5 < f1
    # the subject is kept at strength 1: every picture draws its object, in the prompted color in 11 of 12 or more
    # (the recipe measured in bench/RESULTS.md, "Style against subject": 92-100 % over seeds; the shipped seed 100 %)
    assert c0 == 1.0 and c5 >= 0.9 and c1 >= 0.9 and d1 == 1.0

    set_loha_strength(pipe, "demo", 1.0)
    tuned_train, tuned_heldout = _losses(pipe)
    print(f"denoising loss, training posters: base {base_train:.4f} -> adapter {tuned_train:.4f}; "
          f"held-out posters: base {base_heldout:.4f} -> adapter {tuned_heldout:.4f}")
    assert tuned_train < 0.8 * base_train and tuned_heldout < base_heldout
