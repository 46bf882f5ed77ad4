"""End to end in a real headless Chromium (Playwright's Python driver with Debian's chromium): train on
the demo images from the Train tab, watch the progress, generate with the new file at strengths 0 and 1,
inspect it, and see a path outside the allowed folders refused. Screenshots go to tests/artifacts/
(and the Train tab's to docs/webui.png when SD_LOHA_UPDATE_SCREENSHOT=1).

Needs: pip install playwright (no `playwright install`), apt-get install chromium.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import ARTIFACTS, wait_for

pytestmark = pytest.mark.slow

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("SD_LOHA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_PNG = Path(__file__).resolve().parents[2] / "docs" / "webui.png"


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


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


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


def test_train_generate_inspect_in_the_browser(page, ui):
    demo, _, policy = ui
    t0 = time.time()

    def phase(name):  # shown with pytest -s: where the time goes
        print(f"[{time.time() - t0:6.1f} s] {name}", flush=True)

    # ---- Train tab: demo settings, shortened; dataset preflight; start; live progress; result
    page.locator("#train-demo").click()
    page.get_by_text("Demo settings from").wait_for()
    assert page.locator("#train-train-data-dir textarea, #train-train-data-dir input").first.input_value() == \
        str(policy.data_dir / "demo")
    # shorter than the demo: 12 steps of batch 2, samples at step 8 and the end, an intermediate save at step 6
    fill(page, "train-length", 12)
    fill(page, "train-train-batch-size", 2)
    fill(page, "train-sample-every-n-steps", 8)
    fill(page, "train-sample-steps", 2)
    fill(page, "train-save-every-n-steps", 6)
    page.locator("#train-check").click()
    page.locator("#train-preflight").get_by_text("16 images found, 16 used, 0 skipped").wait_for()
    assert "8 steps per epoch at batch size 2" in page.locator("#train-preflight").inner_text()
    wait_for(lambda: page.locator("#train-thumbs img").count() >= 4, 30, what="dataset thumbnails")

    phase("preflight shown")
    page.locator("#train-start").click()
    page.locator("#train-message").get_by_text("Started").wait_for()
    # the browser goes away and comes back: the run goes on, and the new page shows it at once
    page.reload()
    page.locator("#train-start").wait_for()
    wait_for(lambda: status(page)["status"] not in ("idle", None), 30, what="the reloaded page to show the run")
    wait_for(lambda: page.locator("#train-length input").input_value() == "12", 30, what="the run's settings")
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
    assert final["step"] == final["total"] == 12
    result = page.locator("#train-result").inner_text()
    assert "demo.safetensors" in result and str(policy.outputs_dir / "demo") in result
    wait_for(lambda: page.locator("#train-samples img").count() >= 1, 30, what="sample images")
    # the loss curve is drawn: the moving-average line's colour (#1f4e9c) is on the chart
    page.locator("#train-loss").scroll_into_view_if_needed()
    wait_for(lambda: curve_pixels(page) > 30, 30, what="the loss curve to be drawn")
    path = shot(page, "webui-train.png")
    if os.environ.get("SD_LOHA_UPDATE_SCREENSHOT") == "1":  # the committed docs/webui.png, palette PNG (smaller)
        Image.open(path).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(DOCS_PNG, optimize=True)

    # a path outside the allowed folders is refused, in words
    for bad in ("/etc", "../.."):
        fill(page, "train-train-data-dir", bad)
        page.locator("#train-check").click()
        page.locator("#train-preflight").get_by_text("outside the folders this web UI may use").wait_for()
        assert "refused" in page.locator("#train-preflight").inner_text()
    shot(page, "webui-train-refused.png")

    phase("train tab checked")
    # ---- Generate tab: the trained file at strength 0 and 1, same seed: two different images
    adapter = str(policy.outputs_dir / "demo" / "demo.safetensors")
    page.get_by_role("tab", name="Generate").click()
    page.locator("#gen-go").wait_for()
    fill(page, "gen-adapter-0", adapter)
    page.keyboard.press("Escape")
    fill(page, "gen-prompt", "sdlohastyle, poster, red circle")
    fill(page, "gen-steps", 3)
    fill(page, "gen-seed", 7)
    fill(page, "gen-width", 64)
    fill(page, "gen-height", 64)
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
    assert "<lora:demo:0>" in Image.open(pngs[0]).info["parameters"]
    assert "<lora:demo:1>" in Image.open(pngs[1]).info["parameters"]
    assert "Seed: 7" in page.locator("#gen-params textarea").input_value()
    shot(page, "webui-generate.png")

    phase("generated twice")
    # ---- Inspect tab: metadata, rank/alpha, architecture, the per-block chart
    page.get_by_role("tab", name="Inspect").click()
    fill(page, "inspect-file", adapter)
    page.keyboard.press("Escape")
    page.locator("#inspect-go").click()
    page.locator("#inspect-summary").get_by_text("Made for").wait_for()
    summary = page.locator("#inspect-summary").inner_text()
    assert "rank 8, alpha 4" in summary and "loha" in summary.lower()
    wait_for(lambda: page.locator("#inspect-chart canvas, #inspect-chart svg").count() >= 1, 30, what="the chart")
    shot(page, "webui-inspect.png")
    phase("inspected")
