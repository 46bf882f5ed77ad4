"""Train tab: dataset preflight, the common options as fields, the rest as TOML, Start/Stop/Resume, live view.

The settings are a :class:`~sd_loha.train.config.TrainConfig` built by the library's own parser: the TOML box
is read as a ``--config`` file is (same checks, same messages), the fields are a layer over it, and Save
writes ``TrainConfig.to_toml()``, so a file saved here trains identically with ``sd-loha train --config FILE``
(paths are written resolved and absolute), and any CLI config loads here. All the training itself is
``sd_loha.train.loop.train`` in the background runner (webui/runner.py).
"""


import html
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sd_loha.atomic import write_atomic
from sd_loha.train.checks import check_output_dir, check_paths
from sd_loha.train.config import (
    OPTIONS,
    ConfigError,
    TrainConfig,
    config_from_layers,
    load_config,
    loads_config,
)

from .defaults import (
    DEFAULT_GUIDANCE,
    DEFAULT_MODEL,
    DEFAULT_PROMPTS,
    DEFAULT_SAMPLER,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
)
from .paths import PathPolicy, PathRefused
from .runner import RunActive, TrainingRunner, describe_error

# Form fields in display order: option name -> label. Each is the option of that name (its widget follows the
# option's kind in OPTIONS), except "length_unit" and "length", which stand for max_train_steps / max_train_epochs.
FIELDS: dict[str, str] = {
    "pretrained_model": "Base model (built-in toy-sd1 / tiny-*, .safetensors / diffusers folder in the models folder, or hub id)",
    "train_data_dir": "Dataset folder (inside the data folder)",
    "output_dir": "Output folder (inside the outputs folder)",
    "output_name": "Output name (file name stem)",
    "overwrite": "Overwrite this output name's earlier files",
    "preset": "Preset (which layers get LoHA modules)",
    "network_dim": "Rank",
    "network_alpha": "Alpha",
    "conv_dim": "Conv rank (0 = no k×k convs)",
    "conv_alpha": "Conv alpha",
    "train_text_encoder": "Train the text encoder(s) too",
    "learning_rate": "Learning rate",
    "unet_lr": "UNet LR (empty = learning rate)",
    "text_encoder_lr": "Text encoder LR (empty = learning rate)",
    "length_unit": "Run length in",
    "length": "Steps / epochs",
    "resolution": "Resolution (512, or W,H)",
    "train_batch_size": "Batch size",
    "lr_scheduler": "LR schedule",
    "seed": "Seed",
    "save_every_n_steps": "Save every N steps (0 = only at the end)",
    "sample_prompts": "Sample prompts (one per line; empty = no samples)",
    "sample_every_n_steps": "Sample every N steps (0 = only at the end)",
    "sample_steps": "Sample denoising steps",
}
FIELD_NAMES = list(FIELDS)
LENGTH_FIELDS = {"length_unit": "unit", "length": "int"}
_WIDGETS = {"path": "text", "str": "text", "enum": "choice", "list": "lines"}  # option kind -> widget kind
DEMO_TOML = Path(__file__).resolve().parent.parent / "train_configs" / "demo.toml"
TOML_BOX, FORM = "TOML box", "fields"  # the names problems are reported under
# A fresh page's settings, over TrainConfig's defaults: the pretrained built-in base at the one size it draws, with
# buckets that reach down to it (the default min_bucket_reso, 256, refuses a 64 px resolution), and samples of its
# captions, drawn as its model card draws them, at the end of the run. Options without a field start in the TOML box.
START: dict[str, Any] = {
    "pretrained_model": DEFAULT_MODEL, "output_name": "my_loha", "resolution": (DEFAULT_SIZE, DEFAULT_SIZE),
    "min_bucket_reso": DEFAULT_SIZE, "sample_prompts": list(DEFAULT_PROMPTS), "sample_steps": DEFAULT_STEPS,
    "sample_guidance_scale": DEFAULT_GUIDANCE, "sample_sampler": DEFAULT_SAMPLER,
}


def field_kind(name: str) -> str:
    """The widget kind of a field, from its option's kind; an optional number ("optint"/"optfloat") reads 0 or
    empty as "not set"."""
    if name in LENGTH_FIELDS:
        return LENGTH_FIELDS[name]
    if name == "pretrained_model":
        return "model"  # a dropdown of the models the UI may load, custom values allowed
    spec = OPTIONS[name]
    kind = _WIDGETS.get(spec.kind, spec.kind)
    return "opt" + kind if spec.optional and kind in ("int", "float") else kind


# How each path option is checked against the folders the UI may use; the value is replaced by the resolved
# path. Every option of kind "path" must be here (tests/webui/test_train_tab.py checks it).
PATH_CHECKS: dict[str, Callable[[PathPolicy, str], str]] = {
    "pretrained_model": lambda policy, v: policy.check_model(v),
    "vae": lambda policy, v: policy.check_model(v, what="VAE"),
    "network_weights": lambda policy, v: str(policy.check_adapter(v, what="network_weights")),
    "train_data_dir": lambda policy, v: str(policy.resolve(v, "dataset", what="train_data_dir")),
    "reg_data_dir": lambda policy, v: str(policy.resolve(v, "dataset", what="reg_data_dir")),
    "conditioning_data_dir": lambda policy, v: str(policy.resolve(v, "dataset", what="conditioning_data_dir")),
    "output_dir": lambda policy, v: str(policy.resolve(v, "output_dir", what="output_dir")),
    "logging_dir": lambda policy, v: str(policy.resolve(v, "logging_dir", what="logging_dir")),
}


# ---------------------------------------------------------------------------------------------------
# settings <-> form <-> TOML (no gradio here: unit-testable)
# ---------------------------------------------------------------------------------------------------


def start_config(policy: PathPolicy) -> TrainConfig:
    """TrainConfig's defaults with START over them, writing into outputs/my_loha (no dataset chosen yet)."""
    cfg = TrainConfig()
    for name, value in {**START, "output_dir": str(policy.outputs_dir / START["output_name"])}.items():
        setattr(cfg, name, value)
    return cfg


def default_form(policy: PathPolicy) -> dict[str, Any]:
    """The fields of a fresh page (with start_toml() in the TOML box)."""
    return config_to_form(start_config(policy))


def start_toml() -> str:
    """The TOML box of a fresh page: the options of START that have no field."""
    tables: dict[str, list[str]] = {}
    for name, value in START.items():
        if name not in FIELDS:  # JSON's numbers, strings and booleans are TOML's
            tables.setdefault(OPTIONS[name].group, []).append(f"{name} = {json.dumps(value)}")
    return "\n".join(f"[{table}]\n" + "\n".join(lines) + "\n" for table, lines in tables.items())


def demo_config(policy: PathPolicy) -> TrainConfig | None:
    """train_configs/demo.toml (its base model on the bundled images) with the dataset and output folders of this
    UI."""
    if not DEMO_TOML.is_file():
        return None
    data = policy.data_dir / "demo"
    folders = {"train_data_dir": str(data if data.is_dir() else policy.root("demo")),
               "output_dir": str(policy.outputs_dir / "demo")}
    return config_from_layers([(DEMO_TOML.read_text(encoding="utf-8"), str(DEMO_TOML)), (folders, "web UI")])


def config_to_form(cfg: TrainConfig) -> dict[str, Any]:
    f: dict[str, Any] = {}
    for name in FIELDS:
        if name in LENGTH_FIELDS:
            continue
        kind, v = field_kind(name), getattr(cfg, name)
        if kind == "resolution":
            w, h = v
            v = str(w) if w == h else f"{w},{h}"
        elif kind == "lines":
            v = "\n".join(v)
        elif kind == "optint":
            v = v or 0
        elif v is None:
            v = "" if kind in ("text", "model") else None
        f[name] = v
    if cfg.max_train_epochs:
        f["length_unit"], f["length"] = "epochs", cfg.max_train_epochs
    else:
        f["length_unit"], f["length"] = "steps", cfg.max_train_steps
    return f


def _form_values(form: dict[str, Any]) -> dict[str, Any]:
    """The fields as option values (None = not set), for the layer over the TOML box."""
    out: dict[str, Any] = {}
    for name in FIELDS:
        if name not in form or name in LENGTH_FIELDS:
            continue
        kind, v = field_kind(name), form[name]
        if kind in ("int", "optint") and v is not None and v != "":
            v = int(v) if float(v).is_integer() else v  # the browser sends 8.0; 8.5 stays for the error
        if kind == "optint":
            v = v or None
        elif kind == "optfloat":
            v = None if v in (None, "", 0) else v
        elif kind == "lines":
            v = [line.strip() for line in (v or "").splitlines() if line.strip()]
        elif kind in ("text", "model", "resolution"):
            v = (v or "").strip() or None
        out[name] = v
    if "length" in form:
        n = form.get("length")
        n = int(n) if n not in (None, "") else None
        if form.get("length_unit") == "epochs":
            out["max_train_epochs"], out["max_train_steps"] = n, None
        else:
            out["max_train_steps"], out["max_train_epochs"] = n, None
    return out


def _layers(form: dict[str, Any], toml_text: str) -> list[tuple[str | dict[str, Any], str]]:
    """The TOML box read as a --config file, the fields over it (as --set is over the file)."""
    return [(toml_text or "", TOML_BOX), (_form_values(form), FORM)]


def build_config(policy: PathPolicy, form: dict[str, Any], toml_text: str = "") -> TrainConfig:
    """The TrainConfig of the TOML box overridden by the form, every path checked against the policy and
    written resolved (absolute), so the saved TOML trains the same from any working folder."""
    cfg = config_from_layers(_layers(form, toml_text))
    problems = []
    for name, check in PATH_CHECKS.items():
        value = getattr(cfg, name)
        if not value:
            continue
        try:
            setattr(cfg, name, check(policy, value))
        except PathRefused as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems, header="paths refused")
    return cfg


def toml_box_config(policy: PathPolicy, toml_text: str) -> TrainConfig:
    """The TOML box alone (for "Apply TOML to the fields"); the options every run needs default to the UI's
    folders and the default model when the box leaves them out."""
    needed = {"pretrained_model": DEFAULT_MODEL, "train_data_dir": str(policy.data_dir),
              "output_dir": str(policy.outputs_dir)}
    return loads_config(toml_text or "", base=needed, source=TOML_BOX)


def dataset_escapes(policy: PathPolicy, folder: Path, limit: int = 5) -> list[str]:
    """Files or folders in the dataset that are links leading outside the allowed folders."""
    bad: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink() and not policy.inside(p, "dataset"):
                bad.append(f"{p.relative_to(folder)} -> {os.readlink(p)}")
                if len(bad) >= limit:
                    return bad
    return bad


def preflight_report(policy: PathPolicy, form: dict[str, Any], toml_text: str = ""):
    """Run the dataset preflight with the form's dataset settings; returns the PreflightReport."""
    from sd_loha.train.checks import config_preflight

    # The dataset check needs neither a base model nor an output folder: stand-ins satisfy the validation.
    stand_ins = {"pretrained_model": DEFAULT_MODEL, "output_dir": str(policy.outputs_dir)}
    cfg = config_from_layers([*_layers(form, toml_text), (stand_ins, "dataset check")])
    folder = policy.resolve(cfg.train_data_dir, "dataset", must_exist=True, what="dataset folder")
    escapes = dataset_escapes(policy, folder)
    if escapes:
        raise PathRefused(f"the dataset folder holds links that lead outside the allowed folders: {', '.join(escapes)}")
    return config_preflight(cfg, folder=folder)


def preflight_markdown(report) -> str:
    """The preflight as Markdown; `report` is a PreflightReport or its to_dict()."""
    d = report if isinstance(report, dict) else report.to_dict()
    cap = d["captions"]
    lines = [
        f"**{d['images_found']} images found, {d['images_used']} used, {len(d['skipped'])} skipped**"
        + (f", {d['validation_images']} held out for validation" if d["validation_images"] else "")
        + f" · {d['steps_per_epoch']} steps per epoch at batch size {d['batch_size']}",
        "",
        f"Captions: {cap.get('file', 0)} from caption files, {cap.get('metadata', 0)} from metadata.jsonl, "
        f"{cap.get('folder', 0)} from folder names, **{cap.get('missing', 0)} missing**"
        + (f" (trained with {d['missing_caption_fallback']})" if cap.get("missing") else ""),
        "",
        "| bucket (W×H) | images | samples | batches |",
        "|---|---:|---:|---:|",
    ]
    for b in d["buckets"]:
        flag = " ⚠ fewer than the batch size" if b["smaller_than_batch"] else ""
        lines.append(f"| {b['width']}×{b['height']}{flag} | {b['images']} | {b['samples']} | {b['batches']} |")
    if d["skipped"]:
        lines += ["", "**Skipped files**", "", "| file | reason |", "|---|---|"]
        for s in d["skipped"][:30]:
            lines.append(f"| `{s['path']}` | {s['reason'].replace('|', '/')} |")
        if len(d["skipped"]) > 30:
            lines.append(f"| … | {len(d['skipped']) - 30} more |")
    if d["warnings"]:
        lines += ["", "**Warnings**", ""] + [f"- {w}" for w in d["warnings"]]
    return "\n".join(lines)


def preflight_thumbnails(report, n: int = 8) -> list[tuple[str, str]]:
    if isinstance(report, dict):
        root = Path(report["train_data_dir"])
        return [(str(root / it["path"]), (it["caption"] or "(no caption)")[:120]) for it in report["items"][:n]]
    return [(str(it.path), (it.caption or "(no caption)")[:120]) for it in report.items[:n]]


def _fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def status_html(snap: dict[str, Any]) -> str:
    st, step, total = snap["status"], snap["step"], snap["total"]
    frac = step / total if total else 0.0
    if st == "finished":
        frac = 1.0
    parts = [f"<b>{html.escape(snap['message'])}</b>"]
    if total:
        parts.append(f"step {step} / {total}")
    if snap.get("epoch"):
        parts.append(f"epoch {snap['epoch']}")
    if snap.get("it_s"):
        parts.append(f"{snap['it_s']:.2f} it/s")
    if snap.get("eta_s") is not None and st in ("training", "stopping") and total:
        parts.append(f"ETA {_fmt_time(snap['eta_s'])}")
    if snap.get("loss") is not None:
        parts.append(f"loss {snap['loss']:.4f}")
    return (
        f'<div class="sdl-status" data-status="{st}" data-step="{step}" data-total="{total}">'
        f'<div class="sdl-bar"><div class="sdl-fill sdl-{st}" style="width:{100 * frac:.1f}%"></div></div>'
        f'<div class="sdl-line">{" · ".join(parts)}</div></div>'
    )


def result_markdown(snap: dict[str, Any]) -> str:
    st = snap["status"]
    if st == "failed":
        return f"### Training failed\n\n```text\n{snap['error']}\n```"
    if st in ("finished", "stopped") and snap.get("output"):
        out = Path(snap["output"])
        lines = [f"### {'Finished' if st == 'finished' else 'Stopped'}",
                 f"Adapter file: **{out.name}**  ", f"in `{out.parent}`"]
        if st == "stopped":
            lines.append("\nA resumable state was saved: press **Resume** (same settings) to continue.")
        earlier = [p for p in snap.get("saved", []) if p != snap["output"]]
        if earlier:
            lines.append("\nIntermediate saves: " + ", ".join(f"`{Path(p).name}`" for p in earlier[-6:]))
        if snap.get("loss_curve"):
            lines.append(f"\nLoss curve: `{snap['loss_curve']}`")
        return "\n".join(lines)
    if snap["active"]:
        return f"Running, writing to `{snap.get('output_dir') or '?'}`"
    return ""


def loss_frame(snap: dict[str, Any]):
    """Loss, its moving average and the validation loss, long format for gr.LinePlot (None before step 1).

    Every series is present from the first frame on (validation as an empty NaN point until it has values):
    the plot fixes its colour legend from the first data it gets and does not draw series that come later."""
    import pandas as pd

    losses = snap["losses"]
    if not losses:
        return None
    w = max(2, len(losses) // 20)
    vals = [v for _, v in losses]
    avg, acc = [], 0.0
    for i, v in enumerate(vals):
        acc += v - (vals[i - w] if i >= w else 0.0)
        avg.append(acc / min(i + 1, w))
    stride = max(1, len(losses) // 1000)  # long runs: at most ~1000 points per series go to the browser
    keep = list(range(0, len(losses), stride))
    if keep[-1] != len(losses) - 1:
        keep.append(len(losses) - 1)
    rows = [(losses[i][0], vals[i], "training loss") for i in keep]
    rows += [(losses[i][0], avg[i], "moving average") for i in keep]
    rows += [(s, v, "validation") for s, v in snap["val_losses"]] or [(losses[0][0], float("nan"), "validation")]
    return pd.DataFrame({"step": pd.Series([r[0] for r in rows], dtype="int64"),
                         "loss": pd.Series([r[1] for r in rows], dtype="float64"),
                         "series": pd.Series([r[2] for r in rows], dtype="object")})


# ---------------------------------------------------------------------------------------------------
# the tab
# ---------------------------------------------------------------------------------------------------


def _sample_caption(path: str, step: int) -> str:
    """'step 30' for a step's grid; the end-of-run grids (final, progress) by name, as several share the last step."""
    stem = Path(path).stem
    return f"step {step}" if stem.startswith("step") else f"{stem} (step {step})"


def build(policy: PathPolicy, runner: TrainingRunner) -> dict[str, Any]:
    import gradio as gr

    defaults = default_form(policy)
    comps: dict[str, Any] = {}

    def field(name: str, **kw):
        label, kind = FIELDS[name], field_kind(name)
        eid = "train-" + name.replace("_", "-")
        v = defaults.get(name)
        if kind == "model":
            c = gr.Dropdown(choices=policy.model_choices(), value=v, allow_custom_value=True, label=label, elem_id=eid, **kw)
        elif kind == "bool":
            c = gr.Checkbox(value=bool(v), label=label, elem_id=eid, **kw)
        elif kind == "choice":
            c = gr.Dropdown(choices=list(OPTIONS[name].choices), value=v, label=label, elem_id=eid, **kw)
        elif kind == "unit":
            c = gr.Radio(["steps", "epochs"], value=v, label=label, elem_id=eid, **kw)
        elif kind in ("int", "optint"):
            c = gr.Number(value=v, precision=0, label=label, elem_id=eid, **kw)
        elif kind in ("float", "optfloat"):
            c = gr.Number(value=v, label=label, elem_id=eid, **kw)
        elif kind == "lines":
            c = gr.Textbox(value=v, lines=2, label=label, elem_id=eid, **kw)
        else:
            c = gr.Textbox(value=v, label=label, elem_id=eid, **kw)
        comps[name] = c
        return c

    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                config_path = gr.Textbox(label="Config file (.toml, same format as sd-loha train --config)", scale=4,
                                         value=str(policy.outputs_dir / "my_loha.toml"), elem_id="train-config-path")
                demo_btn = gr.Button("Demo settings", scale=1, min_width=60, elem_id="train-demo",
                                     visible=DEMO_TOML.is_file())
                load_btn = gr.Button("Load", scale=0, min_width=60, elem_id="train-load")
                save_btn = gr.Button("Save", scale=0, min_width=60, elem_id="train-save")
            with gr.Row():
                field("pretrained_model", scale=2)
                refresh_models = gr.Button("↻", scale=0, min_width=40, elem_id="train-refresh-models")
            with gr.Row():
                field("train_data_dir", scale=3, placeholder="e.g. my_style (= data/my_style)",
                      info="Folders: " + ", ".join(policy.dataset_choices()[:6]))
                check_btn = gr.Button("Check dataset", scale=1, elem_id="train-check")
            with gr.Row():
                field("output_dir", scale=3)
                field("output_name", scale=2)
                field("overwrite", scale=1)
            with gr.Row():
                field("preset")
                field("network_dim")
                field("network_alpha")
                field("conv_dim")
                field("conv_alpha")
                field("train_text_encoder")
            with gr.Row():
                field("learning_rate")
                field("unet_lr")
                field("text_encoder_lr")
                field("lr_scheduler")
            with gr.Row():
                field("length_unit")
                field("length")
                field("resolution")
                field("train_batch_size")
                field("seed")
                field("save_every_n_steps")
            with gr.Row():
                field("sample_prompts", scale=3)
                field("sample_every_n_steps", scale=1)
                field("sample_steps", scale=1)
            with gr.Accordion("All other options (TOML)", open=False):
                gr.Markdown("The fields above take precedence over the same options here. Save writes the file "
                            "`sd-loha train --config FILE` reads (options: docs/config.md).")
                toml_box = gr.Textbox(value=start_toml(), label="TOML", lines=14, max_lines=40, elem_id="train-toml", elem_classes=["mono"])
                apply_btn = gr.Button("Apply TOML to the fields", elem_id="train-apply")
        with gr.Column(scale=2):
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
                resume_btn = gr.Button("Resume", elem_id="train-resume")
            message = gr.Markdown(elem_id="train-message")
            status = gr.HTML(status_html(runner.snapshot()), elem_id="train-status")
            result = gr.Markdown(elem_id="train-result")
            result_file = gr.File(label="Adapter file", interactive=False, elem_id="train-file")
            loss_plot = gr.LinePlot(loss_frame(runner.snapshot()), x="step", y="loss", color="series",
                                    color_map={"training loss": "#a8b3bf", "moving average": "#1f4e9c",
                                               "validation": "#c0392b"},
                                    label="Loss", height=260, elem_id="train-loss")
            samples = gr.Gallery(label="Sample images", columns=2, height=420, object_fit="contain",
                                 elem_id="train-samples")  # labelled grids: shown whole, not cropped to squares
            with gr.Accordion("Dataset preflight", open=True):
                pre_md = gr.Markdown(elem_id="train-preflight")
                thumbs = gr.Gallery(label="First images and their captions", columns=4, height=220,
                                    elem_id="train-thumbs")
            with gr.Accordion("Log", open=False):
                log_box = gr.Textbox(lines=8, max_lines=8, show_label=False, elem_id="train-log", interactive=False)

    form_inputs = [comps[n] for n in FIELD_NAMES]
    seen = gr.State(-1)

    def _form(values: tuple) -> dict[str, Any]:
        return dict(zip(FIELD_NAMES, values))

    def on_check(*values):
        *form_vals, toml_text = values
        try:
            rep = preflight_report(policy, _form(form_vals), toml_text)
        except (PathRefused, ConfigError, ValueError) as e:
            return f"**Dataset check failed**\n\n```text\n{e}\n```", []
        except Exception as e:  # noqa: BLE001 - shown, never a dead button
            return f"**Dataset check failed**\n\n```text\n{describe_error(e)}\n```", []
        return preflight_markdown(rep), preflight_thumbnails(rep)

    def _prepare(values, *, resume: bool):
        *form_vals, toml_text = values
        cfg = build_config(policy, _form(form_vals), toml_text)
        check_paths(cfg)
        folders = [Path(d) for d in (cfg.train_data_dir, cfg.reg_data_dir, cfg.conditioning_data_dir) if d]
        escapes = [e for d in folders if d.is_dir() for e in dataset_escapes(policy, d)]
        if escapes:
            raise PathRefused("the dataset folder holds links that lead outside the allowed folders: " + ", ".join(escapes))
        if resume:
            from sd_loha.train.state import latest_state

            out = Path(cfg.output_dir)
            if not out.is_dir() or latest_state(out) is None:
                raise ConfigError([f"there is no saved training state in {out} to resume from; press Start for a new "
                                   "run (or choose the output folder of the run to continue)"], header="nothing to resume")
        else:
            try:
                check_output_dir(cfg)
            except ConfigError as e:
                raise ConfigError([p.message + ". Tick 'Overwrite' to replace them, press Resume to continue that "
                                   "run, or choose another output folder / name" for p in e.problems],
                                  header="output folder in use") from None
        return cfg

    def on_start(*values, resume: bool = False):
        busy = runner.busy_message()
        if busy:  # say so before validating anything
            return f"⚠ {busy}", gr.skip()
        try:
            cfg = _prepare(values, resume=resume)
            runner.start(cfg, resume=resume)
        except RunActive as e:
            return f"⚠ {e}", gr.skip()
        except (PathRefused, ConfigError, ValueError) as e:
            return f"**Cannot start:**\n\n```text\n{e}\n```", gr.skip()
        except Exception as e:  # noqa: BLE001
            return f"**Cannot start:**\n\n```text\n{describe_error(e)}\n```", gr.skip()
        verb = "Resumed" if resume else "Started"
        return f"{verb}: training into `{cfg.output_dir}` ({cfg.output_name}).", cfg.to_toml()

    def on_resume(*values):
        return on_start(*values, resume=True)

    def on_stop():
        if runner.stop():
            return "Stop requested: the run stops after the current step and saves a resumable state."
        return "No training run is active."

    def on_poll(last_version):
        snap = runner.snapshot()
        if snap["version"] == last_version:
            return (gr.skip(),) * 8
        samples_val = [(p, _sample_caption(p, s)) for p, s in snap["samples"] if Path(p).is_file()]
        out_file = snap["output"] if snap["output"] and Path(snap["output"]).is_file() else None
        return (status_html(snap), loss_frame(snap), samples_val[::-1], result_markdown(snap), out_file,
                "\n".join(snap["log"][-50:]), gr.update(interactive=snap["active"]), snap["version"])

    poll_outputs = [status, loss_plot, samples, result, result_file, log_box, stop_btn, seen]

    def on_load_file(path_text):
        try:
            p = policy.resolve(path_text, "config_read", must_exist=True, what="config file")
            cfg = load_config(p)
        except (PathRefused, ConfigError) as e:
            return (f"**Cannot load:**\n\n```text\n{e}\n```", *([gr.skip()] * len(FIELD_NAMES)), gr.skip())
        f = config_to_form(cfg)
        return (f"Loaded `{p}`.", *[f[n] for n in FIELD_NAMES], cfg.to_toml())

    def on_demo():
        try:
            cfg = demo_config(policy)
        except ConfigError as e:
            return (f"**Cannot load the demo settings:**\n\n```text\n{e}\n```", *([gr.skip()] * len(FIELD_NAMES)), gr.skip())
        f = config_to_form(cfg)
        return (f"Demo settings from `{DEMO_TOML.name}`: {cfg.pretrained_model} on the demo images.",
                *[f[n] for n in FIELD_NAMES], cfg.to_toml())

    def on_save_file(path_text, *values):
        *form_vals, toml_text = values
        try:
            p = policy.resolve(path_text, "config_write", what="config file")
            if p.suffix.lower() != ".toml":
                raise PathRefused(f"config file '{path_text}': use a .toml file name")
            cfg = build_config(policy, _form(form_vals), toml_text)
        except (PathRefused, ConfigError, ValueError) as e:
            return f"**Cannot save:**\n\n```text\n{e}\n```", gr.skip()
        text = cfg.to_toml()
        try:
            write_atomic(p, text.encode("utf-8"))
        except OSError as e:
            return f"**Cannot save:**\n\n```text\n{e}\n```", gr.skip()
        return f"Saved `{p}` (train it from the command line with `sd-loha train --config {p}`).", text

    def on_apply(toml_text):
        try:
            cfg = toml_box_config(policy, toml_text)
        except ConfigError as e:
            return (f"**TOML problem:**\n\n```text\n{e}\n```", *([gr.skip()] * len(FIELD_NAMES)))
        f = config_to_form(cfg)
        return ("Applied the TOML to the fields.", *[f[n] for n in FIELD_NAMES])

    def on_page_load():
        """A browser that (re)connects gets the settings and dataset report of the current or last run."""
        cfg, snap = runner.last_config, runner.snapshot()
        if cfg is None:
            return (*([gr.skip()] * len(FIELD_NAMES)), gr.skip(), gr.skip(), gr.skip())
        f = config_to_form(cfg)
        rep = snap.get("preflight_report")
        thumbs_v = [t for t in preflight_thumbnails(rep) if policy.inside(t[0])] if rep else gr.skip()
        return (*[f[n] for n in FIELD_NAMES], cfg.to_toml(), preflight_markdown(rep) if rep else gr.skip(), thumbs_v)

    def on_refresh_models():
        return gr.update(choices=policy.model_choices())

    check_btn.click(on_check, form_inputs + [toml_box], [pre_md, thumbs], api_name="preflight")
    comps["train_data_dir"].submit(on_check, form_inputs + [toml_box], [pre_md, thumbs], api_name=False)
    start_btn.click(on_start, form_inputs + [toml_box], [message, toml_box], api_name="start_training",
                    concurrency_id="train_control").then(on_poll, seen, poll_outputs, api_name=False, show_progress="hidden")
    resume_btn.click(on_resume, form_inputs + [toml_box], [message, toml_box], api_name="resume_training",
                     concurrency_id="train_control").then(on_poll, seen, poll_outputs, api_name=False, show_progress="hidden")
    stop_btn.click(on_stop, None, message, api_name="stop_training")
    load_btn.click(on_load_file, config_path, [message, *form_inputs, toml_box], api_name="load_config")
    save_btn.click(on_save_file, [config_path, *form_inputs, toml_box], [message, toml_box], api_name="save_config")
    demo_btn.click(on_demo, None, [message, *form_inputs, toml_box], api_name=False)
    apply_btn.click(on_apply, toml_box, [message, *form_inputs], api_name=False)
    refresh_models.click(on_refresh_models, None, comps["pretrained_model"], api_name=False)

    timer = gr.Timer(1.0)
    timer.tick(on_poll, seen, poll_outputs, api_name=False, show_progress="hidden", queue=False)

    def api_status() -> dict:
        """The training job's state: status, step, total, loss history, samples, output file, error."""
        snap = runner.snapshot()
        snap.pop("log", None)
        return snap

    gr.api(api_status, api_name="training_status")  # for scripts: gradio_client .predict(api_name="/training_status")
    return {"poll": (on_poll, seen, poll_outputs), "restore": (on_page_load, [*form_inputs, toml_box, pre_md, thumbs]),
            "toml_box": toml_box, **comps}
