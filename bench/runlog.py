"""The resumable JSONL run log and the mean ± spread format shared by the toy-sd1 quality benchmarks
(bench_styles.py, bench_base_dtype.py): one JSON object per finished run, appended as the run ends, so a
rerun with the same --out skips what is logged and the tables regenerate from the log alone."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

PER_PICTURE = "measure_per_picture"  # a list per picture: shown while running, not logged


def log_row(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({k: v for k, v in row.items() if k != PER_PICTURE}) + "\n")
    shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items() if k != PER_PICTURE}
    print(json.dumps(shown), flush=True)


def logged_rows(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]


def spread(values: list[float], fmt: str) -> str:
    """mean ± sample standard deviation (the value alone for one)."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt.lstrip('+'))}"


def bench_parser(description: str, out: Path, out_help: str) -> argparse.ArgumentParser:
    """The options every log-based bench has: --out, --seeds, --threads, --results (tables only, from a log)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=out, help=out_help)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, help="only print the tables of an earlier run's runs.jsonl")
    return p
