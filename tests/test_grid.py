"""`sd-loha generate --strength-grid` and sd_loha.grid.draw_grid (what the web UI's grids draw with): prompt lines as
rows, STRENGTH_SWEEP as columns at one seed, strength 0 the base model's picture and strength 1 the adapter's."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sd_loha.cli import main
from sd_loha.grid import MIN_GRID_CELL, STRENGTH_SWEEP, prompt_lines

from .loader_helpers import make_loha_file

COMMON = ["--model", "tiny-sd1", "--seed", "5", "--steps", "2", "--width", "64", "--height", "64", "--scheduler",
          "euler"]
PROMPTS = ["a red poster", "a blue square"]


@pytest.fixture(scope="module")
def style_file(tmp_path_factory):
    from sd_loha.models import build_tiny_pipeline

    path = tmp_path_factory.mktemp("grid") / "style.safetensors"
    make_loha_file(build_tiny_pipeline("tiny-sd1"), path, std=0.5)
    return path


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _one(tmp_path, capsys, name: str, prompt: str, *loha: str) -> np.ndarray:
    """A single `sd-loha generate` picture of `prompt` at COMMON's seed."""
    assert main(["generate", *loha, "--prompt", prompt, "--output-dir", str(tmp_path / name), *COMMON]) == 0
    capsys.readouterr()
    return _pixels(next((tmp_path / name).glob("*.png")))


def test_cli_strength_grid_rows_are_prompt_lines_columns_the_sweep(style_file, tmp_path, capsys):
    out = tmp_path / "grid"
    code = main(["generate", "--loha", str(style_file), "--prompt", "\n".join(PROMPTS) + "\n\n", "--strength-grid",
                 "--output-dir", str(out), *COMMON])
    assert code == 0
    printed = capsys.readouterr().out.split()
    n, rows = len(STRENGTH_SWEEP), len(PROMPTS)
    assert len(printed) == rows * n + 1 and printed[-1].endswith("grid-5.png")  # the blank lines are no rows
    cells = [_pixels(p) for p in printed[:-1]]
    grid = np.asarray(Image.open(printed[-1]).convert("RGB"), dtype=np.int16)
    zoom = MIN_GRID_CELL // 64
    side = 64 * zoom
    top, left = grid.shape[0] - rows * side, grid.shape[1] - n * side
    assert 0 < top < side and 0 < left <= 260  # a header row and a row-label margin, then exactly the cells
    for i, cell in enumerate(cells):  # the cells were printed row by row, left to right, and drawn enlarged whole
        r, c = divmod(i, n)
        assert cell.shape == (64, 64, 3)
        assert np.array_equal(grid[top + r * side:top + (r + 1) * side:zoom, left + c * side:left + (c + 1) * side:zoom],
                              cell)
    for r, prompt in enumerate(PROMPTS):
        base = _one(tmp_path, capsys, f"base{r}", prompt)
        one = _one(tmp_path, capsys, f"one{r}", prompt, "--loha", f"{style_file}:1", "--no-merge")
        assert np.array_equal(cells[r * n], base)  # strength 0: the base model's own picture, pixel for pixel
        assert np.abs(cells[r * n + n - 1] - base).max() > 0
        assert np.array_equal(cells[r * n + n - 1], one)  # strength 1: the adapter's picture at that seed
        middle = [cells[r * n + c] for c in range(1, n - 1)]
        assert all(np.abs(m - base).max() > 0 and np.abs(m - one).max() > 0 for m in middle)
    text = Image.open(printed[-1]).info["parameters"]
    assert ("Grid: rows = style.safetensors; prompts = a red poster | a blue square; strengths = "
            + ", ".join(f"{s:g}" for s in STRENGTH_SWEEP) + "; seeds = 5") in text
    assert "<lora:style:0.25>" in Image.open(printed[1]).info["parameters"]


@pytest.mark.parametrize("extra", [["--loha", "b.safetensors"], ["--num-images", "2"]])
def test_cli_strength_grid_wants_one_file_and_one_image(style_file, extra, tmp_path, capsys):
    code = main(["generate", "--loha", str(style_file), *extra, "--prompt", "x", "--strength-grid",
                 "--output-dir", str(tmp_path), *COMMON])
    assert code == 2 and "exactly one --loha" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_draw_grid_rows_are_files_times_prompts_in_order(style_file, tmp_path):
    """Two files × two prompts: four rows, file-major, each cell that file at that prompt and strength; the cells
    reach on_cell in the grid's order; labels name both; -1 is one random seed shared by every cell."""
    from sd_loha.generate import AdapterSpec, GenerationSession
    from sd_loha.grid import draw_grid
    from sd_loha.models import build_tiny_pipeline

    other = tmp_path / "other.safetensors"
    make_loha_file(build_tiny_pipeline("tiny-sd1"), other, seed=3, std=0.5)
    session = GenerationSession("tiny-sd1", device="cpu")
    seen = []
    gen = dict(steps=2, guidance_scale=7.0, width=64, height=64, scheduler="euler")
    grid = draw_grid(session, [style_file, other], PROMPTS, [0, 0.5], [-1], on_cell=seen.append, **gen)
    assert [c.caption for c in seen] == [c.caption for c in grid.cells] and len(grid.cells) == 8
    seed = grid.cells[0].seed
    assert {c.seed for c in grid.cells} == {seed}
    drawn = [(f, p, s) for f in (style_file, other) for p in PROMPTS for s in (0, 0.5)]
    for cell, (path, prompt, strength) in zip(grid.cells, drawn):
        session.set_adapters([AdapterSpec(str(path), strength)], merge=False)
        alone = session.generate(prompt, seed=seed, **gen)[0][0]
        assert np.array_equal(np.asarray(cell.image), np.asarray(alone)), (path.name, prompt, strength)
    assert f"prompts = {' | '.join(PROMPTS)}; strengths = 0, 0.5; seeds = {seed}" in grid.parameters
    assert grid.image.height - 4 * MIN_GRID_CELL < MIN_GRID_CELL  # four rows under one header
    assert grid.row_labels == [f"{n}: {p}" for n in ("style", "other") for p in PROMPTS]
    assert grid.col_labels == [f"strength 0 = base (seed {seed})", f"strength 0.5 (seed {seed})"]


def test_prompt_lines():
    assert prompt_lines(" a cat \n\n  \nb dog\n") == ["a cat", "b dog"]
    assert prompt_lines("") == prompt_lines("\n \n") == [""]  # an empty box is the one empty prompt
