"""The pieces of bench/bench_base_dtype.py (the quality cost of an fp8 / int8 / nf4 frozen base on toy-sd1) hold:
a tiny run gives one row per base storage, the storages really differ (counted layer by layer), the saved file is
measured on a plain base, a rerun continues from the log, and the tables and verdicts come from the log alone.
The full benchmark's figures live in bench/RESULTS.md."""

import json
import statistics

import pytest
import torch

from tests.bench_helpers import load_bench

pytest.importorskip("bitsandbytes")

bench = load_bench("bench_base_dtype")


def test_storage_counts_follow_what_each_layer_holds():
    """nf4 leaves a Linear whose input width is not a multiple of 64 as it is; convs stay in the compute dtype."""
    from sd_loha.train import lowmem

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(48, 32), torch.nn.Conv2d(8, 16, 3))
    assert bench.storage_counts(model) == {"float32": 64 * 32 + 48 * 32 + 16 * 8 * 9}
    lowmem.store_frozen_base(model, "nf4", torch.bfloat16)
    model.to("cpu")
    assert bench.storage_counts(model) == {"nf4": 64 * 32, "float32": 48 * 32 + 16 * 8 * 9}
    assert bench.quantized_fraction(bench.storage_counts(model)) == pytest.approx(2048 / (2048 + 1536 + 1152))


def test_tiny_run_has_a_row_per_base_storage_and_the_storages_differ(tmp_path, one_thread, monkeypatch):
    """Two steps per storage through the real trainer: one row each, the UNet's weights really stored as asked,
    the adapter moved the held-out loss on the base as trained and on the plain base, and a rerun adds nothing."""
    monkeypatch.setattr(bench.bench_styles, "HELDOUT_DRAWS", 2)
    log = bench.run_bench(tmp_path, ["poster"], [0], steps=2, pictures=False)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    runs = {r["dtype"]: r for r in rows if r["kind"] == "run"}
    base = {r["dtype"]: r for r in rows if r["kind"] == "base"}
    assert list(runs) == list(bench.DTYPES) and list(base) == list(bench.DTYPES)
    unet = {d: r["storage"]["unet"] for d, r in runs.items()}
    assert set(unet["auto"]) == {"bfloat16"}
    assert set(unet["fp8"]) == {"fp8"}
    assert unet["int8"].get("int8", 0) > 0 and unet["nf4"].get("nf4", 0) > 0
    assert unet["nf4"]["nf4"] < unet["int8"]["int8"]  # nf4 skips the Linear layers of input widths not % 64
    assert len({sum(c.values()) for c in unet.values()}) == 1  # the same layers counted in every storage
    for r in runs.values():
        assert set(r["storage"]["text_encoder"]) == {"bfloat16"}  # trained, so never quantized
        assert r["steps"] == 2 and r["heldout_loss"] < base["auto"]["heldout_loss"]
        assert r["heldout_loss_applied"] < base["auto"]["heldout_loss"]
    assert len({r["heldout_loss"] for r in runs.values()}) > 1  # the storages do change the numbers
    assert (tmp_path / "runs" / f"poster-{bench.METHOD}-nf4-lr0.006-seed0" / f"{bench.METHOD}.safetensors").exists()
    bench.run_bench(tmp_path, ["poster"], [0], steps=2, pictures=False)
    again = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r for r in again if r["kind"] in ("run", "base")] == [r for r in rows if r["kind"] in ("run", "base")]
    text = bench.results_tables(log)
    for dtype in bench.DTYPES:
        assert f"| {bench._label(dtype)} | 1 |" in text


def test_tables_pair_seeds_with_bf16_and_state_the_verdict(tmp_path):
    def storage(q: str) -> dict:
        return {"unet": {q: 75, "bfloat16": 25} if q != "bfloat16" else {"bfloat16": 100}, "text_encoder": {"bfloat16": 100}}

    ref = [0.100, 0.110]
    losses = {"auto": ref, "fp8": [0.101, 0.1111], "int8": [0.100, 0.110], "nf4": [0.106, 0.116]}
    rows = [{"kind": "run", "style": "poster", "dtype": d, "seed": s, "steps": 300, "heldout_loss": x,
             "heldout_loss_applied": x, "measure": 0.4, "content": 0.5, "seconds": 100.0,
             "storage": storage({"auto": "bfloat16"}.get(d, d))}
            for d, xs in losses.items() for s, x in enumerate(xs)]
    log = tmp_path / "runs.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = bench.results_tables(log)
    nf4 = [losses["nf4"][i] / ref[i] - 1 for i in range(2)]
    line = next(x for x in text.splitlines() if x.startswith("| nf4 |"))
    assert f"{100 * statistics.mean(nf4):+.2f} ± {100 * statistics.stdev(nf4):.2f} %" in line
    assert "| 75.0% | 37.5% |" in line  # UNet, then UNet + text encoder
    assert f"- nf4 (file on the plain base): {statistics.mean(nf4):+.2%} against bf16 (target <= +5%): NOT met; " \
           "2 of 2 seeds over" in text
    assert "- fp8 (file on the plain base): +1.00% against bf16 (target <= +2%): met; 0 of 2 seeds over" in text
