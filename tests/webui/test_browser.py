"""End to end in a real headless Chromium (Playwright's Python driver with Debian's chromium): train the demo's
poster style on toy-sd1 from the Train tab (shortened, with options set in its generated sections), watch the
progress, generate with the new file at strengths 0 and 1, as a grid of its saves x strengths x seeds and as its
style-vs-strength grid, inspect it, edit its metadata and send block weights to Generate, bake it into toy-sd1 and convert it to a LoRA in the Tools
tab, and see a path outside the allowed folders refused. Screenshots go to tests/artifacts/ (and, with
SD_LOHA_UPDATE_SCREENSHOT=1, the Train tab's to docs/webui.png, the Generate tab's to docs/webui-generate.png). About 70 s on 2 shared CPU cores (one torch thread).

Needs: pip install playwright (no `playwright install`), apt-get install chromium.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_loha.grid import STRENGTH_SWEEP
from sd_loha.io import addnet_hash
from sd_loha.meta import read_metadata
from sd_loha.toy.measure import judge
from sd_loha.toy.styles import frame_contrast
from sd_loha.train.config import load_config
from webui.defaults import DEFAULT_MODEL, DEFAULT_PROMPTS
from webui.train_tab import demo_config

from .conftest import ARTIFACTS, border_uniformity, wait_for

pytestmark = pytest.mark.slow

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("SD_LOHA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS = Path(__file__).resolve().parents[2] / "docs"
UPDATE_DOCS = os.environ.get("SD_LOHA_UPDATE_SCREENSHOT") == "1"
# A quarter of the demo's 400 steps of batch 4: the loss falls and the posters' frame shows (frame contrast ~0.45
# at strength 1, ~0 at 0); samples and a save halfway.
STEPS, BATCH = 100, 4


@pytest.fixture(scope="module")
def page(ui):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    _, url, _ = ui
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(url)
        pg.locator("#train-start").wait_for()
        yield pg
        browser.close()


def shot(page, name: str, docs_name: str | None = None) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    if docs_name and UPDATE_DOCS:  # the committed copies: palette PNGs (smaller)
        Image.open(path).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(DOCS / docs_name, optimize=True)
    return path


def choose(page, elem_id: str, typed: str, option: str) -> None:
    """Pick a dropdown's option as a user does: type part of it, click it (a filled-in custom value leaves the
    option list open over the page)."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(typed)
    page.get_by_role("option", name=option).click()


def toggle(page, group: str) -> None:
    """Open or close the "All options" section of a config table (or, for "toml", the TOML box)."""
    page.locator("#train-toml-file .label-wrap" if group == "toml" else f"#train-group-{group} .label-wrap").first.click()
    page.wait_for_timeout(200)


def field(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first.input_value()


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")  # blur: gradio takes the value on change/blur


def curve_pixels(page) -> int:
    import io

    img = np.asarray(Image.open(io.BytesIO(page.locator("#train-loss").screenshot())).convert("RGB"), dtype=np.int16)
    return int((np.abs(img - np.array([31, 78, 156])).sum(axis=2) < 60).sum())


def status(page) -> dict:
    el = page.locator("#train-status .sdl-status")
    return {"status": el.get_attribute("data-status"), "step": int(el.get_attribute("data-step") or 0),
            "total": int(el.get_attribute("data-total") or 0), "text": el.inner_text()}


def test_train_generate_inspect_in_the_browser(page, ui, one_thread):
    # one_thread: the run and the generations are small; on a CPU shared with other work a second torch thread
    # mostly waits at every op (the shortened demo run took 8 minutes so at a load of 4-6)
    demo, _, policy = ui
    t0 = time.time()

    def phase(name):  # shown with pytest -s: where the time goes
        print(f"[{time.time() - t0:6.1f} s] {name}", flush=True)

    # ---- Train tab: a fresh page starts on toy-sd1; demo settings (toy-sd1 too), shortened; preflight; start
    assert field(page, "train-pretrained-model") == DEFAULT_MODEL
    page.locator("#train-demo").click()
    page.get_by_text("Demo settings from").wait_for()
    assert f"{DEFAULT_MODEL} on the demo images" in page.locator("#train-message").inner_text()
    assert field(page, "train-pretrained-model") == DEFAULT_MODEL
    assert field(page, "train-train-data-dir") == str(policy.data_dir / "demo")
    demo_cfg = demo_config(policy)
    fill(page, "train-length", STEPS)
    fill(page, "train-train-batch-size", BATCH)
    fill(page, "train-sample-every-n-steps", STEPS // 2)
    fill(page, "train-save-every-n-steps", STEPS // 2)
    # the generated "All options" sections: collapsed; Demo settings filled them (demo.toml's min_snr_gamma)
    assert not page.locator("#train-min-snr-gamma").is_visible()
    toggle(page, "training")
    assert field(page, "train-min-snr-gamma") == "5"
    shot(page, "webui-train-options.png")  # one section open: a widget per option, its help below it
    toggle(page, "training")
    # masks from the alpha channel (the demo's posters are opaque: weight 1 everywhere) and a baseline grid
    toggle(page, "dataset")
    page.locator("#train-masked-loss input[type=checkbox]").check()
    page.locator("#train-alpha-mask input[type=checkbox]").check()
    toggle(page, "dataset")
    toggle(page, "sampling")
    page.locator("#train-sample-at-first input[type=checkbox]").check()
    toggle(page, "sampling")
    saved = policy.outputs_dir / "my_loha.toml"
    page.locator("#train-save").click()
    page.locator("#train-message").get_by_text("Saved").wait_for()
    on = load_config(saved)
    assert on.masked_loss and on.alpha_mask and on.sample_at_first and on.min_snr_gamma == 5.0
    toggle(page, "toml")
    assert "alpha_mask = true" in field(page, "train-toml")  # Save wrote the one config into the box too
    toggle(page, "toml")
    page.locator("#train-check").click()
    page.locator("#train-preflight").get_by_text("16 images found, 16 used, 0 skipped").wait_for()
    assert f"{16 // BATCH} steps per epoch at batch size {BATCH}" in page.locator("#train-preflight").inner_text()
    wait_for(lambda: page.locator("#train-thumbs img").count() >= 4, 30, what="dataset thumbnails")

    phase("preflight shown")
    page.locator("#train-start").click()
    page.locator("#train-message").get_by_text("Started").wait_for()
    run_cfg = demo.sdl_runner.last_config
    assert run_cfg.masked_loss and run_cfg.alpha_mask and run_cfg.sample_at_first and run_cfg.max_train_steps == STEPS
    # the browser goes away and comes back: the run goes on, and the new page shows it at once
    page.reload()
    page.locator("#train-start").wait_for()
    wait_for(lambda: status(page)["status"] not in ("idle", None), 30, what="the reloaded page to show the run")
    wait_for(lambda: page.locator("#train-length input").input_value() == str(STEPS), 30, what="the run's settings")
    seen: list[dict] = []

    def finished():
        s = status(page)
        if not seen or seen[-1]["step"] != s["step"] or seen[-1]["status"] != s["status"]:
            seen.append(s)
        return s["status"] in ("finished", "failed", "stopped")

    wait_for(finished, 600, interval=0.1, what="training to finish in the browser")
    phase("training finished")
    final = status(page)
    assert final["status"] == "finished", page.locator("#train-result").inner_text()
    # the progress bar and its line updated while training: intermediate steps, it/s and ETA were shown
    running = [s for s in seen if s["status"] == "training" and 0 < s["step"] < s["total"]]
    assert running, seen
    assert "it/s" in running[-1]["text"] and "ETA" in running[-1]["text"] and f"/ {final['total']}" in running[-1]["text"]
    assert final["step"] == final["total"] == STEPS
    # the loss falls: the base model does not know the posters, the adapter learns them
    losses = [v for _, v in demo.sdl_runner.snapshot()["losses"]]
    quarter = len(losses) // 4
    first, last = np.mean(losses[:quarter]), np.mean(losses[-quarter:])
    print(f"loss: first quarter {first:.4f}, last quarter {last:.4f}")
    assert last < 0.8 * first, (first, last)
    result = page.locator("#train-result").inner_text()
    assert "demo.safetensors" in result and str(policy.outputs_dir / "demo") in result
    wait_for(lambda: page.locator("#train-samples img").count() >= 2, 30, what="sample images")
    assert (policy.outputs_dir / "demo" / "samples" / "at_first.png").is_file()  # sample_at_first from its section
    # the loss curve is drawn: the moving-average line's colour (#1f4e9c) is on the chart
    page.locator("#train-loss").scroll_into_view_if_needed()
    wait_for(lambda: curve_pixels(page) > 30, 30, what="the loss curve to be drawn")
    shot(page, "webui-train.png", "webui.png")

    # a path outside the allowed folders is refused, in words
    for bad in ("/etc", "../.."):
        fill(page, "train-train-data-dir", bad)
        page.locator("#train-check").click()
        page.locator("#train-preflight").get_by_text("outside the folders this web UI may use").wait_for()
        assert "refused" in page.locator("#train-preflight").inner_text()
    shot(page, "webui-train-refused.png")

    phase("train tab checked")
    # ---- Generate tab, on its defaults (toy-sd1, its prompt, steps, size): the trained file at strength 0 and 1
    adapter = str(policy.outputs_dir / "demo" / "demo.safetensors")
    page.get_by_role("tab", name="Generate").click()
    page.locator("#gen-go").wait_for()
    assert field(page, "gen-model") == DEFAULT_MODEL and field(page, "gen-prompt") == DEFAULT_PROMPTS[0]
    choose(page, "gen-adapter-0", "demo.safetensors", "outputs/demo/demo.safetensors")
    fill(page, "gen-seed", 7)
    generated = policy.outputs_dir / "generated"
    pngs = []
    for strength in (0, 1):
        fill(page, "gen-strength-0", strength)
        before = set(generated.rglob("*.png")) if generated.exists() else set()
        page.locator("#gen-go").click()
        new = wait_for(lambda: set(generated.rglob("*.png")) - before if generated.exists() else None, 300,
                       what=f"the image at strength {strength}")
        page.locator("#gen-message").get_by_text(next(iter(new)).name).wait_for()
        pngs.append(next(iter(new)))
    wait_for(lambda: page.locator("#gen-gallery img").count() >= 1, 30, what="the gallery image")
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in pngs)
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a - b).max() > 0, "strength 0 and 1 gave identical images"
    # strength 0 is the base model: a real picture of the prompt ("a red circle on a white background"), not static
    base = judge(a.astype(np.uint8))
    assert border_uniformity(a) > 0.95 and (base.background, base.color) == ("white", "red"), base
    # strength 1 draws the posters' dark frame around it
    print(f"frame contrast: strength 0 {frame_contrast(a):.3f}, strength 1 {frame_contrast(b):.3f}")
    assert frame_contrast(b) > frame_contrast(a) + 0.2
    assert "<lora:demo:0>" in Image.open(pngs[0]).info["parameters"]
    assert "<lora:demo:1>" in Image.open(pngs[1]).info["parameters"]
    assert "Seed: 7" in page.locator("#gen-params textarea").input_value()
    phase("generated twice")
    # the grid: rows = the run's saves (halfway, final), columns = strengths (one seed: the cells stay large)
    page.get_by_text("Grid: files × strengths × seeds in one labelled image").click()  # open the accordion
    page.locator("#grid-go").wait_for(state="visible")
    page.locator("#grid-run-files").click()
    page.locator("#gen-message").get_by_text("2 files from").wait_for()
    fill(page, "grid-strengths", "0, 0.5, 1")
    fill(page, "grid-seeds", "1")
    page.locator("#grid-go").click()
    page.locator("#gen-message").get_by_text("Grid saved").wait_for(timeout=300_000)
    grids = sorted(generated.rglob("*grid-*.png"))
    grid = Image.open(grids[-1])
    assert "strengths = 0, 0.5, 1; seeds = 1" in grid.info["parameters"]
    assert grid.width > 3 * 128 and grid.height > 2 * 128  # 64 px cells drawn at 2x
    wait_for(lambda: page.locator("#gen-gallery img").count() >= 1, 30, what="the grid in the gallery")
    page.wait_for_timeout(500)  # the preview's image settles
    shot(page, "webui-generate-grid.png")
    phase("grid made")
    # "Style vs strength": file 1 at STRENGTH_SWEEP (columns) for each prompt line (rows), at the Seed box's 7
    fill(page, "gen-prompt", "\n".join(DEFAULT_PROMPTS))
    before = set(grids)
    page.locator("#gen-style-grid").click()
    new = wait_for(lambda: set(generated.rglob("*grid-*.png")) - before, 300, what="the style-vs-strength grid")
    page.locator("#gen-message").get_by_text(next(iter(new)).name).wait_for()
    grid = Image.open(next(iter(new)))
    sweep = ", ".join(f"{v:g}" for v in STRENGTH_SWEEP)
    assert f"prompts = {' | '.join(DEFAULT_PROMPTS)}; strengths = {sweep}; seeds = 7" in grid.info["parameters"]
    cells = np.asarray(grid.convert("RGB"), dtype=np.int16)
    top, left = grid.height - 2 * 128, grid.width - len(STRENGTH_SWEEP) * 128  # 64 px cells drawn at 2x
    assert 0 < top < 128 and 0 < left <= 260
    zero, one = (cells[top:top + 128:2, left + c * 128:left + (c + 1) * 128:2] for c in (0, len(STRENGTH_SWEEP) - 1))
    assert np.array_equal(zero, a)  # strength 0: the picture the Generate button drew at 0 (the base model's)
    assert np.abs(one - b).max() <= 1  # strength 1: the Generate button's (merged there, in the bypass here)
    wait_for(lambda: page.locator("#gen-gallery img").count() >= 1, 30, what="the style grid in the gallery")
    page.wait_for_timeout(500)
    shot(page, "webui-generate.png", "webui-generate.png")
    phase("style-vs-strength grid made")
    # ---- Inspect tab: metadata, rank/alpha, architecture, the per-block chart
    page.get_by_role("tab", name="Inspect").click()
    fill(page, "inspect-file", adapter)
    page.keyboard.press("Escape")
    page.locator("#inspect-go").click()
    page.locator("#inspect-summary").get_by_text("Made for").wait_for()
    summary = page.locator("#inspect-summary").inner_text()
    assert f"rank {demo_cfg.network_dim}, alpha {demo_cfg.network_alpha:g}" in summary and "loha" in summary.lower()
    wait_for(lambda: page.locator("#inspect-chart canvas, #inspect-chart svg").count() >= 1, 30, what="the chart")
    shot(page, "webui-inspect.png")
    phase("inspected")

    # ---- Inspect tab's editors: block weights beside the chart (sent to Generate) and the metadata, saved for real
    fill(page, "inspect-lbw", "OUTD")
    page.keyboard.press("Escape")
    wait_for(lambda: "OUT03" in page.locator("#inspect-lbw-table").inner_text(), 30, what="the block-weights table")
    page.get_by_text("Edit metadata (sd-loha meta").click()  # open the accordion
    page.locator("#meta-title textarea").wait_for(state="visible")
    page.locator("#meta-message").get_by_text("metadata keys in").wait_for()  # read when the file was inspected
    assert field(page, "meta-title") == read_metadata(adapter).get("modelspec.title", "")
    before = addnet_hash(adapter)
    fill(page, "meta-title", "Poster style")
    fill(page, "meta-trigger", "poster, thick dark frame")
    page.locator("#meta-save").click()
    page.locator("#meta-message").get_by_text("Saved").wait_for()
    meta = read_metadata(adapter)
    assert (meta["modelspec.title"], meta["modelspec.trigger_phrase"]) == ("Poster style", "poster, thick dark frame")
    assert addnet_hash(adapter) == before and "unchanged" in page.locator("#meta-message").inner_text()
    page.locator("#inspect-lbw-use").click()
    page.locator("#gen-go").wait_for(state="visible")
    assert field(page, "gen-lbw-0") == "OUTD" and field(page, "gen-adapter-0").endswith("demo.safetensors")
    phase("metadata saved, block weights sent")

    # ---- Tools tab: bake the file into toy-sd1, convert it to a rank-4 LoRA; the reports and the error table
    page.get_by_role("tab", name="Tools").click()
    page.locator("#merge-go").wait_for()
    fill(page, "merge-adapter-0", adapter)
    page.keyboard.press("Escape")
    fill(page, "merge-lbw-0", "OUTD")
    page.keyboard.press("Escape")
    fill(page, "merge-out", "merged/demo_baked.safetensors")
    page.locator("#merge-go").click()
    page.locator("#merge-report").get_by_text("Wrote").wait_for(timeout=120_000)
    assert (policy.outputs_dir / "merged" / "demo_baked.safetensors").is_file()
    assert "OUTD" in page.locator("#merge-report").inner_text()
    fill(page, "convert-file", adapter)
    page.keyboard.press("Escape")
    fill(page, "convert-model", DEFAULT_MODEL)
    page.keyboard.press("Escape")
    fill(page, "convert-rank", 4)
    page.locator("#convert-go").click()
    page.locator("#convert-report").get_by_text("Wrote").wait_for(timeout=120_000)
    assert (policy.outputs_dir / "converted" / "lora.safetensors").is_file()
    wait_for(lambda: "relative error" in page.locator("#convert-blocks").inner_text()
             and "M00" in page.locator("#convert-blocks").inner_text(), 30, what="the per-block error table")
    page.get_by_text("sd-loha: train and use LoHA adapters").click()  # close the dropdowns' option lists
    page.wait_for_timeout(300)
    shot(page, "webui-tools.png", "webui-tools.png")
    phase("merged and converted")
