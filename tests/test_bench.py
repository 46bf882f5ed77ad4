"""The issue-5 training-step benchmark still runs (timings are not asserted: they live in bench/RESULTS.md).

Tiny UNet, one round: the side-by-side table has a row per variant and target set, and the benchmark's
own consistency check (sd-loha's auto paths vs the straightforward formula on the same step) holds.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> str:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train_step.py"), "--size", "tiny", "--threads", "1", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_side_by_side_table_and_consistency_check():
    out = _bench("--variants", "floor,sd-loha,peft-lora", "--steps", "1", "--warmup", "0")
    m = re.search(r"loss rel diff ([0-9.e+-]+), max grad rel diff \(per tensor, vs its max\) ([0-9.e+-]+)", out)
    assert m, out
    assert float(m.group(1)) < 1e-5 and float(m.group(2)) < 1e-4
    rows = re.findall(r"^\| (attn-mlp|full) \| (floor|sd-loha|peft-lora) \| ([0-9.]+)M \| (\d+) ms \|", out, re.M)
    assert sorted((t, v) for t, v, *_ in rows) == sorted(
        (t, v) for t in ("attn-mlp", "full") for v in ("floor", "sd-loha", "peft-lora")
    )
    params = {(t, v): float(n) for t, v, n, _ in rows}
    for t in ("attn-mlp", "full"):  # equal trainable parameters, by construction
        assert params[(t, "sd-loha")] == params[(t, "peft-lora")] > 0
    assert "sd-loha paths:" in out


def test_paired_mode():
    out = _bench("--targets", "attn-mlp", "--pair", "peft-lora", "--steps", "2", "--warmup", "0")
    m = re.search(r"^\| attn-mlp \| (\d+) ms \| (\d+) ms \| ([0-9.]+) \| ([0-9.]+)-([0-9.]+) \| (\d) of 2 \|", out, re.M)
    assert m, out
    ratio, lo, hi = float(m.group(3)), float(m.group(4)), float(m.group(5))
    assert lo <= ratio <= hi and ratio > 0
