"""The resumable JSONL run log and the mean ± spread format shared by the toy-sd1 quality benchmarks
(bench_styles.py, bench_base_dtype.py): one JSON object per finished run, appended as the run ends, so a
rerun with the same --out skips what is logged and the tables regenerate from the log alone."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def machine() -> dict[str, Any]:
    """The machine and the versions a run's figures belong to."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for package in ("torch", "diffusers", "transformers", "lycoris-lora", "bitsandbytes"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions}


@contextmanager
def logged_session(log: Path, threads: int) -> Iterator[None]:
    """Log one invocation (machine, versions, command, start, wall time) when it ends, also when it is cut short:
    the tables sum the wall time of every session that wrote the log."""
    started = time.time()
    try:
        yield
    finally:
        log.parent.mkdir(parents=True, exist_ok=True)
        log_row(log, {"kind": "session", **machine(), "threads": threads, "argv": sys.argv[1:],
                      "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)) + " UTC",
                      "seconds": round(time.time() - started, 1)})


def session_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Machine, versions and total wall time of the sessions in a log, as lines for the tables' header."""
    sessions = [r for r in rows if r.get("kind") == "session"]
    if not sessions:
        return []
    out = []
    for key in dict.fromkeys((r["cpu"], r["cores"], r["python"], json.dumps(r["versions"], sort_keys=True))
                             for r in sessions):
        cpu, cores, python, versions = key
        shown = ", ".join(f"{k} {v}" for k, v in json.loads(versions).items())
        out.append(f"Machine: {cpu}, {cores} cores; Python {python}, {shown}.")
    total = sum(r["seconds"] for r in sessions)
    starts = [time.mktime(time.strptime(r["started"], "%Y-%m-%d %H:%M:%S UTC")) for r in sessions]
    span = max(t + r["seconds"] for t, r in zip(starts, sessions)) - min(starts)
    out.append(f"Wall time: {span / 60:.0f} min from the first session's start ({min(r['started'] for r in sessions)}) "
               f"to the last one's end; {total / 60:.0f} min summed over {len(sessions)} session(s), which overlap "
               f"when processes run in parallel; torch threads {sorted({r['threads'] for r in sessions})}.")
    return out
