"""Inspect tab: what an adapter file holds (sd_loha.inspect.summarize), the size of its change per block, block
weights to try (sent to the Generate tab) and its metadata editor (webui/tools_tab.py)."""

from __future__ import annotations

import re
from typing import Any

from sd_loha.blocks import block_order
from sd_loha.inspect import summarize

from .paths import PathPolicy, PathRefused

_PART_ORDER = {"te": 0, "te1": 1, "te2": 2, "te3": 3, "unet": 4, "transformer": 4}


def block_sort_key(key: str) -> tuple:
    """Chart order of a "part:block" key: text encoders first, then LoRA Block Weight's block order (SD 3.x's
    joint blocks by number: joint_blocks_2 before joint_blocks_10)."""
    part, _, block = key.partition(":")
    number = re.search(r"(\d+)$", block)
    return (_PART_ORDER.get(part, 9), part, block_order(block), block.rstrip("0123456789"),
            int(number.group(1)) if number else -1)


def summary_markdown(s: dict[str, Any]) -> str:
    lines = [
        f"**File:** `{s['file']}`  ",
        f"**Made for:** {s['architecture']}  ",
        "**Algorithm:** " + ", ".join(f"{k} ({v} modules)" for k, v in s["algorithms"].items()) + "  ",
        f"**Modules:** {s['modules']}",
        "",
        "| part | modules |",
        "|---|---|",
    ]
    for part, groups in s["parts"].items():
        lines.append(f"| {part} | " + ", ".join(f"{g}: {n}" for g, n in groups.items()) + " |")
    lines += ["", "| rank / alpha | modules |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in s["rank_alpha"].items()]
    if s["unsupported_modules"]:
        lines += ["", f"⚠ {len(s['unsupported_modules'])} modules use an algorithm sd-loha cannot merge: "
                  + ", ".join(f"`{m}`" for m in s["unsupported_modules"][:5]) + (" …" if len(s["unsupported_modules"]) > 5 else "")]
    if s.get("ignored_params"):
        lines += ["", f"{len(s['ignored_params'])} modules carry parameters sd-loha does not use (ignored when merging)."]
    return "\n".join(lines)


def norms_frame(s: dict[str, Any]):
    import pandas as pd

    items = sorted(s.get("delta_norm_by_block", {}).items(), key=lambda kv: block_sort_key(kv[0]))
    return pd.DataFrame([{"block": k, "change": v, "part": k.split(":")[0]} for k, v in items],
                        columns=["block", "change", "part"])


def inspect_file(policy: PathPolicy, path: str) -> tuple[str, Any, dict[str, Any]]:
    p = policy.check_adapter(path, what="adapter file")
    s = summarize(p, delta_norms=True)
    return summary_markdown(s), norms_frame(s), s["metadata"]


def build(policy: PathPolicy) -> dict[str, Any]:
    import gradio as gr

    from . import tools_tab
    from .generate_tab import _choices

    with gr.Row():
        file = gr.Dropdown(choices=_choices(policy), allow_custom_value=True, label="Adapter file (.safetensors)",
                           elem_id="inspect-file", scale=4)
        refresh = gr.Button("↻", scale=0, min_width=40, elem_id="inspect-refresh")
        go = gr.Button("Inspect", variant="primary", scale=1, elem_id="inspect-go")
    with gr.Row():
        with gr.Column(scale=2):
            summary = gr.Markdown(elem_id="inspect-summary")
        with gr.Column(scale=3):
            chart = gr.BarPlot(None, x="block", y="change", color="part", label="Size of the change per block (Frobenius norm of ΔW)",
                               height=320, x_label_angle=-45, elem_id="inspect-chart")
    metadata = gr.JSON(label="Metadata", elem_id="inspect-metadata")

    def on_inspect(path):
        try:
            md, df, meta = inspect_file(policy, path)
        except PathRefused as e:
            return f"**Refused:**\n\n```text\n{e}\n```", gr.skip(), gr.skip()
        except Exception as e:  # noqa: BLE001 - a damaged file is reported, not a crash
            from .runner import describe_error

            return f"**Cannot read this file:**\n\n```text\n{describe_error(e)}\n```", gr.skip(), gr.skip()
        return md, gr.BarPlot(value=df, sort=list(df["block"])), meta

    extras = tools_tab.build_inspect_extras(policy, file, metadata)
    load_meta, meta_fields = extras["load"]
    go.click(on_inspect, file, [summary, chart, metadata], api_name="inspect").then(
        load_meta, file, meta_fields, api_name=False)  # the editor shows the inspected file's fields
    refresh.click(lambda: gr.update(choices=_choices(policy)), None, file, api_name=False)
    return {"file": file, "lbw": extras["lbw"], "lbw_use": extras["lbw_use"]}
