"""The pieces of bench/bench_styles.py (LoHA against LoRA and LoCon on toy-sd1) hold: each compared pair has
exactly equal trainable parameters on the same layers, every method trains on the same noise, the held-out loss
is deterministic, the hatch style's measure separates hatched from plain pictures, and the tables aggregate
what the runs logged. The full benchmark's figures live in bench/RESULTS.md."""

import json
import statistics

import numpy as np
import pytest

from sd_loha.toy import measure, styles, world

from tests.bench_helpers import load_bench

pytest.importorskip("lycoris")

bench = load_bench("bench_styles")


def test_compared_pairs_have_equal_parameters_on_the_same_layers():
    counts = bench.parameter_counts(list(bench.METHODS))
    for name, method in bench.METHODS.items():
        # LoHA rank r and LoRA rank 2r have the same count on every layer: tolerance 0
        assert counts[name] == counts[method.pair], (name, method.pair, counts)
        assert counts[name][0] > 0 and counts[name][1] > 0  # UNet and text encoder both adapted
    assert counts["locon"][0] > counts["lora"][0]  # LoCon adds the 3x3 convs
    assert counts["lora"][1] == counts["locon"][1]  # the text encoder has no convs


def test_lycoris_preset_is_put_back():
    from lycoris import LycorisNetwork

    before = (list(LycorisNetwork.TARGET_REPLACE_MODULE), list(LycorisNetwork.TARGET_REPLACE_NAME))
    with bench._lycoris_preset(["down_blocks.0.resnets.0.conv1"]):
        assert LycorisNetwork.TARGET_REPLACE_NAME == ["down_blocks.0.resnets.0.conv1"]
        assert LycorisNetwork.TARGET_REPLACE_MODULE == []
    assert (LycorisNetwork.TARGET_REPLACE_MODULE, LycorisNetwork.TARGET_REPLACE_NAME) == before


def test_methods_train_on_the_same_noise_and_change_the_model(tmp_path, one_thread, monkeypatch):
    """One step of LoHA and of LoRA: the first loss (adapters start at zero) is identical, so data, captions
    and noise are the same (without the reseed after the network is built, the methods' different
    initialisations shift the noise stream); the held-out loss moved from the base model's, so the network
    was trained."""
    from sd_loha.models import load_pipeline

    monkeypatch.setattr(bench, "HELDOUT_DRAWS", 4)  # fewer draws: the same noise for all still

    _, heldout_dir = bench.style_folders("hatch", tmp_path)
    items = bench.heldout_items(heldout_dir)
    base_pipe = load_pipeline("toy-sd1")
    base = bench.heldout_loss(base_pipe, items)
    assert bench.heldout_loss(base_pipe, items) == base  # fixed noise and timesteps
    first, heldout = {}, {}
    for name in ("loha", "lora"):
        row = bench.run_one(name, "hatch", 0, 4e-3, tmp_path, steps=1, measure_pictures=False)
        first[name], heldout[name] = row["final_train_loss"], row["heldout_loss"]
        assert (row["params_unet"], row["params_te"]) == (349_696, 86_016)
    assert first["loha"] == first["lora"]
    for name, loss in heldout.items():
        assert abs(loss - base) > 1e-5, name


def test_hatch_measure_separates_hatched_from_plain_pictures():
    hatched = styles.hatched_set(16, 0)
    scenes = {s.caption: s for s in world.all_scenes()}
    rng = np.random.default_rng(0)
    plain = [world.render_scene(scenes[c], rng) for _, c in hatched]
    on_hatched = [styles.hatch_amplitude(im) for im, _ in hatched]
    on_plain = [styles.hatch_amplitude(im) for im in plain]
    # stripes HATCH_SHIFT levels darker (or lighter) than the background, half of each period: a square wave whose
    # fundamental has amplitude 2/pi * 25/255 = 0.062 (the anti-aliasing box filter takes 1.3 % off)
    square_wave = 2 / np.pi * styles.HATCH_SHIFT / 255
    assert np.median(on_hatched) == pytest.approx(square_wave, rel=0.02)
    assert min(on_hatched) > 0.85 * square_wave
    assert max(on_plain) < 0.1 * min(on_hatched)
    # the stripes stay under the judge's object distance: the content is still read right
    assert all(measure.judge(im).color == scenes[c].color for im, c in hatched)
    held = styles.hatched_set(8, 0, skip=16)
    assert not {c for _, c in held} & {c for _, c in hatched}  # held-out scenes are other captions


def test_tables_aggregate_the_logged_runs(tmp_path):
    log = tmp_path / "runs.jsonl"
    rows = [{"method": "loha", "kind": "params", "params_unet": 10, "params_te": 2},
            {"method": "base", "style": "hatch", "heldout_loss": 0.08, "measure": 0.001, "content": 1.0,
             "measure_training_pictures": 0.06, "measure_after_vae": 0.03}]
    losses, measures = [0.070, 0.072, 0.077], [0.010, 0.014, 0.012]
    rows += [{"method": "loha", "style": "hatch", "kind": "run", "seed": i, "lr": 2e-3, "heldout_loss": loss,
              "measure": m, "content": 0.75, "seconds": 60.0} for i, (loss, m) in enumerate(zip(losses, measures))]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = bench.results_tables(log)
    line = next(x for x in text.splitlines() if x.startswith("| loha | 0.002 |"))
    assert f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}" in line
    assert f"{statistics.mean(measures):.4f} ± {statistics.stdev(measures):.4f}" in line
    assert "| loha | sd-loha loha | 8 / 4 | - | 10 | 2 | 12 |" in text
