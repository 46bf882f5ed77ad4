"""The tables and the style-against-subject plot of bench/bench_styles.py, made from its run logs alone.

    python bench/bench_styles.py --results /tmp/bs_A/runs.jsonl,/tmp/bs_B/runs.jsonl --plot docs/style-vs-subject.png

Several logs (runs made in parallel processes) are read as one: the base rows and parameter counts they share are
taken once. "Reachable" is the style measure of the training pictures after toy-sd1's VAE: the most an adapter
can show, since every picture passes through that VAE.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ holds the scripts this one reads

from bench_styles import METHODS, STRENGTHS, STYLES
from runlog import logged_rows, session_lines, spread

REACHED = 0.5  # the style counts as reached at the first strength whose measure is half the reachable one


def _row_key(row: dict[str, Any]) -> Any:
    """What makes a logged row the same row in another log: a style's base row, a method's parameter count, a
    run (kind, method, style, seed, lr), or a session (all of it)."""
    if row.get("method") == "base":
        return ("base", row.get("style"))
    if row.get("kind") in ("params", "sweep", "run", "recipe"):
        return (row["kind"], row["method"], row.get("style"), row.get("seed"), row.get("lr"))
    return json.dumps(row, sort_keys=True)


def load_rows(logs: list[Path]) -> list[dict[str, Any]]:
    """The rows of several logs as one: a row in two logs (the base rows and parameter counts every process logs,
    or the rows of a log a process was started from a copy of) counts once."""
    rows, seen = [], set()
    for row in (r for log in logs for r in logged_rows(log)):
        if _row_key(row) not in seen:
            seen.add(_row_key(row))
            rows.append(row)
    return rows


def _base(rows: list[dict[str, Any]], style: str) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("method") == "base" and r.get("style") == style), None)


def curve_means(runs: list[dict[str, Any]], base: dict[str, Any]) -> dict[float, dict[str, float]]:
    """Mean over the runs (seeds) of each figure at each strength; strength 0 is the base model's row."""
    out = {0.0: {k: base[k] for k in ("measure", "drawn", "content") if k in base}}
    for s in STRENGTHS:
        points = [r["curve"][f"{s:g}"] for r in runs if "curve" in r]
        if points:
            out[s] = {k: statistics.mean(p[k] for p in points) for k in ("measure", "drawn", "content")}
    return out


def reached_at(curve: dict[float, dict[str, float]], reachable: float) -> float | None:
    """The first strength whose style measure is REACHED of the reachable one (None: not within 1)."""
    return next((s for s, p in sorted(curve.items()) if p["measure"] >= REACHED * reachable), None)


def results_tables(logs: list[Path]) -> str:
    rows = load_rows(logs)
    out = session_lines(rows)
    out += ["", *_params_table(rows), "", *_sweep_table(rows)]
    for kind in ("run", "recipe"):
        out += _style_tables(rows, kind)
    out += _pair_table(rows)
    for kind in ("run", "recipe"):
        out += _curve_tables(rows, kind)
    return "\n".join(out)


def _params_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| method | library, algorithm | rank / alpha | conv rank / alpha | UNet params | text-encoder params | total |",
           "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r.get("kind") == "params"):
        m, unet, te = METHODS[r["method"]], r["params_unet"], r["params_te"]
        conv = f"{m.conv_rank} / {m.conv_alpha:g}" if m.conv_rank else "-"
        out.append(f"| {r['method']} | {m.library} {m.algo} | {m.rank} / {m.alpha:g} | {conv} | {unet:,} | {te:,} | "
                   f"{unet + te:,} |")
    return out


def _sweep_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| learning-rate sweep (seed 0) | lr | held-out loss | style measure | object drawn | object color right |",
           "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r.get("kind") == "sweep"):
        out.append(f"| {r['style']} {r['method']} | {r['lr']:g} | {r['heldout_loss']:.4f} | {r['measure']:.4f} | "
                   f"{r['drawn']:.0%} | {r['content']:.0%} |")
    return out


def _style_tables(rows: list[dict[str, Any]], kind: str) -> list[str]:
    out = []
    what = "the rank sweep" if kind == "run" else "the demo recipe's variants"
    for style, spec in STYLES.items():
        base = _base(rows, style)
        runs = [r for r in rows if r.get("kind") == kind and r["style"] == style]
        if not runs or base is None:
            continue
        out += ["", f"**{style}**, {what} ({spec.measure.__name__} at strength 1; n = seeds)", "",
                "| method | lr | n | held-out loss | style measure | object drawn | object color right | train s |",
                "|---|---|---|---|---|---|---|---|",
                f"| base (strength 0) | - | - | {base['heldout_loss']:.4f} | {base['measure']:.4f} | "
                f"{base.get('drawn', 1.0):.0%} | {base['content']:.0%} | - |",
                f"| training pictures (as drawn / after the VAE) | - | - | - | {base['measure_training_pictures']:.4f} / "
                f"{base['measure_after_vae']:.4f} | - | - | - |"]
        for name in dict.fromkeys(r["method"] for r in runs):
            mine = [r for r in runs if r["method"] == name]
            out.append(f"| {name} | {mine[0]['lr']:g} | {len(mine)} | {spread([r['heldout_loss'] for r in mine], '.4f')} | "
                       f"{spread([r['measure'] for r in mine], '.4f')} | "
                       f"{spread([100 * r.get('drawn', 1.0) for r in mine], '.0f')} % | "
                       f"{spread([100 * r['content'] for r in mine], '.0f')} % | "
                       f"{statistics.mean(r['seconds'] for r in mine):.0f} |")
    return out


def _pair_table(rows: list[dict[str, Any]]) -> list[str]:
    """LoHA minus its LoRA-family pair (same layers, same parameters), seed by seed: the same seed trains on the
    same batches and noise."""
    runs = {(r["style"], r["method"], r["seed"]): r for r in rows if r.get("kind") == "run"}
    pairs = [(name, m.pair) for name, m in METHODS.items() if m.library == "sd-loha"]
    out = ["", ("| style | LoHA - pair | seeds | held-out loss difference | LoHA lower in | style measure difference "
                "| LoHA higher in | object color right difference |"), "|---|---|---|---|---|---|---|---|"]
    for style, (loha, other) in itertools.product(STYLES, pairs):
        seeds = sorted(seed for (st, m, seed) in runs if st == style and m == loha and (style, other, seed) in runs)
        if not seeds:
            continue
        a, b = [runs[style, loha, s] for s in seeds], [runs[style, other, s] for s in seeds]
        dl = [x["heldout_loss"] - y["heldout_loss"] for x, y in zip(a, b)]
        dm = [x["measure"] - y["measure"] for x, y in zip(a, b)]
        dc = [100 * (x["content"] - y["content"]) for x, y in zip(a, b)]
        out.append(f"| {style} | {loha} - {other} | {len(seeds)} | {spread(dl, '+.4f')} | "
                   f"{sum(d < 0 for d in dl)} of {len(seeds)} | {spread(dm, '+.4f')} | "
                   f"{sum(d > 0 for d in dm)} of {len(seeds)} | {spread(dc, '+.0f')} points |")
    return out


def _curve_tables(rows: list[dict[str, Any]], kind: str) -> list[str]:
    """Per style: the style measure as a share of the reachable one, and the object color right, at each
    strength (mean over seeds); the strength at which the style is reached."""
    out = []
    strengths = (0.0, *STRENGTHS)
    for style in STYLES:
        base = _base(rows, style)
        runs = [r for r in rows if r.get("kind") == kind and r["style"] == style and "curve" in r]
        if not runs or base is None:
            continue
        reachable = base["measure_after_vae"]
        out += ["", f"**{style}**: style (% of reachable) / object color right, by strength "
                f"({'rank sweep' if kind == 'run' else 'demo recipe variants'}; mean of the seeds)", "",
                "| method | n | " + " | ".join(f"{s:g}" for s in strengths) + f" | style reached ({REACHED:.0%}) at |",
                "|---|---|" + "---|" * len(strengths) + "---|"]
        for name in dict.fromkeys(r["method"] for r in runs):
            mine = [r for r in runs if r["method"] == name]
            curve = curve_means(mine, base)
            cells = [f"{100 * curve[s]['measure'] / reachable:.0f} % / {curve[s]['content']:.0%}" for s in strengths]
            at = reached_at(curve, reachable)
            out.append(f"| {name} | {len(mine)} | " + " | ".join(cells) + f" | {'-' if at is None else f'{at:g}'} |")
    return out


# ---- the plot ------------------------------------------------------------------------------------------------

PANEL, PAD = (460, 340), (58, 16, 30, 40)  # panel size; left, right, top, bottom margins
# Tableau's 10 colors: distinct on white, one per method of a panel (legend order)
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _width(name: str) -> int:
    """LoHA lines thick, the LoRA family's thin: a pair reads as one color budget, two weights."""
    m = METHODS.get(name)
    return 1 if m is not None and m.algo == "lora" else 3


def _panel(title: str, series: list[tuple[str, dict[float, dict[str, float]]]], reachable: float) -> Image.Image:
    img = Image.new("RGB", PANEL, "white")
    d = ImageDraw.Draw(img)
    w, h = PANEL
    left, right, top, bottom = PAD
    xs = [100 * p["measure"] / reachable for _, c in series for p in c.values()]
    x_hi = max(xs + [1.0]) * 1.08
    y_lo = min([100 * p["content"] for _, c in series for p in c.values()] + [50.0])

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (w - left - right) * x / x_hi, top + (h - top - bottom) * (100 - y) / (100 - y_lo + 1e-9))

    d.rectangle([left, top, w - right, h - bottom], outline="#888")
    d.text((left, 6), title, fill="black")
    for y in (y_lo, (y_lo + 100) / 2, 100):
        d.text((6, xy(0, y)[1] - 6), f"{y:.0f} %", fill="#444")
    for x in (0, x_hi / 2, x_hi):
        d.text((xy(x, y_lo)[0] - 10, h - bottom + 4), f"{x:.0f} %", fill="#444")
    d.text((left, h - 16), "style shown (% of reachable) ->   up: object color right", fill="#444")
    for i, (name, curve) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        points = [xy(100 * p["measure"] / reachable, 100 * p["content"]) for _, p in sorted(curve.items())]
        d.line(points, fill=color, width=_width(name))
        for x, y in points:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color if _width(name) > 1 else "white", outline=color)
        # the legend in the lower left, where no curve goes (little style, subject lost)
        y = h - bottom - 8 - 12 * (len(series) - i)
        d.line([left + 8, y + 6, left + 24, y + 6], fill=color, width=_width(name))
        d.text((left + 28, y), name, fill=color)
    return img


def plot_curves(logs: list[Path], path: Path) -> Path:
    """One panel per style and kind (rank sweep, demo recipe variants): for each method the mean over seeds of
    (style shown, object color right) at strengths 0 (the base model), 0.25, 0.5, 0.75 and 1, joined in order."""
    from sd_loha.atomic import save_image_atomic

    rows = load_rows(logs)
    panels = []
    for kind, style in itertools.product(("run", "recipe"), STYLES):
        base = _base(rows, style)
        runs = [r for r in rows if r.get("kind") == kind and r["style"] == style and "curve" in r]
        if not runs or base is None:
            continue
        names = list(dict.fromkeys(r["method"] for r in runs))
        series = [(n, curve_means([r for r in runs if r["method"] == n], base)) for n in names]
        what = "rank sweep" if kind == "run" else "demo recipe variants"
        panels.append(_panel(f"{style}: {what}, strength 0 -> 1", series, base["measure_after_vae"]))
    if not panels:
        raise ValueError(f"no runs with strength curves in {', '.join(map(str, logs))}")
    columns = 2
    sheet = Image.new("RGB", (PANEL[0] * columns, PANEL[1] * ((len(panels) + 1) // columns)), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % columns) * PANEL[0], (i // columns) * PANEL[1]))
    return save_image_atomic(sheet, path)
