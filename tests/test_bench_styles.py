"""The pieces of bench/bench_styles.py (LoHA against LoRA and LoCon on toy-sd1, a rank sweep at equal parameters,
and the demo recipe's variants) hold: each compared pair has exactly equal trainable parameters on the same
layers, every method trains on the same noise, the held-out loss is deterministic, the hatch style's measure
separates hatched from plain pictures, the subject scores read what is drawn, the strength curve sets each
strength and puts 1 back, the base model's regularization pictures are its own, and the tables and the plot
(bench/styles_report.py) aggregate what the runs logged. The full benchmark's figures live in bench/RESULTS.md."""

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

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
    assert counts["locon-r16"][0] > counts["lora-r16"][0]  # LoCon adds the 3x3 convs
    assert counts["lora-r16"][1] == counts["locon-r16"][1]  # the text encoder has no convs
    # the rank sweep: parameters scale with the rank (linear layers: 2r(in + out) per layer, exactly linear in r)
    assert counts["loha-r2"][0] * 4 == counts["loha-r8"][0] and counts["lora-r4"][1] * 4 == counts["lora-r16"][1]


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
    for name in ("loha-r8", "lora-r16"):
        row = bench.run_one(name, "hatch", 0, 4e-3, tmp_path, steps=1, measure_pictures=False)
        first[name], heldout[name] = row["final_train_loss"], row["heldout_loss"]
        assert (row["params_unet"], row["params_te"]) == (349_696, 86_016)
    assert first["loha-r8"] == first["lora-r16"]
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


def _curve(measures, colors):
    return {f"{st:g}": {"measure": m, "drawn": 1.0, "content": c}
            for st, m, c in zip(bench.STRENGTHS, measures, colors)}


def _logged(tmp_path, rows, name="runs.jsonl"):
    log = tmp_path / name
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return log


BASE_HATCH = {"method": "base", "style": "hatch", "heldout_loss": 0.08, "measure": 0.001, "drawn": 1.0, "content": 1.0,
              "measure_training_pictures": 0.06, "measure_after_vae": 0.03}


def test_tables_aggregate_the_logged_runs(tmp_path):
    report = load_bench("styles_report")
    rows = [{"method": "loha-r8", "kind": "params", "params_unet": 10, "params_te": 2}, BASE_HATCH]
    losses, measures = [0.070, 0.072, 0.077], [0.010, 0.014, 0.012]
    rows += [{"method": "loha-r8", "style": "hatch", "kind": "run", "seed": i, "lr": 2e-3, "heldout_loss": loss,
              "measure": m, "drawn": 1.0, "content": 0.75, "seconds": 60.0} for i, (loss, m) in enumerate(zip(losses, measures))]
    # a second log (a parallel process, started from a copy of the first) repeats the base row, the parameter
    # count and a run: each is read once
    other = [rows[0], BASE_HATCH, rows[2], {"method": "lora-r16", "style": "hatch", "kind": "run", "seed": 0, "lr": 6e-3,
                                   "heldout_loss": 0.069, "measure": 0.011, "drawn": 1.0, "content": 1.0, "seconds": 61.0}]
    text = report.results_tables([_logged(tmp_path, rows), _logged(tmp_path, other, "b.jsonl")])
    line = next(x for x in text.splitlines() if x.startswith("| loha-r8 | 0.002 |"))
    assert f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}" in line
    assert f"{statistics.mean(measures):.4f} ± {statistics.stdev(measures):.4f}" in line
    assert text.count("| loha-r8 | sd-loha loha | 8 / 4 | - | 10 | 2 | 12 |") == 1
    assert text.count("| base (strength 0) |") == 1
    # seed 0 paired with its LoRA partner: 0.070 - 0.069, LoHA lower in 0 of 1, color right 75 - 100 points
    assert "| hatch | loha-r8 - lora-r16 | 1 | +0.0010 | 0 of 1 | -0.0010 | 0 of 1 | -25 points |" in text


def test_strength_curves_tables_and_plot(tmp_path):
    """Curves averaged over seeds, strength 0 from the base row, as a share of the reachable style; the style
    is reached at the first strength with half of it; the plot has one panel per (kind, style) with curves."""
    report = load_bench("styles_report")
    rows = [BASE_HATCH]
    for seed, shift in enumerate((0.0, 0.002)):
        rows.append({"method": "loha-r8", "style": "hatch", "kind": "run", "seed": seed, "lr": 2e-3,
                     "heldout_loss": 0.07, "measure": 0.02 + shift, "drawn": 1.0, "content": 0.5, "seconds": 1.0,
                     "curve": _curve([0.004 + shift, 0.010 + shift, 0.016 + shift, 0.020 + shift], [1, 1, 0.75, 0.5])})
    rows.append({"method": "demo-reg", "style": "hatch", "kind": "recipe", "seed": 0, "lr": 3e-3, "heldout_loss": 0.07,
                 "measure": 0.01, "drawn": 1.0, "content": 1.0, "seconds": 1.0,
                 "curve": _curve([0.002, 0.004, 0.006, 0.010], [1, 1, 1, 1])})
    log = _logged(tmp_path, rows)
    curve = report.curve_means([r for r in rows if r.get("kind") == "run"], BASE_HATCH)
    assert curve[0.0]["measure"] == 0.001 and curve[0.5]["measure"] == pytest.approx(0.011)
    assert curve[1.0]["content"] == 0.5
    assert report.reached_at(curve, 0.03) == 0.75  # 0.017 >= 0.015; 0.011 at 0.5 is not
    assert report.reached_at(curve, 0.1) is None
    text = report.results_tables([log])
    assert "| loha-r8 | 2 | 3 % / 100% | 17 % / 100% | 37 % / 100% | 57 % / 75% | 70 % / 50% | 0.75 |" in text
    assert "| demo-reg | 1 |" in text and "demo recipe variants" in text
    png = report.plot_curves([log], tmp_path / "curves.png")
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (report.PANEL[1], 2 * report.PANEL[0], 3)  # two panels: rank sweep, recipes (hatch)
    for panel in (img[:, :report.PANEL[0]], img[:, report.PANEL[0]:]):
        assert (np.abs(panel.astype(int) - 255).sum(-1) > 60).mean() > 0.01  # curves and text drawn
    loha_blue = np.array(report.COLORS[0])
    assert (np.abs(img[:, :report.PANEL[0]].astype(int) - loha_blue).sum(-1) < 10).sum() > 50


def test_subject_scores_read_what_is_drawn():
    scenes = list(bench.STYLES["hatch"].scenes)
    rng = np.random.default_rng(0)
    drawn = [world.render_scene(sc, rng) for sc in scenes]
    assert bench.subject_scores("hatch", drawn, scenes) == {"drawn": 1.0, "content": 1.0}
    blank = [np.full_like(im, im[0, 0]) for im in drawn]  # the background alone: no object
    assert bench.subject_scores("hatch", blank[:6] + drawn[6:], scenes) == {"drawn": 0.5, "content": 0.5}
    shifted = scenes[1:] + scenes[:1]  # each picture judged against another prompt's color
    wrong = sum(a.color != b.color for a, b in zip(scenes, shifted)) / len(scenes)
    assert bench.subject_scores("hatch", drawn, shifted) == {"drawn": 1.0, "content": pytest.approx(1 - wrong)}
    posters = [world.Scene(c, "circle", "white") for c in bench.POSTER_COLORS]
    framed = [np.pad(world.render_scene(sc, rng)[4:-4, 4:-4], ((4, 4), (4, 4), (0, 0))) for sc in posters]
    assert bench.subject_scores("poster", framed, posters) == {"drawn": 1.0, "content": 1.0}


def test_strength_curve_sets_each_strength_and_puts_one_back(monkeypatch):
    seen = []

    class Network:
        multiplier = 1.0

        def set_multiplier(self, m):
            self.multiplier = m

    net = Network()
    monkeypatch.setattr(bench, "picture_scores", lambda pipe, style, trigger="": (seen.append(net.multiplier) or
                                                                       {"measure": net.multiplier, "drawn": 1.0,
                                                                        "content": 1 - net.multiplier / 2, "x": 0}))
    curve = bench.strength_curve(None, net, "hatch")
    assert seen == list(bench.STRENGTHS) and net.multiplier == 1.0
    assert curve["0.25"] == {"measure": 0.25, "drawn": 1.0, "content": 0.875} and set(curve) == {"0.25", "0.5", "0.75", "1"}


def test_base_pictures_are_the_base_models_own(tmp_path, one_thread):
    from sd_loha.models import load_pipeline

    train = tmp_path / "train"
    train.mkdir()
    for i, caption in enumerate(("a red circle on a white background", "a blue square on a orange background")):
        (train / f"p{i}.caption").write_text(caption + "\n")
    folder = bench.base_pictures(train, tmp_path / "reg")
    assert sorted(p.name for p in folder.iterdir()) == ["base_00.caption", "base_00.png", "base_01.caption", "base_01.png"]
    assert (folder / "base_01.caption").read_text().strip() == "a blue square on a orange background"
    pipe = load_pipeline("toy-sd1")
    image = pipe("a blue square on a orange background", num_inference_steps=bench.GEN_STEPS,
                 guidance_scale=bench.GUIDANCE, height=64, width=64, generator=torch.Generator().manual_seed(1)).images[0]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(folder / "base_01.png")), np.asarray(image))
    assert measure.judge(np.asarray(image)).color == "blue"  # the base model draws its prompt


def test_sessions_record_machine_versions_and_wall_time(tmp_path):
    runlog = load_bench("runlog")
    log = tmp_path / "runs.jsonl"
    with pytest.raises(KeyboardInterrupt):  # a session cut short is logged too
        with runlog.logged_session(log, threads=1):
            raise KeyboardInterrupt
    with runlog.logged_session(log, threads=2):
        pass
    rows = runlog.logged_rows(log)
    assert [r["kind"] for r in rows] == ["session", "session"] and rows[0]["versions"]["torch"] == torch.__version__
    lines = runlog.session_lines(rows)
    assert lines[0].startswith("Machine: ") and f"torch {torch.__version__}" in lines[0]
    assert "summed over 2 session(s)" in lines[-1] and "[1, 2]" in lines[-1]


def test_results_md_tables_are_the_committed_logs_tables():
    """bench/RESULTS.md's rank-sweep tables are what the committed run logs give, not numbers typed by hand."""
    report = load_bench("styles_report")
    root = Path(__file__).resolve().parents[1]
    logs = sorted((root / "bench" / "logs" / "styles-2026-12-06").glob("*.jsonl"))
    assert len(logs) == 7
    text = (root / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    start = text.index("<!-- bench_styles tables:")
    block = text[text.index("\n", start) + 1:text.index("<!-- end of bench_styles tables -->")]
    assert block.strip() == report.results_tables(logs).strip()
